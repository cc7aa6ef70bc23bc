"""Tests for four single-point bugs that a mutation run found the rest of the suite missing:

1. S-JFB with n = 0 no-grad iterations must still start from a DETACHED z_0 (models.FPDM.solve): the pre blocks get
   gradient only through the input injection, exactly as in the release's S-JFB.
2. The contraction estimate (fpdm.diagnostics.spectral_radius / contraction) must average the END of the power
   iteration, not its transient start: shown on a non-normal linear layer whose early growth ratios are far above ρ.
3. Precision/recall radii (fpdm.metrics.precision_recall) are distances to the k-th nearest neighbour NOT counting
   the point itself (index k of the sorted row with the zero self-distance), not the (k-1)-th.
4. Classifier-free guided sampling (fpdm.sampling) feeds the NULL class (num_classes) to the unconditional half, not
   the last real class (num_classes - 1).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import random_model
from fpdm import metrics
from fpdm.diagnostics import contraction, spectral_radius
from fpdm.metrics import precision_recall
from fpdm.sampling import GuidedModel, diffusion_for_sampling, guided_batch, sample_images

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=5, num_heads=4, num_classes=10,
            fixed_point=True)


def inputs(batch=3, seed=2, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------------------------------------------
# 1. S-JFB at n = 0: the starting point is detached
# ----------------------------------------------------------------------------------------------------------------

def sjfb_by_hand(model, x, t, y, m, detach_start=True):
    """The release's S-JFB forward written out with n = 0: z_0 = h.detach() (the pre blocks' output), then m
    iterations z <- block(fc2(gelu(fc1([z, u])))) with the graph, u = block_pre_projection(h) the injection, then the
    post blocks and the final layer. No label dropout (the models here have class_dropout_prob = 0)."""
    tokens = model.x_embedder(x) + model.pos_embed
    t_emb = model.t_embedder(t)
    y_emb = model.y_embedder.embedding_table(y)
    c = t_emb + y_emb
    c_outer = c if model.fixed_point_pre_post_timestep_conditioning else y_emb
    h = tokens
    for block in model.blocks_pre:
        h = block(h, c_outer)
    u = model.block_pre_projection(h)
    z = h.detach() if detach_start else h
    for _ in range(m):
        projected = model.block_fixed_point_projection_fc1(torch.cat((z, u), dim=-1))
        projected = model.block_fixed_point_projection_fc2(F.gelu(projected, approximate="tanh"))
        z = model.block_fixed_point(projected, c)
    for block in model.blocks_post:
        z = block(z, c_outer)
    return model.unpatchify(model.final_layer(z, c_outer))


def loss_grads(model, out, target):
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad((out - target).square().mean(), params, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for n, p, g in zip(names, params, grads)}


@pytest.mark.parametrize("m,how,pre_post_t", [(1, "explicit", False), (2, "explicit", False),
                                              (1, "drawn", False), (2, "drawn", True)])
def test_sjfb_without_no_grad_iterations_detaches_the_starting_point(m, how, pre_post_t):
    """n = 0, m in {1, 2}: the model's gradients (pre blocks above all) equal the hand-built S-JFB's, whose z_0 is
    detached; without the detach the pre blocks' gradient also flows through z_0 and differs (checked below).
    Counts are forced either explicitly, num_iterations=(0, m), or through the training draw with the ranges
    [0, 0] and [m, m] (FPDM.iteration_counts, which draws when no count is given in training mode)."""
    config = dict(TINY, class_dropout_prob=0.0, fixed_point_pre_post_timestep_conditioning=pre_post_t,
                  fixed_point_no_grad_min_iters=0, fixed_point_no_grad_max_iters=0,
                  fixed_point_with_grad_min_iters=m, fixed_point_with_grad_max_iters=m)
    model = random_model(config, seed=3, scale=0.1).train()
    x, t, y = inputs()
    target = torch.randn(3, 8, 8, 8, generator=torch.Generator().manual_seed(4))

    out = model(x, t, y, num_iterations=(0, m)) if how == "explicit" else model(x, t, y)
    assert model.last_stats.sjfb == (0, m) and model.last_stats.iterations == m
    grads = loss_grads(model, out, target)
    reference_out = sjfb_by_hand(model, x, t, y, m)
    torch.testing.assert_close(out, reference_out, atol=1e-6, rtol=1e-6)
    reference = loss_grads(model, reference_out, target)
    for name in sorted(reference, key=lambda n: not n.startswith("blocks_pre.")):  # the pre blocks first
        torch.testing.assert_close(grads[name], reference[name], atol=1e-9, rtol=1e-5, msg=name)

    # The test can see the bug: with z_0 = h (not detached) the pre blocks' gradient is clearly another one.
    undetached = loss_grads(model, sjfb_by_hand(model, x, t, y, m, detach_start=False), target)
    pre = [n for n in reference if n.startswith(("blocks_pre.", "x_embedder.", "y_embedder."))]
    assert any(reference[n].abs().max() > 0 for n in pre)
    gap = max(float((undetached[n] - reference[n]).abs().max() / reference[n].abs().max().clamp_min(1e-12))
              for n in pre)
    assert gap > 1e-2, gap


# ----------------------------------------------------------------------------------------------------------------
# 2. The contraction estimate averages the end of the power iteration
# ----------------------------------------------------------------------------------------------------------------

def non_normal_matrix(dim, coupling=60.0, seed=0):
    """Upper triangular: eigenvalues = the diagonal, top 0.9 (the others within 0.3), plus a large coupling
    J[0, 1] that makes the map strongly non-normal (||J|| >> ρ): power iteration's first growth ratios are far
    above ρ before they settle at it."""
    g = torch.Generator().manual_seed(seed)
    d = torch.empty(dim, dtype=torch.float64).uniform_(-0.3, 0.3, generator=g)
    d[0], d[1] = 0.9, 0.3
    J = torch.diag(d) + torch.triu(torch.randn(dim, dim, generator=g, dtype=torch.float64) * 0.05, 1)
    J[0, 1] = coupling
    return J


def growth_ratios(f, shape, iterations, seed=0):
    """‖J v_k‖ / ‖v_k‖ of each example at each step of power iteration from spectral_radius's start (same seed)."""
    v = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).double()
    v = v / v.flatten(1).norm(dim=1).view(-1, 1, 1)
    ratios = []
    for _ in range(iterations):
        jv = f(v)
        norm = jv.flatten(1).norm(dim=1)
        ratios.append(norm)
        v = jv / norm.view(-1, 1, 1)
    return torch.stack(ratios)  # (iterations, B)


