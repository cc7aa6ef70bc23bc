"""Preemption: SIGTERM / SIGUSR1 (what Slurm sends before it kills or requeues a job) stop train.py at the next step
boundary on every process; the main process checkpoints that step, records it in `preempted.json`, releases the run
lock, and every process exits with training.PREEMPTED_EXIT_CODE; `--resume auto` then continues the run exactly."""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import train
from conftest import reset_accelerate
from fpdm import training
from fpdm.run_folders import RunLock, StopSignals
from test_train import ROOT, TINY_ARGS, final_weights, losses, processes_running


def run(tmp_path, *extra, name="run"):
    return train.main(train.parse_args([*TINY_ARGS, "--results-dir", str(tmp_path), "--run-name", name, *extra]))


def assert_lock_released(run_dir):
    """The lock file names no owner (a clean exit) and can be taken at once."""
    assert open(os.path.join(run_dir, ".lock")).read() == ""
    lock = RunLock(str(run_dir)).acquire()
    assert lock.previous_owner is None
    lock.release()


def assert_same_weights(a_dir, b_dir, step, **tolerance):
    for a, b in zip(final_weights(a_dir, step), final_weights(b_dir, step)):  # model, then EMA
        for key in a:
            torch.testing.assert_close(a[key], b[key], msg=key, **(tolerance or {"atol": 0, "rtol": 0}))


def test_a_stop_signal_during_an_evaluation_ends_it_at_a_chunk_and_the_resumed_run_makes_it(tmp_path, monkeypatch):
    """FID during training at ImageNet scale (10k samples) outlasts a scheduler's grace period: a SIGUSR1 while the
    evaluation of step 2 samples its first chunk ends it there (on every process: the flag is reduced per chunk),
    the step was checkpointed before it (as every evaluation's) and the run exits preempted; the resumed run makes that
    evaluation first and ends with the eval.csv of a run never stopped."""
    import fpdm.sampling
    flags = ["--max-steps", "4", "--ckpt-every", "4", "--eval-every", "2", "--eval-samples", "12",
             "--eval-batch-size", "4", "--eval-steps", "3", "--num-sample-images", "0"]
    run(tmp_path, *flags, name="never-stopped")
    # every evaluation's step checkpointed first (--ckpt-every 4 would not have made step 2's)
    assert sorted(os.listdir(tmp_path / "never-stopped" / "checkpoints")) == ["step_0000002.pt", "step_0000004.pt"]
    reset_accelerate()
    real, calls = fpdm.sampling.sample_images, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)
    monkeypatch.setattr(fpdm.sampling, "sample_images", signalled)
    with pytest.raises(training.TrainingPreempted) as stopped:
        run(tmp_path, *flags, name="stopped")
    assert (stopped.value.signal_name, stopped.value.step) == ("SIGUSR1", 2) and len(calls) == 1  # one chunk of 3 sampled
    run_dir = tmp_path / "stopped"
    assert os.listdir(run_dir / "checkpoints") == ["step_0000002.pt"] and not (run_dir / "eval.csv").read_text().count("\n2,")
    assert "the evaluation of step 2 stopped by SIGUSR1: the resumed run makes it" in open(run_dir / "log.txt").read()
    monkeypatch.undo()
    reset_accelerate()
    run(tmp_path, *flags, "--resume", "auto", name="stopped")
    rows = lambda name: [r.split(",")[:3] for r in open(tmp_path / name / "eval.csv").read().splitlines()]  # noqa: E731
    assert rows("stopped") == rows("never-stopped") and len(rows("stopped")) == 3  # header, steps 2 and 4


