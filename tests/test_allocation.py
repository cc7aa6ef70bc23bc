"""fpdm/allocation.py: the budget allocator spends exactly its budget (real tiny FPDM, sample_images and sample.py),
reproduces the optimal split on geometric residuals, and refuses budgets below one iteration per step; FPDM.solve's
`stop` hook; the step weights of sampling.calibrate_step_weights."""

import json
import os

import numpy as np
import pytest
import torch

from fpdm import sample_config

import sample as sample_cli
from fpdm import cli
from fpdm.allocation import BudgetAllocator
from fpdm.sampling import diffusion_for_sampling, sample_images
from models import FixedPointStats
from test_sampling import TRAIN_CONFIG, tiny_fpdm


# ----------------------------------------------------------------------------------------------------------------
# FPDM.solve's stop hook
# ----------------------------------------------------------------------------------------------------------------

def test_stop_hook_ends_the_call_and_changes_nothing_else():
    model = tiny_fpdm()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([500, 500]), torch.tensor([1, 2])
    with torch.no_grad():
        fixed = model(x, t, y, num_iterations=3)
        never = model(x, t, y, num_iterations=3, stop=lambda stats: False)
        assert model.last_stats.iterations == 3 and len(model.last_stats.residuals) == 3
        asked = []
        stopped = model(x, t, y, num_iterations=8, stop=lambda stats: asked.append(stats.iterations) or
                        stats.iterations == 3)
    assert asked == [1, 2, 3]  # once per iteration
    assert model.last_stats.iterations == 3
    torch.testing.assert_close(never, fixed, rtol=0, atol=0)
    torch.testing.assert_close(stopped, fixed, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# The exact budget, with a real FPDM
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps,extra,reuse,cfg", [(5, 12, True, 1.0), (8, 30, False, 2.0), (6, 0, True, 2.0),
                                                   (4, 1, False, 1.0)])
def test_sampling_spends_the_block_budget_exactly(steps, extra, reuse, cfg):
    model = tiny_fpdm(class_dropout_prob=0.1)
    block_budget = steps * (len(model.blocks_pre) + len(model.blocks_post)) + steps + extra
    total = steps + extra
    diffusion = diffusion_for_sampling(TRAIN_CONFIG, steps)
    g = torch.Generator().manual_seed(0)
    noise, labels = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 2, 3])
    allocator = BudgetAllocator(total, steps)
    for _ in range(2):  # the allocator passed in is a specification: each batch spends the whole budget again
        _, fn = sample_images(model, diffusion, noise, labels, cfg_scale=cfg, iterations_per_step=allocator,
                              reuse=reuse)
        report = fn.compute()
        assert sum(report["iterations_per_step"]) == total and len(report["iterations_per_step"]) == steps
        assert min(report["iterations_per_step"]) >= 1
        assert report["block_evals"] == block_budget
        assert len(report["allocation"]["lambda_per_step"]) == steps
    assert allocator.spent == []


def test_sample_cli_budget_allocation(tmp_path):
    model = tiny_fpdm(class_dropout_prob=0.1)
    path = str(tmp_path / "tiny.pt")
    torch.save({"format": "fpdm-train-v1", "model_config": model.config, "model": model.state_dict(),
                "ema": model.state_dict(), "config": TRAIN_CONFIG, "step": 10}, path)
    out, report = sample_cli.main(sample_cli.parse_args([
        "--ckpt", path, "--num-sampling-steps", "6", "--budget-block-evals", "40", "--fp-allocation", "budget",
        "--reuse", "--num-samples", "4", "--out", str(tmp_path / "s"), "--device", "cpu"]))
    saved = json.load(open(os.path.join(out, "compute.json")))
    assert saved["block_evals"] == 40 and sum(saved["iterations_per_step"]) == 40 - 6 * 2
    assert json.load(open(os.path.join(out, "args.json")))["resolved"]["iterations_per_step"] == {
        "allocator": "budget", "total_iterations": 28, "num_steps": 6, "window": 5}
    for flags, message in ((["--iterations", "4"], "give --budget-block-evals"),
                           (["--budget-block-evals", "40", "--adaptive-tol", "0.1"], "--adaptive-tol does not apply to --fp-allocation"),
                           (["--budget-block-evals", "40", "--schedule", "more-noisy"], "--schedule does not apply"),
                           (["--budget-block-evals", "17"], "raise it to at least 18")):
        with pytest.raises(ValueError, match=message):
            sample_cli.main(sample_cli.parse_args(["--ckpt", path, "--num-sampling-steps", "6", "--fp-allocation",
                                                   "budget", *flags, "--out", str(tmp_path / "x"), "--device",
                                                   "cpu"]))


