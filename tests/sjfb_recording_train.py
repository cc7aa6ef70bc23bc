"""train.py with each example's diffusion timestep and noise a function of the example itself (not of the RNG stream),
so runs that split the same global batch differently (processes, accumulation) must take the same optimizer steps.
With SJFB_LOG set, each process appends the S-JFB counts its FPDM ran at every training call to SJFB_LOG.<rank>.

    accelerate launch ... tests/deterministic_train.py <train.py flags>
"""

import json
import os
import sys

import torch

import train
from diffusion.gaussian_diffusion import GaussianDiffusion

# FPDM with fixed S-JFB counts and no label dropout: no other randomness in the loss.
FLAGS = ["--fixed-point-no-grad-min-iters", "3", "--fixed-point-no-grad-max-iters", "3",
         "--fixed-point-with-grad-min-iters", "3", "--fixed-point-with-grad-max-iters", "3",
         "--class-dropout-prob", "0"]


def per_example_losses(real):
    def losses(self, model, x_start, t, model_kwargs=None, noise=None):
        weights = torch.arange(1, x_start[0].numel() + 1, dtype=torch.float64)
        keys = (x_start.detach().cpu().flatten(1).double() * weights).sum(1)
        seeds = [int(abs(k) * 1000) % 2 ** 31 for k in keys.tolist()]
        t = torch.tensor([s % self.num_timesteps for s in seeds], device=x_start.device)
        noise = torch.stack([torch.randn(x_start.shape[1:], generator=torch.Generator().manual_seed(s))
                             for s in seeds]).to(x_start)
        return real(self, model, x_start, t, model_kwargs, noise=noise)
    return losses


def recording_solve(real, path):
    """FPDM.solve that appends (n, m) of every training-mode call to `path` (one JSON list per line)."""
    def solve(self, *args, **kwargs):
        z = real(self, *args, **kwargs)
        if self.training:
            with open(path, "a") as f:
                f.write(json.dumps(list(self.last_stats.sjfb)) + "\n")
        return z
    return solve


def read_draws(path):
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f]


if __name__ == "__main__":
    if os.environ.get("SJFB_LOG"):
        from models import FPDM
        FPDM.solve = recording_solve(FPDM.solve, f"{os.environ['SJFB_LOG']}.{os.environ.get('RANK', '0')}")
    else:
        GaussianDiffusion.training_losses = per_example_losses(GaussianDiffusion.training_losses)
    train.main(train.parse_args(sys.argv[1:]))
