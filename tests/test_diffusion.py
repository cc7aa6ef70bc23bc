"""Properties and numbers of diffusion/: schedules, the forward process, parameterizations, respacing, losses and
samplers. Samplers are checked with the exact denoiser for Gaussian data, so their answers are known in closed form."""

import math

import numpy as np
import pytest
import torch

from diffusion import (TIMESTEP_SPACINGS, GaussianDiffusion, LossType, ModelMeanType, ModelVarType, SpacedDiffusion,
                       create_diffusion, get_named_beta_schedule, rescale_zero_terminal_snr, space_timesteps,
                       timestep_spacing)
from diffusion.gaussian_diffusion import discretized_gaussian_log_likelihood, normal_kl


def make_diffusion(mean_type=ModelMeanType.EPSILON, var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.MSE,
                   betas=None, **kwargs):
    betas = get_named_beta_schedule("linear", 1000) if betas is None else betas
    return GaussianDiffusion(betas=betas, model_mean_type=mean_type, model_var_type=var_type, loss_type=loss_type,
                             **kwargs)


def gaussian_data_model(base_alphas_cumprod, mu, s, mean_type=ModelMeanType.EPSILON):
    """The exact (posterior-mean) denoiser for data x_0 ~ N(mu, s² I), called with ORIGINAL timesteps.

    E[x_0 | x_t] = mu + √ᾱ s² (x_t − √ᾱ mu) / (ᾱ s² + 1 − ᾱ); ε and v follow from x_t = √ᾱ x_0 + √(1−ᾱ) ε.
    Written through x_0 so it stays finite at ᾱ = 0 (zero terminal SNR).
    """
    table = torch.from_numpy(base_alphas_cumprod)

    def model(x, t):
        a = table.to(x.dtype)[t].view(-1, *([1] * (x.dim() - 1)))
        x0 = mu + a.sqrt() * s ** 2 * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return {ModelMeanType.EPSILON: eps, ModelMeanType.START_X: x0,
                ModelMeanType.VELOCITY: a.sqrt() * eps - (1 - a).sqrt() * x0}[mean_type]
    return model


# ----------------------------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------------------------

def test_linear_schedule_endpoints_scale_and_monotone():
    betas = get_named_beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
    assert np.all(np.diff(np.cumprod(1 - betas)) < 0)
    half = get_named_beta_schedule("linear", 500)  # scale 1000/T keeps the same total amount of noise
    assert half[0] == pytest.approx(2e-4) and half[-1] == pytest.approx(0.04)


def test_cosine_schedule_follows_squared_cosine():
    T, s = 1000, 0.008
    betas = get_named_beta_schedule("cosine", T)
    alphas_cumprod = np.cumprod(1 - betas)
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    i = np.arange(T - 1)  # the last β is capped at 0.999, so the formula holds before it
    np.testing.assert_allclose(alphas_cumprod[i], f((i + 1) / T) / f(0), rtol=1e-10)
    assert betas.max() == pytest.approx(0.999) and np.all(np.diff(alphas_cumprod) < 0)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        get_named_beta_schedule("quadratic", T)


def test_zero_terminal_snr_rescaling():
    betas = get_named_beta_schedule("linear", 1000)
    rescaled = rescale_zero_terminal_snr(betas)
    assert rescaled[-1] == 1.0
    diffusion = make_diffusion(ModelMeanType.VELOCITY, betas=rescaled)
    assert diffusion.alphas_cumprod[-1] == 0.0
    assert diffusion.alphas_cumprod[0] == pytest.approx(1 - betas[0], rel=1e-12)
    assert np.all(np.diff(diffusion.alphas_cumprod) < 0)
    for spacing in ("", "ddim50", "leading10"):  # also where the respacing skips t = T (its ᾱ is not 0)
        with pytest.raises(ValueError, match="v-prediction"):
            create_diffusion(spacing, zero_terminal_snr=True)
    assert create_diffusion("leading10", zero_terminal_snr=True, predict_xstart=True).alphas_cumprod[-1] > 0.0
    # Respacing that keeps the final step keeps SNR_T = 0; one that does not, does not.
    assert create_diffusion("10", zero_terminal_snr=True, predict_v=True).alphas_cumprod[-1] == 0.0
    assert create_diffusion("ddim50", zero_terminal_snr=True, predict_v=True).alphas_cumprod[-1] > 0.0


# ----------------------------------------------------------------------------------------------------------------
# Forward process, posterior and parameterizations
# ----------------------------------------------------------------------------------------------------------------

