"""fpdm/checkpoints.py and export.py: format detection for all six formats, EMA choice, the weights_only allow-list
and a refused malicious pickle, diffusers and safetensors round trips (outputs vs diffusers measured), clear errors,
DiT-XL/2 inference on the meta device, and init_fpdm_from_dit."""

import argparse
import os
import shlex

import pytest
import torch

from fpdm import sample_config
import torch.nn.functional as F

from export import main as export_main
from export import to_safetensors
from fpdm.checkpoints import TRAIN_FORMAT, detect_format, infer_config, init_fpdm_from_dit, load_model
from fpdm.diffusers_dit import to_diffusers, use_dit_timestep_frequencies
from models import DiT_models
from conftest import random_model

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4, num_heads=4, num_classes=10)
TINY_FPDM = dict(TINY, fixed_point=True, fixed_point_pre_depth=1, fixed_point_post_depth=2)


def tiny(seed=1, scale=0.2, **kwargs):
    """A tiny model with every parameter random (conftest.random_model)."""
    return random_model({**TINY, **kwargs}, seed, scale)


def inputs(batch=4, seed=2, num_classes=10):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, num_classes, (batch,), generator=g)
    y[-1] = num_classes  # the null class, as classifier-free guidance uses it
    return x, t, y


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def train_checkpoint(model, ema):
    return {"format": TRAIN_FORMAT, "step": 7, "model": model.state_dict(), "ema": ema.state_dict(), "opt": {},
            "sched": {}, "config": {"model": "DiT-S/2", "lr": 1e-4}, "model_config": model.config, "rng": {},
            "world_size": 1}


# ----------------------------------------------------------------------------------------------------------------
# Format detection, EMA, allow-list
# ----------------------------------------------------------------------------------------------------------------

def write_format(name, tmp_path, model):
    """Write `model` (its weights as the ones to be loaded) in format `name`; returns the path."""
    path = tmp_path / f"{name}.pt"
    if name in (TRAIN_FORMAT, "dit-train", "fpdm-release"):  # the raw weights differ from the EMA ones
        other = tiny(seed=9, **{k: v for k, v in model.config.items() if k in TINY_FPDM})
    if name == TRAIN_FORMAT:
        torch.save(train_checkpoint(other, model), path)
    elif name == "dit-state-dict":
        torch.save(model.state_dict(), path)
    elif name in ("dit-train", "fpdm-release"):
        args = argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10, global_seed=0)
        torch.save({"model": other.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args}, path)
    elif name == "diffusers":
        path = to_diffusers(model, tmp_path / "diffusers")
    elif name == "safetensors":
        path = to_safetensors(model, tmp_path / "safetensors")
    return path


@pytest.mark.parametrize("name", [TRAIN_FORMAT, "dit-state-dict", "dit-train", "fpdm-release", "diffusers",
                                  "safetensors"])
def test_each_format_is_detected_and_loads_the_same_weights(name, tmp_path):
    kwargs = {}
    if name in ("dit-state-dict", "dit-train"):  # inferred: num_heads from the registry entry of width 384 (DiT-S)
        kwargs = dict(hidden_size=384, num_heads=6, depth=2)
    elif name == "fpdm-release":  # and depth (the default iteration count) from the args' model name, DiT-S/2
        kwargs = dict(TINY_FPDM, hidden_size=384, num_heads=6, depth=12)
    model = tiny(**kwargs)
    path = write_format(name, tmp_path, model)
    trust = name in ("dit-train", "fpdm-release")
    assert detect_format(path, trust_checkpoint=trust) == name
    loaded, info = load_model(path, trust_checkpoint=trust)
    assert info["format"] == name
    assert not loaded.training
    assert_same_weights(loaded, model)
    x, t, y = inputs()
    kwargs = {"num_iterations": 2} if model.fixed_point else {}  # the inferred depth (12) sets the default count
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y, **kwargs), model(x, t, y, **kwargs))
    if name in (TRAIN_FORMAT, "dit-train", "fpdm-release"):
        assert info["weights"] == "ema"


