"""Train DiT or FPDM with Stochastic Jacobian-Free Backprop, under accelerate, from a laptop CPU to many GPU nodes.

    python train.py --data-path mnist --model DiT-S/2 --fixed-point --max-steps 1000            # one process
    accelerate launch --config_file aconfs/cpu_2proc.yaml train.py --data-path mnist ...         # two CPU processes
    accelerate launch --config_file aconfs/1node_8gpu_bf16.yaml train.py --data-path latents/ ...

Every random choice (batch composition, t, noise, label dropout, flips, S-JFB counts) comes from torch's RNG or from
(seed, step), and checkpoints store every process's RNG state, so `--resume auto` continues an interrupted run
exactly. The whole configuration is saved with each checkpoint as plain data.
"""

import argparse
import copy
import csv
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from measure import peak_rss_bytes
from runs import RunLock, atomic_write, exit_with_parent, prune_checkpoints, truncate_metrics

CHECKPOINT_FORMAT = "fpdm-train-v1"
logger = logging.getLogger("train")


def opt(default, help, type=None):
    return field(default=default, metadata={"help": help, "type": type})


@dataclass
class TrainConfig:
    # Model (registry name, optionally resized for small experiments).
    model: str = opt("DiT-S/2", "registry name, e.g. DiT-XL/2")
    hidden_size: int = opt(None, "override the registry width", int)
    depth: int = opt(None, "override the registry depth (FPDM: sets the default sampling iterations)", int)
    num_heads: int = opt(None, "override the registry head count", int)
    patch_size: int = opt(None, "override the registry patch size", int)
    fixed_point: bool = opt(False, "train FPDM instead of DiT")
    fixed_point_pre_depth: int = opt(1, "FPDM blocks before the fixed-point layer")
    fixed_point_post_depth: int = opt(1, "FPDM blocks after the fixed-point layer")
    fixed_point_no_grad_min_iters: int = opt(0, "S-JFB: min iterations without a graph")
    fixed_point_no_grad_max_iters: int = opt(10, "S-JFB: max iterations without a graph")
    fixed_point_with_grad_min_iters: int = opt(1, "S-JFB: min iterations with a graph")
    fixed_point_with_grad_max_iters: int = opt(12, "S-JFB: max iterations with a graph")
    fixed_point_pre_post_timestep_conditioning: bool = opt(False, "condition pre/post blocks on t as well as y")
    learn_sigma: bool = opt(True, "learn the variance (hybrid loss)")
    class_dropout_prob: float = opt(0.1, "label dropout for classifier-free guidance (0 for unconditional)")
    # Data.
    data_path: str = opt("mnist", "'mnist' (bundled digits), an image folder, or an extract_features.py folder")
    image_size: int = opt(None, "image size (mnist: 28, 14, 7 or 32; folders: default 256)", int)
    unconditional: bool = opt(False, "one class, no label dropout")
    num_workers: int = opt(0, "data-loader worker processes")
    skip_bad_images: bool = opt(False, "image folders: train without unreadable files (counted in the log) instead "
                                "of stopping before step 1")
    # Diffusion.
    noise_schedule: str = opt("linear", "linear or cosine")
    predict_v: bool = opt(False, "v-prediction instead of epsilon")
    zero_terminal_snr: bool = opt(False, "rescale betas to zero terminal SNR (needs --predict-v)")
    min_snr_gamma: float = opt(None, "min-SNR-gamma loss weighting (e.g. 5)", float)
    diffusion_steps: int = opt(1000, "diffusion steps T")
    # Optimisation.
    max_steps: int = opt(400_000, "optimizer steps")
    global_batch_size: int = opt(256, "images per optimizer step over all processes and accumulation steps")
    grad_accum_steps: int = opt(1, "gradient accumulation steps")
    lr: float = opt(1e-4, "AdamW learning rate")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    warmup_steps: int = opt(0, "linear learning-rate warm-up steps")
    max_grad_norm: float = opt(0.0, "clip gradients to this norm (0: off)")
    ema_decay: float = opt(0.9999, "EMA decay")
    ema_warmup: bool = opt(False, "EMA decay min(decay, (1 + step) / (10 + step)): useful for short runs")
    mixed_precision: str = opt("no", "no, bf16 or fp16 (accelerate); a launch config may set it too")
    grad_ckpt: bool = opt(False, "gradient checkpointing of transformer blocks (DiT blocks, FPDM pre/post)")
    grad_ckpt_iterations: bool = opt(False, "gradient checkpointing of each with-grad fixed-point iteration")
    compile: bool = opt(False, "torch.compile the model")
    seed: int = opt(0, "global seed (each process uses seed + rank)")
    # Output.
    results_dir: str = opt("results", "parent folder of runs")
    run_name: str = opt(None, "run folder name (default: from model and data)", str)
    resume: str = opt(None, "'auto' (latest checkpoint of the run, if any), a checkpoint file, or a run folder", str)
    log_every: int = opt(50, "log metrics every N steps")
    ckpt_every: int = opt(5000, "checkpoint every N steps (and at the end)")
    keep_last: int = opt(3, "checkpoints to keep")
    sample_every: int = opt(0, "write an EMA sample grid every N steps (0: only at the end)")
    sample_steps: int = opt(50, "DDIM steps for sample grids")
    sample_cfg_scale: float = opt(2.0, "guidance scale for sample grids")
    num_sample_images: int = opt(40, "images in a sample grid")
    tracker: str = opt("auto", "auto (wandb offline if installed, else tensorboard), wandb, tensorboard, none")
    init_from: str = opt(None, "start from a pretrained DiT checkpoint (any format sample.py reads); an FPDM takes "
                         "its pre/post blocks from the first/last DiT blocks and its fixed-point block from the middle",
                         str)
    trust_checkpoint: bool = opt(False, "allow argparse.Namespace objects in --init-from DiT training checkpoints")
    override: list = field(default_factory=list, metadata={
        "help": "KEY=VALUE (repeatable): change a setting of a resumed run on purpose, e.g. --override lr=5e-5; "
                "applied and recorded (other differences from the run's settings are refused)", "type": None})


