"""train.py: checkpoints, exact resume, crash safety, NaN guard, bad input, and a 2-process accelerate run."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import sjfb_recording_train
import train
from models import DiT
from fpdm import checkpoints
from fpdm import config as configs
from fpdm import training
from conftest import reset_accelerate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARGS = ["--data-path", "mnist", "--image-size", "14", "--model", "DiT-S/2", "--hidden-size", "32", "--depth", "4",
             "--num-heads", "2", "--fixed-point", "--fixed-point-no-grad-max-iters", "3",
             "--fixed-point-with-grad-max-iters", "3", "--global-batch-size", "8", "--log-every", "1",
             "--ckpt-every", "3", "--num-sample-images", "10", "--sample-steps", "4", "--tracker", "none",
             "--lr", "1e-3"]



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
    # model FLOPs: each step's, from its S-JFB counts (one micro-batch a step here); MFU only on a GPU of the table
    model = DiT(**ckpt["model_config"])
    for r in rows:
        counts = (round(float(r["sjfb_no_grad"])), round(float(r["sjfb_with_grad"])))
        per_step = float(r["tflops_per_gpu"]) * 1e12 / float(r["steps_per_s"])
        assert per_step == pytest.approx(model.training_flops(counts) * 8, rel=1e-9) and r["mfu"] == ""
    assert sorted(os.listdir(os.path.join(run_dir, "samples"))) == ["step_0000003.png", "step_0000006.png"]
    assert "saved checkpoints/step_0000006.pt" in open(os.path.join(run_dir, "log.txt")).read()
    # EMA (decay 0.9999) moved between steps 3 and 6, far less than the model did (exact formula: test below).
    (model3, ema3), (model6, ema6) = final_weights(run_dir, 3), final_weights(run_dir, 6)
    key = "blocks_pre.0.attn.qkv.weight"
    assert 0 < (ema6[key] - ema3[key]).abs().max() < 0.01 * (model6[key] - model3[key]).abs().max()


def test_compile_compiles_the_trained_model_and_the_ema_it_samples_with(tmp_path, monkeypatch):
    """--compile: the blocks of the model and of its EMA (previews, FID during training) are compiled, and a run with
    previews and evaluations (three batch sizes, grad and no-grad modes, trained and EMA weights) goes through both
    within dynamo's recompile limit (5 graphs, limit 8: no block falls back to eager)."""
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler (none found)")
    import torch._dynamo
    from models import DiT
    compiled, real = [], DiT.compile_regions
    monkeypatch.setattr(DiT, "compile_regions", lambda self, **kw: compiled.append(self) or real(self, **kw))
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    run_dir = run(tmp_path, "--compile", "--max-steps", "2", "--sample-every", "2", "--eval-every", "2",
                  "--eval-samples", "12", "--eval-steps", "3", "--eval-batch-size", "5")
    graphs, frames = counters["stats"]["unique_graphs"], dict(counters["frames"])
    torch._dynamo.reset()
    assert 1 <= graphs < torch._dynamo.config.recompile_limit and frames["ok"] == frames["total"], (graphs, frames)
    assert len({id(m) for m in compiled}) == 2
    assert [any(p.requires_grad for p in m.parameters()) for m in compiled] == [True, False]  # model, then EMA
    assert all(b._compiled_call_impl is not None for m in compiled for b in m.transformer_blocks())
    assert os.listdir(os.path.join(run_dir, "samples")) == ["step_0000002.png"]


@pytest.mark.parametrize("flags,decays", [(["--ema-decay", "0.5"], [0.5, 0.5]),
                                          (["--ema-warmup"], [3 / 12, 4 / 13])])  # min(0.9999, (1 + k)/(10 + k))
def test_ema_follows_its_formula_at_every_step(tmp_path, flags, decays):
    """ema_k = d_k · ema_{k−1} + (1 − d_k) · model_k, checked on the checkpoints of steps 1..3."""
    run_dir = run(tmp_path, "--max-steps", "3", "--ckpt-every", "1", "--keep-last", "5", *flags)
    weights = [final_weights(run_dir, k) for k in (1, 2, 3)]
    for k, decay in zip((2, 3), decays):
        (_, ema_prev), (model, ema) = weights[k - 2], weights[k - 1]
        for key in ema:
            expected = decay * ema_prev[key] + (1 - decay) * model[key]
            torch.testing.assert_close(ema[key], expected, atol=1e-7, rtol=1e-6, msg=key)
        assert any(not torch.equal(ema[key], ema_prev[key]) for key in ema)


