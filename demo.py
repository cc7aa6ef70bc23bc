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

import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
RUN_DIR = os.path.join(ROOT, "results", "demo-fpdm-mnist")



def add_spacing_argument(parser):
    """--timestep-spacing for the demo and experiments/ (recorded with their results)."""
    from diffusion import TIMESTEP_SPACINGS
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=TIMESTEP_SPACINGS[0],
                        help="DDIM timesteps (diffusers' names); trailing starts at T-1")


def train(max_steps, run_dir=RUN_DIR):
    """The measured CPU recipe (configs.PRESETS["demo-mnist-fpdm"]) for `max_steps` steps in `run_dir`: trained,
    resumed, or skipped when finished."""
    import configs
    import train as trainer
    trainer.launch(configs.preset("demo-mnist-fpdm", max_steps=max_steps, results_dir=os.path.dirname(run_dir),
                                  run_name=os.path.basename(run_dir), resume="auto"))


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


def sample_quality(model, train_config, steps, num_per_class=50, cfg_scale=2.0, iterations_per_step=None,
                   reuse=False, seed=0, timestep_spacing="trailing", sampler="ddim", fp_solver=None,
                   full_metrics=False):
    """Sample `num_per_class` digits of every class from fixed noise (`seed`) with `sampler` over `timestep_spacing`;
    returns a dict with FID-MNIST, class accuracy (with `full_metrics` also precision, recall and KID on the same
    features: evaluate.mnist_metrics), the compute report, the labels and the samples. Shared by the demo and
    experiments/."""
    import evaluate
    from sampling import diffusion_for_sampling, sample_images
    labels = torch.arange(model.num_classes).repeat_interleave(num_per_class)
    noise = torch.randn(len(labels), 1, *model.input_hw, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    samples, stats = sample_images(model, diffusion_for_sampling(train_config, steps, timestep_spacing), noise, labels,
                                   cfg_scale=cfg_scale, iterations_per_step=iterations_per_step, reuse=reuse,
                                   sampler=sampler, fp_solver=fp_solver)
    seconds = time.perf_counter() - start
    result = {"compute": stats.compute(), "seconds": seconds, "samples": samples, "labels": labels}
    if full_metrics:
        metrics = evaluate.mnist_metrics(samples, labels)
        return {**result, "fid_mnist": metrics["fid"], "accuracy": metrics["accuracy"],
                **{k: metrics[k] for k in ("precision", "recall", "kid", "kid_std")}}
    return {**result, "fid_mnist": evaluate.fid_mnist(samples),
            "accuracy": evaluate.classifier_accuracy(samples, labels)}


def evaluate_budgets(ckpt_path, num_per_class, steps, cfg_scale, out_dir, timestep_spacing):
    from sampling import iterations_from_block_budget, load_model_for_sampling, save_grid
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
    from run_folders import atomic_write
    from sampling import to_uint8
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
    train(args.max_steps)
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
