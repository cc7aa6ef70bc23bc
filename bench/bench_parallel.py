"""Wall-clock of parallel DDIM (DEQ-DDIM Anderson / Picard, ParaDiGMS sliding window) vs sequential DDIM, one image.

    python bench/bench_parallel.py                                     # CPU: DiT-B/2 width at 8x8x4, ~2 minutes
    python bench/bench_parallel.py --device cuda --model DiT-B/2 --input-size 32
    python bench/bench_parallel.py --device cuda --ckpt results/run/checkpoints/step_0400000.pt --cfg-scale 4

For each number of steps T' the sequential sampler and every solver run side by side in this process (best of
--repeats, after a warm-up); the table gives parallel iterations, network evaluations (states per image; sequential
DDIM needs T'), time ratio (sequential / parallel: > 1 means parallel is faster) and the max |difference| to the
sequential sample; the JSON (--out) also has, for Anderson and Picard, that difference for the best iterate X and for
h(X), which the solve evaluated (Picard returns h(X), Anderson X). Random weights (no --ckpt) use v-prediction: ε = √(1−ᾱ) x + √ᾱ v is then the
exact denoiser of data at 0 plus a network perturbation, so the chain has denoiser-like dynamics and O(1) samples
(an ε-predicting random network gives samples of size ~500 and a trivially contractive chain).
Parallel sampling trades FLOPs (iterations × T') for latency: it wins only where a batch of T' states costs about
as much as one state, i.e. on a GPU with spare capacity, not on a busy CPU.
"""

import argparse
import json
import os
import platform
import time

import torch

from diffusion import create_diffusion
from diffusion.parallel import parallel_ddim_sample
from fpdm.measure import perturb_parameters_
from fpdm.sampling import GuidedModel, diffusion_for_sampling
from models import DiT, DiT_models, load_state_dict_checked


def build(args):
    """(network, diffusion factory): a train.py checkpoint, or a registry model with randomised weights."""
    if args.ckpt:
        ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        net = load_state_dict_checked(DiT(**ckpt["model_config"]), ckpt["ema"])
        make_diffusion = lambda steps: diffusion_for_sampling(ckpt["config"], steps)
    else:
        torch.manual_seed(0)
        net = DiT_models[args.model](input_size=args.input_size, num_classes=10,
                                     **({"depth": args.depth} if args.depth else {}))
        perturb_parameters_(net)  # adaLN-Zero makes a fresh model output 0
        make_diffusion = lambda steps: create_diffusion(f"trailing{steps}", predict_v=True)
    return net.to(args.device).eval(), make_diffusion


def timed(fn, repeats, device):
    best, out = float("inf"), None
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="DiT-B/2", help="registry name (random weights)")
    parser.add_argument("--input-size", type=int, default=8)
    parser.add_argument("--depth", type=int, default=None, help="override the registry depth")
    parser.add_argument("--ckpt", default=None, help="train.py checkpoint instead of random weights (EMA)")
    parser.add_argument("--cfg-scale", type=float, default=1.0)
    parser.add_argument("--num-iterations", type=int, default=None, help="FPDM iterations per step")
    parser.add_argument("--steps", default="25,50,100", help="comma-separated DDIM step counts T'")
    parser.add_argument("--solvers", default="anderson,picard,window")
    parser.add_argument("--max-iter", type=int, default=15)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--window", type=int, default=None, help="sliding-window size (default T')")
    parser.add_argument("--window-tol", type=float, default=0.1)
    parser.add_argument("--chunk-size", type=int, default=None, help="states per network call")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--out", default="bench/results/bench_parallel.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    net, make_diffusion = build(args)
    model = GuidedModel(net, args.cfg_scale, iterations_per_step=args.num_iterations if net.fixed_point else None)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, net.in_channels, *net.input_hw, generator=g).to(args.device)
    y = torch.zeros(1, dtype=torch.long, device=args.device)
    if args.cfg_scale != 1.0:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, net.num_classes)])
    kwargs = {"y": y}

    rows = []
    for steps in (int(s) for s in args.steps.split(",")):
        diffusion = make_diffusion(steps)
        sequential = lambda: diffusion.ddim_sample_loop(model, x.shape, noise=x, clip_denoised=False,
                                                        model_kwargs=kwargs)
        sequential()  # warm-up
        seq_time, reference = timed(sequential, args.repeats, args.device)
        for solver in args.solvers.split(","):
            run = lambda: parallel_ddim_sample(model, diffusion, x, solver, kwargs, max_iter=args.max_iter,
                                               tol=args.tol, window=args.window, window_tol=args.window_tol,
                                               chunk_size=args.chunk_size, return_result=True)
            par_time, (sample, result, stats) = timed(run, args.repeats, args.device)
            rows.append({"steps": steps, "solver": solver, "iterations": stats["parallel_iterations"],
                         "network_evaluations": stats["network_evaluations"], "converged": stats["converged"],
                         "residual": stats["residual"], "sequential_s": seq_time, "parallel_s": par_time,
                         "time_ratio": seq_time / par_time,
                         "max_abs_diff": (sample - reference).abs().max().item(),
                         # what the sampler chooses between (Picard returns h(X), Anderson X): both, from this solve
                         **({"max_abs_diff_best_iterate": (result.x[-1] - reference).abs().max().item(),
                             "max_abs_diff_its_h": (result.fx[-1] - reference).abs().max().item()}
                            if solver != "window" else {}),
                         "sample_max_abs": reference.abs().max().item()})

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; {args.ckpt or args.model} at {net.input_hw[0]}x{net.input_hw[1]}x{net.in_channels}, "
          f"width {net.pos_embed.shape[-1]}, {len(net.transformer_blocks())} blocks, cfg {args.cfg_scale}; "
          f"max_iter {args.max_iter}, tol {args.tol}, window tol {args.window_tol}; best of {args.repeats}")
    header = (f"{'T':>4} {'solver':>9} {'iters':>5} {'evals':>6} {'evals/T':>7} {'conv':>5} {'seq s':>7} "
              f"{'par s':>7} {'seq/par':>7} {'max|diff|':>9}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['steps']:>4} {r['solver']:>9} {r['iterations']:>5} {r['network_evaluations']:>6} "
              f"{r['network_evaluations'] / r['steps']:>7.1f} {str(r['converged']):>5} {r['sequential_s']:>7.2f} "
              f"{r['parallel_s']:>7.2f} {r['time_ratio']:>7.2f} {r['max_abs_diff']:>9.2e}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device, "torch": torch.__version__, "python": platform.python_version(),
                   "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                   "args": vars(args), "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