def test_a_stop_signal_during_an_evaluations_last_chunk_keeps_the_evaluation(tmp_path, monkeypatch):
    """A SIGUSR1 while step 2's evaluation samples its last chunk: the evaluation is finished, so it is scored and
    recorded; the run stops at the next step's boundary (step 3, checkpointed) instead of dropping it for the resumed
    run to make again."""
    import fpdm.sampling
    flags = ["--max-steps", "4", "--ckpt-every", "4", "--eval-every", "2", "--eval-samples", "12",
             "--eval-batch-size", "4", "--eval-steps", "3", "--num-sample-images", "0"]
    real, calls = fpdm.sampling.sample_images, []

    def signalled(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the last of step 2's three chunks
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*args, **kwargs)
    monkeypatch.setattr(fpdm.sampling, "sample_images", signalled)
    with pytest.raises(training.TrainingPreempted) as stopped:
        run(tmp_path, *flags, name="stopped")
    assert stopped.value.step == 3 and len(calls) == 3
    assert [r.split(",")[0] for r in open(tmp_path / "stopped" / "eval.csv").read().splitlines()] == ["step", "2"]
    assert sorted(os.listdir(tmp_path / "stopped" / "checkpoints")) == ["step_0000002.pt", "step_0000003.pt"]


def test_an_evaluation_that_runs_out_of_memory_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    """Out of device memory in the second chunk of step 2's evaluation (FID during training at ImageNet scale on a
    smaller GPU): every process gives that evaluation up at the next chunk's check, the log names --eval-batch-size,
    and the run trains on to the weights and step-4 evaluation of a run that never failed (a crash there made every
    resume retry the same evaluation before any training)."""
    import fpdm.sampling
    flags = ["--max-steps", "4", "--ckpt-every", "4", "--eval-every", "2", "--eval-samples", "12",
             "--eval-batch-size", "4", "--eval-steps", "3", "--num-sample-images", "0"]
    run(tmp_path, *flags, name="never-failed")
    reset_accelerate()
    real, calls = fpdm.sampling.sample_images, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)
    monkeypatch.setattr(fpdm.sampling, "sample_images", out_of_memory_once)
    run(tmp_path, *flags, name="failed")
    assert len(calls) == 2 + 3  # step 2: given up after the failing chunk; step 4: its 3 chunks
    log = open(tmp_path / "failed" / "log.txt").read()
    assert "the evaluation of step 2 ran out of device memory on a process and was skipped: lower " \
           "--eval-batch-size (now 4)" in log
    rows = lambda name: [r.split(",")[:3] for r in open(tmp_path / name / "eval.csv").read().splitlines()]  # noqa: E731
    assert rows("failed") == [rows("never-failed")[0], rows("never-failed")[2]]  # header and step 4
    for a, b in zip(final_weights(tmp_path / "failed", 4), final_weights(tmp_path / "never-failed", 4)):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_one_process_out_of_memory_in_an_evaluation_is_skipped_by_both(tmp_path):
    """Two processes (accelerate launch): rank 1 runs out of memory in its first chunk of step 2's evaluation while
    rank 0 samples on; both give the evaluation up at the same check (no collective left waiting), train on, and
    step 4's evaluation is made."""
    flags = [*TINY_ARGS, "--results-dir", str(tmp_path), "--run-name", "two", "--max-steps", "4", "--ckpt-every", "4",
             "--eval-every", "2", "--eval-samples", "12", "--eval-batch-size", "3", "--eval-steps", "3",
             "--num-sample-images", "0"]
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
           os.path.join(ROOT, "aconfs", "cpu_2proc.yaml"), "--main_process_port", "29519",
           os.path.join(ROOT, "tests", "oom_eval_train.py"), *flags]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "OOM_RANK": "1",
                               "OOM_CALL": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(tmp_path / "two" / "log.txt").read()
    assert "the evaluation of step 2 ran out of device memory on a process and was skipped" in log
    assert [r.split(",")[0] for r in open(tmp_path / "two" / "eval.csv").read().splitlines()] == ["step", "4"]


