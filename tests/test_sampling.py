"""fpdm/sampling.py, sample.py and sample_ddp.py: iteration schedules, reuse, adaptive stopping, compute accounting,
process-count independence and resumption of sharded sampling, and errors for bad flags."""

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest
import torch

import sample as sample_cli
import sample_ddp
from fpdm import cli
from fpdm.metrics import load_images
from fpdm.sampling import (GuidedModel, diffusion_for_sampling, file_fingerprint, iteration_schedule,
                           iterations_from_block_budget, sample_images)
from models import DiT
from recording_sample_ddp import read_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = {"noise_schedule": "cosine", "learn_sigma": False, "predict_v": True, "zero_terminal_snr": False,
                "diffusion_steps": 1000}


def tiny_fpdm(contractive=True, **kwargs):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=6, num_heads=4, num_classes=10,
                learn_sigma=False, fixed_point=True, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if contractive:  # shrink the projection MLP: f(z) = block(fc2(gelu(fc1([z, u])))) contracts in z
            model.block_fixed_point_projection_fc1.weight.mul_(0.3)
            model.block_fixed_point_projection_fc2.weight.mul_(0.3)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "step_0000010.pt"
    model = tiny_fpdm(class_dropout_prob=0.1)
    torch.save({"format": "fpdm-train-v1", "model_config": model.config, "model": model.state_dict(),
                "ema": model.state_dict(), "config": TRAIN_CONFIG, "step": 10}, path)
    return str(path)


# ----------------------------------------------------------------------------------------------------------------
# Iteration schedules and budgets
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("budget,steps", [(480, 40), (7, 3), (50, 50), (1001, 17)])
def test_schedules_sum_to_budget_point_the_named_way_and_never_drop_below_one(budget, steps):
    flat = iteration_schedule(budget, steps, "flat")
    noisy = iteration_schedule(budget, steps, "more-noisy")
    clean = iteration_schedule(budget, steps, "more-clean")
    for counts in (flat, noisy, clean):
        assert sum(counts) == budget and len(counts) == steps and min(counts) >= 1
    assert max(flat) - min(flat) <= 1
    if budget >= 2 * steps:  # enough slack for the tilt to show
        half = steps // 2
        assert sum(noisy[:half]) > sum(noisy[-half:])  # sampling order: the first steps are the noisiest
        assert sum(clean[:half]) < sum(clean[-half:])
        assert noisy[0] > noisy[-1] and clean[0] < clean[-1]


def test_release_formula_for_the_papers_setting():
    # 40 steps at 12 iterations each: the release's 1 + (B - S)·r_i / Σr with r linear 1.5 -> 0.5 (noisy first).
    counts = iteration_schedule(480, 40, "more-noisy")
    r = np.linspace(1.5, 0.5, 40)
    ideal = 1 + (480 - 40) * r / r.sum()
    assert np.abs(np.array(counts) - ideal).max() < 1


def test_block_budget_matches_dit_compute():
    model = tiny_fpdm()  # pre 1 + post 1
    counts = iterations_from_block_budget(model, 560, 40, "flat")  # the paper's 40 x (1 + 12 + 1)
    assert counts == [12] * 40
    assert sum(model.block_evaluations(k) for k in counts) == 560


def test_bad_budgets_and_schedules():
    model = tiny_fpdm()
    with pytest.raises(ValueError, match="must be positive"):
        iterations_from_block_budget(model, -5, 10)
    with pytest.raises(ValueError, match="at least 30"):
        iterations_from_block_budget(model, 25, 10)  # 20 go to pre/post, 5 < one iteration per step
    with pytest.raises(ValueError, match="below one iteration per step"):
        iteration_schedule(9, 10)
    with pytest.raises(ValueError, match="unknown iteration schedule 'increasing'"):
        iteration_schedule(100, 10, "increasing")


# ----------------------------------------------------------------------------------------------------------------
# Reuse, adaptive stopping, accounting
# ----------------------------------------------------------------------------------------------------------------

def run_sampler(model, steps=10, **kwargs):
    diffusion = diffusion_for_sampling(TRAIN_CONFIG, steps)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4, 1, 8, 8, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    return sample_images(model, diffusion, noise, labels, **kwargs)


def test_sampler_registry_has_one_signature_and_clear_errors():
    """Every registered sampler takes (model, diffusion, x, *, model_kwargs, clip_denoised, progress, options...);
    unknown names and options a sampler lacks are one-line errors; the parallel sampler, reached through the same
    entry point, gives sequential DDIM's samples (its exact fixed point)."""
    import inspect
    from fpdm.sampling import SAMPLERS
    assert {"ddpm", "ddim", "ddim-parallel", "dpmpp-2m", "unipc", "euler", "heun"} <= set(SAMPLERS)
    for name, fn in SAMPLERS.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["model", "diffusion", "x"], name
        assert {"model_kwargs", "clip_denoised", "progress"} <= set(params), name
    model = tiny_fpdm()
    with pytest.raises(ValueError, match="unknown sampler 'lms'"):
        run_sampler(model, sampler="lms")
    with pytest.raises(ValueError, match="sampler 'ddpm' takes no eta"):
        run_sampler(model, sampler="ddpm", eta=0.5)
    sequential, _ = run_sampler(model, iterations_per_step=2, clip_denoised=False)
    parallel, fn = run_sampler(model, sampler="ddim-parallel", iterations_per_step=2, clip_denoised=False,
                               solver_tol=1e-6, solver_max_iter=40)
    assert fn.info["converged"] and fn.info["sequential_evaluations"] == 10
    torch.testing.assert_close(parallel, sequential, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="without x0 clipping"):
        run_sampler(model, sampler="ddim-parallel", iterations_per_step=2, clip_denoised=True)


def test_reuse_lowers_first_iteration_residual():
    model = tiny_fpdm()
    _, plain = run_sampler(model, iterations_per_step=4, residual_history=True)
    _, reused = run_sampler(model, iterations_per_step=4, reuse=True, residual_history=True)
    first_plain = [r[0] for r in plain.residuals[1:]]  # step 0 has nothing to reuse
    first_reused = [r[0] for r in reused.residuals[1:]]
    assert all(b < a for a, b in zip(first_plain, first_reused))
    assert np.mean(first_reused) < 0.7 * np.mean(first_plain)  # measured: 0.55 vs 1.03
    assert reused.residuals[0][0] == pytest.approx(plain.residuals[0][0])
    assert model.solution_cache.solution is None and not model.fixed_point_reuse_solution  # model left untouched


