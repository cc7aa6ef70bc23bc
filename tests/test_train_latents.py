"""train.py on VAE latents (extract_features.py folders): previews and FID during training see images decoded
through the run's VAE, never latent channels; a run that would decode without a VAE stops in one line; the launch
config's mixed precision is the one used and recorded; a resume keeps no checkpoint in memory."""

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import train
from fpdm import training
from test_train import ROOT
from conftest import reset_accelerate

LATENT_ARGS = ["--model", "DiT-S/2", "--hidden-size", "32", "--depth", "4", "--num-heads", "2", "--fixed-point",
               "--fixed-point-no-grad-max-iters", "2", "--fixed-point-with-grad-max-iters", "2",
               "--global-batch-size", "4", "--log-every", "1", "--sample-steps", "2", "--tracker", "none",
               "--lr", "1e-3"]



@pytest.fixture(scope="module")
def latent_run_inputs(tmp_path_factory):
    """A small random AutoencoderKL saved to disk, 8 images of 16 px in 2 classes extracted with it, random
    Inception weights saved in pytorch-fid's layout and an `evaluate.py stats` reference of the images."""
    from diffusers import AutoencoderKL

    import evaluate
    from extract_features import extract
    from fpdm.metrics import InceptionFeatures
    root = tmp_path_factory.mktemp("latent_run")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    vae.save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for i in range(8):
        path = root / "images" / f"class{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        image.save(path)
        (root / "reference").mkdir(exist_ok=True)
        image.save(root / "reference" / f"{i}.png")  # evaluate.py stats reads one flat folder
    extract(str(root / "images"), str(root / "latents"), str(root / "vae"), image_size=16, batch_size=4,
            shard_size=8, flip=False, device="cpu")
    net = InceptionFeatures(random_init=True).net.state_dict()
    torch.save({**net, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, root / "inception.pth")
    evaluate.main(["stats", str(root / "reference"), "--out", str(root / "ref"), "--inception",
                   str(root / "inception.pth"), "--batch-size", "4", "--device", "cpu"])
    return root


def test_previews_and_fid_decode_latents_through_the_vae(latent_run_inputs, tmp_path, monkeypatch):
    """The images Inception scores equal vae.decode(latents / scaling_factor) mapped to uint8, sampled in chunks of
    --eval-batch-size, and the preview grid shows the decoded images: not the first 3 latent channels."""
    from diffusers import AutoencoderKL

    from fpdm import metrics, sampling
    root = latent_run_inputs
    sampled, scored = [], []
    real_sample, real_features = sampling.sample_images, metrics.InceptionFeatures.features

    def recording_sample(*args, **kwargs):
        out = real_sample(*args, **kwargs)
        sampled.append(out[0].detach().clone())
        return out

    def recording_features(self, images, *args, **kwargs):
        scored.append(np.array(images))
        return real_features(self, images, *args, **kwargs)
    monkeypatch.setattr(sampling, "sample_images", recording_sample)
    monkeypatch.setattr(metrics.InceptionFeatures, "features", recording_features)
    run_dir = train.main(train.parse_args([
        *LATENT_ARGS, "--data-path", str(root / "latents"), "--results-dir", str(tmp_path), "--run-name", "latent",
        "--max-steps", "2", "--ckpt-every", "2", "--num-sample-images", "4", "--eval-every", "2", "--eval-samples",
        "4", "--eval-steps", "2", "--eval-reference", str(root / "ref.npz"), "--eval-inception",
        str(root / "inception.pth"), "--eval-batch-size", "3"]))
    assert [len(x) for x in sampled] == [3, 1, 4] and len(scored) == 2  # the evaluation at step 2, then the preview
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    with torch.no_grad():
        decoded = [vae.decode(latents / vae.config.scaling_factor).sample for latents in sampled]
    for images, latents in zip(scored, decoded):
        expected = ((latents.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert images.shape == (len(latents), 16, 16, 3) and np.array_equal(images, expected)
    with open(os.path.join(run_dir, "eval.csv")) as f:
        assert f.read().splitlines()[1].split(",")[1] == "fid"
    from fpdm.sampling import save_grid
    save_grid(decoded[2], str(tmp_path / "expected.png"), nrow=2)
    grid = np.asarray(Image.open(os.path.join(run_dir, "samples", "step_0000002.png")))
    assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "expected.png")))


