"""CPU training on a shared machine: `make demo`'s training step alone and beside other CPU-bound processes.

    python bench/bench_shared_cpu.py                  # ~15 minutes on 2 cores; writes bench/results/shared_cpu.json
    python bench/bench_shared_cpu.py --steps 6 --repeats 1 --variants auto,2-spin   # a smoke run

Each cell runs train.py --preset demo-mnist-fpdm for --steps logged steps (after --warmup steps that are not
timed) in a fresh process and reads its steps/s from metrics.csv, while `busy` pure-Python busy loops run beside it
(each one a CPU-bound process, as any background job on a small VM or a shared login node). Variants (environment
of the training process):

    auto      what train.py does by itself (fpdm/cpu_threads.py: threads for the free cores, waiting passively
              when other processes are busy; torch's and OpenMP's defaults on a quiet machine)
    2-spin    2 threads, GNU OpenMP's default waits (spin 300,000 times, then sleep): torch's behaviour
    2-spin10k, 2-spin1k   2 threads, spinning 10,000 / 1,000 times before sleeping
    2-passive 2 threads, OMP_WAIT_POLICY=PASSIVE (sleep at once)
    1         1 thread

Every cell runs --repeats times, the variants in forward order and then reversed (so no variant always runs first,
on a colder machine), and its time per step is the mean. The ratios: each variant beside b busy processes over the
same variant alone, and each variant over `auto` in the same setting. A fair share of c cores beside b busy
processes is c / (c + b) of the machine: 1.5x the time alone on 2 cores beside 1.
"""

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The environment of each variant. A user's OMP_NUM_THREADS / OMP_WAIT_POLICY / GOMP_SPINCOUNT win over train.py's
# own choice; GOMP_SPINCOUNT=300000 is GNU OpenMP's default spin-then-sleep, spelled out.
VARIANTS = {
    "auto": {},
    "2-spin": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "300000"},
    "2-passive": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "2-spin10k": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "10000"},
    "2-spin1k": {"OMP_NUM_THREADS": "2", "GOMP_SPINCOUNT": "1000"},
    "1": {"OMP_NUM_THREADS": "1"},
}


def busy_loops(n):
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def run_cell(variant, busy, args, workdir):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS",
                                                            "GOMP_SPINCOUNT")}
    env.update(VARIANTS[variant])
    env["CUDA_VISIBLE_DEVICES"] = ""
    name = f"{variant}-busy{busy}"
    log_every = args.steps
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--preset", "demo-mnist-fpdm", "--data-path", args.data_path,
           "--results-dir", workdir, "--run-name", name, "--max-steps", str(args.warmup + log_every),
           "--log-every", str(args.warmup) if args.warmup else str(log_every), "--eval-every", "0",
           "--sample-every", "0", "--num-sample-images", "0", "--fp-diagnostics-every", "100000",
           "--ckpt-every", "100000"]
    loops = busy_loops(busy)
    try:
        time.sleep(0.5 if busy else 0)  # the loops are running before training starts
        start = time.perf_counter()
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - start
    finally:
        for p in loops:
            p.kill()
            p.wait()
    if out.returncode:
        raise SystemExit(f"{name} failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    with open(os.path.join(workdir, name, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    threads = next((line.split("cpu threads ", 1)[1].split()[0].rstrip(":") for line in
                    (out.stdout + out.stderr).splitlines() if "cpu threads " in line), None)
    return {"variant": variant, "busy": busy, "steps_per_s": float(rows[-1]["steps_per_s"]),
            "s_per_step": 1.0 / float(rows[-1]["steps_per_s"]), "timed_steps": log_every, "wall_s": wall,
            "threads": threads}


def markdown_table(result):
    """docs/benchmarks.md's table: seconds per step per variant, alone and beside each number of busy processes,
    and the ratio to the same variant alone."""
    cells = {(c["variant"], c["busy"]): c for c in result["cells"]}
    variants = list(dict.fromkeys(c["variant"] for c in result["cells"]))
    busy = sorted({c["busy"] for c in result["cells"]})
    head = "| variant | threads | " + " | ".join(f"s/step beside {b} busy" for b in busy)
    head += "".join(f" | beside {b} / alone" for b in busy if b) + " |"
    lines = [head, "|" + "---|" * (2 + len(busy) + len([b for b in busy if b]))]
    for v in variants:
        row = [v, " / ".join(str(cells[(v, b)]["threads"]).rstrip(":") for b in busy)]
        row += [f"{cells[(v, b)]['s_per_step']:.3f}" for b in busy]
        row += [f"{cells[(v, b)]['s_per_step'] / cells[(v, 0)]['s_per_step']:.2f}x" for b in busy if b]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--busy", default="0,1", help="comma-separated numbers of busy processes beside training")
    p.add_argument("--steps", type=int, default=30, help="timed training steps per cell")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell (alternating the order of the variants)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (start-up, allocator)")
    p.add_argument("--data-path", default="mnist")
    p.add_argument("--timeout", type=float, default=900, help="seconds per cell")
    p.add_argument("--out", default=os.path.join(HERE, "results", "shared_cpu.json"))
    p.add_argument("--table", metavar="JSON", help="print the markdown table of a results file and exit")
    args = p.parse_args()
    if args.table:
        print(markdown_table(json.load(open(args.table))))
        return
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    busy_counts = [int(b) for b in args.busy.split(",")]
    runs = []
    with tempfile.TemporaryDirectory() as workdir:
        for busy in busy_counts:
            for repeat in range(args.repeats):
                for variant in variants if repeat % 2 == 0 else variants[::-1]:
                    run = run_cell(variant, busy, args, os.path.join(workdir, str(repeat)))
                    runs.append(run)
                    print(f"{variant:>10} beside {busy} busy: {run['s_per_step']:.3f} s/step "
                          f"(threads {run['threads']})", flush=True)
    cells = []
    for busy in busy_counts:
        for variant in variants:
            mine = [r for r in runs if r["variant"] == variant and r["busy"] == busy]
            cells.append({"variant": variant, "busy": busy, "s_per_step": statistics.mean(r["s_per_step"] for r in mine),
                          "runs_s_per_step": [r["s_per_step"] for r in mine], "threads": mine[0]["threads"]})
    by = {(c["variant"], c["busy"]): c for c in cells}
    ratios = {}
    for (v, b), c in by.items():
        if b and (v, 0) in by:
            ratios[f"{v}: busy{b}/alone time per step"] = c["s_per_step"] / by[(v, 0)]["s_per_step"]
        if v != "auto" and ("auto", b) in by:
            ratios[f"{v}/auto time per step, busy{b}"] = c["s_per_step"] / by[("auto", b)]["s_per_step"]
    result = {"benchmark": "shared_cpu", "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "args": vars(args),
              "cells": cells, "runs": runs, "ratios": ratios}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, args.out)
    for k, v in ratios.items():
        print(f"{k:>40}: {v:.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