# Settings that define the network's weights and function: never changed on resume.
ARCHITECTURE = ("model", "hidden_size", "depth", "num_heads", "patch_size", "fixed_point", "fixed_point_pre_depth",
                "fixed_point_post_depth", "fixed_point_pre_post_timestep_conditioning", "learn_sigma",
                "class_dropout_prob", "image_size", "unconditional")
# Settings a resumed run may change freely: how long, how often it logs / checkpoints / previews, where it reads
# and writes, and memory-for-speed switches that leave the numbers alone. Any other difference needs --override.
RESUME_MAY_CHANGE = ("max_steps", "log_every", "ckpt_every", "keep_last", "sample_every", "sample_steps",
                     "sample_cfg_scale", "num_sample_images", "tracker", "num_workers", "resume", "results_dir",
                     "run_name", "compile", "grad_ckpt", "grad_ckpt_iterations", "trust_checkpoint", "init_from",
                     "override")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "override":
            parser.add_argument(flag, action="append", default=[], metavar="KEY=VALUE", help=f.metadata["help"])
        elif f.type is bool or isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=f.metadata["type"] or type(f.default), default=f.default,
                                help=f.metadata["help"] + f" (default: {f.default})")
    cfg = TrainConfig(**vars(parser.parse_args(argv)))
    apply_overrides(cfg)
    return cfg


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


