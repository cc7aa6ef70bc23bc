"""Sampling cost of FPDM vs DiT at an equal budget of transformer-block evaluations per image, with and without
solution reuse, and at a reduced budget.

    python bench/bench_sampling.py --device cpu  # 32x32x4 inputs, patch 4, width 384, DiT depth 12, batch 32
    python bench/bench_sampling.py --hidden-size 1152 --num-heads 16 --patch-size 2 --depth 28 --dtype bf16  # XL/2

Random weights (every parameter perturbed: adaLN-Zero makes a fresh model output 0) and v-prediction, as in
bench_parallel.py, so the chains have denoiser-like dynamics. Variants, all DDIM over --steps steps with
sampling.sample_images on the same noise and labels:
  dit          DiT of depth D: D block evaluations per step;
  fpdm         FPDM (1 pre + fixed-point block + 1 post, same width) with the DiT's budget spread flat over the steps
               (sampling.iterations_from_block_budget): the same block evaluations per image;
  fpdm_reuse   the same, each step starting from the previous step's fixed point;
  fpdm_low     --low-budget of that budget (default 40%), with reuse.
Each variant is warmed up once, then the variants run round-robin --repeats times (machine noise hits them alike);
times are medians, per image. Block evaluations and FLOPs come from the sampler's own accounting (stats.compute()).
"""

import argparse
import json
import os
import platform
import statistics
import time

import torch

from fpdm.measure import perturb_parameters_
from fpdm.sampling import diffusion_for_sampling, iterations_from_block_budget, sample_images
from models import DiT

DIFFUSION_CONFIG = {"predict_v": True, "learn_sigma": True}


def build(args, fixed_point):
    torch.manual_seed(0)
    fpdm = dict(fixed_point=True, fixed_point_pre_depth=1, fixed_point_post_depth=1) if fixed_point else {}
    model = DiT(input_size=args.input_size, patch_size=args.patch_size, in_channels=4, hidden_size=args.hidden_size,
                num_heads=args.num_heads, depth=args.depth, num_classes=10, learn_sigma=True, **fpdm)
    return perturb_parameters_(model).to(args.device).eval()


def variants(args, dit, fpdm):
    """name -> (model, per-step iterations or None, reuse, block-evaluation budget per image)."""
    full = args.steps * dit.block_evaluations()
    low = int(round(full * args.low_budget))
    schedule = lambda budget: iterations_from_block_budget(fpdm, budget, args.steps, "flat")  # noqa: E731
    return {"dit": (dit, None, False, full), "fpdm": (fpdm, schedule(full), False, full),
            "fpdm_reuse": (fpdm, schedule(full), True, full), "fpdm_low": (fpdm, schedule(low), True, low)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast around sampling")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--num-heads", type=int, default=6)
    parser.add_argument("--depth", type=int, default=12, help="DiT depth; sets the block-evaluation budget per step")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--low-budget", type=float, default=0.4, help="fraction of the DiT budget for fpdm_low")
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--out", default="bench/results/bench_sampling.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    dit, fpdm = build(args, fixed_point=False), build(args, fixed_point=True)
    try:
        runs = variants(args, dit, fpdm)
    except ValueError as e:
        parser.error(f"--low-budget {args.low_budget}: {e}")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(args.batch_size, 4, args.input_size, args.input_size, generator=g).to(args.device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=g).to(args.device)
    diffusion = diffusion_for_sampling(DIFFUSION_CONFIG, args.steps)
    warmup_diffusion = diffusion_for_sampling(DIFFUSION_CONFIG, 2)

    def sample(name, diffusion):
        model, iterations, reuse, _ = runs[name]
        if iterations is not None and diffusion is warmup_diffusion:
            iterations = iterations[:2]
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            return sample_images(model, diffusion, noise, labels, cfg_scale=args.cfg_scale,
                                 iterations_per_step=iterations, reuse=reuse)

    for name in runs:
        sample(name, warmup_diffusion)
    times, results = {name: [] for name in runs}, {}
    for _ in range(args.repeats):
        for name in runs:
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = sample(name, diffusion)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    reference = results["fpdm"][0].float()
    rows = {}
    for name, (model, iterations, reuse, budget) in runs.items():
        samples, stats = results[name]
        compute = stats.compute()
        rows[name] = {"params": model.num_parameters(), "reuse": reuse, "budget_block_evals": budget,
                      "iterations_per_step": iterations, "block_evals_per_image": compute["block_evals"],
                      "flops_per_image": compute["flops_per_image"],
                      "seconds_per_image": statistics.median(times[name]) / args.batch_size,
                      "seconds_runs": times[name],
                      "max_abs_diff_to_fpdm": (samples.float() - reference).abs().max().item()
                      if model.fixed_point else None}
    dit_row, flat, reuse, low = rows["dit"], rows["fpdm"], rows["fpdm_reuse"], rows["fpdm_low"]
    ratios = {
        "fpdm/dit sampling time (same block evals)": flat["seconds_per_image"] / dit_row["seconds_per_image"],
        "fpdm/dit FLOPs (same block evals)": flat["flops_per_image"] / dit_row["flops_per_image"],
        "fpdm/dit block evals": flat["block_evals_per_image"] / dit_row["block_evals_per_image"],
        "reuse/no-reuse sampling time": reuse["seconds_per_image"] / flat["seconds_per_image"],
        "low/full budget sampling time (reuse)": low["seconds_per_image"] / reuse["seconds_per_image"],
        "low/full budget block evals": low["block_evals_per_image"] / reuse["block_evals_per_image"],
    }

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}, {args.dtype}; batch {args.batch_size}, {args.input_size}x{args.input_size}x4, patch "
          f"{args.patch_size}, width {args.hidden_size}, DDIM {args.steps} steps, cfg {args.cfg_scale}; DiT depth "
          f"{args.depth}; FPDM 1 + 1 blocks; low budget {args.low_budget:.0%}; median of {args.repeats}")
    print(f"{'variant':<12}{'params':>12}{'block evals':>13}{'GFLOPs/img':>12}{'ms/img':>10}{'iters/step':>12}"
          f"{'max|diff|':>11}")
    for name, r in rows.items():
        its = r["iterations_per_step"]
        its = "-" if its is None else (str(its[0]) if min(its) == max(its) else f"{min(its)}-{max(its)}")
        diff = "-" if r["max_abs_diff_to_fpdm"] is None else f"{r['max_abs_diff_to_fpdm']:.2e}"
        print(f"{name:<12}{r['params']:>12,}{r['block_evals_per_image']:>13}{r['flops_per_image'] / 1e9:>12.3g}"
              f"{r['seconds_per_image'] * 1e3:>10.1f}{its:>12}{diff:>11}")
    print("ratios (measured side by side in this run):")
    for name, value in ratios.items():
        print(f"  {name:<42}{value:6.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device_name, "torch": torch.__version__, "python": platform.python_version(),
                   "args": vars(args), "rows": rows, "ratios": ratios}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
