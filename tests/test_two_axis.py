"""Two-axis sampling (fpdm/two_axis.py): one fixed point over the DDIM chain and FPDM's layer together.

The reference is sequential DDIM (clip_denoised=False) with a converged layer at every step: 60 iterations of a
layer made a contraction (test_sampling.tiny_fpdm), from the injection, no reuse."""

import pytest
import torch

from fpdm.sampling import GuidedModel, diffusion_for_sampling, sample_images
from fpdm.two_axis import two_axis_sample
from test_sampling import TRAIN_CONFIG, tiny_fpdm

STEPS = 8


@pytest.fixture(scope="module")
def setup():
    net = tiny_fpdm(class_dropout_prob=0.1)
    diffusion = diffusion_for_sampling(TRAIN_CONFIG, STEPS)
    g = torch.Generator().manual_seed(3)
    return net, diffusion, torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 4, 7])


def doubled(x, y, cfg_scale):
    if cfg_scale == 1.0:
        return x, y
    return torch.cat([x, x]), torch.cat([y, torch.full_like(y, 10)])


def converged_sequential(net, diffusion, x, y, cfg_scale=1.0, eta=0.0):
    model = GuidedModel(net, cfg_scale, iterations_per_step=60)
    xd, yd = doubled(x, y, cfg_scale)
    out = diffusion.ddim_sample_loop(model, xd.shape, noise=xd, clip_denoised=False, model_kwargs={"y": yd}, eta=eta)
    return out[:len(x)]


def two_axis(net, diffusion, x, y, k, cfg_scale=1.0, **options):
    model = GuidedModel(net, cfg_scale, iterations_per_step=k)
    xd, yd = doubled(x, y, cfg_scale)
    out, result, stats = two_axis_sample(model, diffusion, xd, model_kwargs={"y": yd}, return_result=True,
                                         **options)
    return out[:len(x)], stats


@pytest.mark.parametrize("k,cfg_scale,solver", [(30, 1.0, "picard"), (30, 2.0, "anderson"), (1, 1.0, "picard"),
                                                (1, 2.0, "anderson"), (2, 2.0, "anderson")])
def test_converges_to_sequential_ddim_with_a_converged_layer(setup, k, cfg_scale, solver):
    """With many inner iterations it is DEQ-DDIM over a converged layer; with k = 1 the layer converges over the
    outer iterations instead, to the same fixed point."""
    net, diffusion, x, y = setup
    reference = converged_sequential(net, diffusion, x, y, cfg_scale)
    out, stats = two_axis(net, diffusion, x, y, k, cfg_scale, solver=solver, max_iter=200, tol=1e-6)
    assert stats["converged"], stats["residual"]
    assert (out - reference).abs().max() <= 1e-4
    # a layer left unconverged (k iterations from the injection at every step, no warm start) is another sampler
    if k <= 2:
        plain = GuidedModel(net, cfg_scale, iterations_per_step=k)
        xd, yd = doubled(x, y, cfg_scale)
        unconverged = diffusion.ddim_sample_loop(plain, xd.shape, noise=xd, clip_denoised=False,
                                                 model_kwargs={"y": yd})[:len(x)]
        assert (unconverged - reference).abs().max() > 1e-3


@pytest.mark.parametrize("solver", ["picard", "anderson"])
def test_returns_what_parallel_ddim_returns(setup, solver):
    """As parallel DDIM: Picard gives h(X) of its best iterate X (evaluated already), Anderson X itself."""
    net, diffusion, x, y = setup
    out, result, _ = two_axis_sample(GuidedModel(net, iterations_per_step=1), diffusion, x, model_kwargs={"y": y},
                                     solver=solver, max_iter=3, tol=0.0, return_result=True)
    assert torch.equal(out, (result.fx if solver == "picard" else result.x)[-1])
    assert not torch.equal(result.fx[-1], result.x[-1])


def test_chunking_reaches_the_same_point(setup):
    net, diffusion, x, y = setup
    reference = converged_sequential(net, diffusion, x, y, 2.0)
    out, stats = two_axis(net, diffusion, x, y, 1, 2.0, max_iter=200, tol=1e-6, chunk_size=3)
    assert stats["converged"] and (out - reference).abs().max() <= 1e-4


def test_stochastic_with_presampled_noise(setup):
    """η > 0: the noise of every step drawn after x_T, as the sequential sampler draws it, gives its result."""
    net, diffusion, x, y = setup
    torch.manual_seed(11)
    reference = converged_sequential(net, diffusion, x, y, 1.0, eta=1.0)
    torch.manual_seed(11)
    out, stats = two_axis(net, diffusion, x, y, 1, 1.0, eta=1.0, max_iter=200, tol=1e-6)
    assert (out - reference).abs().max() <= 1e-4
    assert (reference - converged_sequential(net, diffusion, x, y, 1.0)).abs().max() > 1e-2


def test_block_evaluations_and_critical_path_are_counted_exactly(setup):
    """Picard with tol 0 runs exactly max_iter outer iterations: each evaluates all T' states of every image with
    pre + k + post blocks, and each is one dependent batched call (chunks of one iteration are independent)."""
    net, diffusion, x, y = setup
    per_call = len(net.blocks_pre) + 2 + len(net.blocks_post)
    for chunk in (None, 3):
        model = GuidedModel(net, 1.0, iterations_per_step=2)
        _, _, stats = two_axis_sample(model, diffusion, x, solver="picard", model_kwargs={"y": y}, max_iter=5,
                                      tol=0.0, chunk_size=chunk, return_result=True)
        assert stats["outer_iterations"] == stats["critical_path_calls"] == 5
        assert stats["network_evaluations_per_image"] == [5 * STEPS] * 3
        assert stats["block_evaluations"] == 5 * STEPS * per_call
        assert stats["critical_path_blocks"] == 5 * per_call
        calls = 5 * (1 if chunk is None else -(-STEPS // chunk))
        assert model.calls == calls and sum(model.block_evals) == calls * per_call  # the model's own accounting


def test_through_sample_images_and_refusals(setup):
    net, diffusion, x, y = setup
    reference = converged_sequential(net, diffusion, x, y, 2.0)
    out, fn = sample_images(net, diffusion, x, y, sampler="ddim-two-axis", cfg_scale=2.0, iterations_per_step=1,
                            solver_max_iter=200, solver_tol=1e-6)
    assert (out - reference).abs().max() <= 1e-4 and fn.info["critical_path_calls"] < 200
    from test_parallel import tiny_model
    with pytest.raises(ValueError, match="DiT"):
        two_axis_sample(GuidedModel(tiny_model()), diffusion, torch.randn(1, 4, 8, 8), model_kwargs={"y": y[:1]})
    with pytest.raises(ValueError, match="outer solver"):
        two_axis_sample(GuidedModel(net, iterations_per_step=1), diffusion, x, model_kwargs={"y": y}, solver="window")
    with pytest.raises(ValueError, match="reuse"):
        two_axis_sample(GuidedModel(net, iterations_per_step=1, reuse=True), diffusion, x, model_kwargs={"y": y})
