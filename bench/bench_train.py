"""Training throughput and memory of DiT vs FPDM through the real train.py loop, on the bundled MNIST digits.

    python bench/bench_train.py                  # CPU: the demo geometry (14x14 digits, patch 2, width 128), ~1 minute
    python bench/bench_train.py --device cuda --image-size 32 --hidden-size 1152 --num-heads 16 --depth 28 --dtype bf16

Each run is train.py in its own subprocess (DiT of depth --depth; FPDM with 1 pre block, the fixed-point block and 1
post block, same width, S-JFB with fixed n/m), a few dozen steps into a temporary results folder. Throughput is
steady state: the images of every metrics.csv window after the first (which holds start-up and warm-up) over their
time. Peak memory is train.py's own peak_mem_mb column at the last logged step: on CUDA the allocator peak, on CPU the
process's peak RSS (VmHWM). On CPU the ratio uses the growth over the RSS after importing everything train.py loads
and reading the digits, which a wrapper around train.main records in the same process (then resetting VmHWM), so that
the ~0.8 GB of torch and friends does not flatten the ratio: model, EMA, AdamW state and activations remain.
With --repeats > 1 the runs go round-robin (DiT, FPDM, DiT, ...) and medians are reported.
"""

import argparse
import csv
import importlib.util
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from fpdm.measure import peak_rss_bytes, reset_peak_rss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("dit", "fpdm")
CHILD_PREFIX = "bench_train child: "