def record_optimizer_steps(monkeypatch):
    """Each AdamW step's learning rate, weight decay, gradients and parameters before and after."""
    steps, real_step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        params = [p for group in self.param_groups for p in group["params"]]
        record = {"lr": self.param_groups[0]["lr"], "grads": [None if p.grad is None else p.grad.clone()
                                                              for p in params],
                  "before": [p.detach().clone() for p in params]}
        out = real_step(self, *args, **kwargs)
        record["after"] = [p.detach().clone() for p in params]
        steps.append(record)
        return out
    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    return steps


def test_without_clipping_the_norm_is_logged_and_the_gradients_are_not_touched(tmp_path, monkeypatch):
    """--max-grad-norm 0 (the default): the logged norm is that of the gradients the optimizer gets, computed
    without clip_grad_norm_'s pass that multiplies every gradient by 1 (a read and write of all of them per step)."""
    import accelerate
    steps = record_optimizer_steps(monkeypatch)

    def no_clipping(*args, **kwargs):
        raise AssertionError("clip_grad_norm_ called with clipping off")
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_", no_clipping)
    run_dir = run(tmp_path, "--max-steps", "2", "--log-every", "1")
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(steps) == 2
    for record, row in zip(steps, rows):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in record["grads"]
                                                     if g is not None]))
        assert float(row["grad_norm"]) == pytest.approx(norm.item(), rel=1e-5) and norm > 0


def test_warmup_clipping_and_weight_decay_follow_their_formulas(tmp_path, monkeypatch):
    """Warm-up: step k uses lr·min(1, k/W) (and logs it). Clipping: the gradient reaching the optimizer has norm
    exactly --max-grad-norm when the raw norm is larger. Decoupled weight decay: AdamW's first step is
    p₁ = p₀(1 − lr·wd) − lr·g/(|g| + ε)."""
    steps = record_optimizer_steps(monkeypatch)
    run_dir = run(tmp_path, "--max-steps", "3", "--warmup-steps", "4", "--max-grad-norm", "1e-3", "--weight-decay",
                  "0.5")
    assert [s["lr"] for s in steps] == pytest.approx([1e-3 * k / 4 for k in (1, 2, 3)], rel=1e-12)
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows] == pytest.approx([s["lr"] for s in steps], rel=1e-12)
    for record, row in zip(steps, rows):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in record["grads"]
                                                     if g is not None]))
        assert float(row["grad_norm"]) > 1e-2 and norm.item() == pytest.approx(1e-3, rel=1e-4)
    first, lr = steps[0], steps[0]["lr"]
    for g, before, after in zip(first["grads"], first["before"], first["after"]):
        g = torch.zeros_like(before) if g is None else g
        expected = before * (1 - lr * 0.5) - lr * g / (g.abs() + 1e-8)
        torch.testing.assert_close(after, expected, atol=1e-9, rtol=1e-5)


def test_step_batch_sampler_splits_the_one_process_batch(tmp_path):
    """Two ranks' index lists at each micro-step are disjoint halves of the one-process batch, and each epoch of
    positions is a permutation of the dataset."""
    one = iter(training.StepBatchSampler(20, 8, 0, 1, seed=3, start_micro_step=0))
    ranks = [iter(training.StepBatchSampler(20, 8, r, 2, seed=3, start_micro_step=0)) for r in (0, 1)]
    stream = []
    for _ in range(5):
        batch, halves = next(one), [next(r) for r in ranks]
        assert halves[0] + halves[1] == batch and len(halves[0]) == 4
        stream += batch
    assert sorted(stream[:20]) == list(range(20)) == sorted(stream[20:40]) and stream[:20] != stream[20:40]
    resumed = iter(training.StepBatchSampler(20, 8, 0, 1, seed=3, start_micro_step=3))
    assert next(resumed) == stream[24:32]


