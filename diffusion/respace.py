"""Sampling (or training) on a subset of the timesteps of a base diffusion process [IDDPM Sec. 4]."""

import numpy as np

from .gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """The sorted list of timesteps to keep out of range(num_timesteps).

    section_counts is an int or "250" (that many, evenly spaced), a list or "10,15,20" (split the steps into equal
    sections and take that many evenly spaced steps from each, as IDDPM), or "ddim50" (exactly 50 steps with an
    integer stride starting at 0, as in the DDIM paper).
    """
    if isinstance(section_counts, str):
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
        # Endpoints of each section are kept; the rounding is IDDPM's, so results match published checkpoints.
        stride = (size - 1) / (count - 1) if count > 1 else 1
        kept += [start + round(j * stride) for j in range(count)]
        start += size
    return kept


def _parse_count(text, spec):
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"unknown timestep respacing {spec!r}; use e.g. 250, '250', '10,15,20' or 'ddim50'") from None


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
        self.original_num_steps = len(base_betas)
