"""The typed sampling configuration (fpdm/sample_config.py): every field is in a folder's identity or on the explicit
list of fields that do not change the samples; every flag given is used or refused (a walk over the flags in each
sampling mode); presets; sampler capabilities instead of name tests."""

import dataclasses
import json
import os

import pytest
import torch

import sample as sample_cli
import sample_ddp
from fpdm import cli, sample_config
from fpdm.sample_config import ALL_GROUPS, FIELDS, NOT_IN_IDENTITY, PRESETS, SCRIPT_GROUPS
from fpdm.sampling import SAMPLERS, capabilities
from models import DiT
from test_sampling import TRAIN_CONFIG


def tiny(fixed_point):
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=6, num_heads=4, num_classes=10,
                learn_sigma=False, fixed_point=fixed_point, class_dropout_prob=0.1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if fixed_point:  # contractive, so that the parallel solvers converge
            model.block_fixed_point_projection_fc1.weight.mul_(0.3)
            model.block_fixed_point_projection_fc2.weight.mul_(0.3)
    return model


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A DiT and an FPDM checkpoint whose EMA differs from the raw weights (so --no-ema has an effect to see)."""
    folder, paths = tmp_path_factory.mktemp("ckpts"), {}
    for name, fixed_point in (("dit", False), ("fpdm", True)):
        model = tiny(fixed_point)
        ema = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2)) if v.is_floating_point()
               else v for k, v in model.state_dict().items()}
        paths[name] = str(folder / f"{name}.pt")
        torch.save({"format": "fpdm-train-v1", "model_config": model.config, "model": model.state_dict(), "ema": ema,
                    "config": TRAIN_CONFIG, "step": 1}, paths[name])
    return paths


def test_every_field_is_in_the_identity_or_listed_with_a_reason(checkpoints, tmp_path):
    fields = {f.name for kind in ALL_GROUPS.values() for f in dataclasses.fields(kind)}
    assert set(NOT_IN_IDENTITY) <= fields and all(len(reason) > 10 for reason in NOT_IN_IDENTITY.values())
    assert len(fields) == len(FIELDS)  # names are unique across groups: one flag, one field
    # args.json of an FPDM parallel run (every group applies) holds every identity field under its group.
    cfg = sample_config.parse_args(["--ckpt", checkpoints["fpdm"], "--parallel", "anderson", "--iterations", "2",
                                    "--num-sampling-steps", "3", "--num-samples", "2", "--out", str(tmp_path / "a"),
                                    "--device", "cpu"])
    out, _ = sample_cli.main(cfg)
    settings = json.load(open(os.path.join(out, "args.json")))
    recorded = {name for group, values in settings.items() if group in ALL_GROUPS and values for name in values}
    sample_only = fields - NOT_IN_IDENTITY.keys() - {f.name for f in dataclasses.fields(sample_config.FidOptions)}
    assert recorded == sample_only
    ddp = sample_config.parse_args(["--ckpt", checkpoints["fpdm"]], script="sample_ddp")
    assert set(sample_config.identity(ddp, {})["fid"]) == {"num_fid_samples", "batch_size"}  # not png
    assert settings["resolved"]["sampler"] == "ddim-parallel" and settings["format"] == cli.SETTINGS_FORMAT


def test_flags_are_generated_in_groups_from_the_fields():
    for script, groups in SCRIPT_GROUPS.items():
        parser = sample_config.build_parser(script)
        sections = {g.title: {a.dest for a in g._group_actions} for g in parser._action_groups}
        for group, kind in groups.items():
            assert sections[group] == {f.name for f in dataclasses.fields(kind)}
    assert "parallel" not in {g.title for g in sample_config.build_parser("sample_ddp")._action_groups}


# Each identity field's other value, and the modes of the walk (flags added to every run of that mode).
OTHER = {"model": "DiT-S/4", "ema": False, "sampler": "ddpm", "num_sampling_steps": 4, "timestep_spacing": "leading",
         "eta": 0.5, "seed": 1, "clip_denoised": "off", "cfg_scale": 2.0, "guidance_interval": [300.0, 700.0],
         "guidance_schedule": "linear", "guidance_channels": 1, "iterations": 2, "budget_block_evals": 15,
         "schedule": "more-noisy", "fp_allocation": "budget", "calibration_samples": 5, "reuse": True,
         "fp_solver": "anderson", "fp_history": 3, "fp_damping": 0.5, "adaptive_tol": 0.5, "parallel": "picard",
         "inner_iterations": 2, "two_axis_outer": "picard", "parallel_max_iter": 2, "parallel_tol": 0.5,
         "parallel_window": 2, "noise_schedule": "linear", "predict_v": False, "zero_terminal_snr": True,
         "diffusion_steps": 500, "cuda_graphs": True}
MODES = {"dit-ddim": ("dit", {}), "dit-ddpm": ("dit", {"sampler": "ddpm"}), "fpdm-ddim": ("fpdm", {}),
         "fpdm-dpmpp": ("fpdm", {"sampler": "dpmpp-2m"}),
         # 3 iterations: with 2, Anderson's first update is the plain step, so only its best-iterate choice (or a
         # damping) could tell --fp-solver anderson from iterate, and on this model it picks the same one.
         "fpdm-parallel": ("fpdm", {"parallel": "anderson", "iterations": 3}),
         "fpdm-window": ("fpdm", {"parallel": "window", "iterations": 3}),
         "fpdm-two-axis": ("fpdm", {"parallel": "two-axis"})}
# Flags whose effect is not on the samples of one batch, each checked elsewhere: the test named.
USED_ELSEWHERE = {"ckpt": "every test", "trust_checkpoint": "test_checkpoints (Namespace checkpoints)",
                  "class_labels": "test_sampling::test_class_labels_*", "num_samples": "test_sampling (counts)",
                  "precision": "test_sample_precision", "tf32": "test_sample_precision (CUDA only: no effect on CPU, "
                  "as its help says)", "compile": "test_models (regional compile)",
                  "parallel_chunk_size": "test_parallel (chunked calls)",
                  "parallel_sync_every": "test_parallel::test_sync_every_* (same samples, fewer reads)", "compare_sequential": "test_sampling",
                  "vae": "test_sampling (latent decode)", "out": "test_sampling", "overwrite": "test_sampling",
                  "device": "test_sample_precision", "num_fid_samples": "test_sampling (sample_ddp)",
                  "batch_size": "test_sampling (sample_ddp)", "png": "test_sampling (sample_ddp --no-png)"}


def samples_of(settings):
    """(two images of 3 steps as the scripts make them (noise from the seed), the sampler's report without times,
    the resolved clipping), or the refusal's text."""
    cfg = sample_config.make("sample", ckpt=settings.pop("path"), **{"num_sampling_steps": 3, "device": "cpu", **settings})
    try:
        setup = cli.Setup(cfg, torch.device("cpu"))
    except ValueError as error:
        return str(error)
    g = torch.Generator().manual_seed(cfg.sampler.seed)
    noise = torch.randn(2, 1, 8, 8, generator=g)
    torch.manual_seed(cfg.sampler.seed)
    samples, fn = setup.sample(cfg, noise, torch.tensor([1, 2]))
    return samples, {k: v for k, v in fn.info.items() if "time" not in k}, setup.clip


