"""export.py --format diffusers: a DiTPipeline folder that diffusers loads and that samples exactly like
sampling.sample_images + the VAE, its DDIMScheduler ending at ᾱ = 1, the class-count notes, pixel models, and both
folder layouts (pipeline, old flat transformer folder) read by checkpoints.load_model."""

import json

import pytest
import torch

from export import main as export_main
from fpdm.checkpoints import TRAIN_FORMAT, load_model
from fpdm.diffusers_dit import SCHEDULER_CONFIG, scheduler_config, to_diffusers, use_dit_timestep_frequencies
from conftest import random_model

LATENT = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)
DIFFUSION = {"noise_schedule": "linear", "predict_v": False, "zero_terminal_snr": False, "diffusion_steps": 1000,
             "learn_sigma": True}


def tiny(seed=1, scale=0.1, **kwargs):
    """A tiny DiT with every parameter random (conftest.random_model)."""
    return random_model({**LATENT, **kwargs}, seed, scale)


def checkpoint(tmp_path, model):
    """`model` as a train.py checkpoint (EMA = model) recording DIFFUSION; returns its path."""
    path = tmp_path / "run.pt"
    torch.save({"format": TRAIN_FORMAT, "step": 1, "model": model.state_dict(), "ema": model.state_dict(),
                "config": dict(DIFFUSION), "model_config": model.config}, path)
    return str(path)


def tiny_vae(tmp_path=None, seed=0):
    """A random one-level AutoencoderKL (latents as large as the images), saved to tmp_path/vae when given."""
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=8).eval()
    if tmp_path is not None:
        vae.save_pretrained(tmp_path / "vae")
    return vae


def export(tmp_path, model, *flags):
    out = tmp_path / "out"
    export_main(["--ckpt", checkpoint(tmp_path, model), "--format", "diffusers", "--out", str(out), *flags])
    return out


def test_pipeline_samples_equal_our_ddim_and_vae(tmp_path, capsys):
    """DiTPipeline (DDIM, guidance 4 on all channels, learned sigma dropped, class 1000 as null) from the same
    generator equals our sample_images + vae.decode, latents and images, once DiT's timestep frequencies are set."""
    from diffusers import AutoencoderKL, DiTPipeline
    from fpdm import vae as vae_module
    from fpdm.sampling import diffusion_for_sampling, sample_images
    model = tiny()
    tiny_vae(tmp_path)
    out = export(tmp_path, model, "--vae", str(tmp_path / "vae"))
    assert "10 classes, but DiTPipeline takes class 1000 as its null class" in capsys.readouterr().out
    labels, steps, scale, seed = [3, 7, 0], 5, 4.0, 0

    pipe = DiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    decoded, decode = [], pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: decoded.append(z) or decode(z, *a, **k)

    def run():
        return pipe(labels, guidance_scale=scale, num_inference_steps=steps, output_type="pt",
                    generator=torch.Generator().manual_seed(seed)).images

    as_is = run()
    use_dit_timestep_frequencies(pipe.transformer)
    theirs = run()

    noise = torch.randn(len(labels), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    latents, _ = sample_images(load_model(out)[0], diffusion_for_sampling(DIFFUSION, steps), noise,
                               torch.tensor(labels), cfg_scale=scale)
    ours = (vae_module.decode(latents, AutoencoderKL.from_pretrained(tmp_path / "vae")) / 2 + 0.5).clamp(0, 1)
    scaling = pipe.vae.config.scaling_factor
    torch.testing.assert_close(decoded[1] * scaling, latents, atol=1e-4 * latents.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
    assert 0.05 < ((ours > 0) & (ours < 1)).float().mean()  # not all clamped: the images compare something
    assert (decoded[0] * scaling - latents).abs().max() > 1e-2  # diffusers' own frequencies: other samples
    assert (as_is - ours).abs().max() > 1e-3


def test_scheduler_ends_at_alpha_bar_one_like_ours(tmp_path):
    from diffusers import DDIMScheduler
    from fpdm.sampling import diffusion_for_sampling
    out = export(tmp_path, tiny())
    config = json.loads((out / "scheduler" / SCHEDULER_CONFIG).read_text())
    assert config["set_alpha_to_one"] and config["timestep_spacing"] == "trailing" and not config["clip_sample"]
    scheduler = DDIMScheduler.from_pretrained(out, subfolder="scheduler")
    for steps in (10, 50):
        ours = diffusion_for_sampling(DIFFUSION, steps)
        scheduler.set_timesteps(steps)
        assert scheduler.timesteps.tolist() == ours.timestep_map[::-1].tolist()
        assert float(scheduler.final_alpha_cumprod) == ours.alphas_cumprod_prev[0] == 1.0  # the last step's target
    torch.testing.assert_close(scheduler.alphas_cumprod.double(),  # ours in float64, diffusers' in float32
                               torch.from_numpy(diffusion_for_sampling(DIFFUSION, 1000).alphas_cumprod), rtol=1e-6,
                               atol=0)


@pytest.mark.parametrize("num_classes,note", [(10, "padded to 1000"), (1000, None),
                                              (1001, "sample it with guidance_scale=1")])
def test_class_count_notes_and_latent_export_without_vae(num_classes, note, tmp_path, capsys):
    """Without --vae the pipeline folder lacks vae/ (noted) and loads with a VAE passed in; a class count other than
    DiTPipeline's 1000 is noted; the way back restores our label table either way."""
    from diffusers import DiTPipeline
    model = tiny(num_classes=num_classes)
    out = export(tmp_path, model)
    printed = capsys.readouterr().out
    assert "no --vae" in printed and not (out / "vae").exists()
    assert (note in printed) if note else "null class" not in printed
    pipe = DiTPipeline.from_pretrained(out, vae=tiny_vae())
    assert pipe.transformer.config.num_embeds_ada_norm == max(num_classes, 1000)
    back, info = load_model(out)
    assert back.config == model.config and info["training_config"] == DIFFUSION
    assert torch.equal(back.y_embedder.embedding_table.weight, model.y_embedder.embedding_table.weight)


def test_pixel_models_get_transformer_and_scheduler_only(tmp_path, capsys):
    model = tiny(in_channels=3)
    out = export(tmp_path, model)
    assert "pixel-space model" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["scheduler", "transformer"]
    assert load_model(out)[0].config == model.config
    with pytest.raises(ValueError, match="pixel-space model"):  # refused with the first export left whole
        export(tmp_path, model, "--vae", str(tmp_path), "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["scheduler", "transformer"] and load_model(out)[0].config == \
        model.config
    assert not list(tmp_path.glob("out.tmp-*"))


def test_old_flat_layout_and_pipeline_layout_load_alike(tmp_path):
    """The old export (transformer files and scheduler_config.json at the top) still loads, as the new one does."""
    from fpdm.checkpoints import load_model_for_sampling
    model = tiny()
    flat = to_diffusers(model, tmp_path / "flat")
    (tmp_path / "flat" / SCHEDULER_CONFIG).write_text(json.dumps(scheduler_config(DIFFUSION)))
    pipeline = export(tmp_path, model)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 10])
    for folder in (flat, pipeline):
        loaded, training_config = load_model_for_sampling(str(folder))
        assert loaded.config == model.config and training_config == DIFFUSION
        with torch.no_grad():
            assert torch.equal(loaded(x, t, y), model(x, t, y))