def test_stop_signal_checkpoints_the_step_and_the_run_resumes_exactly(tmp_path, monkeypatch):
    """A real SIGUSR1 to this process during step 3 (then a SIGTERM during the stop, which changes nothing): the run
    finishes step 3 and stops, with step 3's checkpoint (not a periodic one: --ckpt-every 100), latest.json on it,
    preempted.json, the lock released and this process's signal handlers as before; `--resume auto` continues to
    step 6 bit for bit as a run that was never stopped, and a signal during the last step ends the run as finished."""
    real_step, sent = train.train_step, []

    def signalling_step(*args, **kwargs):
        if args[10] == 2 and not sent:  # 0-based step 2: the third
            sent.append(os.getpid())
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)  # a second signal: still one stop, named by the first
        return real_step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", signalling_step)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    flags = ["--ckpt-every", "100", "--num-sample-images", "0", "--fp-diagnostics-every", "3"]
    with pytest.raises(training.TrainingPreempted) as stopped:
        run(tmp_path, "--max-steps", "6", *flags, name="stopped")
    assert {sig: signal.getsignal(sig) for sig in before} == before
    run_dir = tmp_path / "stopped"
    e = stopped.value
    assert (e.signal_name, e.step, e.exit_code) == ("SIGUSR1", 3, training.PREEMPTED_EXIT_CODE) and e.exit_code == 3
    assert str(e) == ("preempted by SIGUSR1 at step 3: checkpoint step_0000003.pt written; resume with --resume auto "
                      "(exit code 3)")
    assert str(e) in open(run_dir / "log.txt").read()
    assert os.listdir(run_dir / "checkpoints") == ["step_0000003.pt"]
    assert json.load(open(run_dir / "latest.json")) == {"step": 3, "path": "checkpoints/step_0000003.pt"}
    assert json.load(open(run_dir / "preempted.json")) == {"signal": "SIGUSR1", "step": 3, "exit_code": 3,
                                                          "checkpoint": "checkpoints/step_0000003.pt"}
    assert list(losses(run_dir)) == [1, 2, 3]
    assert_lock_released(run_dir)

    monkeypatch.setattr(train, "train_step", real_step)
    reset_accelerate()
    run(tmp_path, "--max-steps", "6", *flags, "--resume", "auto", name="stopped")
    assert not (run_dir / "preempted.json").exists()
    reset_accelerate()
    straight = run(tmp_path, "--max-steps", "6", *flags, name="straight")
    assert losses(run_dir) == losses(straight)
    assert_same_weights(run_dir, straight, 6)
    diagnostics = lambda folder: [row.split(",")[0] for row in open(os.path.join(folder, "fp_diagnostics.csv"))]  # noqa: E731
    assert diagnostics(run_dir) == diagnostics(straight) == ["step", "3", "6"]  # the stop step's row is not lost

    # A signal during the last step: the run is complete, so it ends as finished (no preemption, no marker).
    sent.clear()
    monkeypatch.setattr(train, "train_step", signalling_step)
    reset_accelerate()
    assert run(tmp_path, "--max-steps", "3", *flags, name="last") == str(tmp_path / "last")
    assert sent and not (tmp_path / "last" / "preempted.json").exists()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_stop_signals_only_note_the_first_signal_and_restore_the_handlers():
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        with StopSignals() as stop:
            assert stop.received == 0
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.received == signal.SIGTERM
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_sigterm_to_the_process_group_of_python_train_py_exits_with_the_code(tmp_path):
    """`python train.py` with 2 DataLoader workers, SIGTERM to its whole process group (as a scheduler signals every
    process of a job): the workers ignore it, the run checkpoints the step it stops at, prints the line, and exits
    with PREEMPTED_EXIT_CODE, leaving no process behind (a worker that ignores SIGTERM must still be shut down)."""
    name = "group"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *TINY_ARGS, "--results-dir", str(tmp_path), "--run-name",
           name, "--max-steps", "100000", "--ckpt-every", "100000", "--num-workers", "2", "--num-sample-images", "0",
           "--no-fp-diagnostics"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,  # its own process group, as a job's
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    metrics = tmp_path / name / "metrics.csv"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.pid, 0)  # no DataLoader worker left
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == training.PREEMPTED_EXIT_CODE == 3, err[-3000:]
    stop = json.load(open(tmp_path / name / "latest.json"))["step"]
    assert stop >= 2 and os.listdir(tmp_path / name / "checkpoints") == [f"step_{stop:07d}.pt"]
    assert (f"preempted by SIGTERM at step {stop}: checkpoint step_{stop:07d}.pt written; resume with --resume auto "
            f"(exit code 3)") in out
    assert json.load(open(tmp_path / name / "preempted.json"))["step"] == stop
    assert_lock_released(tmp_path / name)


