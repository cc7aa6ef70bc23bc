"""Few-step samplers (sampling.SAMPLERS): diffusers' solvers driven over our diffusion, checked against our DDIM,
against diffusers driving itself, and for their order of convergence on Gaussian data, whose exact denoiser and
exact probability-flow solution are known in closed form; FPDM budgets over model calls; the guidance interval."""

import math

import numpy as np
import pytest
import torch

from diffusion import ModelMeanType, create_diffusion
from fpdm.sampling import SAMPLERS, GuidedModel, diffusers_scheduler, model_calls, run_scheduler, sample_images

MU, S = 0.4, 0.3  # data: x0 ~ N(MU, S^2) in every coordinate
STEPS = (10, 20, 40)


class GaussianDenoiser:
    """The exact model of N(MU, S²) data for the base process `betas`: E[x0 | x_t] is linear in x_t, and the model
    returns what `mean_type` asks for (ε, v or x0), optionally with zero "learned sigma" channels appended."""

    def __init__(self, betas, mean_type=ModelMeanType.EPSILON, learned_sigma=False):
        self.abar = torch.tensor(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)))
        self.mean_type, self.learned_sigma, self.calls = mean_type, learned_sigma, 0

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        abar = self.abar[t.long()].to(x.dtype).view(-1, *[1] * (x.ndim - 1))
        x0 = MU + abar.sqrt() * S ** 2 / (abar * S ** 2 + 1 - abar) * (x - abar.sqrt() * MU)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        out = {ModelMeanType.EPSILON: eps, ModelMeanType.START_X: x0,
               ModelMeanType.VELOCITY: abar.sqrt() * eps - (1 - abar).sqrt() * x0}[self.mean_type]
        return torch.cat([out, torch.zeros_like(out)], 1) if self.learned_sigma else out


def exact_solution(x_T, abar_T):
    """The probability-flow ODE of Gaussian data keeps z = (x_t - √ᾱ μ) / √(ᾱ S² + 1 - ᾱ) constant: x_0 = μ + S·z."""
    return MU + S * (x_T - math.sqrt(abar_T) * MU) / math.sqrt(abar_T * S ** 2 + 1 - abar_T)


def noise(seed=0):
    return torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("predict_v", [False, True])
def test_diffusers_ddim_through_the_adapter_equals_our_ddim(predict_v):
    diffusion = create_diffusion("trailing10", learn_sigma=True, predict_v=predict_v)
    model = GaussianDenoiser(diffusion.base_betas, diffusion.model_mean_type, learned_sigma=True)
    x = noise().float()
    ours = diffusion.ddim_sample_loop(model, x.shape, noise=x, clip_denoised=False)
    scheduler = diffusers_scheduler(diffusion, "DDIMScheduler", set_alpha_to_one=True, clip_sample=False)
    theirs = run_scheduler(scheduler, model, x, {})
    assert (theirs - ours).abs().max() <= 1e-5 * ours.abs().max()


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc", "euler", "heun"])
def test_adapter_equals_diffusers_driving_itself(name):
    """The same scheduler, configured by hand and stepped by diffusers' own documented loop, gives the same x0."""
    import diffusers
    diffusion = create_diffusion("trailing8", learn_sigma=False)
    model = GaussianDenoiser(diffusion.base_betas)
    x = noise().float()
    ours, fn = sample_images_with(name, diffusion, model, x)
    class_name = {"dpmpp-2m": "DPMSolverMultistepScheduler", "unipc": "UniPCMultistepScheduler",
                  "euler": "EulerDiscreteScheduler", "heun": "HeunDiscreteScheduler"}[name]
    config = {"dpmpp-2m": dict(algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"),
              "unipc": dict(solver_order=2, predict_x0=True, solver_type="bh2", final_sigmas_type="zero"),
              "euler": dict(final_sigmas_type="zero"), "heun": {}}[name]
    scheduler = getattr(diffusers, class_name)(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4,
                                               beta_end=0.02, timestep_spacing="trailing", **config)
    scheduler.set_timesteps(8)
    sample = x * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(sample, t), torch.full((len(x),), int(t)))
        sample = scheduler.step(eps, t, sample).prev_sample
    torch.testing.assert_close(ours, sample, atol=2e-5, rtol=1e-4)
    assert fn.calls == len(scheduler.timesteps) == model_calls(name, diffusion) == (15 if name == "heun" else 8)


def sample_images_with(name, diffusion, model, x):
    fn = GuidedModel(_Net(model))
    out, _ = SAMPLERS[name](fn, diffusion, x, model_kwargs={"y": torch.zeros(len(x), dtype=torch.long)})
    return out, fn


class _Net(torch.nn.Module):
    """A model callable dressed as a DiT for GuidedModel (no FPDM, one block, no guidance)."""
    fixed_point, num_classes, in_channels = False, 1, 1

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t, y):
        return self.fn(x, t)

    def block_evaluations(self, k=None):
        return 1

    def forward_flops(self, k=None):
        return 1.0

    def block_flops(self):
        return 1.0