def test_q_sample_moments():
    torch.manual_seed(0)
    diffusion = make_diffusion()
    n = 200_000
    x_start = torch.tensor([-0.8, 0.1, 0.9]).repeat(n, 1)
    for index in [0, 300, 999]:
        t = torch.full((n,), index, dtype=torch.long)
        x_t = diffusion.q_sample(x_start, t)
        a = diffusion.alphas_cumprod[index]
        np.testing.assert_allclose(x_t.mean(0).numpy(), math.sqrt(a) * x_start[0].numpy(), atol=0.01)
        np.testing.assert_allclose(x_t.var(0).numpy(), [1 - a] * 3, atol=0.01)
        mean, variance, log_variance = diffusion.q_mean_variance(x_start[:2], t[:2])
        assert torch.allclose(mean, math.sqrt(a) * x_start[:2]) and torch.allclose(variance.log(), log_variance)


def test_q_posterior_is_bayes_rule():
    """Posterior of x_{t-1} from q(x_t | x_{t-1}) q(x_{t-1} | x_0), as a product of Gaussians."""
    diffusion = make_diffusion()
    betas = get_named_beta_schedule("linear", 1000)
    alphas_cumprod = np.cumprod(1 - betas)
    t = torch.tensor([1, 10, 500, 999])
    x_start = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_t = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mean, variance, log_variance = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    for row, index in enumerate(t.tolist()):
        beta, a_prev = betas[index], alphas_cumprod[index - 1]
        precision = 1 / (1 - a_prev) + (1 - beta) / beta
        expected_mean = (math.sqrt(a_prev) * x_start[row] / (1 - a_prev)
                         + math.sqrt(1 - beta) * x_t[row] / beta) / precision
        torch.testing.assert_close(mean[row], expected_mean, rtol=1e-10, atol=1e-12)
        assert variance[row].item() == pytest.approx(1 / precision, rel=1e-10)
        assert variance[row].item() == pytest.approx((1 - a_prev) / (1 - alphas_cumprod[index]) * beta, rel=1e-10)
        assert log_variance[row].item() == pytest.approx(math.log(1 / precision), rel=1e-10)


@pytest.mark.parametrize("zero_snr", [False, True])
def test_parameterization_round_trips(zero_snr):
    betas = get_named_beta_schedule("linear", 1000)
    diffusion = make_diffusion(ModelMeanType.VELOCITY, betas=rescale_zero_terminal_snr(betas) if zero_snr else betas)
    generator = torch.Generator().manual_seed(3)
    x_start = torch.randn(5, 2, 4, dtype=torch.float64, generator=generator)
    noise = torch.randn(5, 2, 4, dtype=torch.float64, generator=generator)
    t = torch.tensor([0, 1, 250, 998, 999])
    x_t = diffusion.q_sample(x_start, t, noise)
    v = diffusion.predict_v(x_start, t, noise)
    torch.testing.assert_close(diffusion.predict_xstart_from_v(x_t, t, v), x_start, rtol=0, atol=1e-12)
    torch.testing.assert_close(diffusion.predict_eps_from_v(x_t, t, v), noise, rtol=0, atol=1e-12)
    torch.testing.assert_close(diffusion.predict_eps_from_xstart(x_t, t, x_start), noise, rtol=0, atol=1e-10)
    if zero_snr:  # ᾱ_T = 0: x_T is pure noise, and nothing on the v path may be inf or NaN
        torch.testing.assert_close(x_t[-1], noise[-1], rtol=0, atol=0)
        posterior_mean, _, _ = diffusion.q_posterior_mean_variance(x_start, x_t, t)
        assert torch.isfinite(posterior_mean).all()
    else:
        torch.testing.assert_close(diffusion.predict_xstart_from_eps(x_t, t, noise), x_start, rtol=0, atol=1e-10)


def test_likelihood_helpers():
    # The 256 bins tile the real line, so their probabilities sum to one whatever the Gaussian.
    x = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, math.log(0.5)), (0.7, math.log(0.01)), (-2.0, 0.0)]:
        log_p = discretized_gaussian_log_likelihood(x, means=torch.full_like(x, mean),
                                                    log_scales=torch.full_like(x, log_scale))
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)
    kl = normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(math.log(4.0)))
    assert kl.item() == pytest.approx(0.5 * (math.log(4.0) + 0.25 + 0.25 - 1))  # ½(log σ²₂/σ²₁ + σ²₁/σ²₂ + Δμ²/σ²₂ − 1)


# ----------------------------------------------------------------------------------------------------------------
# Respacing
# ----------------------------------------------------------------------------------------------------------------

