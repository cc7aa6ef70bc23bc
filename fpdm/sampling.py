"""Sampling shared by train.py (preview grids), sample.py and sample_ddp.py.

`sample_images` runs DDPM or DDIM over one model callable, `GuidedModel`, which adds classifier-free guidance and,
for FPDM, the iteration count of each step (`iteration_schedule`: a budget spread over the steps), an optional
residual tolerance (adaptive iterations), solution reuse, and compute accounting.
"""

import contextlib
import fnmatch
import hashlib
import inspect
import json
import os
import shutil
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from diffusion import DIFFUSION_DEFAULTS, TIMESTEP_SPACINGS, create_diffusion, timestep_spacing
from diffusion.solvers import solve_batched
from fpdm.allocation import TINY, BudgetAllocator
from fpdm.graphs import fixed_work_conflict
from fpdm.run_folders import LOCK_FILE, atomic_write, check_writable
from models import FixedPointStats, IterationPolicy, SolutionCache


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


@dataclass
class FixedPointSolver:
    """How an FPDM call at sampling solves its layer: "iterate" (z <- f(z), the default) or "anderson" (type-II
    Anderson mixing with `history` iterates, ridge `ridge` and damping `damping` (β); diffusion.solvers, the same
    implementation that solves parallel DDIM's chain), each image on its own (its own coefficients, residual and
    stopping). One evaluation of f is one iteration, so budgets and block-evaluation counts are unchanged; the
    result is the best evaluated f(z) of each image. Residuals: ‖f(z) − z‖ / (‖f(z)‖ + 1e-5) per image, their
    maximum over the batch per iteration in `FixedPointStats.residuals`."""
    method: str = "iterate"
    history: int = 5
    ridge: float = 1e-4
    damping: float = 1.0

    def __post_init__(self):
        if self.method not in ("iterate", "anderson"):
            raise ValueError(f"unknown fixed-point solver {self.method!r}: use iterate or anderson")
        if self.history < 1 or self.ridge < 0 or not 0 < self.damping <= 1:
            raise ValueError("Anderson needs history >= 1, ridge >= 0 and damping in (0, 1]")

    def run(self, f, z, injection, c, iterations, tol=None):
        """(z*, FixedPointStats) after at most `iterations` evaluations of f(z; injection, c), per image."""
        stats = FixedPointStats(sjfb=(0, iterations))
        if iterations < 1:
            return z, stats
        # Without a tolerance nothing stops early: the device is read once, after the last iteration.
        result = solve_batched(lambda x, idx: f(x[0], injection[idx], c[idx])[None], z[None], "anderson",
                               max_iter=iterations, tol=-1.0 if tol is None else tol, m=self.history,
                               lam=self.ridge, beta=self.damping, sync_every=iterations if tol is None else None)
        stats.iterations = max(result.image_evaluations)
        stats.image_iterations = result.image_evaluations
        stats.residuals = [torch.tensor(r) for r in result.residuals]
        return result.fx[0], stats


GUIDANCE_SCHEDULES = ("constant", "linear")
PRECISIONS = ("fp32", "bf16")