def test_samplers_record_each_calls_last_residual_unless_asked_for_every_one():
    """By default a sampling call computes FPDM's residual once, after its last iteration (what the compute report
    and the calibration read; no residual kernels inside the iteration loop): the same figure as the full history's
    last, and the same samples; residual_history=True records every iteration's."""
    model = tiny_fpdm()
    every_samples, every = run_sampler(model, iterations_per_step=4, reuse=True, residual_history=True)
    last_samples, last = run_sampler(model, iterations_per_step=4, reuse=True)
    assert [len(r) for r in every.residuals] == [4] * 10 and [len(r) for r in last.residuals] == [1] * 10
    assert [r[-1] for r in last.residuals] == [r[-1] for r in every.residuals]
    assert last.compute() == every.compute() and torch.equal(last_samples, every_samples)


def test_adaptive_stopping_respects_tolerance_and_cap():
    model = tiny_fpdm()
    _, fn = run_sampler(model, iterations_per_step=30, tol=1e-3)
    for k, residuals in zip(fn.iterations, fn.residuals):
        assert k == len(residuals) and k <= 30
        assert residuals[-1] < 1e-3 and all(r >= 1e-3 for r in residuals[:-1])
    assert max(fn.iterations) < 30
    _, capped = run_sampler(model, iterations_per_step=2, tol=1e-9)
    assert capped.iterations == [2] * 10


def test_compute_accounting():
    model = tiny_fpdm(class_dropout_prob=0.1)
    schedule = iteration_schedule(50, 10, "more-clean")
    _, fn = run_sampler(model, iterations_per_step=schedule, cfg_scale=2.0)
    report = fn.compute()
    assert report["model_calls"] == 10 and report["cfg_passes"] == 2
    assert report["iterations_per_step"] == schedule
    assert report["block_evals"] == 10 * 2 + 50
    assert report["flops_per_image"] == 2 * sum(model.forward_flops(k) for k in schedule)
    assert len(report["final_residual_per_step"]) == 10


def test_guided_model_rejects_short_schedules():
    model = tiny_fpdm()
    fn = GuidedModel(model, iterations_per_step=[1, 1])
    x, t, y = torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    fn(x, t, y)
    fn(x, t, y)
    with pytest.raises(ValueError, match="one entry per model call"):
        fn(x, t, y)


# ----------------------------------------------------------------------------------------------------------------
# Command lines
# ----------------------------------------------------------------------------------------------------------------

def test_sample_cli_writes_grid_and_compute(checkpoint, tmp_path):
    out, report = sample_cli.main(sample_cli.parse_args([
        "--ckpt", checkpoint, "--num-sampling-steps", "8", "--budget-block-evals", "40", "--schedule", "more-noisy",
        "--reuse", "--cfg-scale", "2", "--num-samples", "10", "--out", str(tmp_path / "s"), "--device", "cpu"]))
    assert os.path.isfile(os.path.join(out, "grid.png"))
    saved = json.load(open(os.path.join(out, "compute.json")))
    assert saved["block_evals"] == 40 and sum(saved["iterations_per_step"]) == 40 - 16
    assert saved["iterations_per_step"][0] >= saved["iterations_per_step"][-1]
    assert saved["wall_time_s"] > 0 and saved["num_images"] == 10


def test_sample_cli_few_step_sampler_with_budget_and_guidance_interval(checkpoint, tmp_path):
    """--sampler heun spreads the budget over its 2N - 1 model calls; the guidance interval is recorded and saves
    branches; Euler/Heun cannot clip, so "auto" turns clipping off for this pixel model (recorded)."""
    out, report = sample_cli.main(sample_cli.parse_args([
        "--ckpt", checkpoint, "--sampler", "heun", "--num-sampling-steps", "5", "--budget-block-evals", "45",
        "--reuse", "--cfg-scale", "2", "--guidance-interval", "300", "700", "--num-samples", "4",
        "--out", str(tmp_path / "h"), "--device", "cpu"]))
    assert report["model_calls"] == 9 and report["block_evals"] == 45 and len(report["iterations_per_step"]) == 9
    assert 9 < report["model_passes"] < 18
    settings = json.load(open(os.path.join(out, "args.json")))
    assert settings["resolved"]["sampler"] == "heun" and settings["guidance"] == {
        "cfg_scale": 2.0, "guidance_interval": [300.0, 700.0], "guidance_schedule": "constant", "guidance_channels": None}
    assert settings["resolved"]["clip_denoised"] is False
    with pytest.raises(ValueError, match="cannot clip x0"):
        sample_cli.main(sample_cli.parse_args(["--ckpt", checkpoint, "--sampler", "euler", "--clip-denoised", "on",
                                               "--out", str(tmp_path / "e"), "--device", "cpu"]))
    out, report = sample_cli.main(sample_cli.parse_args([
        "--ckpt", checkpoint, "--sampler", "dpmpp-2m", "--num-sampling-steps", "4", "--iterations", "3",
        "--fp-solver", "anderson", "--fp-history", "3", "--num-samples", "2", "--out", str(tmp_path / "a"),
        "--device", "cpu"]))
    assert report["block_evals"] == 4 * (3 + 2) and report["iterations_per_step"] == [3, 3, 3, 3]
    fp = json.load(open(os.path.join(out, "args.json")))["fp"]
    assert (fp["fp_solver"], fp["fp_history"], fp["fp_damping"]) == ("anderson", 3, 1.0)


def test_sample_cli_bad_flags(checkpoint, tmp_path):
    def run(*flags):
        return sample_cli.main(sample_cli.parse_args(["--ckpt", checkpoint, "--out", str(tmp_path / "x"), *flags]))
    with pytest.raises(ValueError, match="either --iterations or --budget-block-evals"):
        run("--iterations", "3", "--budget-block-evals", "100")
    with pytest.raises(ValueError, match="must be positive"):
        run("--budget-block-evals", "-1")
    with pytest.raises(ValueError, match="less than one iteration per step"):
        run("--num-sampling-steps", "10", "--budget-block-evals", "25")
    with pytest.raises(SystemExit):  # argparse names the valid choices
        sample_cli.parse_args(["--ckpt", checkpoint, "--schedule", "increasing"])
    for flags, message in ((("--eta", "-0.5"), "--eta must be >= 0"), (("--adaptive-tol", "0"), "--adaptive-tol must"),
                           (("--guidance-channels", "2", "--cfg-scale", "2"), r"--guidance-channels must lie in \[1, 1\]")):
        with pytest.raises(ValueError, match=message):
            run(*flags)
    assert not (tmp_path / "x").exists()  # refused before anything is written
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda: no CUDA GPU is visible here"):
            run("--device", "cuda")
    dit = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4, num_classes=10,
              learn_sigma=False)
    path = tmp_path / "dit.pt"
    torch.save({"format": "fpdm-train-v1", "model_config": dit.config, "model": dit.state_dict(),
                "ema": dit.state_dict(), "config": TRAIN_CONFIG}, path)
    with pytest.raises(ValueError, match="--reuse applies to FPDM checkpoints"):
        sample_cli.main(sample_cli.parse_args(["--ckpt", str(path), "--reuse", "--out", str(tmp_path / "y")]))