def test_space_timesteps_counts():
    ddim = space_timesteps(1000, "ddim50")
    assert len(ddim) == 50 and ddim[0] == 0 and set(np.diff(ddim)) == {20}
    even = space_timesteps(1000, "250")
    assert len(set(even)) == 250 and even[0] == 0 and even[-1] == 999 and even == space_timesteps(1000, 250)
    assert even[62] == 249  # 62 · 999/249 = 248.75, rounded to nearest as IDDPM does (DiT's "250" sampling steps)
    sections = space_timesteps(1000, "10,15,20")
    assert len(set(sections)) == 45 and sections == space_timesteps(1000, [10, 15, 20])
    # Sections are [0, 333], [334, 666], [667, 999]; each keeps its endpoints.
    assert sections[:10][0] == 0 and sections[:10][-1] == 333
    assert sections[10:25][0] == 334 and sections[10:25][-1] == 666 and sections[25:][-1] == 999
    assert space_timesteps(1000, "1000") == list(range(1000))


def iddpm_section(size, count):
    """IDDPM's own loop for one section (improved-diffusion respace.py): a float position advanced by the stride."""
    stride, position, kept = (size - 1) / (count - 1) if count > 1 else 1, 0.0, []
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return kept


def test_iddpm_section_rounding_is_iddpms_for_every_count():
    naive_differs = []
    for count in range(1, 1001):
        assert space_timesteps(1000, str(count)) == iddpm_section(1000, count)
        stride = 999 / (count - 1) if count > 1 else 1
        if iddpm_section(1000, count) != [round(j * stride) for j in range(count)]:
            naive_differs.append(count)
    # round(j·stride), what this file did before, is not IDDPM's rounding for 278 counts.
    assert len(naive_differs) == 278 and {21, 45, 111} <= set(naive_differs)
    assert space_timesteps(1000, "10,15,20") == (iddpm_section(334, 10) + [334 + t for t in iddpm_section(333, 15)]
                                                 + [667 + t for t in iddpm_section(333, 20)])


def test_linspace_and_leading_are_iddpms_spacings_at_the_usual_counts_only():
    """docs/sampling.md: `linspace` is IDDPM's str(N) and `leading` its ddimN for the usual counts; linspace differs
    at the 278 tie counts, leading wherever N does not divide T (ddimN's own stride, or no such stride at all)."""
    usual = (5, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500, 1000)
    linspace_differs, leading_differs = [], []
    for n in range(1, 1001):
        if sorted(timestep_spacing(n, 1000, "linspace")) != space_timesteps(1000, str(n)):
            linspace_differs.append(n)
        try:
            ddim = space_timesteps(1000, f"ddim{n}")
        except ValueError:  # no stride gives exactly n steps
            ddim = None
        if sorted(timestep_spacing(n, 1000, "leading")) != ddim:
            leading_differs.append(n)
    assert len(linspace_differs) == 278 and {21, 23, 31} <= set(linspace_differs)
    assert set(leading_differs) == {n for n in range(1, 1001) if 1000 % n}
    assert not set(usual) & (set(linspace_differs) | set(leading_differs))
    assert timestep_spacing(30, 1000, "leading")[0] == 957 and max(space_timesteps(1000, "ddim30")) == 986
    assert 500 in timestep_spacing(21, 1000, "linspace") and 499 in space_timesteps(1000, "21")


@pytest.mark.parametrize("T", [1000, 500])
def test_default_spacing_starts_at_the_last_training_timestep(T):
    for n in (1, 3, 5, 7, 8, 10, 13, 20, 50, 250, 1000):
        if n > T:
            continue
        steps = timestep_spacing(n, T)
        assert steps[0] == T - 1 and len(set(steps)) == n and min(steps) >= 0 and steps == sorted(steps)[::-1]
        diffusion = create_diffusion(f"trailing{n}", diffusion_steps=T, learn_sigma=False)
        assert diffusion.timestep_map[-1] == T - 1 and len(diffusion.timestep_map) == n
    # What the old default ("ddimN", IDDPM's leading stride) did: start well inside the chain at few steps.
    assert [timestep_spacing(n, 1000, "leading")[0] for n in (20, 10, 8, 5)] == [950, 900, 875, 800]
    with pytest.raises(ValueError, match="cannot take 1001 sampling steps from 1000"):
        timestep_spacing(1001, 1000)
    with pytest.raises(ValueError, match="unknown timestep spacing 'even'"):
        timestep_spacing(10, 1000, "even")