def test_gradient_accumulation_takes_the_same_steps(tmp_path, monkeypatch):
    """Global batch 8 as 1 × 8 and as 4 micro-batches of 2, through train.py itself (random S-JFB counts, label
    dropout): the same loss and gradients at every optimizer step, hence the same weights — each example's t, noise
    and label dropout are drawn from (seed, step, position in the global batch) (training.ExampleDraws)."""
    steps = record_optimizer_steps(monkeypatch)
    dirs = [run(tmp_path, "--max-steps", "2", "--grad-accum-steps", accum, name=f"a{accum}") for accum in ("1", "4")]
    assert len(steps) == 4
    for a, b in ((steps[0], steps[2]), (steps[1], steps[3])):
        for ga, gb in zip(a["grads"], b["grads"]):
            assert (ga is None) == (gb is None)
            if ga is not None:
                torch.testing.assert_close(ga, gb, atol=1e-7, rtol=1e-4)
    assert losses(dirs[0]) == pytest.approx(losses(dirs[1]), rel=1e-5)
    for x, y in zip(final_weights(dirs[0], 2), final_weights(dirs[1], 2)):
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=1e-4)


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
    """SIGKILL a real training process after its first checkpoint, resume it, and match an uninterrupted run (both
    in-process, with one thread like the killed process: bitwise equality on CPU needs equal thread counts)."""
    common = [sys.executable, os.path.join(ROOT, "train.py"), *TINY_ARGS, "--results-dir", str(tmp_path),
              "--ckpt-every", "2"]
    proc = subprocess.Popen(common + ["--run-name", "killed", "--max-steps", "100000"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    pointer = tmp_path / "killed" / "latest.json"
    deadline = time.time() + 120
    while not pointer.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert pointer.exists(), "no checkpoint within 120 s"
    resumed_from = json.load(open(pointer))["step"]
    target = resumed_from + 2
    for name, extra in (("killed", ["--resume", "auto"]), ("straight", [])):
        run(tmp_path, "--ckpt-every", "2", "--max-steps", str(target), *extra, name=name)
        reset_accelerate()
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
    ckpt = checkpoints.read_training_checkpoint(os.path.join(run_dir, "checkpoints/step_0000003.pt"))
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


def test_fp16_loss_scale_overflows_skip_the_step_and_the_scale_survives_a_resume(tmp_path, monkeypatch):
    """--mixed-precision fp16 (a GradScaler; on this CPU emulated by giving accelerate one): a scale so high that the
    gradients overflow is the scaler's normal signal, no NaN error; it skips those steps (weights unchanged), lowers
    its scale and trains on. The scale is in the checkpoint and a resumed run continues with it."""
    from fpdm import training
    real_make, real_step, steps = training.make_accelerator, torch.optim.AdamW.step, {"n": 0}

    def fp16_accelerator(cfg, run_dir):
        accelerator, tracker = real_make(cfg, run_dir)
        accelerator.native_amp = True  # accelerate keeps the scaler to CUDA; its code path is the same
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 126, backoff_factor=2.0 ** -116,
                                                  growth_interval=1000)
        return accelerator, tracker

    def counting_step(self, *args, **kwargs):
        steps["n"] += 1
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(train, "make_accelerator", fp16_accelerator)
    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    run_dir = run(tmp_path, "--max-steps", "4", "--mixed-precision", "fp16", "--ckpt-every", "4", "--warmup-steps", "10")
    rows = list(csv.DictReader(open(os.path.join(run_dir, "metrics.csv"))))
    norms = [math.isfinite(float(r["grad_norm"])) for r in rows]
    assert norms == [False, True, True, True] and steps["n"] == 3  # the overflow skipped, then trained
    assert rows[0]["lr"] == rows[1]["lr"] != rows[2]["lr"]  # the warm-up waits for the first step taken
    scale = torch.load(os.path.join(run_dir, "checkpoints", "step_0000004.pt"), weights_only=True)["scaler"]["scale"]
    assert scale == 2.0 ** 10
    reset_accelerate()
    seen = {}
    real_train_step = train.train_step

    def recording_train_step(cfg, model, raw_model, diffusion, dataset, loader, optimizer, scheduler, accelerator,
                             *args, **kwargs):
        seen.setdefault("scale", accelerator.scaler.get_scale())
        return real_train_step(cfg, model, raw_model, diffusion, dataset, loader, optimizer, scheduler, accelerator,
                               *args, **kwargs)
    monkeypatch.setattr(train, "train_step", recording_train_step)
    run(tmp_path, "--max-steps", "5", "--mixed-precision", "fp16", "--ckpt-every", "4", "--warmup-steps", "10",
        "--resume", "auto")
    assert seen["scale"] == pytest.approx(scale)


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
    real_save = checkpoints.atomic_torch_save

    def recording_save(obj, path):
        real_save(obj, path)
        digest[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    monkeypatch.setattr(checkpoints, "atomic_torch_save", recording_save)
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
    with pytest.raises(ValueError, match=r"architecture of a run cannot change: --hidden-size 64 \(run: 32\)"):
        run(tmp_path, "--max-steps", "6", "--resume", "auto", "--hidden-size", "64")
    after = {f: os.path.getmtime(os.path.join(run_dir, "checkpoints", f)) for f in os.listdir(
        os.path.join(run_dir, "checkpoints"))}
    assert after == before
    # The command line prints the same message as one line and exits 1.
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--fixed-point-with-grad-min-iters", "-1"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "with-grad range" in proc.stderr


def test_two_process_cpu_run_through_accelerate(tmp_path):
    """The README's command, `accelerate launch --config_file aconfs/cpu_2proc.yaml train.py ...` with 2 processes ×
    accumulation 2 × micro-batch 2, equals `python train.py` with 1 process × batch 8 — random S-JFB counts, label
    dropout 0.1, no harness: the same losses and weights after 4 steps. A run resumed from the 2-process run's step-2
    checkpoint on 1 process continues the same run. One checkpoint per rank's RNG."""
    flags = [*TINY_ARGS, "--results-dir", str(tmp_path), "--max-steps", "4", "--ckpt-every", "2", "--eval-every",
             "2", "--eval-samples", "9", "--eval-steps", "3", "--ema-decay", "0.5"]  # an EMA far from the init
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
           os.path.join(ROOT, "aconfs", "cpu_2proc.yaml"), "--main_process_port", "29517",
           os.path.join(ROOT, "train.py"), *flags, "--run-name", "ddp", "--grad-accum-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})  # CPU, even beside a GPU
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = open(tmp_path / "ddp" / "log.txt").read()
    assert "2 process(es)" in log
    assert "collectives now time out after 1:00:00" in log  # the step loop's (24 h through the start)
    ckpt = torch.load(tmp_path / "ddp" / "checkpoints" / "step_0000004.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # per-rank seeds
    assert sorted(os.listdir(tmp_path / "ddp" / "checkpoints")) == ["step_0000002.pt", "step_0000004.pt"]

    single = train.main(train.parse_args([*flags, "--run-name", "single"]))
    assert losses(tmp_path / "ddp") == pytest.approx(losses(single), rel=1e-5)
    for x, y in zip(final_weights(tmp_path / "ddp", 4), final_weights(single, 4)):
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=1e-4, msg=key)
    reset_accelerate()
    resumed = train.main(train.parse_args([*flags, "--run-name", "resumed", "--resume",
                                           str(tmp_path / "ddp" / "checkpoints" / "step_0000002.pt")]))
    assert losses(resumed) == pytest.approx({k: v for k, v in losses(single).items() if k > 2}, rel=1e-5)
    for x, y in zip(final_weights(resumed, 4), final_weights(single, 4)):
        for key in x:
            torch.testing.assert_close(x[key], y[key], atol=1e-6, rtol=1e-4, msg=key)
    # FID during training, sharded (5 + 4 samples) and gathered: the same samples, so the same FID-MNIST (each
    # process samples from its own EMA, which must start from the same weights as rank 0's).
    sharded, alone = eval_rows(tmp_path / "ddp"), eval_rows(single)
    assert [r["step"] for r in sharded] == [r["step"] for r in alone] == ["2", "4"]
    assert [float(r["value"]) for r in sharded] == pytest.approx([float(r["value"]) for r in alone], rel=1e-3)


def test_ddp_holds_one_copy_of_the_gradients(tmp_path):
    """DDP's gradients are views into its all-reduce buckets (no second copy: 2.7 GB per GPU at DiT-XL/2) and the
    constant positional embedding is not broadcast at every forward; the 2-process run above checks that training
    is unchanged by it."""
    accelerator, _ = training.make_accelerator(train.parse_args([*TINY_ARGS, "--results-dir", str(tmp_path)]),
                                               str(tmp_path))
    try:
        kwargs = accelerator.ddp_handler.to_kwargs()
        assert kwargs["gradient_as_bucket_view"] is True and kwargs["broadcast_buffers"] is False
    finally:
        accelerator.end_training()
        reset_accelerate()


def launch_two_machines(tmp_path, flags, port, log):
    """The README's multi-node recipe on one host: aconfs/multinode_template.yaml with machine ranks 0 and 1, one
    process each, main process 127.0.0.1 (on the CPU: use_cpu, gloo). Returns both launchers' stderr."""
    import yaml
    conf = yaml.safe_load(open(os.path.join(ROOT, "aconfs", "multinode_template.yaml")))
    conf.update(use_cpu=True, mixed_precision="no", num_processes=2, main_process_ip="127.0.0.1",
                main_process_port=port)
    conf.pop("gpu_ids", None)
    path = tmp_path / "two_machines.yaml"
    path.write_text(yaml.safe_dump(conf))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "SJFB_LOG": str(log)}
    launchers = [subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch",
                                   "--config_file", str(path), "--machine_rank", str(rank),
                                   os.path.join(ROOT, "tests", "sjfb_recording_train.py"), *flags],
                                  cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for rank in (0, 1)]
    errors = [proc.communicate(timeout=300)[1] for proc in launchers]
    assert [proc.returncode for proc in launchers] == [0, 0], errors[0][-2000:] + errors[1][-2000:]


