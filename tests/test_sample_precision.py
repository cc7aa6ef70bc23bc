"""Sampling precision (--precision bf16, --tf32) and sample_ddp.py's PNG writing: bf16 samples close to fp32 ones
but their own folder, FPDM's fixed-point state kept float32 under autocast, and PNGs written off the sampling thread
that equal the batch files, with a writer's failure surfacing."""

import json
import os

import numpy as np
from PIL import Image
import pytest
import torch

import sample as sample_cli
import sample_ddp
from fpdm import cli
from test_sampling import TRAIN_CONFIG, save_checkpoint, tiny_fpdm


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tiny_fpdm(class_dropout_prob=0.1), tmp_path_factory.mktemp("ckpt") / "step_0000010.pt",
                           TRAIN_CONFIG)


def sample_with_flags(checkpoint, *flags):
    """(samples, GuidedModel) of 4 images through the flags' own path (cli.Setup.sample), on the CPU."""
    args = sample_cli.parse_args(["--ckpt", checkpoint, "--num-sampling-steps", "6", "--cfg-scale", "2",
                                  "--device", "cpu", *flags])
    setup = cli.Setup(args, torch.device("cpu"))
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return setup.sample(args, noise, torch.tensor([1, 2, 3, 4]))


@pytest.mark.parametrize("flags", [["--iterations", "3"], ["--iterations", "3", "--sampler", "ddpm"],
                                   ["--iterations", "3", "--parallel", "anderson"], ["--parallel", "two-axis"]],
                         ids=["ddim", "ddpm", "parallel", "two-axis"])
def test_bf16_samples_are_close_to_fp32_but_not_identical(checkpoint, flags):
    """The network calls of every sampler kind run in bf16; the samples (and the math between calls) are float32."""
    torch.manual_seed(0)
    full, _ = sample_with_flags(checkpoint, *flags)
    torch.manual_seed(0)
    half, fn = sample_with_flags(checkpoint, *flags, "--precision", "bf16")
    assert full.dtype == half.dtype == torch.float32 and fn.precision == "bf16"
    difference = (half - full).abs().max().item()
    assert 0 < difference < 0.1, difference


@pytest.mark.parametrize("solver", ["iterate", "anderson"])
def test_fpdm_reuse_state_stays_float32_under_bf16(checkpoint, solver):
    """The layer runs in bf16 (fc2's output), its state and the stored solution stay float32, with guidance on and,
    outside the guidance interval, on the conditional half alone."""
    args = sample_cli.parse_args(["--ckpt", checkpoint, "--num-sampling-steps", "6", "--iterations", "3", "--reuse",
                                  "--cfg-scale", "2", "--guidance-interval", "300", "700", "--fp-solver", solver,
                                  "--precision", "bf16", "--device", "cpu"])
    setup = cli.Setup(args, torch.device("cpu"))
    seen = {"projection": set(), "state": set()}
    model = setup.model
    model.block_fixed_point_projection_fc2.register_forward_hook(
        lambda module, inputs, out: seen["projection"].add(out.dtype))
    model.block_fixed_point.register_forward_hook(lambda module, inputs, out: seen["state"].add(out.dtype))
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    samples, fn = setup.sample(args, noise, torch.tensor([1, 2, 3]))
    assert seen == {"projection": {torch.bfloat16}, "state": {torch.float32}}
    assert fn.cache.solution.dtype == torch.float32 and samples.dtype == torch.float32
    assert 1 in fn.passes and 2 in fn.passes  # both the guided and the conditional-only calls ran