@pytest.mark.parametrize("spacing", TIMESTEP_SPACINGS)
@pytest.mark.parametrize("T", [1000, 500])
def test_spacings_equal_diffusers_ddim_scheduler(spacing, T):
    from diffusers import DDIMScheduler
    scheduler = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    for n in range(1, T + 1):
        scheduler.set_timesteps(n)
        theirs = scheduler.timesteps.tolist()
        if spacing == "trailing" and len(theirs) == n + 1:  # diffusers' float np.arange overshoots for some n
            assert theirs[-1] == -1
            theirs = theirs[:n]
        assert timestep_spacing(n, T, spacing) == theirs, n


@pytest.mark.parametrize("spacing,steps", [("trailing", 10), ("trailing", 20), ("leading", 10), ("linspace", 1),
                                           ("trailing", 1), ("leading", 25)])
def test_ddim_sampling_equals_diffusers_scheduler(spacing, steps):
    """Our DDIM over `spacing` with the exact ε-model of Gaussian data equals diffusers' DDIMScheduler driven by the
    same model (where diffusers' own previous-timestep rule, t - T // N, is the next timestep of the list)."""
    from diffusers import DDIMScheduler
    base = get_named_beta_schedule("linear", 1000)
    model = gaussian_data_model(np.cumprod(1 - base), MU, S)
    noise = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = create_diffusion(f"{spacing}{steps}", learn_sigma=False).ddim_sample_loop(
        model, noise.shape, noise=noise, clip_denoised=False)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              timestep_spacing=spacing, clip_sample=False, set_alpha_to_one=True)
    scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1 - base))  # the same float64 ᾱ as ours
    scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, torch.full((4,), int(t))), int(t), x, eta=0.0).prev_sample
    assert torch.allclose(ours, x, rtol=1e-5, atol=1e-5 * x.abs().max().item())


@pytest.mark.parametrize("spec", ["abc", "ddim", "ddimx", "ddim999", "ddim0", "0", "1001", "10,,5", "5,0", [],
                                  "trailing0", "trailing1001", "leadingx"])
def test_space_timesteps_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        space_timesteps(1000, spec)


def test_spaced_diffusion_keeps_base_alphas_cumprod_exactly():
    base = make_diffusion()
    spaced = create_diffusion("ddim50", learn_sigma=False)
    assert spaced.num_timesteps == 50 and list(spaced.timestep_map) == list(range(0, 1000, 20))
    assert np.array_equal(spaced.alphas_cumprod, base.alphas_cumprod[spaced.timestep_map])
    np.testing.assert_allclose(np.cumprod(1 - spaced.betas), spaced.alphas_cumprod, rtol=1e-12)
    assert list(base.timestep_map) == list(range(1000))
    with pytest.raises(ValueError):
        SpacedDiffusion([], betas=base.betas, model_mean_type="epsilon", model_var_type="fixed_small",
                        loss_type="mse")
    with pytest.raises(ValueError):
        SpacedDiffusion([5, 1000], betas=base.betas, model_mean_type="epsilon", model_var_type="fixed_small",
                        loss_type="mse")


def test_model_sees_original_timesteps():
    seen = []

    def recorder(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],) and (t == t[0]).all()
        seen.append(int(t[0]))
        return torch.zeros_like(x)

    diffusion = create_diffusion("ddim50", learn_sigma=False)
    diffusion.ddim_sample_loop(recorder, (3, 2, 4, 4))
    assert seen == list(range(980, -1, -20))
    seen.clear()
    diffusion.p_sample_loop(recorder, (3, 2, 4, 4))
    assert seen == list(range(980, -1, -20))
    seen.clear()
    diffusion.ddim_reverse_sample_loop(recorder, torch.zeros(3, 2, 4, 4))
    assert seen == list(range(0, 1000, 20))
    seen.clear()
    diffusion.training_losses(recorder, torch.zeros(3, 2, 4, 4), torch.full((3,), 7, dtype=torch.long))
    assert seen == [140]


# ----------------------------------------------------------------------------------------------------------------
# Samplers, with the exact denoiser for Gaussian data
# ----------------------------------------------------------------------------------------------------------------

MU, S = 0.5, 1.0