def test_every_flag_given_is_used_or_refused(checkpoints, capsys):
    """The walk: in every mode, each flag set to another value either changes the samples or is refused in one
    line; fields whose effect is elsewhere are named with the test that checks them."""
    walked = set(OTHER) | set(USED_ELSEWHERE)
    assert walked == set(FIELDS), set(FIELDS) ^ walked
    silent = []
    for mode, (kind, flags) in MODES.items():
        base = samples_of({"path": checkpoints[kind], **flags})
        assert not isinstance(base, str), (mode, base)
        for name, value in OTHER.items():
            if name in flags or FIELDS[name][0] == "fid":
                continue
            if name == "parallel" and kind == "dit":
                value = "anderson"
            if name == "clip_denoised" and not base[2]:  # the other value of a sampler that does not clip
                value = "on"
            result = samples_of({"path": checkpoints[kind], **flags, name: value})
            if isinstance(result, str):
                assert "\n" not in result and result, (mode, name)
            elif torch.equal(result[0], base[0]) and result[1] == base[1]:
                silent.append(f"{mode}: --{name.replace('_', '-')} {value}")
    assert not silent, "flags with no effect and no refusal: " + "; ".join(silent)


def test_presets_set_their_fields_and_flags_override_them(capsys):
    cfg = sample_config.parse_args(["--ckpt", "x", "--preset", "dit-fid50k"], script="sample_ddp")
    assert (cfg.sampler.sampler, cfg.sampler.num_sampling_steps, cfg.guidance.cfg_scale, cfg.fid.num_fid_samples) == (
        "ddpm", 250, 1.5, 50_000)
    cfg = sample_config.parse_args(["--ckpt", "x", "--preset", "dit-fid50k", "--cfg-scale", "4"], script="sample_ddp")
    assert cfg.guidance.cfg_scale == 4 and cfg.sampler.sampler == "ddpm"
    cfg = sample_config.parse_args(["--ckpt", "x", "--preset", "fpdm-fid50k-560"])  # sample.py: no FID count
    assert cfg.fp.budget_block_evals == 560 and cfg.fid is None and "num_fid_samples" in capsys.readouterr().out
    for name, values in PRESETS.items():
        assert set(values) <= set(FIELDS), name


