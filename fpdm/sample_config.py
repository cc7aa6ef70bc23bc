"""The sampling configuration, typed, as training's (fpdm/config.py): one dataclass per concern (checkpoint,
diffusion, sampler, guidance, FPDM's fixed point, parallel sampling, output; sample_ddp.py adds its FID group), the
flags of sample.py and sample_ddp.py generated from them in groups, named presets, and the settings that identify a
sample folder (`identity`) generated from the same fields:

    cfg = sample_config.parse_args(["--ckpt", "run/checkpoints/step_0002500.pt", "--preset", "dit-fid50k"])
    cfg.sampler.num_sampling_steps, cfg.guidance.cfg_scale, cfg.fp.reuse, cfg.parallel.parallel

Every field is either part of a folder's identity (recorded in its `args.json`, so a new option cannot be left out)
or listed in NOT_IN_IDENTITY with the reason it does not change the samples.
"""

import argparse
import dataclasses
from dataclasses import dataclass, field

from diffusion import TIMESTEP_SPACINGS
from fpdm.sampling import CLIP_CHOICES, GUIDANCE_SCHEDULES, PRECISIONS, SAMPLERS, SCHEDULES

DEFAULT_NUM_SAMPLES = 40  # sample.py without --num-samples or --class-labels
PARALLEL_SOLVERS = {"anderson": "ddim-parallel", "picard": "ddim-parallel", "window": "ddim-parallel",
                    "two-axis": "ddim-two-axis"}  # --parallel SOLVER -> the sampler it selects

# Fields that do not change the samples, each with the reason; every other field is recorded in args.json.
NOT_IN_IDENTITY = {
    "ckpt": "recorded as checkpoint.path and checkpoint.sha256 (its content)",
    "trust_checkpoint": "how a checkpoint may be read, not what it holds",
    "noise_schedule": "recorded as the resolved diffusion (checkpoint's settings, then these flags)",
    "predict_v": "recorded as the resolved diffusion",
    "zero_terminal_snr": "recorded as the resolved diffusion",
    "diffusion_steps": "recorded as the resolved diffusion",
    "clip_denoised": "recorded as the resolved clipping (auto resolves per model and sampler)",
    "class_labels": "recorded as the resolved labels",
    "num_samples": "recorded as the resolved labels (one image per label)",
    "precision": "recorded as the effective precision (with --tf32 and the device)",
    "tf32": "recorded as the effective precision",
    "compile": "the same function, compiled",
    "cuda_graphs": "the same calls, replayed from CUDA graphs",
    "parallel_chunk_size": "bounds memory: the same network calls in smaller batches",
    "parallel_sync_every": "when the host reads the device: every image gets the same result",
    "compare_sequential": "adds a reference grid beside the samples; the samples are the same",
    "vae": "recorded as vae_sha256 (its content)",
    "out": "where the samples go, not what they are",
    "overwrite": "what happens to an existing folder",
    "device": "recorded as the effective precision; samples are the same configuration on any device",
    "png": "also writes PNG copies of the samples (the batch files and samples.npz are the record)",
}


def opt(default, help, type=None, **argparse_kwargs):
    """A setting: its default, its help line, its type where the default does not tell, and argparse extras
    (choices, nargs, metavar, required)."""
    return field(default=default, metadata={"help": help, "type": type, "argparse": argparse_kwargs})


@dataclass
class CheckpointOptions:
    """What to sample from."""
    ckpt: str = opt(None, "a train.py checkpoint, an official DiT / FPDM-release .pt, a diffusers "
                    "DiTTransformer2DModel folder or an export.py safetensors folder (architecture read from it)",
                    str, required=True)
    model: str = opt(None, "registry name, only to resolve what the weights cannot tell (e.g. the head count of "
                     "external checkpoints)", str)
    ema: bool = opt(True, "sample with the EMA weights (--no-ema: the raw weights)")
    trust_checkpoint: bool = opt(False, "allow argparse.Namespace objects in DiT training checkpoints (never "
                                 "arbitrary pickle)")


@dataclass
class DiffusionOptions:
    """For checkpoints that record no diffusion settings (official DiT, bare state dicts); a value that contradicts
    the checkpoint's is refused. Default: DiT's (linear, epsilon, 1000 steps)."""
    noise_schedule: str = opt(None, "linear or cosine", str, choices=["linear", "cosine"])
    predict_v: bool = opt(None, "v-prediction (default epsilon)", bool)
    zero_terminal_snr: bool = opt(None, "zero-terminal-SNR betas", bool)
    diffusion_steps: int = opt(None, "training diffusion steps T", int)