def test_budget_below_one_iteration_per_step_is_refused_in_one_line():
    with pytest.raises(ValueError, match="below one iteration per step for 10 steps: raise the budget") as error:
        BudgetAllocator(9, 10)
    assert "\n" not in str(error.value)
    args = sample_config.parse_args(["--ckpt", "x", "--fp-allocation", "budget", "--budget-block-evals", "5"])
    with pytest.raises(ValueError, match="less than one iteration per step"):
        cli.fpdm_iterations(args, tiny_fpdm(), 4)


# ----------------------------------------------------------------------------------------------------------------
# Optimality on geometric residuals
# ----------------------------------------------------------------------------------------------------------------

def run_toy(allocator, a, rho):
    """Drive `allocator` over steps whose residual after k iterations is a_i ρ_i^k (a stats stream as FPDM.solve
    gives one); returns the iterations per step."""
    for a_i, rho_i in zip(a, rho):
        cap, stop = allocator.next_step()
        stats = FixedPointStats()
        for k in range(1, cap + 1):
            stats.residuals.append(torch.tensor(a_i * rho_i ** k, dtype=torch.float64))
            stats.iterations = k
            if stop is not None and stop(stats):
                break
        allocator.finish_step(stats.iterations)
    return allocator.spent


def optimal_split(a, rho, budget):
    """argmin Σ a_i ρ_i^k_i subject to Σ k_i = budget, k_i >= 1: greedy on marginal gains, which is exact for
    convex decreasing residuals (computed independently of the allocator)."""
    k = [1] * len(a)
    for _ in range(budget - len(a)):
        i = max(range(len(a)), key=lambda i: a[i] * rho[i] ** k[i] * (1 - rho[i]))
        k[i] += 1
    return k


def objective(a, rho, k):
    return sum(a_i * rho_i ** k_i for a_i, rho_i, k_i in zip(a, rho, k))


@pytest.mark.parametrize("steps,budget,slope,rate", [(20, 60, -0.03, 0.6), (20, 100, 0.02, 0.7), (12, 50, 0.0, 0.5),
                                                     (16, 40, -0.04, 0.4)])
def test_smooth_drift_gets_the_optimal_split_within_one_iteration_per_step(steps, budget, slope, rate):
    """One contraction rate, first residuals drifting slowly (as in sampling): the online split is within one
    iteration of the offline optimum at every step, and its total residual within 15% of the optimum's (a level
    projection cannot follow the drift)."""
    a, rho = [float(np.exp(slope * i)) for i in range(steps)], [rate] * steps
    spent = run_toy(BudgetAllocator(budget, steps), a, rho)
    best = optimal_split(a, rho, budget)
    assert sum(spent) == budget
    assert max(abs(s - b) for s, b in zip(spent, best)) <= 1, (spent, best)
    assert objective(a, rho, spent) <= 1.15 * objective(a, rho, best)