def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sjfb_draws_are_the_same_on_every_rank_machine_and_world_size(tmp_path, monkeypatch):
    """Two "machines" of one process each (the multi-node recipe over loopback) run the same random S-JFB counts on
    both ranks at every micro-batch, the same sequence as one process and as `training.sjfb_counts`, and a run resumed
    on them ends bit-exactly where an uninterrupted one does. Both ranks hold the same EMA at every step (each samples
    its share of FID during training from its own), as one process does."""
    flags = [*TINY_ARGS, "--results-dir", str(tmp_path), "--grad-accum-steps", "2", "--ckpt-every", "2",
             "--num-sample-images", "0"]
    launch_two_machines(tmp_path, [*flags, "--run-name", "straight", "--max-steps", "5"], free_port(),
                        tmp_path / "straight")
    launch_two_machines(tmp_path, [*flags, "--run-name", "split", "--max-steps", "2"], free_port(), tmp_path / "split")
    launch_two_machines(tmp_path, [*flags, "--run-name", "split", "--max-steps", "5", "--resume", "auto"], free_port(),
                        tmp_path / "split")
    assert "2 process(es)" in open(tmp_path / "straight" / "log.txt").read()
    cfg = train.parse_args([*flags, "--max-steps", "5"])
    expected = [training.sjfb_counts(cfg, step) for step in range(5) for micro in range(2)]  # one draw per step
    assert len(set(expected)) > 3  # the counts do vary
    for name in ("straight", "split"):
        for rank in (0, 1):
            assert sjfb_recording_train.read_draws(tmp_path / f"{name}.{rank}") == expected, (name, rank)
        emas = [(tmp_path / f"{name}.ema.{rank}").read_text().split() for rank in (0, 1)]
        assert len(emas[0]) == 5 and emas[0] == emas[1], name  # split: 2 steps, then 3 resumed
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    for a, b in zip(final_weights(tmp_path / "split", 5), final_weights(tmp_path / "straight", 5)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)

    from models import FPDM
    monkeypatch.setattr(FPDM, "solve", sjfb_recording_train.recording_solve(FPDM.solve, tmp_path / "single_draws"))
    monkeypatch.setattr(train, "update_ema", sjfb_recording_train.recording_update_ema(training.update_ema,
                                                                                      tmp_path / "single_ema"))
    train.main(train.parse_args([*flags, "--run-name", "single", "--max-steps", "5"]))
    assert sjfb_recording_train.read_draws(tmp_path / "single_draws") == expected
    ema = [float(x) for x in (tmp_path / "single_ema").read_text().split()]
    assert ema == pytest.approx([float(x) for x in (tmp_path / "straight.ema.0").read_text().split()], rel=1e-5)