class GuidedModel:
    """`model(x, t, y)` for the samplers, the one guidance wrapper: classifier-free guidance over a doubled batch
    (second half: the null class), optionally only for t in `guidance_interval` = (low, high) (Kynkäänniemi et al.
    2024; outside it one branch runs, the conditional one) and with a scale that is `constant` or `linear` in t (from
    1 at t = T to cfg_scale at t = 0); for FPDM the iteration count of each call (`iterations_per_step[i]` at the
    i-th call, or one int for all, or an allocation.BudgetAllocator deciding each call's count online from the
    residuals: a fresh copy per GuidedModel, one host sync per iteration), the adaptive tolerance and solution reuse;
    and the compute of every call. `precision` "bf16" runs each network call under torch.autocast (bf16 matmuls,
    convolutions and attention; the residual stream and FPDM's fixed-point state stay float32, see
    FPDM.fixed_point_function) and hands its output back in the input's dtype, so that everything the samplers do
    between calls (DDIM updates, the Anderson solves of parallel DDIM) stays float32. `graphs` (a
    graphs.GraphedCalls) replays each network call from a CUDA graph: for fixed iteration counts (a list or an int)
    without a tolerance or Anderson, i.e. calls without host decisions inside (a guidance scale is a graph input).
    `residual_history`: FPDM's residual after every iteration of each call (`residuals`), not only the last
    (IterationPolicy.history; a tolerance or an allocator records them all anyway)."""

    def __init__(self, model, cfg_scale=1.0, iterations_per_step=None, reuse=False, guidance_channels=None,
                 tol=None, guidance_interval=None, guidance_schedule="constant", num_train_timesteps=1000,
                 fp_solver=None, precision="fp32", graphs=None, images_only=False, residual_history=False):
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}: use {' or '.join(PRECISIONS)}")
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"unknown guidance schedule {guidance_schedule!r}: use {' or '.join(GUIDANCE_SCHEDULES)}")
        if guidance_interval is not None and not 0 <= guidance_interval[0] <= guidance_interval[1]:
            raise ValueError(f"guidance interval {tuple(guidance_interval)} must be (low, high) with 0 <= low <= high")
        self.model, self.cfg_scale, self.reuse, self.tol = model, cfg_scale, reuse, tol
        self.cache = SolutionCache() if reuse and model.fixed_point else None  # this batch's reused solution
        if isinstance(iterations_per_step, BudgetAllocator):
            IterationPolicy(tol=tol, fp_solver=fp_solver, stop=bool)  # its conflicts, checked before sampling
            iterations_per_step = iterations_per_step.restarted()
        self.iterations_per_step = iterations_per_step
        self.guidance_channels = guidance_channels
        self.guidance_interval, self.guidance_schedule = guidance_interval, guidance_schedule
        self.num_train_timesteps = num_train_timesteps
        self.fp_solver = fp_solver  # FixedPointSolver for FPDM's layer (None: plain iteration)
        self.precision = precision
        conflict = graphs is not None and fixed_work_conflict(
            adaptive_tol=tol is not None, fp_allocation=isinstance(iterations_per_step, BudgetAllocator),
            fp_solver=fp_solver is not None)
        if conflict:
            raise ValueError(f"CUDA graphs replay calls whose work is fixed in advance: not with {conflict[1]}")
        self.graphs = graphs
        self.residual_history = residual_history
        self.calls = 0
        self.iterations, self.block_evals, self.flops, self.passes = [], [], [], []
        self._residuals = []  # per call, that call's residual tensors: on the device until read (no sync per call)
        self.info = {}  # what the sampler reports about itself (sample_images fills it)
        self._images_only = images_only

    @property
    def doubles_batch(self):
        """Whether a call takes a doubled batch: the images, then their twins with the null class (guidance)."""
        return self.cfg_scale != 1.0 and not self._images_only

    @contextlib.contextmanager
    def images_only(self):
        """Within (or throughout, built with images_only=True): calls take the images alone (N rows) and evaluate
        them with their null-class twins (2N rows, each twin on its image's state, as every guided call does),
        returning the images' rows. The parallel samplers solve the N images' chains this way: a twin's state feeds
        no output, and solved as a chain of its own it follows another trajectory wherever its output differs from
        its image's (the unguided channels of --guidance-channels 3), stops at another iteration, and per-image
        stopping then pairs the halves of a call wrongly. invert.py differentiates through such calls."""
        before, self._images_only = self._images_only, True
        try:
            yield self
        finally:
            self._images_only = before

    def guidance_scale(self, t):
        """The guidance scale at timestep t, or None where this call runs unguided (outside the interval)."""
        if self.guidance_interval is not None and not self.guidance_interval[0] <= t <= self.guidance_interval[1]:
            return None
        if self.guidance_schedule == "linear":
            return 1.0 + (self.cfg_scale - 1.0) * (1.0 - t / self.num_train_timesteps)
        return self.cfg_scale

    def __call__(self, x, t, y):
        if self._images_only and self.cfg_scale != 1.0:
            null = torch.full_like(y, self.model.num_classes)
            return self._call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))[:len(x)]
        return self._call(x, t, y)

    def _call(self, x, t, y):
        kwargs = {}
        if self.model.fixed_point:
            iters, stop = self.iterations_per_step, None
            if isinstance(iters, BudgetAllocator):
                iters, stop = iters.next_step()
            elif isinstance(iters, (list, tuple)):
                if self.calls >= len(iters):
                    raise ValueError(f"the iteration schedule has {len(iters)} entries but the sampler made more "
                                     f"model calls: give one entry per model call")
                iters = iters[self.calls]
            # reuse: the sampler decides, whatever the model was built with
            kwargs["policy"] = IterationPolicy(iters, self.tol, self.cache or False, self.fp_solver, stop,
                                               self.residual_history)
        guided = self.cfg_scale != 1.0  # then the batch is doubled
        if guided and len(x) % 2:
            raise ValueError(f"a guided call takes a doubled batch (the images, then the same images with the null "
                             f"class: sampling.guided_batch), got {len(x)} rows")
        if guided and self.guidance_interval is not None:  # which branches run: decided on the host
            if t.numel() > 1 and not bool((t == t[0]).all()):
                raise ValueError("a guidance interval needs one timestep per model call (a sequential sampler, not "
                                 "parallel DDIM)")
            scale = self.guidance_scale(float(t.flatten()[0]))
        elif guided and self.guidance_schedule != "constant":
            # each sample's scale from its own timestep, on the device (float64 as on the host, then the float32 the
            # guidance mix rounds a Python scale to): no read of t, any timesteps in one call
            scale = self.guidance_scale(t[:len(t) // 2].double()).float().view(-1, *(1,) * (x.dim() - 1))
        else:
            scale = self.cfg_scale
        # fp32 enters no context at all, so that a caller's own autocast (bench/) still applies.
        bf16 = self.precision == "bf16"
        # Graphed calls cast the weights inside the graph: autocast's cache would keep casts made outside it
        # (graphs.check_capturable).
        autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, cache_enabled=self.graphs is None)
        with autocast if bf16 else contextlib.nullcontext():
            if self.graphs is not None:
                out, passes = self._graphed(x, t, y, scale, guided, kwargs)
            else:
                out, passes = self._network(x, t, y, scale, guided, kwargs)
        out = out.to(x.dtype)  # bf16 out of autocast's last linear layer; a no-op in fp32
        if self.model.fixed_point:
            k = self.model.last_stats.iterations
            if isinstance(self.iterations_per_step, BudgetAllocator):
                self.iterations_per_step.finish_step(k)
            self.iterations.append(k)
            self._residuals.append(list(self.model.last_stats.residuals))
        else:
            k = None
        self.block_evals.append(self.model.block_evaluations(k))
        self.flops.append(self.model.forward_flops(k))
        self.passes.append(passes)
        self.calls += 1
        return out

    @property
    def residuals(self):
        """Every call's relative residual after its last iteration (with residual_history, a tolerance or an
        allocator: after each iteration), as floats (one device sync for all calls)."""
        flat = [r for call in self._residuals for r in call]
        values = torch.stack(flat).float().tolist() if flat else []
        out, start = [], 0
        for call in self._residuals:
            out.append(values[start:start + len(call)])
            start += len(call)
        return out

    def _network(self, x, t, y, scale, guided, kwargs):
        """One step's network call: (output, branches run)."""
        if guided and scale is None:
            return self._conditional_only(x, t, y, kwargs), 1
        if guided:
            return self.model.forward_with_cfg(x, t, y, scale, guidance_channels=self.guidance_channels, **kwargs), 2
        return self.model(x, t, y, **kwargs), 1

    def _graphed(self, x, t, y, scale, guided, kwargs):
        """`_network` replayed by self.graphs: FPDM's reused solution goes in and comes out as a tensor, and the
        layer's statistics are rebuilt from the replay (its residuals) and the capture (its iteration counts)."""
        iters = kwargs["policy"].num_iterations if "policy" in kwargs else None
        solution = () if self.cache is None or self.cache.solution is None else (self.cache.solution,)
        # The guidance scale goes in as a tensor, so that one graph serves every scale (a schedule within a guidance
        # interval); a fill, not a host-to-device copy. A schedule's per-sample scales are a device tensor already.
        scale_in = () if not guided or scale is None else (scale,) if torch.is_tensor(scale) else (
            torch.full((), scale, device=x.device),)

        def call(x, t, y, *rest):
            scale_arg, solution = (rest[0], rest[1:]) if scale_in else (scale, rest)
            if not self.model.fixed_point:
                out, passes = self._network(x, t, y, scale_arg, guided, kwargs)
                return (out,), (passes, None)
            cache = None
            if self.cache is not None:
                cache = SolutionCache()
                cache.solution = solution[0] if solution else None
            outer, self.cache = self.cache, cache
            try:
                policy = IterationPolicy(iters, None, cache or False, None, None, self.residual_history)
                out, passes = self._network(x, t, y, scale_arg, guided, {"policy": policy})
            finally:
                self.cache = outer
            stats = self.model.last_stats
            extra = (cache.solution,) if cache is not None else ()
            if stats.residuals:
                extra += (torch.stack(stats.residuals),)
            return (out, *extra), (passes, (stats.iterations, stats.sjfb, bool(stats.residuals)))

        outputs, (passes, layer) = self.graphs(call, (scale is None, guided, iters, len(solution), self.precision,
                                                      self.residual_history),
                                               (x, t, y, *scale_in, *solution))
        if layer is not None:
            iterations, sjfb, tracked = layer
            if self.cache is not None:
                self.cache.solution = outputs[1]
            residuals = list(outputs[-1]) if tracked else []
            self.model.last_stats = FixedPointStats(iterations=iterations, sjfb=sjfb, residuals=residuals)
        return outputs[0], passes

    def _conditional_only(self, x, t, y, kwargs):
        """An unguided call on a doubled batch: the conditional half only, its output used for both halves. With
        reuse, that half continues from (and updates) its part of the stored solution."""
        half = len(x) // 2
        if self.cache is not None:
            part = SolutionCache()
            kwargs = {**kwargs, "policy": dataclasses.replace(kwargs["policy"], reuse=part)}
            if self.cache.solution is not None:
                part.solution = self.cache.solution[:half]
        out = self.model(x[:half], t[:half], y[:half], **kwargs)
        if self.cache is not None:
            rest = self.cache.solution[half:] if self.cache.solution is not None else part.solution
            self.cache.solution = torch.cat([part.solution, rest])
        return torch.cat([out, out])

    def compute(self):
        """Compute of everything called so far, per image. `block_evals` counts one pass through the network per
        call (the unit of --budget-block-evals); `passes` counts the branches each call ran (2 with guidance, 1
        without or outside the guidance interval), and the FLOPs include them."""
        passes = sum(self.passes)
        return {"model_calls": self.calls, "cfg_passes": max(self.passes, default=1), "model_passes": passes,
                "block_evals": sum(self.block_evals),
                "flops_per_image": float(sum(f * p for f, p in zip(self.flops, self.passes))),
                "flops_in_dit_blocks": sum(f * p for f, p in zip(self.flops, self.passes)) / self.model.block_flops(),
                "iterations_per_step": self.iterations,
                "final_residual_per_step": [r[-1] if r else None for r in self.residuals],
                **({"allocation": self.iterations_per_step.report()}
                   if isinstance(self.iterations_per_step, BudgetAllocator) else {})}


def to_uint8(images):
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, 3); grayscale is repeated to RGB as ADM's format expects."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def save_grid(images, path, nrow=8):
    """Save images in [-1, 1] as one PNG grid (atomically); tiny images (MNIST at 14 px) are enlarged so the grid is
    readable."""
    from torchvision.utils import save_image
    images = images.float().clamp(-1, 1) * 0.5 + 0.5
    scale = max(1, -(-64 // images.shape[-1]))
    if scale > 1:
        images = torch.nn.functional.interpolate(images, scale_factor=scale, mode="nearest")
    # atomically: a kill mid-write must not leave a cut-off PNG that a resumed run takes for a finished preview
    atomic_write(path, lambda f: save_image(images, f, format="png", nrow=nrow, padding=2, pad_value=1.0), "wb")
    return path


# ------------------------------------------------------------------------------------------------------------------
# Samplers: one signature, chosen by name
# ------------------------------------------------------------------------------------------------------------------

# name -> sampler(model, diffusion, x_T, *, model_kwargs, clip_denoised, progress, **options) -> (x_0, info dict).
# `model` is a model callable as diffusion/ expects (a GuidedModel: guidance, FPDM iterations and reuse, counting);
# the diffusion's timesteps are the ones the sampler visits (diffusion_for_sampling). Options are sampler-specific.
# Each sampler declares what it can do (`capabilities`): callers ask that, never the name.
SAMPLERS = {}


@dataclass(frozen=True)
class Capabilities:
    """What a sampler does, as the command line and the folder identity need to know it."""
    parallel: bool = False  # solves every timestep at once: one FPDM iteration count for all, no reuse, no clipping
    needs_fpdm: bool = False  # solves FPDM's layer itself (two-axis): a DiT cannot be sampled with it
    sets_layer_iterations: bool = False  # decides the layer's iterations per call itself (two-axis: inner iterations)
    can_clip: bool = True  # can clip x̂_0 to [-1, 1]
    options: tuple = ()  # its keyword options (eta, solver, ...), from its signature
    model_calls: object = None  # diffusion -> model calls over its timesteps (None: one per timestep)

    @property
    def takes_eta(self):
        return "eta" in self.options


def register_sampler(name, **capabilities):
    def add(fn):
        options = tuple(k for k, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY
                        and k not in ("model_kwargs", "clip_denoised", "progress"))
        fn.capabilities = Capabilities(options=options, **capabilities)
        SAMPLERS[name] = fn
        return fn
    return add


def capabilities(sampler):
    """The Capabilities of sampler `sampler`; one line naming the choices for an unknown name."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[sampler].capabilities


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


@register_sampler("ddim-parallel", parallel=True, can_clip=False)
def sample_ddim_parallel(model, diffusion, x, *, model_kwargs, clip_denoised=False, progress=False, eta=0.0,
                         solver="anderson", solver_max_iter=15, solver_tol=1e-3, window=None, chunk_size=None,
                         mixing="image", sync_every=None):
    """The DDIM chain solved as one fixed point over all timesteps (DEQ-DDIM, Pokle et al. 2022; the sliding window
    of ParaDiGMS, Shih et al. 2023): `solver` anderson, picard or window (diffusion/parallel.py), at most
    `solver_max_iter` iterations to relative residual `solver_tol`, Anderson `mixing` per image (default), per
    state or global (see parallel_ddim_sample), reading the device every `sync_every` iterations. Needs a fixed FPDM
    iteration count and no x0 clipping. info: parallel_iterations, network_evaluations, residual, ..."""
    from diffusion.parallel import parallel_ddim_sample
    if clip_denoised:
        raise ValueError("parallel DDIM solves the chain without x0 clipping: sample with clip_denoised=False")
    out, _, stats = parallel_ddim_sample(model, diffusion, x, solver=solver, model_kwargs=model_kwargs, eta=eta,
                                         max_iter=solver_max_iter, tol=solver_tol, window=window, chunk_size=chunk_size,
                                         mixing=mixing, sync_every=sync_every, progress=progress, return_result=True)
    if model.block_evals:  # per image: every state evaluated costs one call's blocks
        stats["block_evals"] = stats["network_evaluations"] * model.block_evals[0]
    return out, stats


@register_sampler("ddim-two-axis", parallel=True, needs_fpdm=True, sets_layer_iterations=True,
                  can_clip=False)
def sample_ddim_two_axis(model, diffusion, x, *, model_kwargs, clip_denoised=False, progress=False, eta=0.0,
                         solver="anderson", solver_max_iter=50, solver_tol=1e-3, chunk_size=None, sync_every=None):
    """FPDM only: one fixed point over time (the DDIM chain) and depth (the layer of every timestep), one batched
    call per outer iteration running the GuidedModel's iteration count per state, warm-started from the state's
    previous layer solution (fpdm/two_axis.py). info: outer_iterations, block_evaluations, critical_path_calls,
    critical_path_blocks, ..."""
    from fpdm.two_axis import two_axis_sample
    if clip_denoised:
        raise ValueError("two-axis sampling solves the DDIM chain without x0 clipping: sample with "
                         "clip_denoised=False")
    out, _, stats = two_axis_sample(model, diffusion, x, solver=solver, model_kwargs=model_kwargs, eta=eta,
                                    max_iter=solver_max_iter, tol=solver_tol, chunk_size=chunk_size,
                                    sync_every=sync_every, progress=progress, return_result=True)
    return out, stats


def model_calls(sampler, diffusion):
    """How many model calls `sampler` makes over `diffusion`'s timesteps (Heun: two per step but the last): the unit
    an FPDM iteration budget is spread over."""
    calls = capabilities(sampler).model_calls
    return calls(diffusion) if calls else diffusion.num_timesteps


def can_clip(sampler):
    """Whether `sampler` can clip x̂_0 to [-1, 1] (the ODE solvers of diffusers' k-diffusion family and the parallel
    samplers cannot)."""
    return capabilities(sampler).can_clip


# ------------------------------------------------------------------------------------------------------------------
# diffusers' few-step solvers over our diffusion (DPM-Solver++, UniPC, Euler, Heun)
# ------------------------------------------------------------------------------------------------------------------

def diffusers_scheduler(diffusion, class_name, clip_denoised=False, **config):
    """A diffusers scheduler (`class_name`, `config`) set up to solve OUR diffusion: built from the base process's
    betas and our parameterisation (ε, v or x₀), visiting exactly `diffusion`'s timesteps (the spacing whose
    timesteps diffusers computes identically is chosen; anything else is refused). `clip_denoised` clips x̂₀ to
    [-1, 1] through diffusers' thresholding at sample_max_value 1 (only the multistep solvers have it)."""
    import diffusers
    from diffusion import ModelMeanType
    cls = getattr(diffusers, class_name)
    parameters = inspect.signature(cls.__init__).parameters
    base = np.asarray(diffusion.base_betas, dtype=np.float64)
    prediction = {ModelMeanType.EPSILON: "epsilon", ModelMeanType.VELOCITY: "v_prediction",
                  ModelMeanType.START_X: "sample"}[diffusion.model_mean_type]
    kwargs = dict(num_train_timesteps=len(base), trained_betas=base.tolist(), prediction_type=prediction, **config)
    if np.prod(1.0 - base) == 0.0:  # zero terminal SNR: diffusers keeps the last sigma finite (its own rescaling)
        if "rescale_betas_zero_snr" not in parameters:
            raise ValueError(f"{class_name} cannot sample a zero-terminal-SNR model; use ddim, dpmpp-2m or unipc")
        kwargs["rescale_betas_zero_snr"] = True
    if clip_denoised:
        if "thresholding" not in parameters:
            raise ValueError(f"{class_name} cannot clip x0: sample with clip_denoised off (--clip-denoised off)")
        kwargs.update(thresholding=True, dynamic_thresholding_ratio=1.0, sample_max_value=1.0)
    wanted = [int(t) for t in diffusion.timestep_map[::-1]]
    for spacing in ("trailing", "linspace", "leading"):
        scheduler = cls(**kwargs, timestep_spacing=spacing)
        scheduler.set_timesteps(len(wanted))
        visited = [int(round(float(t))) for t in scheduler.timesteps]
        if [t for i, t in enumerate(visited) if i == 0 or t != visited[i - 1]] == wanted:  # Heun visits twice
            return scheduler
    raise ValueError(f"{class_name} cannot visit the timesteps {wanted[:4]}...: sample with a trailing, linspace or "
                     f"leading spacing")


def run_scheduler(scheduler, model, x, model_kwargs, progress=False):
    """Drive a diffusers scheduler with our model callable (original integer timesteps; the first C channels of a
    learned-sigma output, as an ODE solver needs no variance). x is x_T ~ N(0, I), as for DDIM."""
    from tqdm.auto import tqdm
    channels = x.shape[1]
    x = x * scheduler.init_noise_sigma
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="sampling"):
        step_t = torch.full((len(x),), int(round(float(t))), device=x.device, dtype=torch.long)
        out = model(scheduler.scale_model_input(x, t), step_t, **model_kwargs)[:, :channels]
        x = scheduler.step(out.to(x.dtype), t, x).prev_sample
    return x