def test_a_preset_setting_the_flags_make_inapplicable_is_dropped_with_a_note(capsys):
    """`--preset dit-fid50k --cfg-scale 1` (DiT's unguided FID) drops the preset's guidance channels, and
    `--preset fpdm-fid50k-560 --iterations 6` its block budget, each with a note; the same settings given as flags
    are still refused."""
    def parse(*flags):
        return sample_config.parse_args(["--ckpt", "x", *flags], script="sample_ddp")
    cfg = parse("--preset", "dit-fid50k", "--cfg-scale", "1")
    cli.check_settings(cfg, tiny(False), "ddpm")
    assert cfg.guidance.guidance_channels is None and cfg.sampler.num_sampling_steps == 250
    assert "preset dit-fid50k: guidance_channels=3 left out" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--guidance-channels shapes classifier-free guidance"):
        cli.check_settings(parse("--preset", "dit-fid50k", "--cfg-scale", "1", "--guidance-channels", "1"), tiny(False),
                           "ddpm")
    cfg = parse("--preset", "fpdm-fid50k-560", "--iterations", "6")
    cli.check_settings(cfg, tiny(True), "ddim")
    assert (cfg.fp.budget_block_evals, cfg.fp.iterations, cfg.fp.schedule) == (None, 6, "more-noisy")
    assert "budget_block_evals=560 left out" in capsys.readouterr().out
    with pytest.raises(ValueError, match="give either --iterations or --budget-block-evals"):
        cli.check_settings(parse("--iterations", "6", "--budget-block-evals", "560"), tiny(True), "ddim")


def test_dit_fid_preset_visits_dits_ddpm_250_timesteps():
    """The preset's linspace spacing is the even IDDPM spacing DiT's sample_ddp.py uses (respacing "250")."""
    from diffusion import space_timesteps, timestep_spacing
    assert sorted(timestep_spacing(250, 1000, PRESETS["dit-fid50k"]["timestep_spacing"])) == space_timesteps(1000, "250")


def test_samplers_declare_their_capabilities():
    assert {name for name in SAMPLERS if capabilities(name).parallel} == {"ddim-parallel", "ddim-two-axis"}
    assert [name for name in SAMPLERS if capabilities(name).needs_fpdm] == ["ddim-two-axis"]
    assert {name for name in SAMPLERS if not capabilities(name).can_clip} == {"ddim-parallel", "ddim-two-axis",
                                                                               "euler", "heun"}
    assert {name for name in SAMPLERS if capabilities(name).takes_eta} == {"ddim", "ddim-parallel", "ddim-two-axis"}
    with pytest.raises(ValueError, match="unknown sampler 'x'; choose one of"):
        capabilities("x")


def test_sample_ddp_refuses_parallel_samplers_and_has_no_parallel_flags(checkpoints):
    with pytest.raises(SystemExit):
        sample_ddp.parse_args(["--ckpt", checkpoints["fpdm"], "--parallel", "anderson"])
    cfg = sample_ddp.parse_args(["--ckpt", checkpoints["fpdm"], "--sampler", "ddim-parallel", "--device", "cpu"])
    with pytest.raises(ValueError, match="solves all steps at once: sample it with sample.py"):
        cli.Setup(cfg, torch.device("cpu"))


def test_overwrite_never_removes_what_the_command_did_not_write(checkpoints, tmp_path):
    """sample.py / sample_ddp.py --overwrite into a training run folder is refused and the run stays whole (it used
    to delete it); into a sample folder of other settings it removes exactly the sampling outputs; invert.py's folder
    likewise (its own output list)."""
    import invert
    from fpdm.sampling import claim_output_folder
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "step_0000010.pt").write_bytes(b"weights")
    (run / "metrics.csv").write_text("step,loss\n")
    base = ["--ckpt", checkpoints["fpdm"], "--num-sampling-steps", "2", "--iterations", "1", "--device", "cpu"]
    for main, args in ((sample_cli.main, sample_cli.parse_args([*base, "--num-samples", "2", "--out", str(run),
                                                                "--overwrite"])),
                       (sample_ddp.main, sample_ddp.parse_args([*base, "--num-fid-samples", "2", "--out", str(run),
                                                                "--overwrite"]))):
        with pytest.raises(FileExistsError, match=r"holds files this command did not write \(checkpoints, "
                                                  r"metrics.csv\): choose another --out"):
            main(args)
    assert sorted(os.listdir(run)) == ["checkpoints", "metrics.csv"]
    assert (run / "checkpoints" / "step_0000010.pt").read_bytes() == b"weights"
    folder = tmp_path / "samples"
    out, _ = sample_cli.main(sample_cli.parse_args([*base, "--num-samples", "2", "--out", str(folder)]))
    (folder / "compute.json.tmp-999999").write_text("{")  # a killed write's leftover is the command's own
    out, _ = sample_cli.main(sample_cli.parse_args([*base, "--num-samples", "2", "--seed", "1", "--out", str(folder),
                                                    "--overwrite"]))
    assert sorted(os.listdir(folder)) == ["args.json", "compute.json", "grid.png"]
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"did not write \(notes.txt\)"):
        sample_cli.main(sample_cli.parse_args([*base, "--num-samples", "2", "--seed", "2", "--out", str(folder),
                                               "--overwrite"]))
    assert (folder / "notes.txt").read_text() == "mine"
    inverted = tmp_path / "inverted"
    claim_output_folder(str(inverted), {"a": 1}, outputs=invert.OUTPUTS)
    (inverted / "grid.png").write_bytes(b"png")
    claim_output_folder(str(inverted), {"a": 2}, overwrite=True, outputs=invert.OUTPUTS)
    assert sorted(os.listdir(inverted)) == ["args.json"]
    with pytest.raises(FileExistsError, match="is a file"):
        claim_output_folder(str(run / "metrics.csv"), {"a": 1})