def test_ddim_inversion_round_trip():
    """DDIM inversion evaluates ε at x_{t-1} instead of x_t: error small and first order (halves as steps double)."""
    torch.manual_seed(0)
    base = get_named_beta_schedule("linear", 1000)
    model = gaussian_data_model(np.cumprod(1 - base), MU, S)
    x_start = MU + S * torch.randn(64, 2, 4, 4, dtype=torch.float64)
    errors = {}
    for spec in ["ddim50", "ddim100"]:
        diffusion = create_diffusion(spec, learn_sigma=False)
        x_end = diffusion.ddim_reverse_sample_loop(model, x_start)
        assert x_end.std().item() == pytest.approx(1.0, abs=0.05)  # the latent looks like N(0, I)
        x_back = diffusion.ddim_sample_loop(model, x_start.shape, noise=x_end, clip_denoised=False)
        errors[spec] = (x_back - x_start).abs().max().item()
    assert errors["ddim100"] < 0.025
    assert 1.7 < errors["ddim50"] / errors["ddim100"] < 2.3


def exact_sample_moments(alphas_cumprod, timesteps, mu, s, variance):
    """Mean and std of DDPM / DDIM(η = 1) samples of N(mu, s²) data with the exact denoiser, by the linear-Gaussian
    recursion: x̂_0 = mu + A(x_t − √ᾱ mu), x_prev = c1 x̂_0 + c2 x_t + σ z, so Var_prev = (c1 A + c2)² Var_t + σ².
    variance: "small" (σ² = β̃) or "large" (σ² = β), with β = 1 − ᾱ_t/ᾱ_prev between visited timesteps."""
    a = alphas_cumprod[sorted(timesteps)]
    mean, var = 0.0, 1.0
    for k in range(len(a) - 1, -1, -1):
        a_t, a_prev = a[k], (a[k - 1] if k > 0 else 1.0)
        beta = 1 - a_t / a_prev
        c1, c2 = math.sqrt(a_prev) * beta / (1 - a_t), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
        gain = math.sqrt(a_t) * s ** 2 / (a_t * s ** 2 + 1 - a_t)
        noise = 0.0 if k == 0 else (beta * (1 - a_prev) / (1 - a_t) if variance == "small" else beta)
        mean = c1 * (mu - gain * math.sqrt(a_t) * mu) + (c1 * gain + c2) * mean
        var = (c1 * gain + c2) ** 2 * var + noise
    return mean, math.sqrt(var)


@pytest.mark.parametrize("var_type", [ModelVarType.FIXED_SMALL, ModelVarType.FIXED_LARGE])
def test_ddpm_sampling_reproduces_data_moments(var_type):
    """1000 steps: both variances give the data's moments (their exact stds, 0.9955 and 0.9999, are too close to tell
    apart by sampling)."""
    torch.manual_seed(0)
    diffusion = make_diffusion(var_type=var_type)
    model = gaussian_data_model(diffusion.alphas_cumprod, MU, S)
    x = diffusion.p_sample_loop(model, (2000, 1, 4, 4), clip_denoised=False)
    assert x.mean().item() == pytest.approx(MU, abs=0.02)
    assert x.std().item() == pytest.approx(S, abs=0.02)


@pytest.mark.parametrize("spec", ["10", "trailing10"])
def test_few_step_ddpm_and_eta_one_ddim_match_the_exact_recursion(spec):
    """At 10 steps the two variances give clearly different samples (std 0.72 vs 1.00 with IDDPM's "10"); each
    sampler must give its own exact value, and DDIM with η = 1 must be DDPM with σ² = β̃."""
    base = np.cumprod(1 - get_named_beta_schedule("linear", 1000))
    timesteps = space_timesteps(1000, spec)
    model = gaussian_data_model(base, MU, S)
    runs = {}
    for var_type in ("fixed_small", "fixed_large"):
        torch.manual_seed(0)
        diffusion = SpacedDiffusion(timesteps, betas=get_named_beta_schedule("linear", 1000), model_mean_type="epsilon",
                                    model_var_type=var_type, loss_type="mse")
        runs[var_type] = diffusion.p_sample_loop(model, (4000, 1, 4, 4), clip_denoised=False)
    torch.manual_seed(1)
    runs["ddim_eta1"] = diffusion.ddim_sample_loop(model, (4000, 1, 4, 4), clip_denoised=False, eta=1.0)
    expected = {"fixed_small": exact_sample_moments(base, timesteps, MU, S, "small"),
                "fixed_large": exact_sample_moments(base, timesteps, MU, S, "large")}
    expected["ddim_eta1"] = expected["fixed_small"]
    assert expected["fixed_large"][1] - expected["fixed_small"][1] > 0.2
    for name, x in runs.items():
        assert x.mean().item() == pytest.approx(expected[name][0], abs=0.01), name
        assert x.std().item() == pytest.approx(expected[name][1], abs=0.01), name


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_eta_one_ddim_step_is_finite_at_the_first_trailing_step(schedule):
    """DDIM with η = 1 from t = 999 (trailing spacing): for the cosine schedule ᾱ_999 ≈ 4e-9, so 1 - ᾱ_prev - σ² is
    ~1e-9 and rounds below 0 in float32 (the step was NaN); the step's mean must match the float64 formula."""
    base = np.cumprod(1 - get_named_beta_schedule(schedule, 1000))
    diffusion = SpacedDiffusion(space_timesteps(1000, "trailing5"), betas=get_named_beta_schedule(schedule, 1000),
                                model_mean_type=ModelMeanType.VELOCITY, model_var_type="fixed_small", loss_type="mse")
    model = gaussian_data_model(base, MU, S, ModelMeanType.VELOCITY)
    x = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.full((64,), diffusion.num_timesteps - 1)
    sampled = diffusion.ddim_sample(model, x, t, clip_denoised=False, eta=1.0)
    assert torch.isfinite(sampled["sample"]).all()
    a, a_prev = diffusion.alphas_cumprod[-1], diffusion.alphas_cumprod_prev[-1]
    sigma = np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x0 = sampled["pred_xstart"].double()
    eps = (x.double() - np.sqrt(a) * x0) / np.sqrt(1 - a)
    expected = np.sqrt(a_prev) * x0 + np.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
    torch.manual_seed(0)
    again = diffusion.ddim_sample(model, x, t, clip_denoised=False, eta=1.0)["sample"]
    torch.manual_seed(0)
    noise = torch.randn_like(x)
    torch.testing.assert_close(again.double(), expected + sigma * noise.double(), rtol=2e-3, atol=2e-3)