@dataclass
class SamplerOptions:
    """Which sampler, over which timesteps."""
    sampler: str = opt("ddim", "a sampler of fpdm.sampling.SAMPLERS (--parallel SOLVER chooses ddim-parallel or "
                       "ddim-two-axis)", str, choices=list(SAMPLERS))
    num_sampling_steps: int = opt(50, "sampling steps")
    timestep_spacing: str = opt(TIMESTEP_SPACINGS[0], "which timesteps the sampler visits (diffusers' names): "
                                "trailing starts at T-1 with equal steps; linspace is the FPDM release's and DiT's "
                                "DDPM-250 (IDDPM's str(N) at the usual N, see docs/sampling.md); leading (starts at "
                                "T - T/N) is DiT/ADM's ddimN when N divides T", str,
                                choices=list(TIMESTEP_SPACINGS))
    eta: float = opt(0.0, "DDIM eta (DDIM samplers only)")
    clip_denoised: str = opt("auto", "clip predicted x0 to [-1, 1]: auto = only for pixel-space models (never for "
                             "latents)", str, choices=list(CLIP_CHOICES))
    seed: int = opt(0, "noise, labels and sampler noise derive from it")


@dataclass
class GuidanceOptions:
    """Classifier-free guidance."""
    cfg_scale: float = opt(1.0, "guidance scale (1: none)")
    guidance_interval: list = opt(None, "guide only at timesteps t in [LOW, HIGH] (of T = 1000; Kynkäänniemi et "
                                  "al. 2024), one branch elsewhere", float, nargs=2, metavar=("LOW", "HIGH"))
    guidance_schedule: str = opt("constant", "guidance scale constant, or linear from 1 at t = T to --cfg-scale at "
                                 "t = 0", str, choices=list(GUIDANCE_SCHEDULES))
    guidance_channels: int = opt(None, "guide only the first N channels (3 reproduces official DiT's numbers)", int)


@dataclass
class FixedPointOptions:
    """FPDM's compute dials (refused for a DiT)."""
    iterations: int = opt(None, "iterations per step (default: the model's depth - pre - post); the cap with "
                          "--adaptive-tol", int)
    budget_block_evals: int = opt(None, "total transformer-block evaluations per image over all steps (pre + "
                                  "iterations + post)", int)
    schedule: str = opt("flat", "how the iterations are spread over the steps: flat, more-noisy (more at the first, "
                        "noisiest steps), more-clean", str, choices=list(SCHEDULES))
    fp_allocation: str = opt("schedule", "spread the budget by --schedule; 'budget': decide each step's iterations "
                             "online from the residuals (allocation.BudgetAllocator, one sync per iteration); "
                             "'calibrated': the same with each step's residual weighted by its measured effect on the "
                             "samples (calibrate_step_weights on --calibration-samples noises)", str,
                             choices=["schedule", "budget", "calibrated"])
    calibration_samples: int = opt(20, "--fp-allocation calibrated: images of the calibration batch (seed + 1)")
    reuse: bool = opt(False, "start each step from the previous step's solution")
    fp_solver: str = opt("iterate", "how each step solves the layer: plain iteration, or Anderson mixing per image "
                         "(each evaluation is one iteration of the budget)", str, choices=["iterate", "anderson"])
    fp_history: int = opt(5, "--fp-solver anderson: iterates kept (m)")
    fp_damping: float = opt(1.0, "--fp-solver anderson: damping beta in (0, 1]")
    adaptive_tol: float = opt(None, "stop a step's iterations once the relative residual falls below this", float)


@dataclass
class ParallelOptions:
    """DEQ-DDIM: all DDIM steps solved at once as one fixed point (diffusion/parallel.py); sample.py only."""
    parallel: str = opt(None, "solve the DDIM chain in parallel with this solver (DDIM, clipping off, fixed FPDM "
                        "iterations); two-axis (FPDM): one fixed point over time and the layer of every step", str,
                        choices=list(PARALLEL_SOLVERS))
    inner_iterations: int = opt(None, "two-axis: layer iterations per timestep in each outer iteration (default 1)",
                                int)
    two_axis_outer: str = opt("anderson", "two-axis: the outer update of the chain", str,
                              choices=["anderson", "picard"])
    parallel_max_iter: int = opt(15, "anderson, picard, two-axis: at most this many parallel iterations")
    parallel_tol: float = opt(1e-3, "anderson, picard, two-axis: relative residual tolerance (release: 1e-3)")
    parallel_window: int = opt(None, "window: sliding-window size (default: all steps)", int)
    parallel_chunk_size: int = opt(None, "at most this many timesteps per network call (bounds memory; default: "
                                   "as many as keep a call within 1,024 rows, images doubled by guidance)", int)
    parallel_sync_every: int = opt(None, "read the device (stop, report, drop converged images, slide the window) "
                                   "every k iterations (default: 1 on CPU, 2 on GPU; same samples)", int)
    compare_sequential: bool = opt(False, "also run sequential DDIM on the same noise and report both")


