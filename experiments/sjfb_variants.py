"""Stochastic Jacobian-Free Backprop vs JFB vs full unrolled backprop: quality, time and memory of training.

    python experiments/sjfb_variants.py      # ~40 minutes on 2 quiet cores (37 on 2026-12-07)

Three FPDMs with the demo recipe (MNIST 14 px, width 128, 1 pre + FP block + 1 post) and the same expected number
of fixed-point iterations per training step (5), differing only in how gradients flow:
  S-JFB:  n ~ U{1..5} iterations without a graph, then m ~ U{1..3} with one (the paper's method)
  JFB:    n ~ U{2..6} without a graph, then m = 1 with one
  unroll: n = 0, m = 5 (backprop through every iteration)
Reports seconds per step (median over train.py's 50-step metric windows), activation memory autograd saves for one step at the mean
iteration counts (exact, repeatable), and FID-MNIST / accuracy of EMA samples (20 DDIM steps, 6 iterations, reuse).
Writes experiments/results/sjfb_variants.{json,png}.
"""

import argparse
import os
import statistics

import torch

import common
from fpdm import config as configs
from fpdm import demo_recipe

VARIANTS = {"S-JFB": (1, 5, 1, 3), "JFB": (2, 6, 1, 1), "unroll": (0, 0, 5, 5)}


def config_for(ranges):
    """The demo recipe with S-JFB ranges (no-grad min, max, with-grad min, max)."""
    names = ("fixed_point_no_grad_min_iters", "fixed_point_no_grad_max_iters", "fixed_point_with_grad_min_iters",
             "fixed_point_with_grad_max_iters")
    return configs.preset("demo-mnist-fpdm", log_every=50, **dict(zip(names, ranges)))


def saved_activation_mb(ckpt, n, m, batch=64):
    """MB that autograd keeps for backward in one training forward with n no-grad and m with-grad iterations."""
    from fpdm.checkpoints import load_model_for_sampling
    from fpdm.measure import saved_tensor_bytes
    model, _ = load_model_for_sampling(ckpt)
    model.train()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(batch, 1, 14, 14, generator=g), torch.randint(0, 1000, (batch,), generator=g), \
        torch.randint(0, 10, (batch,), generator=g)
    return saved_tensor_bytes(lambda: model(x, t, y, num_iterations=(n, m)).square().mean().backward()) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=1200)
    p.add_argument("--num-per-class", type=int, default=50)
    p.add_argument("--results", default=os.path.join(common.RESULTS, "sjfb_variants_runs"))
    demo_recipe.add_spacing_argument(p)
    args = p.parse_args()
    from fpdm.checkpoints import load_model_for_sampling

    report = {"args": vars(args), "variants": {}}
    for name, ranges in VARIANTS.items():
        ckpt, rows = common.train(args.results, name, config_for(ranges), args.train_steps)
        model, train_config = load_model_for_sampling(ckpt)
        quality = demo_recipe.sample_quality(model, train_config, 20, args.num_per_class, 2.0, iterations_per_step=6,
                                             reuse=True, timestep_spacing=args.timestep_spacing)
        n_mean, m_mean = round((ranges[0] + ranges[1]) / 2), round((ranges[2] + ranges[3]) / 2)
        result = {"ranges": ranges, "losses": common.losses(rows),
                  # median over 50-step windows: robust to a window slowed by other work on the machine
                  "seconds_per_step": statistics.median(1 / float(r["steps_per_s"]) for r in rows[1:]),
                  "saved_activation_mb": saved_activation_mb(ckpt, n_mean, m_mean),
                  "fid_mnist": quality["fid_mnist"], "accuracy": quality["accuracy"]}
        report["variants"][name] = result
        print(f"{name:<7} n {ranges[0]}..{ranges[1]} m {ranges[2]}..{ranges[3]}: {result['seconds_per_step']:.3f} s/step"
              f"  saved {result['saved_activation_mb']:.0f} MB  final loss {result['losses'][-1][1]:.4f}  "
              f"FID-MNIST {result['fid_mnist']:.2f}  accuracy {result['accuracy']:.3f}", flush=True)

    path = common.write_json("sjfb_variants", report)
    with common.figure("sjfb_variants", "S-JFB vs JFB vs full unroll (MNIST 14 px)", "training step",
                       "training loss (mean over 50 steps)", legend_size=8) as ax:
        for name, r in report["variants"].items():
            steps, losses = zip(*r["losses"])
            ax.plot(steps, losses, label=f"{name}: FID-MNIST {r['fid_mnist']:.1f}, {r['seconds_per_step']:.2f} "
                                         f"s/step, {r['saved_activation_mb']:.0f} MB")
    print(f"wrote {path} and sjfb_variants.png")


if __name__ == "__main__":
    main()
