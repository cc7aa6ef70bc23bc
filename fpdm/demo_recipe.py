"""The demo's recipe, shared by demo.py and experiments/: train the small MNIST FPDM (`train`), measure a model's
samples (`sample_quality`: FID-MNIST and class accuracy) and the --timestep-spacing flag they all record."""

import os
import time

import torch


def add_spacing_argument(parser):
    """--timestep-spacing for the demo and experiments/ (recorded with their results)."""
    from diffusion import TIMESTEP_SPACINGS
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=TIMESTEP_SPACINGS[0],
                        help="DDIM timesteps (diffusers' names); trailing starts at T-1")


def train(max_steps, run_dir):
    """The measured CPU recipe (configs.PRESETS["demo-mnist-fpdm"]) for `max_steps` steps in `run_dir`: trained,
    resumed, or skipped when finished."""
    from fpdm import config as configs
    from fpdm.training import launch
    launch(configs.preset("demo-mnist-fpdm", max_steps=max_steps, results_dir=os.path.dirname(run_dir),
                          run_name=os.path.basename(run_dir), resume="auto"))


def sample_quality(model, train_config, steps, num_per_class=50, cfg_scale=2.0, iterations_per_step=None,
                   reuse=False, seed=0, timestep_spacing="trailing", sampler="ddim", fp_solver=None,
                   full_metrics=False):
    """Sample `num_per_class` digits of every class from fixed noise (`seed`) with `sampler` over `timestep_spacing`;
    returns a dict with FID-MNIST, class accuracy (with `full_metrics` also precision, recall and KID on the same
    features: metrics.mnist_metrics), the compute report, the labels and the samples. Shared by the demo and
    experiments/."""
    from fpdm.metrics import classifier_accuracy, fid_mnist, mnist_metrics
    from fpdm.sampling import diffusion_for_sampling, sample_images
    labels = torch.arange(model.num_classes).repeat_interleave(num_per_class)
    noise = torch.randn(len(labels), 1, *model.input_hw, generator=torch.Generator().manual_seed(seed))
    start = time.perf_counter()
    samples, stats = sample_images(model, diffusion_for_sampling(train_config, steps, timestep_spacing), noise, labels,
                                   cfg_scale=cfg_scale, iterations_per_step=iterations_per_step, reuse=reuse,
                                   sampler=sampler, fp_solver=fp_solver)
    seconds = time.perf_counter() - start
    result = {"compute": stats.compute(), "seconds": seconds, "samples": samples, "labels": labels}
    if full_metrics:
        metrics = mnist_metrics(samples, labels)
        return {**result, "fid_mnist": metrics["fid"], "accuracy": metrics["accuracy"],
                **{k: metrics[k] for k in ("precision", "recall", "kid", "kid_std")}}
    return {**result, "fid_mnist": fid_mnist(samples), "accuracy": classifier_accuracy(samples, labels)}
