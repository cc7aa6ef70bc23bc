"""Parallel DDIM (diffusion/parallel.py), the fixed-point solvers (diffusion/solvers.py) and inversion (invert.py).

The reference is always the sequential sampler `ddim_sample_loop(..., clip_denoised=False)`. Tiny DiT/FPDM models
get all parameters perturbed (adaLN-Zero would make a fresh model output 0); they use v-prediction, whose samples
stay O(1) for a random network (ε-prediction gives |x_0| ~ 500, where float32 round-off alone exceeds 1e-4, so it
is checked in float64). Convergence-speed tests also use the exact denoiser for Gaussian data, whose dynamics are
those of a real model.
"""

import contextlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import invert
from diffusion import create_diffusion, get_named_beta_schedule
from diffusion.parallel import ddim_chain_map, parallel_ddim_sample
from diffusion.solvers import solve, solve_batched
from fpdm.checkpoints import TRAIN_FORMAT
from fpdm.sampling import GuidedModel, sample_images
from models import DiT


def tiny_model(fixed_point=False, in_channels=4, learn_sigma=True, seed=0):
    torch.manual_seed(seed)
    net = DiT(input_size=8, patch_size=2, in_channels=in_channels, hidden_size=32, depth=4, num_heads=4,
              num_classes=10, learn_sigma=learn_sigma, fixed_point=fixed_point)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return net.eval()


def guided(net, cfg_scale=1.0):
    return GuidedModel(net, cfg_scale, iterations_per_step=3 if net.fixed_point else None)


