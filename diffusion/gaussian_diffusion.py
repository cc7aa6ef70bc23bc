"""Gaussian diffusion: noise schedules, the forward process, parameterizations, training losses and samplers.

References (equation numbers as in the papers):
  [DDPM]  Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models".
  [IDDPM] Nichol, Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models".
  [DDIM]  Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models".
  [V]     Salimans, Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models" (v-prediction).
  [ZSNR]  Lin, Liu, Li, Yang 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed".
  [MSNR]  Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy".

Conventions: timestep indices are 0-based, index t holds the papers' step t + 1, so the step out of t = 0 lands on
the data (ᾱ_prev = 1). Schedule arrays are float64 numpy arrays of length T; `_extract` gathers them per example in
float32 (float64 for float64 inputs), so half-precision inputs still get accurate coefficients.
"""

import enum
import math

import numpy as np
import torch
from tqdm.auto import tqdm


class ModelMeanType(enum.Enum):
    """What the first C output channels of the network predict."""
    EPSILON = "epsilon"    # the noise ε [DDPM Eq. 11]
    START_X = "start_x"    # the clean data x_0
    VELOCITY = "velocity"  # v = √ᾱ ε − √(1−ᾱ) x_0 [V Sec. 4]


class ModelVarType(enum.Enum):
    """How the reverse-process variance Σ_t is chosen."""
    LEARNED_RANGE = "learned_range"  # interpolate log β̃_t .. log β_t with extra channels [IDDPM Eq. 15]
    FIXED_SMALL = "fixed_small"      # β̃_t, the posterior variance [DDPM Sec. 3.2]
    FIXED_LARGE = "fixed_large"      # β_t [DDPM Sec. 3.2]


class LossType(enum.Enum):
    MSE = "mse"                    # L_simple (+ L_vlb term for learned variance, the hybrid loss [IDDPM Eq. 16])
    RESCALED_MSE = "rescaled_mse"  # as MSE, with the VLB term scaled by T/1000 so λ = 0.001 for any T
    KL = "kl"                      # the VLB alone, scaled by T (IDDPM's RESCALED_KL, what DiT's use_kl selects)


# ----------------------------------------------------------------------------------------------------------------
# Noise schedules
# ----------------------------------------------------------------------------------------------------------------

def get_named_beta_schedule(name, num_diffusion_timesteps):
    """T betas (float64): "linear" [DDPM, scaled by 1000/T as in IDDPM] or "cosine" [IDDPM Eq. 17]."""
    T = num_diffusion_timesteps
    if name == "linear":
        scale = 1000 / T  # keeps the total noise comparable to T = 1000 when T differs
        return np.linspace(scale * 1e-4, scale * 0.02, T, dtype=np.float64)
    if name == "cosine":
        s = 0.008
        alpha_bar = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2
        betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)]
        return np.array(betas, dtype=np.float64)  # capped at 0.999 to avoid the singularity at t = T (IDDPM Sec. 3.2)
    raise ValueError(f"unknown beta schedule {name!r}; use 'linear' or 'cosine'")