def test_contraction_estimate_of_a_non_normal_layer_is_the_exact_spectral_radius():
    """The layer replaced by f(z) = z J^T + u (per token; J non-normal, ρ(J) = 0.9): contraction() must give the
    exact spectral radius of the explicit Jacobian (torch.linalg.eigvals). The geometric mean of the FIRST half of
    the growth ratios (the transient) is above 1 here — a contraction estimated as an expansion — so an estimator
    that averaged the start instead of the end would fail by > 15%."""
    model = random_model(dict(TINY, class_dropout_prob=0.0), seed=3, scale=0.1)
    hidden = model.pos_embed.shape[-1]
    J = non_normal_matrix(hidden)
    model.fixed_point_function = lambda z, injection, c: z @ J.T.to(z.dtype) + injection  # instance attribute
    x, t, y = inputs()
    power_iterations = 20

    # The exact spectral radius, from the explicit Jacobian of the layer for one example (tokens x channels).
    tokens = model.pos_embed.shape[1]
    z0 = torch.randn(tokens * hidden, dtype=torch.float64)
    jacobian = torch.autograd.functional.jacobian(lambda z: (z.view(tokens, hidden) @ J.T).flatten(), z0)
    exact = float(torch.linalg.eigvals(jacobian).abs().max())
    assert exact == pytest.approx(0.9, abs=1e-9)

    rho, details = contraction(model, x, t, y, settle_iterations=50, power_iterations=power_iterations)
    assert rho == pytest.approx(exact, rel=1e-3)
    assert details["per_example"] == pytest.approx([exact] * 3, rel=1e-3)

    # What the transient start of the same power iteration gives, and its end (what the estimator must use).
    ratios = growth_ratios(lambda v: v @ J.T, (3, tokens, hidden), power_iterations)
    early = ratios[: power_iterations // 2].log().mean(0).exp()
    late = ratios[power_iterations // 2:].log().mean(0).exp()
    assert torch.all(early > 1.0) and torch.all((early - exact).abs() > 0.15 * exact), early
    torch.testing.assert_close(late, torch.full_like(late, exact), atol=1e-4, rtol=0)

    # spectral_radius itself on the same linear map (float64, no model around it).
    estimate, _ = spectral_radius(lambda z: z @ J.T, torch.zeros(3, tokens, hidden, dtype=torch.float64),
                                  power_iterations)
    torch.testing.assert_close(estimate.double(), torch.full((3,), exact, dtype=torch.float64), atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# 3. Precision/recall radii: the k-th neighbour, the point itself not counted
# ----------------------------------------------------------------------------------------------------------------

def test_precision_recall_radii_by_hand_k3():
    """k = 3, by hand.
    Reference R: (0,0) (1,0) (2,0) (3,0). Distances to the others, sorted:
      (0,0): 1 2 3 -> radius 3      (1,0): 1 1 2 -> radius 2      (2,0): 1 1 2 -> 2      (3,0): 1 2 3 -> 3
    Samples S: (0,2.5) (1,2.5) (2,2.5) (3,2.5) and (1.5,40). The far point is at about 37.50, 37.50, 37.53, 37.53
    from the row, so the row's radii are those of R (3 2 2 3), and the far point's own radius is ~37.53.
    Precision: (0,2.5) is 2.5 <= 3 from (0,0); (1,2.5) is sqrt(7.25) = 2.69 <= 3 from (0,0); (2,2.5) and (3,2.5)
    likewise from (3,0); (1.5,40) is ~40 from everything: 4/5 = 0.8.
    Recall: by the same distances every point of R lies in a ball of the row at y = 2.5 (radius 3 at the ends):
    4/4 = 1.0 (the far point's ball, ~37.53, reaches none of them: they are >= 40.003 away).
    With the (k-1)-th neighbour (the point itself counted) the radii would be 2 1 1 2: 2.5 > 2 and 2.69 > 2, 1, so
    no sample would be inside and no reference point recalled: (0.0, 0.0)."""
    real = np.array([[0, 0], [1, 0], [2, 0], [3, 0]], dtype=np.float64)
    fake = np.array([[0, 2.5], [1, 2.5], [2, 2.5], [3, 2.5], [1.5, 40]], dtype=np.float64)
    assert precision_recall(real, fake, k=3) == (0.8, 1.0)
    assert precision_recall(fake, real, k=3) == (1.0, 0.8)  # roles swapped
    assert brute_force_precision_recall(real, fake, 3) == (0.8, 1.0)
    assert brute_force_precision_recall(real, fake, 3, self_counted=True) == (0.0, 0.0)


def brute_force_precision_recall(real, fake, k, self_counted=False):
    """Loops over points: radius = the k-th smallest distance to the OTHER points of the set (index k of the sorted
    row that includes the zero self-distance; index k - 1 if `self_counted`, the bug)."""
    index = k - 1 if self_counted else k

    def radii(points):
        return [sorted(float(np.linalg.norm(p - q)) for q in points)[index] for p in points]

    real_radii, fake_radii = radii(real), radii(fake)
    precision = np.mean([any(np.linalg.norm(s - r) <= rad for r, rad in zip(real, real_radii)) for s in fake])
    recall = np.mean([any(np.linalg.norm(r - s) <= rad for s, rad in zip(fake, fake_radii)) for r in real])
    return float(precision), float(recall)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("rows_per_block", [None, 7])
def test_precision_recall_equals_brute_force_on_random_data(k, rows_per_block, monkeypatch):
    """Random data against the loops above, also with distance blocks of 7 rows (the self-distance of every block
    at its own offset); the (k-1)-th-neighbour answer differs here, so the comparison has teeth."""
    if rows_per_block is not None:
        monkeypatch.setattr(metrics, "_rows_per_block", lambda columns, budget=None: rows_per_block)
    rng = np.random.default_rng(k)
    real = rng.normal(size=(30, 4))
    fake = rng.normal(size=(25, 4)) * 1.3 + 1.0
    expected = brute_force_precision_recall(real, fake, k)
    got = precision_recall(real, fake, k=k)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert brute_force_precision_recall(real, fake, k, self_counted=True) != pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# 4. Guided sampling: the unconditional half sees the null class
# ----------------------------------------------------------------------------------------------------------------

def guided_fpdm():
    return random_model(dict(TINY, class_dropout_prob=0.1), seed=5, scale=0.1)  # learned sigma: 8 output channels


def test_guided_sampling_feeds_the_null_class_to_the_unconditional_half():
    """Spy on the label table's lookups during sample_images with cfg_scale != 1: every call's batch is the labels
    then num_classes (the dropout row), never num_classes - 1."""
    model = guided_fpdm()
    diffusion = diffusion_for_sampling({}, 3)
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    labels = torch.tensor([3, 9])  # 9 = num_classes - 1, the last real class
    seen = []
    hook = model.y_embedder.embedding_table.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        sample_images(model, diffusion, noise, labels, sampler="ddim", cfg_scale=2.5, iterations_per_step=2)
    finally:
        hook.remove()
    assert len(seen) == 3
    null = torch.full_like(labels, model.num_classes)
    for looked_up in seen:
        assert torch.equal(looked_up, torch.cat([labels, null])), looked_up
    assert torch.equal(guided_batch(noise, labels, 2.5, model.num_classes)[1], torch.cat([labels, null]))


def test_guided_output_is_uncond_plus_scale_times_difference_with_the_null_class():
    """One GuidedModel call, and a whole DDIM sampling run, against the guidance mix computed by calling the model by
    hand twice: eps = uncond + s (cond - uncond) with uncond = model(x, t, y = num_classes) (the variance channels:
    the conditional branch's)."""
    model = guided_fpdm()
    scale, iterations = 2.5, 2
    null_class = model.num_classes
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    labels = torch.tensor([3, 9])

    @torch.no_grad()
    def by_hand(x, t, together=False, **_):
        """Guided output for the (N,) batch x; `together`: both branches in one call (x twice, the labels then the
        null class), so that the sampling run below sees bit-for-bit the same network numerics as the sampler's
        doubled batch (3 DDIM steps from t = 999 amplify float32 round-off ~100x)."""
        null = torch.full_like(labels, null_class)
        if together:
            both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), num_iterations=iterations,
                         reuse=False)
            cond, uncond = both[: len(x)], both[len(x):]
        else:
            cond = model(x, t, labels, num_iterations=iterations, reuse=False)
            uncond = model(x, t, null, num_iterations=iterations, reuse=False)
        eps = uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4])
        return torch.cat([eps, cond[:, 4:]], dim=1)

    # One call: the doubled batch (labels, then the null class) through GuidedModel.
    t = torch.full((4,), 500)
    x2, y2 = guided_batch(noise, labels, scale, null_class)
    with torch.no_grad():
        out = GuidedModel(model, scale, iterations_per_step=iterations)(x2, t, y2)
    expected = by_hand(noise, t[:2])
    torch.testing.assert_close(out[:2], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[2:, :4], expected[:, :4], atol=1e-5, rtol=1e-5)
    # The null class matters here: guiding against the last real class gives something clearly different.
    with torch.no_grad():
        wrong = model(noise, t[:2], torch.full_like(labels, null_class - 1), num_iterations=iterations)
    assert (wrong[:, :4] - model(noise, t[:2], torch.full_like(labels, null_class),
                                 num_iterations=iterations)[:, :4]).abs().max() > 1e-3

    # A whole run: sample_images (DDIM, eta = 0) equals DDIM driven by the hand-guided model.
    diffusion = diffusion_for_sampling({}, 3)
    samples, _ = sample_images(model, diffusion, noise, labels, sampler="ddim", cfg_scale=scale,
                               iterations_per_step=iterations)
    reference = diffusion.ddim_sample_loop(by_hand, noise.shape, noise=noise, clip_denoised=False,
                                           model_kwargs={"together": True})
    torch.testing.assert_close(samples, reference, atol=1e-5, rtol=1e-5)
