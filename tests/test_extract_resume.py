"""extract_features.py after a kill: a rerun with the same setup keeps the finished shards and gives the dataset of an
uninterrupted run; another setup starts over; unreadable images are found by the process that encodes them."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import extract_features
from extract_features import extract
from fpdm.data import ImageFolderDataset, LatentDataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=8)
    path = str(tmp_path_factory.mktemp("vae"))
    vae.save_pretrained(path)
    return path


def image_folder(root, n=26, bad=None):
    """`n` noise images of 8..12 px in 2 classes (PNG and JPEG); `bad`: the name of an extra unreadable file."""
    rng = np.random.default_rng(0)
    for i in range(n):
        path = os.path.join(root, f"class{i % 2}", f"{i:02d}.{'png' if i % 3 else 'jpg'}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (8 + i % 5, 12, 3), dtype=np.uint8)).save(path)
    if bad:
        with open(os.path.join(root, "class1", bad), "w") as f:
            f.write("not an image")
    return str(root)


@pytest.fixture
def counted(monkeypatch):
    """Images encoded (not counting their flips) and shards written, through the real functions."""
    counts = {"images": 0, "shards": 0, "kill_after": None}
    encode, save = extract_features.vae_io.encode_moments, extract_features._save_shard

    def encode_moments(vae, x):
        counts["images"] += len(x) // 2  # flips on: the mirrored images ride in the same call
        return encode(vae, x)

    def save_shard(path, tensors):
        if counts["shards"] == counts["kill_after"]:
            raise Killed
        counts["shards"] += 1
        return save(path, tensors)
    monkeypatch.setattr(extract_features.vae_io, "encode_moments", encode_moments)
    monkeypatch.setattr(extract_features, "_save_shard", save_shard)
    return counts


def assert_same_dataset(a, b):
    a, b = LatentDataset(a), LatentDataset(b)
    assert a.meta == b.meta and torch.equal(a.labels, b.labels) and len(a) == len(b)
    for i in range(len(a)):
        assert torch.equal(a[i][0], b[i][0])


def test_killed_extraction_resumes_where_it_stopped(tmp_path, vae_dir, counted, capsys):
    root = image_folder(tmp_path / "images")
    settings = dict(image_size=8, batch_size=3, shard_size=5, flip=True, device="cpu")
    clean, out = str(tmp_path / "clean"), str(tmp_path / "out")
    extract(root, clean, vae_dir, **settings)
    assert counted["images"] == 26 and counted["shards"] == 6
    counted.update(images=0, shards=0, kill_after=3)
    with pytest.raises(Killed):
        extract(root, out, vae_dir, **settings)
    assert sorted(os.listdir(out)) == [".lock", "extraction.json"] + [f"shard-{k:05d}.safetensors" for k in range(3)]
    with open(os.path.join(out, "shard-00003.safetensors.tmp-99999"), "wb") as f:
        f.write(b"half a shard")  # what a kill during atomic_write leaves
    kept = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out) if name.startswith("shard")
            and name.endswith(".safetensors")}
    counted.update(images=0, shards=0, kill_after=None)
    meta = extract(root, out, vae_dir, **settings)
    assert "its finished shards are kept" in capsys.readouterr().out
    assert counted["images"] == 26 - 15 and counted["shards"] == 3  # 15 images in the 3 kept shards
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in kept} == kept
    assert meta["num_images"] == 26 and meta["skipped"] == [] and not any(".tmp-" in n for n in os.listdir(out))
    assert_same_dataset(out, clean)
    counted.update(images=0, shards=0)  # finished: a rerun encodes nothing
    extract(root, out, vae_dir, **{**settings, "batch_size": 4})  # the batch size is not part of the setup
    assert counted["images"] == 0 and counted["shards"] == 0
    assert_same_dataset(out, clean)


def test_another_setup_is_refused_and_overwrite_starts_over(tmp_path, vae_dir, counted, capsys):
    root = image_folder(tmp_path / "images")
    out = str(tmp_path / "out")
    counted["kill_after"] = 2
    with pytest.raises(Killed):
        extract(root, out, vae_dir, image_size=8, batch_size=4, shard_size=4, device="cpu")
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("mine")  # not an extraction file: never removed
    counted.update(images=0, shards=0, kill_after=None)
    with pytest.raises(FileExistsError, match=r"another image_size \(2 shards\): rerun with its settings to continue "
                                              r"it, or pass --overwrite"):
        extract(root, out, vae_dir, image_size=12, batch_size=4, shard_size=4, device="cpu")
    assert counted["images"] == 0 and len([n for n in os.listdir(out) if n.startswith("shard-")]) == 2
    meta = extract(root, out, vae_dir, image_size=12, batch_size=4, shard_size=4, device="cpu", overwrite=True)
    assert "the extraction there has another image_size: starting over" in capsys.readouterr().out
    assert counted["images"] == 26 and meta["latent_shape"] == [4, 12, 12]
    assert sorted(os.listdir(out)) == [".lock", "extraction.json", "meta.json", "notes.txt"] + [
        f"shard-{k:05d}.safetensors" for k in range(7)]
    with open(os.path.join(out, "extraction.json")) as f:
        assert json.load(f)["image_size"] == 12
    assert len(LatentDataset(out)) == 52
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, "class0", "new.png"))  # another image list
    counted["images"] = 0
    extract(root, out, vae_dir, image_size=12, batch_size=4, shard_size=4, device="cpu", overwrite=True)
    assert "another num_files, files_sha256: starting over" in capsys.readouterr().out
    assert counted["images"] == 27 and len(LatentDataset(out)) == 54


def test_an_extraction_of_per_process_shards_is_named_and_kept(tmp_path, vae_dir, counted):
    """An extraction killed under the older layout (per-process `shard-r…` files, the process count in its setup)
    cannot be continued: refused in one line that says so, its shards kept; --overwrite starts over."""
    root, out = image_folder(tmp_path / "images"), tmp_path / "out"
    out.mkdir()
    (out / "extraction.json").write_text(json.dumps({"format": "fpdm-latents-v1", "num_processes": 8}))
    (out / "shard-r000-00000.safetensors").write_bytes(b"encoded")
    with pytest.raises(FileExistsError, match=r"per-process shards \(an older extract_features.py\) \(1 shards\): "
                                              r"finish it with that version, or pass --overwrite") as error:
        extract(root, str(out), vae_dir, image_size=8, device="cpu")
    assert "\n" not in str(error.value) and counted["images"] == 0
    assert (out / "shard-r000-00000.safetensors").read_bytes() == b"encoded"
    meta = extract(root, str(out), vae_dir, image_size=8, shard_size=13, device="cpu", overwrite=True)
    assert [s["file"] for s in meta["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (out / "shard-r000-00000.safetensors").exists()


def test_bad_image_stops_with_its_path_and_skip_goes_on(tmp_path, vae_dir, counted):
    root = image_folder(tmp_path / "images", bad="13_broken.png")  # between class1/13.png and class1/15.png
    out, clean = str(tmp_path / "out"), str(tmp_path / "clean")
    settings = dict(image_size=8, batch_size=2, shard_size=4, device="cpu")
    with pytest.raises(ValueError, match=r"13_broken\.png cannot be read \(.*\): fix or remove it and rerun .* "
                                         r"or rerun with --skip-bad-images") as error:
        extract(root, out, vae_dir, **settings)
    assert "\n" not in str(error.value)
    position = ImageFolderDataset(root, 8, scan=False).files.index(os.path.join(root, "class1", "13_broken.png"))
    assert position == 20 and counted["shards"] == 5  # images 0..19 encoded, in shards of 4
    counted.update(images=0, shards=0)
    meta = extract(root, out, vae_dir, skip_bad_images=True, **settings)  # keeps the 5 shards: they skipped nothing
    assert counted["images"] == 26 - 20 and counted["shards"] == 2
    assert meta["num_images"] == 26 and meta["skipped_files"] == 1 and meta["skipped"] == ["class1/13_broken.png"]
    ds = LatentDataset(out)
    assert torch.equal(ds.labels, ImageFolderDataset(root, 8, skip_bad_images=True).labels)
    extract(root, clean, vae_dir, skip_bad_images=True, **settings)
    assert_same_dataset(out, clean)
    counted["images"] = 0  # without --skip-bad-images again: its shards skipped a file, so they are not continued,
    with pytest.raises(FileExistsError, match="rerun with --skip-bad-images to continue it, or pass --overwrite"):
        extract(root, out, vae_dir, **settings)  # nor removed unasked (hours of encoding at ImageNet scale)
    assert counted["images"] == 0 and len(LatentDataset(out)) == 2 * 26
    with pytest.raises(ValueError, match="13_broken.png cannot be read"):
        extract(root, out, vae_dir, overwrite=True, **settings)
    assert counted["images"] == 20


def run_two_processes(root, out, vae_dir, *flags):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(ROOT, "extract_features.py"), "--data-path", root, "--output", out, "--vae", vae_dir,
           "--image-size", "8", "--batch-size", "2", "--shard-size", "3", "--num-workers", "1", "--device", "cpu",
           *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_two_processes_skip_bad_images_and_resume_on_another_count(tmp_path, vae_dir):
    """2 CPU processes (gloo), each checking its own images, continue an extraction killed on one process and give
    its dataset; one killed on two processes continues on one."""
    root = image_folder(tmp_path / "images", n=14, bad="05_broken.png")
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    settings = dict(image_size=8, batch_size=2, shard_size=3, device="cpu", skip_bad_images=True)
    extract(root, one, vae_dir, **settings)
    shards = sorted(n for n in os.listdir(one) if n.startswith("shard"))
    assert shards == [f"shard-{k:05d}.safetensors" for k in range(5)]  # 15 files in blocks of 3, one unreadable
    shutil.copytree(one, two)
    for name in ("meta.json", shards[1], shards[3], shards[4]):  # killed with shards 0 and 2 written
        os.remove(os.path.join(two, name))
    kept = {n: os.stat(os.path.join(two, n)).st_mtime_ns for n in (shards[0], shards[2])}
    printed = run_two_processes(root, two, vae_dir, "--skip-bad-images")  # shards 1 and 4 on process 0, 3 on 1
    assert "its finished shards are kept" in printed and "1 unreadable files skipped" in printed
    assert {n: os.stat(os.path.join(two, n)).st_mtime_ns for n in kept} == kept
    a, b = LatentDataset(one), LatentDataset(two)
    assert a.meta == b.meta and a.meta["skipped"] == ["class1/05_broken.png"] and torch.equal(a.labels, b.labels)
    for i in range(len(a)):  # other batch compositions may move a float16 value by one unit in the last place
        assert torch.allclose(a[i][0], b[i][0], atol=2e-3, rtol=2e-3)
    os.remove(os.path.join(two, "meta.json"))  # killed on 2 processes, continued on 1
    os.remove(os.path.join(two, shards[3]))
    assert extract(root, two, vae_dir, **settings) == a.meta
    assert torch.allclose(LatentDataset(two)[len(a) - 1][0], a[len(a) - 1][0], atol=2e-3, rtol=2e-3)


def test_processes_that_see_different_image_folders_are_refused(tmp_path):
    """A node whose copy of the image folder differs (a stale node-local copy) would encode other images under the
    same shard indices: every process compares the file lists before any shard and all refuse alike, naming each
    process's count."""
    same, other = image_folder(tmp_path / "a", n=6), image_folder(tmp_path / "b", n=5)
    datasets = [ImageFolderDataset(str(root), 16, scan=False) for root in (same, same, other)]
    sent = []  # what process 0 contributes to the gather (a one-process gather returns it alone)
    extract_features.check_same_files(datasets[0], lambda item: sent.extend(item) or item)
    # process 1, gathering process 0's item and its own (accelerate's gather_object)
    extract_features.check_same_files(datasets[1], lambda item: sent + item)  # the same folder: fine
    with pytest.raises(ValueError, match=r"the processes see different image folders .*process 0: 6 files .*"
                                         r"process 1: 5 files .*give every node the same copy"):
        extract_features.check_same_files(datasets[2], lambda item: sent + item)
