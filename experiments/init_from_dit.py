"""Does an FPDM initialised from a trained DiT (train.py --init-from) learn faster than one trained from scratch?

    python experiments/init_from_dit.py            # CPU, ~10 minutes: MNIST 14 px, width 128

1. trains a DiT (depth 8) for --dit-steps; 2. trains two FPDMs (1 pre + FP block + 1 post) for --fpdm-steps each,
one from scratch and one with --init-from the DiT (pre/post/final timestep conditioning on, so the initial FPDM with
one iteration is exactly the truncated DiT); 3. compares their training losses and FID-MNIST / accuracy of EMA
samples at equal steps. Writes experiments/results/init_from_dit.{json,png}.
"""

import argparse
import os

import common
from fpdm import config as configs
from fpdm import demo_recipe

# The demo's DiT recipe with more frequent logging and small preview grids; the FPDM adds t-conditioned pre/post
# blocks (as the DiT blocks it starts from were) and S-JFB 3 no-grad + 2 with-grad iterations.
DIT = configs.preset("demo-mnist-dit", log_every=50, num_sample_images=20, sample_steps=20)
FPDM = DIT.replace(fixed_point=True, fixed_point_pre_post_timestep_conditioning=True,
                   fixed_point_no_grad_min_iters=3, fixed_point_no_grad_max_iters=3,
                   fixed_point_with_grad_min_iters=2, fixed_point_with_grad_max_iters=2)


def quality(ckpt, num_per_class, steps, cfg_scale, timestep_spacing):
    from fpdm.checkpoints import load_model_for_sampling
    model, train_config = load_model_for_sampling(ckpt)
    result = demo_recipe.sample_quality(model, train_config, steps, num_per_class, cfg_scale, iterations_per_step=6,
                                        timestep_spacing=timestep_spacing)
    return {"fid_mnist": result["fid_mnist"], "accuracy": result["accuracy"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit-steps", type=int, default=800)
    p.add_argument("--fpdm-steps", type=int, default=500)
    p.add_argument("--num-per-class", type=int, default=20)
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--results", default=os.path.join(common.RESULTS, "init_from_dit_runs"))
    demo_recipe.add_spacing_argument(p)
    args = p.parse_args()

    dit_ckpt, _ = common.train(args.results, "dit", DIT, args.dit_steps)
    runs = {"scratch": common.train(args.results, "fpdm-scratch", FPDM, args.fpdm_steps),
            "init-from-DiT": common.train(args.results, "fpdm-init", FPDM.replace(init_from=dit_ckpt),
                                          args.fpdm_steps)}
    sampling = (args.num_per_class, args.sampling_steps, 2.0, args.timestep_spacing)
    report = {"args": vars(args), "dit_quality": quality(dit_ckpt, *sampling)}
    for name, (ckpt, rows) in runs.items():
        losses = common.losses(rows)
        report[name] = {"losses": losses, **quality(ckpt, *sampling)}
        print(f"{name:<14} final loss {losses[-1][1]:.4f}  FID-MNIST {report[name]['fid_mnist']:.2f}  "
              f"accuracy {report[name]['accuracy']:.3f}")
    print(f"DiT teacher    FID-MNIST {report['dit_quality']['fid_mnist']:.2f}  "
          f"accuracy {report['dit_quality']['accuracy']:.3f}")

    path = common.write_json("init_from_dit", report)
    with common.figure("init_from_dit", "FPDM on MNIST: from scratch vs initialised from a DiT", "training step",
                       "training loss (mean over 50 steps)") as ax:
        for name in runs:
            steps, losses = zip(*report[name]["losses"])
            ax.plot(steps, losses, label=f"{name} (FID-MNIST {report[name]['fid_mnist']:.1f})")
    print(f"wrote {path} and init_from_dit.png")


if __name__ == "__main__":
    main()