def train_script():
    """train.py, loaded from its file (a script, not an installed module), to run its loop in this process."""
    spec = importlib.util.spec_from_file_location("train", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_child(threads, train_argv):
    """Load what train.main will load (modules, the digits), record the RSS of that, train as train.py does, and
    print one line of JSON for the parent."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    import accelerate  # noqa: F401  (imported here so that the baseline holds it)
    import torchvision  # noqa: F401  (save_grid)

    import diffusion  # noqa: F401
    from fpdm import data
    from fpdm import sampling  # noqa: F401
    from models import DiT
    train = train_script()
    cfg = train.parse_args(train_argv)
    data.build_dataset(cfg.data.data_path, image_size=cfg.data.image_size, unconditional=cfg.data.unconditional)
    reset_peak_rss()  # reading the digits peaks above what it keeps
    baseline = peak_rss_bytes()
    run_dir = train.main(cfg)
    with open(os.path.join(run_dir, "config.json")) as f:
        model_config = json.load(f)["model"]
    with torch.device("meta"):  # a parameter count needs no memory
        params = DiT.from_config(model_config).num_parameters()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    print(CHILD_PREFIX + json.dumps({"import_baseline_bytes": baseline, "params": params, "device": device,
                                     "torch": torch.__version__}), flush=True)


def train_flags(args, variant, results_dir, run_name):
    flags = ["--data-path", "mnist", "--image-size", str(args.image_size), "--model", args.model,
             "--hidden-size", str(args.hidden_size), "--num-heads", str(args.num_heads), "--depth", str(args.depth),
             "--patch-size", str(args.patch_size), "--global-batch-size", str(args.batch_size),
             "--max-steps", str(args.steps), "--log-every", str(args.log_every), "--ckpt-every", str(args.steps),
             "--mixed-precision", "bf16" if args.dtype == "bf16" else "no",
             "--num-sample-images", "1", "--sample-steps", "2",  # the end-of-run preview grid: as cheap as it gets
             "--tracker", "none", "--seed", "0", "--results-dir", results_dir, "--run-name", run_name]
    if args.grad_ckpt:
        flags.append("--grad-ckpt")
    if variant == "fpdm":
        n, m = str(args.no_grad_iters), str(args.with_grad_iters)
        flags += ["--fixed-point", "--fixed-point-pre-depth", "1", "--fixed-point-post-depth", "1",
                  "--fixed-point-no-grad-min-iters", n, "--fixed-point-no-grad-max-iters", n,
                  "--fixed-point-with-grad-min-iters", m, "--fixed-point-with-grad-max-iters", m]
    return flags


def steady_state(metrics_path, batch_size):
    """(images/s over every logged window but the first, peak memory in bytes at the last logged step)."""
    with open(metrics_path) as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2:
        raise ValueError(f"{metrics_path} has {len(rows)} logged window(s); need 2 or more (raise --steps or lower "
                         f"--log-every)")
    images, seconds = 0, 0.0
    for previous, row in zip(rows, rows[1:]):
        window_steps = int(row["step"]) - int(previous["step"])
        images += window_steps * batch_size
        seconds += window_steps / float(row["steps_per_s"])
    return images / seconds, float(rows[-1]["peak_mem_mb"]) * 2**20


def run_train(args, variant, results_dir, run_name):
    cmd = [sys.executable, os.path.abspath(__file__), "--train-child", str(args.threads),
           *train_flags(args, variant, results_dir, run_name)]
    env = dict(os.environ)
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # train.py (accelerate) takes a GPU whenever it sees one
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"train.py ({variant}) exited with {proc.returncode}:\n{tail}\ncommand: {shlex.join(cmd)}")
    report = next(json.loads(line[len(CHILD_PREFIX):]) for line in proc.stdout.splitlines()
                  if line.startswith(CHILD_PREFIX))
    run_dir = os.path.join(results_dir, run_name)
    images_per_s, peak = steady_state(os.path.join(run_dir, "metrics.csv"), args.batch_size)
    if not args.keep_runs:
        shutil.rmtree(run_dir)  # its checkpoint holds model, EMA and AdamW state: 11 GB at XL/2
    if args.device == "cuda":
        report["import_baseline_bytes"] = 0  # the allocator peak counts tensors only
    return {**report, "images_per_s": images_per_s, "peak_memory_bytes": peak,
            "wall_s": time.perf_counter() - start}


def main():
    if sys.argv[1:2] == ["--train-child"]:
        return train_child(int(sys.argv[2]), sys.argv[3:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: --mixed-precision bf16")
    parser.add_argument("--model", default="DiT-S/2", help="registry name; the size flags below always override it "
                        "(their defaults: the demo's geometry)")
    parser.add_argument("--image-size", type=int, default=14, help="MNIST size: 7, 14, 28 or 32")
    parser.add_argument("--patch-size", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--depth", type=int, default=8, help="DiT depth (FPDM: 1 pre + fixed-point block + 1 post)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--log-every", type=int, default=10, help="metrics window; the first one is not counted")
    parser.add_argument("--no-grad-iters", type=int, default=3, help="S-JFB n (fixed; the demo recipe)")
    parser.add_argument("--with-grad-iters", type=int, default=2, help="S-JFB m (fixed; the demo recipe)")
    parser.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of DiT/pre/post blocks")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, round-robin; medians reported")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads of train.py (0: leave as is)")
    parser.add_argument("--keep-runs", default=None, help="write the train.py runs here instead of a temporary folder")
    parser.add_argument("--out", default="bench/results/bench_train.json")
    args = parser.parse_args()
    if args.steps < 2 * args.log_every:
        parser.error(f"--steps {args.steps} gives fewer than 2 windows of --log-every {args.log_every}: the first "
                     f"window is warm-up and is not counted")

    if args.device != "cpu":
        import torch  # not for --device cpu: the runs happen in subprocesses, and the import takes seconds
        args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda, but torch sees no CUDA device")

    runs = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        results_dir = args.keep_runs or tmp
        for repeat in range(args.repeats):
            for variant in VARIANTS:
                try:
                    result = run_train(args, variant, results_dir, f"{variant}-{repeat}")
                except RuntimeError as e:
                    sys.exit(f"error: {e}")
                runs[variant].append(result)
                print(f"  {variant} run {repeat + 1}/{args.repeats}: {result['images_per_s']:.1f} images/s, peak "
                      f"{result['peak_memory_bytes'] / 2**20:.0f} MB ({result['wall_s']:.0f} s)", flush=True)

    rows = {}
    for variant, results in runs.items():
        peak = max(r["peak_memory_bytes"] for r in results)
        baseline = min(r["import_baseline_bytes"] for r in results)
        rows[variant] = {"params": results[0]["params"],
                         "images_per_s": statistics.median(r["images_per_s"] for r in results),
                         "images_per_s_runs": [r["images_per_s"] for r in results],
                         "peak_memory_bytes": peak, "import_baseline_bytes": baseline,
                         "peak_memory_growth_bytes": peak - baseline,
                         "wall_s": sum(r["wall_s"] for r in results)}
    dit, fpdm = rows["dit"], rows["fpdm"]
    ratios = {"fpdm/dit params": fpdm["params"] / dit["params"],
              "fpdm/dit train images/s": fpdm["images_per_s"] / dit["images_per_s"],
              "fpdm/dit peak memory": fpdm["peak_memory_growth_bytes"] / max(dit["peak_memory_growth_bytes"], 1)}
    if args.device == "cpu":
        ratios["fpdm/dit peak RSS (whole process)"] = fpdm["peak_memory_bytes"] / dit["peak_memory_bytes"]

    device_name, torch_version = runs["dit"][0]["device"], runs["dit"][0]["torch"]
    print(f"device: {device_name}, {args.dtype}; train.py on MNIST {args.image_size}x{args.image_size}, patch "
          f"{args.patch_size}, width {args.hidden_size}, batch {args.batch_size}, {args.steps} steps (first "
          f"{args.log_every} not counted); DiT depth {args.depth}; FPDM 1 + 1 blocks, S-JFB n={args.no_grad_iters} "
          f"m={args.with_grad_iters}; median of {args.repeats}")
    mem_name = "peak CUDA alloc" if args.device == "cuda" else "peak RSS growth"
    print(f"{'variant':<8}{'params':>12}{'images/s':>11}{mem_name:>18}{'peak RSS':>12}")
    for name, r in rows.items():
        total = f"{r['peak_memory_bytes'] / 2**20:>9.0f} MB" if args.device == "cpu" else f"{'-':>12}"
        print(f"{name:<8}{r['params']:>12,}{r['images_per_s']:>11.1f}{r['peak_memory_growth_bytes'] / 2**20:>15.0f} MB"
              f"{total}")
    print("ratios (measured side by side in this run):")
    for name, value in ratios.items():
        print(f"  {name:<36}{value:6.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device_name, "torch": torch_version, "python": platform.python_version(),
                   "args": vars(args), "rows": rows, "ratios": ratios}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
