"""What every experiment script shares: paths, the demo FPDM checkpoint, sampling over seeds, JSON and plots."""

import contextlib
import csv
import glob
import hashlib
import json
import os
import statistics
import sys

from fpdm import demo_recipe  # (the demo's FPDM recipe and sample_quality)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")


FPDM_RUN_DIR = os.path.join(RESULTS, "fpdm_runs", "fpdm-mnist")  # the demo recipe trained longer (2,500 steps)


def demo_checkpoint(train_steps=2500):
    """Path of the experiments' FPDM: the demo recipe trained for `train_steps` steps in a folder of its own (the demo
    itself trains 1,500); trained, resumed or skipped as needed."""
    demo_recipe.train(train_steps, FPDM_RUN_DIR)
    path = os.path.join(FPDM_RUN_DIR, "checkpoints", f"step_{train_steps:07d}.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the run in {FPDM_RUN_DIR} has no checkpoint at step {train_steps} "
                                f"(delete the folder to train it again)")
    return path


def train(results, name, cfg, steps):
    """Train (or resume, or skip when finished) configuration `cfg` (configs.TrainConfig) for `steps` steps into
    <results>/<name>, with a checkpoint at the end; returns (checkpoint path, metrics.csv rows as dicts)."""
    from fpdm.training import launch
    run_dir = launch(cfg.replace(max_steps=steps, ckpt_every=steps, results_dir=results, run_name=name,
                                 resume="auto"), quiet=True)
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    return os.path.join(run_dir, "checkpoints", f"step_{steps:07d}.pt"), rows


def losses(rows):
    """(step, loss) pairs from metrics.csv rows."""
    return [(int(r["step"]), float(r["loss"])) for r in rows]


def add_sampling_arguments(parser, name):
    """The flags of the sampling experiments: seeds, sample count, guidance, checkpoint, results name."""
    parser.add_argument("--seeds", default="0,1,2", help="noise seeds; every setting sees the same noise per seed")
    parser.add_argument("--num-per-class", type=int, default=50)
    parser.add_argument("--cfg-scale", type=float, default=2.0)
    parser.add_argument("--checkpoint", default=None, help="an FPDM checkpoint (default: the demo's, trained if "
                        "missing)")
    parser.add_argument("--name", default=name, help="results name: experiments/results/<name>.{json,png}")
    demo_recipe.add_spacing_argument(parser)


def load_for_sampling(args):
    """(checkpoint path, EMA model, training config, seeds) from the flags of add_sampling_arguments."""
    from fpdm.checkpoints import load_model_for_sampling
    ckpt = args.checkpoint or demo_checkpoint(getattr(args, "train_steps", 2500))
    model, train_config = load_model_for_sampling(ckpt)
    return ckpt, model, train_config, [int(s) for s in args.seeds.split(",")]


def quality_over_seeds(model, train_config, steps, iterations, reuse, seeds, num_per_class=50, cfg_scale=2.0,
                       timestep_spacing="trailing", sampler="ddim", fp_solver=None):
    """FID-MNIST and accuracy of one sampling setting for each noise seed, with their mean and standard deviation,
    the block evaluations per image and the mean relative residual left at the end of each step."""
    runs = [demo_recipe.sample_quality(model, train_config, steps, num_per_class, cfg_scale, iterations, reuse,
                                       seed=seed, timestep_spacing=timestep_spacing, sampler=sampler,
                                       fp_solver=fp_solver)
            for seed in seeds]
    fids, accs = [r["fid_mnist"] for r in runs], [r["accuracy"] for r in runs]
    residuals = [v for r in runs for v in r["compute"]["final_residual_per_step"] if v is not None]
    return {"steps": steps, "sampler": sampler, "model_calls": runs[0]["compute"]["model_calls"],
            "timestep_spacing": timestep_spacing, "reuse": reuse,
            "iterations": iterations if iterations is None or isinstance(iterations, int) else
            iterations.to_dict() if hasattr(iterations, "to_dict") else list(iterations),
            # a BudgetAllocator (fpdm/allocation.py) decides per run: what each seed spent, step by step
            **({"iterations_spent": [r["compute"]["iterations_per_step"] for r in runs]}
               if hasattr(iterations, "to_dict") else {}),
            "block_evals": runs[0]["compute"]["block_evals"], "fid_mnist": fids, "accuracy": accs,
            "fid_mean": statistics.mean(fids), "fid_std": statistics.stdev(fids) if len(fids) > 1 else 0.0,
            "accuracy_mean": statistics.mean(accs), "flops_per_image": runs[0]["compute"]["flops_per_image"],
            "final_residual_mean": statistics.mean(residuals) if residuals else None,
            "seconds": sum(r["seconds"] for r in runs)}


def paired_difference(baseline, other):
    """FID-MNIST of `other` minus `baseline`, seed by seed, with mean and std: both settings saw the same noise per
    seed, so the paired difference is far less noisy than either FID."""
    diffs = [b - a for a, b in zip(baseline["fid_mnist"], other["fid_mnist"])]
    return {"fid_differences": diffs, "mean": statistics.mean(diffs),
            "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}


def identity(*checkpoints):
    """What an experiment's rows depend on besides its flags: the code (sha256 of models.py, diffusion/, fpdm/,
    experiments/common.py and the running script) and the checkpoints' contents. A report records it; rows of a
    report with another identity are not reused (a retrained model or a changed sampler is a new experiment)."""
    from fpdm.sampling import file_fingerprint
    script = getattr(sys.modules["__main__"], "__file__", None)  # none in an interactive session
    files = [os.path.join(ROOT, "models.py"), *sorted(glob.glob(os.path.join(ROOT, "diffusion", "*.py"))),
             *sorted(glob.glob(os.path.join(ROOT, "fpdm", "*.py"))), os.path.abspath(__file__),
             *([os.path.abspath(script)] if script else [])]
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            digest.update(os.path.relpath(path, ROOT).encode() + b"\0" + f.read())
    return {"code": digest.hexdigest()[:16], "checkpoints": [file_fingerprint(c) for c in checkpoints]}


def finished_rows(name, args, key, ident):
    """Rows of experiments/results/<name>.json written with the same `args` and `identity` (a rerun of an
    interrupted script continues; one after a change of code or checkpoint starts over), keyed by the tuple of the
    row fields `key`; {} when there is no such file."""
    path = os.path.join(RESULTS, f"{name}.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        report = json.load(f)
    if report.get("args") != json.loads(json.dumps(args)):
        return {}
    if report.get("identity") != ident:
        print(f"{path}: made by other code or checkpoints than these; every row is measured again", flush=True)
        return {}
    return {tuple(row[k] for k in key): row for row in report.get("rows", [])}


def write_json(name, report):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return path


@contextlib.contextmanager
def figure(name, title, xlabel, ylabel, ncols=1, size=(6, 4), legend_size=None):
    """Yields the axes (one, or a list of `ncols`); on exit adds grid, labels and legends (where the caller placed
    none), and writes
    experiments/results/<name>.png."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=size, squeeze=False)
    axes = list(axes[0])
    yield axes[0] if ncols == 1 else axes
    for ax in axes:
        if xlabel:
            ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend() is None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=legend_size)
    if ncols == 1:
        axes[0].set_title(title)
    else:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(RESULTS, exist_ok=True)
    fig.savefig(os.path.join(RESULTS, f"{name}.png"), dpi=120)
    plt.close(fig)
