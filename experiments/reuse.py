"""Solution reuse on and off at fixed sampling budgets: does starting each timestep's fixed point from the previous
timestep's solution buy quality for free?

    python experiments/reuse.py   # ~15 minutes on 2 cores
    # (the experiments' FPDM: the demo recipe trained 2,500 steps; trained if missing)

The experiments' FPDM (MNIST 14 px, 1 pre + FP block + 1 post) samples 500 digits with 20 DDIM steps (cfg 2) at
budgets of 160 (= a DiT of depth 8), 128, 96, 80 and 64 transformer-block evaluations per image, spread evenly over
the steps (flat), with and without reuse, for three noise seeds. Reports FID-MNIST mean ± std over seeds, class
accuracy and the relative fixed-point residual left at the end of each step. Writes
experiments/results/reuse.{json,png}.
"""

import argparse

import common


def paired_differences(rows):
    """Per budget, FID-MNIST with reuse minus without, paired by seed (rows alternate off, on)."""
    return [{"block_evals": on["block_evals"], **common.paired_difference(off, on)}
            for off, on in zip(rows[0::2], rows[1::2])]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", default="160,128,96,80,64", help="block evaluations per image")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    common.add_sampling_arguments(p, "reuse")
    args = p.parse_args()
    from fpdm.sampling import iterations_from_block_budget

    ckpt, model, train_config, seeds = common.load_for_sampling(args)
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        iterations = iterations_from_block_budget(model, budget, args.steps, "flat")
        for reuse in (False, True):
            row = common.quality_over_seeds(model, train_config, args.steps, iterations, reuse, seeds,
                                            args.num_per_class, args.cfg_scale, args.timestep_spacing)
            rows.append(row)
            print(f"budget {row['block_evals']:>4} reuse {'on ' if reuse else 'off'}: FID-MNIST {row['fid_mean']:7.2f}"
                  f" ± {row['fid_std']:5.2f}  accuracy {row['accuracy_mean']:.3f}  final residual "
                  f"{row['final_residual_mean']:.4f}  ({row['seconds']:.0f} s)", flush=True)

    paired = paired_differences(rows)
    for row in paired:
        print(f"budget {row['block_evals']:>4}: FID-MNIST with reuse minus without {row['mean']:+7.2f} ± "
              f"{row['std']:.2f} (paired over seeds)")
    path = common.write_json(args.name, {"args": vars(args), "checkpoint": ckpt, "rows": rows, "paired": paired})
    with common.figure(args.name, "Solution reuse at fixed budgets (FPDM, MNIST 14 px, 20 steps)",
                       "transformer-block evaluations per image", "", ncols=2, size=(10, 4)) as (left, right):
        for reuse, label in ((False, "no reuse"), (True, "reuse")):
            sel = [r for r in rows if r["reuse"] == reuse]
            x = [r["block_evals"] for r in sel]
            left.errorbar(x, [r["fid_mean"] for r in sel], yerr=[r["fid_std"] for r in sel], fmt="o-", capsize=3,
                          label=label)
            right.plot(x, [r["final_residual_mean"] for r in sel], "o-", label=label)
        left.set_title(f"FID-MNIST (mean ± std, {len(seeds)} seeds)")
        right.set_title("relative residual at the end of a step")
        right.set_yscale("log")
    print(f"wrote {path} and {args.name}.png")


if __name__ == "__main__":
    main()
