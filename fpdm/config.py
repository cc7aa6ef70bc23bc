"""The training configuration, typed: one dataclass per concern (network, fixed point, diffusion, data,
optimisation, run), each with its own validator; the command line generated from them; named presets.

    cfg = configs.preset("demo-mnist-fpdm", max_steps=500, run_name="quick")   # a preset plus overrides
    cfg = configs.parse_args(["--preset", "fpdm-xl2-in256", "--data-path", "latents/in256"])
    cfg.optim.lr, cfg.fp.fixed_point_with_grad_max_iters, cfg.diffusion.predict_v

Every setting has one name, shared by its flag (`--fixed-point-pre-depth`), the checkpoint and config.json: a
checkpoint stores the configuration flat (`cfg.flat()`, plain data; names are unique across groups), so checkpoints
written before the groups existed load and resume unchanged.
"""

import argparse
import dataclasses
import os
from dataclasses import dataclass, field

from diffusion import DIFFUSION_DEFAULTS


def opt(default, help, type=None):
    """A setting: its default, its help line, and its type where the default (None) does not tell."""
    return field(default=default, metadata={"help": help, "type": type})


@dataclass
class NetConfig:
    """The network: a registry name, optionally resized for small experiments."""
    model: str = opt("DiT-S/2", "registry name, e.g. DiT-XL/2")
    hidden_size: int = opt(None, "override the registry width", int)
    depth: int = opt(None, "override the registry depth (FPDM: sets the default sampling iterations)", int)
    num_heads: int = opt(None, "override the registry head count", int)
    patch_size: int = opt(None, "override the registry patch size", int)
    class_dropout_prob: float = opt(0.1, "label dropout for classifier-free guidance (0 for unconditional)")

    def validate(self):
        from models import DiT_models
        if self.model not in DiT_models:
            raise ValueError(f"unknown --model {self.model!r}; choose one of: {', '.join(DiT_models)}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"--class-dropout-prob must lie in [0, 1), got {self.class_dropout_prob}")


@dataclass
class FixedPointConfig:
    """FPDM's implicit layer and its Stochastic Jacobian-Free Backprop ranges (ignored by a DiT)."""
    fixed_point: bool = opt(False, "train FPDM instead of DiT")
    fixed_point_pre_depth: int = opt(1, "FPDM blocks before the fixed-point layer")
    fixed_point_post_depth: int = opt(1, "FPDM blocks after the fixed-point layer")
    fixed_point_no_grad_min_iters: int = opt(0, "S-JFB: min iterations without a graph")
    fixed_point_no_grad_max_iters: int = opt(10, "S-JFB: max iterations without a graph")
    fixed_point_with_grad_min_iters: int = opt(1, "S-JFB: min iterations with a graph")
    fixed_point_with_grad_max_iters: int = opt(12, "S-JFB: max iterations with a graph")
    fixed_point_pre_post_timestep_conditioning: bool = opt(False, "condition pre/post blocks on t as well as y")

    def validate(self):
        for name in ("no_grad", "with_grad"):
            lo = getattr(self, f"fixed_point_{name}_min_iters")
            hi = getattr(self, f"fixed_point_{name}_max_iters")
            if lo < 0 or hi < lo:
                raise ValueError(f"S-JFB {name.replace('_', '-')} range [{lo}, {hi}] is invalid: need 0 <= min <= max")
        if self.fixed_point_pre_depth < 0 or self.fixed_point_post_depth < 0:
            raise ValueError("--fixed-point-pre-depth and --fixed-point-post-depth must be >= 0")


@dataclass
class DiffusionConfig:
    """What defines a model's diffusion: recorded with checkpoints, exports and samples (diffusion.DIFFUSION_DEFAULTS
    lists the same names with DiT's values) and passed whole to `diffusion.create_diffusion`."""
    noise_schedule: str = opt(DIFFUSION_DEFAULTS["noise_schedule"], "linear or cosine")
    learn_sigma: bool = opt(DIFFUSION_DEFAULTS["learn_sigma"], "learn the variance (hybrid loss)")
    predict_v: bool = opt(DIFFUSION_DEFAULTS["predict_v"], "v-prediction instead of epsilon")
    zero_terminal_snr: bool = opt(DIFFUSION_DEFAULTS["zero_terminal_snr"], "rescale betas to zero terminal SNR "
                                  "(needs --predict-v)")
    diffusion_steps: int = opt(DIFFUSION_DEFAULTS["diffusion_steps"], "diffusion steps T")

    def validate(self):
        if self.noise_schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown --noise-schedule {self.noise_schedule!r}: use linear or cosine")
        if self.zero_terminal_snr and not self.predict_v:
            raise ValueError("--zero-terminal-snr needs --predict-v (epsilon is undefined at zero SNR)")
        if self.diffusion_steps < 1:
            raise ValueError("--diffusion-steps must be >= 1")


@dataclass
class DataConfig:
    """The training data: the bundled digits, an image folder or VAE latents (and the VAE that decodes them)."""
    data_path: str = opt("mnist", "'mnist' (bundled digits), an image folder, or an extract_features.py folder")
    image_size: int = opt(None, "image size (mnist: 28, 14, 7 or 32; folders: default 256)", int)
    unconditional: bool = opt(False, "one class, no label dropout")
    num_workers: int = opt(0, "data-loader worker processes")
    skip_bad_images: bool = opt(False, "image folders: train without unreadable files (counted in the log) instead "
                                "of stopping before step 1")
    vae: str = opt(None, "latents: the diffusers AutoencoderKL (local folder or hub id) that decodes samples for "
                   "previews and --eval-every (default: the one recorded in the latent folder's meta.json)", str)

    def validate(self):
        if self.num_workers < 0:
            raise ValueError("--num-workers must be >= 0")


@dataclass
class OptimConfig:
    """Optimisation: steps, batch, AdamW, loss weighting, EMA, precision and memory switches, the seed."""
    max_steps: int = opt(400_000, "optimizer steps")
    global_batch_size: int = opt(256, "images per optimizer step over all processes and accumulation steps")
    grad_accum_steps: int = opt(1, "gradient accumulation steps")
    lr: float = opt(1e-4, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    max_grad_norm: float = opt(0.0, "clip gradients to this norm (0: off)")
    min_snr_gamma: float = opt(None, "min-SNR-gamma loss weighting (e.g. 5)", float)
    ema_decay: float = opt(0.9999, "EMA decay")
    ema_warmup: bool = opt(False, "EMA decay min(decay, (1 + step) / (10 + step)): useful for short runs")
    mixed_precision: str = opt(None, "no, bf16 or fp16 (default: what the accelerate launch config says, else no); "
                               "the precision used is logged and recorded in config.json and checkpoints", str)
    grad_ckpt: bool = opt(False, "gradient checkpointing of transformer blocks (DiT blocks, FPDM pre/post)")
    grad_ckpt_iterations: bool = opt(False, "gradient checkpointing of each with-grad fixed-point iteration")
    compile: bool = opt(False, "torch.compile each transformer block (regional: one graph for any S-JFB counts)")
    tf32: bool = opt(True, "TensorFloat-32 matmuls on GPUs from Ampere on (no effect on CPU)")
    seed: int = opt(0, "global seed: the data order, each example's t, noise, label dropout and augmentation, and "
                    "the S-JFB counts are functions of (seed, step), the same for any number of processes")

    def validate(self):
        for name in ("max_steps", "global_batch_size", "grad_accum_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        for name in ("weight_decay", "warmup_steps", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if not 0 <= self.ema_decay <= 1:
            raise ValueError(f"--ema-decay must lie in [0, 1], got {self.ema_decay}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"--min-snr-gamma must be > 0, got {self.min_snr_gamma}")
        if self.mixed_precision not in (None, "no", "bf16", "fp16"):
            raise ValueError(f"unknown --mixed-precision {self.mixed_precision!r}: use no, bf16 or fp16")


@dataclass
class RunConfig:
    """Where the run lives and what it writes: folder, resume, logging, checkpoints, previews, tracker."""
    results_dir: str = opt("results", "parent folder of runs")
    run_name: str = opt(None, "run folder name (default: from model and data)", str)
    resume: str = opt(None, "'auto' (latest checkpoint of the run, if any), a checkpoint file, or a run folder", str)
    log_every: int = opt(50, "log metrics every N steps")
    ckpt_every: int = opt(5000, "checkpoint every N steps (and before each evaluation, and at the end)")
    keep_last: int = opt(3, "checkpoints to keep")
    keep_every: int = opt(0, "also keep every checkpoint whose step is a multiple of N (milestones for FID and "
                          "sampling; not counted in --keep-last; 0: none)")
    sample_every: int = opt(0, "write an EMA sample grid every N steps (0: only at the end)")
    sample_steps: int = opt(50, "sampling steps for sample grids")
    sample_sampler: str = opt("ddim", "sampler for sample grids (sampling.SAMPLERS, e.g. ddim, dpmpp-2m, unipc)")
    sample_cfg_scale: float = opt(2.0, "guidance scale for sample grids")
    num_sample_images: int = opt(40, "images in a sample grid")
    tracker: str = opt("auto", "auto (wandb offline if installed, else tensorboard), wandb, tensorboard, none")
    fp_diagnostics: bool = opt(True, "FPDM: every --fp-diagnostics-every steps, the fixed-point layer's relative "
                               "residual per timestep bucket (training forwards) and its contraction, the spectral "
                               "radius of df/dz at z* on a fixed probe batch, into fp_diagnostics.csv and two PNGs "
                               "(ignored by a DiT)")
    fp_diagnostics_every: int = opt(2000, "FPDM: steps between rows of fixed-point diagnostics (the contraction "
                                    "estimate stalls every process for about a second at XL/2; also at the last step)")
    fp_power_iterations: int = opt(20, "power-iteration steps (JVPs) of the contraction estimate")
    eval_every: int = opt(0, "FID of the EMA model every N steps, into eval.csv and the tracker (0: off)")
    eval_samples: int = opt(1000, "samples per FID evaluation (fixed noise and labels, sharded over processes)")
    eval_steps: int = opt(20, "sampling steps of the FID evaluations (--sample-sampler, --sample-cfg-scale)")
    eval_batch_size: int = opt(256, "images each process samples at once in FID evaluations (guidance doubles the "
                               "network's batch); memory only, the samples do not depend on it")
    eval_reference: str = opt(None, "image data: the FID reference (an ADM batch, an evaluate.py stats file or "
                              "images); the bundled digits use FID-MNIST against the real digits", str)
    eval_inception: str = opt(None, "image data: the FID Inception weights file (default: evaluate.py's)", str)
    init_from: str = opt(None, "start from a pretrained DiT checkpoint (any format sample.py reads); an FPDM takes "
                         "its pre/post blocks from the first/last DiT blocks and its fixed-point block from the middle",
                         str)
    trust_checkpoint: bool = opt(False, "allow argparse.Namespace objects in --init-from DiT training checkpoints")
    override: list = field(default_factory=list, metadata={
        "help": "KEY=VALUE (repeatable): change a setting of a resumed run on purpose, e.g. --override lr=5e-5; "
                "applied and recorded (other differences from the run's settings are refused)", "type": None})

    def validate(self):
        for name in ("log_every", "ckpt_every", "keep_last", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.fp_diagnostics_every < 1:
            raise ValueError(f"--fp-diagnostics-every must be >= 1, got {self.fp_diagnostics_every}")
        if self.fp_power_iterations < 2:
            raise ValueError(f"--fp-power-iterations must be >= 2, got {self.fp_power_iterations}")
        for name in ("sample_every", "num_sample_images", "eval_every", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if self.eval_samples < 1 or self.eval_steps < 1 or self.eval_batch_size < 1:
            raise ValueError("--eval-samples, --eval-steps and --eval-batch-size must be >= 1")
        if self.tracker not in ("auto", "wandb", "tensorboard", "none"):
            raise ValueError(f"unknown --tracker {self.tracker!r}: use auto, wandb, tensorboard or none")
        from fpdm.sampling import SAMPLERS
        sequential = [name for name, fn in SAMPLERS.items() if not fn.capabilities.parallel]  # previews, FID
        if self.sample_sampler not in sequential:
            raise ValueError(f"unknown --sample-sampler {self.sample_sampler!r}; choose one of: {', '.join(sequential)}")


@dataclass
class TrainConfig:
    net: NetConfig = field(default_factory=NetConfig)
    fp: FixedPointConfig = field(default_factory=FixedPointConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def validate(self):
        """One clear line for the first problem, before anything is created or overwritten (and, under a launcher,
        before the process group starts: WORLD_SIZE is the launch's number of processes)."""
        for group in GROUPS:
            getattr(self, group).validate()
        world, o = int(os.environ.get("WORLD_SIZE", "1")), self.optim
        if o.global_batch_size % (world * o.grad_accum_steps):
            raise ValueError(f"--global-batch-size {o.global_batch_size} is not divisible by processes ({world}) x "
                             f"--grad-accum-steps ({o.grad_accum_steps}): use a multiple of {world * o.grad_accum_steps}")
        if self.run.eval_every and self.data.data_path != "mnist":
            if not self.run.eval_reference:
                raise ValueError("--eval-every on image data needs --eval-reference (an ADM reference batch, an "
                                 "evaluate.py stats file or images) and the Inception weights (--eval-inception)")
            from fpdm.metrics import DEFAULT_INCEPTION  # paths checked here, before the run folder exists
            reference = os.path.expanduser(self.run.eval_reference)
            inception = os.path.expanduser(self.run.eval_inception or DEFAULT_INCEPTION)
            if not os.path.exists(reference):
                raise FileNotFoundError(f"--eval-reference {reference}: no such file or folder")
            if not os.path.isfile(inception):
                raise FileNotFoundError(f"--eval-inception {inception}: no such file (pytorch-fid's FID Inception-v3 "
                                        f"weights, pt_inception-2015-12-05-6726825d.pth)")
        return self

    def flat(self):
        """Every setting under its own name (plain data): what checkpoints and config.json store."""
        return {f.name: getattr(getattr(self, group), f.name) for group in GROUPS for f in _fields(group)}

    @classmethod
    def from_flat(cls, settings):
        """The inverse of `flat`; unknown names are an error."""
        unknown = sorted(set(settings) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; valid: {', '.join(FIELDS)}")
        return cls(**{group: GROUP_TYPES[group](**{f.name: settings[f.name] for f in _fields(group)
                                                   if f.name in settings}) for group in GROUPS})

    def replace(self, **settings):
        """A copy with the named settings changed (flat names, e.g. lr=5e-5, fixed_point=True)."""
        return TrainConfig.from_flat({**self.flat(), **settings})


GROUP_TYPES = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}
GROUPS = tuple(GROUP_TYPES)


def _fields(group):
    return dataclasses.fields(GROUP_TYPES[group])


FIELDS = {f.name: f for group in GROUPS for f in _fields(group)}  # flat name -> dataclass field

# Settings that define the network's weights and function: never changed on resume.
ARCHITECTURE = ("model", "hidden_size", "depth", "num_heads", "patch_size", "fixed_point", "fixed_point_pre_depth",
                "fixed_point_post_depth", "fixed_point_pre_post_timestep_conditioning", "learn_sigma",
                "class_dropout_prob", "image_size", "unconditional")
# Settings a resumed run may change freely: how long, how often it logs / checkpoints / previews, where it reads
# and writes, and memory-for-speed switches that leave the numbers alone. Any other difference needs --override.
RESUME_MAY_CHANGE = ("max_steps", "log_every", "fp_diagnostics", "fp_diagnostics_every", "fp_power_iterations",
                     "ckpt_every", "keep_last", "keep_every", "vae", "grad_accum_steps", "sample_every",
                     "sample_steps", "sample_sampler", "sample_cfg_scale", "eval_every", "eval_samples", "eval_steps",
                     "eval_batch_size", "eval_reference", "eval_inception", "num_sample_images", "tracker",
                     "num_workers", "resume", "results_dir", "run_name", "compile", "grad_ckpt",
                     "grad_ckpt_iterations", "trust_checkpoint", "init_from", "override")

# ------------------------------------------------------------------------------------------------------------------
# Presets: the README's and the paper's recipes, each a readable difference from the defaults above
# ------------------------------------------------------------------------------------------------------------------

PRESETS = {
    # `make demo` (and experiments/ with max_steps=2500): 14x14 digits, width 128, 1 pre + FP block + 1 post, S-JFB
    # 3 no-grad + 2 with-grad iterations, v-prediction with the cosine schedule, lr 1e-3 with warm-up, EMA warm-up,
    # and a training-time FID-MNIST curve (which leaves the training itself unchanged).
    "demo-mnist-fpdm": dict(data_path="mnist", image_size=14, model="DiT-S/2", hidden_size=128, num_heads=4, depth=8,
                            patch_size=2, fixed_point=True, fixed_point_no_grad_min_iters=3,
                            fixed_point_no_grad_max_iters=3, fixed_point_with_grad_min_iters=2,
                            fixed_point_with_grad_max_iters=2, learn_sigma=False, predict_v=True,
                            noise_schedule="cosine", lr=1e-3, warmup_steps=100, global_batch_size=64, ema_warmup=True,
                            log_every=250, ckpt_every=500, num_sample_images=40, tracker="none", max_steps=1500,
                            fp_diagnostics_every=250, eval_every=250, eval_samples=200, eval_steps=10),  # FID-MNIST curve: ~6 s per point
    # The same network as a DiT of equal depth (experiments/fpdm_vs_dit.py).
    "demo-mnist-dit": dict(data_path="mnist", image_size=14, model="DiT-S/2", hidden_size=128, num_heads=4, depth=8,
                           patch_size=2, learn_sigma=False, predict_v=True, noise_schedule="cosine", lr=1e-3,
                           warmup_steps=100, global_batch_size=64, ema_warmup=True, log_every=250, ckpt_every=500,
                           num_sample_images=40, tracker="none", max_steps=1500),
    # DiT's ImageNet-256 recipe on extract_features.py latents: XL/2, AdamW 1e-4, batch 256, EMA 0.9999, 400k steps;
    # plus bf16 autocast (DiT trains in fp32 with TF32: --mixed-precision no).
    "dit-xl2-in256": dict(model="DiT-XL/2", image_size=256, global_batch_size=256, lr=1e-4, max_steps=400_000,
                          ckpt_every=5_000, keep_every=50_000, log_every=100, mixed_precision="bf16", num_workers=4),
    # The FPDM release's: XL/2 with 1 pre + 1 post block, S-JFB n ~ U{0..10}, m ~ U{1..12}, batch 512, bf16,
    # gradient checkpointing of DiT blocks and pre/post blocks (spec section 3).
    "fpdm-xl2-in256": dict(model="DiT-XL/2", image_size=256, fixed_point=True, fixed_point_pre_depth=1,
                           fixed_point_post_depth=1, fixed_point_no_grad_min_iters=0, fixed_point_no_grad_max_iters=10,
                           fixed_point_with_grad_min_iters=1, fixed_point_with_grad_max_iters=12,
                           global_batch_size=512, lr=1e-4, max_steps=400_000, ckpt_every=5_000, keep_every=50_000,
                           log_every=100, mixed_precision="bf16", grad_ckpt=True, num_workers=4),
}


def preset(name, **settings):
    """The TrainConfig of preset `name` with flat `settings` on top (e.g. max_steps=2500, run_name="x")."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return TrainConfig().replace(**{**PRESETS[name], **settings})


# ------------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------------

def build_parser(description=None):
    """Flags generated from the groups (one per setting, `--no-X` for booleans), plus --preset."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="start from a named recipe (configs.PRESETS); explicit flags override it")
    for group in GROUPS:
        section = parser.add_argument_group(group, (GROUP_TYPES[group].__doc__ or "").strip() or None)
        for f in _fields(group):
            flag = "--" + f.name.replace("_", "-")
            if f.name == "override":
                section.add_argument(flag, action="append", default=[], metavar="KEY=VALUE", help=f.metadata["help"])
            else:  # the default shown once: a help text that names its own keeps it
                shown = "" if "default" in f.metadata["help"] else f" (default: {f.default})"
                if f.type is bool or isinstance(f.default, bool):
                    section.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                                         help=f.metadata["help"] + shown)
                else:
                    section.add_argument(flag, type=f.metadata["type"] or type(f.default), default=None,
                                         help=f.metadata["help"] + shown)
    return parser


def parse_args(argv=None, description=None):
    """TrainConfig from flags: defaults, then --preset, then the flags given; --override applied last."""
    args = vars(build_parser(description).parse_args(argv))
    name = args.pop("preset")
    given = {k: v for k, v in args.items() if v is not None and v != []}
    cfg = preset(name, **given) if name else TrainConfig().replace(**given)
    apply_overrides(cfg)
    return cfg


def to_argv(cfg):
    """Flags that `parse_args` turns back into `cfg`: every setting that differs from the defaults (for running
    train.py in a fresh process from Python)."""
    defaults, argv = TrainConfig().flat(), []
    for name, value in cfg.flat().items():
        if value == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        if name == "override":
            argv += [part for item in value for part in (flag, item)]
        elif isinstance(value, bool):
            argv.append(flag if value else f"--no-{flag[2:]}")
        elif value is None:
            raise ValueError(f"{name}=None differs from its default and has no flag")
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def _parse_value(f, text):
    if f.type is bool or isinstance(f.default, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"--override {f.name}={text}: use true or false")
        return text.lower() in ("true", "1")
    if text.lower() == "none" and f.default is None:
        return None
    kind = f.metadata["type"] or type(f.default)
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"--override {f.name}={text}: not a valid {kind.__name__}") from None


def _group_of(name):
    return next(group for group in GROUPS if any(f.name == name for f in _fields(group)))


def apply_overrides(cfg):
    """Set each --override KEY=VALUE on cfg (KEY with - or _), typed like its flag."""
    for item in cfg.run.override:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in FIELDS or key == "override":
            raise ValueError(f"--override {item!r}: expected KEY=VALUE with KEY a train.py setting, e.g. lr=5e-5")
        if key in ARCHITECTURE:
            raise ValueError(f"--override {item!r}: the architecture of a run cannot change; start a new run")
        setattr(getattr(cfg, _group_of(key)), key, _parse_value(FIELDS[key], text.strip()))


def overridden_keys(cfg):
    return {item.partition("=")[0].strip().replace("-", "_") for item in cfg.run.override}


def check_resume_settings(saved, cfg):
    """Refuse, in one line, a resume whose settings differ from the run's (`saved`: a checkpoint's flat config)
    outside RESUME_MAY_CHANGE and --override; the architecture can never change."""
    current, allowed = cfg.flat(), set(RESUME_MAY_CHANGE) | overridden_keys(cfg)
    if current["mixed_precision"] is None:  # the launch decides: train.check_resume_precision compares what it gives
        allowed.add("mixed_precision")
    differ = [key for key in current if key not in allowed and key in saved and saved[key] != current[key]]
    fixed = [key for key in differ if key in ARCHITECTURE]
    if fixed:
        listed = ", ".join(f"--{k.replace('_', '-')} {current[k]!r} (run: {saved[k]!r})" for k in fixed)
        raise ValueError(f"cannot resume: the architecture of a run cannot change: {listed}; use the run's settings, "
                         f"or a new --run-name (with --init-from to start from its weights)")
    if differ:
        listed = ", ".join(f"--{k.replace('_', '-')} {current[k]!r} (run: {saved[k]!r})" for k in differ)
        fix = " ".join(f"--override {k}={current[k]}" for k in differ)
        raise ValueError(f"resuming with settings that differ from the run's: {listed}; pass the run's values, or "
                         f"{fix} to change them on purpose")


def model_kwargs(cfg, image_shape, num_classes):
    """The models.DiT keyword arguments this configuration implies for data of `image_shape` (C, H, W)."""
    _, height, width = image_shape
    kwargs = dict(input_size=height if height == width else [height, width], in_channels=image_shape[0],
                  num_classes=num_classes, learn_sigma=cfg.diffusion.learn_sigma,
                  class_dropout_prob=0.0 if num_classes == 1 else cfg.net.class_dropout_prob,
                  use_gradient_checkpointing=cfg.optim.grad_ckpt, fixed_point=cfg.fp.fixed_point)
    for name in ("hidden_size", "depth", "num_heads", "patch_size"):
        if getattr(cfg.net, name) is not None:
            kwargs[name] = getattr(cfg.net, name)
    if cfg.fp.fixed_point:
        kwargs.update({f.name: getattr(cfg.fp, f.name) for f in _fields("fp") if f.name != "fixed_point"})
        kwargs["fixed_point_checkpoint_iterations"] = cfg.optim.grad_ckpt_iterations
    return kwargs
