"""What multi-GPU training pays outside the arithmetic: S-JFB stragglers, host-device syncs, and torch.compile.

    python bench/bench_hotpath.py --device cpu            # ~2 minutes on 2 cores (compile included)
    python bench/bench_hotpath.py --skip-compile          # seconds

Three measurements:
  straggler  DDP waits at every step for the slowest rank, so a step costs the maximum over ranks of n + c·m (n
             iterations without a graph, m with one, c = --with-grad-cost no-grad iterations each). Simulated over
             --sim-steps steps of the fpdm-xl2-in256 preset's counts (n in 0..10, m in 1..12) on --ranks ranks:
             "before", every rank drawing from its own RNG (seeded per rank, as the release and our first version
             did); "after", training.sjfb_counts (one draw per step, the same on every rank). The ratio
             is the mean step cost on R ranks over the mean on one rank: the straggler slowdown.
  syncs      host-device syncs (fpdm.measure.SyncCounter: .item(), .tolist(), .cpu(), bool/float/int of a tensor,
             torch.from_numpy) made by this repository's code per training step (train.py, a tiny FPDM, --train-steps
             steps, logged every --log-every) and per DDIM sampling step (20 steps, guidance, reuse).
  compile    compiled / eager time of one FPDM training step (random S-JFB counts, the same for both) and of a
             DDIM sample, with model.compile_regions() (inductor; needs a C++ compiler on the CPU). Compile time is
             excluded by warm-up runs; the ratio is of medians of --repeats interleaved runs.
"""

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

from fpdm import config as configs
from fpdm import training
from fpdm.measure import SyncCounter

HERE = os.path.dirname(os.path.abspath(__file__))


def train_script():
    """train.py, loaded from its file (a script, not an installed module), to count the syncs of its loop here."""
    spec = importlib.util.spec_from_file_location("train", training.TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def straggler(ranks, steps, cost_with_grad, seed=0):
    """{"before": ratio, "after": ratio, ...}: mean over steps of max over ranks of a step's cost, over one rank's."""
    cfg = configs.preset("fpdm-xl2-in256").replace(seed=seed)
    fp = cfg.fp
    n_range = (fp.fixed_point_no_grad_min_iters, fp.fixed_point_no_grad_max_iters + 1)
    m_range = (fp.fixed_point_with_grad_min_iters, fp.fixed_point_with_grad_max_iters + 1)
    cost = lambda n, m: n + cost_with_grad * m  # noqa: E731
    # before: rank r's own stream (seed·1000 + r, as train.py seeds each rank), one draw of (n, m) per step
    streams = [np.random.default_rng(seed * 1000 + r) for r in range(ranks)]
    before = np.array([[cost(s.integers(*n_range), s.integers(*m_range)) for s in streams] for _ in range(steps)])
    # after: every rank calls sjfb_counts(cfg, step), which does not depend on the rank
    after = np.array([[cost(*training.sjfb_counts(cfg, step)) for _ in range(ranks)] for step in range(steps)])
    return {"ranks": ranks, "steps": steps, "with_grad_cost": cost_with_grad,
            "before": {"one_rank": float(before[:, 0].mean()), "all_ranks": float(before.max(1).mean()),
                       "ratio": float(before.max(1).mean() / before[:, 0].mean())},
            "after": {"one_rank": float(after[:, 0].mean()), "all_ranks": float(after.max(1).mean()),
                      "ratio": float(after.max(1).mean() / after[:, 0].mean())}}


TINY = ["--data-path", "mnist", "--image-size", "14", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "4",
        "--num-heads", "2", "--fixed-point", "--global-batch-size", "8", "--tracker", "none", "--sample-every", "0"]


def training_syncs(out_dir, steps, log_every):
    """Syncs per training step of train.py (a tiny FPDM, random S-JFB counts), by where they happen."""
    train = train_script()
    with SyncCounter() as counter:
        counter.watch(train, "train_step", "update_ema")
        counter.watch(training.MetricsWindow, "log", "take_residual_by_t")
        train.main(train.parse_args([*TINY, "--results-dir", out_dir, "--run-name", "syncs", "--max-steps",
                                     str(steps), "--log-every", str(log_every), "--ckpt-every", str(steps)]))
    return {"steps": steps, "log_every": log_every, "total": counter.total, "per_step": counter.total / steps,
            "where": {f"{op} in {fn}": n for (op, fn), n in sorted(counter.calls.items())}}


def tiny_fpdm(device, hidden=64, depth=4):
    from fpdm.measure import perturb_parameters_
    from models import DiT
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=hidden, depth=depth, num_heads=4,
                num_classes=10, learn_sigma=True, fixed_point=True, class_dropout_prob=0.1)
    return perturb_parameters_(model).to(device)