def apply_overrides(cfg):
    """Set each --override KEY=VALUE on cfg (KEY with - or _), typed like its flag."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for item in cfg.override:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields or key == "override":
            raise ValueError(f"--override {item!r}: expected KEY=VALUE with KEY a train.py setting, e.g. lr=5e-5")
        if key in ARCHITECTURE:
            raise ValueError(f"--override {item!r}: the architecture of a run cannot change; start a new run")
        setattr(cfg, key, _parse_value(fields[key], text.strip()))


def overridden_keys(cfg):
    return {item.partition("=")[0].strip().replace("-", "_") for item in cfg.override}


def check_resume_settings(saved, cfg):
    """Refuse, in one line, a resume whose settings differ from the run's outside RESUME_MAY_CHANGE and --override;
    the architecture can never change."""
    current, allowed = dataclasses.asdict(cfg), set(RESUME_MAY_CHANGE) | overridden_keys(cfg)
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


def validate(cfg):
    """One clear line per problem, before anything is created or overwritten."""
    for name in ("no_grad", "with_grad"):
        lo = getattr(cfg, f"fixed_point_{name}_min_iters")
        hi = getattr(cfg, f"fixed_point_{name}_max_iters")
        if lo < 0 or hi < lo:
            raise ValueError(f"S-JFB {name.replace('_', '-')} range [{lo}, {hi}] is invalid: need 0 <= min <= max")
    if cfg.zero_terminal_snr and not cfg.predict_v:
        raise ValueError("--zero-terminal-snr needs --predict-v (epsilon is undefined at zero SNR)")
    if cfg.noise_schedule not in ("linear", "cosine"):
        raise ValueError(f"unknown --noise-schedule {cfg.noise_schedule!r}: use linear or cosine")
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise ValueError(f"unknown --mixed-precision {cfg.mixed_precision!r}: use no, bf16 or fp16")
    if cfg.tracker not in ("auto", "wandb", "tensorboard", "none"):
        raise ValueError(f"unknown --tracker {cfg.tracker!r}: use auto, wandb, tensorboard or none")
    for name in ("max_steps", "global_batch_size", "grad_accum_steps", "log_every", "ckpt_every", "keep_last",
                 "sample_steps", "diffusion_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("weight_decay", "warmup_steps", "max_grad_norm", "sample_every", "num_sample_images", "num_workers"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")
    if not 0 <= cfg.class_dropout_prob < 1:
        raise ValueError(f"--class-dropout-prob must lie in [0, 1), got {cfg.class_dropout_prob}")
    if not 0 <= cfg.ema_decay <= 1:
        raise ValueError(f"--ema-decay must lie in [0, 1], got {cfg.ema_decay}")
    if cfg.min_snr_gamma is not None and not cfg.min_snr_gamma > 0:
        raise ValueError(f"--min-snr-gamma must be > 0, got {cfg.min_snr_gamma}")


# ------------------------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------------------------

def model_config(cfg, dataset):
    """The models.DiT keyword arguments this training config implies (plain data)."""
    from models import DiT_models
    if cfg.model not in DiT_models:
        raise ValueError(f"unknown --model {cfg.model!r}; choose one of: {', '.join(DiT_models)}")
    _, height, width = dataset.image_shape
    kwargs = dict(input_size=height if height == width else [height, width],
                  in_channels=dataset.image_shape[0], num_classes=dataset.num_classes, learn_sigma=cfg.learn_sigma,
                  class_dropout_prob=0.0 if dataset.num_classes == 1 else cfg.class_dropout_prob,
                  use_gradient_checkpointing=cfg.grad_ckpt, fixed_point=cfg.fixed_point)
    for name in ("hidden_size", "depth", "num_heads", "patch_size"):
        if getattr(cfg, name) is not None:
            kwargs[name] = getattr(cfg, name)
    if cfg.fixed_point:
        for name in ("pre_depth", "post_depth", "no_grad_min_iters", "no_grad_max_iters", "with_grad_min_iters",
                     "with_grad_max_iters", "pre_post_timestep_conditioning"):
            kwargs[f"fixed_point_{name}"] = getattr(cfg, f"fixed_point_{name}")
        kwargs["fixed_point_checkpoint_iterations"] = cfg.grad_ckpt_iterations
    return kwargs


class StepBatchSampler:
    """This process's index lists for micro-steps start, start + 1, ... (forever).

    Micro-step s covers positions [s·G, (s+1)·G) of an endless stream of per-epoch permutations seeded by
    (seed, epoch); process r takes its slice of B = G / world. The global batch is thus the same for any number of
    processes, and resuming at step s needs no replay of the loader.
    """

    def __init__(self, dataset_size, global_micro_batch, rank, world_size, seed, start_micro_step):
        self.n, self.global_batch, self.rank = dataset_size, global_micro_batch, rank
        self.local_batch = global_micro_batch // world_size
        self.seed, self.start = seed, start_micro_step
        self._perm_epoch, self._perm = None, None

    def _index(self, position):
        epoch, offset = divmod(position, self.n)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return int(self._perm[offset])

    def __iter__(self):
        step = self.start
        while True:
            lo = step * self.global_batch + self.rank * self.local_batch
            yield [self._index(p) for p in range(lo, lo + self.local_batch)]
            step += 1


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def to_cpu(obj):
    """obj with every tensor inside (dicts, lists, tuples) moved to the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def atomic_torch_save(obj, path):
    """torch.save through runs.atomic_write: a crash mid-write leaves the old file intact."""
    atomic_write(path, lambda f: torch.save(obj, f), "wb")