def ddp_cmd(checkpoint, out, processes, steps=5):
    args = ["sample_ddp.py", "--ckpt", checkpoint, "--num-fid-samples", "10", "--batch-size", "3",
            "--num-sampling-steps", str(steps), "--cfg-scale", "2", "--budget-block-evals", str(4 * steps), "--reuse",
            "--out", out]
    if processes == 1:
        return [sys.executable, *args]
    return [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", "29521", *args]


def test_sample_ddp_same_npz_for_one_and_two_processes(checkpoint, tmp_path):
    """Two processes (accelerate launch, a real subprocess) write the same .npz as one process (in-process, one thread
    like the workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU processes, even beside a GPU
    proc = subprocess.run(ddp_cmd(checkpoint, str(tmp_path / "p2"), 2), cwd=ROOT, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sample_ddp.main(sample_ddp.parse_args(ddp_cmd(checkpoint, str(tmp_path / "p1"), 1)[2:]))
    one, two = np.load(tmp_path / "p1" / "samples.npz"), np.load(tmp_path / "p2" / "samples.npz")
    assert one["arr_0"].shape == (10, 8, 8, 3) and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["labels"], two["labels"])
    report = json.load(open(tmp_path / "p2" / "compute.json"))
    assert report["processes"] == 2 and report["compute_images"] == 10  # both processes' batches
    assert report["block_evals"] == 20 and len(report["iterations_per_step"]) == 5
    # Noise and labels are functions of (seed, index) alone.
    n5, l5 = sample_ddp.sample_noise_and_label(0, 5, (1, 8, 8), 10)
    assert torch.equal(n5, sample_ddp.sample_noise_and_label(0, 5, (1, 8, 8), 10)[0]) and one["labels"][5] == l5
    # Stopped with batches 0 and 2 (both process 0's in a fresh run) missing: the rerun deals one to each process.
    # It is given a run folder whose latest.json names the checkpoint, and records what each process reads.
    for name in ("samples.npz", "batches/000000.npz", "batches/000002.npz"):
        os.remove(tmp_path / "p2" / name)
    run = tmp_path / "run"
    run.mkdir()
    (run / "latest.json").write_text(json.dumps({"step": 1, "path": os.path.abspath(checkpoint)}))
    cmd = ddp_cmd(str(run), str(tmp_path / "p2"), 2)
    cmd[cmd.index("sample_ddp.py")] = os.path.join("tests", "recording_sample_ddp.py")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "RECORD_LOG": str(tmp_path / "reads")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Process 0 alone read latest.json (a live run could move it between two reads) and hashed the checkpoint.
    main, other = (read_calls(tmp_path / f"reads.{rank}") for rank in (0, 1))
    assert ("latest", str(run)) in main and ("hash", os.path.abspath(checkpoint)) in main
    assert [c for c in other if c[0] == "hash" or c == ("latest", str(run))] == []
    assert "batches (rank 0): 100%" in proc.stderr and " 1/1 " in proc.stderr and " 2/2 " not in proc.stderr
    report = json.load(open(tmp_path / "p2" / "compute.json"))
    assert report["batches_kept_from_earlier_runs"] == 2 and report["compute_images"] == 6  # batches 0 and 2
    assert np.array_equal(np.load(tmp_path / "p2" / "samples.npz")["arr_0"], one["arr_0"])


def test_ddpm_step_noise_never_repeats_a_starting_noise():
    """sample_ddp.py seeds batch b's DDPM step noise apart from the samples' starting noise (with seed * SEED_BLOCK + b
    for both, the first step's noise of batch b's first sample was sample b's starting noise)."""
    shape = (1, 8, 8)
    starts = {tuple(sample_ddp.sample_noise_and_label(0, i, shape, 10)[0].flatten()[:4].tolist()) for i in range(64)}
    for b in range(8):
        torch.manual_seed(sample_ddp.step_noise_seed(0, b))
        first_step = torch.randn(8, *shape)  # a batch of 8
        assert not any(tuple(row.flatten()[:4].tolist()) in starts for row in first_step)


def test_sample_ddp_refuses_seeds_whose_noise_would_repeat_another_seeds(checkpoint, tmp_path):
    """torch keeps 32 bits of a generator seed: seed 4296's block would wrap onto seed 1's (its sample 0 is seed 1's
    sample 45,589). sample_ddp.py refuses such seeds and sample counts in one line, before it writes anything."""
    shape = (1, 4, 4)
    wrapped, own = (sample_ddp.sample_noise_and_label(s, i, shape, 10) for s, i in ((4296, 0), (1, 45_589)))
    assert torch.equal(wrapped[0], own[0])  # why: the same draws
    top = 2 ** 32 // sample_ddp.SEED_BLOCK - 1
    assert (top + 1) * sample_ddp.SEED_BLOCK - 1 < 2 ** 32  # the top seed's step seeds stay below 2^32
    for seed in (-1, top + 1):
        args = ddp_cmd(checkpoint, str(tmp_path / f"s{seed}"), 1)[2:] + ["--seed", str(seed)]
        with pytest.raises(ValueError, match=rf"--seed {seed}: sample_ddp.py takes seeds 0 to {top} "):
            sample_ddp.main(sample_ddp.parse_args(args))
        assert not (tmp_path / f"s{seed}").exists()
    with pytest.raises(ValueError, match="at most 1,000,003 samples and batches together per seed"):
        sample_ddp.check_seed_block(0, 1_000_000, 4)
    sample_ddp.check_seed_block(top, 1_000_000, 3)


def test_killed_sample_ddp_resumes_to_exactly_n_distinct_samples(checkpoint, tmp_path):
    out = tmp_path / "killed"
    # 60 steps per batch (about a second each): slow enough that the kill lands long before the last of the 4 batches.
    cmd = ddp_cmd(checkpoint, str(out), 1, steps=60)
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread, as this process (fixture)
    deadline = time.time() + 120
    while time.time() < deadline and len([f for f in os.listdir(out / "images")] if (out / "images").exists()
                                          else []) < 3:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    partial = sorted(f for f in os.listdir(out / "images") if f.endswith(".png"))
    assert 0 < len(partial) < 10, partial
    sample_ddp.main(sample_ddp.parse_args(cmd[2:]))  # the resumed run (in-process: the kill is what must be real)
    samples = np.load(out / "samples.npz")["arr_0"]
    assert samples.shape[0] == 10
    assert len({s.tobytes() for s in samples}) == 10
    sample_ddp.main(sample_ddp.parse_args(ddp_cmd(checkpoint, str(tmp_path / "ref"), 1, steps=60)[2:]))
    assert np.array_equal(samples, np.load(tmp_path / "ref" / "samples.npz")["arr_0"])


def test_sigterm_finishes_the_batch_in_flight_and_exits_3(checkpoint, tmp_path):
    """A scheduler's SIGTERM mid-run: the batch being sampled is finished and committed (no half batch, no
    temporaries), the process exits with code 3 and one line, and the same command continues."""
    import signal
    out = tmp_path / "stopped"
    cmd = ddp_cmd(checkpoint, str(out), 1, steps=150)  # ~2 s a batch: the signal lands while one is in flight
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "batches" / "000000.npz").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    assert "stopped by SIGTERM on rank 0 after" in stderr and "rerun the same command" in stderr
    committed = sorted(os.listdir(out / "batches"))
    assert 1 <= len(committed) < 4 and not [f for f in committed if ".tmp-" in f]
    assert not (out / "samples.npz").exists()
    assert json.load(open(out / "preempted.json")) == {"signal": "SIGTERM", "exit_code": 3}  # for a requeue script
    sample_ddp.main(sample_ddp.parse_args(cmd[2:]))
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 10 and not (out / "preempted.json").exists()


def test_a_stop_signal_while_sample_ddp_loads_stops_before_the_first_batch(checkpoint, tmp_path, monkeypatch):
    """A scheduler's SIGUSR1 while the model loads (or the checkpoint is hashed): recorded, not fatal; the run claims
    its folder, stops before its first batch with preempted.json for the requeue script, and the same command
    continues (before, Python's default action ended the process with nothing recorded)."""
    import signal
    out = tmp_path / "early"
    cmd = ddp_cmd(checkpoint, str(out), 1)
    real = cli.Setup.__init__

    def loading(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cli.Setup, "__init__", loading)
    with pytest.raises(sample_ddp.SamplingStopped, match="stopped by SIGUSR1 on rank 0 after 0 of its 4 batches"):
        sample_ddp.main(sample_ddp.parse_args(cmd[2:]))
    assert json.load(open(out / "preempted.json"))["signal"] == "SIGUSR1" and os.listdir(out / "batches") == []
    monkeypatch.undo()
    sample_ddp.main(sample_ddp.parse_args(cmd[2:]))
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 10 and not (out / "preempted.json").exists()


def test_a_stop_signal_while_samples_npz_is_assembled_is_recorded_until_it_is_complete(checkpoint, tmp_path,
                                                                                       monkeypatch):
    """A scheduler's SIGTERM while the main process assembles samples.npz: the assembly finishes, but the kill that
    follows the signal may come first, so preempted.json is on disk from the signal until samples.npz is complete
    (before: nothing recorded, and a requeue script did not requeue)."""
    import signal
    out = tmp_path / "assembling"
    cmd = ddp_cmd(checkpoint, str(out), 1)
    real, seen = sample_ddp.images_shape, []

    def signalled(batch_dir):  # the assembly's first step
        os.kill(os.getpid(), signal.SIGTERM)
        seen.append(json.load(open(out / "preempted.json")))
        return real(batch_dir)
    monkeypatch.setattr(sample_ddp, "images_shape", signalled)
    sample_ddp.main(sample_ddp.parse_args(cmd[2:]))
    assert seen == [{"signal": "SIGTERM", "exit_code": 3, "during": "samples.npz"}]
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 10 and not (out / "preempted.json").exists()


def test_a_stop_signal_after_samples_npz_is_complete_records_no_preemption(checkpoint, tmp_path, monkeypatch):
    """A signal after the assembly (during the last line or the release of the folder): the run is complete, and no
    preempted.json tells a requeue script otherwise."""
    import signal
    out = tmp_path / "late"
    cmd = ddp_cmd(checkpoint, str(out), 1)

    def late(*args, **kwargs):  # the run's last line
        if str(args[0]).startswith("wrote "):
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(sample_ddp, "print", late, raising=False)
    sample_ddp.main(sample_ddp.parse_args(cmd[2:]))
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 10 and not (out / "preempted.json").exists()


def test_a_failed_sample_ddp_run_leaves_failed_json_for_the_requeue_script(checkpoint, tmp_path, monkeypatch):
    """A process that fails mid-run (here its second batch's commit) records it in failed.json (under accelerate
    launch the others then stop on the launcher's SIGTERM and write preempted.json: the requeue script must not
    requeue on that alone); the rerun removes it and finishes."""
    out = tmp_path / "failing"
    cmd = ddp_cmd(checkpoint, str(out), 1)
    real, commits = sample_ddp.commit_batch, []

    def failing(*args):
        commits.append(1)
        if len(commits) == 2:
            raise OSError(5, "Input/output error")
        return real(*args)
    monkeypatch.setattr(sample_ddp, "commit_batch", failing)
    with pytest.raises(OSError, match="Input/output error"):
        sample_ddp.main(sample_ddp.parse_args(cmd[2:]))
    assert json.load(open(out / "failed.json")) == {"rank": 0, "error": "OSError: [Errno 5] Input/output error"}
    monkeypatch.undo()
    sample_ddp.main(sample_ddp.parse_args(cmd[2:]))
    assert not (out / "failed.json").exists() and np.load(out / "samples.npz")["arr_0"].shape[0] == 10


def test_sample_cli_parallel_matches_sequential(checkpoint, tmp_path):
    out, report = sample_cli.main(sample_cli.parse_args([
        "--ckpt", checkpoint, "--num-sampling-steps", "6", "--iterations", "3", "--cfg-scale", "2",
        "--num-samples", "4", "--parallel", "anderson", "--parallel-tol", "1e-6", "--parallel-max-iter", "30",
        "--compare-sequential", "--out", str(tmp_path / "par"), "--device", "cpu"]))
    assert report["sequential"]["max_abs_difference"] < 1e-3
    assert report["parallel_iterations"] >= 1 and report["network_evaluations"] >= 6
    assert report["sequential"]["network_evaluations"] == 6
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["grid.png", "grid_sequential.png"]
    # A sequential run into the parallel run's folder is refused (their default folders differ by the settings hash).
    with pytest.raises(FileExistsError, match="holds samples of other settings .*parallel"):
        sample_cli.main(sample_cli.parse_args([
            "--ckpt", checkpoint, "--num-sampling-steps", "6", "--iterations", "3", "--cfg-scale", "2",
            "--num-samples", "4", "--out", str(tmp_path / "par"), "--device", "cpu"]))
    with pytest.raises(ValueError, match="one FPDM iteration count"):
        sample_cli.main(sample_cli.parse_args(["--ckpt", checkpoint, "--parallel", "picard", "--reuse",
                                               "--out", str(tmp_path / "bad")]))
    # A block budget is spent per image by sequential sampling; parallel sampling spends iterations × T' states.
    with pytest.raises(ValueError, match="--budget-block-evals does not apply to --parallel"):
        sample_cli.main(sample_cli.parse_args(["--ckpt", checkpoint, "--parallel", "anderson",
                                               "--budget-block-evals", "50", "--out", str(tmp_path / "bad")]))
    assert report["block_evals"] == report["network_evaluations"] * (1 + 3 + 1)  # pre + k + post per state
    # η > 0: both runs draw their noise from the seed, so the reference is the same chain (it drew other noise after
    # the parallel run had used the RNG: a difference of 3.0 reported for an exact solve).
    _, report = sample_cli.main(sample_cli.parse_args([
        "--ckpt", checkpoint, "--num-sampling-steps", "6", "--iterations", "3", "--cfg-scale", "2", "--eta", "1",
        "--num-samples", "2", "--parallel", "anderson", "--parallel-tol", "1e-6", "--parallel-max-iter", "30",
        "--compare-sequential", "--out", str(tmp_path / "eta"), "--device", "cpu"]))
    assert report["converged"] and report["sequential"]["max_abs_difference"] < 1e-3
    # A guidance schedule scales each state by its own timestep: parallel takes it; an interval is refused up front.
    _, report = sample_cli.main(sample_cli.parse_args([
        "--ckpt", checkpoint, "--num-sampling-steps", "6", "--iterations", "3", "--cfg-scale", "2",
        "--guidance-schedule", "linear", "--num-samples", "2", "--parallel", "anderson", "--parallel-tol", "1e-6",
        "--parallel-max-iter", "30", "--compare-sequential", "--out", str(tmp_path / "linear"), "--device", "cpu"]))
    assert report["sequential"]["max_abs_difference"] < 1e-3
    with pytest.raises(ValueError, match="--guidance-interval needs one timestep per model call"):
        sample_cli.main(sample_cli.parse_args(["--ckpt", checkpoint, "--parallel", "anderson", "--cfg-scale", "2",
                                               "--guidance-interval", "300", "700", "--out", str(tmp_path / "int")]))
    assert not (tmp_path / "int").exists()


def test_sample_cli_two_axis(checkpoint, tmp_path):
    """--parallel two-axis --inner-iterations 1 with guidance reaches sequential DDIM with a converged layer (the
    --compare-sequential reference here runs 40 iterations per step); the report has the critical path."""
    out, report = sample_cli.main(sample_cli.parse_args([
        "--ckpt", checkpoint, "--num-sampling-steps", "6", "--cfg-scale", "2", "--num-samples", "4",
        "--parallel", "two-axis", "--inner-iterations", "1", "--parallel-tol", "1e-6", "--parallel-max-iter", "100",
        "--out", str(tmp_path / "two"), "--device", "cpu"]))
    reference = sample_cli.main(sample_cli.parse_args([
        "--ckpt", checkpoint, "--num-sampling-steps", "6", "--cfg-scale", "2", "--num-samples", "4",
        "--iterations", "40", "--sampler", "ddim", "--clip-denoised", "off", "--out", str(tmp_path / "seq"),
        "--device", "cpu"]))[1]
    assert report["converged"] and report["inner_iterations"] == 1 and report["critical_path_calls"] < 100
    assert report["settings"]["parallel"]["parallel"] == "two-axis" and report["settings"]["parallel"]["two_axis_outer"] == "anderson"
    grid = lambda folder: np.asarray(Image.open(folder / "grid.png"), dtype=float)  # noqa: E731
    assert np.abs(grid(tmp_path / "two") - grid(tmp_path / "seq")).max() <= 1  # uint8 rounding
    assert reference["block_evals"] == 6 * (40 + 2)
    # --compare-sequential: the reference is two-axis's fixed point, sequential DDIM with the layer converged
    _, compared = sample_cli.main(sample_cli.parse_args([
        "--ckpt", checkpoint, "--num-sampling-steps", "6", "--cfg-scale", "2", "--num-samples", "4",
        "--parallel", "two-axis", "--inner-iterations", "1", "--parallel-tol", "1e-6", "--parallel-max-iter", "100",
        "--compare-sequential", "--out", str(tmp_path / "two-compared"), "--device", "cpu"]))
    assert compared["sequential"]["max_abs_difference"] < 1e-3 and (tmp_path / "two-compared" / "grid_sequential.png").exists()
    with pytest.raises(ValueError, match="--inner-iterations"):
        sample_cli.main(sample_cli.parse_args(["--ckpt", checkpoint, "--parallel", "two-axis", "--iterations", "3",
                                               "--out", str(tmp_path / "bad")]))
    with pytest.raises(ValueError, match="applies to --parallel two-axis"):
        sample_cli.main(sample_cli.parse_args(["--ckpt", checkpoint, "--inner-iterations", "2",
                                               "--out", str(tmp_path / "bad")]))


# ----------------------------------------------------------------------------------------------------------------
# Correct by default: clipping only in pixel space, sample folders of exactly one configuration, atomic batches,
# one VAE load
# ----------------------------------------------------------------------------------------------------------------

def random_dit(channels, **kwargs):
    from fpdm.measure import perturb_parameters_
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=channels, hidden_size=32, depth=2, num_heads=4,
                num_classes=10, learn_sigma=False, **kwargs)
    return perturb_parameters_(model, 0.3).eval()