def _register_diffusers(name, class_name, doc, can_clip, **config):
    def sample(model, diffusion, x, *, model_kwargs, clip_denoised=False, progress=False):
        scheduler = diffusers_scheduler(diffusion, class_name, clip_denoised, **config)
        return run_scheduler(scheduler, model, x, model_kwargs, progress), {"scheduler": class_name}

    sample.__doc__ = doc
    sample.__name__ = f"sample_{name.replace('-', '_')}"
    sample.scheduler_class, sample.config = class_name, config
    register_sampler(name, can_clip=can_clip, model_calls=lambda diffusion: len(
        diffusers_scheduler(diffusion, class_name, **config).timesteps))(sample)


_register_diffusers("dpmpp-2m", "DPMSolverMultistepScheduler",
                    "DPM-Solver++(2M) (Lu et al. 2022), multistep second order in x0-prediction; diffusers' solver.",
                    True, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True,
                    final_sigmas_type="zero")
_register_diffusers("unipc", "UniPCMultistepScheduler",
                    "UniPC (Zhao et al. 2023): UniP predictor with the UniC corrector (bh2), order 2, which reuses the "
                    "next step's model output (one model call per step); diffusers' solver.",
                    True, solver_order=2, predict_x0=True, solver_type="bh2", final_sigmas_type="zero")