def find_checkpoint(resume, run_dir):
    """Resolve --resume to a checkpoint path (or None for 'auto' with nothing to resume)."""
    if resume is None:
        return None
    folder = run_dir if resume == "auto" else resume
    if os.path.isfile(folder):
        return folder
    pointer = os.path.join(folder, "latest.json")
    if os.path.isfile(pointer):
        with open(pointer) as f:
            return os.path.join(folder, json.load(f)["path"])
    if resume == "auto":
        return None
    raise FileNotFoundError(f"--resume {resume}: no checkpoint file and no latest.json there")


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file gets the same advice)
        raise ValueError(f"cannot read checkpoint {path}: {e.__class__.__name__}: {e}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a train.py checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def check_same_architecture(saved, current):
    for key in sorted(set(saved) | set(current)):
        if key in ("use_gradient_checkpointing", "fixed_point_checkpoint_iterations") or key.endswith("_iters"):
            continue  # memory switches, and S-JFB ranges (training settings: check_resume_settings)
        if saved.get(key) != current.get(key):
            raise ValueError(f"cannot resume: the checkpoint was trained with {key}={saved.get(key)!r} but this run "
                             f"asks for {current.get(key)!r}; use the checkpoint's settings or a new --run-name")


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def choose_tracker(name):
    import importlib.util
    if name == "auto":
        name = ("wandb" if importlib.util.find_spec("wandb") else
                "tensorboard" if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
                else "none")
    if name == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    return None if name == "none" else name


def initialise_from(model, cfg):
    """Load --init-from weights: FPDM from a DiT (block mapping of checkpoints.init_fpdm_from_dit), DiT from DiT."""
    from checkpoints import init_fpdm_from_dit, load_model
    from models import load_state_dict_checked
    source, info = load_model(cfg.init_from, model_name=cfg.model, trust_checkpoint=cfg.trust_checkpoint)
    if source.fixed_point:
        raise ValueError(f"--init-from {cfg.init_from} holds an FPDM; resume it with --resume or pass a DiT")
    if model.fixed_point:
        return init_fpdm_from_dit(model, source)
    load_state_dict_checked(model, source.state_dict())
    return {"format": info["format"], "weights": info["weights"]}


class NonFiniteLossError(RuntimeError):
    pass


class TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stdout)


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------

def main(cfg):
    with ExitStack() as cleanup:  # releases the run lock however the run ends
        return _main(cfg, cleanup)