def test_precision_is_recorded_and_names_another_folder(checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["--ckpt", checkpoint, "--num-sampling-steps", "3", "--num-samples", "2", "--iterations", "2",
            "--device", "cpu"]

    def run(*flags):
        return sample_cli.main(sample_cli.parse_args(base + list(flags)))
    default, report = run()
    assert json.load(open(os.path.join(default, "args.json")))["resolved"]["precision"] == "fp32"
    assert json.load(open(os.path.join(default, "compute.json")))["precision"] == report["precision"] == "fp32"
    # CPU runs ignore --tf32: folders made before the flag existed keep their identity (and name).
    assert run("--tf32")[0] == run("--no-tf32")[0] == default
    bf16, report = run("--precision", "bf16")
    assert bf16 != default and report["settings"]["resolved"]["precision"] == "bf16"
    named = str(tmp_path / "named")
    run("--out", named)
    with pytest.raises(FileExistsError, match=r"precision 'fp32' -> 'bf16'.*--overwrite"):
        run("--out", named, "--precision", "bf16")


def test_effective_precision_on_cuda_records_tf32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # resolve_device accepts "cuda"; nothing runs
    parse = lambda *flags: sample_cli.parse_args(["--ckpt", "x", "--device", "cuda", *flags])  # noqa: E731
    assert [cli.effective_precision(parse(*flags)) for flags in
            ([], ["--no-tf32"], ["--precision", "bf16"], ["--precision", "bf16", "--no-tf32"])] == \
        ["tf32", "fp32", "bf16+tf32", "bf16"]
    assert cli.effective_precision(sample_cli.parse_args(["--ckpt", "x", "--device", "cpu"])) == "fp32"


# ----------------------------------------------------------------------------------------------------------------
# sample_ddp.py: PNGs off the sampling thread
# ----------------------------------------------------------------------------------------------------------------

def ddp_args(checkpoint, out, *extra):
    return sample_ddp.parse_args(["--ckpt", checkpoint, "--num-fid-samples", "7", "--batch-size", "3",
                                  "--num-sampling-steps", "3", "--iterations", "2", "--out", str(out), *extra])


def test_sample_ddp_pngs_equal_the_batches_and_bf16_is_recorded(checkpoint, tmp_path):
    out = sample_ddp.main(ddp_args(checkpoint, tmp_path / "s", "--precision", "bf16"))
    saved = np.load(os.path.join(out, "samples.npz"))["arr_0"]
    names = sorted(os.listdir(os.path.join(out, "images")))
    assert names == [f"{i:06d}.png" for i in range(7)]  # no temporaries left
    assert all(np.array_equal(np.asarray(Image.open(os.path.join(out, "images", n))), saved[i])
               for i, n in enumerate(names))
    batches = [np.load(os.path.join(out, "batches", f"{b:06d}.npz"))["images"] for b in range(3)]
    assert np.array_equal(np.concatenate(batches), saved)
    assert json.load(open(os.path.join(out, "args.json")))["resolved"]["precision"] == "bf16"
    assert json.load(open(os.path.join(out, "compute.json")))["precision"] == "bf16"
    full = np.load(os.path.join(sample_ddp.main(ddp_args(checkpoint, tmp_path / "f")), "samples.npz"))["arr_0"]
    assert np.abs(full.astype(int) - saved).max() <= 16


def test_sample_ddp_no_png_then_png_writes_the_missing_ones(checkpoint, tmp_path):
    out = sample_ddp.main(ddp_args(checkpoint, tmp_path / "s", "--no-png"))
    assert os.listdir(os.path.join(out, "images")) == []
    sample_ddp.main(ddp_args(checkpoint, tmp_path / "s"))  # --png names the same folder: the final pass writes them
    saved = np.load(os.path.join(out, "samples.npz"))["arr_0"]
    assert np.array_equal(np.stack([np.asarray(Image.open(os.path.join(out, "images", f"{i:06d}.png")))
                                    for i in range(7)]), saved)


def test_png_writer_failure_surfaces_before_the_next_commit(checkpoint, tmp_path, monkeypatch):
    def failing(path, array):
        raise OSError("disk full")
    monkeypatch.setattr(sample_ddp, "write_png", failing)
    with pytest.raises(OSError, match="disk full"):
        sample_ddp.main(ddp_args(checkpoint, tmp_path / "s"))
    assert os.listdir(tmp_path / "s" / "batches") == ["000000.npz"]  # raised as batch 1 was about to be committed
    monkeypatch.undo()
    # One PNG alone: written under a temporary name then renamed, never fsynced.
    monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("a PNG was fsynced"))
    array = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    sample_ddp.write_png(str(tmp_path / "one.png"), array)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one.png")), array)
    assert sorted(os.listdir(tmp_path)) == ["one.png", "s"]


