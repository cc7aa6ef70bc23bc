"""Inputs that used to give a wrong number or a traceback instead of the right number or one line saying what to do:
16-bit PNGs in evaluation (clipped, not scaled as training reads them), invert.py's targets (squashed, not
centre-cropped as in training) and its --class-label range, FID of samples and a reference of other sizes, and
extract_features.py's --output (a file, or a folder that cannot be written)."""

import builtins
import errno
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import extract_features
import invert
from fpdm import cli, metrics
from fpdm.data import ImageFolderDataset, MNISTDigits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------------------------
# 1. 16-bit PNGs: evaluation reads images with the training reader
# ------------------------------------------------------------------------------------------------------------------

def random_mnist_classifier(size):
    """An untrained (seeded) FID-MNIST classifier with the real digits' statistics at `size`: features in a second,
    no training; enough to see whether two inputs give the same numbers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = metrics.MNISTClassifier().eval()
    real = metrics._classify(model, metrics.mnist_inputs(MNISTDigits(size).images)[0])[0]
    model.reference = {size: metrics.feature_statistics(real)}
    return model


def test_sixteen_bit_png_folder_evaluates_as_its_eight_bit_digits(tmp_path):
    digits = MNISTDigits(28)
    keep = torch.cat([torch.nonzero(digits.labels == c)[:20, 0] for c in range(10)])
    pixels = ((digits.images[keep, 0] + 1) * 127.5).round().to(torch.uint8).numpy()
    (tmp_path / "d8").mkdir()
    (tmp_path / "d16").mkdir()
    for i, digit in enumerate(pixels):
        Image.fromarray(digit).save(tmp_path / "d8" / f"{i:04d}.png")
        Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "d16" / f"{i:04d}.png")  # same, 16 bits
    assert Image.open(tmp_path / "d16" / "0000.png").mode.startswith("I")
    eight, sixteen = metrics.load_images(tmp_path / "d8"), metrics.load_images(tmp_path / "d16")
    assert eight.shape == sixteen.shape == (200, 28, 28, 1) and sixteen.dtype == np.uint8
    np.testing.assert_array_equal(sixteen, eight)
    np.testing.assert_array_equal(eight[..., 0], pixels)
    # The one reader: training (ImageFolderDataset, extract_features.py) reads the same pixels (as RGB).
    from fpdm.data import read_image
    rgb = np.asarray(read_image(tmp_path / "d16" / "0007.png"))
    np.testing.assert_array_equal(rgb, pixels[7][..., None].repeat(3, -1))
    model = random_mnist_classifier(28)
    results = [metrics.evaluate_mnist(metrics.load_images(tmp_path / name), classifier=model) for name in ("d8", "d16")]
    assert results[0] == results[1] and results[0]["num_samples"] == 200


# ------------------------------------------------------------------------------------------------------------------
# 2. invert.py: targets through the training transform; --class-label in range
# ------------------------------------------------------------------------------------------------------------------

def thirds(height=16, width=32):
    """A wide image: red left quarter, green middle half, blue right quarter (a squash keeps red and blue, a centre
    crop does not)."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, : width // 4, 0] = 255
    image[:, width // 4: 3 * width // 4, 1] = 255
    image[:, 3 * width // 4:, 2] = 255
    image[height // 2:, :, 2] |= 60  # not the same in every row
    return image


def test_invert_targets_are_centre_cropped_as_in_training(tmp_path):
    wide = thirds()
    (tmp_path / "targets").mkdir()
    Image.fromarray(wide).save(tmp_path / "targets" / "0.png")
    (tmp_path / "train" / "class").mkdir(parents=True)
    Image.fromarray(wide).save(tmp_path / "train" / "class" / "0.png")
    np.savez(tmp_path / "targets.npz", arr_0=wide[None])
    trained_on = ImageFolderDataset(str(tmp_path / "train"), image_size=8, random_flip=False)[0][0]
    assert trained_on[0].max() < 1 and trained_on[1].min() == 1  # the centre: green, no red
    for source in (tmp_path / "targets", tmp_path / "targets.npz"):
        target = invert.load_targets(source, 8, 3)
        assert target.shape == (1, 3, 8, 8)
        torch.testing.assert_close(target[0], trained_on, rtol=0, atol=0)
        gray = invert.load_targets(source, 8, 1)
        torch.testing.assert_close(gray[0], trained_on.mean(0, keepdim=True), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="square") as error:
        invert.load_targets(tmp_path / "targets", (8, 16), 3)
    assert "\n" not in str(error.value)


def tiny_checkpoint(path, num_classes=10, class_dropout_prob=0.1):
    from fpdm.checkpoints import TRAIN_FORMAT
    from models import DiT
    torch.manual_seed(0)
    net = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=4,
              num_classes=num_classes, class_dropout_prob=class_dropout_prob, learn_sigma=False).eval()
    config = {"noise_schedule": "linear", "learn_sigma": False, "predict_v": True, "zero_terminal_snr": False,
              "diffusion_steps": 1000}
    torch.save({"format": TRAIN_FORMAT, "ema": net.state_dict(), "model_config": net.config, "config": config}, path)
    return str(path)


def test_invert_class_label_out_of_range_is_one_line(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.fromarray(thirds(8, 8)).save(tmp_path / "images" / "0.png")
    # With classifier-free guidance the table has a null row at index 10: label 10 used to run silently on it.
    for ckpt, classes in ((tiny_checkpoint(tmp_path / "cfg.pt"), 10),
                          (tiny_checkpoint(tmp_path / "plain.pt", class_dropout_prob=0.0), 10),
                          (tiny_checkpoint(tmp_path / "uncond.pt", num_classes=1, class_dropout_prob=0.0), 1)):
        for label in (classes, classes + 1, -1):
            out = tmp_path / f"out-{os.path.basename(ckpt)}-{label}"
            argv = ["--ckpt", ckpt, "--images", str(tmp_path / "images"), "--out", str(out), "--steps", "1",
                    "--num-sampling-steps", "2", "--device", "cpu", f"--class-label={label}"]
            with pytest.raises(SystemExit) as exit_:
                cli.run_script(invert.main, lambda: invert.parse_args(argv))
            assert exit_.value.code == 1
            assert capsys.readouterr().err == f"error: --class-label must lie in [0, {classes - 1}] for this model\n"
            assert not out.exists()  # refused before the output folder is claimed
    report = invert.main(invert.parse_args(["--ckpt", str(tmp_path / "plain.pt"), "--images", str(tmp_path / "images"),
                                            "--out", str(tmp_path / "ok"), "--steps", "1", "--num-sampling-steps", "2",
                                            "--device", "cpu", "--class-label", "9", "--methods", "sequential"]))
    assert np.isfinite(report["methods"]["sequential"]["final_mse"])


# ------------------------------------------------------------------------------------------------------------------
# 3. evaluate.py fid / all: samples and reference of other sizes
# ------------------------------------------------------------------------------------------------------------------

class TinyFeatures(torch.nn.Module):
    """A stand-in for the Inception network with 4-d features (per image: mean, std, top-half and left-half mean),
    so that these tests run in seconds; `calls` counts the images that went through it."""

    weights, identity = "tiny", "tiny/features-v1"

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # a device for the metrics
        self.calls = 0

    def features(self, images, batch_size=50, progress=True):
        images = np.asarray(images, dtype=np.float64)
        self.calls += len(images)
        h, w = images.shape[1:3]
        return np.stack([images.mean((1, 2, 3)), images.std((1, 2, 3)), images[:, : h // 2].mean((1, 2, 3)),
                         images[:, :, : w // 2].mean((1, 2, 3))], axis=1)

    def all_features(self, images, batch_size=50, progress=True, desc=""):
        f = self.features(images)
        return {"pool3": f, "spatial": f[:, :3], "logits": f}


@pytest.fixture
def sized(tmp_path, monkeypatch):
    """32 and 64 px samples, and 64 px references as an ADM-style npz, a folder and a stats file of `evaluate.py
    stats`; evaluate.py's network is TinyFeatures."""
    model = TinyFeatures()
    monkeypatch.setattr(evaluate, "_inception", lambda args: model)
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in (("s32", 32), ("s64", 64), ("r64", 64)):
        paths[name] = str(tmp_path / f"{name}.npz")
        np.savez(paths[name], arr_0=rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8))
    paths["folder"] = str(tmp_path / "r64_images")
    os.mkdir(paths["folder"])
    for i, image in enumerate(metrics.load_images(paths["r64"])):
        Image.fromarray(image).save(os.path.join(paths["folder"], f"{i}.png"))
    paths["stats"] = str(tmp_path / "r64_stats.npz")
    evaluate.main(["stats", paths["folder"], "--out", paths["stats"], "--device", "cpu"])
    model.calls = 0
    return model, paths


def test_fid_refuses_samples_and_reference_of_other_sizes(sized, capsys):
    model, paths = sized
    with np.load(paths["stats"]) as data:  # stats files record the size of their images
        assert data["image_size"].tolist() == [64, 64]
    for command in ("fid", "all"):
        for ref in (paths["r64"], paths["folder"], paths["stats"]):
            with pytest.raises(SystemExit) as exit_:
                evaluate.main([command, paths["s32"], ref, "--device", "cpu"])
            message = str(exit_.value)
            assert "\n" not in message and message.startswith(f"error: samples are 32x32 px but the reference {ref}")
            assert "64x64 px" in message and "299" in message and "evaluate.py stats" in message
            assert model.calls == 0  # refused before any network pass
        capsys.readouterr()
        result = evaluate.main([command, paths["s64"], paths["stats"], "--device", "cpu"])
        assert np.isfinite(result["fid"]) and result["size_note"] is None and "note" not in capsys.readouterr().out
        model.calls = 0


def test_stats_file_without_a_size_gives_fid_with_a_note(sized, capsys):
    model, paths = sized
    with np.load(paths["stats"]) as data:  # an older stats file: the same arrays without image_size
        old = {name: data[name] for name in data.files if name != "image_size"}
    np.savez(paths["stats"], **old)
    np.savez(paths["r64"].replace("r64", "mu_sigma"), mu=old["mu"], sigma=old["sigma"])  # the oldest: mu and sigma
    for ref in (paths["stats"], paths["r64"].replace("r64", "mu_sigma")):
        for command in ("fid", "all"):
            capsys.readouterr()
            result = evaluate.main([command, paths["s32"], ref, "--device", "cpu"] +
                                   (["--kid-subsets", "2"] if command == "all" else []))
            assert np.isfinite(result["fid"])
            notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
            assert len(notes) == 1 and f"{ref} records no image size" in notes[0] and "32x32 px" in notes[0]


# ------------------------------------------------------------------------------------------------------------------
# 4. extract_features.py --output: a file, or a folder that cannot be written
# ------------------------------------------------------------------------------------------------------------------

from test_extract_resume import vae_dir  # noqa: E402,F401 (the one-level random AutoencoderKL on disk, a fixture)


def four_images(root):
    rng = np.random.default_rng(0)
    for i in range(4):
        os.makedirs(os.path.join(root, f"c{i % 2}"), exist_ok=True)
        image = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(image).save(os.path.join(root, f"c{i % 2}", f"{i}.png"))
    return str(root)


def test_extract_output_that_is_a_file_is_one_line(tmp_path, vae_dir):
    data = four_images(tmp_path / "images")
    (tmp_path / "latents.npz").write_bytes(b"not a folder")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "extract_features.py"), "--data-path", data, "--output",
                          str(tmp_path / "latents.npz"), "--vae", vae_dir, "--image-size", "8", "--device", "cpu",
                          "--num-workers", "0"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    expected = f"error: --output {tmp_path / 'latents.npz'} is a file: choose a folder"
    assert run.stderr.strip().splitlines()[-1] == expected
    assert (tmp_path / "latents.npz").read_bytes() == b"not a folder"


def test_extract_read_only_output_is_one_line(tmp_path, vae_dir, monkeypatch):
    """chmod 0o500 stops writes, except for root (as tests may run): there the folder's writes are refused by a stand-in
    for `open` and `os.mkdir` that fails as the kernel would (EACCES) for paths inside it."""
    data = four_images(tmp_path / "images")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:
        real_open, real_mkdir, inside = builtins.open, os.mkdir, str(locked) + os.sep

        def refused(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

        def locked_open(file, mode="r", *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and str(file).startswith(inside) and set(mode) & set("wax+"):
                refused(file)
            return real_open(file, mode, *args, **kwargs)

        def locked_mkdir(path, *args, **kwargs):
            if str(path).startswith(inside):
                refused(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", locked_open)
        monkeypatch.setattr(os, "mkdir", locked_mkdir)
    try:
        for output in (locked, locked / "sub"):
            with pytest.raises(ValueError) as error:
                extract_features.extract(data, str(output), vae_dir, image_size=8, device="cpu")
            assert str(error.value) == (f"--output {output} cannot be written (Permission denied): choose a folder "
                                        f"you can write to")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)