def test_init_fpdm_from_a_trained_dit(tmp_path):
    dit_args = [a for a in TINY_ARGS if a != "--fixed-point"]
    cfg = train.parse_args(dit_args + ["--results-dir", str(tmp_path), "--run-name", "dit", "--max-steps", "2"])
    dit_dir = train.main(cfg)
    reset_accelerate()
    dit_ckpt = os.path.join(dit_dir, "checkpoints", "step_0000002.pt")
    run_dir = run(tmp_path, "--max-steps", "1", "--init-from", dit_ckpt, name="fpdm")
    assert "initialised from" in open(os.path.join(run_dir, "log.txt")).read()
    # Before its first step the FPDM's fixed-point block was the DiT's middle block (block 1 of 4 -> 1 + (4-2)//2 = 2).
    dit = torch.load(dit_ckpt, weights_only=True)["model"]
    fpdm_cfg = train.parse_args(TINY_ARGS + ["--init-from", dit_ckpt])
    from fpdm import data
    from models import DiT_models
    dataset = data.build_dataset("mnist", image_size=14)
    model = DiT_models[fpdm_cfg.net.model](**configs.model_kwargs(fpdm_cfg, dataset.image_shape, dataset.num_classes))
    report = training.initialise_from(model, fpdm_cfg)
    assert report["placement"] == {"blocks_pre.0": 0, "block_fixed_point": 2, "blocks_post.0": 3}
    torch.testing.assert_close(model.block_fixed_point.attn.qkv.weight, dit["blocks.2.attn.qkv.weight"])
    with pytest.raises(ValueError, match="holds an FPDM"):
        training.initialise_from(model, train.parse_args(TINY_ARGS + ["--init-from", os.path.join(
            run_dir, "checkpoints", "step_0000001.pt")]))