@pytest.mark.parametrize("name,order", [("ddim", 1), ("euler", 1), ("dpmpp-2m", 2), ("unipc", 2), ("heun", 2)])
def test_order_of_convergence_on_gaussian_data(name, order):
    """Error against the exact probability-flow solution when the steps double (the first timestep, t = 999, is the
    same for every N). Measured ratios 10->20->40 steps: DDIM 1.9, 2.0; Euler 1.8, 1.9; DPM-Solver++(2M) 2.6, 4.5;
    UniPC 2.6, 4.3; Heun 2.7, 3.1 (at 10 steps the first steps, sigma 157 -> 1.3, are still coarse; beyond 40 the
    float32 arithmetic inside diffusers' schedulers sets a floor near 1e-3)."""
    errors = []
    for steps in STEPS:
        diffusion = create_diffusion(f"trailing{steps}", learn_sigma=False)
        model = GaussianDenoiser(diffusion.base_betas)
        x = noise()
        exact = exact_solution(x, float(model.abar[999]))
        if name == "ddim":
            out = diffusion.ddim_sample_loop(model, x.shape, noise=x, clip_denoised=False)
        else:
            out = run_scheduler(diffusers_scheduler(diffusion, SAMPLERS[name].scheduler_class,
                                                    **SAMPLERS[name].config), model, x, {})
        errors.append(float((out.double() - exact).abs().max()))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    if order == 1:
        assert all(1.6 < r < 2.3 for r in ratios), (errors, ratios)
    else:
        assert ratios[-1] > 3.0 and ratios[0] > 2.3, (errors, ratios)
        assert errors[-1] < 0.35 * ddim_error_at_40()


def ddim_error_at_40():
    diffusion = create_diffusion("trailing40", learn_sigma=False)
    model = GaussianDenoiser(diffusion.base_betas)
    x = noise()
    out = diffusion.ddim_sample_loop(model, x.shape, noise=x, clip_denoised=False)
    return float((out.double() - exact_solution(x, float(model.abar[999]))).abs().max())


# ------------------------------------------------------------------------------------------------------------------
# FPDM budgets over model calls, guidance interval and schedule (a tiny FPDM; every sampler)
# ------------------------------------------------------------------------------------------------------------------

def tiny_fpdm():
    from test_sampling import tiny_fpdm as make
    return make()


def fpdm_sample(sampler, steps=6, budget=None, **kwargs):
    from fpdm.sampling import diffusion_for_sampling, iterations_from_block_budget
    from test_sampling import TRAIN_CONFIG
    model = tiny_fpdm()
    diffusion = diffusion_for_sampling(TRAIN_CONFIG, steps)
    iterations = None
    if budget is not None:
        iterations = iterations_from_block_budget(model, budget, model_calls(sampler, diffusion), "more-noisy")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 1, 8, 8, generator=g)
    return sample_images(model, diffusion, noise, torch.tensor([1, 2, 3]), sampler=sampler,
                         iterations_per_step=iterations, clip_denoised=False, **kwargs)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m", "unipc", "euler", "heun"])
def test_block_budget_is_spent_exactly_over_model_calls(sampler):
    """A budget in block evaluations is spread over the sampler's model calls (Heun: 2 per step but the last) and
    spent exactly, with reuse on; every sampler gives finite images of the right shape."""
    samples, fn = fpdm_sample(sampler, budget=70, reuse=True, cfg_scale=2.0)
    report = fn.compute()
    assert report["block_evals"] == 70 and report["model_calls"] == (11 if sampler == "heun" else 6)
    assert report["model_passes"] == 2 * report["model_calls"] and torch.isfinite(samples).all()
    assert samples.shape == (3, 1, 8, 8)


def test_guidance_interval_runs_one_branch_outside_it():
    """Trailing 6 steps visit t = 999, 832, 666, 499, 332, 166: an interval [300, 700] guides 3 calls (two branches
    each) and runs the other 3 on the conditional half only; inside the interval the output equals full guidance."""
    full, fn_full = fpdm_sample("ddim", cfg_scale=3.0, reuse=True)
    interval, fn = fpdm_sample("ddim", cfg_scale=3.0, reuse=True, guidance_interval=(300, 700))
    assert fn.passes == [1, 1, 2, 2, 2, 1] and fn.compute()["model_passes"] == 9
    assert fn_full.compute()["flops_per_image"] / fn.compute()["flops_per_image"] == pytest.approx(12 / 9)
    nowhere, fn_none = fpdm_sample("ddim", cfg_scale=3.0, guidance_interval=(1000, 1000))
    unguided, _ = fpdm_sample("ddim", cfg_scale=1.0)
    torch.testing.assert_close(nowhere, unguided, atol=1e-5, rtol=1e-5)  # never guided: the conditional model
    assert not torch.allclose(interval, full) and not torch.allclose(interval, unguided)
    everywhere, _ = fpdm_sample("ddim", cfg_scale=3.0, reuse=True, guidance_interval=(0, 999))
    torch.testing.assert_close(everywhere, full, atol=0, rtol=0)


def test_linear_guidance_schedule_scales_with_t():
    from fpdm.sampling import GuidedModel
    fn = GuidedModel(tiny_fpdm(), cfg_scale=5.0, guidance_schedule="linear", num_train_timesteps=1000)
    assert fn.guidance_scale(1000) == 1.0 and fn.guidance_scale(0) == 5.0 and fn.guidance_scale(500) == 3.0
    constant, _ = fpdm_sample("ddim", cfg_scale=3.0)
    linear, _ = fpdm_sample("ddim", cfg_scale=3.0, guidance_schedule="linear")
    assert not torch.allclose(constant, linear)
    with pytest.raises(ValueError, match="unknown guidance schedule"):
        GuidedModel(tiny_fpdm(), cfg_scale=2.0, guidance_schedule="cosine")