def test_inferred_architecture_and_sources(tmp_path):
    model = tiny(hidden_size=384, num_heads=6, depth=3, input_size=16, patch_size=4, learn_sigma=False, num_classes=5)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "ddp.pt")  # DDP prefixes too
    loaded, info = load_model(tmp_path / "ddp.pt")
    cfg = loaded.config
    assert (cfg["hidden_size"], cfg["depth"], cfg["patch_size"], cfg["num_heads"], cfg["input_size"]) == \
        (384, 3, 4, 6, 16)
    assert (cfg["num_classes"], cfg["learn_sigma"], cfg["class_dropout_prob"]) == (5, False, 0.1)
    assert info["sources"]["depth"] == "weights" and info["sources"]["num_heads"].startswith("registry DiT-S")


def test_ema_is_default_and_model_on_request(tmp_path):
    model, ema = tiny(seed=1), tiny(seed=2)
    torch.save(train_checkpoint(model, ema), tmp_path / "ckpt.pt")
    loaded, info = load_model(tmp_path / "ckpt.pt")
    assert info["weights"] == "ema" and info["step"] == 7 and info["training_config"]["lr"] == 1e-4
    assert_same_weights(loaded, ema)
    loaded, info = load_model(tmp_path / "ckpt.pt", use_ema=False)
    assert info["weights"] == "model"
    assert_same_weights(loaded, model)


def test_pickled_namespace_needs_opt_in(tmp_path):
    model = tiny(hidden_size=384, num_heads=6)
    args = argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args}, tmp_path / "d.pt")
    with pytest.raises(ValueError, match=r"argparse\.Namespace.*--trust-checkpoint"):
        load_model(tmp_path / "d.pt")
    loaded, info = load_model(tmp_path / "d.pt", trust_checkpoint=True)
    assert info["format"] == "dit-train" and info["training_config"] == vars(args)
    assert loaded.config["depth"] == 4 and info["sources"]["depth"] == "weights"