def test_eta_one_sigma_is_the_posterior_standard_deviation():
    """σ_i(η = 1)² of the parallel sampler's coefficients equals the (spaced) posterior variance β̃ at every step."""
    from diffusion.parallel import _coefficients
    diffusion = create_diffusion("trailing25", learn_sigma=False)
    sqrt_prev, _, _, s = _coefficients(diffusion, 0, 24, 1.0, torch.zeros(1))
    sigma = (s * sqrt_prev).view(-1).numpy()
    expected = diffusion.posterior_variance[::-1][:24]  # chain positions 0..23 are diffusion indices 24..1
    np.testing.assert_allclose(sigma ** 2, expected, rtol=1e-10)


def test_mean_types_give_the_same_samples():
    torch.manual_seed(0)
    base = np.cumprod(1 - get_named_beta_schedule("linear", 1000))
    noise = torch.randn(16, 2, 4, 4, dtype=torch.float64)
    samples = {}
    for mean_type in ModelMeanType:
        diffusion = SpacedDiffusion(space_timesteps(1000, "ddim50"), betas=get_named_beta_schedule("linear", 1000),
                                    model_mean_type=mean_type, model_var_type="fixed_small", loss_type="mse")
        model = gaussian_data_model(base, MU, S, mean_type)
        samples[mean_type] = diffusion.ddim_sample_loop(model, noise.shape, noise=noise, clip_denoised=False)
    torch.testing.assert_close(samples[ModelMeanType.START_X], samples[ModelMeanType.EPSILON], rtol=0, atol=1e-9)
    torch.testing.assert_close(samples[ModelMeanType.VELOCITY], samples[ModelMeanType.EPSILON], rtol=0, atol=1e-9)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_zero_terminal_snr_v_prediction_samples_data(sampler):
    torch.manual_seed(0)
    diffusion = create_diffusion("100", learn_sigma=False, sigma_small=True, predict_v=True,
                                 zero_terminal_snr=True)
    base = np.cumprod(1 - rescale_zero_terminal_snr(get_named_beta_schedule("linear", 1000)))
    model = gaussian_data_model(base, MU, S, ModelMeanType.VELOCITY)
    loop = diffusion.ddim_sample_loop if sampler == "ddim" else diffusion.p_sample_loop
    x = loop(model, (2000, 1, 4, 4), clip_denoised=False)
    assert torch.isfinite(x).all()
    assert x.mean().item() == pytest.approx(MU, abs=0.03) and x.std().item() == pytest.approx(S, abs=0.05)


