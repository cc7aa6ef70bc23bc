"""Sampling shared by train.py (preview grids), sample.py and sample_ddp.py.

`sample_images` runs DDPM or DDIM over one model callable built by `guided_model`, which adds classifier-free
guidance and, for FPDM, a per-step iteration count and solution reuse.
"""

from contextlib import contextmanager

import torch

from diffusion import create_diffusion


def diffusion_for_sampling(config, num_sampling_steps, sampler="ddim"):
    """A respaced diffusion with the same schedule and parameterisation the model was trained with."""
    spacing = f"ddim{num_sampling_steps}" if sampler == "ddim" else str(num_sampling_steps)
    if sampler == "ddim" and 1000 % num_sampling_steps:
        spacing = str(num_sampling_steps)  # sectioned spacing when no integer stride gives that many steps
    return create_diffusion(spacing, **diffusion_kwargs(config))


def diffusion_kwargs(config):
    """create_diffusion keywords from a training config (dict)."""
    return dict(noise_schedule=config["noise_schedule"], learn_sigma=config["learn_sigma"],
                predict_v=config["predict_v"], rescale_betas_zero_snr=config["zero_terminal_snr"],
                diffusion_steps=config["diffusion_steps"])


class GuidedModel:
    """`model(x, t, y)` for the diffusion samplers: CFG over a doubled batch, and for FPDM the iteration count of the
    current step (`iterations_per_step[i]` at the i-th call, or one int for all) and solution reuse."""

    def __init__(self, model, cfg_scale=1.0, iterations_per_step=None, reuse=False, guidance_channels=None):
        self.model, self.cfg_scale, self.reuse = model, cfg_scale, reuse
        self.iterations_per_step = iterations_per_step
        self.guidance_channels = guidance_channels
        self.calls, self.block_evals, self.residuals = 0, 0, []

    def __call__(self, x, t, y):
        kwargs = {}
        if self.model.fixed_point:
            iters = self.iterations_per_step
            if isinstance(iters, (list, tuple)):
                iters = iters[self.calls]
            kwargs["num_iterations"] = iters
        if self.cfg_scale != 1.0:
            out = self.model.forward_with_cfg(x, t, y, self.cfg_scale, guidance_channels=self.guidance_channels,
                                              **kwargs)
        else:
            out = self.model(x, t, y, **kwargs)
        if self.model.fixed_point:
            self.block_evals += self.model.block_evaluations(self.model.last_num_iterations)
            self.residuals.append(self.model.last_residuals)
        else:
            self.block_evals += self.model.block_evaluations()
        self.calls += 1
        return out


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
                  iterations_per_step=None, reuse=False, clip_denoised=True, progress=False, guidance_channels=None):
    """Draw samples from `noise` (N, C, H, W) with class `labels` (N,); returns (samples, GuidedModel stats).

    With cfg_scale != 1 the batch is doubled internally (second half: the null class).
    """
    was_training = model.training
    model.eval()
    fn = GuidedModel(model, cfg_scale, iterations_per_step, reuse, guidance_channels)
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
