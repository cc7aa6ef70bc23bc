"""Sampling shared by train.py (preview grids), sample.py and sample_ddp.py.

`sample_images` runs DDPM or DDIM over one model callable, `GuidedModel`, which adds classifier-free guidance and,
for FPDM, the iteration count of each step (`iteration_schedule`: a budget spread over the steps), an optional
residual tolerance (adaptive iterations), solution reuse, and compute accounting.
"""

from contextlib import contextmanager

import numpy as np
import torch

from diffusion import create_diffusion


def diffusion_for_sampling(config, num_sampling_steps, sampler="ddim"):
    """A respaced diffusion with the same schedule and parameterisation the model was trained with."""
    spacing = f"ddim{num_sampling_steps}" if sampler == "ddim" else str(num_sampling_steps)
    if sampler == "ddim" and 1000 % num_sampling_steps:
        spacing = str(num_sampling_steps)  # sectioned spacing when no integer stride gives that many steps
    return create_diffusion(spacing, **diffusion_kwargs(config))


# What DiT and the FPDM release train with; used for checkpoints that carry no training config.
DIFFUSION_DEFAULTS = {"noise_schedule": "linear", "learn_sigma": True, "predict_v": False, "zero_terminal_snr": False,
                      "diffusion_steps": 1000}


def diffusion_kwargs(config):
    """create_diffusion keywords from a training config (dict); missing keys take DiT's defaults."""
    config = {**DIFFUSION_DEFAULTS, **{k: v for k, v in (config or {}).items() if k in DIFFUSION_DEFAULTS}}
    return dict(noise_schedule=config["noise_schedule"], learn_sigma=config["learn_sigma"],
                predict_v=config["predict_v"], rescale_betas_zero_snr=config["zero_terminal_snr"],
                diffusion_steps=config["diffusion_steps"])


def load_model_for_sampling(path, use_ema=True, device="cpu", trust_checkpoint=False, model_name=None):
    """(model in eval mode on `device`, training config dict or None) from any checkpoint `checkpoints.load_model`
    reads: ours, official DiT, the FPDM release, diffusers folders, safetensors exports. EMA weights by default."""
    from checkpoints import load_model
    model, info = load_model(path, model_name=model_name, use_ema=use_ema, trust_checkpoint=trust_checkpoint,
                             device=device)
    for note in info.get("notes", []):
        print(f"note: {note}")
    return model.eval(), info.get("training_config")


SCHEDULES = ("flat", "more-noisy", "more-clean")