# ------------------------------------------------------------------------------------------------------------------
# Run folders: pruning, resume settings, one writer, metrics once per step
# ------------------------------------------------------------------------------------------------------------------

def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path):
    """Resumed from an older checkpoint with --keep-last 1: the new checkpoint survives (it used to be deleted at once,
    leaving latest.json pointing at nothing); later checkpoints of the abandoned run wait to be overwritten."""
    run_dir = run(tmp_path, "--max-steps", "4", "--ckpt-every", "2")
    run(tmp_path, "--max-steps", "3", "--ckpt-every", "1", "--keep-last", "1", "--resume",
        os.path.join(run_dir, "checkpoints", "step_0000002.pt"))
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_0000003.pt", "step_0000004.pt"]
    assert json.load(open(os.path.join(run_dir, "latest.json")))["path"] == "checkpoints/step_0000003.pt"
    run(tmp_path, "--max-steps", "6", "--ckpt-every", "1", "--keep-last", "2", "--resume", "auto")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_0000005.pt", "step_0000006.pt"]
    assert [step for step in losses(run_dir)] == [1, 2, 3, 4, 5, 6]  # each step once, in order
    # --keep-every: milestones survive pruning and do not count in --keep-last (the XL presets: 5k and 50k steps).
    run(tmp_path, "--max-steps", "11", "--ckpt-every", "1", "--keep-last", "2", "--keep-every", "4", "--resume",
        "auto")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == [
        "step_0000008.pt", "step_0000010.pt", "step_0000011.pt"]  # 4 was pruned before the flag was given
    assert configs.preset("fpdm-xl2-in256").run.keep_every == 50_000