def inputs(cfg_scale=1.0, batch=2, channels=4, seed=1):
    """x_T and labels; with CFG the doubled batch that sampling.sample_images builds (second half: null class)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch, channels, 8, 8, generator=g), torch.arange(batch) + 1
    if cfg_scale != 1.0:
        x, y = torch.cat([x, x]), torch.cat([y, torch.full_like(y, 10)])
    return x, {"y": y}


def gaussian_denoiser(mu=0.3, s=0.5):
    """Exact ε for data N(mu, s² I) under the linear schedule, called with original timesteps."""
    table = torch.from_numpy(np.cumprod(1 - get_named_beta_schedule("linear", 1000)))

    def model(x, t, y=None):
        a = table.to(x.dtype)[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s ** 2 + 1 - a)
    return model


def sequential(model, diffusion, x, kwargs=None, eta=0.0):
    return diffusion.ddim_sample_loop(model, x.shape, noise=x, clip_denoised=False, model_kwargs=kwargs, eta=eta)


# ------------------------------------------------------------------------------------------------------------------
# Parallel == sequential
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps,fixed_point,cfg_scale", [
    (10, False, 1.0), (10, False, 4.0), (10, True, 1.0), (10, True, 4.0),  # T = 10 shows correctness
    (50, True, 4.0),                                                       # one long chain
], ids=["dit-nocfg", "dit-cfg", "fpdm-nocfg", "fpdm-cfg", "fpdm-cfg-50"])
def test_parallel_matches_sequential(steps, fixed_point, cfg_scale):
    model = guided(tiny_model(fixed_point), cfg_scale)
    diffusion = create_diffusion(f"trailing{steps}", predict_v=True)
    x, kwargs = inputs(cfg_scale)
    reference = sequential(model, diffusion, x, kwargs)
    picard = parallel_ddim_sample(model, diffusion, x, "picard", kwargs, max_iter=steps + 1, tol=1e-7)
    anderson = parallel_ddim_sample(model, diffusion, x, "anderson", kwargs, max_iter=2 * steps, tol=1e-5)
    assert (picard - reference).abs().max() <= 1e-4
    assert (anderson - reference).abs().max() <= 1e-4
    if cfg_scale != 1.0:  # guidance really acts, and both halves of the doubled batch stay identical
        unguided = sequential(guided(model.model), diffusion, x[:2], {"y": kwargs["y"][:2]})
        assert (reference[:2] - unguided).abs().max() > 1e-2
        assert torch.equal(picard[:2], picard[2:])


def test_parallel_ddim_with_a_linear_guidance_schedule_matches_sequential():
    """A linear guidance schedule scales each sample by its own timestep, on the device: parallel DDIM, whose calls
    hold every state of the chain, converges to the sequential sample with the same schedule."""
    net = tiny_model()
    model = GuidedModel(net, 4.0, guidance_schedule="linear")
    diffusion = create_diffusion("trailing10", predict_v=True)
    x, kwargs = inputs(4.0)
    reference = sequential(model, diffusion, x, kwargs)
    anderson = parallel_ddim_sample(model, diffusion, x, "anderson", kwargs, max_iter=20, tol=1e-5)
    assert (anderson - reference).abs().max() <= 1e-4
    assert (reference - sequential(guided(net, 4.0), diffusion, x, kwargs)).abs().max() > 1e-2  # the schedule acts


@pytest.mark.parametrize("case", ["epsilon_float64", "start_x", "zero_terminal_snr_v"])
def test_other_parameterisations_match_sequential(case):
    net = tiny_model()
    dtype = torch.float64 if case == "epsilon_float64" else torch.float32
    kwargs = {"epsilon_float64": {}, "start_x": {"predict_xstart": True},
              "zero_terminal_snr_v": {"predict_v": True, "zero_terminal_snr": True}}[case]
    diffusion = create_diffusion("10", **kwargs)  # "10" keeps t = 999, where ᾱ = 0 with zero terminal SNR
    assert (diffusion.alphas_cumprod[-1] == 0) == (case == "zero_terminal_snr_v")
    model = guided(net.to(dtype))
    x, model_kwargs = inputs()
    x = x.to(dtype)
    reference = sequential(model, diffusion, x, model_kwargs)
    sample = parallel_ddim_sample(model, diffusion, x, "picard", model_kwargs, max_iter=11, tol=1e-12)
    scale = reference.abs().max().item() if case == "epsilon_float64" else 1.0  # |x_0| ~ 500 here
    assert (sample - reference).abs().max() <= (1e-10 if dtype == torch.float64 else 1e-4) * scale


def test_picard_is_exact_after_T_iterations():
    """The chain is triangular: after k evaluations of h the first k states are exact, after T all are."""
    steps, model = 10, gaussian_denoiser()
    diffusion = create_diffusion(f"ddim{steps}", learn_sigma=False)
    x, _ = inputs(channels=1)
    trajectory = []
    diffusion.ddim_sample_loop(model, x.shape, noise=x, clip_denoised=False,
                               callback=lambda info: trajectory.append(info["x"]))
    trajectory = torch.stack(trajectory)
    iterates = []
    result = solve(lambda X: ddim_chain_map(model, diffusion, x, X), x.expand(steps, *x.shape).clone(), "picard",
                   max_iter=steps + 1, tol=0.0, callback=lambda info: iterates.append(info["x"]))
    for k, X in enumerate(iterates):
        assert k == 0 or (X[:k] - trajectory[:k]).abs().max() <= 1e-5
        if k < steps - 1:  # state k is not yet exact (the last step, onto x_0, barely depends on x_1)
            assert (X[k] - trajectory[k]).abs().max() > 1e-5
    assert result.residuals[steps - 2] > 1e-5 and result.residuals[steps] < 1e-6
    assert (result.x - trajectory).abs().max() <= 1e-5


@pytest.mark.parametrize("mixing", ["image", "state", "global"])
def test_picard_returns_h_of_the_best_iterate_exact_after_T_evaluations(mixing):
    """Picard's sampler returns h(X) of the best iterate X, which it evaluated already (its next iterate): T'
    evaluations give the sequential trajectory (X itself, the T'-th iterate, still has its last state one step behind).
    Anderson's returns X itself (h of an extrapolated iterate is not closer in general)."""
    steps, model = 8, guided(tiny_model())
    diffusion = create_diffusion(f"trailing{steps}", predict_v=True)
    x, kwargs = inputs()
    reference = sequential(model, diffusion, x, kwargs)
    sample, result, stats = parallel_ddim_sample(model, diffusion, x, "picard", kwargs, max_iter=steps, tol=0.0,
                                                 mixing=mixing, return_result=True)
    assert stats["network_evaluations"] == steps * steps
    error = (sample - reference).abs().max()
    assert error <= 1e-5
    assert (result.x[-1] - reference).abs().max() > 100 * error  # the iterate itself: not yet (1e-3 here)
    assert torch.equal(result.fx[-1], sample)
    anderson, result, _ = parallel_ddim_sample(model, diffusion, x, "anderson", kwargs, max_iter=3, tol=0.0,
                                               mixing=mixing, return_result=True)
    assert torch.equal(anderson, result.x[-1]) and not torch.equal(anderson, result.fx[-1])


@pytest.mark.parametrize("eta", [0.7, 1.0])
def test_stochastic_matches_sequential_with_same_noise(eta):
    model = guided(tiny_model())
    diffusion = create_diffusion("ddim10", predict_v=True)
    x, kwargs = inputs()
    torch.manual_seed(5)
    reference = sequential(model, diffusion, x, kwargs, eta=eta)  # draws z with randn_like, step by step
    torch.manual_seed(5)
    drawn = parallel_ddim_sample(model, diffusion, x, "picard", kwargs, eta=eta, max_iter=11, tol=1e-7)
    torch.manual_seed(5)
    noise_seq = torch.stack([torch.randn_like(x) for _ in range(10)])
    given = parallel_ddim_sample(model, diffusion, x, "anderson", kwargs, eta=eta, noise_seq=noise_seq,
                                 max_iter=30, tol=1e-5)
    assert (drawn - reference).abs().max() <= 1e-4
    assert (given - reference).abs().max() <= 1e-4
    assert (reference - sequential(model, diffusion, x, kwargs)).abs().max() > 1e-2  # the noise matters


@pytest.mark.parametrize("sampler", ["ddim-parallel", "ddim-two-axis"])
@pytest.mark.parametrize("eta,channels", [(1.0, None), (0.0, 3)])
def test_guided_parallel_sampling_matches_sequential_image_by_image(sampler, eta, channels):
    """Guidance, per-image solving (sample.py --parallel ... --cfg-scale 4, with --eta 1 or DiT's --guidance-channels
    3): each image equals sequential DDIM with the same seed and converges. The parallel samplers solve the images'
    chains alone, each call evaluating the null-class twins on their images' states. Solved as chains of their own,
    twins followed other trajectories (noise of their own; the unguided channel from the unconditional branch), left
    the batch at other iterations than their images, and the guided call then paired the wrong rows (errors of 0.07,
    chains run to the cap)."""
    net = tiny_model(fixed_point=sampler == "ddim-two-axis")
    diffusion = create_diffusion("trailing10", predict_v=True)
    layer = {"iterations_per_step": 40, "tol": 1e-7} if net.fixed_point else {}  # two-axis: a converged layer
    parallel = {"iterations_per_step": 1} if net.fixed_point else {}
    for seed in (2, 7):
        g = torch.Generator().manual_seed(seed)
        noise, labels = torch.randn(3, 4, 8, 8, generator=g), torch.arange(3) + 1
        options = dict(cfg_scale=4.0, eta=eta, guidance_channels=channels)
        torch.manual_seed(5)
        reference, _ = sample_images(net, diffusion, noise, labels, sampler="ddim", **options, **layer)
        torch.manual_seed(5)
        out, fn = sample_images(net, diffusion, noise, labels, sampler=sampler, solver_max_iter=60,
                                solver_tol=1e-5, **options, **parallel)
        evaluations = fn.info["network_evaluations_per_image"]
        assert fn.info["converged"] and len(evaluations) == 3  # the images' chains, not their twins'
        assert (out - reference).abs().max() < 2e-3, seed


def test_a_guided_call_refuses_a_batch_that_is_not_doubled():
    """GuidedModel with guidance takes the doubled batch (sampling.guided_batch); an odd one is refused instead of
    pairing rows of different images (the module docstrings' examples passed the images alone)."""
    net = tiny_model()
    with pytest.raises(ValueError, match="doubled batch"):
        guided(net, 4.0)(torch.randn(3, 4, 8, 8), torch.full((3,), 500), torch.tensor([1, 2, 10]))


# ------------------------------------------------------------------------------------------------------------------
# Solvers
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", ["dit", "gaussian"])
def test_anderson_needs_fewer_iterations_than_picard(problem):
    if problem == "dit":
        model, diffusion, (x, kwargs) = guided(tiny_model()), create_diffusion("ddim50", predict_v=True), inputs()
    else:
        model, diffusion = gaussian_denoiser(), create_diffusion("ddim50", learn_sigma=False)
        x, kwargs = inputs(channels=1)[0], None
    runs = {solver: parallel_ddim_sample(model, diffusion, x, solver, kwargs, max_iter=50, tol=1e-3,
                                         return_result=True) for solver in ("picard", "anderson")}
    assert all(stats["converged"] for _, _, stats in runs.values())
    assert runs["anderson"][2]["parallel_iterations"] < runs["picard"][2]["parallel_iterations"]
    assert runs["anderson"][2]["network_evaluations"] == 50 * runs["anderson"][2]["parallel_iterations"]
    reference = sequential(model, diffusion, x, kwargs)
    assert (runs["anderson"][0] - reference).abs().max() < 1e-2  # tolerance 1e-3 on the relative residual


def test_sliding_window_matches_sequential():
    model = guided(tiny_model())
    diffusion = create_diffusion("ddim20", predict_v=True)
    x, kwargs = inputs()
    reference = sequential(model, diffusion, x, kwargs)
    sample, result, stats = parallel_ddim_sample(model, diffusion, x, "window", kwargs, window=6, window_tol=1e-5,
                                                 return_result=True)
    assert (sample - reference).abs().max() <= 1e-4
    assert stats["network_evaluations"] <= 6 * stats["parallel_iterations"] and result.converged
    # ParaDiGMS' default τ = 0.1 on denoiser-like dynamics: far fewer iterations than steps, a close sample.
    model, diffusion = gaussian_denoiser(), create_diffusion("ddim50", learn_sigma=False)
    x = inputs(channels=1)[0]
    sample, _, stats = parallel_ddim_sample(model, diffusion, x, "window", window=20, return_result=True)
    assert stats["parallel_iterations"] < 25
    assert (sample - sequential(model, diffusion, x)).abs().max() < 0.1


def paradigms_on_the_host(model, diffusion, x_T, window, tol, model_kwargs):
    """ParaDiGMS [Alg. 1] as a plain loop that reads the device at every iteration (the reference for the solver
    that decides its slides on the device): (trajectory, iterations, states evaluated, residuals)."""
    from diffusion.parallel import _chain_outputs, _model_outputs
    from diffusion.solvers import relative_residual
    n = diffusion.num_timesteps
    window = n if window is None else window
    X = x_T.expand(n, *x_T.shape).clone()
    variance = torch.from_numpy(1 - diffusion.alphas_cumprod[::-1].copy())
    start, iterations, evaluations, residuals = 0, 0, 0, []
    while start < n:
        end = min(start + window, n)
        states = torch.cat([(x_T if start == 0 else X[start - 1])[None], X[start:end - 1]])
        new = _chain_outputs(diffusion, *_model_outputs(model, diffusion, states, start, model_kwargs, None), start)
        error = ((new - X[start:end]).double() ** 2).flatten(2).sum(-1).amax(1) / (variance[start:end] * x_T[0].numel())
        residuals.append(relative_residual(new, X[start:end]))
        X[start:end] = new
        above = (error >= tol ** 2).nonzero()
        advance = max(1, int(above[0]) if len(above) else end - start)
        X[end:min(start + advance + window, n)] = X[end - 1]
        start, iterations, evaluations = start + advance, iterations + 1, evaluations + end - start
    return X, iterations, evaluations, residuals


@pytest.mark.parametrize("window,tol", [(6, 1e-5), (4, 0.1), (None, 0.05), (1, 0.1)])
def test_the_window_slides_on_the_device_as_paradigms_on_the_host(window, tol):
    """The window solver decides its slides on the device and reads it once per sync_every iterations (one
    .tolist(), nothing else waits for the device): with reads at every iteration it equals the host loop exactly
    (trajectory, iterations, states evaluated, residuals); reading every 3 or 100 iterations, the same iterations and
    evaluations, the trajectory within rounding (the masked states share the network's batch)."""
    from diffusion import parallel
    from fpdm.measure import SyncCounter
    model = guided(tiny_model())
    diffusion = create_diffusion("ddim20", predict_v=True)
    x, kwargs = inputs()
    with torch.no_grad():
        X, iterations, evaluations, residuals = paradigms_on_the_host(model, diffusion, x, window, tol, kwargs)
        parallel.sliding_window_solve(model, diffusion, x, window, tol, model_kwargs=kwargs)  # tables on the device
        for k in (1, 3, 100):
            with SyncCounter() as counter:
                counter.watch(parallel, "sliding_window_solve")
                result = parallel.sliding_window_solve(model, diffusion, x, window, tol, model_kwargs=kwargs,
                                                       sync_every=k)
            assert counter.calls == {("tolist", "parallel.py:_read_window"): result.host_reads}
            assert result.host_reads == -(-iterations // k)
            assert (result.num_iterations, result.num_evaluations) == (iterations, evaluations)
            if k == 1:
                assert torch.equal(result.x, X) and result.residuals == residuals and result.masked_evaluations == 0
            else:
                torch.testing.assert_close(result.x, X, rtol=0, atol=1e-6)
                np.testing.assert_allclose(result.residuals, residuals, rtol=1e-4)
                assert result.masked_evaluations > 0


def test_chunk_size_gives_identical_results():
    model = guided(tiny_model(fixed_point=True), cfg_scale=4.0)
    diffusion = create_diffusion("ddim10", predict_v=True)
    x, kwargs = inputs(cfg_scale=4.0)
    X = x + torch.randn((10, *x.shape), generator=torch.Generator().manual_seed(2))
    calls = model.calls
    chunked = ddim_chain_map(model, diffusion, x, X, model_kwargs=kwargs, chunk_size=3)
    assert model.calls - calls == 4  # ceil(10 / 3) network calls per evaluation of h
    assert (chunked - ddim_chain_map(model, diffusion, x, X, model_kwargs=kwargs)).abs().max() <= 1e-6
    # Anderson amplifies the last-bit differences of other batch sizes a little: compare whole samples at 1e-4.
    whole = parallel_ddim_sample(model, diffusion, x, model_kwargs=kwargs)
    assert (whole - parallel_ddim_sample(model, diffusion, x, model_kwargs=kwargs, chunk_size=3)).abs().max() <= 1e-4


def test_batched_anderson_mixes_in_the_iterates_dtype_under_autocast():
    """FPDM's layer under --precision bf16 runs its Anderson solve inside the network call's autocast; the mix of
    the history must not be a bf16 matmul (its residual floored near 1e-3 where float32 reaches 1e-6)."""
    g = torch.Generator().manual_seed(0)
    size = 64
    q = torch.linalg.qr(torch.randn(size, size, generator=g))[0]
    w = q @ torch.diag(torch.linspace(0, 0.95, size)) @ q.T
    u = torch.randn(1, 4, size, generator=g)

    def f(x, idx):  # a float32 contraction whatever the autocast: only the solver's own ops could round
        with torch.autocast("cpu", enabled=False):
            return x @ w.T + u[:, idx]
    floors = {}
    for name, context in (("fp32", contextlib.nullcontext()), ("bf16", torch.autocast("cpu", dtype=torch.bfloat16))):
        with context:
            result = solve_batched(f, torch.zeros(1, 4, size), "anderson", max_iter=40, tol=1e-7, m=5, lam=1e-4)
        floors[name] = max(min(history) for history in result.image_residuals)
    assert floors["fp32"] < 1e-5 and floors["bf16"] == floors["fp32"]


def test_anderson_survives_singular_problems():
    x0 = torch.randn(3, 4)
    constant = torch.randn(3, 4)
    result = solve(lambda x: constant.clone(), x0, "anderson", max_iter=10, tol=1e-6)
    assert result.converged and torch.allclose(result.x, constant) and result.num_evaluations == 2
    shift = torch.full((3, 4), 0.1)  # no fixed point, identical residuals: GGᵀ has rank one
    for lam in (1e-3, 0.0):  # λ = 0 makes the bordered system exactly singular
        result = solve(lambda x: x + shift, x0, "anderson", max_iter=8, lam=lam)
        assert not result.converged and len(result.residuals) == 8 and torch.isfinite(result.x).all()
    assert solve(lambda x: x, x0, "anderson").num_iterations == 1  # g = 0 at once

    calls = []

    def blows_up(x):  # finite once, then NaN: restart from the best iterate's f(x), then give up
        calls.append(x)
        return x + 1 if len(calls) == 1 else torch.full_like(x, float("nan"))
    result = solve(blows_up, x0, "anderson", max_iter=6)
    assert torch.equal(result.x, x0) and result.residuals[1:] == [float("inf")] * 2 and not result.converged


def test_solvers_return_the_best_iterate():
    x0 = torch.full((5,), 1.1)
    repelling = lambda x: 2 * x - 1  # fixed point 1, Picard runs away from it
    result = solve(repelling, x0, "picard", max_iter=6, tol=1e-8)
    assert torch.equal(result.x, x0) and result.residuals == sorted(result.residuals)
    assert torch.equal(result.fx, repelling(x0))  # f of the best iterate, as evaluated
    result = solve(repelling, x0, "anderson", max_iter=6, tol=1e-6)  # linear: Anderson is a secant method
    assert result.converged and torch.allclose(result.x, torch.ones(5), atol=1e-5)
    with pytest.raises(ValueError, match="unknown solver"):
        solve(repelling, x0, "newton")


def test_refuses_models_that_depend_on_call_order():
    net = tiny_model(fixed_point=True)
    diffusion = create_diffusion("ddim10", predict_v=True)
    x, kwargs = inputs()
    with pytest.raises(ValueError, match="reuse"):
        parallel_ddim_sample(GuidedModel(net, reuse=True), diffusion, x, model_kwargs=kwargs)
    with pytest.raises(ValueError, match="eval"):
        parallel_ddim_sample(guided(net.train()), diffusion, x, model_kwargs=kwargs)


# ------------------------------------------------------------------------------------------------------------------
# Inversion
# ------------------------------------------------------------------------------------------------------------------

def inversion_problem(fixed_point=False):
    net = tiny_model(fixed_point, in_channels=1, learn_sigma=False).requires_grad_(False)
    diffusion = create_diffusion("ddim10", predict_v=True, learn_sigma=False)
    model = guided(net)
    target = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    kwargs = {"y": torch.tensor([1, 2])}
    start = diffusion.ddim_reverse_sample_loop(model, target, model_kwargs=kwargs)
    return model, diffusion, target, kwargs, start


@pytest.mark.parametrize("fixed_point", [False, True], ids=["dit", "fpdm"])
def test_phantom_gradient_aligns_with_exact_gradient(fixed_point):
    model, diffusion, target, kwargs, start = inversion_problem(fixed_point)
    x_T = (start + 0.3 * torch.randn(start.shape, generator=torch.Generator().manual_seed(4))).requires_grad_(True)
    exact, = torch.autograd.grad(F.mse_loss(invert.sequential_ddim(model, diffusion, x_T, kwargs), target), x_T)
    with torch.no_grad():
        X_star = parallel_ddim_sample(model, diffusion, x_T, "picard", kwargs, max_iter=11, tol=1e-7,
                                      return_result=True)[1].x
    sample = invert.phantom_sample(model, diffusion, x_T, X_star, tau=0.1, model_kwargs=kwargs)[-1]
    assert (sample - X_star[-1]).abs().max() <= 1e-4  # at the fixed point x̂ is the sample itself
    phantom, = torch.autograd.grad(F.mse_loss(sample, target), x_T)
    assert F.cosine_similarity(exact.flatten(), phantom.flatten(), dim=0) > 0.8  # measured 0.95-0.99


@pytest.mark.parametrize("method", ["phantom", "sequential"])
def test_inversion_lowers_the_loss(method):
    model, diffusion, target, kwargs, start = inversion_problem()
    x_T, history = invert.invert(model, diffusion, target, start, method, steps=4, lr=0.05, model_kwargs=kwargs)
    final = F.mse_loss(invert.sequential_ddim(model, diffusion, x_T, kwargs), target).item()
    assert final < 0.8 * history[0]["mse"]
    assert [h["mse"] for h in history] == sorted((h["mse"] for h in history), reverse=True)
    assert history[-1]["time_s"] > history[0]["time_s"] > 0


def test_invert_script_end_to_end(tmp_path):
    from PIL import Image
    net = tiny_model(in_channels=1, learn_sigma=False)
    config = {"noise_schedule": "linear", "learn_sigma": False, "predict_v": True, "zero_terminal_snr": False,
              "diffusion_steps": 1000}
    torch.save({"format": TRAIN_FORMAT, "ema": net.state_dict(), "model_config": net.config, "config": config},
               tmp_path / "ckpt.pt")
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "images").mkdir()
    for i, image in enumerate(pixels[:2]):
        Image.fromarray(image).save(tmp_path / "images" / f"{i}.png")
    np.savez(tmp_path / "targets.npz", arr_0=pixels)
    assert invert.load_targets(tmp_path / "targets.npz", 8, 1).shape == (3, 1, 8, 8)
    out = tmp_path / "out"
    report = invert.main(invert.parse_args(["--ckpt", str(tmp_path / "ckpt.pt"), "--images", str(tmp_path / "images"),
                                            "--num-sampling-steps", "5", "--steps", "2", "--out", str(out),
                                            "--device", "cpu", "--class-label", "3"]))
    saved = json.loads((out / "inversion.json").read_text())
    assert set(saved["methods"]) == {"phantom", "sequential"} and len(saved["methods"]["phantom"]["history"]) == 2
    assert saved["initial_mse"] == pytest.approx(report["initial_mse"])
    assert (out / "mse.png").stat().st_size > 0 and (out / "grid.png").stat().st_size > 0
    latent = tiny_model(in_channels=4)
    torch.save({"format": TRAIN_FORMAT, "ema": latent.state_dict(), "model_config": latent.config, "config": config},
               tmp_path / "lat.pt")
    with pytest.raises(ValueError, match="pixel space"):
        invert.build(invert.parse_args(["--ckpt", str(tmp_path / "lat.pt"), "--images", "x", "--out", "y",
                                        "--device", "cpu"]))
    # Every flag given is used or refused, before any folder is made.
    base = ["--ckpt", str(tmp_path / "ckpt.pt"), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "no"),
            "--device", "cpu"]
    for extra, message in ((["--methods", "sequential", "--tau", "0.2"], "--tau set.* not used by --methods sequential"),
                           (["--methods", "phantom,newton"], "--methods phantom,newton: choose from"),
                           (["--num-iterations", "4"], "--num-iterations sets an FPDM's iterations; .* is a DiT")):
        with pytest.raises(ValueError, match=message):
            invert.main(invert.parse_args(base + extra))
    assert not (tmp_path / "no").exists()