def sampling_syncs(device, steps=20):
    """Syncs per DDIM step of a guided FPDM sample with reuse (after a first call has built the tables)."""
    from fpdm.sampling import diffusion_for_sampling, sample_images
    model = tiny_fpdm(device).eval()
    diffusion = diffusion_for_sampling({"learn_sigma": True}, steps)
    noise, labels = torch.randn(4, 4, 8, 8, device=device), torch.arange(4, device=device)
    sample_images(model, diffusion, noise, labels, cfg_scale=2.0, iterations_per_step=4, reuse=True)
    with SyncCounter() as counter:
        _, fn = counter.counting(sample_images)(model, diffusion, noise, labels, cfg_scale=2.0,
                                                iterations_per_step=4, reuse=True)
        during = counter.total
        counter.counting(fn.compute)()
    return {"steps": steps, "during_sampling": during, "per_step": during / steps,
            "reading_the_report": counter.total - during}


def compiled_vs_eager(device, repeats, train_steps=6):
    """Median time of `train_steps` S-JFB training steps (random counts, the same sequence for both) and of a 20-step
    DDIM sample, eager vs compile_regions()."""
    from diffusion import create_diffusion
    from fpdm.sampling import diffusion_for_sampling, sample_images
    eager, compiled = tiny_fpdm(device).train(), tiny_fpdm(device).train().compile_regions()
    diffusion = create_diffusion("", learn_sigma=True).prepare(device)
    sampler_diffusion = diffusion_for_sampling({"learn_sigma": True}, 20)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, 8, 8, generator=g).to(device), torch.randint(0, 10, (16,), generator=g).to(device)
    draws = [(int(a), int(b)) for a, b in zip(torch.randint(0, 6, (train_steps,), generator=g),
                                                torch.randint(1, 5, (train_steps,), generator=g))]

    def train_run(model):
        for n, m in draws:
            t = torch.randint(0, 1000, (len(x),), device=device)
            loss = diffusion.training_losses(model, x, t, model_kwargs={"y": y, "num_iterations": (n, m)})["loss"]
            loss.mean().backward()
        sync(device)

    def sample_run(model):
        model.eval()
        sample_images(model, sampler_diffusion, x[:8], y[:8], iterations_per_step=4, reuse=True)
        model.train()
        sync(device)

    times = {(k, kind): [] for k in ("eager", "compiled") for kind in ("train", "sample")}
    for kind, run in (("train", train_run), ("sample", sample_run)):
        for model in (eager, compiled):  # warm-up: compilation (every n, m of the sequence) happens here
            run(model)
        for _ in range(repeats):
            for name, model in (("eager", eager), ("compiled", compiled)):
                start = time.perf_counter()
                run(model)
                times[(name, kind)].append(time.perf_counter() - start)
    med = {f"{k}_{kind}_s": statistics.median(v) for (k, kind), v in times.items()}
    return {**med, "train_steps": train_steps, "draws": draws, "repeats": repeats,
            "train_ratio": med["compiled_train_s"] / med["eager_train_s"],
            "sample_ratio": med["compiled_sample_s"] / med["eager_sample_s"]}


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def have_compiler():
    import shutil
    return any(shutil.which(c) for c in ("g++", "c++", "clang++", "cl"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="(accepted for bench/run.py; this benchmark runs in fp32)")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--sim-steps", type=int, default=20000)
    parser.add_argument("--with-grad-cost", type=float, default=3.0, help="one with-grad iteration in no-grad ones")
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "bench_hotpath.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import tempfile

    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
              "args": vars(args)}
    result["straggler"] = s = straggler(args.ranks, args.sim_steps, args.with_grad_cost)
    print(f"straggler, {args.ranks} ranks vs 1 (cost n + {args.with_grad_cost:g}m, {args.sim_steps} steps): "
          f"before {s['before']['ratio']:.3f} ({s['before']['all_ranks']:.1f} vs {s['before']['one_rank']:.1f}), "
          f"after {s['after']['ratio']:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        result["train_syncs"] = t = training_syncs(tmp, args.train_steps, args.log_every)
    print(f"host syncs per training step: {t['per_step']:.2f} ({t['total']} over {t['steps']} steps, log every "
          f"{t['log_every']}): {t['where']}", flush=True)
    result["sample_syncs"] = d = sampling_syncs(args.device)
    print(f"host syncs per sampling step: {d['per_step']:.2f} ({d['during_sampling']} over {d['steps']} steps; "
          f"{d['reading_the_report']} to read the compute report)", flush=True)
    ratios = {f"straggler {args.ranks} ranks/1, before (per-rank draws)": s["before"]["ratio"],
              f"straggler {args.ranks} ranks/1, after (sjfb_counts)": s["after"]["ratio"],
              "host syncs per training step": t["per_step"], "host syncs per sampling step": d["per_step"]}
    if args.skip_compile or (args.device == "cpu" and not have_compiler()):
        print("compile: skipped" + ("" if args.skip_compile else " (no C++ compiler for inductor on the CPU)"))
    else:
        result["compile"] = c = compiled_vs_eager(args.device, args.repeats)
        print(f"compiled/eager: training {c['train_ratio']:.3f} ({c['compiled_train_s']:.3f} vs "
              f"{c['eager_train_s']:.3f} s for {c['train_steps']} steps), sampling {c['sample_ratio']:.3f} "
              f"({c['compiled_sample_s']:.3f} vs {c['eager_sample_s']:.3f} s)", flush=True)
        ratios.update({"compiled/eager train step time": c["train_ratio"],
                       "compiled/eager sampling time": c["sample_ratio"]})
    result["ratios"] = ratios
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
