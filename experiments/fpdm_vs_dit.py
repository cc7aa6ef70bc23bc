"""The paper's central claim on a CPU-sized problem: at equal sampling compute, does FPDM beat DiT when compute is
limited, and where do the curves cross?

    python experiments/fpdm_vs_dit.py      # ~15 minutes on 2 cores (trains a DiT; reuses the demo's FPDM)

Both models: MNIST 14 px, width 128, 4 heads, patch 2, the demo recipe (v-prediction, cosine, lr 1e-3, 2,500 steps,
batch 64). DiT: depth 8 (2.46 M parameters, 2.3x FPDM's 1.09 M). FPDM: 1 pre + fixed-point block + 1 post, S-JFB 3 + 2
(`make demo` trains it; this script trains it too if missing). Compute is counted in transformer-block evaluations
per image (pre + iterations + post for FPDM, depth per step for DiT): at a budget B, DiT takes B / 8 DDIM steps; FPDM
takes its best of a few step counts, spreading the rest as fixed-point iterations with solution reuse.
Writes experiments/results/fpdm_vs_dit.{json,png}.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import demo  # noqa: E402  (the FPDM recipe)


def dit_flags():
    """The demo recipe without --fixed-point and its four S-JFB range flags (with their values)."""
    flags = list(demo.TRAIN_FLAGS)
    i = flags.index("--fixed-point")
    flags = flags[:i] + flags[i + 9:]
    assert not any(f.startswith("--fixed-point") for f in flags)
    return flags


def evaluate_setting(model, train_config, steps, iterations, reuse, num_per_class, cfg_scale):
    result = demo.sample_quality(model, train_config, steps, num_per_class, cfg_scale, iterations, reuse)
    return {"steps": steps, "block_evals": result["compute"]["block_evals"], "fid_mnist": result["fid_mnist"],
            "accuracy": result["accuracy"], "flops_per_image": result["compute"]["flops_per_image"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-steps", type=int, default=2500)
    p.add_argument("--budgets", default="160,96,64,40,24", help="block evaluations per image")
    p.add_argument("--num-per-class", type=int, default=50)
    p.add_argument("--cfg-scale", type=float, default=2.0)
    p.add_argument("--results", default=os.path.join(common.RESULTS, "fpdm_vs_dit_runs"))
    args = p.parse_args()
    from sampling import iterations_from_block_budget, load_model_for_sampling

    fpdm_ckpt = common.demo_checkpoint(args.train_steps)
    dit_ckpt, _ = common.train(args.results, "dit-mnist", dit_flags(), args.train_steps)
    fpdm, fpdm_cfg = load_model_for_sampling(fpdm_ckpt)
    dit, dit_cfg = load_model_for_sampling(dit_ckpt)
    rows = []
    for budget in (int(b) for b in args.budgets.split(",")):
        dit_steps = budget // dit.block_evaluations()
        row = {"budget": budget}
        if dit_steps >= 1:
            row["dit"] = evaluate_setting(dit, dit_cfg, dit_steps, None, False, args.num_per_class, args.cfg_scale)
        candidates = []
        for steps in (20, 12, 8, 5, 3):
            if budget >= steps * 3:  # at least one iteration per step besides pre and post
                iterations = iterations_from_block_budget(fpdm, budget, steps, "flat")
                candidates.append(evaluate_setting(fpdm, fpdm_cfg, steps, iterations, True, args.num_per_class,
                                                   args.cfg_scale))
        row["fpdm_all"] = candidates
        row["fpdm"] = min(candidates, key=lambda r: r["fid_mnist"])
        rows.append(row)
        dit_text = (f"DiT {row['dit']['steps']:>2} steps FID {row['dit']['fid_mnist']:7.2f}" if "dit" in row
                    else "DiT  (below one step)")
        print(f"budget {budget:>4}: {dit_text} | FPDM best {row['fpdm']['steps']:>2} steps FID "
              f"{row['fpdm']['fid_mnist']:7.2f} (acc {row['fpdm']['accuracy']:.3f})", flush=True)

    report = {"args": vars(args), "fpdm_params": fpdm.num_parameters(), "dit_params": dit.num_parameters(),
              "rows": rows}
    path = common.write_json("fpdm_vs_dit", report)
    with common.figure("fpdm_vs_dit", "Equal sampling compute: FPDM vs DiT (MNIST 14 px)",
                       "transformer-block evaluations per image", "FID-MNIST (lower is better)") as ax:
        for key, label in (("dit", f"DiT depth 8 ({dit.num_parameters() / 1e6:.2f} M)"),
                           ("fpdm", f"FPDM 1+FP+1 ({fpdm.num_parameters() / 1e6:.2f} M), reuse")):
            pts = [(r["budget"], r[key]["fid_mnist"]) for r in rows if key in r]
            ax.plot(*zip(*pts), "o-", label=label)
        ax.set_yscale("log")
    print(f"wrote {path} and fpdm_vs_dit.png")


if __name__ == "__main__":
    main()
