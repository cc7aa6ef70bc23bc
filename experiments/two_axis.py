"""One fixed point over time and depth: FID-MNIST against the critical path and against total block evaluations.

    python experiments/two_axis.py       # ~40 minutes on 2 busy cores (the experiments' FPDM; trained if missing)

The experiments' FPDM samples 200 digits (20 per class, cfg 2, 10 trailing DDIM steps, three noise seeds) with
  sequential   FPDM + solution reuse, 1, 2, 3 or 5 iterations per step: 10 dependent calls;
  deq-ddim     DEQ-DDIM over FPDM (Anderson per image) with a fixed inner count of 3 iterations from the injection
               at every state, 3, 5 or 8 outer iterations;
  two-axis k   fpdm/two_axis.py with k = 1 or 2 layer iterations per state per outer iteration, warm-started
               from that state's previous solution, Anderson outer update, 3, 5 or 8 outer iterations.
Parallel runs use tolerance 0, so each runs exactly its outer iterations (and returns each image's best iterate);
no run clips x̂_0 (the parallel solvers cannot), the sequential one included.
Compute per image: block evaluations (pre + iterations + post per state evaluated) and the critical path: dependent
batched network calls, and the block evaluations along them — a hardware-independent stand-in for wall-clock on a
GPU that evaluates all states of an outer iteration at the cost of one. Writes experiments/results/<name>.{json,png}.
"""

import argparse
import statistics
import time

import torch

import common


def configurations(args):
    for k in (int(v) for v in args.sequential.split(",")):
        yield {"method": "sequential", "iterations": k, "outer": None}
    for outer in (int(v) for v in args.outer.split(",")):
        yield {"method": "deq-ddim", "iterations": args.deq_inner, "outer": outer}
        for k in (int(v) for v in args.inner.split(",")):
            yield {"method": f"two-axis k={k}", "iterations": k, "outer": outer}


def run(model, train_config, config, args, seed):
    from fpdm.metrics import classifier_accuracy, fid_mnist
    from fpdm.sampling import diffusion_for_sampling, sample_images
    labels = torch.arange(model.num_classes).repeat_interleave(args.num_per_class)
    noise = torch.randn(len(labels), 1, *model.input_hw, generator=torch.Generator().manual_seed(seed))
    diffusion = diffusion_for_sampling(train_config, args.steps, args.timestep_spacing)
    per_call = len(model.blocks_pre) + config["iterations"] + len(model.blocks_post)
    options = {}
    if config["method"] == "sequential":
        sampler, reuse = "ddim", True
    else:
        sampler, reuse = ("ddim-parallel" if config["method"] == "deq-ddim" else "ddim-two-axis"), False
        options = {"solver": "anderson", "solver_max_iter": config["outer"], "solver_tol": 0.0}
    start = time.perf_counter()
    samples, fn = sample_images(model, diffusion, noise, labels, sampler=sampler, cfg_scale=args.cfg_scale,
                                iterations_per_step=config["iterations"], reuse=reuse, clip_denoised=False, **options)
    seconds = time.perf_counter() - start
    if sampler == "ddim":
        blocks, path_calls, path_blocks = args.steps * per_call, args.steps, args.steps * per_call
    elif sampler == "ddim-parallel":
        blocks = fn.info["network_evaluations"] * per_call
        path_calls = fn.info["parallel_iterations"]
        path_blocks = path_calls * per_call
    else:
        blocks, path_calls = fn.info["block_evaluations"], fn.info["critical_path_calls"]
        path_blocks = fn.info["critical_path_blocks"]
    return {"fid": fid_mnist(samples), "accuracy": classifier_accuracy(samples, labels),
            "block_evals": blocks, "critical_path_calls": path_calls, "critical_path_blocks": path_blocks,
            "seconds": seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps")
    p.add_argument("--sequential", default="1,2,3,5", help="iterations per step of sequential FPDM + reuse")
    p.add_argument("--outer", default="3,5,8", help="outer iterations of the parallel solvers")
    p.add_argument("--inner", default="1,2", help="two-axis inner iterations k")
    p.add_argument("--deq-inner", type=int, default=3, help="DEQ-DDIM's fixed inner iteration count")
    common.add_sampling_arguments(p, "two_axis")
    p.set_defaults(num_per_class=20)
    args = p.parse_args()
    ckpt, model, train_config, seeds = common.load_for_sampling(args)
    key = ("method", "iterations", "outer")
    ident = common.identity(ckpt)
    done = common.finished_rows(args.name, vars(args), key, ident)
    rows = []
    for config in configurations(args):
        row = done.get(tuple(config[k] for k in key))
        if row is None:
            runs = [run(model, train_config, config, args, seed) for seed in seeds]
            fids = [r["fid"] for r in runs]
            row = {**config, "fid_mnist": fids, "fid_mean": statistics.mean(fids),
                   "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
                   "accuracy_mean": statistics.mean(r["accuracy"] for r in runs),
                   **{k: statistics.mean(r[k] for r in runs) for k in ("block_evals", "critical_path_calls",
                                                                       "critical_path_blocks")},
                   "seconds": sum(r["seconds"] for r in runs)}
        rows.append(row)
        common.write_json(args.name, {"args": vars(args), "identity": ident, "checkpoint": ckpt, "rows": rows})
        print(f"{row['method']:<12} iterations {row['iterations']} outer {row['outer'] or '-':>2}: FID-MNIST "
              f"{row['fid_mean']:7.2f} ± {row['fid_std']:5.2f}  block evals {row['block_evals']:6.0f}  critical path "
              f"{row['critical_path_calls']:4.1f} calls / {row['critical_path_blocks']:5.1f} blocks "
              f"({row['seconds']:.0f} s)", flush=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    with common.figure(args.name, "Sampling FPDM over time and depth (MNIST 14 px, 10 DDIM steps)", None,
                       "FID-MNIST (lower is better)", ncols=2, size=(11, 4.2)) as axes:
        for ax, x, label in ((axes[0], "critical_path_blocks", "critical path (dependent block evaluations)"),
                             (axes[1], "block_evals", "total block evaluations per image")):
            for method in methods:
                points = sorted((r[x], r["fid_mean"], r["fid_std"]) for r in rows if r["method"] == method)
                ax.errorbar([a for a, _, _ in points], [f for _, f, _ in points], [s for _, _, s in points],
                            marker="o", capsize=3, label=method)
            ax.set_xscale("log")
            ax.set_xlabel(label)
    print(f"wrote experiments/results/{args.name}.json and .png")


if __name__ == "__main__":
    main()