def test_sigterm_to_one_rank_of_accelerate_launch_stops_both_and_resumes(tmp_path):
    """A real `accelerate launch` of 2 CPU processes; SIGTERM reaches only rank 1 (not the main process, which holds
    the lock and writes): at the next step both ranks agree through the step's all-reduce, rank 0 writes that step's
    checkpoint (both ranks' RNG states), both exit with PREEMPTED_EXIT_CODE (accelerate launch itself exits 1, as for
    any failed worker: preempted.json says what happened). The same launch with `--resume auto` continues to the
    target step: the same losses and weights as an uninterrupted run (one process, same global batch: equal up to
    float summation order, as in test_train.py::test_two_process_cpu_run_through_accelerate)."""
    name = f"preempted-{os.getpid()}"
    flags = [*TINY_ARGS, "--results-dir", str(tmp_path), "--ckpt-every", "100000", "--num-sample-images", "0",
             "--no-fp-diagnostics"]

    def launch(*extra):
        cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
               os.path.join(ROOT, "aconfs", "cpu_2proc.yaml"), "--main_process_port", "29523",
               os.path.join(ROOT, "train.py"), *flags, "--run-name", name, *extra]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})

    launcher = launch("--max-steps", "100000")
    run_dir = tmp_path / name
    metrics = run_dir / "metrics.csv"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
            time.sleep(0.1)  # both ranks have taken step 2
        workers = [pid for pid in processes_running(name) if pid != launcher.pid]
        rank1 = [pid for pid in workers if b"LOCAL_RANK=1\0" in open(f"/proc/{pid}/environ", "rb").read()]
        assert len(workers) == 2 and len(rank1) == 1, "the workers did not start"
        os.kill(rank1[0], signal.SIGTERM)
        out, err = launcher.communicate(timeout=120)
    finally:
        for pid in processes_running(name):
            os.kill(pid, signal.SIGKILL)
    assert launcher.returncode == 1, err[-3000:]
    assert re.findall(r"exitcode\s*:\s*(-?\d+)", err) and set(re.findall(r"exitcode\s*:\s*(-?\d+)", err)) == {"3"}, \
        err[-3000:]
    marker = json.load(open(run_dir / "preempted.json"))
    stop = marker["step"]
    assert marker == {"signal": "SIGTERM", "step": stop, "exit_code": training.PREEMPTED_EXIT_CODE,
                      "checkpoint": f"checkpoints/step_{stop:07d}.pt"}
    assert f"preempted by SIGTERM at step {stop}: checkpoint step_{stop:07d}.pt written" in out
    assert stop >= 3 and json.load(open(run_dir / "latest.json"))["step"] == stop
    assert os.listdir(run_dir / "checkpoints") == [f"step_{stop:07d}.pt"]
    ckpt = torch.load(run_dir / "checkpoints" / f"step_{stop:07d}.pt", weights_only=True)
    assert ckpt["step"] == stop and ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    with open(metrics) as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == list(range(1, stop + 1))
    assert_lock_released(run_dir)

    target = stop + 2
    resumed = launch("--max-steps", str(target), "--resume", "auto")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert not (run_dir / "preempted.json").exists()
    reference = train.main(train.parse_args([*flags, "--run-name", "reference", "--max-steps", str(target)]))
    assert list(losses(run_dir)) == list(range(1, target + 1))
    assert losses(run_dir) == pytest.approx(losses(reference), rel=1e-5)
    assert_same_weights(run_dir, reference, target, atol=1e-6, rtol=1e-4)