def rescale_zero_terminal_snr(betas):
    """Shift and scale √ᾱ so the last is 0 and the first unchanged [ZSNR Alg. 1]; returns betas, the last one 1."""
    sqrt_alphas_cumprod = np.sqrt(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
    first, last = sqrt_alphas_cumprod[0], sqrt_alphas_cumprod[-1]
    sqrt_alphas_cumprod = (sqrt_alphas_cumprod - last) * first / (first - last)
    alphas_cumprod = sqrt_alphas_cumprod ** 2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


# ----------------------------------------------------------------------------------------------------------------
# Likelihood helpers (in nats)
# ----------------------------------------------------------------------------------------------------------------

def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """Φ(x) via the tanh approximation (Page 1977), as in [DDPM]'s decoder."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """log p(x) for data in [-1, 1] quantized to 256 bins under N(means, e^{2 log_scales}) [DDPM Eq. 13]."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255))
    # The edge bins extend to ±∞, so that probabilities over the 256 bins sum to one.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x):
    """Mean over all non-batch dimensions."""
    return x.mean(dim=tuple(range(1, x.dim())))




# ----------------------------------------------------------------------------------------------------------------
# Gaussian diffusion
# ----------------------------------------------------------------------------------------------------------------

class GaussianDiffusion:
    """Forward process q, the reverse process p_θ built from one model callable, training losses and samplers.

    The model is called as `model(x, t, **model_kwargs)` with t a (B,) long tensor of ORIGINAL timesteps
    (`timestep_map[t]`), and returns C channels, or 2C with learned variance (mean part first).
    `alphas_cumprod` may be given to pin ᾱ bit-exactly (respacing does); it defaults to cumprod(1 − β).
    """

    def __init__(self, *, betas, model_mean_type, model_var_type, loss_type, min_snr_gamma=None,
                 alphas_cumprod=None):
        self.model_mean_type = ModelMeanType(model_mean_type)
        self.model_var_type = ModelVarType(model_var_type)
        self.loss_type = LossType(loss_type)
        self.min_snr_gamma = min_snr_gamma

        self.betas = betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.num_timesteps = T = len(betas)
        self.timestep_map = np.arange(T)  # identity here; SpacedDiffusion maps to the original steps

        alpha_bar = np.cumprod(1.0 - betas) if alphas_cumprod is None else np.asarray(alphas_cumprod, dtype=np.float64)
        if alpha_bar[-1] == 0 and self.model_mean_type == ModelMeanType.EPSILON:
            raise ValueError("zero-terminal-SNR needs v-prediction (predict_v=True): ε is unidentifiable at ᾱ_T = 0")
        self.alphas_cumprod = alpha_bar
        self.alphas_cumprod_prev = np.append(1.0, alpha_bar[:-1])
        self.alphas_cumprod_next = np.append(alpha_bar[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(alpha_bar)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alpha_bar)
        self.one_minus_alphas_cumprod = 1.0 - alpha_bar
        self.log_one_minus_alphas_cumprod = np.log(1.0 - alpha_bar)
        self.log_betas = np.log(betas)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, β̃_t) [DDPM Eq. 6-7].
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - alpha_bar)
        # β̃_0 = 0 and its log is -inf, so reuse β̃_1 (it is only interpolated; no noise is ever added at t = 0).
        variance_1 = self.posterior_variance[1] if T > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(variance_1, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - alpha_bar)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alpha_bar)
        # FIXED_LARGE takes β̃_1 at t = 0 too (as IDDPM), so the decoder likelihood is not a near-delta.
        self.fixed_log_variance = (self.posterior_log_variance_clipped
                                   if self.model_var_type == ModelVarType.FIXED_SMALL
                                   else np.log(np.append(variance_1, betas[1:])))

        # Min-SNR-γ loss weights [MSNR]: min(SNR, γ) on the x_0 error, expressed per target; SNR = ᾱ / (1 − ᾱ).
        self.snr = alpha_bar / (1.0 - alpha_bar)
        self.mse_weights = np.ones(T)
        if min_snr_gamma is not None:
            clipped = np.minimum(self.snr, min_snr_gamma)
            if self.model_mean_type == ModelMeanType.EPSILON:
                self.mse_weights = clipped / self.snr  # SNR > 0 here: ε-prediction refuses zero terminal SNR
            elif self.model_mean_type == ModelMeanType.START_X:
                self.mse_weights = clipped
            else:
                self.mse_weights = clipped / (self.snr + 1.0)

    # --- forward process and parameterizations -------------------------------------------------------------------

    def q_mean_variance(self, x_start, t):
        """Mean, variance and log variance of q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) [DDPM Eq. 4]."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._extract(self.one_minus_alphas_cumprod, t, x_start)
        return mean, variance, self._extract(self.log_one_minus_alphas_cumprod, t, x_start)

    def q_sample(self, x_start, t, noise=None):
        """Draw x_t ~ q(x_t | x_0) [DDPM Eq. 4]."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0) [DDPM Eq. 6-7]."""
        mean = (self._extract(self.posterior_mean_coef1, t, x_t) * x_start
                + self._extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._extract(self.posterior_variance, t, x_t), self._extract(self.posterior_log_variance_clipped, t, x_t)

    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = (x_t − √(1−ᾱ) ε) / √ᾱ; undefined where ᾱ = 0, hence ε-prediction is refused there."""
        return ((x_t - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps)
                / self._extract(self.sqrt_alphas_cumprod, t, x_t))

    def predict_eps_from_xstart(self, x_t, t, pred_xstart):
        """ε = (x_t − √ᾱ x_0) / √(1−ᾱ); finite for every t since ᾱ_t < 1."""
        return ((x_t - self._extract(self.sqrt_alphas_cumprod, t, x_t) * pred_xstart)
                / self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t))

    def predict_v(self, x_start, t, noise):
        """v = √ᾱ ε − √(1−ᾱ) x_0 [V Sec. 4]."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x_start) * noise
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)

    def predict_xstart_from_v(self, x_t, t, v):
        """x_0 = √ᾱ x_t − √(1−ᾱ) v (a rotation, so finite even at ᾱ = 0)."""
        return (self._extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
                - self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v)

    def predict_eps_from_v(self, x_t, t, v):
        """ε = √(1−ᾱ) x_t + √ᾱ v."""
        return (self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
                + self._extract(self.sqrt_alphas_cumprod, t, x_t) * v)

    # --- reverse process -----------------------------------------------------------------------------------------

    def _extract(self, arr, t, x):
        """arr[t] on x's device, shaped (B, 1, ..., 1) to broadcast against x; float32 unless x is float64. Each
        table (one of this diffusion's arrays) is copied to a device once and kept there, so a training step or a
        sampling step does no host-to-device copies of schedules."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return self._on_device(arr, x.device, dtype)[t].view(-1, *([1] * (x.dim() - 1)))

    def prepare(self, device):
        """Copy every schedule table to `device` now (float32; timestep maps int64), so that no later training or
        sampling step copies one: train.py and sample_images call it before their loops."""
        device = torch.device(device)
        for value in list(vars(self).values()):
            if isinstance(value, np.ndarray):
                integer = np.issubdtype(value.dtype, np.integer)
                self._on_device(value, device, torch.int64 if integer else torch.float32)
        return self

    def _on_device(self, arr, device, dtype):
        key = (id(arr), device, dtype)  # the arrays are this object's attributes: their ids are stable
        tables = self.__dict__.setdefault("_device_tables", {})
        if key not in tables:
            tables[key] = torch.from_numpy(arr).to(device=device, dtype=dtype)
        return tables[key]

    def _call_model(self, model, x, t, model_kwargs):
        # The single place the network is called: it always sees original timesteps, also after respacing.
        original_t = self._on_device(self.timestep_map, t.device, torch.int64)[t]
        return model(x, original_t, **(model_kwargs or {}))

    def p_mean_variance(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """p_θ(x_{t-1} | x_t): dict with mean, variance, log_variance, pred_xstart and eps (implied by pred_xstart)."""
        output = self._call_model(model, x, t, model_kwargs)
        return self._p_mean_variance(output, x, t, clip_denoised, denoised_fn)

    def _p_mean_variance(self, output, x, t, clip_denoised=True, denoised_fn=None):
        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            if output.shape[1] != 2 * x.shape[1]:
                raise ValueError(f"learned variance needs 2C = {2 * x.shape[1]} output channels, got {output.shape[1]}")
            output, var_values = output.chunk(2, dim=1)
            # [IDDPM Eq. 15]: the network outputs v ∈ [-1, 1] and Σ = exp(frac log β_t + (1 − frac) log β̃_t).
            frac = (var_values + 1) / 2
            log_variance = (frac * self._extract(self.log_betas, t, x)
                            + (1 - frac) * self._extract(self.posterior_log_variance_clipped, t, x))
        else:
            log_variance = self._extract(self.fixed_log_variance, t, x).expand(x.shape)

        if self.model_mean_type == ModelMeanType.EPSILON:
            pred_xstart = self.predict_xstart_from_eps(x, t, output)
        elif self.model_mean_type == ModelMeanType.START_X:
            pred_xstart = output
        else:
            pred_xstart = self.predict_xstart_from_v(x, t, output)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)

        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": log_variance.exp(), "log_variance": log_variance,
                "pred_xstart": pred_xstart, "eps": self.predict_eps_from_xstart(x, t, pred_xstart)}

    # --- training ------------------------------------------------------------------------------------------------

    def _vb_terms_bpd(self, output, x_start, x_t, t):
        """The VLB term L_t in bits per dimension: KL(q(x_{t-1}|x_t,x_0) || p_θ) for t > 0, decoder NLL at t = 0."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self._p_mean_variance(output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        return torch.where(t == 0, mean_flat(nll) / math.log(2.0), kl)

    def training_losses(self, model, x_start, t, model_kwargs=None, noise=None):
        """Per-example losses at timesteps t: dict with "loss" (B,), and "mse" / "vb" where they apply.

        MSE losses regress the mean type's target (ε, x_0 or v), optionally min-SNR-γ weighted; with learned variance
        the VLB term is added with the mean part detached, so it trains only Σ_θ [IDDPM Sec. 3.1, Eq. 16].
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        output = self._call_model(model, x_t, t, model_kwargs)
        terms = {}

        if self.loss_type == LossType.KL:
            terms["vb"] = self._vb_terms_bpd(output, x_start, x_t, t)
            # L_vlb = Σ_t L_t, so T · L_t with uniform t is an unbiased estimate of the whole bound.
            terms["loss"] = terms["vb"] * self.num_timesteps
            return terms

        if self.model_var_type == ModelVarType.LEARNED_RANGE:
            mean_part, var_values = output.chunk(2, dim=1)
            frozen = torch.cat([mean_part.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
            if self.loss_type == LossType.RESCALED_MSE:
                # λ = 0.001 of IDDPM's hybrid loss, with L_vlb ≈ T · L_t as above.
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            output = mean_part

        target = {ModelMeanType.EPSILON: noise,
                  ModelMeanType.START_X: x_start,
                  ModelMeanType.VELOCITY: self.predict_v(x_start, t, noise)}[self.model_mean_type]
        weight = self._extract(self.mse_weights, t, x_start).view(-1)
        terms["mse"] = weight * mean_flat((target - output) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms

    # --- samplers ------------------------------------------------------------------------------------------------

    def _loop(self, step, x, indices, progress, callback):
        """Run `step(x, t) -> {"sample", "pred_xstart"}` over timestep indices, with a bar and a per-step callback."""
        for i, index in enumerate(tqdm(indices) if progress else indices):
            t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
            with torch.no_grad():
                out = step(x, t)
            x = out["sample"]
            if callback is not None:
                callback({"i": i, "t": t, "x": x, "pred_xstart": out["pred_xstart"]})
        return x

    def p_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None):
        """One ancestral step x_t → x_{t-1} ~ p_θ(x_{t-1} | x_t) [DDPM Alg. 2]; no noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * torch.randn_like(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                      device=None, progress=False, callback=None):
        """Ancestral sampling from x_T ~ N(0, I) (or `noise`) down to x_0 [DDPM Alg. 2]."""
        x = noise if noise is not None else torch.randn(*shape, device=device)
        step = lambda x, t: self.p_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        return self._loop(step, x, range(self.num_timesteps)[::-1], progress, callback)

    def ddim_sample(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0):
        """One DDIM step x_t → x_{t-1} [DDIM Eq. 12] with σ_t(η) of [DDIM Eq. 16]; η = 1 is DDPM-like."""
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        eps = out["eps"]  # re-derived from the (possibly clipped) x_0, so the step stays consistent with it
        alpha_bar = self._extract(self.alphas_cumprod, t, x)
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev))
        # 1 - ᾱ_prev - σ² = (1 - ᾱ_prev)(1 - η²(1 - ᾱ/ᾱ_prev)/(1 - ᾱ)) >= 0, but for η = 1 and ᾱ ≈ 0 (a cosine
        # schedule's first step) rounding makes it slightly negative: clamped, or its root is NaN
        mean = out["pred_xstart"] * alpha_bar_prev.sqrt() + (1 - alpha_bar_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        nonzero = (t != 0).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        sample = (mean + nonzero * sigma * torch.randn_like(x)) if eta > 0 else mean
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample_loop(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, model_kwargs=None,
                         device=None, eta=0.0, progress=False, callback=None):
        """DDIM sampling over all (respaced) steps; deterministic for η = 0 [DDIM Sec. 4.1]."""
        x = noise if noise is not None else torch.randn(*shape, device=device)
        step = lambda x, t: self.ddim_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs, eta)
        return self._loop(step, x, range(self.num_timesteps)[::-1], progress, callback)

    def ddim_reverse_sample(self, model, x, t, clip_denoised=False, denoised_fn=None, model_kwargs=None):
        """The inverse of `ddim_sample` at η = 0: x_{t-1} → x_t [DDIM Sec. 4.3, the ODE run forward in time].

        The exact inverse needs ε(x_t, t), which is unknown; like common DDIM inversion we use ε(x_{t-1}, t), so the
        round trip is first-order accurate in the step size. Same t, same ᾱ pair as the `ddim_sample` it undoes.
        """
        eps = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)["eps"]
        alpha_bar_prev = self._extract(self.alphas_cumprod_prev, t, x)  # > 0 for every t, also with zero terminal SNR
        pred_xstart = (x - torch.sqrt(1 - alpha_bar_prev) * eps) / alpha_bar_prev.sqrt()
        alpha_bar = self._extract(self.alphas_cumprod, t, x)
        return {"sample": pred_xstart * alpha_bar.sqrt() + torch.sqrt(1 - alpha_bar) * eps, "pred_xstart": pred_xstart}

    def ddim_reverse_sample_loop(self, model, x_start, clip_denoised=False, denoised_fn=None, model_kwargs=None,
                                 progress=False, callback=None):
        """Encode data into the DDIM latent x_T (η = 0): `ddim_sample_loop` run backwards through the same levels."""
        step = lambda x, t: self.ddim_reverse_sample(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        return self._loop(step, x_start, range(self.num_timesteps), progress, callback)