@pytest.mark.parametrize("channels,clips", [(4, False), (1, True), (3, True)])
def test_default_clips_x0_only_for_pixel_models(channels, clips):
    from fpdm.sampling import clip_denoised_for
    model = random_dit(channels)
    noise = torch.randn(4, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    diffusion = diffusion_for_sampling({**TRAIN_CONFIG, "predict_v": False, "noise_schedule": "linear"}, 5)
    # The last DDIM step lands on x̂_0 (ᾱ = 1 after it), so the sample is x̂_0: clipped or not.
    default, _ = sample_images(model, diffusion, noise, torch.arange(4))
    unclipped, _ = sample_images(model, diffusion, noise, torch.arange(4), clip_denoised=False)
    assert unclipped.abs().max() > 1.5
    assert clip_denoised_for(model) is clips
    if clips:
        assert default.abs().max() <= 1.0
    else:
        assert torch.equal(default, unclipped)  # a latent |x̂_0| > 1 survives


def save_checkpoint(model, path, config=TRAIN_CONFIG):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"format": "fpdm-train-v1", "model_config": model.config, "model": model.state_dict(),
                "ema": model.state_dict(), "config": config, "step": 1}, path)
    return str(path)


def test_sample_folder_is_one_configuration(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--ckpt", checkpoint, "--num-sampling-steps", "3", "--num-samples", "2", "--device", "cpu",
            "--cfg-scale", "2", "--iterations", "2"]

    def run(*flags):
        return sample_cli.main(sample_cli.parse_args(base + list(flags)))
    first, _ = run()
    assert first.startswith("samples" + os.sep) and os.path.isfile(os.path.join(first, "args.json"))
    settings = json.load(open(os.path.join(first, "args.json")))
    assert settings["sampler"]["timestep_spacing"] == "trailing" and settings["resolved"]["clip_denoised"] is True
    grid = open(os.path.join(first, "grid.png"), "rb").read()
    assert run()[0] == first  # the same settings: the same folder
    # Each setting that changes the samples gives another folder (the old images are never returned) ...
    changes = [("--eta", "0.5"), ("--timestep-spacing", "linspace"), ("--clip-denoised", "off"),
               ("--guidance-channels", "1"), ("--no-ema",), ("--schedule", "more-noisy"), ("--seed", "1"),
               ("--sampler", "ddpm"), ("--num-sampling-steps", "4"), ("--cfg-scale", "3"), ("--reuse",),
               ("--adaptive-tol", "0.5"), ("--num-samples", "3"), ("--class-labels", "3,4")]
    folders = {first}
    for change in changes:
        out, _ = run(*change)
        assert out not in folders, change
        folders.add(out)
    # ... and into one named folder, another setting is refused with one line naming it; --overwrite starts over.
    named = str(tmp_path / "named")
    run("--out", named)
    with pytest.raises(FileExistsError, match=r"other settings \(sampler.eta 0.0 -> 0.5\).*--overwrite"):
        run("--out", named, "--eta", "0.5")
    run("--out", named, "--eta", "0.5", "--overwrite")
    assert json.load(open(os.path.join(named, "args.json")))["sampler"]["eta"] == 0.5
    assert open(os.path.join(first, "grid.png"), "rb").read() == grid
    # A folder of unknown origin is not written into.
    os.makedirs(tmp_path / "foreign")
    open(tmp_path / "foreign" / "grid.png", "w").close()
    with pytest.raises(FileExistsError, match="no args.json"):
        run("--out", str(tmp_path / "foreign"))