def test_callbacks_and_progress(capsys):
    diffusion = create_diffusion("10", learn_sigma=False)
    model = lambda x, t: torch.zeros_like(x)
    for run in [lambda cb: diffusion.p_sample_loop(model, (2, 1, 2, 2), callback=cb, progress=True),
                lambda cb: diffusion.ddim_sample_loop(model, (2, 1, 2, 2), eta=0.5, callback=cb, progress=True),
                lambda cb: diffusion.ddim_reverse_sample_loop(model, torch.zeros(2, 1, 2, 2), callback=cb)]:
        calls = []
        x = run(calls.append)
        assert [c["i"] for c in calls] == list(range(10))
        assert calls[-1]["x"] is x and calls[-1]["pred_xstart"].shape == x.shape and calls[0]["t"].shape == (2,)
    assert "10/10" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# Training losses and learned variance
# ----------------------------------------------------------------------------------------------------------------

def test_learned_range_variance_endpoints():
    diffusion = make_diffusion(var_type=ModelVarType.LEARNED_RANGE)
    x = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 400, 999])
    for value, expected in [(-1.0, diffusion.posterior_log_variance_clipped), (1.0, np.log(diffusion.betas))]:
        model = lambda x, t: torch.cat([torch.zeros_like(x), torch.full_like(x, value)], dim=1)
        out = diffusion.p_mean_variance(model, x, t)
        for row, index in enumerate(t.tolist()):
            assert torch.allclose(out["log_variance"][row], torch.tensor(expected[index], dtype=torch.float32))
    with pytest.raises(ValueError, match="2C"):
        diffusion.p_mean_variance(lambda x, t: x, x, t)


def gaussian_kl_bits(mean1, var1, mean2, var2):
    return (0.5 * (torch.log(var2 / var1) + var1 / var2 + (mean1 - mean2) ** 2 / var2 - 1)).mean(dim=(1, 2, 3)) / math.log(2)


def test_hybrid_loss_vb_is_the_closed_form_kl_and_decoder_nll_in_bits():
    """vb written out by hand: the true posterior q(x_{t-1}|x_t,x_0) = N(c1 x_0 + c2 x_t, β̃) against
    p = N(c1 x̂_0 + c2 x_t, exp(f log β + (1 − f) log β̃)) with f = (v + 1)/2, in bits per dimension; at t = 0 the
    discretized Gaussian NLL of x_0 (bins of width 2/255, open edge bins); and the loss is mse + vb."""
    torch.manual_seed(0)
    diffusion = make_diffusion(var_type=ModelVarType.LEARNED_RANGE)
    x_start = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.float64) / 127.5 - 1  # 8-bit data, edges included
    x_start[0, 0, 0, :2] = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    t, noise = torch.tensor([0, 1, 10, 200, 700, 999]), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    output = torch.cat([torch.randn(6, 3, 4, 4, dtype=torch.float64) * 0.5,
                        torch.rand(6, 3, 4, 4, dtype=torch.float64) * 2 - 1], dim=1)
    terms = diffusion.training_losses(lambda x, t: output, x_start, t, noise=noise)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])

    table = lambda values: torch.from_numpy(np.asarray(values))[t].view(-1, 1, 1, 1)
    betas = torch.from_numpy(diffusion.betas)
    a = table(diffusion.alphas_cumprod)
    a_prev = table(np.append(1.0, diffusion.alphas_cumprod[:-1]))
    beta, tilde = table(diffusion.betas), table(np.append(diffusion.posterior_variance[1], diffusion.posterior_variance[1:]))
    x_t = a.sqrt() * x_start + (1 - a).sqrt() * noise
    c1, c2 = a_prev.sqrt() * beta / (1 - a), (1 - beta).sqrt() * (1 - a_prev) / (1 - a)
    eps, v = output.chunk(2, dim=1)
    x0_hat = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    frac = (v + 1) / 2
    var = torch.exp(frac * torch.log(beta) + (1 - frac) * torch.log(tilde))
    mean = c1 * x0_hat + c2 * x_t
    kl = gaussian_kl_bits(c1 * x_start + c2 * x_t, tilde, mean, var)
    torch.testing.assert_close(terms["vb"][1:], kl[1:], rtol=1e-6, atol=1e-9)

    normal = torch.distributions.Normal(mean[0], var[0].sqrt())
    upper = torch.where(x_start[0] > 0.999, torch.ones_like(mean[0]), normal.cdf(x_start[0] + 1 / 255))
    lower = torch.where(x_start[0] < -0.999, torch.zeros_like(mean[0]), normal.cdf(x_start[0] - 1 / 255))
    nll_bits = -torch.log(upper - lower).mean() / math.log(2)
    assert terms["vb"][0].item() == pytest.approx(nll_bits.item(), rel=2e-3)  # DDPM's tanh approximation of Φ
    assert betas[0] < tilde.max()

    # Exact ε and Σ = β̃ (v = −1): every KL term is zero.
    exact = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    zero = diffusion.training_losses(lambda x, t: exact, x_start, t, noise=noise)
    assert zero["vb"][1:].abs().max().item() < 1e-9 and zero["mse"].abs().max().item() < 1e-20


