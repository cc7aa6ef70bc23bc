"""Parallel DDIM: Anderson mixing per image, per state, or over the whole batch (iterations to tolerance).

    python experiments/mixing.py      # ~5 minutes on 2 cores (the experiments' FPDM and DiT; trained if missing)

The DDIM chain of 20 trailing steps (cfg 2) of 8 digits is solved as one fixed point with Anderson (m = 5,
λ = 1e-3) to DEQ-DDIM's relative tolerance 1e-3, at most 40 iterations, with the three mixings of
diffusion.solvers: "global" (one set of coefficients and one residual for the batch, DEQ-DDIM's stopping rule),
"image" (per image) and "state" (per state of each image). Reports, per model and mixing, the parallel iterations,
the network evaluations per image (mean and range over images; sequential DDIM needs 20), whether every image
converged, and the largest difference from sequential DDIM. Writes experiments/results/mixing.json.
"""

import argparse
import os

import torch

import common
from fpdm import config as configs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iter", type=int, default=40)
    p.add_argument("--dit-results", default=os.path.join(common.RESULTS, "fpdm_vs_dit_runs"))
    common.add_sampling_arguments(p, "mixing")
    args = p.parse_args()
    from fpdm.sampling import diffusion_for_sampling, sample_images

    dit_ckpt, _ = common.train(args.dit_results, "dit-mnist", configs.preset("demo-mnist-dit"), 2500)
    fpdm_ckpt = args.checkpoint or common.demo_checkpoint()
    from fpdm.checkpoints import load_model_for_sampling
    rows = []
    for name, ckpt in (("DiT", dit_ckpt), ("FPDM", fpdm_ckpt)):
        model, config = load_model_for_sampling(ckpt)
        diffusion = diffusion_for_sampling(config, args.steps, args.timestep_spacing)
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(args.batch, 1, *model.input_hw, generator=g)
        labels = torch.arange(args.batch) % model.num_classes
        iterations = 6 if model.fixed_point else None
        reference, _ = sample_images(model, diffusion, noise, labels, cfg_scale=args.cfg_scale, clip_denoised=False,
                                     iterations_per_step=iterations)
        for mixing in ("global", "image", "state"):
            out, fn = sample_images(model, diffusion, noise, labels, sampler="ddim-parallel", cfg_scale=args.cfg_scale,
                                    iterations_per_step=iterations, solver_tol=args.tol,
                                    solver_max_iter=args.max_iter, mixing=mixing)
            info = fn.info
            per_image = info.get("network_evaluations_per_image", [info["network_evaluations"]] * args.batch)
            row = {"model": name, "mixing": mixing, "parallel_iterations": info["parallel_iterations"],
                   "evaluations_mean": sum(per_image) / len(per_image), "evaluations_min": min(per_image),
                   "evaluations_max": max(per_image), "converged": info["converged"],
                   "max_abs_difference": float((out - reference).abs().max()), "wall_time_s": info["wall_time_s"]}
            rows.append(row)
            print(f"{name:<5} {mixing:<7} {row['parallel_iterations']:>3} iterations, evaluations per image "
                  f"{row['evaluations_mean']:6.1f} ({row['evaluations_min']}..{row['evaluations_max']}), converged "
                  f"{row['converged']}, max |x - sequential| {row['max_abs_difference']:.2e}", flush=True)
    path = common.write_json(args.name, {"args": vars(args), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