# ------------------------------------------------------------------------------------------------------------------
# Per-image solving (solvers.solve_batched)
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixing", ["image", "state"])
def test_each_image_gets_the_result_it_gets_alone(mixing):
    """A batch of 4 (with guidance: 4 chains, each call evaluating their 4 twins too) gives every image what sampling it alone gives, to solver
    tolerance; the per-image residual histories and evaluation counts are reported."""
    net = tiny_model()
    diffusion = create_diffusion("trailing12")
    x, kwargs = inputs(cfg_scale=3.0, batch=4)
    out, result, stats = parallel_ddim_sample(guided(net, 3.0), diffusion, x, model_kwargs=kwargs, mixing=mixing,
                                              tol=1e-4, max_iter=30, return_result=True)
    assert len(stats["residuals_per_image"]) == 4
    if mixing == "image":  # (per-state coefficients oscillate on this chain: see the README's measurement)
        assert all(r[-1] < 1e-4 for r in stats["residuals_per_image"])
    for b in range(4):
        pair = torch.tensor([b, b + 4])
        alone = parallel_ddim_sample(guided(net, 3.0), diffusion, x[pair], model_kwargs={"y": kwargs["y"][pair]},
                                     mixing=mixing, tol=1e-4, max_iter=30)
        torch.testing.assert_close(out[b], alone[0], atol=1e-5, rtol=1e-5)
    reference = sequential(guided(net, 3.0), diffusion, x, kwargs)
    if mixing == "image":
        assert (out - reference).abs().max() < 1e-3 * reference.abs().max()


