"""Timestep smoothing: at a fixed budget, should the fixed-point iterations be spread evenly over the DDIM steps
(flat), or weighted toward the noisy steps (more-noisy) or the clean steps (more-clean)?

    python experiments/smoothing.py   # ~15 minutes on 2 cores
    # (the experiments' FPDM: the demo recipe trained 2,500 steps; trained if missing)

The release's rule (spec: 1 + (B - S)·r_i / Σr with r linear from 0.5 to 1.5) at three settings of the experiments'
FPDM (MNIST 14 px, 500 samples, cfg 2): 20 DDIM steps at 96 and at 64 block evaluations per image, and 10 steps at
80 (more iterations per step left to move), with solution reuse; and 20 steps at 96 without reuse. Three noise seeds
each; FID-MNIST mean ± std. Writes experiments/results/smoothing.{json,png}.
"""

import argparse

import common

SCHEDULES = ("flat", "more-noisy", "more-clean")


def paired_vs_flat(rows):
    """Per setting and non-flat schedule, FID-MNIST minus that of flat, paired by seed."""
    flat = {r["setting"]: r for r in rows if r["schedule"] == "flat"}
    return [{"setting": r["setting"], "schedule": r["schedule"], **common.paired_difference(flat[r["setting"]], r)}
            for r in rows if r["schedule"] != "flat"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default="20:96:reuse,20:64:reuse,10:80:reuse,20:96:no-reuse",
                   help="comma-separated steps:budget:reuse|no-reuse")
    common.add_sampling_arguments(p, "smoothing")
    args = p.parse_args()
    from fpdm.sampling import iterations_from_block_budget

    ckpt, model, train_config, seeds = common.load_for_sampling(args)
    rows = []
    for setting in args.settings.split(","):
        steps, budget, reuse = setting.split(":")
        steps, budget, reuse = int(steps), int(budget), reuse == "reuse"
        for schedule in SCHEDULES:
            iterations = iterations_from_block_budget(model, budget, steps, schedule)
            row = common.quality_over_seeds(model, train_config, steps, iterations, reuse, seeds,
                                            args.num_per_class, args.cfg_scale, args.timestep_spacing)
            row.update(setting=setting, schedule=schedule)
            rows.append(row)
            print(f"{setting:<16} {schedule:<11} iterations {iterations[0]:>2}..{iterations[-1]:<2} (noisy..clean)  "
                  f"FID-MNIST {row['fid_mean']:7.2f} ± {row['fid_std']:5.2f}  accuracy {row['accuracy_mean']:.3f}"
                  f"  ({row['seconds']:.0f} s)", flush=True)

    paired = paired_vs_flat(rows)
    for row in paired:
        print(f"{row['setting']:<16} {row['schedule']:<11} minus flat: FID-MNIST {row['mean']:+6.2f} ± {row['std']:.2f}"
              f" (paired over seeds)")
    path = common.write_json(args.name, {"args": vars(args), "checkpoint": ckpt, "rows": rows, "paired": paired})
    settings = args.settings.split(",")
    with common.figure(args.name, "Timestep smoothing at fixed budgets (FPDM, MNIST 14 px)", "setting",
                       f"FID-MNIST (mean ± std, {len(seeds)} seeds)", size=(8, 4)) as ax:
        width = 0.8 / len(SCHEDULES)
        for k, schedule in enumerate(SCHEDULES):
            sel = [next(r for r in rows if r["setting"] == s and r["schedule"] == schedule) for s in settings]
            ax.bar([i + (k - 1) * width for i in range(len(settings))], [r["fid_mean"] for r in sel], width,
                   yerr=[r["fid_std"] for r in sel], capsize=3, label=schedule)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels([s.replace(":", " steps, ", 1).replace(":", " evals, ") for s in settings], fontsize=8)
    print(f"wrote {path} and {args.name}.png")


if __name__ == "__main__":
    main()
