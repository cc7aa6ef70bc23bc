"""fpdm/config.py: typed groups, the generated command line, presets, flat storage, one validator per group."""

import dataclasses

import pytest

from diffusion import DIFFUSION_DEFAULTS, create_diffusion
from fpdm import config as configs

# The demo's flags before presets existed (demo.py's TRAIN_FLAGS until 2026-12-04): the preset must be the same recipe.
OLD_DEMO_FLAGS = ["--data-path", "mnist", "--image-size", "14", "--model", "DiT-S/2", "--hidden-size", "128",
                  "--num-heads", "4", "--depth", "8", "--patch-size", "2", "--fixed-point",
                  "--fixed-point-no-grad-min-iters", "3", "--fixed-point-no-grad-max-iters", "3",
                  "--fixed-point-with-grad-min-iters", "2", "--fixed-point-with-grad-max-iters", "2",
                  "--no-learn-sigma", "--predict-v", "--noise-schedule", "cosine", "--lr", "1e-3",
                  "--warmup-steps", "100", "--global-batch-size", "64", "--ema-warmup", "--log-every", "250",
                  "--ckpt-every", "500", "--num-sample-images", "40", "--tracker", "none", "--max-steps", "1500"]


def test_demo_preset_is_the_recipe_the_demo_always_trained():
    """The old flags plus the training-time FID curve, which changes nothing the training does (test_train)."""
    curve = ["--eval-every", "250", "--eval-samples", "200", "--eval-steps", "10", "--fp-diagnostics-every", "250"]
    assert configs.preset("demo-mnist-fpdm") == configs.parse_args(OLD_DEMO_FLAGS + curve)
    dit = configs.preset("demo-mnist-dit").flat()
    fpdm = configs.preset("demo-mnist-fpdm").flat()
    assert {k for k in fpdm if fpdm[k] != dit[k]} == {"fixed_point", "fixed_point_no_grad_min_iters",
                                                      "fixed_point_no_grad_max_iters", "fixed_point_with_grad_min_iters",
                                                      "fixed_point_with_grad_max_iters", "eval_every", "eval_samples",
                                                      "eval_steps", "fp_diagnostics_every"}


@pytest.mark.parametrize("name", sorted(configs.PRESETS))
def test_every_preset_validates_and_survives_the_command_line(name):
    cfg = configs.preset(name).validate()
    assert configs.parse_args(configs.to_argv(cfg)) == cfg
    assert configs.parse_args(["--preset", name]) == cfg
    assert configs.TrainConfig.from_flat(cfg.flat()) == cfg


def test_flags_override_a_preset_and_booleans_turn_off():
    cfg = configs.parse_args(["--preset", "fpdm-xl2-in256", "--lr", "3e-4", "--no-grad-ckpt", "--data-path", "lat"])
    assert (cfg.optim.lr, cfg.optim.grad_ckpt, cfg.data.data_path, cfg.net.model) == (3e-4, False, "lat", "DiT-XL/2")
    assert cfg.fp.fixed_point and cfg.fp.fixed_point_with_grad_max_iters == 12 and cfg.optim.global_batch_size == 512
    assert configs.parse_args([]) == configs.TrainConfig()  # no flag: the dataclass defaults


def test_flat_storage_has_one_name_per_setting_and_refuses_unknown_names():
    flat = configs.TrainConfig().flat()
    assert len(flat) == sum(len(dataclasses.fields(t)) for t in configs.GROUP_TYPES.values())
    assert set(configs.ARCHITECTURE) <= set(flat) and set(configs.RESUME_MAY_CHANGE) <= set(flat)
    with pytest.raises(ValueError, match=r"unknown settings \['learning_rate'\]"):
        configs.TrainConfig().replace(learning_rate=1e-3)


def test_diffusion_group_is_create_diffusions_keywords():
    """The diffusion settings recorded everywhere are exactly create_diffusion's keywords: no renaming in between."""
    cfg = configs.preset("demo-mnist-fpdm")
    assert set(dataclasses.asdict(cfg.diffusion)) == set(DIFFUSION_DEFAULTS)
    assert dataclasses.asdict(configs.DiffusionConfig()) == DIFFUSION_DEFAULTS
    d = create_diffusion("", **dataclasses.asdict(cfg.diffusion.__class__(zero_terminal_snr=True, predict_v=True)))
    assert d.alphas_cumprod[-1] == 0.0


@pytest.mark.parametrize("settings,message", [
    (dict(fixed_point_with_grad_min_iters=3, fixed_point_with_grad_max_iters=2), r"with-grad range \[3, 2\]"),
    (dict(fixed_point_pre_depth=-1), "pre-depth"),
    (dict(zero_terminal_snr=True), "needs --predict-v"),
    (dict(noise_schedule="quadratic"), "unknown --noise-schedule"),
    (dict(lr=0.0), "--lr must be > 0"),
    (dict(ema_decay=1.5), "--ema-decay must lie in"),
    (dict(class_dropout_prob=1.0), "--class-dropout-prob must lie in"),
    (dict(model="DiT-XXL/2"), "unknown --model"),
    (dict(tracker="mlflow"), "unknown --tracker"),
    (dict(num_workers=-1), "--num-workers must be >= 0"),
    (dict(keep_last=0), "--keep-last must be >= 1"),
])
def test_each_group_validates_its_own_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        configs.TrainConfig().replace(**settings).validate()


def test_model_kwargs_carry_the_fixed_point_group_only_for_fpdm():
    fpdm = configs.model_kwargs(configs.preset("demo-mnist-fpdm"), (1, 14, 14), 10)
    dit = configs.model_kwargs(configs.preset("demo-mnist-dit"), (1, 14, 14), 10)
    assert fpdm["fixed_point"] and fpdm["fixed_point_no_grad_min_iters"] == 3 and fpdm["learn_sigma"] is False
    assert not dit["fixed_point"] and not any(k.startswith("fixed_point_") for k in dit)
    assert configs.model_kwargs(configs.preset("demo-mnist-dit"), (1, 14, 14), 1)["class_dropout_prob"] == 0.0