def test_a_hard_image_does_not_keep_easy_ones_iterating():
    """x_b = c_b W x_b + u_b (W a rotation of R^6): contraction 0.99 for image 0, 0.05 for the others. Per image, the
    easy ones stop after 7 evaluations, as Picard iteration needs for them, and the hard one converges with
    Anderson (Picard would need ~1,900 evaluations); one global residual and one set of coefficients for the batch
    does not reach the tolerance in 60."""
    from diffusion.solvers import solve_batched
    W = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    c = torch.tensor([0.99, 0.05, 0.05, 0.05], dtype=torch.float64).view(1, 4, 1)
    u = torch.linspace(-1, 1, 4 * 6, dtype=torch.float64).view(1, 4, 6)

    def f(x, idx):
        return c[:, idx] * (x @ W.T) + u[:, idx]
    x0 = torch.zeros(1, 4, 6, dtype=torch.float64)
    result = solve_batched(f, x0, "anderson", max_iter=60, tol=1e-8, m=5)
    assert result.converged and all(len(r) == e for r, e in zip(result.image_residuals, result.image_evaluations))
    assert max(result.image_evaluations[1:]) <= 8 < result.image_evaluations[0] < 60
    torch.testing.assert_close(result.x, f(result.x, torch.arange(4)), atol=1e-7, rtol=0)
    picard = solve_batched(f, x0, "picard", max_iter=100, tol=1e-8)
    assert picard.image_evaluations[1:] == [8, 8, 8] and not picard.image_converged[0]
    together = solve(lambda x: f(x, torch.arange(4)), x0, "anderson", max_iter=60, tol=1e-8, m=5)
    assert not together.converged


