"""Every benchmark of the project in one run, and one table of the ratios they measured.

    python bench/run.py                          # CPU: each benchmark's own defaults (~7 minutes on 2 cores)
    python bench/run.py --device cuda            # GPU sizes: DiT-XL/2 vs FPDM-XL/2 in bf16 (see GPU_FLAGS)
    python bench/run.py --quick                  # tiny sizes: a smoke run of about a minute
    python bench/run.py --only model,sampling    # a subset; make bench BENCH_ARGS="--quick" does the same via make

Benchmarks (each in its own subprocess, so that memory figures do not leak from one to the next, writing its JSON
into --out-dir): model (bench_model.py: forward, training step and memory), train (bench_train.py: train.py
throughput and memory), sampling (bench_sampling.py: DDIM at equal block-evaluation budgets, reuse, reduced budget),
parallel (bench_parallel.py: parallel vs sequential DDIM), hotpath (bench_hotpath.py: S-JFB straggler slowdown on 8
ranks before/after rank-synchronous draws, host syncs per training and sampling step, compiled/eager). The combined table goes to stdout and, with every
sub-result, to <out-dir>/all.json. A benchmark that fails stops the run with the command that reruns it alone.
"""

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import time

BENCHMARKS = ("model", "train", "sampling", "parallel", "hotpath")
HERE = os.path.dirname(__file__)

# Sizes per mode; CPU runs use each benchmark's own defaults (the figures in README.md).
QUICK_FLAGS = {
    "model": ["--input-size", "8", "--patch-size", "4", "--hidden-size", "32", "--num-heads", "2", "--depth", "4",
              "--batch-size", "4", "--no-grad-iters", "2", "--with-grad-iters", "1", "--repeats", "1"],
    "train": ["--image-size", "14", "--patch-size", "7", "--hidden-size", "32", "--num-heads", "2", "--depth", "4",
              "--batch-size", "8", "--steps", "6", "--log-every", "2"],
    "sampling": ["--input-size", "8", "--patch-size", "4", "--hidden-size", "32", "--num-heads", "2", "--depth", "8",
                 "--batch-size", "4", "--steps", "10", "--repeats", "1"],
    "parallel": ["--model", "DiT-S/2", "--depth", "2", "--input-size", "4", "--steps", "8", "--max-iter", "4"],
    "hotpath": ["--sim-steps", "2000", "--train-steps", "10", "--log-every", "5", "--skip-compile"],
}
XL2 = ["--hidden-size", "1152", "--num-heads", "16", "--patch-size", "2", "--depth", "28"]
GPU_FLAGS = {
    "model": [*XL2, "--batch-size", "32"],  # 32x32x4 latents: DiT-XL/2 vs FPDM-XL/2 at 256 px
    "train": ["--model", "DiT-XL/2", *XL2, "--image-size", "32", "--batch-size", "64", "--steps", "60",
              "--log-every", "10"],  # MNIST padded to 32 px: 256 tokens, as XL/2 on 256 px latents
    "sampling": [*XL2, "--batch-size", "32"],
    "parallel": ["--model", "DiT-B/2", "--input-size", "32", "--steps", "50"],
}