class Malicious:
    """Unpickling this runs a shell command (here: creating a file)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_malicious_pickle_is_refused_even_when_trusted(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": tiny().state_dict(), "args": Malicious(marker)}, path)
    for trust in (False, True):
        with pytest.raises(ValueError, match=r"refusing to load .*posix\.system"):
            load_model(path, trust_checkpoint=trust)
        assert not marker.exists()
    torch.load(path, weights_only=False)  # control: the payload is live when unpickled blindly
    assert marker.exists()


def test_fpdm_release_settings_read_from_args_or_defaulted(tmp_path):
    model = tiny(**dict(TINY_FPDM, hidden_size=384, num_heads=6, depth=12))
    release_args = {"model": "DiT-S/2", "fixed_point": True, "fixed_point_pre_depth": 1, "fixed_point_post_depth": 2,
                    "fixed_point_pre_post_timestep_conditioning": True, "fixed_point_no_grad_max_iters": 10}
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": release_args,
                "train_steps": 5}, tmp_path / "release.pt")  # the release saves args.as_dict(): plain data
    loaded, info = load_model(tmp_path / "release.pt")
    assert info["format"] == "fpdm-release" and info["step"] == 5 and loaded.default_num_iterations == 9
    assert loaded.config["fixed_point_pre_post_timestep_conditioning"] is True
    assert info["sources"]["fixed_point_pre_post_timestep_conditioning"] == "args"
    assert info["sources"]["fixed_point_pre_depth"] == "args" and info["sources"]["num_heads"] == "registry DiT-S/2"
    torch.save({"model": model.state_dict(), "ema": model.state_dict()}, tmp_path / "no_args.pt")
    loaded, info = load_model(tmp_path / "no_args.pt", depth=28)
    assert loaded.config["fixed_point_pre_post_timestep_conditioning"] is False
    assert info["sources"]["fixed_point_pre_post_timestep_conditioning"].startswith("default")
    assert info["sources"]["fixed_point_post_depth"] == "weights" and loaded.default_num_iterations == 25


def test_fpdm_release_diffusion_args_are_read_under_their_names(tmp_path):
    """The release's train.py names zero-terminal SNR `use_zero_terminal_snr`: read as ours (it was dropped, and the
    model sampled with the wrong schedule); its flow-matching and DINO-conditioned models are refused in one line."""
    from fpdm.checkpoints import diffusion_settings
    model = tiny(**dict(TINY_FPDM, hidden_size=384, num_heads=6, depth=12))
    release_args = {"model": "DiT-S/2", "fixed_point": True, "predict_v": True, "use_zero_terminal_snr": True,
                    "flow": False, "dino_supervised": False}
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": release_args}, tmp_path / "zsnr.pt")
    _, info = load_model(tmp_path / "zsnr.pt")
    assert diffusion_settings(info["training_config"]) == {"predict_v": True, "zero_terminal_snr": True}
    for key, message in (("flow", "flow-matching model"), ("dino_supervised", "DINO features")):
        torch.save({"model": model.state_dict(), "args": {**release_args, key: True}}, tmp_path / f"{key}.pt")
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path / f"{key}.pt")


# ----------------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("class_dropout_prob", [0.1, 0.0])
def test_diffusers_round_trip(class_dropout_prob, tmp_path):
    from diffusers import DiTTransformer2DModel
    from safetensors.torch import load_file
    ours = tiny(class_dropout_prob=class_dropout_prob)
    to_diffusers(ours, tmp_path)
    theirs = DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    written = load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert {k: tuple(v.shape) for k, v in written.items()} == \
        {k: tuple(v.shape) for k, v in theirs.state_dict().items()}  # exactly diffusers' names and shapes
    x, t, y = inputs()
    if class_dropout_prob == 0:
        y = y.clamp(max=9)  # no null class
    with torch.no_grad():
        expected = ours(x, t, y)
        as_is = theirs(x, timestep=t, class_labels=y).sample
        use_dit_timestep_frequencies(theirs)  # DiT's timestep frequencies i/128 instead of diffusers' i/127
        matched = theirs(x, timestep=t, class_labels=y).sample
    exact, shifted = (matched - expected).abs().max().item(), (as_is - expected).abs().max().item()
    print(f"\nours vs diffusers, max |diff| (output scale {expected.abs().max():.2f}): {exact:.2e} with DiT's "
          f"timestep frequencies, {shifted:.2e} with diffusers' own")
    assert exact <= 1e-5
    assert shifted > 1e-4  # the known frequency difference is real, and the only one
    back, info = load_model(tmp_path)
    assert info["format"] == "diffusers" and back.config == ours.config
    assert_same_weights(back, ours)


def test_diffusers_folder_without_our_config(tmp_path):
    import json
    ours = tiny()
    to_diffusers(ours, tmp_path / "out")  # the export's pipeline folder: tests/test_export_pipeline.py
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    del config["_fpdm_model_config"]  # as in a folder diffusers wrote: architecture from diffusers' config alone
    (tmp_path / "out" / "config.json").write_text(json.dumps(config))
    back, info = load_model(tmp_path / "out")
    assert_same_weights(back, ours)
    assert {k: back.config[k] for k in TINY} == TINY and "i/127" in info["notes"][0]


@pytest.mark.parametrize("kwargs", [{}, TINY_FPDM], ids=["dit", "fpdm"])
def test_safetensors_round_trip_and_cli(kwargs, tmp_path):
    model, ema = tiny(seed=3, **kwargs), tiny(seed=4, **kwargs)
    torch.save(train_checkpoint(model, ema), tmp_path / "ckpt.pt")
    export_main(["--ckpt", str(tmp_path / "ckpt.pt"), "--format", "safetensors", "--out", str(tmp_path / "out")])
    back, info = load_model(tmp_path / "out")
    assert info["format"] == "safetensors" and info["weights"] == "ema" and back.config == ema.config
    assert_same_weights(back, ema)
    export_main(["--ckpt", str(tmp_path / "ckpt.pt"), "--format", "safetensors", "--out", str(tmp_path / "raw"),
                 "--no-use-ema"])
    assert_same_weights(load_model(tmp_path / "raw" / "model.safetensors")[0], model)
    import shutil  # a file of another name is refused, not swapped for its folder's model.safetensors
    shutil.copy(tmp_path / "raw" / "model.safetensors", tmp_path / "raw" / "other.safetensors")
    with pytest.raises(ValueError, match="other.safetensors is neither"):
        load_model(tmp_path / "raw" / "other.safetensors")


def test_fpdm_has_no_diffusers_export(tmp_path):
    with pytest.raises(ValueError, match="safetensors"):
        to_diffusers(tiny(**TINY_FPDM), tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------

def test_mismatched_architecture_names_key_and_shapes(tmp_path):
    to_safetensors(tiny(), tmp_path)
    with pytest.raises(ValueError, match=r"'y_embedder\.embedding_table\.weight'.*\(11, 32\).*\(6, 32\)"):
        load_model(tmp_path, num_classes=5)
    with pytest.raises(ValueError, match="blocks"):
        load_model(tmp_path, fixed_point=True)
    torch.save(tiny(hidden_size=384, num_heads=6).state_dict(), tmp_path / "s.pt")
    with pytest.raises(ValueError, match="DiT-B/2 has hidden size 768 and patch 2 but the weights have 384 and 2"):
        load_model(tmp_path / "s.pt", model_name="DiT-B/2")
    torch.save(tiny().state_dict(), tmp_path / "w32.pt")  # width 32 is no registry width
    with pytest.raises(ValueError, match="cannot infer num_heads"):
        load_model(tmp_path / "w32.pt")


def test_unknown_formats_are_clear_errors(tmp_path):
    torch.save({"foo": torch.zeros(1)}, tmp_path / "foo.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "empty").mkdir()
    for path, message in [("foo.pt", r"unknown checkpoint format \(top-level keys \['foo'\]\)"),
                          ("junk.pt", "cannot read .* as a torch checkpoint"), ("empty", "unknown checkpoint folder")]:
        with pytest.raises(ValueError, match=message):
            load_model(tmp_path / path)
    torch.save({"format": "fpdm-train-v9"}, tmp_path / "v9.pt")
    with pytest.raises(ValueError, match="unsupported checkpoint format 'fpdm-train-v9'"):
        load_model(tmp_path / "v9.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


# ----------------------------------------------------------------------------------------------------------------
# DiT-XL/2 on the meta device
# ----------------------------------------------------------------------------------------------------------------

def test_dit_xl_2_inferred_on_meta_device(tmp_path):
    with torch.device("meta"):
        state_dict = DiT_models["DiT-XL/2"]().state_dict()  # shapes only, no memory
    config, sources = infer_config(state_dict)
    assert (config["hidden_size"], config["depth"], config["patch_size"], config["num_heads"],
            config["num_classes"], config["input_size"], config["learn_sigma"]) == (1152, 28, 2, 16, 1000, 32, True)
    torch.save(state_dict, tmp_path / "DiT-XL-2-256x256.pt")  # meta tensors save no data
    model, info = load_model(tmp_path / "DiT-XL-2-256x256.pt", device="meta")
    assert info["format"] == "dit-state-dict" and model.pos_embed.is_meta
    assert model.num_parameters(include_pos_embed=True) == 675_129_632


# ----------------------------------------------------------------------------------------------------------------
# init_fpdm_from_dit
# ----------------------------------------------------------------------------------------------------------------

def test_gelu_difference_is_identity():
    x = torch.linspace(-30, 30, 100_001, dtype=torch.float64)
    for approximate in ("none", "tanh"):
        assert torch.allclose(F.gelu(x, approximate=approximate) - F.gelu(-x, approximate=approximate), x,
                              atol=1e-12)


def init_pair(pre_post_conditioning=True):
    dit = tiny(depth=7, seed=5)
    fpdm = tiny(**dict(TINY_FPDM, depth=7, fixed_point_pre_post_timestep_conditioning=pre_post_conditioning), seed=6)
    return dit, fpdm, init_fpdm_from_dit(fpdm, dit)


def test_init_from_dit_report():
    _, _, report = init_pair(pre_post_conditioning=False)
    assert report["placement"] == {"blocks_pre.0": 0, "block_fixed_point": 3, "blocks_post.0": 5, "blocks_post.1": 6}
    assert report["unused_dit_blocks"] == [1, 2, 4] and report["dit_depth"] == 7
    assert "label embedding" in report["notes"][0]


def test_one_iteration_is_the_middle_dit_block():
    dit, fpdm, report = init_pair()
    g = torch.Generator().manual_seed(0)
    z, h, c = torch.randn(2, 16, 32, generator=g), torch.randn(2, 16, 32, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        got = fpdm.fixed_point_function(z, fpdm.block_pre_projection(h), c)
        expected = dit.blocks[report["placement"]["block_fixed_point"]](z, c)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_fpdm_with_one_iteration_is_the_truncated_dit():
    dit, fpdm, report = init_pair()
    x, t, y = inputs()
    with torch.no_grad():
        tokens = dit.x_embedder(x) + dit.pos_embed
        c = dit.t_embedder(t) + dit.y_embedder(y, False)
        for index in report["placement"].values():  # pre, fixed-point, post: in order of use
            tokens = dit.blocks[index](tokens, c)
        expected = dit.unpatchify(dit.final_layer(tokens, c))
        got = fpdm(x, t, y, num_iterations=1)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_injection_path_receives_gradient_after_init():
    _, fpdm, _ = init_pair()
    x, t, y = inputs()
    fpdm(x, t, y, num_iterations=2).square().mean().backward()
    assert fpdm.block_pre_projection.weight.grad.abs().max() > 0


def test_init_rejects_mismatched_models():
    with pytest.raises(ValueError, match="num_heads"):
        init_fpdm_from_dit(tiny(**TINY_FPDM), tiny(num_heads=2))
    with pytest.raises(ValueError, match="cannot fill"):
        init_fpdm_from_dit(tiny(**dict(TINY_FPDM, fixed_point_post_depth=3)), tiny(depth=4))


# ----------------------------------------------------------------------------------------------------------------
# Exports carry the diffusion settings
# ----------------------------------------------------------------------------------------------------------------

COSINE_V = {"noise_schedule": "cosine", "predict_v": True, "zero_terminal_snr": False, "diffusion_steps": 1000,
            "learn_sigma": False}


def sample_with(path, steps=4, flags=()):
    """Four DDIM samples from whatever diffusion sample.py resolves for `path` and its diffusion `flags`."""
    from fpdm import cli as sample_cli
    from fpdm.checkpoints import load_model_for_sampling
    from fpdm.sampling import diffusion_for_sampling, sample_images
    model, train_config = load_model_for_sampling(str(path))
    args = sample_config.parse_args(["--ckpt", str(path), *flags])
    config = sample_cli.diffusion_config(args, model, train_config)
    noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    samples, _ = sample_images(model, diffusion_for_sampling(config, steps), noise, torch.arange(4),
                               clip_denoised=False)
    return samples, config


@pytest.mark.parametrize("fmt", ["safetensors", "diffusers"])
def test_exports_carry_the_diffusion_settings(fmt, tmp_path):
    """An export of a cosine / v-prediction model samples exactly like its checkpoint (it used to fall back to linear
    / epsilon silently), through safetensors metadata or a diffusers scheduler_config.json."""
    model = tiny(learn_sigma=False)
    ckpt = train_checkpoint(model, model)
    ckpt["config"] = {**ckpt["config"], **COSINE_V}
    torch.save(ckpt, tmp_path / "run.pt")
    export_main(["--ckpt", str(tmp_path / "run.pt"), "--format", fmt, "--out", str(tmp_path / "export")])
    original, config = sample_with(tmp_path / "run.pt")
    exported, exported_config = sample_with(tmp_path / "export")
    assert exported_config == config and config["noise_schedule"] == "cosine" and config["predict_v"]
    torch.testing.assert_close(exported, original, atol=1e-5, rtol=1e-5)
    if fmt == "diffusers":  # a standard diffusers DDIMScheduler reads the same schedule
        from diffusers import DDIMScheduler
        from diffusion import create_diffusion
        scheduler = DDIMScheduler.from_pretrained(str(tmp_path / "export"), subfolder="scheduler")
        reference = create_diffusion("", noise_schedule="cosine", predict_v=True, learn_sigma=False)
        assert scheduler.config.prediction_type == "v_prediction"
        torch.testing.assert_close(scheduler.alphas_cumprod.double(),
                                   torch.from_numpy(reference.alphas_cumprod), atol=1e-6, rtol=1e-4)


def test_diffusion_flags_for_checkpoints_that_record_none(tmp_path, capsys):
    from fpdm import cli as sample_cli
    model = tiny(learn_sigma=False)
    to_safetensors(model, tmp_path / "bare")  # records nothing (as official DiT weights): DiT's defaults, with a note
    _, config = sample_with(tmp_path / "bare")
    assert (config["noise_schedule"], config["predict_v"]) == ("linear", False)
    assert "records no diffusion settings" in capsys.readouterr().out
    ckpt = train_checkpoint(model, model)
    ckpt["config"] = {**ckpt["config"], **COSINE_V}
    torch.save(ckpt, tmp_path / "run.pt")
    original, _ = sample_with(tmp_path / "run.pt")
    from fpdm.checkpoints import load_model_for_sampling
    bare_model, bare_config = load_model_for_sampling(str(tmp_path / "bare"))
    args = sample_config.parse_args(["--ckpt", "x", "--noise-schedule", "cosine", "--predict-v"])
    assert sample_cli.diffusion_config(args, bare_model, bare_config) == sample_with(tmp_path / "run.pt")[1]
    flagged = sample_with(tmp_path / "bare", flags=("--noise-schedule", "cosine", "--predict-v"))[0]
    torch.testing.assert_close(flagged, original, atol=1e-5, rtol=1e-5)  # the flags reproduce the recorded run
    with pytest.raises(ValueError, match=r"--noise-schedule linear \(checkpoint: cosine\): .*drop the flag"):
        run_model, run_config = load_model_for_sampling(str(tmp_path / "run.pt"))
        sample_cli.diffusion_config(sample_config.parse_args(["--ckpt", "x", "--noise-schedule", "linear"]),
                                    run_model, run_config)
    assert original.shape == (4, 4, 8, 8)


def test_export_refuses_a_run_folder(tmp_path):
    model = tiny()
    torch.save(train_checkpoint(model, model), tmp_path / "run.pt")
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text('{"train": {}}')
    for overwrite in ([], ["--overwrite"]):  # --overwrite removes only an export's own files: never a run
        with pytest.raises(FileExistsError, match=r"holds files this command did not write \(checkpoints\)"):
            export_main(["--ckpt", str(tmp_path / "run.pt"), "--format", "safetensors", "--out", str(run_dir),
                         *overwrite])
    assert (run_dir / "config.json").read_text() == '{"train": {}}'


def test_export_overwrite_never_loses_the_previous_export(tmp_path, monkeypatch):
    """--overwrite swaps whole folders: a failure while writing leaves the old export in --out; an interruption
    between the two renames leaves it whole in --out.old-PID; a completed one leaves neither temporary behind."""
    import export
    first, second = tiny(seed=3), tiny(seed=4)
    torch.save(train_checkpoint(first, first), tmp_path / "a.pt")
    torch.save(train_checkpoint(second, second), tmp_path / "b.pt")
    out = tmp_path / "out"
    export_main(["--ckpt", str(tmp_path / "a.pt"), "--format", "safetensors", "--out", str(out)])
    args = ["--ckpt", str(tmp_path / "b.pt"), "--format", "safetensors", "--out", str(out), "--overwrite"]
    real_replace, calls = os.replace, []

    def interrupted_replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # after moving the old export aside, before moving the new one in
            raise KeyboardInterrupt
        real_replace(src, dst)
    monkeypatch.setattr(export.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        export_main(args)
    monkeypatch.undo()
    aside = tmp_path / f"out.old-{os.getpid()}"
    assert_same_weights(load_model(aside)[0], first)
    assert not out.exists()
    real_replace(aside, out)
    monkeypatch.setattr(export, "write", lambda args: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        export_main(args)
    monkeypatch.undo()
    assert_same_weights(load_model(out)[0], first)
    export_main(args)
    assert_same_weights(load_model(out)[0], second)
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "b.pt", "out"]


def test_a_run_folder_loads_its_latest_checkpoint(tmp_path):
    model = tiny()
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save(train_checkpoint(model, model), tmp_path / "run" / "checkpoints" / "step_0000007.pt")
    (tmp_path / "run" / "latest.json").write_text('{"step": 7, "path": "checkpoints/step_0000007.pt"}')
    loaded, info = load_model(str(tmp_path / "run"))
    assert_same_weights(loaded, model)
    assert info["format"] == TRAIN_FORMAT and info["step"] == 7 and "is a run folder" in info["notes"][0]


def test_sampling_reads_only_the_weights_of_a_training_checkpoint(tmp_path):
    """A train.py checkpoint is memory-mapped when loaded for sampling: its optimizer state (here 400 MB; 10.8 GB of
    model, EMA and Adam state at DiT-XL/2, on each of 8 processes) is never read into RAM."""
    import subprocess
    import sys

    model = tiny()
    ckpt = train_checkpoint(model, model)
    ckpt["opt"] = {"state": {0: {"exp_avg": torch.ones(100_000_000)}}}
    path = tmp_path / "step.pt"
    torch.save(ckpt, path)
    del ckpt
    code = ("import torch; from fpdm.checkpoints import load_model_for_sampling\n"
            "def peak():  # MB; VmHWM is this program's own (ru_maxrss would carry the parent's across exec)\n"
            "    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) // 1024\n"
            f"before = peak(); model, _ = load_model_for_sampling({str(path)!r}); print(peak() - before)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) < 100  # MB of peak RSS added by the load (reading the file: 400)
