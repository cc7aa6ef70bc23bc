"""fpdm/diagnostics.py and its use in train.py: the contraction estimate against the exact spectral radius,
per-example residuals bucketed by timestep, the run folder's CSV and PNGs, and training left bit-identical."""

import copy
import csv
import math
import os
from types import SimpleNamespace

import pytest
import torch

import train
from fpdm import config as configs
from fpdm import training
from fpdm.diagnostics import BUCKETS, contraction, layer_problem
from models import DiT, FixedPointStats
from test_train import TINY_ARGS, final_weights, losses
from conftest import reset_accelerate


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    reset_accelerate()


def small_fpdm(seed, fc2_scale):
    """2 x 2 patches of width 16 (a 64-dim layer state per example: its Jacobian is cheap to build exactly), every
    weight random (so the block mixes tokens and is not the identity of adaLN-Zero), fc2 scaled to set the
    contraction."""
    torch.manual_seed(seed)
    model = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=3, num_heads=2, num_classes=10,
                learn_sigma=False, fixed_point=True, fixed_point_no_grad_max_iters=3,
                fixed_point_with_grad_max_iters=2)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.block_fixed_point_projection_fc2.weight.mul_(fc2_scale)
    return model.eval()


def inputs(n=2):
    x = torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([100, 700, 400][:n]), torch.tensor([1, 2, 3][:n])


@pytest.mark.parametrize("seed", [4, 5])
def test_contraction_estimate_matches_the_exact_spectral_radius(seed):
    """At the layer's fixed point the JVP power iteration gives the largest |eigenvalue| of ∂f/∂z, built exactly by
    autograd (64 x 64 per example; the batch's Jacobian is block-diagonal), within 5% for each example, and their
    maximum is the batch's. (fc2 x 6 makes these layers contractions with ρ ≈ 0.7 whose top eigenvalues stand out
    from the rest; where several eigenvalues nearly share the top modulus, 20 steps can read ~5-10% low.)"""
    model = small_fpdm(seed, fc2_scale=6.0)
    x, t, y = inputs()
    rho, details = contraction(model, x, t, y, settle_iterations=100, power_iterations=40)
    with torch.no_grad():
        h, injection, c = layer_problem(model, x, t, y)
        z = h
        for _ in range(100):
            z = model.fixed_point_function(z, injection, c)
    exact = []
    for b in range(len(x)):
        jacobian = torch.autograd.functional.jacobian(
            lambda v: model.fixed_point_function(v[None], injection[b:b + 1], c[b:b + 1])[0], z[b], vectorize=True)
        exact.append(torch.linalg.eigvals(jacobian.reshape(z[b].numel(), -1).double()).abs().max().item())
    assert all(0.3 < r < 1 for r in exact), exact  # a real contraction, not a trivial one
    for estimate, radius in zip(details["per_example"], exact):
        assert abs(estimate - radius) <= 0.05 * radius, (details["per_example"], exact)
    assert rho == max(details["per_example"]) and max(details["residual"]) < 1e-5


def test_layer_problem_is_the_models_own_forward():
    """layer_problem rebuilds what forward feeds the layer: iterating f from it, then the post blocks and the final
    layer, gives the model's output."""
    model = small_fpdm(0, fc2_scale=3.0)
    x, t, y = inputs(3)
    with torch.no_grad():
        h, injection, c = layer_problem(model, x, t, y)
        z = h
        for _ in range(4):
            z = model.fixed_point_function(z, injection, c)
        y_emb = model.y_embedder(y, False)
        for block in model.blocks_post:
            z = block(z, y_emb)
        rebuilt = model.unpatchify(model.final_layer(z, y_emb))
        assert torch.allclose(rebuilt, model(x, t, y, num_iterations=4), atol=1e-6)


def test_contraction_leaves_rng_mode_weights_and_stats_alone():
    model = small_fpdm(0, fc2_scale=3.0).train()
    model(*inputs(), num_iterations=(1, 1))
    stats, weights, rng = model.last_stats, copy.deepcopy(model.state_dict()), torch.get_rng_state()
    rho, _ = contraction(model, *inputs(), power_iterations=5)
    assert math.isfinite(rho) and model.training and model.last_stats is stats
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())


def test_example_residuals_are_each_examples_and_change_nothing():
    """The last iteration's residual of each example equals that example's batch residual when it runs alone, and
    tracking it changes neither the output nor the gradients."""
    model = small_fpdm(0, fc2_scale=3.0)
    x, t, y = inputs(3)
    out = model(x, t, y, num_iterations=(2, 3))
    per_example = model.last_stats.example_residuals
    assert per_example.shape == (3,) and not per_example.requires_grad
    for i in range(3):
        model(x[i:i + 1], t[i:i + 1], y[i:i + 1], num_iterations=(2, 3))
        assert torch.allclose(model.last_stats.residual, per_example[i], rtol=1e-4)
    untracked = copy.deepcopy(model)
    untracked.fixed_point_track_residuals = False
    out.square().sum().backward()
    out_untracked = untracked(x, t, y, num_iterations=(2, 3))
    out_untracked.square().sum().backward()
    assert torch.equal(out, out_untracked) and untracked.last_stats.example_residuals is None
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(model.parameters(), untracked.parameters()))


