"""`make demo`: train a small FPDM on the bundled MNIST digits (1,500 steps, ~8 minutes on 2 cores), then sample it at
several compute budgets with and without solution reuse and timestep smoothing (~5 minutes), and measure FID-MNIST
and class accuracy. (experiments/ train the same recipe for 2,500 steps in a folder of their own.)

Idempotent: training resumes or is skipped when its run already finished; `--fresh` starts over.
"""

import argparse
import json
import os
import shutil
import time

from fpdm import cpu_threads  # before torch: OpenMP reads its wait policy (OMP_WAIT_POLICY) when torch loads
from fpdm.demo_recipe import add_spacing_argument, sample_quality, train

ROOT = os.path.dirname(os.path.abspath(__file__))
RUN_DIR = os.path.join(ROOT, "results", "demo-fpdm-mnist")


def configurations(model, steps):
    """(name, block budget per image, schedule, reuse): DiT-equivalent compute, then reduced budgets."""
    full = steps * model.block_evaluations()  # the same block evaluations as a DiT of this depth
    rows = [("DiT-equivalent compute, flat", full, "flat", False),
            ("DiT-equivalent compute, reuse", full, "flat", True)]
    for fraction in (0.6, 0.4):  # 40% is just above the floor of one iteration per step (37.5% here)
        budget = int(round(full * fraction))
        rows += [(f"{fraction:.0%} compute, flat", budget, "flat", False),
                 (f"{fraction:.0%} compute, reuse", budget, "flat", True),
                 (f"{fraction:.0%} compute, reuse + more-noisy", budget, "more-noisy", True)]
    return rows


def evaluate_budgets(ckpt_path, num_per_class, steps, cfg_scale, out_dir, timestep_spacing):
    from fpdm.checkpoints import load_model_for_sampling
    from fpdm.sampling import iterations_from_block_budget, save_grid
    model, train_config = load_model_for_sampling(ckpt_path)
    results, done = [], {}
    for name, budget, schedule, reuse in configurations(model, steps):
        iterations = iterations_from_block_budget(model, budget, steps, schedule)
        key = (tuple(iterations), reuse)  # a schedule that comes out the same as an earlier row's samples the same
        if key not in done:
            done[key] = sample_quality(model, train_config, steps, num_per_class, cfg_scale, iterations, reuse,
                                       timestep_spacing=timestep_spacing, full_metrics=True)
        quality = done[key]
        samples, seconds = quality["samples"], quality["seconds"]
        row = {"name": name, "block_evals": quality["compute"]["block_evals"], "schedule": schedule,
               "iterations": list(iterations), "reuse": reuse, "fid_mnist": quality["fid_mnist"],
               "accuracy": quality["accuracy"], "precision": quality["precision"], "recall": quality["recall"],
               "kid": quality["kid"], "seconds": seconds}
        if not results:  # the DiT-equivalent row as an ADM-format sample file: `python evaluate.py all-mnist` it
            save_npz(samples, quality["labels"], os.path.join(out_dir, "samples_dit_equivalent_flat.npz"))
        results.append(row)
        grid_name = name.replace(" ", "_").replace(",", "").replace("%", "pct").replace("+", "and")
        save_grid(samples[:: max(1, num_per_class // 4)][:40], os.path.join(out_dir, f"{grid_name}.png"), nrow=10)
        print(f"  {name:<42} {row['block_evals']:>5} block evals  FID-MNIST {row['fid_mnist']:7.2f}  "
              f"accuracy {row['accuracy']:.3f}  precision {row['precision']:.3f}  recall {row['recall']:.3f}  "
              f"({seconds:.0f} s)", flush=True)
    return results


def save_npz(samples, labels, path):
    """Samples in [-1, 1] as an ADM sample file (uint8 `arr_0` N x H x W x 3, `labels`), as sample_ddp.py writes."""
    import numpy as np
    from fpdm.run_folders import atomic_write
    from fpdm.sampling import to_uint8
    arrays = to_uint8(samples)
    atomic_write(path, lambda f: np.savez(f, arr_0=arrays, labels=labels.numpy()), "wb")
    return path


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, keep in (("flat, no reuse", lambda r: r["schedule"] == "flat" and not r["reuse"]),
                        ("flat, reuse", lambda r: r["schedule"] == "flat" and r["reuse"]),
                        ("reuse + more-noisy", lambda r: r["schedule"] == "more-noisy")):
        rows = sorted((r for r in results if keep(r)), key=lambda r: r["block_evals"])
        if rows:
            ax.plot([r["block_evals"] for r in rows], [r["fid_mnist"] for r in rows], "o-", label=label)
    ax.set_xlabel("transformer-block evaluations per image")
    ax.set_ylabel("FID-MNIST (lower is better)")
    ax.set_title("FPDM on MNIST: quality against sampling compute")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=1500, help="training steps (~0.3 s each on 2 cores)")
    parser.add_argument("--num-per-class", type=int, default=50, help="samples per class for FID-MNIST")
    parser.add_argument("--sampling-steps", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    add_spacing_argument(parser)
    parser.add_argument("--fresh", action="store_true", help="delete the previous demo run first")
    args = parser.parse_args()
    if args.fresh and os.path.isdir(RUN_DIR):
        shutil.rmtree(RUN_DIR)

    print(f"[1/2] training a small FPDM on MNIST ({args.max_steps} steps) -> {RUN_DIR}", flush=True)
    start = time.time()
    train(args.max_steps, RUN_DIR)
    train_minutes = (time.time() - start) / 60
    with open(os.path.join(RUN_DIR, "latest.json")) as f:
        ckpt = os.path.join(RUN_DIR, json.load(f)["path"])

    out_dir = os.path.join(RUN_DIR, "budgets")
    os.makedirs(out_dir, exist_ok=True)
    results_path = os.path.join(out_dir, "results.json")
    settings = {"checkpoint": ckpt, "args": {k: v for k, v in vars(args).items() if k != "fresh"}}
    cached = json.load(open(results_path)) if os.path.isfile(results_path) else {}
    if {k: cached.get(k) for k in settings} == settings:
        print(f"[2/2] already evaluated for this checkpoint and settings: {results_path} (--fresh to redo)")
        results = cached["results"]
    else:
        print(f"[2/2] sampling {args.num_per_class * 10} digits per setting ({args.sampling_steps} DDIM steps, "
              f"{args.timestep_spacing} spacing, cfg {args.cfg_scale}) and measuring FID-MNIST / accuracy", flush=True)
        print(f"  {cpu_threads.configure('cpu')}", flush=True)
        results = evaluate_budgets(ckpt, args.num_per_class, args.sampling_steps, args.cfg_scale, out_dir,
                                   args.timestep_spacing)
        with open(results_path, "w") as f:
            json.dump({**settings, "results": results}, f, indent=2)
        plot(results, os.path.join(out_dir, "fid_vs_compute.png"))

    print("\n| setting | block evals / image | FID-MNIST | accuracy | precision | recall |\n|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['block_evals']} | {r['fid_mnist']:.2f} | {r['accuracy']:.3f} | "
              f"{r.get('precision', float('nan')):.3f} | {r.get('recall', float('nan')):.3f} |")
    samples = sorted(os.listdir(os.path.join(RUN_DIR, "samples")))
    print(f"\ntraining took {train_minutes:.1f} min (0 if it was already done)")
    print(f"training samples (EMA, 50-step DDIM): {os.path.join(RUN_DIR, 'samples', samples[-1])}")
    print(f"budget grids, results.json and the plot fid_vs_compute.png: {out_dir}")


if __name__ == "__main__":
    main()
