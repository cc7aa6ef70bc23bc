"""Budget-aware adaptive allocation: at a fixed total of block evaluations, does deciding each DDIM step's
fixed-point iterations online from its residuals (allocation.BudgetAllocator, `sample.py --fp-allocation budget`)
beat the best fixed schedule (flat, more-noisy, more-clean)?

    python experiments/budget_allocation.py   # see the README for its runtime
    # (the experiments' FPDM: the demo recipe trained 2,500 steps; trained if missing)

The experiments' FPDM (MNIST 14 px, 500 samples, cfg 2), 20 DDIM steps with solution reuse, at 64, 96 and 128 block
evaluations per image: the three fixed schedules and the allocator, which spends exactly the same budget (checked
per row), in two forms: "adaptive" minimises the summed layer residual, "calibrated" weights each step's residual by
its measured effect on the samples (sampling.calibrate_step_weights on 20 digits of other noise, from the flat split;
its time is recorded apart). Three noise seeds; FID-MNIST mean ± std, and per budget each allocator minus the best
fixed schedule (lowest mean FID), paired by seed. Writes experiments/results/budget_allocation.{json,png}; an interrupted run continues.
"""

import argparse
import time

import common

SCHEDULES = ("flat", "more-noisy", "more-clean")
ADAPTIVE = "adaptive"  # the allocator on the summed residual
CALIBRATED = "calibrated"  # the allocator on the residual weighted per step by its measured effect on the samples
ALLOCATORS = (ADAPTIVE, CALIBRATED)


def paired_vs_best_fixed(rows):
    """Per budget: the fixed schedule of lowest mean FID, and the allocator's FID minus its, paired by seed."""
    out = []
    for budget in sorted({r["budget"] for r in rows}):
        fixed = [r for r in rows if r["budget"] == budget and r["method"] in SCHEDULES]
        if not fixed:
            continue
        best = min(fixed, key=lambda r: r["fid_mean"])
        for method in ALLOCATORS:
            adaptive = [r for r in rows if r["budget"] == budget and r["method"] == method]
            if adaptive:
                out.append({"budget": budget, "method": method, "best_fixed": best["method"],
                            **common.paired_difference(best, adaptive[0])})
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--budgets", default="64,96,128", help="comma-separated block evaluations per image")
    p.add_argument("--no-reuse", dest="reuse", action="store_false", help="start every step from scratch")
    p.add_argument("--calibration-per-class", type=int, default=2, help="calibration batch: digits per class")
    p.add_argument("--calibration-seed", type=int, default=1000, help="its noise (not one of the --seeds)")
    common.add_sampling_arguments(p, "budget_allocation")
    args = p.parse_args()
    import torch

    from fpdm.allocation import BudgetAllocator
    from fpdm.sampling import calibrate_step_weights, diffusion_for_sampling, iterations_from_block_budget

    ckpt, model, train_config, seeds = common.load_for_sampling(args)
    budgets = [int(b) for b in args.budgets.split(",")]
    ident = common.identity(ckpt)
    done = common.finished_rows(args.name, vars(args), ("budget", "method"), ident)
    rows, by_schedule = [], {}  # schedules that come out the same are sampled once

    def save():
        return common.write_json(args.name, {"args": vars(args), "identity": ident, "checkpoint": ckpt, "rows": rows,
                                             "paired": paired_vs_best_fixed(rows)})

    for budget in budgets:
        for method in (*SCHEDULES, *ALLOCATORS):
            if (budget, method) in done:
                rows.append(done[(budget, method)])
                continue
            fixed = iterations_from_block_budget(model, budget, args.steps, "flat" if method in ALLOCATORS else method)
            if method in ALLOCATORS:
                weights, seconds = None, 0.0
                if method == CALIBRATED:  # on a batch of its own noise, from the flat split of the same budget
                    labels = torch.arange(model.num_classes).repeat_interleave(args.calibration_per_class)
                    noise = torch.randn(len(labels), 1, *model.input_hw,
                                        generator=torch.Generator().manual_seed(args.calibration_seed))
                    start = time.perf_counter()
                    weights = calibrate_step_weights(
                        model, diffusion_for_sampling(train_config, args.steps, args.timestep_spacing), noise, labels,
                        fixed, reuse=args.reuse, cfg_scale=args.cfg_scale, progress=True)
                    seconds = time.perf_counter() - start
                iterations = BudgetAllocator(sum(fixed), args.steps, weights=weights)
                row = common.quality_over_seeds(model, train_config, args.steps, iterations, args.reuse, seeds,
                                                args.num_per_class, args.cfg_scale, args.timestep_spacing)
                row.update(calibration_seconds=seconds)
                if any(sum(spent) != sum(fixed) for spent in row["iterations_spent"]):
                    raise RuntimeError(f"the allocator spent {row['iterations_spent']} at a budget of {sum(fixed)}")
                shown = row["iterations_spent"][0]
            else:
                key = tuple(fixed)
                if key not in by_schedule:
                    by_schedule[key] = common.quality_over_seeds(model, train_config, args.steps, fixed, args.reuse,
                                                                 seeds, args.num_per_class, args.cfg_scale,
                                                                 args.timestep_spacing)
                row, shown = dict(by_schedule[key]), fixed
            if row["block_evals"] != budget:
                raise RuntimeError(f"{method} at {budget} spent {row['block_evals']} block evaluations")
            row.update(budget=budget, method=method)
            rows.append(row)
            save()
            print(f"{budget:>4} evals  {method:<11} iterations {' '.join(map(str, shown))}  FID-MNIST "
                  f"{row['fid_mean']:7.2f} ± {row['fid_std']:5.2f}  accuracy {row['accuracy_mean']:.3f}  "
                  f"({row['seconds']:.0f} s)", flush=True)

    paired = paired_vs_best_fixed(rows)
    for row in paired:
        print(f"{row['budget']:>4} evals  {row['method']} minus best fixed ({row['best_fixed']}): FID-MNIST "
              f"{row['mean']:+6.2f} ± {row['std']:.2f} (paired over seeds)")
    path = save()
    with common.figure(args.name, f"Budget allocation, {args.steps} DDIM steps (FPDM, MNIST 14 px)",
                       "block evaluations per image", f"FID-MNIST (mean ± std, {len(seeds)} seeds)") as ax:
        for k, method in enumerate((*SCHEDULES, *ALLOCATORS)):
            sel = [next(r for r in rows if r["budget"] == b and r["method"] == method) for b in budgets]
            ax.errorbar([b + (k - 2) * 0.6 for b in budgets], [r["fid_mean"] for r in sel],
                        yerr=[r["fid_std"] for r in sel], marker="o", capsize=3, label=method,
                        linewidth=2.2 if method in ALLOCATORS else 1.2)
        ax.set_xticks(budgets)
    print(f"wrote {path} and {args.name}.png")


if __name__ == "__main__":
    main()
