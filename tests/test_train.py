"""train.py: checkpoints, exact resume, crash safety, NaN guard, bad input, and a 2-process accelerate run."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--data-path", "mnist", "--image-size", "14", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "4",
             "--num-heads", "2", "--fixed-point", "--fixed-point-no-grad-max-iters", "3",
             "--fixed-point-with-grad-max-iters", "3", "--global-batch-size", "8", "--log-every", "1",
             "--ckpt-every", "3", "--num-sample-images", "10", "--sample-steps", "4", "--tracker", "none",
             "--lr", "1e-3"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def run(tmp_path, *extra, name="run"):
    cfg = train.parse_args(TINY_ARGS + ["--results-dir", str(tmp_path), "--run-name", name, *extra])
    return train.main(cfg)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def final_weights(run_dir, step):
    ckpt = torch.load(os.path.join(run_dir, f"checkpoints/step_{step:07d}.pt"), weights_only=True)
    return ckpt["model"], ckpt["ema"]


def test_run_writes_checkpoints_logs_and_samples(tmp_path):
    run_dir = run(tmp_path, "--max-steps", "6", "--sample-every", "3")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_0000003.pt", "step_0000006.pt"]
    assert json.load(open(os.path.join(run_dir, "latest.json")))["step"] == 6
    ckpt = torch.load(os.path.join(run_dir, "checkpoints/step_0000006.pt"), weights_only=True)  # no pickle needed
    assert ckpt["step"] == 6 and ckpt["world_size"] == 1 and len(ckpt["rng"]) == 1
    assert ckpt["model_config"]["fixed_point"] and ckpt["model_config"]["hidden_size"] == 32
    assert ckpt["config"]["lr"] == 1e-3 and json.loads(json.dumps(ckpt["config"])) == ckpt["config"]
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(0 <= float(r["sjfb_no_grad"]) <= 3 and 1 <= float(r["sjfb_with_grad"]) <= 3 for r in rows)
    assert all(float(r["loss"]) > 0 and float(r["images_per_s"]) > 0 for r in rows)
    assert all(0 < float(r["fp_residual"]) < 10 for r in rows)
    assert sorted(os.listdir(os.path.join(run_dir, "samples"))) == ["step_0000003.png", "step_0000006.png"]
    assert "saved checkpoints/step_0000006.pt" in open(os.path.join(run_dir, "log.txt")).read()
    # EMA moved away from its starting point, but less than the model (decay 0.9999 over 6 steps).
    from models import DiT
    model, ema = final_weights(run_dir, 6)
    init = DiT.from_config(ckpt["model_config"]).state_dict()
    key = "blocks_pre.0.attn.qkv.weight"
    assert 0 < (ema[key] - init[key]).abs().max() < (model[key] - init[key]).abs().max()


def test_resume_is_exact(tmp_path):
    straight = run(tmp_path, "--max-steps", "6", name="straight")
    first = run(tmp_path, "--max-steps", "3", name="split")
    assert json.load(open(os.path.join(first, "latest.json")))["step"] == 3
    split = run(tmp_path, "--max-steps", "6", "--resume", "auto", name="split")
    assert losses(split) == losses(straight)
    for a, b in zip(final_weights(split, 6), final_weights(straight, 6)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_killed_process_resumes_exactly(tmp_path):
    """SIGKILL a real training process after its first checkpoint, resume it, and match an uninterrupted run."""
    common = [sys.executable, os.path.join(ROOT, "train.py"), *TINY_ARGS, "--results-dir", str(tmp_path),
              "--ckpt-every", "2"]
    proc = subprocess.Popen(common + ["--run-name", "killed", "--max-steps", "100000"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "killed" / "latest.json"
    deadline = time.time() + 120
    while not pointer.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pointer.exists(), "no checkpoint within 120 s"
    resumed_from = json.load(open(pointer))["step"]
    target = resumed_from + 2
    # Both runs in fresh processes like the killed one: bitwise equality on CPU also needs equal thread counts.
    for name, extra in (("killed", ["--resume", "auto"]), ("straight", [])):
        subprocess.run(common + ["--run-name", name, "--max-steps", str(target), *extra], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed, straight = losses(tmp_path / "killed"), losses(tmp_path / "straight")
    assert {s: killed[s] for s in straight} == straight
    for a, b in zip(final_weights(tmp_path / "killed", target), final_weights(tmp_path / "straight", target)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)


def test_crash_while_writing_checkpoint_keeps_previous(tmp_path, monkeypatch):
    run_dir = run(tmp_path, "--max-steps", "3")
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        f.write(b"partial garbage")  # a torn write, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, "--max-steps", "6", "--resume", "auto")
    monkeypatch.setattr(torch, "save", real_save)
    assert json.load(open(os.path.join(run_dir, "latest.json")))["step"] == 3
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["step_0000003.pt"]  # no temporary file left
    ckpt = train.load_checkpoint(os.path.join(run_dir, "checkpoints/step_0000003.pt"))
    assert ckpt["step"] == 3


def test_nan_loss_stops_without_saving(tmp_path, monkeypatch):
    from diffusion.gaussian_diffusion import GaussianDiffusion
    real = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        if calls["n"] == 5:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss or gradient at step 5.*last good checkpoint: .*step_0000003"):
        run(tmp_path, "--max-steps", "6")
    run_dir = tmp_path / "run"
    assert os.listdir(run_dir / "checkpoints") == ["step_0000003.pt"]
    assert json.load(open(run_dir / "latest.json"))["step"] == 3


def test_nan_in_any_micro_batch_never_reaches_the_optimizer(tmp_path, monkeypatch):
    """Gradient accumulation 4, a NaN loss in the FIRST micro-batch of step 2: the run stops before the optimizer
    steps, and the last checkpoint (step 1) is unchanged. The old guard checked only the last micro-batch."""
    import hashlib

    from diffusion.gaussian_diffusion import GaussianDiffusion
    real, calls, steps = GaussianDiffusion.training_losses, {"n": 0}, {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        out = real(self, *args, **kwargs)
        if calls["n"] == 5:  # step 2, micro-batch 1 of 4
            out["loss"] = out["loss"] * float("nan")
        return out

    real_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        steps["n"] += 1
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(GaussianDiffusion, "training_losses", poisoned)
    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    digest = {}
    real_save = train.atomic_torch_save

    def recording_save(obj, path):
        real_save(obj, path)
        digest[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    monkeypatch.setattr(train, "atomic_torch_save", recording_save)
    with pytest.raises(train.NonFiniteLossError, match=r"non-finite loss or gradient at step 2 \(1 of 4 micro-batches"):
        run(tmp_path, "--max-steps", "3", "--grad-accum-steps", "4", "--ckpt-every", "1")
    run_dir = tmp_path / "run"
    assert steps["n"] == 1 and calls["n"] == 8  # step 2's four micro-batches ran; its optimizer step did not
    assert os.listdir(run_dir / "checkpoints") == ["step_0000001.pt"]
    assert json.load(open(run_dir / "latest.json"))["step"] == 1
    path = str(run_dir / "checkpoints" / "step_0000001.pt")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == digest[path]
    ckpt = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(v).all() for s in ckpt["opt"]["state"].values() for v in s.values()
               if torch.is_tensor(v))


def test_bad_input_gives_one_line_and_overwrites_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"no-grad range \[5, 2\] is invalid"):
        run(tmp_path, "--fixed-point-no-grad-min-iters", "5", "--fixed-point-no-grad-max-iters", "2")
    with pytest.raises(ValueError, match="needs --predict-v"):
        run(tmp_path, "--zero-terminal-snr")
    with pytest.raises(ValueError, match="unknown --model"):
        run(tmp_path, "--model", "DiT-M/3")
    with pytest.raises((FileNotFoundError, ValueError), match="does-not-exist"):
        run(tmp_path, "--data-path", str(tmp_path / "does-not-exist"))
    run_dir = run(tmp_path, "--max-steps", "3")
    before = {f: os.path.getmtime(os.path.join(run_dir, "checkpoints", f)) for f in os.listdir(
        os.path.join(run_dir, "checkpoints"))}
    with pytest.raises(FileExistsError, match="--resume auto"):
        run(tmp_path, "--max-steps", "6")
    with pytest.raises(ValueError, match="hidden_size=32 but this run asks for 64"):
        run(tmp_path, "--max-steps", "6", "--resume", "auto", "--hidden-size", "64")
    after = {f: os.path.getmtime(os.path.join(run_dir, "checkpoints", f)) for f in os.listdir(
        os.path.join(run_dir, "checkpoints"))}
    assert after == before
    # The command line prints the same message as one line and exits 1.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--fixed-point-with-grad-min-iters", "-1"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "with-grad range" in proc.stderr


def test_two_process_cpu_run_through_accelerate(tmp_path):
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
           os.path.join(ROOT, "aconfs", "cpu_2proc.yaml"), "--main_process_port", "29517",
           os.path.join(ROOT, "train.py"), *TINY_ARGS, "--results-dir", str(tmp_path), "--run-name", "ddp",
           "--max-steps", "4", "--ckpt-every", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in open(tmp_path / "ddp" / "log.txt").read()
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # per-rank seeds
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints")) == ["step_0000002.pt", "step_0000004.pt"]


def test_init_fpdm_from_a_trained_dit(tmp_path):
    dit_args = [a for a in TINY_ARGS if a != "--fixed-point"]
    cfg = train.parse_args(dit_args + ["--results-dir", str(tmp_path), "--run-name", "dit", "--max-steps", "2"])
    dit_dir = train.main(cfg)
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    dit_ckpt = os.path.join(dit_dir, "checkpoints", "step_0000002.pt")
    run_dir = run(tmp_path, "--max-steps", "1", "--init-from", dit_ckpt, name="fpdm")
    assert "initialised from" in open(os.path.join(run_dir, "log.txt")).read()
    # Before its first step the FPDM's fixed-point block was the DiT's middle block (block 1 of 4 -> 1 + (4-2)//2 = 2).
    dit = torch.load(dit_ckpt, weights_only=True)["model"]
    fpdm_cfg = train.parse_args(TINY_ARGS + ["--init-from", dit_ckpt])
    from models import DiT_models
    import data
    model = DiT_models[fpdm_cfg.model](**train.model_config(fpdm_cfg, data.build_dataset("mnist", image_size=14)))
    report = train.initialise_from(model, fpdm_cfg)
    assert report["placement"] == {"blocks_pre.0": 0, "block_fixed_point": 2, "blocks_post.0": 3}
    torch.testing.assert_close(model.block_fixed_point.attn.qkv.weight, dit["blocks.2.attn.qkv.weight"])
    with pytest.raises(ValueError, match="holds an FPDM"):
        train.initialise_from(model, train.parse_args(TINY_ARGS + ["--init-from", os.path.join(
            run_dir, "checkpoints", "step_0000001.pt")]))