def _main(cfg, cleanup):
    validate(cfg)
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, gather_object

    import data
    from diffusion import create_diffusion
    from models import DiT_models
    from sampling import diffusion_for_sampling, sample_images, save_grid

    dataset = data.build_dataset(cfg.data_path, image_size=cfg.image_size, unconditional=cfg.unconditional,
                                 skip_bad_images=cfg.skip_bad_images, scan=False)
    kwargs = model_config(cfg, dataset)
    run_name = cfg.run_name or (f"{cfg.model.replace('/', '-')}-{'fpdm' if cfg.fixed_point else 'dit'}-"
                                f"{os.path.basename(os.path.normpath(cfg.data_path))}")
    run_dir = os.path.join(cfg.results_dir, run_name)
    ckpt_path = find_checkpoint(cfg.resume, run_dir)
    if ckpt_path is None and os.path.isfile(os.path.join(run_dir, "latest.json")):
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume auto to continue it, or choose "
                              f"another --run-name")
    if ckpt_path is None and cfg.resume is None and any(
            os.path.exists(os.path.join(run_dir, f)) for f in ("config.json", "metrics.csv")):
        raise FileExistsError(f"{run_dir} holds a run that has not written a checkpoint yet: pass --resume auto to "
                              f"start it over, or choose another --run-name")
    ckpt = load_checkpoint(ckpt_path) if ckpt_path else None
    if ckpt is not None:
        check_resume_settings(ckpt["config"], cfg)
        if cfg.max_steps < ckpt["step"]:
            raise ValueError(f"{ckpt_path} is at step {ckpt['step']}, beyond --max-steps {cfg.max_steps}: raise "
                             f"--max-steps to continue the run")
    if "LOCAL_RANK" in os.environ:  # a worker of accelerate launch / torchrun: stop when the launcher dies
        exit_with_parent()

    # find_unused_parameters only when an S-JFB draw may have no with-grad iteration (see models.py).
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.fixed_point and
                                        cfg.fixed_point_with_grad_min_iters == 0)
    tracker = choose_tracker(cfg.tracker)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision,
                              kwargs_handlers=[ddp], log_with=tracker, project_dir=run_dir)
    world, rank = accelerator.num_processes, accelerator.process_index
    if hasattr(dataset, "scan"):  # image folders: every file decoded once before step 1 (one scan per node, cached)
        with accelerator.local_main_process_first():
            dataset.scan()
    if cfg.global_batch_size % (world * cfg.grad_accum_steps):
        raise ValueError(f"--global-batch-size {cfg.global_batch_size} is not divisible by processes ({world}) x "
                         f"--grad-accum-steps ({cfg.grad_accum_steps})")
    local_batch = cfg.global_batch_size // (world * cfg.grad_accum_steps)
    device = accelerator.device
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # no oversubscription of CPU cores
    torch.manual_seed(cfg.seed * 1000 + rank)
    random.seed(cfg.seed * 1000 + rank)
    np.random.seed(cfg.seed * 1000 + rank)

    model = DiT_models[cfg.model](**kwargs)
    if ckpt is not None:
        check_same_architecture(ckpt["model_config"], model.config)
    elif cfg.init_from:
        init_report = initialise_from(model, cfg)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    diffusion = create_diffusion(timestep_respacing="", noise_schedule=cfg.noise_schedule,
                                 learn_sigma=cfg.learn_sigma, predict_v=cfg.predict_v,
                                 rescale_betas_zero_snr=cfg.zero_terminal_snr, min_snr_gamma=cfg.min_snr_gamma,
                                 diffusion_steps=cfg.diffusion_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0)
    if cfg.compile:
        model = torch.compile(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if hasattr(raw_model, "_orig_mod"):
        raw_model = raw_model._orig_mod
    ema.to(device)

    step = 0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["opt"])
        scheduler.load_state_dict(ckpt["sched"])
        step = ckpt["step"]
        # The optimizer state carries the old run's rates: apply this run's (equal unless --override changed them).
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
        for group, rate in zip(optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
            group["lr"] = cfg.lr * rate(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        if ckpt["world_size"] != world and accelerator.is_main_process:
            logger.warning("checkpoint was written by %d processes, this run has %d: RNG streams restart (the run "
                           "continues correctly but will not match an uninterrupted one)", ckpt["world_size"], world)

    lock = None
    if accelerator.is_main_process:  # one writer per run folder, for the whole run
        lock = RunLock(run_dir).acquire()
        cleanup.callback(lock.release)
        # Rows logged after the checkpoint we continue from (or by a start that never checkpointed) are logged again.
        dropped = truncate_metrics(os.path.join(run_dir, "metrics.csv"), step)
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    os.makedirs(os.path.join(run_dir, "samples"), exist_ok=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                            handlers=[TqdmHandler(),
                                      logging.FileHandler(os.path.join(run_dir, "log.txt"))], force=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"train": dataclasses.asdict(cfg), "model": raw_model.config}, f, indent=2)
        logger.info("%s | %s, %s parameters | %d process(es) on %s, micro-batch %d x %d accumulation | %s",
                    run_dir, "FPDM" if cfg.fixed_point else "DiT", f"{raw_model.num_parameters():,}", world,
                    device.type, local_batch, cfg.grad_accum_steps, dataset.describe())
        if lock.previous_owner:
            logger.info("took over the lock of %s, which did not exit cleanly", lock.previous_owner)
        if dropped:
            logger.info("dropped %d metrics.csv rows after step %d (they are logged again)", dropped, step)
        if cfg.override:
            logger.info("settings changed on purpose (--override): %s", ", ".join(cfg.override))
        if ckpt is not None:
            logger.info("resumed from %s at step %d", ckpt_path, step)
        elif cfg.init_from:
            logger.info("initialised from %s: %s", cfg.init_from, init_report)
    if tracker:
        accelerator.init_trackers("trackers", config={k: v for k, v in dataclasses.asdict(cfg).items()
                                                    if isinstance(v, (int, float, str, bool))})

    sampler = StepBatchSampler(len(dataset), local_batch * world, rank, world, cfg.seed,
                               start_micro_step=step * cfg.grad_accum_steps)
    # The loader gets its own generator: creating its iterator must not advance the training RNG.
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                                              pin_memory=device.type == "cuda", generator=torch.Generator(),
                                              persistent_workers=cfg.num_workers > 0))

    # Fixed preview noise and labels, drawn from their own generator so they do not disturb the training RNG.
    g = torch.Generator().manual_seed(cfg.seed)
    preview_noise = torch.randn(cfg.num_sample_images, *dataset.image_shape, generator=g).to(device)
    preview_labels = (torch.arange(cfg.num_sample_images) % dataset.num_classes).to(device)
    preview_diffusion = diffusion_for_sampling({**dataclasses.asdict(cfg)}, cfg.sample_steps)  # trailing spacing

    def write_samples(step):
        cfg_scale = cfg.sample_cfg_scale if raw_model.y_embedder.dropout_prob > 0 else 1.0
        images, _ = sample_images(ema, preview_diffusion, preview_noise, preview_labels, cfg_scale=cfg_scale)
        if dataset.kind == "latents":
            images = dataset.decode(images) if hasattr(dataset, "decode") else images[:, :3]
        path = os.path.join(run_dir, "samples", f"step_{step:07d}.png")
        nrow = dataset.num_classes if 1 < dataset.num_classes <= 16 else int(math.sqrt(len(images)))
        return save_grid(images, path, nrow=nrow)

    def save_checkpoint(step):
        states = gather_object([rng_state()])  # every process's RNG state, in rank order
        if accelerator.is_main_process:
            # CPU tensors: a checkpoint written on a GPU loads anywhere with plain torch.load (the optimizer state
            # returns to the parameters' device on resume).
            ckpt = {"format": CHECKPOINT_FORMAT, "step": step, "model": to_cpu(raw_model.state_dict()),
                    "ema": to_cpu(ema.state_dict()), "opt": to_cpu(optimizer.state_dict()),
                    "sched": scheduler.state_dict(),
                    "config": dataclasses.asdict(cfg), "model_config": raw_model.config, "world_size": world,
                    "rng": states}
            name = f"checkpoints/step_{step:07d}.pt"
            atomic_torch_save(ckpt, os.path.join(run_dir, name))
            atomic_write(os.path.join(run_dir, "latest.json"), lambda f: json.dump({"step": step, "path": name}, f))
            prune_checkpoints(os.path.join(run_dir, "checkpoints"), step, cfg.keep_last)  # never the one just written
            logger.info("saved %s", name)
        accelerator.wait_for_everyone()

    metrics_path = os.path.join(run_dir, "metrics.csv")
    csv_fields = ["step", "loss", "grad_norm", "lr", "steps_per_s", "images_per_s", "peak_mem_mb", "sjfb_no_grad",
                  "sjfb_with_grad", "fp_residual"]
    if accelerator.is_main_process and not os.path.exists(metrics_path):
        with open(metrics_path, "w", newline="") as f:
            csv.writer(f).writerow(csv_fields)

    if ckpt is not None and ckpt["world_size"] == world:
        set_rng_state(ckpt["rng"][rank])  # last, so that nothing above consumes the restored stream
    model.train()
    progress = tqdm(total=cfg.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train",
                    dynamic_ncols=True)
    window_loss, window_steps, window_start = torch.zeros((), device=device), 0, time.time()
    nonfinite = torch.zeros((), device=device)  # non-finite micro-batch losses of this step (no sync to count)
    sjfb_sum, residual_sum = [0, 0], 0.0
    last_good = ckpt_path
    while step < cfg.max_steps:
        for micro in range(cfg.grad_accum_steps):
            x, y = next(loader)
            x, y = dataset.augment(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=device)
            sync = micro == cfg.grad_accum_steps - 1
            with nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                loss = diffusion.training_losses(model, x, t, model_kwargs={"y": y})["loss"].mean()
            accelerator.backward(loss / cfg.grad_accum_steps)
            nonfinite += ~torch.isfinite(loss.detach())
            window_loss += loss.detach() / cfg.grad_accum_steps
            if cfg.fixed_point:
                stats = raw_model.last_stats
                sjfb_sum = [sjfb_sum[0] + stats.sjfb[0], sjfb_sum[1] + stats.sjfb[1]]
                if stats.residual is not None:  # a tensor: no device sync on the hot path
                    residual_sum = residual_sum + stats.residual
        # NaN guard, before anything reaches the optimizer: every micro-batch's loss on every process, and the
        # (all-reduced) gradient norm, checked with one host sync per step. All processes agree, nothing is saved,
        # and the weights, optimizer state and last good checkpoint stay as they were.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0
                                                else float("inf"))
        bad = accelerator.reduce(nonfinite, reduction="sum") + ~torch.isfinite(torch.as_tensor(grad_norm).to(device))
        if bad.item():
            raise NonFiniteLossError(f"non-finite loss or gradient at step {step + 1} ({int(nonfinite.item())} of "
                                     f"{cfg.grad_accum_steps} micro-batches on this process had a non-finite loss): "
                                     f"stopping without saving; last good checkpoint: {last_good or 'none'} (lower "
                                     f"--lr, enable --max-grad-norm, or check the data)")
        nonfinite.zero_()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses (logged with it)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), raw_model.parameters()):
                p_ema.lerp_(p.detach(), 1 - decay)
        window_steps += 1
        progress.update(1)

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            elapsed = time.time() - window_start
            row = {"step": step,
                   "loss": accelerator.reduce(window_loss, reduction="mean").item() / window_steps,
                   "grad_norm": float(grad_norm), "lr": lr,
                   "steps_per_s": window_steps / elapsed,
                   "images_per_s": window_steps * cfg.global_batch_size / elapsed,
                   "peak_mem_mb": peak_memory_bytes(device) / 2**20,
                   "sjfb_no_grad": sjfb_sum[0] / (window_steps * cfg.grad_accum_steps),
                   "sjfb_with_grad": sjfb_sum[1] / (window_steps * cfg.grad_accum_steps),
                   "fp_residual": float(residual_sum) / (window_steps * cfg.grad_accum_steps)}
            if accelerator.is_main_process:
                with open(metrics_path, "a", newline="") as f:
                    csv.writer(f).writerow([row[k] for k in csv_fields])
                progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                logger.info("step %d  loss %.4f  grad %.3f  %.2f steps/s  %.0f img/s  mem %.0f MB%s", step,
                            row["loss"], row["grad_norm"], row["steps_per_s"], row["images_per_s"],
                            row["peak_mem_mb"], f"  S-JFB n {row['sjfb_no_grad']:.1f} m {row['sjfb_with_grad']:.1f}"
                            f"  residual {row['fp_residual']:.3g}" if cfg.fixed_point else "")
            if tracker:
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
            window_loss.zero_()
            window_steps, window_start, sjfb_sum, residual_sum = 0, time.time(), [0, 0], 0.0

        if cfg.sample_every and cfg.num_sample_images and step % cfg.sample_every == 0 and accelerator.is_main_process:
            logger.info("samples: %s", write_samples(step))
        if step % cfg.ckpt_every == 0 or step == cfg.max_steps:
            save_checkpoint(step)
            last_good = os.path.join(run_dir, f"checkpoints/step_{step:07d}.pt")
    progress.close()

    final_grid = os.path.join(run_dir, "samples", f"step_{step:07d}.png")
    if accelerator.is_main_process and cfg.num_sample_images and not os.path.exists(final_grid):  # resumed: quick
        logger.info("samples: %s", write_samples(step))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return run_dir


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
