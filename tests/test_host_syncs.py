"""No host-device sync on the hot path: every operation that makes the host wait for the device (reading a tensor's
value: .item(), .tolist(), .cpu(), .numpy(), bool/float/int of a tensor; copying a numpy array to the device), called
from this repository's code, is counted over 10 training steps and over a 20-step sample, and the counts must be
exactly what the log interval explains (measure.SyncCounter). The reads that torch makes inside its ops because of
how our code calls them (a 0-d tensor as an index, a boolean mask) are counted from the profiler
(measure.device_waits) and must be none; the CPU AdamW's reads of its own step counts are the library's (GPUs run the
fused AdamW)."""

import numpy as np
import pytest
import torch
from torch.profiler import record_function

import train
from fpdm import training
from fpdm.measure import SyncCounter, device_waits
from test_train import TINY_ARGS


def test_training_syncs_once_per_step_plus_the_log_rows(tmp_path):
    """10 FPDM steps with random S-JFB counts, logged every 5 steps: one sync per optimizer step (the NaN guard, which
    every process must agree on before the optimizer runs, read with the preemption flag that every process must agree
    on too: one max all-reduce of the two, one tolist), 2 per log row (loss and fixed-point residual, averaged over the
    processes in one all-reduce; gradient norm) and one per diagnostics row (a tolist of the per-timestep-bucket residual sums and counts of
    --fp-diagnostics, on by default for FPDM; every --fp-diagnostics-every steps and at the last), nothing else:
    schedule tables are built on the device once, losses, counts and residuals (per-example ones bucketed by t too)
    are summed on the device, the EMA is one fused op. (The contraction estimate runs after that row, outside the
    counted functions: it reads its result once per diagnostics row.)"""
    with SyncCounter() as counter:
        counter.watch(train, "update_ema")
        counter.watch(training.MetricsWindow, "log", "take_residual_by_t")
        args = [a for a in TINY_ARGS]
        args[args.index("--log-every") + 1] = "5"
        cfg = train.parse_args([*args, "--fixed-point-no-grad-max-iters", "4", "--fixed-point-with-grad-max-iters",
                                "3", "--results-dir", str(tmp_path), "--run-name", "syncs", "--max-steps", "10",
                                "--ckpt-every", "10", "--sample-every", "0"])
        counter.watch(train, "train_step")
        counted = train.train_step

        def marked(*args, **kwargs):  # for the profiler (SyncCounter puts the original back on exit)
            with record_function("train_step"):
                return counted(*args, **kwargs)
        train.train_step = marked
        waits = device_waits(lambda: train.main(cfg), frames=False)
    # Nothing in a step makes torch wait for the device inside its ops (a 0-d index, a boolean mask), except the CPU
    # AdamW's own reads of its step counts (GPUs run the fused AdamW: none); the reads outside the steps are the log
    # rows, the sample grid, the checkpoint.
    assert {where for _, where in waits} <= {"Optimizer.step#AdamW.step", "top"}, waits
    # ("tolist", _index): the data order, a CPU permutation listed once per epoch (not a device sync).
    expected = {("tolist", "training.py:_index"): 1, ("tolist", "train.py:train_step"): 10,
                ("tolist", "training.py:log"): 2, ("__float__", "training.py:log"): 2,
                ("tolist", "training.py:take_residual_by_t"): 1}
    assert counter.calls == expected, counter.calls
    assert counter.total == 1 + 10 * 1 + 2 * 2 + 1


def test_sampling_syncs_once_per_sample_call():
    """A 20-step DDIM sample of an FPDM with guidance, solution reuse and fixed iterations: no sync at any step (the
    residuals stay on the device until read, the schedule tables are built once, reuse checks its timesteps on the
    device); reading the compute report afterwards is one sync for all 20 steps' residuals."""
    from fpdm.sampling import diffusion_for_sampling, sample_images
    from test_sampling import TRAIN_CONFIG, tiny_fpdm

    model = tiny_fpdm(class_dropout_prob=0.1)
    diffusion = diffusion_for_sampling(TRAIN_CONFIG, 20)
    noise, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with SyncCounter() as counter:
        run = counter.counting(sample_images)
        run(model, diffusion, noise, labels, cfg_scale=2.0, iterations_per_step=3, reuse=True)
        tables = sum(isinstance(v, np.ndarray) for v in vars(diffusion).values())
        assert counter.calls == {("from_numpy", "gaussian_diffusion.py:_on_device"): tables}, counter.calls  # once
        counter.calls = {}
        _, fn = run(model, diffusion, noise, labels, cfg_scale=2.0, iterations_per_step=3, reuse=True)
        assert counter.calls == {}, counter.calls
    # nor inside torch's ops (measure.device_waits: no 0-d index, no boolean mask, no value that decides a size)
    for schedule in ("constant", "linear"):  # a linear guidance schedule's scales are computed on the device too
        assert device_waits(lambda: sample_images(model, diffusion, noise, labels, cfg_scale=2.0, iterations_per_step=3,
                                                  reuse=True, guidance_schedule=schedule)) == {}, schedule
    with SyncCounter() as counter:
        report = counter.counting(fn.compute)()
    assert counter.calls == {("tolist", "sampling.py:residuals"): 1}, counter.calls
    assert len(report["final_residual_per_step"]) == 20
    assert report["block_evals"] == 20 * (3 + len(model.blocks_pre) + len(model.blocks_post))


def test_anderson_layer_solves_read_the_device_once_per_call_without_a_tolerance():
    """--fp-solver anderson at a fixed iteration count: nothing can stop early, so each FPDM call reads the device
    once, after its last iteration (it read after every iteration on the CPU, every 2nd on a GPU)."""
    from fpdm.sampling import FixedPointSolver, diffusion_for_sampling, sample_images
    from test_sampling import TRAIN_CONFIG, tiny_fpdm

    model = tiny_fpdm(class_dropout_prob=0.1)
    diffusion = diffusion_for_sampling(TRAIN_CONFIG, 20)
    noise, labels = torch.randn(3, 1, 8, 8), torch.tensor([1, 2, 3])
    with SyncCounter() as counter:
        _, fn = counter.counting(sample_images)(model, diffusion, noise, labels, cfg_scale=2.0, iterations_per_step=4,
                                                fp_solver=FixedPointSolver("anderson"))
    counter.calls.pop(("from_numpy", "gaussian_diffusion.py:_on_device"))  # the schedule tables, once
    assert counter.calls == {("tolist", "solvers.py:_read"): 20}, counter.calls
    assert fn.iterations == [4] * 20


def test_device_waits_counts_the_reads_inside_torch():
    """measure.device_waits: a 0-d tensor as an index and a boolean mask wait for the device; an int index, a 1-d
    index and torch.linalg.solve_ex do not (its CPU kernel reads its pivots, which the profiler shows, but the
    device-generic code reads nothing: it runs on the meta device, where any read raises)."""
    x, i = torch.arange(6.0), torch.tensor(2)
    assert device_waits(lambda: x[i]) == {("aten::_local_scalar_dense", "top"): 1}
    assert device_waits(lambda: x[x > 2]) == {("aten::nonzero", "aten::index"): 1}
    assert device_waits(lambda: (x[2], x[i.view(1)], x.index_select(0, i.view(1)))) == {}
    H, rhs = torch.eye(3).expand(2, 3, 3) + 0.1, torch.ones(2, 3, 1)
    assert device_waits(lambda: torch.linalg.solve_ex(H, rhs)) == {}
    torch.linalg.solve_ex(H.to("meta"), rhs.to("meta"))
    with pytest.raises(RuntimeError, match="meta"):
        x.to("meta")[i.to("meta")]