class WeightCasts:
    """A TorchDispatchMode counting the casts (aten._to_copy) whose input is one of `params`' storages."""

    def __new__(cls, params):
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.pointers, self.count = {p.data_ptr() for p in params}, 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers:
                    self.count += 1
                return func(*args, **(kwargs or {}))
        return Mode()


@pytest.mark.parametrize("flags", [["--iterations", "3"], ["--iterations", "3", "--parallel", "anderson"],
                                   ["--parallel", "two-axis"]], ids=["ddim", "parallel", "two-axis"])
def test_bf16_weights_cast_once_give_autocasts_samples_bit_for_bit(checkpoint, flags, monkeypatch):
    """--precision bf16 casts the linear and convolution weights to bf16 once (cli.Setup, DiT.cast_matmul_weights):
    the samples equal, bit for bit, those of autocast casting the float32 weights at every call, and the calls make
    no weight casts (counted: aten._to_copy of a parameter; every call cast each weight before)."""
    from models import DiT

    def run():
        args = sample_cli.parse_args(["--ckpt", checkpoint, "--num-sampling-steps", "6", "--cfg-scale", "2",
                                      "--device", "cpu", *flags, "--precision", "bf16"])
        setup = cli.Setup(args, torch.device("cpu"))
        noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        torch.manual_seed(0)
        with WeightCasts(list(setup.model.parameters())) as casts:
            samples, fn = setup.sample(args, noise, torch.tensor([1, 2, 3, 4]))
        return samples, fn, casts.count
    cast, fn, cast_count = run()
    weights = [n for n, p in fn.model.named_parameters() if p.dtype == torch.bfloat16]
    assert weights and {n.split(".")[-1] for n in weights} == {"weight", "bias"} and cast_count == 0
    assert fn.model.y_embedder.embedding_table.weight.dtype == torch.float32
    monkeypatch.setattr(DiT, "cast_matmul_weights", lambda self, dtype: self)  # autocast casts them at each call
    autocast, fn32, count = run()
    assert {p.dtype for p in fn32.model.parameters()} == {torch.float32} and count == fn32.calls * len(weights)
    assert torch.equal(cast, autocast)


def test_parallel_calls_hold_at_most_the_default_rows(checkpoint, monkeypatch):
    """Without --parallel-chunk-size a parallel sampler's network call holds at most cli.PARALLEL_ROWS_PER_CALL rows:
    4 guided images are 8 rows per timestep, so a bound of 16 makes 2 timesteps per call (3 calls per iteration over
    6 steps), with the samples and calls of --parallel-chunk-size 2; with the real bound, one call per iteration."""
    flags = ["--iterations", "3", "--parallel", "anderson", "--parallel-tol", "1e-6"]
    whole, fn = sample_with_flags(checkpoint, *flags)
    assert fn.calls == fn.info["parallel_iterations"] and cli.parallel_chunk_size(4, True) == 128
    monkeypatch.setattr(cli, "PARALLEL_ROWS_PER_CALL", 16)
    bounded, fn = sample_with_flags(checkpoint, *flags)
    assert fn.calls == 3 * fn.info["parallel_iterations"]
    explicit, fn_explicit = sample_with_flags(checkpoint, *flags, "--parallel-chunk-size", "2")
    assert torch.equal(bounded, explicit) and fn_explicit.calls == fn.calls
    assert (bounded - whole).abs().max() < 1e-5