def test_global_mixing_is_the_previous_whole_batch_solve():
    net = tiny_model()
    diffusion = create_diffusion("trailing10")
    x, kwargs = inputs(batch=2)
    out, result, stats = parallel_ddim_sample(guided(net), diffusion, x, model_kwargs=kwargs, mixing="global",
                                              return_result=True)
    f = lambda X: ddim_chain_map(guided(net), diffusion, x, X, model_kwargs=kwargs)
    direct = solve(f, x.expand(10, *x.shape).clone(), "anderson", 15, 1e-3)
    torch.testing.assert_close(out, direct.x[-1], atol=0, rtol=0)  # Anderson returns its best iterate
    assert stats["network_evaluations"] == direct.num_evaluations * 10 and "residuals_per_image" not in stats
    with pytest.raises(ValueError, match="unknown mixing"):
        parallel_ddim_sample(guided(net), diffusion, x, model_kwargs=kwargs, mixing="pairs")


# ------------------------------------------------------------------------------------------------------------------
# The solve loop on the device: host reads, static shapes, ops per iteration (issue "Speed on one GPU")
# ------------------------------------------------------------------------------------------------------------------

def mixed_difficulty_problem(batch=4, states=3, size=6):
    """x_b = c_b W x_b + u_b per image, contractions from 0.9 (slow) to 0.05 (fast): images converge at different
    iterations, so the loop has converged images to mask and drop."""
    g = torch.Generator().manual_seed(0)
    W = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64))[0]
    c = torch.linspace(0.9, 0.05, batch, dtype=torch.float64).view(1, batch, 1)
    u = torch.randn(states, batch, size, generator=g, dtype=torch.float64)
    calls = []

    def f(x, idx):
        calls.append(len(idx))
        return c[:, idx] * (x @ W.T) + u[:, idx]
    return f, torch.zeros(states, batch, size, dtype=torch.float64), calls


