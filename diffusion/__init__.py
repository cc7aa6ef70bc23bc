"""Gaussian diffusion (DDPM / IDDPM / DDIM math), independent of any network.

Every sampler and loss here drives one model callable:

    model(x, t, **model_kwargs) -> tensor

x is the noisy batch (B, C, ...), t a (B,) torch.long tensor of ORIGINAL timesteps (0..diffusion_steps-1, also
after respacing), and the output has C channels (fixed variance) or 2C channels (learned variance: the mean part,
interpreted by ModelMeanType, then the variance interpolation values in [-1, 1]). Class labels, guidance scales
and the like travel in model_kwargs; wrap the network in a function to adapt any other signature.
"""

from .gaussian_diffusion import (GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule,
                                 rescale_zero_terminal_snr)
from .respace import TIMESTEP_SPACINGS, SpacedDiffusion, space_timesteps, timestep_spacing

__all__ = ["create_diffusion", "DIFFUSION_DEFAULTS", "GaussianDiffusion", "SpacedDiffusion", "space_timesteps", "timestep_spacing",
           "TIMESTEP_SPACINGS", "get_named_beta_schedule",
           "rescale_zero_terminal_snr", "ModelMeanType", "ModelVarType", "LossType"]


# The settings that define a trained model's diffusion, with train.py's names, and DiT's values for each: what a
# checkpoint, an export or a sample folder records, and what sampling assumes when nothing is recorded.
DIFFUSION_DEFAULTS = {"noise_schedule": "linear", "learn_sigma": True, "predict_v": False, "zero_terminal_snr": False,
                      "diffusion_steps": 1000}


def create_diffusion(timestep_respacing, noise_schedule="linear", use_kl=False, sigma_small=False,
                     predict_xstart=False, learn_sigma=True, rescale_learned_sigmas=False, diffusion_steps=1000,
                     predict_v=False, zero_terminal_snr=False, min_snr_gamma=None):
    """The diffusion DiT trains and samples with (same flags and defaults), plus v-prediction, zero terminal SNR
    [Lin et al. 2024] and min-SNR-γ loss weighting [Hang et al. 2023]. The keywords of DIFFUSION_DEFAULTS (and of
    configs.DiffusionConfig) are its own: `create_diffusion("", **settings)` needs no renaming.

    timestep_respacing: None or "" for all diffusion_steps, else a `space_timesteps` spec ("250", "ddim50", ...).
    """
    if predict_xstart and predict_v:
        raise ValueError("choose at most one of predict_xstart and predict_v")
    if zero_terminal_snr and not (predict_v or predict_xstart):  # checked on the base schedule: a respacing that
        # skips t = T (leading) would hide ᾱ_T = 0 from the spaced one, not the model's training from it
        raise ValueError("zero-terminal-SNR needs v-prediction (predict_v=True): ε is unidentifiable at ᾱ_T = 0")
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if zero_terminal_snr:
        betas = rescale_zero_terminal_snr(betas)
    if use_kl:
        loss_type = LossType.KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if predict_v:
        mean_type = ModelMeanType.VELOCITY
    elif predict_xstart:
        mean_type = ModelMeanType.START_X
    else:
        mean_type = ModelMeanType.EPSILON
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(space_timesteps(diffusion_steps, timestep_respacing), betas=betas,
                           model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type,
                           min_snr_gamma=min_snr_gamma)