def test_checkpoint_identity_is_its_content(tmp_path, monkeypatch):
    """Two different models whose run folders and checkpoint files have the same names get different folders, and
    a checkpoint replaced in place is refused in a named folder."""
    monkeypatch.chdir(tmp_path)
    a = save_checkpoint(random_dit(1), tmp_path / "a" / "run" / "checkpoints" / "step_0000001.pt")
    b = save_checkpoint(random_dit(1, class_dropout_prob=0.0), tmp_path / "b" / "run" / "checkpoints"
                        / "step_0000001.pt")
    flags = ["--num-sampling-steps", "2", "--num-samples", "2", "--device", "cpu"]
    out_a, _ = sample_cli.main(sample_cli.parse_args(["--ckpt", a, *flags]))
    out_b, _ = sample_cli.main(sample_cli.parse_args(["--ckpt", b, *flags]))
    assert out_a != out_b and os.path.basename(out_a).split("-")[:-1] == os.path.basename(out_b).split("-")[:-1]
    sample_cli.main(sample_cli.parse_args(["--ckpt", a, *flags, "--out", "fixed"]))
    # The same file elsewhere (a requeued job staging it on node-local scratch): the same samples, the folder is
    # continued and args.json records where the checkpoint now lies.
    moved = shutil.copy(a, str(tmp_path / "scratch.pt"))
    sample_cli.main(sample_cli.parse_args(["--ckpt", moved, *flags, "--out", "fixed"]))
    assert json.load(open(tmp_path / "fixed" / "args.json"))["checkpoint_file"]["path"] == str(moved)
    save_checkpoint(random_dit(1, class_dropout_prob=0.0), a)  # new weights at the same path
    with pytest.raises(FileExistsError, match="checkpoint_file.sha256"):
        sample_cli.main(sample_cli.parse_args(["--ckpt", a, *flags, "--out", "fixed"]))