@pytest.mark.parametrize("steps,budget,rate", [(20, 64, 0.5), (20, 96, 0.6), (12, 40, 0.4)])
def test_cold_first_step_then_level_residuals(steps, budget, rate):
    """Sampling with reuse: step 0 starts cold (first residual 30x the others), step 1 partly (3x), the rest alike.
    "level" leaves step 0 out of its projection: from step 2 on it spends what steps 0 and 1 left close to the
    offline optimum of the rest (within two iterations per step, 5% of its summed residual: step 1 stays in the
    window a while); it is blind at steps 0 and 1 (it cannot know the later steps are 30x and 3x smaller)."""
    a = [30.0, 3.0] + [1.0] * (steps - 2)
    rho = [rate] * steps
    level = run_toy(BudgetAllocator(budget, steps), a, rho)
    rest = optimal_split(a[2:], rho[2:], budget - level[0] - level[1])
    assert sum(level) == budget and max(abs(s - b) for s, b in zip(level[2:], rest)) <= 2, (level, rest)
    assert objective(a[2:], rho[2:], level[2:]) <= 1.05 * objective(a[2:], rho[2:], rest)


def test_no_choice_and_rising_residuals():
    """A budget of one iteration per step leaves no choice; residuals that rise end every step after the iteration
    that showed it (the first step takes two to learn a rate), and the last step takes all that is left."""
    assert run_toy(BudgetAllocator(5, 5), [1.0] * 5, [0.5] * 5) == [1] * 5
    spent = run_toy(BudgetAllocator(30, 5), [1.0] * 5, [1.1] * 5)
    assert sum(spent) == 30 and spent[0] == 2 and all(k <= 2 for k in spent[:-1]) and spent[-1] >= 30 - 8