# What each ratio means; the table adds the value, the JSON keeps both.
MEANINGS = {
    ("model", "fpdm/dit params"): "trainable parameters, FPDM (1 + fixed-point + 1 blocks) over DiT of the same width",
    ("model", "fpdm/dit forward time (same block evals)"): "no-grad forward at equal block evaluations (> 1: the "
                                                           "projection MLP of each iteration)",
    ("model", "fpdm/dit train step time"): "one S-JFB training step (fixed n, m) over one DiT step",
    ("model", "fpdm/dit saved activations"): "bytes autograd saves for backward in a training step",
    ("model", "fpdm/dit peak memory"): "peak memory of a training step (CUDA allocator, or CPU RSS growth)",
    ("model", "ours/release-style train step time"): "no-grad phase under torch.no_grad vs graph built, then detached",
    ("model", "ours/release-style saved activations"): "the same, bytes saved for backward",
    ("model", "ours/release-style peak memory"): "the same, peak memory of a step",
    ("train", "fpdm/dit params"): "trainable parameters of the two train.py runs",
    ("train", "fpdm/dit train images/s"): "steady-state train.py throughput (> 1: FPDM trains faster)",
    ("train", "fpdm/dit peak memory"): "peak memory of the train.py run (CUDA allocator, or CPU RSS growth over "
                                       "imports + data)",
    ("train", "fpdm/dit peak RSS (whole process)"): "the same, whole-process peak RSS including torch itself",
    ("sampling", "fpdm/dit sampling time (same block evals)"): "DDIM time per image at the DiT's block-evaluation "
                                                               "budget",
    ("sampling", "fpdm/dit FLOPs (same block evals)"): "estimated FLOPs at that budget (an iteration costs more than a "
                                                       "block)",
    ("sampling", "fpdm/dit block evals"): "block evaluations per image actually run: 1 means equal budgets",
    ("sampling", "reuse/no-reuse sampling time"): "cost of warm-starting each step from the last fixed point (same "
                                                  "iterations)",
    ("sampling", "low/full budget sampling time (reuse)"): "FPDM at the reduced budget over the full one, both reusing",
    ("sampling", "low/full budget block evals"): "block evaluations actually run at the reduced budget (≈ its "
                                                 "fraction)",
    ("hotpath", "straggler 8 ranks/1, before (per-rank draws)"): "mean step cost on 8 DDP ranks over one rank's when "
                                                                  "each rank draws its own S-JFB counts (slowest wins)",
    ("hotpath", "straggler 8 ranks/1, after (sjfb_counts)"): "the same with training.sjfb_counts: one draw per step "
                                                             "for all ranks (1 = no straggler)",
    ("hotpath", "host syncs per training step"): "host-device syncs by our code per step (1 NaN guard + the log rows' "
                                                 "reads, amortised)",
    ("hotpath", "host syncs per sampling step"): "host-device syncs by our code per DDIM step (guided FPDM with reuse)",
    ("hotpath", "compiled/eager train step time"): "compile_regions() over eager, tiny FPDM, random S-JFB counts (< 1: "
                                                   "compiled is faster)",
    ("hotpath", "compiled/eager sampling time"): "the same for a 20-step DDIM sample with reuse",
}


def commands(args):
    """name -> argv of each selected benchmark."""
    flags = QUICK_FLAGS if args.quick else GPU_FLAGS if args.device == "cuda" else {}
    result = {}
    for name in args.only:
        cmd = [sys.executable, os.path.join(HERE, f"bench_{name}.py"), "--device", args.device,
               *flags.get(name, []), "--out", os.path.join(args.out_dir, f"bench_{name}.json")]
        if name not in ("parallel", "hotpath"):
            cmd += ["--dtype", args.dtype]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        result[name] = cmd
    return result


def parallel_ratios(result):
    """bench_parallel reports rows per (T', solver): one ratio per solver at the largest T'."""
    steps = max(row["steps"] for row in result["rows"])
    rows = []
    for row in (r for r in result["rows"] if r["steps"] == steps):
        rows.append({"benchmark": "parallel", "ratio": f"sequential/parallel time, {row['solver']}, T'={steps}",
                     "value": row["time_ratio"],
                     "meaning": f"> 1: parallel DDIM is faster; {row['iterations']} parallel iterations, "
                                f"{row['network_evaluations'] / steps:.1f}x the network evaluations, "
                                f"{'converged' if row['converged'] else 'NOT converged'}"})
    return rows