def test_a_run_folder_samples_its_latest_checkpoint_file(tmp_path, capsys):
    """--ckpt RUN_FOLDER samples the checkpoint latest.json names, and that file is the folder's identity: training
    writing on (a metrics row, a newer checkpoint) neither changes the samples' identity nor refuses the rerun (the
    whole run folder was hashed before)."""
    run = tmp_path / "run"
    ckpt = save_checkpoint(random_dit(1), run / "checkpoints" / "step_0000001.pt")
    (run / "latest.json").write_text('{"step": 1, "path": "checkpoints/step_0000001.pt"}')
    (run / "metrics.csv").write_text("step,loss\n1,0.5\n")
    flags = ["--ckpt", str(run), "--num-sampling-steps", "2", "--num-samples", "2", "--device", "cpu",
             "--out", str(tmp_path / "s")]
    sample_cli.main(sample_cli.parse_args(flags))
    assert f"sampling its latest checkpoint {ckpt}" in capsys.readouterr().out
    recorded = json.load(open(tmp_path / "s" / "args.json"))["checkpoint_file"]
    assert recorded == {"path": ckpt, "sha256": file_fingerprint(ckpt)}
    with open(run / "metrics.csv", "a") as f:
        f.write("2,0.4\n")
    save_checkpoint(random_dit(1, class_dropout_prob=0.0), run / "checkpoints" / "step_0000002.pt")
    sample_cli.main(sample_cli.parse_args(flags))  # the same samples: reused
    (run / "latest.json").write_text('{"step": 2, "path": "checkpoints/step_0000002.pt"}')
    with pytest.raises(FileExistsError, match="checkpoint_file.sha256"):  # now another checkpoint
        sample_cli.main(sample_cli.parse_args(flags))