@dataclass
class OutputOptions:
    """Labels, precision, where the samples go."""
    class_labels: str = opt(None, "comma-separated labels. sample.py: one image per label (default: cycle the "
                            "classes); sample_ddp.py: sample i gets label i mod their count (default: a random "
                            "label drawn from (seed, i))", str)
    precision: str = opt("fp32", "bf16: the denoiser's calls under bf16 autocast (FPDM's fixed-point state stays "
                         "float32; the sampler's math and the VAE decode run outside it); a folder of its own", str,
                         choices=list(PRECISIONS))
    tf32: bool = opt(True, "TensorFloat-32 matmuls and convolutions on CUDA (as DiT's sample scripts; --no-tf32: "
                     "full fp32); no effect on CPU")
    compile: bool = opt(False, "torch.compile each transformer block (regional: every step and iteration reuses "
                        "the graphs)")
    cuda_graphs: bool = opt(False, "CUDA: replay every network call from a CUDA graph (sequential samplers at small "
                            "batches: no launch overhead; same samples)")
    vae: str = opt(None, "local diffusers AutoencoderKL folder (latent models only)", str)
    out: str = opt(None, "output folder (default: samples/<readable name>-<settings hash>)", str)
    overwrite: bool = opt(False, "start over in an output folder of other settings (removes only what sampling "
                          "wrote there)")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (CUDA when visible)")


@dataclass
class GridOptions:
    """sample.py: one grid of images."""
    num_samples: int = opt(None, f"images to make (default {DEFAULT_NUM_SAMPLES}; with --class-labels one per "
                           "label)", int)


@dataclass
class FidOptions:
    """sample_ddp.py: N samples for FID, sharded over processes."""
    num_fid_samples: int = opt(1000, "samples to make (50,000 for FID-50K)")
    batch_size: int = opt(32, "images per batch (fixes the batches' contents)")
    png: bool = opt(True, "also write images/{i:06d}.png (in background threads); --no-png: only the batch files "
                    "and samples.npz (FID reads those), e.g. to spare 50k small files on a shared filesystem")


SHARED = {"checkpoint": CheckpointOptions, "diffusion": DiffusionOptions, "sampler": SamplerOptions,
          "guidance": GuidanceOptions, "fp": FixedPointOptions, "output": OutputOptions}
SCRIPT_GROUPS = {"sample": {**SHARED, "grid": GridOptions, "parallel": ParallelOptions},
                 "sample_ddp": {**SHARED, "fid": FidOptions}}
ALL_GROUPS = {**SCRIPT_GROUPS["sample"], **SCRIPT_GROUPS["sample_ddp"]}

# The paper's and DiT's settings by name; explicit flags override them. A preset's fields for a group the script
# lacks (num_fid_samples for sample.py) are left out with a note.
PRESETS = {
    # DiT's FID-50K (Peebles & Xie, Table 4: XL/2 at 2.27): 250 DDPM steps over IDDPM's even spacing, guidance 1.5
    # on the first 3 latent channels, as its sample_ddp.py.
    "dit-fid50k": dict(sampler="ddpm", num_sampling_steps=250, timestep_spacing="linspace", cfg_scale=1.5,
                       guidance_channels=3, num_fid_samples=50_000),
    # The FPDM paper's compute point: 20 DiT-XL/2 steps' worth of blocks (560 = 40 steps x (1 + 12 + 1)), spread
    # with more iterations at the noisy steps, solution reuse, DDIM as the release samples (its linspace spacing).
    "fpdm-fid50k-560": dict(sampler="ddim", num_sampling_steps=40, timestep_spacing="linspace",
                            budget_block_evals=560, schedule="more-noisy", reuse=True, cfg_scale=1.5,
                            num_fid_samples=50_000),
    # A quick look: DPM-Solver++(2M) in 20 steps.
    "preview": dict(sampler="dpmpp-2m", num_sampling_steps=20),
}


