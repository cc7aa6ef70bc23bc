"""Sampling shared by train.py (preview grids), sample.py and sample_ddp.py.

`sample_images` runs DDPM or DDIM over one model callable, `GuidedModel`, which adds classifier-free guidance and,
for FPDM, the iteration count of each step (`iteration_schedule`: a budget spread over the steps), an optional
residual tolerance (adaptive iterations), solution reuse, and compute accounting.
"""

import hashlib
import inspect
import json
import os
import shutil

import numpy as np
import torch

from diffusion import DIFFUSION_DEFAULTS, TIMESTEP_SPACINGS, create_diffusion, timestep_spacing
from models import SolutionCache
from runs import atomic_write


def diffusion_for_sampling(config, num_sampling_steps, spacing=TIMESTEP_SPACINGS[0]):
    """A diffusion over the `num_sampling_steps` timesteps of `spacing` (diffusers' names: "trailing", the default,
    starts at t = T - 1; see diffusion.timestep_spacing), with the schedule and parameterisation the model was
    trained with. DDPM, DDIM, parallel DDIM and inversion all take their timesteps from here."""
    kwargs = diffusion_kwargs(config)
    timestep_spacing(num_sampling_steps, kwargs["diffusion_steps"], spacing)  # one-line error for a bad N or name
    return create_diffusion(f"{spacing}{num_sampling_steps}", **kwargs)


# ------------------------------------------------------------------------------------------------------------------
# x̂_0 clipping
# ------------------------------------------------------------------------------------------------------------------

CLIP_CHOICES = ("auto", "on", "off")


def is_pixel_model(model):
    """Pixel-space models have 1 or 3 channels; 4 channels are SD-VAE latents (DiT, the FPDM release, ours)."""
    return model.in_channels in (1, 3)


def clip_denoised_for(model, choice="auto"):
    """Whether samplers clip x̂_0 to [-1, 1]. "auto": only pixel-space models, whose data lie in [-1, 1]. Latents
    (× 0.18215) have std ≈ 1, so clipping them distorts samples and FID; DiT and the release never clip latents."""
    if choice not in CLIP_CHOICES:
        raise ValueError(f"unknown clipping choice {choice!r}: use one of {', '.join(CLIP_CHOICES)}")
    return is_pixel_model(model) if choice == "auto" else choice == "on"


def diffusion_kwargs(config):
    """create_diffusion keywords from a training config (dict); missing keys take DiT's defaults."""
    return {**DIFFUSION_DEFAULTS, **{k: v for k, v in (config or {}).items() if k in DIFFUSION_DEFAULTS}}


def resolve_device(name):
    """A torch.device for --device ("auto": CUDA when visible), or a one-line error for a GPU this machine lacks."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use "
                         f"--device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) are visible")
    return device


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
        self.cache = SolutionCache() if reuse and model.fixed_point else None  # this batch's reused solution
        self.iterations_per_step = iterations_per_step
        self.guidance_channels = guidance_channels
        self.calls = 0
        self.iterations, self.residuals, self.block_evals, self.flops = [], [], [], []
        self.info = {}  # what the sampler reports about itself (sample_images fills it)

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
            kwargs["reuse"] = self.cache or False  # the sampler decides, whatever the model was built with
        if self.cfg_scale != 1.0:
            out = self.model.forward_with_cfg(x, t, y, self.cfg_scale, guidance_channels=self.guidance_channels,
                                              **kwargs)
        else:
            out = self.model(x, t, y, **kwargs)
        if self.model.fixed_point:
            k = self.model.last_stats.iterations
            self.iterations.append(k)
            self.residuals.append(self.model.last_stats.residual_values())  # every iteration's, per step
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


# ------------------------------------------------------------------------------------------------------------------
# Samplers: one signature, chosen by name
# ------------------------------------------------------------------------------------------------------------------

# name -> sampler(model, diffusion, x_T, *, model_kwargs, clip_denoised, progress, **options) -> (x_0, info dict).
# `model` is a model callable as diffusion/ expects (a GuidedModel: guidance, FPDM iterations and reuse, counting);
# the diffusion's timesteps are the ones the sampler visits (diffusion_for_sampling). Options are sampler-specific.
SAMPLERS = {}


def register_sampler(name):
    def add(fn):
        SAMPLERS[name] = fn
        return fn
    return add


@register_sampler("ddpm")
def sample_ddpm(model, diffusion, x, *, model_kwargs, clip_denoised=False, progress=False):
    """Ancestral sampling (Ho et al. 2020; learned variance as Nichol & Dhariwal 2021): x_{t-1} ~ p(x_{t-1} | x_t)
    with torch's global RNG."""
    return diffusion.p_sample_loop(model, x.shape, noise=x, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                                   progress=progress), {}


@register_sampler("ddim")
def sample_ddim(model, diffusion, x, *, model_kwargs, clip_denoised=False, progress=False, eta=0.0):
    """DDIM (Song et al. 2021): deterministic for eta = 0, DDPM-like noise for eta = 1."""
    return diffusion.ddim_sample_loop(model, x.shape, noise=x, clip_denoised=clip_denoised, model_kwargs=model_kwargs,
                                      progress=progress, eta=eta), {}