def ddp_args(checkpoint, out, *extra):
    return sample_ddp.parse_args(["--ckpt", checkpoint, "--num-fid-samples", "7", "--batch-size", "3",
                                  "--num-sampling-steps", "3", "--iterations", "2", "--out", str(out), *extra])


def test_sample_ddp_refuses_other_batch_size_in_same_folder(checkpoint, tmp_path):
    sample_ddp.main(ddp_args(checkpoint, tmp_path / "s"))
    with pytest.raises(FileExistsError, match=r"batch_size 3 -> 2"):
        sample_ddp.main(ddp_args(checkpoint, tmp_path / "s", "--batch-size", "2"))
    labels = np.load(tmp_path / "s" / "samples.npz")["labels"]
    assert [sample_ddp.sample_noise_and_label(0, i, (1, 8, 8), 10)[1] for i in range(7)] == labels.tolist()


@pytest.mark.parametrize("where", ["inside the batch file", "after the batch file, before its PNGs"])
def test_sample_ddp_failure_at_any_write_resumes_to_the_same_samples(checkpoint, tmp_path, monkeypatch, where):
    reference = np.load(os.path.join(sample_ddp.main(ddp_args(checkpoint, tmp_path / "ref")), "samples.npz"))
    calls = {"n": 0}
    if where == "inside the batch file":
        real = np.savez

        def failing(f, **arrays):  # the second batch dies half-way through writing its one file
            calls["n"] += 1
            if calls["n"] == 2:
                f.write(b"partial")
                raise KeyboardInterrupt("killed")
            return real(f, **arrays)
        monkeypatch.setattr(sample_ddp.np, "savez", failing)
    else:
        real = sample_ddp.write_pngs

        def failing(*args, **kwargs):  # dies right after the first batch was committed
            raise KeyboardInterrupt("killed")
        monkeypatch.setattr(sample_ddp, "write_pngs", failing)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        sample_ddp.main(ddp_args(checkpoint, out))
    monkeypatch.undo()
    committed = sorted(os.listdir(out / "batches"))
    assert committed == ["000000.npz"]  # exactly the finished batch, no partial or temporary file
    # What a SIGKILL mid-write leaves (atomic_write's cleanup never runs): temporaries of a process that is gone.
    stale = [out / "images" / "000004.png.tmp-999999999", out / "batches" / "000001.npz.tmp-999999999"]
    for path in stale:
        path.write_bytes(b"half")
    live = out / "images" / f"000005.png.tmp-{os.getppid()}"  # a live writer's file is left alone
    live.write_bytes(b"")
    pngs = [f for f in os.listdir(out / "images") if f.endswith(".png")]
    if pngs:  # temporaries are never read as images
        assert len(load_images(str(out / "images"))) == len(pngs) == len(os.listdir(out / "images")) - 2
    resumed = np.load(os.path.join(sample_ddp.main(ddp_args(checkpoint, out)), "samples.npz"))
    assert np.array_equal(resumed["arr_0"], reference["arr_0"])
    assert np.array_equal(resumed["labels"], reference["labels"])
    assert not any(path.exists() for path in stale) and live.exists()
    live.unlink()
    assert sorted(os.listdir(out / "images")) == [f"{i:06d}.png" for i in range(7)]
    assert np.array_equal(load_images(str(out / "images")), reference["arr_0"])


def test_vae_is_loaded_once_for_many_batches(tmp_path, monkeypatch):
    from diffusers.models import AutoencoderKL
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=8, layers_per_block=1)
    vae.save_pretrained(tmp_path / "vae")
    loads = {"n": 0}
    real = AutoencoderKL.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads["n"] += 1
        return real(cls, *args, **kwargs)
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(counting))
    ckpt = save_checkpoint(random_dit(4), tmp_path / "latent" / "checkpoints" / "step_0000001.pt")
    out = sample_ddp.main(sample_ddp.parse_args(["--ckpt", ckpt, "--num-fid-samples", "8", "--batch-size", "2",
                                                 "--num-sampling-steps", "2", "--vae", str(tmp_path / "vae"),
                                                 "--out", str(tmp_path / "s")]))
    assert loads["n"] == 1
    assert np.load(os.path.join(out, "samples.npz"))["arr_0"].shape == (8, 8, 8, 3)
    assert json.load(open(os.path.join(out, "args.json")))["resolved"]["clip_denoised"] is False  # latents: never clipped


def test_sample_ddp_sample_equals_in_process_sampling_and_uint8_mapping(checkpoint, tmp_path):
    """Batch 1 of the sharded run (samples 3..5) equals sample_images on the noise and labels of (seed, i), and the
    uint8 conversion maps -1, 0, 1 to 0, 128, 255 (grayscale repeated to RGB)."""
    from fpdm.checkpoints import load_model_for_sampling
    out = sample_ddp.main(ddp_args(checkpoint, tmp_path / "s", "--cfg-scale", "2", "--seed", "3"))
    saved = np.load(os.path.join(out, "samples.npz"))
    model, config = load_model_for_sampling(checkpoint)
    pairs = [sample_ddp.sample_noise_and_label(3, i, (1, 8, 8), 10) for i in range(3, 6)]
    samples, _ = sample_images(model, diffusion_for_sampling(config, 3), torch.stack([n for n, _ in pairs]),
                               torch.tensor([label for _, label in pairs]), cfg_scale=2.0, iterations_per_step=2)
    assert np.array_equal(sample_ddp.to_uint8(samples), saved["arr_0"][3:6])
    assert saved["labels"][3:6].tolist() == [label for _, label in pairs]
    levels = sample_ddp.to_uint8(torch.tensor([-1.0, 0.0, 1.0]).view(1, 1, 1, 3))
    assert levels.shape == (1, 1, 3, 3) and levels[0, 0, :, 0].tolist() == [0, 128, 255]
    assert (levels == levels[..., :1]).all()