@dataclass
class SampleConfig:
    """The groups of one script (those it lacks are None)."""
    checkpoint: CheckpointOptions = field(default_factory=CheckpointOptions)
    diffusion: DiffusionOptions = field(default_factory=DiffusionOptions)
    sampler: SamplerOptions = field(default_factory=SamplerOptions)
    guidance: GuidanceOptions = field(default_factory=GuidanceOptions)
    fp: FixedPointOptions = field(default_factory=FixedPointOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    grid: GridOptions = None
    parallel: ParallelOptions = None
    fid: FidOptions = None
    preset: str = None
    from_preset: tuple = ()  # the settings the preset set and no flag overrode (cli.refuse_given drops them)

    def groups(self):
        return {name: getattr(self, name) for name in ALL_GROUPS if getattr(self, name) is not None}

    def flat(self):
        """Every setting under its flag's name (plain data): compute.json's record of the command."""
        return {f.name: getattr(group, f.name) for group in self.groups().values() for f in dataclasses.fields(group)}

    def given(self, name):
        """Whether setting `name` differs from its default (given as a flag or by the preset)."""
        group, f = FIELDS[name]
        value = getattr(getattr(self, group), name)
        return value != f.default

    def drop_preset_setting(self, name):
        """Back to its default: a setting only the preset gave, which the flags given make inapplicable."""
        group, f = FIELDS[name]
        setattr(getattr(self, group), name, f.default)
        print(f"note: preset {self.preset}: {name}={PRESETS[self.preset][name]} left out (it does not apply with "
              f"the flags given)")

    def parallel_sampler(self):
        """The parallel sampler the flags choose, or None (sample_ddp.py has no parallel group)."""
        if self.parallel is not None and self.parallel.parallel is not None:
            return PARALLEL_SOLVERS[self.parallel.parallel]
        return None


FIELDS = {f.name: (group, f) for group, kind in ALL_GROUPS.items() for f in dataclasses.fields(kind)}


def identity_fields(group):
    """The fields of `group` recorded in a folder's identity."""
    return [f.name for f in dataclasses.fields(ALL_GROUPS[group]) if f.name not in NOT_IN_IDENTITY]


def identity(cfg, applies):
    """The raw settings of a folder's identity: for every group of the script that `applies` (a dict group -> bool;
    absent means True), each of its fields not in NOT_IN_IDENTITY; a group that does not apply (FPDM's for a DiT,
    parallel for a sequential sampler) is None, its flags having been refused when given."""
    return {group: ({name: getattr(options, name) for name in identity_fields(group)} if applies.get(group, True)
                    else None)
            for group, options in cfg.groups().items() if identity_fields(group)}


def build_parser(script, description=None):
    """The flags of `script` ("sample" or "sample_ddp") generated from its groups, one argparse group each;
    booleans get --X/--no-X. Defaults stay None in the namespace, so that a preset can tell what was given."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start from a named setting (" + "; ".join(
                            f"{name}: {', '.join(f'{k}={v}' for k, v in values.items())}"
                            for name, values in PRESETS.items()) + "); explicit flags override it")
    for group, kind in SCRIPT_GROUPS[script].items():
        section = parser.add_argument_group(group, (kind.__doc__ or "").strip() or None)
        for f in dataclasses.fields(kind):
            flag, extra = "--" + f.name.replace("_", "-"), dict(f.metadata["argparse"])
            shown = "" if extra.get("required") or "default" in f.metadata["help"] else f" (default: {f.default})"
            if f.metadata["type"] is bool or isinstance(f.default, bool):
                section.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                     help=f.metadata["help"] + shown)
            else:
                section.add_argument(flag, type=f.metadata["type"] or type(f.default), default=None,
                                     help=f.metadata["help"] + shown, **extra)
    return parser


def parse_args(argv=None, script="sample", description=None):
    """SampleConfig from flags: defaults, then --preset, then the flags given."""
    args = vars(build_parser(script, description).parse_args(argv))
    return make(script, args.pop("preset"), **{k: v for k, v in args.items() if v is not None})


def make(script="sample", preset=None, **settings):
    """The SampleConfig of `script` from a preset and flat settings (flag names with underscores)."""
    groups = SCRIPT_GROUPS[script]
    values = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        skipped = [k for k in PRESETS[preset] if FIELDS[k][0] not in groups]
        if skipped:
            print(f"note: preset {preset}: {', '.join(skipped)} apply to sample_ddp.py; left out here")
        values.update({k: v for k, v in PRESETS[preset].items() if k not in skipped})
    values.update(settings)
    unknown = [k for k in values if k not in FIELDS or FIELDS[k][0] not in groups]
    if unknown:
        raise ValueError(f"{script}.py has no setting {', '.join(unknown)}")
    if values.get("guidance_interval") is not None:
        values["guidance_interval"] = list(values["guidance_interval"])
    made = {group: kind(**{k: v for k, v in values.items() if FIELDS[k][0] == group}) for group, kind in groups.items()}
    from_preset = tuple(k for k in PRESETS.get(preset, {}) if k in values and k not in settings)
    return SampleConfig(**made, preset=preset, from_preset=from_preset)

