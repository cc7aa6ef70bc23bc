"""Few-step samplers on FPDM's compute dial: does FPDM's low-compute advantage survive a strong ODE solver?

    python experiments/few_step.py      # ~50 minutes on 2 quiet cores (the experiments' FPDM and DiT; trained if
                                        # missing); the JSON is rewritten after every row

The experiments' FPDM (the demo recipe, 2,500 steps: 1 pre + FP block + 1 post) and the DiT of the same recipe and
depth 8 (experiments/fpdm_vs_dit.py) sample 500 digits (cfg 2, trailing timesteps) with DDIM, DPM-Solver++(2M) and
UniPC at 5, 10 and 20 steps, three noise seeds each. Compute is counted in transformer-block evaluations per image:
  - DiT: 8 per step;
  - FPDM "equal": 6 iterations per step with reuse, 8 per step like the DiT;
  - FPDM "light": 2 iterations per step with reuse (4 per step), at twice the steps, so that each budget is met
    with more, cheaper steps.
Writes experiments/results/few_step.{json,png}: FID-MNIST (mean and std over seeds) against block evaluations, one
panel per sampler.
"""

import argparse
import os

import common
from fpdm import config as configs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samplers", default="ddim,dpmpp-2m,unipc")
    p.add_argument("--steps", default="5,10,20", help="DiT / FPDM-equal steps (FPDM-light: twice as many)")
    p.add_argument("--train-steps", type=int, default=2500)
    p.add_argument("--dit-results", default=os.path.join(common.RESULTS, "fpdm_vs_dit_runs"))
    common.add_sampling_arguments(p, "few_step")
    args = p.parse_args()
    from fpdm.checkpoints import load_model_for_sampling

    dit_ckpt, _ = common.train(args.dit_results, "dit-mnist", configs.preset("demo-mnist-dit"), args.train_steps)
    dit, dit_config = load_model_for_sampling(dit_ckpt)
    fpdm_ckpt, fpdm, fpdm_config, seeds = common.load_for_sampling(args)
    settings = [("DiT", dit, dit_config, 1, None, False), ("FPDM equal", fpdm, fpdm_config, 1, 6, True),
                ("FPDM light", fpdm, fpdm_config, 2, 2, True)]
    rows = []
    ident = common.identity(fpdm_ckpt, dit_ckpt)
    done = common.finished_rows(args.name, vars(args), ("sampler", "model", "steps"), ident)  # a rerun continues
    for sampler in args.samplers.split(","):
        for steps in (int(s) for s in args.steps.split(",")):
            for name, model, config, step_factor, iterations, reuse in settings:
                row = done.get((sampler, name, steps * step_factor))
                if row is None:
                    row = common.quality_over_seeds(model, config, steps * step_factor, iterations, reuse, seeds,
                                                    args.num_per_class, args.cfg_scale, args.timestep_spacing, sampler)
                    row["model"] = name
                rows.append(row)
                common.write_json(args.name, {"args": vars(args), "identity": ident, "fpdm_checkpoint": fpdm_ckpt,
                                              "dit_checkpoint": dit_ckpt, "rows": rows})
                print(f"{sampler:<9} {name:<10} {row['steps']:>3} steps {row['block_evals']:>4} block evals: "
                      f"FID-MNIST {row['fid_mean']:7.2f} ± {row['fid_std']:5.2f}  accuracy "
                      f"{row['accuracy_mean']:.3f}  ({row['seconds']:.0f} s)", flush=True)
    samplers = args.samplers.split(",")
    path = common.write_json(args.name, {"args": vars(args), "identity": ident, "fpdm_checkpoint": fpdm_ckpt,
                                         "dit_checkpoint": dit_ckpt, "rows": rows})
    with common.figure(args.name, "FID-MNIST against compute, by sampler", "transformer-block evaluations per image",
                       None, ncols=len(samplers), size=(4.2 * len(samplers), 3.8), legend_size=8) as axes:
        axes = axes if isinstance(axes, list) else [axes]
        for ax, sampler in zip(axes, samplers):
            for name, *_ in settings:
                points = sorted((r["block_evals"], r["fid_mean"], r["fid_std"]) for r in rows
                                if r["sampler"] == sampler and r["model"] == name)
                ax.errorbar([b for b, _, _ in points], [f for _, f, _ in points], [s for _, _, s in points],
                            marker="o", capsize=3, label=name)
            ax.set_title(sampler)
            ax.set_ylabel("FID-MNIST (lower is better)")
    print(f"wrote {path} and its .png")


if __name__ == "__main__":
    main()