def test_decode_divides_latents_by_the_vae_scaling_factor():
    class StubVAE:
        config = type("Config", (), {"scaling_factor": 0.5})()

        def decode(self, latents):
            self.seen = latents
            return type("Output", (), {"sample": latents[:, :3] * 2})()
    vae, latents = StubVAE(), torch.randn(2, 4, 8, 8)
    images = cli.decode(latents, vae)
    assert torch.equal(vae.seen, latents / 0.5) and torch.equal(images, latents[:, :3] * 4)
    assert cli.decode(latents, None) is latents  # pixel models pass through


def test_sampling_reads_no_residual_back_per_call(monkeypatch):
    """FPDM residuals stay on the device while sampling (a GPU would sync at every read); they are read once, when
    the compute report asks for them, and equal what a per-call read gives."""
    model = tiny_fpdm()
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(self.shape) or real(self))
    _, fn = run_sampler(model, iterations_per_step=3, reuse=True)
    assert reads == []
    report = fn.compute()
    assert len(reads) == 1 and len(report["final_residual_per_step"]) == 10
    assert fn.residuals[4] == pytest.approx(torch.stack([torch.as_tensor(v) for v in fn.residuals[4]]).tolist())


# ----------------------------------------------------------------------------------------------------------------
# Flags sample_ddp.py and sample.py once ignored without a word
# ----------------------------------------------------------------------------------------------------------------

def refused_in_one_line(script, *flags):
    """Run `script` (a subprocess, CPU only) and return its one line of stderr; it must exit 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-3000:]
    return proc.stderr.strip()


def test_sample_ddp_refuses_a_gpu_this_machine_lacks(checkpoint, tmp_path):
    """As sample.py: --device cuda without a visible GPU is an error, not a silent run on the CPU."""
    out = tmp_path / "gpu"
    line = refused_in_one_line("sample_ddp.py", "--ckpt", checkpoint, "--num-fid-samples", "2", "--device", "cuda",
                               "--out", str(out))
    assert line.startswith("error: --device cuda: no CUDA GPU is visible here") and "--device cpu" in line
    assert not out.exists()


def test_sample_ddp_class_labels_cycle_over_sample_indices(checkpoint, tmp_path):
    """--class-labels 3,7: sample i gets label [3, 7][i mod 2] and the noise of (seed, i), whatever the process count;
    the labels are part of the folder's identity; a label out of range is refused."""
    out = sample_ddp.main(ddp_args(checkpoint, tmp_path / "l", "--class-labels", "3,7"))
    saved = np.load(os.path.join(out, "samples.npz"))
    assert saved["labels"].tolist() == [3, 7, 3, 7, 3, 7, 3]
    assert json.load(open(os.path.join(out, "args.json")))["resolved"]["labels"] == [3, 7]
    noise, label = sample_ddp.sample_noise_and_label(0, 4, (1, 8, 8), 10, labels=[3, 7])
    assert label == 3 and torch.equal(noise, sample_ddp.sample_noise_and_label(0, 4, (1, 8, 8), 10)[0])
    with pytest.raises(FileExistsError, match="labels"):
        sample_ddp.main(ddp_args(checkpoint, tmp_path / "l"))
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 9\]"):
        sample_ddp.main(ddp_args(checkpoint, tmp_path / "bad", "--class-labels", "3,10"))
    assert not (tmp_path / "bad").exists()


def test_num_samples_and_class_labels_must_agree(checkpoint, tmp_path):
    """sample.py makes one image per --class-labels entry: an explicit --num-samples of another count is refused in
    one line, not ignored; without labels the default stays 40 images (the folder identity of earlier runs);
    sample_ddp.py, which makes --num-fid-samples, refuses --num-samples."""
    base = ["--ckpt", checkpoint, "--num-sampling-steps", "2", "--iterations", "1", "--device", "cpu"]
    line = refused_in_one_line("sample.py", *base, "--class-labels", "1,2", "--num-samples", "8",
                               "--out", str(tmp_path / "x"))
    assert line == ("error: --num-samples 8 differs from the 2 --class-labels: sample.py makes one image per label "
                    "(drop --num-samples, or give 8 labels)")
    assert not (tmp_path / "x").exists()
    for flags, count in ((["--class-labels", "1,2"], 2), (["--class-labels", "1,2", "--num-samples", "2"], 2),
                         ([], 40)):
        out, report = sample_cli.main(sample_cli.parse_args([*base, *flags, "--out", str(tmp_path / str(flags))]))
        assert report["num_images"] == count and report["args"]["num_samples"] == count
    assert json.load(open(os.path.join(out, "args.json")))["resolved"]["labels"] == [i % 10 for i in range(40)]
    with pytest.raises(SystemExit):  # sample_ddp.py has no --num-samples: it makes --num-fid-samples
        ddp_args(checkpoint, tmp_path / "ddp", "--num-samples", "5")


def test_schedule_spreads_the_iterations_or_is_refused(checkpoint, tmp_path):
    """--schedule without a budget spreads --iterations (default: the model's) x steps, and changes the samples;
    where it has nothing to spread (one iteration per step) or is not used (--parallel two-axis sets the layer's
    iterations itself), it is refused in one line instead of making the same images in a new folder."""
    base = ["--ckpt", checkpoint, "--num-sampling-steps", "4", "--num-samples", "2", "--device", "cpu"]

    def run(*flags):
        out = tmp_path / ("-".join(flags) or "default")
        return sample_cli.main(sample_cli.parse_args([*base, *flags, "--out", str(out)]))
    flat, noisy = run()[1]["iterations_per_step"], run("--schedule", "more-noisy")[1]["iterations_per_step"]
    k = tiny_fpdm().default_num_iterations
    assert flat == [k] * 4 and sum(noisy) == 4 * k and noisy == iteration_schedule(4 * k, 4, "more-noisy") != flat
    assert run("--iterations", "3", "--schedule", "more-clean")[1]["iterations_per_step"] == [2, 3, 3, 4]
    for flags in (["--iterations", "1"], ["--budget-block-evals", "12"]):  # 4 steps x (pre + post + 1) = 12
        with pytest.raises(ValueError, match="--schedule more-clean moves iterations between steps, but one per step "
                                             "leaves none to move: raise --iterations or --budget-block-evals"):
            run(*flags, "--schedule", "more-clean")
    with pytest.raises(ValueError, match="--schedule does not apply to --parallel two-axis: it sets the layer's iterations itself"):
        run("--parallel", "two-axis", "--schedule", "more-noisy")