_register_diffusers("euler", "EulerDiscreteScheduler",
                    "Euler's method on the probability-flow ODE in sigma space (Karras et al. 2022, Alg. 1 without "
                    "churn); diffusers' solver. Cannot clip x0.", False, final_sigmas_type="zero")
_register_diffusers("heun", "HeunDiscreteScheduler",
                    "Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Alg. 1): two model "
                    "calls per step, one for the last; diffusers' solver. Cannot clip x0.", False)


def guided_batch(noise, labels, cfg_scale, null_class):
    """The batch a guided model call takes: with cfg_scale != 1, noise twice and the labels then the null class."""
    if cfg_scale == 1.0:
        return noise, labels
    return torch.cat([noise, noise]), torch.cat([labels, torch.full_like(labels, null_class)])


@torch.no_grad()
def sample_images(model, diffusion, noise, labels, *, sampler="ddim", cfg_scale=1.0, iterations_per_step=None,
                  reuse=False, tol=None, clip_denoised=None, progress=False, guidance_channels=None,
                  guidance_interval=None, guidance_schedule="constant", fp_solver=None, precision="fp32", graphs=None,
                  residual_history=False, **options):
    """Draw samples from `noise` (N, C, H, W) with class `labels` (N,) with SAMPLERS[sampler] (`options` are its
    own, e.g. eta); returns (samples, GuidedModel), whose `compute()` reports the compute and `info` the sampler's.
    `precision` "bf16" runs the network calls (only they) under bf16 autocast (see GuidedModel); samples keep the
    noise's dtype. `graphs` (graphs.GraphedCalls) replays the network calls from CUDA graphs (see GuidedModel).
    `residual_history`: the returned GuidedModel's `residuals` hold every FPDM iteration's, not only each call's last.

    With cfg_scale != 1 the batch is doubled internally (second half: the null class). clip_denoised=None follows
    `clip_denoised_for(model)`: pixel models clip x̂_0, latent models do not.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if clip_denoised is None:
        clip_denoised = clip_denoised_for(model) and can_clip(sampler)
    run = SAMPLERS[sampler]
    accepted = inspect.signature(run).parameters
    unknown = [k for k, v in options.items() if k not in accepted and v not in (None, 0.0)]  # eta=0 for DDPM: fine
    if unknown:
        raise ValueError(f"sampler {sampler!r} takes no {', '.join(unknown)} (its options: "
                         f"{', '.join(k for k in accepted if k not in ('model', 'diffusion', 'x'))})")
    options = {k: v for k, v in options.items() if k in accepted}
    was_training = model.training
    model.eval()
    fn = GuidedModel(model, cfg_scale, iterations_per_step, reuse, guidance_channels, tol, guidance_interval,
                     guidance_schedule, getattr(diffusion, "original_num_steps", 1000), fp_solver, precision, graphs,
                     residual_history=residual_history)
    x, y = guided_batch(noise, labels, cfg_scale, model.num_classes)
    diffusion.prepare(x.device)  # schedule tables on the device once, not copied at each step
    try:
        out, fn.info = run(fn, diffusion, x, model_kwargs={"y": y}, clip_denoised=clip_denoised, progress=progress,
                           **options)
    finally:
        model.train(was_training)
    return out[: len(noise)], fn


# ------------------------------------------------------------------------------------------------------------------
# Sample folders: the samples of exactly one configuration
# ------------------------------------------------------------------------------------------------------------------

def calibrate_step_weights(model, diffusion, noise, labels, iterations, *, reuse=True, cfg_scale=1.0, sampler="ddim",
                           progress=False, **sample_options):
    """Per-step weights for BudgetAllocator's objective Σ w_i r_i(k_i), measured on a small calibration batch
    (`noise`, `labels`): w_i is how far the final samples move per unit of relative layer residual that one more
    iteration at step i removes.

    It samples the batch with the fixed schedule `iterations` (one count per model call), then once more per step i
    with one extra iteration at step i, the same noise otherwise: w_i = mean over images of ||x_0^(i) - x_0|| divided
    by the residual that extra iteration removed, r_i(k_i) - r_i(k_i + 1) (floored at 0.1% of r_i(k_i)). Everything
    downstream is in it: with reuse the later steps start from what step i left, and the later denoising steps damp
    or keep what step i changed, which the residual alone cannot tell (a noisy step's error is largely undone by the
    steps after it, a clean step's stays in the image). Cost: len(iterations) + 1 samplings of the batch.
    `sample_options` go to sampling.sample_images (guidance interval, eta, ...). Returns the weights scaled to mean 1.
    """
    from tqdm.auto import tqdm

    iterations = [int(k) for k in iterations]
    options = dict(sampler=sampler, cfg_scale=cfg_scale, reuse=reuse, **sample_options)

    def run(schedule):  # every run draws the same sampler noise (eta > 0): only the extra iteration differs
        with torch.random.fork_rng(devices=[noise.device] if noise.is_cuda else []):
            torch.manual_seed(0)
            return sample_images(model, diffusion, noise, labels, iterations_per_step=schedule, **options)

    base, base_fn = run(iterations)
    weights = []
    for i in tqdm(range(len(iterations)), desc="calibrating step weights", disable=not progress):
        more = list(iterations)
        more[i] += 1
        out, fn = run(more)
        # step i starts from the same state in both runs: the base run's last residual there is this run's one but last
        before, after = base_fn.residuals[i][-1], fn.residuals[i][-1]
        removed = max(before - after, 1e-3 * before, TINY)
        moved = float((out - base).flatten(1).norm(dim=1).mean())
        weights.append(max(moved, TINY) / removed)
    mean = sum(weights) / len(weights)
    return [w / mean for w in weights]


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


# What sample.py and sample_ddp.py write into a folder (evaluate.py adds its tables beside samples.npz): all that
# --overwrite may remove.
CALIBRATION_FILE = "calibration.json"  # --fp-allocation calibrated: the measured step weights, reused by a rerun
# sample_ddp.py's end of a run, for a requeue script, removed when a run continues the folder: a process stopped by a
# signal (its batches committed) writes PREEMPTED_FILE, a process that failed FAILED_FILE.
PREEMPTED_FILE, FAILED_FILE = "preempted.json", "failed.json"
SAMPLE_OUTPUTS = (SETTINGS_FILE, "grid.png", "grid_sequential.png", "compute.json", "batches", "images",
                  "samples.npz", "samples.*.json", PREEMPTED_FILE, FAILED_FILE, CALIBRATION_FILE)


def _ours(name, outputs):
    """Whether `name` is one of `outputs` (or a temporary of one that a killed write left: `NAME.tmp-PID`)."""
    name = name.split(".tmp-")[0]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in outputs)


# Settings recorded in args.json but not compared: where the checkpoint lay (its content, checkpoint_file.sha256, is
# compared). A job requeued with the checkpoint staged elsewhere (node-local scratch) continues its folder.
NOT_COMPARED = ("checkpoint_file.path",)


def _leaves(settings, prefix=""):
    """Nested settings as {"group.name": value} (what a refusal names)."""
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def folder_entries(out):
    """The entries of folder `out` a command may judge, sorted: all but the lock of the job that holds it
    (run_folders.RunLock, sample_ddp.py's), which is never removed."""
    return sorted(name for name in os.listdir(out) if name != LOCK_FILE) if os.path.isdir(out) else []


def check_only_ours(out, entries, outputs, overwrite):
    """One line when folder `out` holds `entries` that are not among a command's `outputs`: --overwrite never
    removes what the command did not write (a training run, an export, a user's files)."""
    foreign = [name for name in entries if not _ours(name, outputs)]
    if foreign:
        shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
        raise FileExistsError(f"{out} holds files this command did not write ({shown}): choose another --out"
                              + ("" if overwrite else "; --overwrite would not remove them either"))


def remove_outputs(out, outputs):
    """Remove from folder `out` what a command writes (`outputs`, names or patterns), after checking that it holds
    nothing else (check_only_ours)."""
    entries = folder_entries(out)
    check_only_ours(out, entries, outputs, True)
    for name in entries:
        target = os.path.join(out, name)
        shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)


def claim_output_folder(out, settings, overwrite=False, outputs=SAMPLE_OUTPUTS):
    """Make `out` the folder of exactly these `settings`: a new folder gets `args.json` written first; a folder of
    the same settings is reused (resumed); one of other settings, or of unknown settings, is refused with one line
    naming what differs, unless `overwrite`: then what the command writes (`outputs`, names or patterns) is removed
    first; a folder holding anything else (a training run, an export, a user's files) is never touched. One
    process claims a folder (under accelerate: the main one, before the others start writing)."""
    check_writable(out, "--out")  # a file, or a folder that cannot be written: one line
    path = os.path.join(out, SETTINGS_FILE)
    entries = folder_entries(out)
    if entries:
        previous = None
        if os.path.isfile(path):
            with open(path) as f:
                previous = json.load(f)
            if previous == settings:
                return out
            before, after = _leaves(previous), _leaves(settings)
            differing = sorted(k for k in set(before) | set(after)
                               if before.get(k) != after.get(k) and k not in NOT_COMPARED)
            if not differing:  # the same samples; args.json records where the checkpoint now lies
                atomic_write(path, lambda f: json.dump(settings, f, indent=2, sort_keys=True))
                return out
        if not overwrite:
            if previous is None:
                check_only_ours(out, entries, outputs, overwrite)
                raise FileExistsError(f"{out} holds outputs but no {SETTINGS_FILE}: choose another --out, or pass "
                                      f"--overwrite to start over")
            details = ", ".join(f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in differing)
            older = ("; it was written by an older version of this command (before settings format "
                     f"{settings['format']}): finish it with that version, or start over") if (
                "format" in settings and "format" not in previous) else ""
            check_only_ours(out, entries, outputs, overwrite)
            raise FileExistsError(f"{out} holds samples of other settings ({details}){older}: choose another "
                                  f"--out, or pass --overwrite to start over")
        remove_outputs(out, outputs)
    os.makedirs(out, exist_ok=True)
    atomic_write(path, lambda f: json.dump(settings, f, indent=2, sort_keys=True))
    return out