@register_sampler("ddim-parallel")
def sample_ddim_parallel(model, diffusion, x, *, model_kwargs, clip_denoised=False, progress=False, eta=0.0,
                         solver="anderson", solver_max_iter=15, solver_tol=1e-3, window=None, chunk_size=None):
    """The DDIM chain solved as one fixed point over all timesteps (DEQ-DDIM, Pokle et al. 2022; the sliding window
    of ParaDiGMS, Shih et al. 2023): `solver` anderson, picard or window (diffusion/parallel.py), at most
    `solver_max_iter` iterations to relative residual `solver_tol`. Needs a fixed FPDM iteration count and no x0
    clipping. info: parallel_iterations, network_evaluations, residual, ..."""
    from diffusion.parallel import parallel_ddim_sample
    if clip_denoised:
        raise ValueError("parallel DDIM solves the chain without x0 clipping: sample with clip_denoised=False")
    out, _, stats = parallel_ddim_sample(model, diffusion, x, solver=solver, model_kwargs=model_kwargs, eta=eta,
                                         max_iter=solver_max_iter, tol=solver_tol, window=window, chunk_size=chunk_size,
                                         progress=progress, return_result=True)
    return out, stats


def guided_batch(noise, labels, cfg_scale, null_class):
    """The batch a guided model call takes: with cfg_scale != 1, noise twice and the labels then the null class."""
    if cfg_scale == 1.0:
        return noise, labels
    return torch.cat([noise, noise]), torch.cat([labels, torch.full_like(labels, null_class)])


@torch.no_grad()
def sample_images(model, diffusion, noise, labels, *, sampler="ddim", cfg_scale=1.0, iterations_per_step=None,
                  reuse=False, tol=None, clip_denoised=None, progress=False, guidance_channels=None, **options):
    """Draw samples from `noise` (N, C, H, W) with class `labels` (N,) with SAMPLERS[sampler] (`options` are its
    own, e.g. eta); returns (samples, GuidedModel), whose `compute()` reports the compute and `info` the sampler's.

    With cfg_scale != 1 the batch is doubled internally (second half: the null class). clip_denoised=None follows
    `clip_denoised_for(model)`: pixel models clip x̂_0, latent models do not.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if clip_denoised is None:
        clip_denoised = clip_denoised_for(model)
    run = SAMPLERS[sampler]
    accepted = inspect.signature(run).parameters
    unknown = [k for k, v in options.items() if k not in accepted and v not in (None, 0.0)]  # eta=0 for DDPM: fine
    if unknown:
        raise ValueError(f"sampler {sampler!r} takes no {', '.join(unknown)} (its options: "
                         f"{', '.join(k for k in accepted if k not in ('model', 'diffusion', 'x'))})")
    options = {k: v for k, v in options.items() if k in accepted}
    was_training = model.training
    model.eval()
    fn = GuidedModel(model, cfg_scale, iterations_per_step, reuse, guidance_channels, tol)
    x, y = guided_batch(noise, labels, cfg_scale, model.num_classes)
    try:
        out, fn.info = run(fn, diffusion, x, model_kwargs={"y": y}, clip_denoised=clip_denoised, progress=progress,
                           **options)
    finally:
        model.train(was_training)
    return out[: len(noise)], fn


# ------------------------------------------------------------------------------------------------------------------
# Sample folders: the samples of exactly one configuration
# ------------------------------------------------------------------------------------------------------------------

def file_fingerprint(path):
    """SHA-256 (first 16 hex digits) of a file's content, or of a folder's files (names and contents): a
    checkpoint's identity is what it holds, not where it lies."""
    digest = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    if not files:
        raise FileNotFoundError(f"nothing to read at {path}")
    for name in files:
        digest.update(os.path.relpath(name, path).encode() if name != path else b"")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def settings_hash(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]


SETTINGS_FILE = "args.json"


def claim_output_folder(out, settings, overwrite=False):
    """Make `out` the folder of exactly these `settings`: a new folder gets `args.json` written first; a folder of
    the same settings is reused (resumed); one of other settings, or of unknown settings, is refused with one line
    naming what differs, unless `overwrite` (then its contents are deleted first). One process claims a folder (under
    accelerate: the main one, before the others start writing)."""
    path = os.path.join(out, SETTINGS_FILE)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        if not os.path.isfile(path):
            raise FileExistsError(f"{out} holds files but no {SETTINGS_FILE}: choose another --out, or pass "
                                  f"--overwrite to delete them")
        with open(path) as f:
            previous = json.load(f)
        differing = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if differing:
            details = ", ".join(f"{k} {previous.get(k)!r} -> {settings.get(k)!r}" for k in differing)
            raise FileExistsError(f"{out} holds samples of other settings ({details}): choose another --out, or pass "
                                  f"--overwrite to start over")
        return out
    if overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    atomic_write(path, lambda f: json.dump(settings, f, indent=2, sort_keys=True))
    return out