def setup(name, args):
    """One line of the sizes a benchmark ran at, from the arguments its JSON records."""
    if name == "hotpath":
        return (f"straggler simulated over {args['sim_steps']} steps (with-grad iteration = {args['with_grad_cost']:g} "
                f"no-grad ones); syncs: train.py tiny FPDM {args['train_steps']} steps, log every "
                f"{args['log_every']}; compile: tiny FPDM (width 64, 8x8x4){', skipped' if args['skip_compile'] else ''}")
    if name == "parallel":
        depth = f", depth {args['depth']}" if args["depth"] else ""
        return (f"{args['ckpt'] or args['model']}{depth} at {args['input_size']}x{args['input_size']}, one image, "
                f"T' in {args['steps']}, max {args['max_iter']} iterations, tol {args['tol']}")
    size = args["image_size"] if name == "train" else args["input_size"]
    line = (f"{args['dtype']}, batch {args['batch_size']}, {size}x{size} {'MNIST' if name == 'train' else 'inputs'}, "
            f"patch {args['patch_size']}, width {args['hidden_size']}, DiT depth {args['depth']} vs FPDM 1 + 1")
    if name == "sampling":
        return line + f", DDIM {args['steps']} steps, low budget {args['low_budget']:.0%}"
    line += f", S-JFB n={args['no_grad_iters']} m={args['with_grad_iters']}"
    return line + (f", {args['steps']} train.py steps" if name == "train" else "")


def combined_ratios(results):
    rows = []
    for name, result in results.items():
        if name == "parallel":
            rows += parallel_ratios(result)
            continue
        for ratio, value in result["ratios"].items():
            rows.append({"benchmark": name, "ratio": ratio, "value": value, "meaning": MEANINGS.get((name, ratio), "")})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu "
                        "(all but the parallel benchmark)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma list of {', '.join(BENCHMARKS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in every benchmark (default: "
                        "as torch chooses; 1 with --quick, where extra threads only add overhead)")
    parser.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    args.only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in args.only if name not in BENCHMARKS]
    if unknown or not args.only:
        parser.error(f"--only {','.join(unknown) or '(empty)'}: choose from {', '.join(BENCHMARKS)}")

    if args.device != "cpu":
        import torch  # not for --device cpu: every benchmark runs in a subprocess, and the import takes seconds
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.threads is None:
        args.threads = 1 if args.quick and args.device == "cpu" else 0
    torch_version = importlib.metadata.version("torch")
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"device {args.device}, torch {torch_version}, {args.dtype}, {date}{', quick sizes' if args.quick else ''}",
          flush=True)

    cmds, results, wall = commands(args), {}, {}
    for i, (name, cmd) in enumerate(cmds.items(), 1):
        print(f"[{i}/{len(cmds)}] {name}: {shlex.join(cmd)}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(cmd).returncode
        wall[name] = time.perf_counter() - start
        if rc:
            sys.exit(f"error: benchmark '{name}' failed (exit {rc}) after {wall[name]:.0f} s; rerun it alone: "
                     f"{shlex.join(cmd)}")
        with open(cmd[cmd.index("--out") + 1]) as f:
            results[name] = json.load(f)
        print(f"[{i}/{len(cmds)}] {name} done in {wall[name]:.0f} s", flush=True)

    ratios = combined_ratios(results)
    # As the benchmarks saw it (CPU: with their thread count); torch names the GPU.
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else next(iter(results.values()))["device"]
    print(f"\nratios measured side by side in this run ({device_name}, torch {torch_version}, {args.dtype}, "
          f"{date}):")
    width = max(len(r["ratio"]) for r in ratios)
    header = f"{'benchmark':<10}{'ratio':<{width + 2}}{'value':>8}  what it means"
    print(header + "\n" + "-" * len(header))
    for r in ratios:
        print(f"{r['benchmark']:<10}{r['ratio']:<{width + 2}}{r['value']:>8.3f}  {r['meaning']}")
    setups = {name: setup(name, result["args"]) for name, result in results.items()}
    print("sizes:\n" + "\n".join(f"  {name:<10}{line}" for name, line in setups.items()))
    out = os.path.join(args.out_dir, "all.json")
    with open(out, "w") as f:
        json.dump({"device": device_name, "torch": torch_version, "python": platform.python_version(),
                   "date": date, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                   "args": vars(args), "commands": {n: shlex.join(c) for n, c in cmds.items()}, "wall_s": wall,
                   "setups": setups, "ratios": ratios, "results": results}, f, indent=2)
    print(f"wrote {out} (total {sum(wall.values()):.0f} s)")


if __name__ == "__main__":
    main()