def test_start_removes_the_temporaries_a_killed_run_left(tmp_path):
    """A kill mid-checkpoint leaves `step_N.pt.tmp-PID` (as large as a checkpoint: ~11 GB at DiT-XL/2): the next start
    of the run removes those of processes that are gone, in the run folder and checkpoints/, and logs the bytes
    freed; a live process's temporary is kept."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    stale = [run_dir / "checkpoints" / "step_0000003.pt.tmp-999999999", run_dir / "latest.json.tmp-999999998"]
    stale[0].write_bytes(b"x" * 1000)
    stale[1].write_bytes(b"x" * 234)
    live = run_dir / "checkpoints" / f"step_0000006.pt.tmp-{os.getppid()}"
    live.write_bytes(b"")
    run(tmp_path, "--max-steps", "1")
    assert not any(path.exists() for path in stale) and live.exists()
    assert ("removed 2 temporary file(s) a killed run left (latest.json.tmp-999999998, step_0000003.pt.tmp-"
            "999999999): 1,234 bytes freed") in (run_dir / "log.txt").read_text()


def test_resume_refuses_other_settings_and_applies_overrides(tmp_path, monkeypatch):
    run_dir = run(tmp_path, "--max-steps", "2")
    with pytest.raises(ValueError, match=r"--lr 0.0005 \(run: 0.001\); .*--override lr=0.0005"):
        run(tmp_path, "--max-steps", "3", "--resume", "auto", "--lr", "5e-4")
    with pytest.raises(ValueError, match=r"--noise-schedule 'cosine' \(run: 'linear'\), --predict-v True"):
        run(tmp_path, "--max-steps", "3", "--resume", "auto", "--noise-schedule", "cosine", "--predict-v")
    with pytest.raises(ValueError, match=r"at step 2, beyond --max-steps 1"):
        run(tmp_path, "--max-steps", "1", "--resume", "auto")
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        train.parse_args(TINY_ARGS + ["--override", "learning_rate=1"])
    assert json.load(open(os.path.join(run_dir, "latest.json")))["step"] == 2  # nothing was written
    steps = record_optimizer_steps(monkeypatch)
    run(tmp_path, "--max-steps", "4", "--resume", "auto", "--override", "lr=5e-4", "--override", "weight-decay=0.01",
        "--log-every", "2")  # logging may change freely
    assert [(s["lr"]) for s in steps] == [5e-4, 5e-4]
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "step_0000004.pt"), weights_only=True)
    assert ckpt["config"]["lr"] == 5e-4 and ckpt["opt"]["param_groups"][0]["weight_decay"] == 0.01
    assert "--override): lr=5e-4, weight-decay=0.01" in open(os.path.join(run_dir, "log.txt")).read()


def test_a_run_folder_has_one_writer_and_metrics_hold_each_step_once(tmp_path, monkeypatch):
    from diffusion.gaussian_diffusion import GaussianDiffusion
    from fpdm.run_folders import RunLock
    real = GaussianDiffusion.training_losses
    calls = {"n": 0}

    def dies_at_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(self, *args, **kwargs)
    monkeypatch.setattr(GaussianDiffusion, "training_losses", dies_at_step_3)
    with pytest.raises(KeyboardInterrupt):  # two steps logged, no checkpoint yet
        run(tmp_path, "--max-steps", "6", "--ckpt-every", "5")
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert list(losses(run_dir)) == [1, 2] and not (run_dir / "latest.json").exists()
    with pytest.raises(FileExistsError, match="has not written a checkpoint yet: pass --resume auto"):
        run(tmp_path, "--max-steps", "6")
    holder = RunLock(str(run_dir)).acquire()  # a live run holds the folder
    try:
        with pytest.raises(FileExistsError, match=r"in use by another run \(.*:\d+:[0-9a-f]{8}\)"):
            run(tmp_path, "--max-steps", "6", "--resume", "auto")
    finally:
        holder.release()
    (run_dir / ".lock").write_text("elsewhere:4242")  # the owner died without cleaning up: taken over
    run(tmp_path, "--max-steps", "6", "--ckpt-every", "5", "--resume", "auto")
    assert list(losses(run_dir)) == [1, 2, 3, 4, 5, 6]  # the start-over's rows replace the first attempt's
    log = open(run_dir / "log.txt").read()
    assert "took over the lock of elsewhere:4242" in log and (run_dir / ".lock").read_text() == ""
    # Rows logged after the checkpoint a run resumes from are logged again, not duplicated.
    run(tmp_path, "--max-steps", "7", "--resume", str(run_dir / "checkpoints" / "step_0000005.pt"))
    assert list(losses(run_dir)) == [1, 2, 3, 4, 5, 6, 7]
    assert "dropped 1 metrics.csv rows after step 5" in open(run_dir / "log.txt").read()


def test_no_preview_images_and_out_of_range_flags(tmp_path):
    run_dir = run(tmp_path, "--max-steps", "2", "--num-sample-images", "0", "--sample-every", "1")
    assert os.listdir(os.path.join(run_dir, "samples")) == []
    for flags, message in ((("--class-dropout-prob", "1.5"), r"class-dropout-prob must lie in \[0, 1\)"),
                           (("--ema-decay", "2"), r"ema-decay must lie in \[0, 1\]"),
                           (("--lr", "0"), "--lr must be > 0"), (("--num-sample-images", "-1"), "must be >= 0")):
        with pytest.raises(ValueError, match=message):
            run(tmp_path, *flags, name="bad")
    assert not (tmp_path / "bad").exists()


def test_workers_exit_when_their_launcher_dies(tmp_path):
    """exit_with_parent: a child that asked for it is terminated when its parent is SIGKILLed (as workers of a killed
    accelerate launch must be); without it the child would live on as an orphan."""
    pid_file = tmp_path / "child.pid"
    child = (f"import os, sys, time; from fpdm import run_folders; run_folders.exit_with_parent(); "
             f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", f"import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"])
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.05)
    child_pid = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def processes_running(marker):
    """PIDs of this machine's processes whose command line contains `marker`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found