def test_metrics_window_averages_residuals_per_timestep_bucket(tmp_path):
    """Sums and counts per bucket t · 10 // T on the device, over micro-batches; NaN where no example fell."""
    cfg = configs.TrainConfig().replace(fixed_point=True, diffusion_steps=1000, tracker="none")
    accelerator = SimpleNamespace(is_main_process=True, device=torch.device("cpu"),
                                  reduce=lambda tensor, reduction: tensor)
    window = training.MetricsWindow(str(tmp_path / "metrics.csv"), cfg, accelerator, None)
    for t, r in (([0, 99, 950], [1.0, 3.0, 0.5]), ([100, 999, 50], [4.0, 1.5, 5.0])):
        stats = FixedPointStats(sjfb=(1, 1), residuals=[torch.tensor(1.0)], example_residuals=torch.tensor(r))
        window.add(torch.tensor(0.1), stats, torch.tensor(t))
    window.log(1, torch.tensor(1.0), 1e-3, accelerator, SimpleNamespace(set_postfix=lambda **_: None))
    by_t = window.take_residual_by_t(accelerator)  # the sums outlive log rows: they cover a diagnostics interval
    assert len(by_t) == BUCKETS and by_t[0] == 3.0 and by_t[1] == 4.0 and by_t[9] == 1.0
    assert all(math.isnan(v) for v in by_t[2:9])
    assert all(math.isnan(v) for v in window.take_residual_by_t(accelerator))  # and start over after a row


def test_metrics_window_keeps_an_older_runs_columns_on_resume(tmp_path):
    """A run started before metrics.csv gained columns (tflops_per_gpu, mfu) and resumed now: its rows keep the
    file's header, so the CSV stays one table; a new file gets every column."""
    import csv
    cfg = configs.TrainConfig().replace(tracker="none")
    accelerator = SimpleNamespace(is_main_process=True, device=torch.device("cpu"),
                                  reduce=lambda tensor, reduction: tensor)
    old = training.MetricsWindow.FIELDS[:10]
    (tmp_path / "old.csv").write_text(",".join(old) + "\n")
    for name in ("old.csv", "new.csv"):
        window = training.MetricsWindow(str(tmp_path / name), cfg, accelerator, None)
        window.add(torch.tensor(0.5), None, torch.tensor([1, 2]), flops=4e12)
        row = window.log(1, torch.tensor(1.0), 1e-3, accelerator, SimpleNamespace(set_postfix=lambda **_: None))
        assert row["tflops_per_gpu"] > 0 and row["mfu"] is None  # the CPU has no peak in the table
        with open(tmp_path / name, newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == (old if name == "old.csv" else training.MetricsWindow.FIELDS)
        assert len(rows) == 2 and len(rows[1]) == len(rows[0]) and rows[1][0] == "1"


def test_training_writes_diagnostics_and_trains_bit_identically_without_them(tmp_path):
    """A row of fp_diagnostics.csv every --fp-diagnostics-every steps and at the last (finite contraction, residuals
    finite where a bucket had examples), both PNGs (drawn off the training path, there when the run returns); the
    same run with --no-fp-diagnostics has the same losses and weights, bit for bit; a resume keeps each step's row
    once."""
    args = [*TINY_ARGS, "--results-dir", str(tmp_path), "--max-steps", "4", "--ckpt-every", "4", "--sample-every", "0",
            "--num-sample-images", "0", "--fp-diagnostics-every", "2"]
    on = train.main(train.parse_args([*args, "--run-name", "on"]))
    reset_accelerate()
    off = train.main(train.parse_args([*args, "--run-name", "off", "--no-fp-diagnostics"]))
    with open(os.path.join(on, "fp_diagnostics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]
    for r in rows:
        assert 0 < float(r["contraction_mean"]) <= float(r["contraction"]) < 100
        residuals = [float(r[f"r_b{b}"]) for b in range(BUCKETS)]
        assert all(math.isnan(v) or 0 < v < 10 for v in residuals) and sum(map(math.isfinite, residuals)) >= 3
    for name in ("fp_contraction.png", "fp_residual_by_t.png"):
        with open(os.path.join(on, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not os.path.exists(os.path.join(off, "fp_diagnostics.csv"))
    assert losses(on) == losses(off)
    for a, b in zip(final_weights(on, 4), final_weights(off, 4)):
        assert all(torch.equal(a[key], b[key]) for key in a)
    # A resume drops the rows after its checkpoint (as left by a crash) and logs them again: each step once.
    with open(os.path.join(on, "fp_diagnostics.csv"), "a") as f:
        f.write("5" + ",0.5" * (len(rows[0]) - 1) + "\n")
    reset_accelerate()
    train.main(train.parse_args([*args, "--run-name", "on", "--resume", "auto", "--max-steps", "7"]))
    with open(os.path.join(on, "fp_diagnostics.csv")) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [2, 4, 6, 7]  # every 2 steps, and the last
