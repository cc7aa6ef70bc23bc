"""Sampling (or training) on a subset of the timesteps of a base diffusion process [IDDPM Sec. 4]."""

import numpy as np

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The sorted list of timesteps to keep out of range(num_timesteps).

    section_counts is an int or "250" (that many, evenly spaced), a list or "10,15,20" (split the steps into equal
    sections and take that many evenly spaced steps from each, as IDDPM), "ddim50" (exactly 50 steps with an integer
    stride starting at 0, as IDDPM's DDIM), or "trailing50" / "linspace50" / "leading50" (`timestep_spacing`).
    """
    if isinstance(section_counts, str):
        for spacing in TIMESTEP_SPACINGS:
            if section_counts.startswith(spacing):
                count = _parse_count(section_counts[len(spacing):], section_counts)
                return sorted(timestep_spacing(count, num_timesteps, spacing))
        if section_counts.startswith("ddim"):
            count = _parse_count(section_counts[len("ddim"):], section_counts)
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == count:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot take exactly {count} steps with an integer stride from {num_timesteps}")
        section_counts = [_parse_count(part, section_counts) for part in section_counts.split(",")]
    elif isinstance(section_counts, int):
        section_counts = [section_counts]
    if not section_counts or any(count < 1 for count in section_counts):
        raise ValueError(f"every section needs at least one step, got {section_counts}")

    # The first num_timesteps % len(sections) sections get one extra step so the sections tile all steps.
    size_per, extra = divmod(num_timesteps, len(section_counts))
    kept, start = [], 0
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count > size:
            raise ValueError(f"cannot take {count} steps from a section of {size} (of {num_timesteps} in total)")
        # Endpoints of each section are kept. The stride is accumulated in floating point and rounded (half to
        # even) exactly as IDDPM does, which differs from round(j * stride) for some counts (21, 45, 111 of 1000):
        # the same timesteps as DiT, ADM and the FPDM release sample with.
        stride = (size - 1) / (count - 1) if count > 1 else 1
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return kept


# diffusers' names and meanings (DDIMScheduler.set_timesteps; Lin et al. 2024, Table 2). The first is the default.
TIMESTEP_SPACINGS = ("trailing", "linspace", "leading")


def timestep_spacing(num_steps, num_timesteps=1000, spacing="trailing"):
    """The `num_steps` timesteps (of 0..num_timesteps-1) a sampler visits, noisiest first, for any num_steps <= T.

    - "trailing": round(T - i·T/N) - 1 for i = 0..N-1: starts at T - 1 and every step, the last one to x_0
      included, spans T/N training steps. The default: the only spacing that both starts at pure noise (t = T - 1,
      zero SNR with zero-terminal-SNR schedules) and spends no step on t ~ 0 (recommended by Lin et al. 2024).
    - "linspace": N points evenly from T - 1 down to 0 (rounded, as diffusers): IDDPM's str(N) spacing (the FPDM
      release's, DiT's DDPM-250) for N = 250 and the other usual counts; at 278 of the N <= 1000 (21, 23, 31, ...)
      one point sits on a .5 tie that IDDPM's accumulated float rounds the other way (space_timesteps(T, [N]) is
      exact there).
    - "leading": i·(T // N), noisiest first, as diffusers: IDDPM's "ddimN" and the DDIM paper's when N divides T
      (ddimN otherwise picks the stride that gives N steps: N = 30 starts at 986, not 957); starts at T - T//N, so
      at few steps the model denoises pure noise as if it were partly clean. Kept for comparisons with DiT/ADM.
    """
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}: use one of {', '.join(TIMESTEP_SPACINGS)}")
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"cannot take {num_steps} sampling steps from {num_timesteps} training timesteps: use "
                         f"1..{num_timesteps}")
    if spacing == "trailing":
        # diffusers' arithmetic (np.arange with a float step), so ties at .5 round as there; its float arange can
        # yield one element too many (a t = -1 at N = 61 of 1000), hence the [:num_steps].
        steps = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps))[:num_steps] - 1
    elif spacing == "linspace":
        steps = np.round(np.linspace(0, num_timesteps - 1, num_steps))[::-1]
    else:
        steps = (np.arange(num_steps) * (num_timesteps // num_steps))[::-1]
    return [int(t) for t in steps]


def _parse_count(text, spec):
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"unknown timestep respacing {spec!r}; use e.g. 250, '250', '10,15,20', 'ddim50' or "
                         "'trailing50'") from None


class SpacedDiffusion(GaussianDiffusion):
    """A diffusion that keeps only `use_timesteps` of the base process given by `betas` (and the other kwargs).

    Its betas are re-derived so that ᾱ at the kept steps equals the base ᾱ bit for bit: β'_i = 1 − ᾱ_{k_i}/ᾱ_{k_{i-1}}.
    Indices inside it run 0..len(use_timesteps)-1; `timestep_map[i]` is the original step k_i, and every model call
    goes through `GaussianDiffusion._call_model`, so the network always sees original timesteps.
    """

    def __init__(self, use_timesteps, **kwargs):
        base_betas = np.asarray(kwargs.pop("betas"), dtype=np.float64)
        kept = np.array(sorted(set(int(t) for t in use_timesteps)), dtype=np.int64)
        if len(kept) == 0 or kept[0] < 0 or kept[-1] >= len(base_betas):
            raise ValueError(f"use_timesteps must be a non-empty subset of range({len(base_betas)})")
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        alphas_cumprod = base_alphas_cumprod[kept]
        # A final ᾱ of 0 (zero terminal SNR) gives β' = 1 exactly, so the spaced process keeps SNR_T = 0.
        betas = 1.0 - alphas_cumprod / np.append(1.0, alphas_cumprod[:-1])
        super().__init__(betas=betas, alphas_cumprod=alphas_cumprod, **kwargs)
        self.timestep_map = kept
        self.base_betas = base_betas  # the full process (diffusers schedulers are built from it)
        self.original_num_steps = len(base_betas)