def test_killing_accelerate_launch_stops_its_workers(tmp_path):
    """kill -9 of a real `accelerate launch` with 2 CPU workers: both workers exit (parent-death signal) instead of
    training on as orphans that hold the run folder's lock."""
    name = f"orphans-{os.getpid()}"
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
           os.path.join(ROOT, "aconfs", "cpu_2proc.yaml"), "--main_process_port", "29519",
           os.path.join(ROOT, "train.py"), *TINY_ARGS, "--results-dir", str(tmp_path), "--run-name", name,
           "--max-steps", "100000", "--log-every", "1", "--ckpt-every", "100000"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    metrics = tmp_path / name / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) > 2):
        time.sleep(0.2)  # both workers are training
    workers = [pid for pid in processes_running(name) if pid != launcher.pid]
    try:
        assert len(workers) >= 2, "the workers did not start"
        launcher.kill()
        launcher.wait()
        deadline = time.time() + 20
        while time.time() < deadline and any(pid in processes_running(name) for pid in workers):
            time.sleep(0.2)
        assert not [pid for pid in workers if pid in processes_running(name)], "workers outlived accelerate launch"
    finally:
        for pid in processes_running(name):
            os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------------------------
# FID during training
# ------------------------------------------------------------------------------------------------------------------

def eval_rows(run_dir):
    with open(os.path.join(run_dir, "eval.csv")) as f:
        return list(csv.DictReader(f))


def test_fid_during_training_leaves_the_run_bit_exact(tmp_path):
    """--eval-every logs FID-MNIST (and accuracy) of the EMA model to eval.csv without touching the training RNG:
    the weights equal those of a run without evaluation, and a run resumed in between logs each step once and ends
    with the same weights and the same FIDs."""
    flags = ["--eval-every", "2", "--eval-samples", "12", "--eval-steps", "3", "--ckpt-every", "2"]
    with_eval = run(tmp_path, "--max-steps", "4", *flags, name="eval")
    without = run(tmp_path, "--max-steps", "4", "--ckpt-every", "2", name="plain")
    for a, b in zip(final_weights(with_eval, 4), final_weights(without, 4)):
        assert all(torch.equal(a[key], b[key]) for key in a)
    rows = eval_rows(with_eval)
    assert [int(r["step"]) for r in rows] == [2, 4] and {r["metric"] for r in rows} == {"fid_mnist"}
    assert os.path.getsize(os.path.join(with_eval, "eval.png")) > 0  # the curve
    assert all(float(r["value"]) > 0 and 0 <= float(r["accuracy"]) <= 1 and r["num_samples"] == "12" for r in rows)
    run(tmp_path, "--max-steps", "2", *flags, name="split")
    split = run(tmp_path, "--max-steps", "4", *flags, "--resume", "auto", name="split")
    for a, b in zip(final_weights(split, 4), final_weights(with_eval, 4)):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert [(r["step"], r["value"]) for r in eval_rows(split)] == [(r["step"], r["value"]) for r in rows]


def test_fid_during_training_on_image_data_needs_a_reference(tmp_path):
    cfg = configs.parse_args(["--data-path", str(tmp_path), "--eval-every", "100"])
    with pytest.raises(ValueError, match="--eval-every on image data needs --eval-reference"):
        cfg.validate()


def test_previews_and_evaluations_stay_out_of_the_metrics_window(tmp_path, monkeypatch):
    """Time spent inside `MetricsWindow.apart()` (train.py's previews and FID evaluations) is not counted in the
    window's steps/s and images/s."""
    from types import SimpleNamespace
    clock = {"t": 0.0}
    monkeypatch.setattr(training.time, "time", lambda: clock["t"])
    cfg = train.parse_args([*TINY_ARGS, "--results-dir", str(tmp_path)])
    window = training.MetricsWindow(str(tmp_path / "metrics.csv"), cfg, SimpleNamespace(
        is_main_process=False, device=torch.device("cpu")), None)
    clock["t"] = 10.0  # 10 s of training
    with window.apart():
        clock["t"] = 1010.0  # a 1,000 s evaluation
    assert clock["t"] - window.start == 10.0
