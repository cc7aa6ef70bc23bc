"""The VAE between pixels and latents (a diffusers AutoencoderKL), in one place: loading with a one-line error,
the latent scaling factor, encoding to scaled posterior moments (extract_features.py) and decoding (sample.py,
sample_ddp.py). Latent models see `scaling_factor · z`, which has roughly unit variance for the SD VAEs DiT uses."""

import os

import torch

DEFAULT_SCALING_FACTOR = 0.18215  # SD VAEs (sd-vae-ft-mse / -ema), when a config does not state its own


def load(name_or_path):
    """A local diffusers AutoencoderKL folder or a hub id (needs network); one clear line if neither works."""
    from diffusers import AutoencoderKL

    try:
        return AutoencoderKL.from_pretrained(name_or_path)
    except Exception as e:
        where = "the local folder is not a diffusers AutoencoderKL" if os.path.isdir(name_or_path) else \
            "it is no local folder and the hub is unreachable or has no such id"
        raise ValueError(f"cannot load VAE {name_or_path!r}: {where} ({type(e).__name__}); pass a local folder saved "
                         f"with AutoencoderKL.save_pretrained, or download the id once with network access") from None


def scaling_factor(vae):
    """The factor that brings this VAE's latents to roughly unit variance."""
    return float(getattr(vae.config, "scaling_factor", None) or DEFAULT_SCALING_FACTOR)


@torch.no_grad()
def encode_moments(vae, pixels):
    """Pixels in [-1, 1] -> (mean, std) of the scaled latent posterior: a latent sample is mean + std · N(0, 1)."""
    posterior = vae.encode(pixels).latent_dist
    scale = scaling_factor(vae)
    return posterior.mean * scale, posterior.std * scale


DECODE_BATCH = 32  # latents per decoder call: the SD-VAE holds ~0.3 GB of activations per 256 px image


@torch.no_grad()
def decode(latents, vae, batch_size=DECODE_BATCH):
    """Scaled latents -> pixels in [-1, 1], `batch_size` latents per decoder call (a training run's FID share of
    1,250 latents in one call would need hundreds of GB)."""
    scale = scaling_factor(vae)
    return torch.cat([vae.decode(chunk / scale).sample for chunk in latents.split(batch_size)])
