"""Does an FPDM initialised from a trained DiT (train.py --init-from) learn faster than one trained from scratch?

    python experiments/init_from_dit.py            # CPU, ~10 minutes: MNIST 14 px, width 128

1. trains a DiT (depth 8) for --dit-steps; 2. trains two FPDMs (1 pre + FP block + 1 post) for --fpdm-steps each,
one from scratch and one with --init-from the DiT (pre/post/final timestep conditioning on, so the initial FPDM with
one iteration is exactly the truncated DiT); 3. compares their training losses and FID-MNIST / accuracy of EMA
samples at equal steps. Writes experiments/results/init_from_dit.{json,png}.
"""

import argparse
import csv
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import demo  # noqa: E402  (sample_quality)

COMMON = ["--data-path", "mnist", "--image-size", "14", "--model", "DiT-S/2", "--hidden-size", "128", "--num-heads",
          "4", "--depth", "8", "--patch-size", "2", "--no-learn-sigma", "--predict-v", "--noise-schedule", "cosine",
          "--lr", "1e-3", "--warmup-steps", "100", "--global-batch-size", "64", "--ema-warmup", "--log-every", "50",
          "--tracker", "none", "--num-sample-images", "20", "--sample-steps", "20"]
FPDM = ["--fixed-point", "--fixed-point-pre-post-timestep-conditioning", "--fixed-point-no-grad-min-iters", "3",
        "--fixed-point-no-grad-max-iters", "3", "--fixed-point-with-grad-min-iters", "2",
        "--fixed-point-with-grad-max-iters", "2"]


def train(results, name, steps, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *COMMON, *extra, "--max-steps", str(steps),
           "--ckpt-every", str(steps), "--results-dir", results, "--run-name", name, "--resume", "auto"]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    run_dir = os.path.join(results, name)
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        losses = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)]
    return run_dir, os.path.join(run_dir, f"checkpoints/step_{steps:07d}.pt"), losses


def quality(ckpt, num_per_class, steps, cfg_scale):
    from sampling import load_model_for_sampling
    model, train_config = load_model_for_sampling(ckpt)
    result = demo.sample_quality(model, train_config, steps, num_per_class, cfg_scale, iterations_per_step=6)
    return {"fid_mnist": result["fid_mnist"], "accuracy": result["accuracy"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit-steps", type=int, default=800)
    p.add_argument("--fpdm-steps", type=int, default=500)
    p.add_argument("--num-per-class", type=int, default=20)
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--results", default=os.path.join(ROOT, "experiments", "results", "init_from_dit_runs"))
    args = p.parse_args()

    _, dit_ckpt, _ = train(args.results, "dit", args.dit_steps)
    runs = {"scratch": train(args.results, "fpdm-scratch", args.fpdm_steps, *FPDM),
            "init-from-DiT": train(args.results, "fpdm-init", args.fpdm_steps, *FPDM, "--init-from", dit_ckpt)}
    report = {"args": vars(args), "dit_quality": quality(dit_ckpt, args.num_per_class, args.sampling_steps, 2.0)}
    for name, (_, ckpt, losses) in runs.items():
        report[name] = {"losses": losses, **quality(ckpt, args.num_per_class, args.sampling_steps, 2.0)}
        print(f"{name:<14} final loss {losses[-1][1]:.4f}  FID-MNIST {report[name]['fid_mnist']:.2f}  "
              f"accuracy {report[name]['accuracy']:.3f}")
    print(f"DiT teacher    FID-MNIST {report['dit_quality']['fid_mnist']:.2f}  "
          f"accuracy {report['dit_quality']['accuracy']:.3f}")

    out = os.path.join(ROOT, "experiments", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "init_from_dit.json"), "w") as f:
        json.dump(report, f, indent=2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in runs:
        steps, losses = zip(*report[name]["losses"])
        ax.plot(steps, losses, label=f"{name} (FID-MNIST {report[name]['fid_mnist']:.1f})")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (mean over 50 steps)")
    ax.set_title("FPDM on MNIST: from scratch vs initialised from a DiT")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "init_from_dit.png"), dpi=120)
    print(f"wrote {out}/init_from_dit.json and .png")


if __name__ == "__main__":
    main()
