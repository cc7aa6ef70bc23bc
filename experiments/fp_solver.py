"""Solving FPDM's layer at sampling: plain iteration or Anderson mixing, with and without solution reuse.

    python experiments/fp_solver.py      # ~25 minutes on 2 quiet cores (the experiments' FPDM; trained if missing)

The experiments' FPDM (the demo recipe, 2,500 steps, S-JFB-trained) samples 500 digits (cfg 2, 20 trailing DDIM
steps) at budgets of 160, 128 and 96 transformer-block evaluations per image spread flat over the steps (6, 4.4 and
2.8 iterations per step: Anderson changes nothing before the third iteration of a step), its layer
solved by plain iteration (z <- f(z)) or by Anderson mixing per image (history 5, `--fp-solver anderson`), each with
and without reuse, three noise seeds. Both spend exactly the budget (one evaluation of f per iteration). Reports
FID-MNIST mean ± std and the paired difference Anderson − iteration. Writes experiments/results/fp_solver.{json,png}.
"""

import argparse

import common


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="160,128,96", help="block evaluations per image")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--history", type=int, default=5)
    common.add_sampling_arguments(p, "fp_solver")
    args = p.parse_args()
    from fpdm.sampling import FixedPointSolver, iterations_from_block_budget

    ckpt, model, train_config, seeds = common.load_for_sampling(args)
    solvers = {"iterate": None, "anderson": FixedPointSolver("anderson", history=args.history)}
    ident = common.identity(ckpt)
    done = common.finished_rows(args.name, vars(args), ("block_evals", "reuse", "solver"), ident)  # a rerun continues
    rows, paired = [], []
    for budget in (int(b) for b in args.budgets.split(",")):
        iterations = iterations_from_block_budget(model, budget, args.steps, "flat")
        for reuse in (False, True):
            pair = {}
            for name, solver in solvers.items():
                row = done.get((budget, reuse, name))
                if row is None:
                    row = common.quality_over_seeds(model, train_config, args.steps, iterations, reuse, seeds,
                                                    args.num_per_class, args.cfg_scale, args.timestep_spacing,
                                                    fp_solver=solver)
                    row.update(solver=name)
                rows.append(row)
                pair[name] = row
                print(f"budget {row['block_evals']:>4} reuse {'on ' if reuse else 'off'} {name:<8}: FID-MNIST "
                      f"{row['fid_mean']:7.2f} ± {row['fid_std']:5.2f}  accuracy {row['accuracy_mean']:.3f}  "
                      f"({row['seconds']:.0f} s)", flush=True)
            diff = common.paired_difference(pair["iterate"], pair["anderson"])
            paired.append({"block_evals": budget, "reuse": reuse, **diff})
            print(f"budget {budget:>4} reuse {'on ' if reuse else 'off'}: Anderson − iteration {diff['mean']:+.2f} ± "
                  f"{diff['std']:.2f} (paired over seeds)", flush=True)
            common.write_json(args.name, {"args": vars(args), "identity": ident, "checkpoint": ckpt, "rows": rows,
                                          "paired": paired})
    with common.figure(args.name, "FPDM's layer at sampling: iteration vs Anderson",
                       "transformer-block evaluations per image", "FID-MNIST (lower is better)") as ax:
        for name in solvers:
            for reuse in (False, True):
                points = sorted((r["block_evals"], r["fid_mean"], r["fid_std"]) for r in rows
                                if r["solver"] == name and r["reuse"] == reuse)
                ax.errorbar([b for b, _, _ in points], [f for _, f, _ in points], [s for _, _, s in points],
                            marker="o", capsize=3, label=f"{name}{', reuse' if reuse else ''}")
    print(f"wrote experiments/results/{args.name}.json and .png")


if __name__ == "__main__":
    main()