def test_vb_term_trains_only_the_variance():
    diffusion = create_diffusion("")
    output = torch.randn(4, 4, 4, 4, requires_grad=True)
    terms = diffusion.training_losses(lambda x, t: output, torch.rand(4, 2, 4, 4), torch.tensor([0, 5, 50, 500]))
    terms["vb"].sum().backward()
    assert (output.grad[:, :2] == 0).all() and (output.grad[:, 2:] != 0).any()


def test_exact_noise_prediction_has_zero_loss():
    diffusion = create_diffusion("", learn_sigma=False)
    noise = torch.randn(4, 3, 4, 4)
    terms = diffusion.training_losses(lambda x, t: noise, torch.rand(4, 3, 4, 4), torch.tensor([0, 3, 300, 999]),
                                      noise=noise)
    assert terms["loss"].abs().max().item() == 0.0 and "vb" not in terms


@pytest.mark.parametrize("mean_type", list(ModelMeanType))
def test_min_snr_loss_is_min_snr_gamma_times_the_x0_error(mean_type):
    """Min-SNR-γ [Hang et al. 2023]: for every target the weighted loss is min(SNR, γ)·‖x_0 − x̂_0‖² (per-dimension
    mean), x̂_0 recovered from the model output by hand."""
    gamma = 5.0
    torch.manual_seed(0)
    t = torch.tensor([0, 100, 300, 900])
    x_start, noise = torch.rand(4, 2, 4, 4, dtype=torch.float64), torch.randn(4, 2, 4, 4, dtype=torch.float64)
    output = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    diffusion = make_diffusion(mean_type, min_snr_gamma=gamma)
    loss = diffusion.training_losses(lambda x, t: output, x_start, t, noise=noise)["loss"]
    a = torch.from_numpy(diffusion.alphas_cumprod)[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x_start + (1 - a).sqrt() * noise
    x0_hat = {ModelMeanType.EPSILON: (x_t - (1 - a).sqrt() * output) / a.sqrt(),
              ModelMeanType.START_X: output,
              ModelMeanType.VELOCITY: a.sqrt() * x_t - (1 - a).sqrt() * output}[mean_type]
    snr = (a / (1 - a)).view(-1)
    expected = torch.clamp(snr, max=gamma) * ((x_start - x0_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
    assert (snr > gamma).any() and (snr < gamma).any()  # both branches of the min are exercised


def test_rescaled_mse_and_kl_loss_scaling():
    torch.manual_seed(0)
    x_start, noise = torch.rand(3, 2, 4, 4) * 2 - 1, torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 20, 90])
    output = torch.randn(3, 4, 4, 4) * 0.3
    terms = {}
    for loss_type in LossType:
        diffusion = SpacedDiffusion(space_timesteps(1000, 100), betas=get_named_beta_schedule("linear", 1000),
                                    model_mean_type="epsilon", model_var_type="learned_range", loss_type=loss_type)
        terms[loss_type] = diffusion.training_losses(lambda x, t: output, x_start, t, noise=noise)
    # With 100 steps, λ = 0.001 · L_vlb ≈ 0.001 · 100 · L_t.
    torch.testing.assert_close(terms[LossType.RESCALED_MSE]["vb"], 0.1 * terms[LossType.MSE]["vb"])
    torch.testing.assert_close(terms[LossType.KL]["loss"], 100 * terms[LossType.MSE]["vb"])


def test_schedule_tables_reach_the_device_once(monkeypatch):
    """Every schedule table is converted (and on a GPU copied) once per device and dtype, not at every lookup: a
    second training loss and a whole second DDIM loop make no torch.from_numpy calls."""
    diffusion = create_diffusion("trailing10", learn_sigma=True)
    model = lambda x, t, **kwargs: torch.cat([torch.zeros_like(x), torch.zeros_like(x)], 1)  # noqa: E731
    x = torch.randn(2, 3, 4, 4)
    t = torch.tensor([1, 7])
    diffusion.training_losses(model, x, t)
    diffusion.ddim_sample_loop(model, x.shape, noise=x)
    calls = []
    real = torch.from_numpy
    monkeypatch.setattr(torch, "from_numpy", lambda a: calls.append(a.shape) or real(a))
    diffusion.training_losses(model, x, t)
    diffusion.ddim_sample_loop(model, x.shape, noise=x)
    assert calls == []