def test_a_latent_run_without_a_vae_stops_in_one_line(latent_run_inputs, tmp_path):
    """meta.json names no VAE and --vae is not given: refused before anything is written; a --vae that does not
    load is refused the same way, and so is one whose scaling factor is not the latents'; --num-sample-images 0
    without --eval-every needs none."""
    import shutil

    from diffusers import AutoencoderKL
    AutoencoderKL.from_pretrained(latent_run_inputs / "vae", scaling_factor=0.5).save_pretrained(tmp_path / "vae05")
    latents = tmp_path / "latents"
    shutil.copytree(latent_run_inputs / "latents", latents)
    meta = json.loads((latents / "meta.json").read_text())
    (latents / "meta.json").write_text(json.dumps({**meta, "vae": ""}))
    base = [sys.executable, os.path.join(ROOT, "train.py"), *LATENT_ARGS, "--data-path", str(latents),
            "--results-dir", str(tmp_path / "runs"), "--max-steps", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for extra, message in ((["--num-sample-images", "4"], "previews (--num-sample-images) on latents need the VAE"),
                           (["--vae", str(tmp_path / "missing")], "cannot load VAE"),
                           (["--vae", str(tmp_path / "vae05"), "--num-sample-images", "4"],
                            "has scaling factor 0.5, the latents were extracted with 0.18215")):
        proc = subprocess.run([*base, *extra], cwd=ROOT, capture_output=True, text=True, env=env)
        assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and message in proc.stderr, proc.stderr
        assert not os.path.exists(tmp_path / "runs" / "DiT-S-2-fpdm-latents" / "config.json")
    proc = subprocess.run([*base, "--num-sample-images", "0"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_data_flags_the_data_cannot_use_are_refused(latent_run_inputs, tmp_path, monkeypatch):
    """--vae with an image folder (trained in pixel space: nothing would encode it; DiT's train.py encodes at every
    step) and --skip-bad-images with a latent folder (its images were read at extraction): one line each, before
    anything is written, instead of a silently ignored flag. extract_features.py records a local VAE's absolute
    path, so a run started from another folder still finds it."""
    root = latent_run_inputs
    cases = ((["--data-path", str(root / "images"), "--vae", str(root / "vae")],
              rf"--vae {root / 'vae'}: {root / 'images'} is pixel data, trained in pixel space"),
             (["--data-path", str(root / "latents"), "--skip-bad-images"],
              rf"--skip-bad-images: {root / 'latents'} holds latents, whose images were read at extraction"))
    for extra, message in cases:
        with pytest.raises(ValueError, match=message):
            train.main(train.parse_args([*LATENT_ARGS, *extra, "--results-dir", str(tmp_path), "--max-steps", "1"]))
    assert os.listdir(tmp_path) == []
    from extract_features import extract
    monkeypatch.chdir(root)  # --vae given relative to where extraction ran
    meta = extract("images", str(tmp_path / "latents"), "vae", image_size=16, batch_size=4, shard_size=8, flip=False,
                   device="cpu")
    assert meta["vae"] == str(root / "vae")


def test_the_launch_config_decides_the_precision_and_a_resume_keeps_it(tmp_path, monkeypatch):
    """A bf16 launch config (accelerate launch passes it on as ACCELERATE_MIXED_PRECISION; the README's recipe test
    goes through the real launcher) and no --mixed-precision: the run trains in bf16 (logged, in config.json and the
    checkpoint), and its FID evaluations sample in bf16 too (as sample.py --precision bf16); resuming it under an
    fp32 launch is refused in one line unless --override says so."""
    from fpdm import sampling
    flags = ["--data-path", "mnist", "--image-size", "14", *LATENT_ARGS, "--results-dir", str(tmp_path),
             "--run-name", "bf16", "--num-sample-images", "0", "--eval-every", "1", "--eval-samples", "2",
             "--eval-steps", "1"]
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    real_sample, precisions = sampling.sample_images, []

    def recording_sample(*args, **kwargs):
        precisions.append(kwargs.get("precision"))
        return real_sample(*args, **kwargs)
    monkeypatch.setattr(sampling, "sample_images", recording_sample)
    run_dir = train.main(train.parse_args([*flags, "--max-steps", "1"]))
    assert precisions == ["bf16"]
    assert json.loads(open(os.path.join(run_dir, "config.json")).read())["mixed_precision_used"] == "bf16"
    assert "mixed precision bf16" in open(os.path.join(run_dir, "log.txt")).read()
    ckpt = torch.load(os.path.join(run_dir, "checkpoints", "step_0000001.pt"), weights_only=True)
    assert ckpt["mixed_precision_used"] == "bf16" and ckpt["config"]["mixed_precision"] is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    reset_accelerate()
    with pytest.raises(ValueError, match="trained with mixed precision 'bf16' but this launch gives 'no'"):
        train.main(train.parse_args([*flags, "--max-steps", "2", "--resume", "auto"]))
    reset_accelerate()
    train.main(train.parse_args([*flags, "--max-steps", "2", "--resume", "auto", "--override", "mixed_precision=no"]))
    assert json.loads(open(os.path.join(run_dir, "config.json")).read())["mixed_precision_used"] == "no"


def test_resume_drops_the_checkpoint_after_restoring(tmp_path, monkeypatch):
    """The checkpoint is read memory-mapped and nothing holds it once the weights are restored (10.8 GB per process
    at DiT-XL/2)."""
    import weakref

    from fpdm import checkpoints
    from test_train import TINY_ARGS
    args = [*TINY_ARGS, "--results-dir", str(tmp_path), "--run-name", "r", "--num-sample-images", "0"]
    train.main(train.parse_args([*args, "--max-steps", "3"]))
    reset_accelerate()

    class Checkpoint(dict):  # a dict that can be weakly referenced
        pass
    refs, loads, real_read = [], [], checkpoints.read_training_checkpoint
    real_load, real_step = torch.load, train.train_step

    def read(path):
        ckpt = Checkpoint(real_read(path))
        refs.append(weakref.ref(ckpt))
        return ckpt

    def load(*a, **kw):
        loads.append(kw.get("mmap"))
        return real_load(*a, **kw)

    def step(*a, **kw):
        gc.collect()
        assert refs and all(ref() is None for ref in refs), "the checkpoint is still referenced during training"
        return real_step(*a, **kw)
    monkeypatch.setattr(checkpoints, "read_training_checkpoint", read)
    monkeypatch.setattr(checkpoints.torch, "load", load)
    monkeypatch.setattr(train, "train_step", step)
    train.main(train.parse_args([*args, "--max-steps", "4", "--resume", "auto"]))
    assert loads == [True]


def test_ranks_that_disagree_on_the_run_stop_in_one_line(monkeypatch):
    """A node that cannot see the results folder (step 0, no checkpoint) beside nodes that resume: every process
    stops, naming what each rank saw; agreeing ranks go on."""
    import accelerate.utils
    from types import SimpleNamespace
    cfg, accelerator, ckpt, contributed = train.parse_args(["--data-path", "mnist"]), SimpleNamespace(num_processes=2), \
        {"step": 2000}, []

    def gather(mine):  # rank 0 is the first call's process; this process is rank 1
        contributed.append(mine[0])
        return [contributed[0], mine[0]]
    monkeypatch.setattr(accelerate.utils, "gather_object", gather)
    training.check_ranks_agree(cfg, "/shared/run/checkpoints/step_0002000.pt", ckpt, accelerator)
    training.check_ranks_agree(cfg, "/other/mount/run/checkpoints/step_0002000.pt", ckpt, accelerator)  # same place
    with pytest.raises(ValueError, match=r"disagree.*rank 0: step 2000, checkpoint step_0002000.pt.*rank 1: step 0, "
                                         r"checkpoint none.*same --results-dir"):
        training.check_ranks_agree(cfg, None, None, accelerator)
    with pytest.raises(ValueError, match="disagree"):  # same step, other settings
        training.check_ranks_agree(train.parse_args(["--data-path", "mnist", "--lr", "3e-4"]),
                                "/shared/run/checkpoints/step_0002000.pt", ckpt, accelerator)
    # Node-local copies of the latents, one of them stale (another extraction: other examples, another meta.json).

    class Latents(list):
        def __init__(self, n, flip):
            super().__init__(range(n))
            self.meta = {"num_images": n, "flip": flip}
    contributed.clear()
    training.check_ranks_agree(cfg, None, None, accelerator, Latents(6, True))
    training.check_ranks_agree(cfg, None, None, accelerator, Latents(6, True))
    with pytest.raises(ValueError, match=r"rank 0: .*data 6 examples, meta.json \w+; rank 1: .*data 3 examples, "
                                         r"meta.json \w+\): .*the same data"):
        training.check_ranks_agree(cfg, None, None, accelerator, Latents(3, False))


def test_example_draws_give_each_example_the_same_numbers_for_any_split(tmp_path):
    """The draws of an example depend on (seed, step, its position in the global batch) only: two processes × two
    micro-batches see the rows one process sees at once; flips of an image folder follow the uniform draw."""
    from fpdm.data import ImageFolderDataset
    for i in range(2):
        path = tmp_path / "images" / "a" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(path)
    ds = ImageFolderDataset(str(tmp_path / "images"), 4)
    cfg = train.parse_args(["--data-path", "mnist", "--global-batch-size", "8"])
    draws = training.ExampleDraws(cfg, ds, 1000, 0.1, "cpu")
    draws.draw(5)
    whole = draws.select(0, 8)
    assert set(whole) == {"t", "noise", "drop", "augment"} and whole["augment"].shape == (8,)
    parts = [draws.select((micro * 2 + rank) * 2, 2) for micro in range(2) for rank in range(2)]
    for key in whole:
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key])
    again = training.ExampleDraws(cfg, ds, 1000, 0.1, "cpu")
    again.draw(5)
    assert all(torch.equal(again.select(0, 8)[k], whole[k]) for k in whole)
    again.draw(6)
    assert not torch.equal(again.select(0, 8)["noise"], whole["noise"])
    x = torch.stack([ds[0][0]] * 8)
    flipped = ds.augment(x, whole["augment"])
    assert all(torch.equal(flipped[i], x[i].flip(-1) if whole["augment"][i] < 0.5 else x[i]) for i in range(8))


def test_fid_inputs_fail_before_step_1_and_a_failing_evaluation_loses_no_training(latent_run_inputs, tmp_path,
                                                                                  monkeypatch):
    """A wrong --eval-reference or --eval-inception path stops the run when it starts, in one line naming the flag,
    before the run folder is made (not at the first evaluation, 50k steps in; the corrected command needs no
    --resume). An evaluation that fails (out of memory, say) comes
    after its step's checkpoint: the resumed run continues from that step and makes the evaluation first."""
    root = latent_run_inputs
    base = [*LATENT_ARGS, "--data-path", str(root / "latents"), "--results-dir", str(tmp_path), "--num-sample-images",
            "0", "--eval-every", "2", "--eval-samples", "4", "--eval-steps", "2", "--ckpt-every", "2", "--max-steps", "3"]
    good = ["--eval-reference", str(root / "ref.npz"), "--eval-inception", str(root / "inception.pth")]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *base]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for name, bad, message in (("typo-ref", ["--eval-reference", str(root / "ref.nz"), *good[2:]], "--eval-reference"),
                               ("typo-inc", [*good[:2], "--eval-inception", str(root / "inc.pth")], "--eval-inception")):
        proc = subprocess.run([*cmd, "--run-name", name, *bad], capture_output=True, text=True, timeout=300, env=env)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode != 0 and message in last and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / name).exists()

    def out_of_memory(self, step, background=None):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    monkeypatch.setattr(training.Evaluator, "run", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        train.main(train.parse_args([*base, *good, "--run-name", "oom"]))
    assert os.listdir(tmp_path / "oom" / "checkpoints") == ["step_0000002.pt"]
    monkeypatch.undo()
    reset_accelerate()
    train.main(train.parse_args([*base, *good, "--run-name", "oom", "--resume", "auto"]))
    with open(tmp_path / "oom" / "eval.csv") as f:
        assert [row.split(",")[0] for row in f.read().splitlines()[1:]] == ["2"]  # made first by the resumed run
    assert sorted(os.listdir(tmp_path / "oom" / "checkpoints")) == ["step_0000002.pt", "step_0000003.pt"]