def iteration_schedule(total_iterations, num_steps, schedule="flat"):
    """Split `total_iterations` fixed-point iterations over `num_steps` sampling steps, in sampling order (the first
    entry is the noisiest step). Every step gets at least one; the rest is shared in proportion to weights r_i that
    are flat, or linear from 1.5 at the noisiest step to 0.5 at the cleanest ("more-noisy"; the release's
    "increasing") or the reverse ("more-clean"), as 1 + (B − S)·r_i/Σr with largest-remainder rounding, so the sum
    is exactly the budget.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown iteration schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")
    if num_steps < 1:
        raise ValueError(f"need at least one sampling step, got {num_steps}")
    if total_iterations < num_steps:
        raise ValueError(f"an iteration budget of {total_iterations} is below one iteration per step for "
                         f"{num_steps} steps: raise the budget or use fewer steps")
    weights = {"flat": np.ones(num_steps), "more-noisy": np.linspace(1.5, 0.5, num_steps),
               "more-clean": np.linspace(0.5, 1.5, num_steps)}[schedule]
    extra = (total_iterations - num_steps) * weights / weights.sum()
    counts = np.floor(extra).astype(int)
    leftover = (total_iterations - num_steps) - counts.sum()
    counts[np.argsort(-(extra - counts), kind="stable")[:leftover]] += 1  # largest remainders first
    return [1 + int(c) for c in counts]


def iterations_from_block_budget(model, block_evals, num_steps, schedule="flat"):
    """Per-step iterations for a budget in transformer-block evaluations per image (pre + iterations + post per
    step), so that FPDM and DiT runs of equal budget can be compared (DiT-XL/2 uses 28 per step)."""
    if block_evals < 0:
        raise ValueError(f"block-evaluation budget must be positive, got {block_evals}")
    fixed = num_steps * (len(model.blocks_pre) + len(model.blocks_post))
    if block_evals - fixed < num_steps:
        raise ValueError(f"a budget of {block_evals} block evaluations over {num_steps} steps leaves less than one "
                         f"iteration per step after the {fixed} pre/post block evaluations: raise it to at least "
                         f"{fixed + num_steps}")
    return iteration_schedule(block_evals - fixed, num_steps, schedule)


class GuidedModel:
    """`model(x, t, y)` for the diffusion samplers: CFG over a doubled batch, and for FPDM the iteration count of the
    current step (`iterations_per_step[i]` at the i-th call, or one int for all) and solution reuse."""

    def __init__(self, model, cfg_scale=1.0, iterations_per_step=None, reuse=False, guidance_channels=None,
                 tol=None):
        self.model, self.cfg_scale, self.reuse, self.tol = model, cfg_scale, reuse, tol
        self.iterations_per_step = iterations_per_step
        self.guidance_channels = guidance_channels
        self.calls = 0
        self.iterations, self.residuals, self.block_evals, self.flops = [], [], [], []

    def __call__(self, x, t, y):
        kwargs = {}
        if self.model.fixed_point:
            iters = self.iterations_per_step
            if isinstance(iters, (list, tuple)):
                if self.calls >= len(iters):
                    raise ValueError(f"the iteration schedule has {len(iters)} entries but the sampler made more "
                                     f"model calls: give one entry per sampling step")
                iters = iters[self.calls]
            kwargs["num_iterations"] = iters
            if self.tol is not None:
                kwargs["tol"] = self.tol
        if self.cfg_scale != 1.0:
            out = self.model.forward_with_cfg(x, t, y, self.cfg_scale, guidance_channels=self.guidance_channels,
                                              **kwargs)
        else:
            out = self.model(x, t, y, **kwargs)
        if self.model.fixed_point:
            k = self.model.last_num_iterations
            self.iterations.append(k)
            self.residuals.append(self.model.last_residuals)  # every iteration's relative residual, per step
        else:
            k = None
        self.block_evals.append(self.model.block_evaluations(k))
        self.flops.append(self.model.forward_flops(k))
        self.calls += 1
        return out

    def compute(self):
        """Compute of everything called so far, per image. `block_evals` counts one pass through the network per
        step (the unit of --budget-block-evals); guidance runs `cfg_passes` = 2 passes, counted in the FLOPs."""
        passes = 2 if self.cfg_scale != 1.0 else 1
        return {"model_calls": self.calls, "cfg_passes": passes, "block_evals": sum(self.block_evals),
                "flops_per_image": float(sum(self.flops) * passes),
                "flops_in_dit_blocks": sum(self.flops) * passes / self.model.block_flops(),
                "iterations_per_step": self.iterations,
                "final_residual_per_step": [r[-1] if r else None for r in self.residuals]}


def save_grid(images, path, nrow=8):
    """Save images in [-1, 1] as one PNG grid; tiny images (MNIST at 14 px) are enlarged so the grid is readable."""
    from torchvision.utils import save_image
    images = images.float().clamp(-1, 1) * 0.5 + 0.5
    scale = max(1, -(-64 // images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)
    return path


@contextmanager
def solution_reuse(model, enabled):
    """Turn FPDM solution reuse on for one batch, and leave the model as it was (state cleared) afterwards."""
    previous = getattr(model, "fixed_point_reuse_solution", False)
    if model.fixed_point:
        model.fixed_point_reuse_solution = enabled
        model.reset()
    try:
        yield
    finally:
        if model.fixed_point:
            model.fixed_point_reuse_solution = previous
            model.reset()


@torch.no_grad()
def sample_images(model, diffusion, noise, labels, *, cfg_scale=1.0, sampler="ddim", eta=0.0,
                  iterations_per_step=None, reuse=False, tol=None, clip_denoised=True, progress=False,
                  guidance_channels=None):
    """Draw samples from `noise` (N, C, H, W) with class `labels` (N,); returns (samples, GuidedModel stats).

    With cfg_scale != 1 the batch is doubled internally (second half: the null class).
    """
    was_training = model.training
    model.eval()
    fn = GuidedModel(model, cfg_scale, iterations_per_step, reuse, guidance_channels, tol)
    x, y = noise, labels
    if cfg_scale != 1.0:
        x = torch.cat([noise, noise])
        y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    extra = {"eta": eta} if sampler == "ddim" else {}
    with solution_reuse(model, reuse):
        out = loop(fn, x.shape, noise=x, clip_denoised=clip_denoised, model_kwargs={"y": y}, progress=progress,
                   **extra)
    model.train(was_training)
    return out[: len(noise)], fn