# ----------------------------------------------------------------------------------------------------------------
# Step weights: the objective Σ w_i r_i(k_i), and their calibration on a real FPDM
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps,budget,rate", [(20, 60, 0.6), (12, 50, 0.5), (16, 70, 0.7)])
def test_weighted_objective_gets_the_weighted_optimal_split(steps, budget, rate):
    """Weights known in advance (here rising 30x over the last quarter of the steps, as clean steps weigh more) on
    steps whose residuals look alike: the online split is within one iteration of the offline optimum of Σ w_i r_i
    at every step, and puts the extra iterations where the weights are, unlike the unweighted rule."""
    a, rho = [1.0] * steps, [rate] * steps
    w = [1.0 if i < 3 * steps // 4 else 30.0 for i in range(steps)]
    spent = run_toy(BudgetAllocator(budget, steps, weights=w), a, rho)
    best = optimal_split([wi * ai for wi, ai in zip(w, a)], rho, budget)
    assert sum(spent) == budget
    assert max(abs(s - b) for s, b in zip(spent, best)) <= 1, (spent, best)
    unweighted = run_toy(BudgetAllocator(budget, steps), a, rho)
    assert sum(spent[3 * steps // 4:]) > sum(unweighted[3 * steps // 4:]) + steps // 4


def test_weights_are_checked_and_recorded():
    with pytest.raises(ValueError, match="step weights must be 4 finite positive numbers"):
        BudgetAllocator(10, 4, weights=[1.0, 2.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="got 3: calibrate them for this number of steps"):
        BudgetAllocator(10, 4, weights=[1.0, 2.0, 1.0])
    allocator = BudgetAllocator(10, 4, weights=[1, 2, 3, 4])
    assert allocator.to_dict()["weights"] == [1.0, 2.0, 3.0, 4.0]
    assert allocator.restarted().weights == allocator.weights


@pytest.mark.parametrize("reuse,cfg", [(True, 2.0), (False, 1.0)])
def test_calibrated_weights_on_a_real_fpdm(reuse, cfg):
    """calibrate_step_weights on the tiny FPDM: one positive weight per step, mean 1, deterministic; the same for a
    batch given twice (per-image means and batch-relative residuals do not depend on the batch's size); the last
    step's weight matches a direct measurement; an allocator with them spends its budget exactly."""
    from fpdm.sampling import calibrate_step_weights
    model = tiny_fpdm(class_dropout_prob=0.1)
    steps, iterations = 5, [2, 2, 2, 2, 2]
    diffusion = diffusion_for_sampling(TRAIN_CONFIG, steps)
    g = torch.Generator().manual_seed(3)
    noise, labels = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 2, 3])
    options = dict(reuse=reuse, cfg_scale=cfg)
    w = calibrate_step_weights(model, diffusion, noise, labels, iterations, **options)
    assert len(w) == steps and all(v > 0 for v in w) and sum(w) / steps == pytest.approx(1.0)
    assert calibrate_step_weights(model, diffusion, noise, labels, iterations, **options) == w
    doubled = calibrate_step_weights(model, diffusion, torch.cat([noise, noise]), torch.cat([labels, labels]),
                                     iterations, **options)
    np.testing.assert_allclose(doubled, w, rtol=1e-4)

    base, _ = sample_images(model, diffusion, noise, labels, iterations_per_step=iterations, **options)
    raw = []
    for i in range(steps):
        more = list(iterations)
        more[i] += 1
        out, fn = sample_images(model, diffusion, noise, labels, iterations_per_step=more, residual_history=True,
                                **options)
        r = fn.residuals[i]
        assert len(r) == 3
        raw.append(float((out - base).flatten(1).norm(dim=1).mean()) / max(r[1] - r[2], 1e-3 * r[1]))
    np.testing.assert_allclose(w, np.array(raw) / np.mean(raw), rtol=1e-5)

    _, fn = sample_images(model, diffusion, noise, labels, iterations_per_step=BudgetAllocator(17, steps, weights=w),
                          **options)
    assert sum(fn.compute()["iterations_per_step"]) == 17


def test_sample_cli_calibrated_allocation(tmp_path, monkeypatch):
    """`--fp-allocation calibrated` through sample.py, with DDIM noise (eta 1): the budget is spent exactly, the
    folder's identity records the calibration batch (not the measured weights), the compute report and
    calibration.json the weights; a rerun with the same flags takes them from calibration.json (no second
    measurement), and one with other settings is refused before measuring anything."""
    model = tiny_fpdm(class_dropout_prob=0.1)
    path = str(tmp_path / "tiny.pt")
    torch.save({"format": "fpdm-train-v1", "model_config": model.config, "model": model.state_dict(),
                "ema": model.state_dict(), "config": TRAIN_CONFIG, "step": 10}, path)
    flags = ["--ckpt", path, "--num-sampling-steps", "5", "--budget-block-evals", "30", "--fp-allocation",
             "calibrated", "--calibration-samples", "3", "--reuse", "--eta", "1", "--num-samples", "4", "--out",
             str(tmp_path / "s"), "--device", "cpu"]
    out, _ = sample_cli.main(sample_cli.parse_args(flags))
    saved = json.load(open(os.path.join(out, "compute.json")))
    assert saved["block_evals"] == 30 and sum(saved["iterations_per_step"]) == 30 - 5 * 2
    weights = saved["allocation"]["weights"]
    assert len(weights) == 5 and min(weights) > 0
    identity = json.load(open(os.path.join(out, "args.json")))["resolved"]["iterations_per_step"]
    assert identity == {"allocator": "budget", "total_iterations": 20, "num_steps": 5, "window": 5,
                        "calibration": {"samples": 3, "seed": 1}}
    assert json.load(open(os.path.join(out, "calibration.json"))) == {"weights": weights}
    from fpdm import cli

    def measured(*args, **kwargs):
        raise AssertionError("calibrated again")
    monkeypatch.setattr(cli, "calibrate_step_weights", measured)
    sample_cli.main(sample_cli.parse_args(flags))  # same flags: resumes, with the recorded weights
    assert json.load(open(os.path.join(out, "compute.json")))["allocation"]["weights"] == weights
    with pytest.raises(FileExistsError, match="other settings"):  # refused before a calibration
        sample_cli.main(sample_cli.parse_args(flags + ["--calibration-samples", "2"]))
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--calibration-samples must be >= 1"):
        sample_cli.main(sample_cli.parse_args(flags[:-2] + ["--device", "cpu", "--calibration-samples", "0"]))
