"""The README's ImageNet-256 recipe, command by command, at toy size: the lines between <!-- imagenet-recipe -->
markers are parsed and run as written, with the paths swapped for local ones (JPEGs of two classes, a small random
AutoencoderKL saved to disk, random Inception weights and a reference made by `evaluate.py stats`), 8 GPUs swapped
for 2 CPU processes (the bf16 launch config keeps its bf16) and toy sizes appended to each command. Between steps 3
and 4 the training is killed after its first checkpoint."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

TOY = {  # appended to each script's command (argparse: the last value of a flag wins)
    "extract_features.py": ["--image-size", "16", "--batch-size", "4", "--shard-size", "8", "--num-workers", "0"],
    "train.py": ["--image-size", "16", "--hidden-size", "32", "--depth", "4", "--num-heads", "2",
                 "--global-batch-size", "4", "--max-steps", "6", "--ckpt-every", "2", "--log-every", "1",
                 "--eval-every", "2", "--eval-samples", "4", "--eval-steps", "2", "--num-sample-images", "4",
                 "--sample-steps", "2", "--num-workers", "0", "--tracker", "none", "--fp-diagnostics-every", "3"],
    "sample_ddp.py": ["--num-fid-samples", "8", "--batch-size", "2", "--num-sampling-steps", "4"],
    "evaluate.py": ["--batch-size", "4", "--device", "cpu", "--kid-subsets", "2", "--kid-subset-size", "4"],
}


def recipe():
    """The README's recipe: a list of commands (argv lists), in order."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = text.split("<!-- imagenet-recipe -->")[1].split("<!-- /imagenet-recipe -->")[0]
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.lstrip().startswith(("#",
                                                                                                              "```"))]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What a researcher downloads, at toy size: images, the VAE, Inception weights, ADM's reference batch."""
    from diffusers import AutoencoderKL

    import evaluate
    from fpdm.metrics import InceptionFeatures
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for i in range(24):  # two classes of smooth random colour fields, as JPEGs of odd sizes (centre-cropped to 16)
        path = root / "imagenet" / "train" / f"n0{i % 2}" / f"{i}.JPEG"
        path.parent.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8) // (1 + i % 2)
        Image.fromarray(small).resize((20 + i % 3, 18), Image.BICUBIC).save(path, quality=90)
    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=16).save_pretrained(root / "sd-vae-ft-ema")
    net = InceptionFeatures(random_init=True).net.state_dict()
    torch.save({**net, "fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}, root / "inception.pth")
    (root / "val").mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "val" / f"{i}.png")
    evaluate.main(["stats", str(root / "val"), "--out", str(root / "VIRTUAL_imagenet256_labeled"), "--inception",
                   str(root / "inception.pth"), "--batch-size", "4", "--device", "cpu"])
    return root


def cpu_config(tmp_path, source, port):
    """A launch config for 2 CPU processes on this host: `source` (an aconfs/ file) with its precision kept."""
    conf = yaml.safe_load(open(os.path.join(ROOT, source))) if source else {
        "compute_environment": "LOCAL_MACHINE", "distributed_type": "MULTI_GPU", "num_machines": 1, "machine_rank": 0,
        "rdzv_backend": "static", "same_network": True, "mixed_precision": "no", "dynamo_config": {}}
    conf.pop("gpu_ids", None)
    conf.update(use_cpu=True, num_processes=2, main_process_port=port)
    path = tmp_path / f"cpu2-{port}.yaml"
    path.write_text(yaml.safe_dump(conf))
    return str(path)


def toy(argv, world, tmp_path):
    """The README's command as run here: local paths, 2 CPU processes, toy sizes."""
    from test_train import free_port
    paths = {"/data/imagenet/train": world / "imagenet" / "train", "/models/sd-vae-ft-ema": world / "sd-vae-ft-ema",
             "/models/pt_inception-2015-12-05-6726825d.pth": world / "inception.pth",
             "VIRTUAL_imagenet256_labeled.npz": world / "VIRTUAL_imagenet256_labeled.npz"}
    out = []
    for i, arg in enumerate(argv):
        if arg == "accelerate":
            out.append(os.path.join(BIN, "accelerate"))
        elif arg == "python":
            out.append(sys.executable)
        elif argv[i - 1] == "--num_processes":  # 8 GPUs -> a 2-process CPU config
            out[-1:] = ["--config_file", cpu_config(tmp_path, None, free_port())]
        elif argv[i - 1] == "--config_file":
            out.append(cpu_config(tmp_path, arg, free_port()))
        elif arg.endswith(".py"):
            out.append(os.path.join(ROOT, arg))
        elif arg in paths:
            out.append(str(paths[arg]))
        elif arg.startswith(("latents/", "results/", "samples/")):
            out.append(str(tmp_path / arg))
        else:
            out.append(arg)
    script = next(os.path.basename(a) for a in argv if a.endswith(".py"))
    extra = list(TOY[script])
    if script == "train.py":
        extra += ["--results-dir", str(tmp_path / "results")]
    if script == "evaluate.py" and argv[argv.index("evaluate.py") + 1] != "all":
        extra = extra[:4]
    return out + extra


def run(cmd, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def test_the_readme_imagenet_recipe_at_toy_size(world, tmp_path):
    steps = recipe()
    scripts = [next(os.path.basename(a) for a in argv if a.endswith(".py")) for argv in steps]
    assert scripts == ["extract_features.py", "train.py", "train.py", "sample_ddp.py", "evaluate.py"], scripts
    assert steps[2][-2:] == ["--resume", "auto"] and steps[1] == steps[2][:-2]
    extract, train, resume, sample, score = (toy(argv, world, tmp_path) for argv in steps)

    # 1. Latents, by 2 processes.
    proc = run(extract)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "latents" / "in256" / "meta.json").read_text())
    assert meta["num_images"] == 24 and meta["latent_shape"] == [4, 8, 8] and meta["flip"]

    # 3. Training under the bf16 launch config, killed after its step-2 checkpoint (whatever it is doing then) ...
    run_dir = tmp_path / "results" / "fpdm-xl2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(train, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step_0000002.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    stderr = proc.communicate()[1]
    assert (run_dir / "checkpoints" / "step_0000002.pt").exists(), stderr[-3000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["mixed_precision_used"] == "bf16" and config["processes"] == 2
    assert config["train"]["model"] == "DiT-XL/2" and config["train"]["fixed_point"]  # the preset, shrunk by flags
    killed_at = json.loads((run_dir / "latest.json").read_text())["step"]
    # 4. ... and resumed by the README's next command.
    proc = run(resume)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(run_dir / "metrics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    log = (run_dir / "log.txt").read_text()
    assert "resumed from" in log and "2 process(es) on cpu" in log and "mixed precision bf16" in log
    assert killed_at < 6
    with open(run_dir / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["metric"]) for r in rows] == [("2", "fid"), ("4", "fid"), ("6", "fid")]
    assert all(np.isfinite(float(r["value"])) for r in rows)
    grid = np.asarray(Image.open(run_dir / "samples" / "step_0000006.png"))
    assert grid.ndim == 3 and grid.shape[2] == 3 and grid.shape[0] >= 16 * 2  # decoded 16 px images, 2 rows
    with open(run_dir / "fp_diagnostics.csv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)][-2:] == [3, 6]

    # 5. 50k samples (8 here) from the final checkpoint, 2 processes, bf16.
    sample[sample.index("--ckpt") + 1] = str(run_dir / "checkpoints" / "step_0000006.pt")
    proc = run(sample)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "samples" / "fpdm-xl2"
    with np.load(out / "samples.npz") as npz:
        assert npz["arr_0"].shape == (8, 16, 16, 3) and npz["arr_0"].dtype == np.uint8
    assert json.loads((out / "args.json").read_text())["resolved"]["precision"] == "bf16"

    # 6. The scores.
    proc = run(score)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FID" in proc.stdout and "sFID" in proc.stdout