@pytest.mark.parametrize("method,mixing", [("anderson", "image"), ("anderson", "state"), ("picard", "image")])
def test_sync_every_reads_the_device_once_per_window_and_changes_no_result(method, mixing):
    """One host read (a single .tolist()) per `sync_every` iterations and nothing else that waits for the device;
    every image's result, residual history and evaluation count are the same for any sync_every. Between reads,
    converged images stay in the batch, masked (`masked_evaluations`), then leave it."""
    from diffusion import solvers
    from fpdm.measure import SyncCounter
    runs = {}
    for k in (1, 3, 100):
        f, x0, calls = mixed_difficulty_problem()
        with SyncCounter() as counter:
            counter.watch(solvers, "solve_batched")
            result = solvers.solve_batched(f, x0, method, max_iter=40, tol=1e-8, mixing=mixing, sync_every=k)
        assert counter.calls == {("tolist", "solvers.py:_read"): result.host_reads}
        assert result.host_reads == -(-result.num_iterations // k) and result.num_iterations == len(calls)
        assert sum(calls) == sum(result.image_evaluations) + result.masked_evaluations  # every evaluation counted
        runs[k] = result, calls
    one, calls_one = runs[1]
    assert one.masked_evaluations == 0 and calls_one == sorted(calls_one, reverse=True)  # dropped as they converge
    assert len(set(one.image_evaluations)) > 1  # (the problem has images that converge at different times)
    for k in (3, 100):
        other, calls_k = runs[k]
        torch.testing.assert_close(other.x, one.x, rtol=0, atol=1e-12)
        torch.testing.assert_close(other.fx, one.fx, rtol=0, atol=1e-12)
        assert other.image_evaluations == one.image_evaluations and other.image_converged == one.image_converged
        for a, b in zip(other.image_residuals, one.image_residuals):
            np.testing.assert_allclose(a, b, rtol=1e-9)
        assert other.masked_evaluations > 0
    assert set(runs[100][1]) == {4}  # never read before the end: all four images in every call


def compute_ops(run, outside=None):
    """Compute ops (aten ops that are not views or no-op casts, at the top of the call tree) of run(), from
    torch.profiler on the CPU (the same ops launch kernels on a GPU); with `outside`, not those within a
    record_function of that name."""
    from torch.profiler import ProfilerActivity, profile
    views = {"select", "unsqueeze", "view", "flatten", "transpose", "numpy_T", "resolve_conj", "resolve_neg",
             "slice", "reshape", "expand", "as_strided", "t", "permute", "unflatten", "squeeze", "alias", "detach",
             "view_as", "_unsafe_view", "empty", "empty_like", "empty_strided", "lift_fresh"}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()

    def within(event):
        parent = event.cpu_parent
        while parent is not None and parent.name != outside:
            parent = parent.cpu_parent
        return parent is not None
    return len([e for e in prof.events() if e.name.startswith("aten::") and e.name[6:] not in views
                and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::"))
                and not (e.name == "aten::to" and not e.cpu_children) and not (outside and within(e))])


def solve_loop_ops(method="anderson", mixing="image", iterations=10):
    """Compute ops of a whole solve_batched call of `iterations` iterations with one read at the end, including f's
    (one multiply each)."""
    from diffusion.solvers import solve_batched
    x0 = torch.randn(5, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    f = lambda x, idx: 0.5 * x
    return compute_ops(lambda: solve_batched(f, x0, method, max_iter=iterations, tol=-1.0, mixing=mixing,
                                             sync_every=iterations))


def test_one_iteration_of_the_solve_loop_is_a_fixed_list_of_ops():
    """Compute ops per iteration (f's one included), from torch.profiler on the CPU (the same ops launch kernels on
    a GPU): before the loop moved to the device, 109 (Anderson) and 38 (Picard), with ~15 host syncs per iteration;
    now 52 and 17, and no sync but the read every sync_every iterations. Every iteration runs the same ops: no shape
    or path changes inside the loop, so one iteration can be captured as a graph."""
    for method, mixing, most in (("anderson", "image", 52), ("anderson", "state", 53), ("picard", "image", 17)):
        per_iteration = (solve_loop_ops(method, mixing, 12) - solve_loop_ops(method, mixing, 6)) / 6
        assert per_iteration == int(per_iteration) and per_iteration <= most, (method, mixing, per_iteration)


def test_the_ops_around_the_network_per_parallel_iteration_are_a_fixed_list():
    """Compute ops per iteration outside the network calls (the solver, the DDIM chain map, p_mean_variance, the
    guidance wrapper, two-axis sampling's layer states), each iteration the same list: DEQ-DDIM (Anderson per image)
    97, two-axis sampling 99, ParaDiGMS' window 100 (2026-12-07), against a network call of hundreds."""
    from torch.profiler import record_function

    from diffusion import parallel
    from fpdm.two_axis import two_axis_sample

    def marked(net):
        forward = net.forward

        def call(*args, **kwargs):
            with record_function("network"):
                return forward(*args, **kwargs)
        net.forward = call
        return net
    dit, fpdm = marked(tiny_model()), marked(tiny_model(fixed_point=True))
    x, kwargs = inputs()
    short, long = create_diffusion("ddim10", predict_v=True), create_diffusion("ddim16", predict_v=True)
    runs = {  # (run with n iterations, at most this many ops per iteration)
        "deq-ddim": (lambda n: parallel_ddim_sample(guided(dit), short, x, model_kwargs=kwargs, tol=-1.0, max_iter=n,
                                                    sync_every=n), 97),
        "two-axis": (lambda n: two_axis_sample(guided(fpdm), short, x, model_kwargs=kwargs, inner_iterations=1,
                                               tol=-1.0, max_iter=n, sync_every=n), 99),
        # tol = 0 slides one step per iteration: as many iterations as steps
        "window": (lambda n: parallel.sliding_window_solve(guided(dit), {10: short, 16: long}[n], x, 4, 0.0,
                                                           model_kwargs=kwargs, sync_every=n), 100)}
    with torch.no_grad():
        for name, (run, most) in runs.items():
            run(10), run(16)  # tables on the device
            per_iteration = (compute_ops(lambda: run(16), "network") - compute_ops(lambda: run(10), "network")) / 6
            assert per_iteration == int(per_iteration) and per_iteration <= most, (name, per_iteration)


def test_batched_anderson_survives_singular_problems_and_blow_ups_per_image():
    """λ = 0 with identical residuals (an exactly singular system) stays finite; an image whose f blows up
    restarts from its best f(x) without touching the others' iterates (their results equal those alone)."""
    from diffusion.solvers import solve_batched
    x0 = torch.zeros(2, 3, 4)
    shift = torch.full((2, 3, 4), 0.1)
    for lam in (1e-3, 0.0):
        result = solve_batched(lambda x, idx: x + shift[:, idx], x0, "anderson", max_iter=8, lam=lam)
        assert not result.converged and torch.isfinite(result.x).all() and result.image_evaluations == [8] * 3
    f, x0, _ = mixed_difficulty_problem(batch=3)
    evaluations = [0]

    def flaky(x, idx):  # image 0 gives NaN at its 3rd evaluation
        out = f(x, idx)
        evaluations[0] += 1
        if evaluations[0] == 3 and 0 in idx.tolist():
            out[:, (idx == 0).nonzero()[0]] = float("nan")
        return out
    hurt = solve_batched(flaky, x0, "anderson", max_iter=60, tol=1e-6)
    assert hurt.image_residuals[0][2] == float("inf") and hurt.image_converged[0]
    for b in (1, 2):
        alone = solve_batched(lambda x, idx: f(x, idx + b), x0[:, b:b + 1], "anderson", max_iter=60, tol=1e-6)
        torch.testing.assert_close(hurt.x[:, b:b + 1], alone.x, rtol=0, atol=1e-12)
        assert hurt.image_evaluations[b] == alone.image_evaluations[0]
    with pytest.raises(ValueError, match="solvers.solve"):
        solve_batched(f, x0, mixing="global")


def test_no_wait_for_the_device_inside_torch_in_the_parallel_loops():
    """Beside their own reads (SyncCounter, above and below), the parallel loops make torch wait for the device
    nowhere: no 0-d tensor used as an index, no boolean mask, no value that decides a size (measure.device_waits,
    from the profiler; it found the window's slide reading its end position at every iteration)."""
    from diffusion import parallel
    from fpdm.measure import device_waits
    from fpdm.two_axis import two_axis_sample
    diffusion = create_diffusion("ddim14", predict_v=True)
    dit, fpdm = tiny_model(), tiny_model(fixed_point=True)
    x, kwargs = inputs()
    runs = {"anderson": lambda: parallel_ddim_sample(guided(dit), diffusion, x, model_kwargs=kwargs, tol=-1.0,
                                                     max_iter=6, sync_every=3),
            "state": lambda: parallel_ddim_sample(guided(dit), diffusion, x, model_kwargs=kwargs, tol=-1.0,
                                                  max_iter=6, sync_every=3, mixing="state"),
            "picard": lambda: parallel_ddim_sample(guided(dit), diffusion, x, "picard", model_kwargs=kwargs,
                                                   tol=-1.0, max_iter=6, sync_every=3),
            "window": lambda: parallel.sliding_window_solve(guided(dit), diffusion, x, 4, 0.0, model_kwargs=kwargs,
                                                            sync_every=5),
            "two-axis": lambda: two_axis_sample(guided(fpdm), diffusion, x, model_kwargs=kwargs, inner_iterations=1,
                                                tol=-1.0, max_iter=6, sync_every=3)}
    with torch.no_grad():
        for name, run in runs.items():
            run()  # the schedule tables on the device
            assert device_waits(run) == {}, name


def test_sync_every_through_the_samplers_and_sample_py(tmp_path):
    """parallel_ddim_sample, two-axis sampling and sample.py's --parallel-sync-every: the same samples, fewer host
    reads; sequential sampling refuses the flag."""
    from fpdm import sample_config
    from fpdm.measure import SyncCounter
    import diffusion.parallel as parallel
    net = tiny_model(fixed_point=True)
    diffusion = create_diffusion("trailing8")
    x, kwargs = inputs(batch=3)
    parallel.parallel_ddim_sample(guided(net), diffusion, x, model_kwargs=kwargs, max_iter=2)  # tables on the device
    outs = {}
    for k in (1, 4):
        with SyncCounter() as counter:
            counter.watch(parallel, "parallel_ddim_sample")
            outs[k] = parallel.parallel_ddim_sample(guided(net), diffusion, x, model_kwargs=kwargs, tol=1e-5,
                                                    max_iter=12, sync_every=k, return_result=True)
        assert counter.total == outs[k][2]["host_reads"], counter.calls  # nothing else waits for the device
    torch.testing.assert_close(outs[4][0], outs[1][0], rtol=0, atol=1e-6)
    assert outs[4][2]["host_reads"] < outs[1][2]["host_reads"]
    import fpdm.two_axis as two_axis
    two = []
    for k in (1, 5):
        with SyncCounter() as counter:
            counter.watch(two_axis, "two_axis_sample")
            two.append(two_axis.two_axis_sample(guided(net), diffusion, x, model_kwargs=kwargs, inner_iterations=1,
                                                max_iter=20, tol=1e-5, sync_every=k, return_result=True))
        assert counter.total == two[-1][2]["host_reads"], counter.calls  # the FPDM layer states too: no syncs
    torch.testing.assert_close(two[1][0], two[0][0], rtol=0, atol=1e-6)
    assert two[1][2]["host_reads"] < two[0][2]["host_reads"]
    from fpdm import cli
    with pytest.raises(ValueError, match="--parallel-sync-every"):  # sequential sampling
        cli.resolve_sampler(sample_config.make("sample", ckpt="x.pt", parallel_sync_every=2))
    for solver in ("anderson", "window"):
        cfg = sample_config.make("sample", ckpt="x.pt", parallel=solver, parallel_sync_every=3)
        assert cli.resolve_sampler(cfg)[1]["sync_every"] == 3
