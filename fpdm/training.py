"""What train.py calls, so that train.py reads as the training loop: launching it in a fresh process (`launch`), the
draws of a step (`sjfb_counts`, `ExampleDraws`), the EMA, the run folder (open, lock, config.json, logging, trackers),
resume and checkpoints, preemption (`PREEMPTED_EXIT_CODE`, `TrainingPreempted`), the data order
(`StepBatchSampler`), the metrics window, previews, FID during training (`Evaluator`) and fixed-point diagnostics
rows."""

import contextlib
import csv
import errno
import json
import logging
import math
import os
import signal
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from fpdm import config as configs
from fpdm.checkpoints import (resume_checkpoint, rng_state, set_rng_state,
                              write_training_checkpoint)
from fpdm.diagnostics import BUCKETS, timestep_buckets
from fpdm.measure import peak_rss_bytes
from fpdm.run_folders import (COLLECTIVE_TIMEOUT, STOPPED_EXIT_CODE, RunLock, atomic_write, check_writable,
                               from_main_process, remove_stale_temporaries, sync_files, truncate_metrics)

logger = logging.getLogger("train")
TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")



# ------------------------------------------------------------------------------------------------------------------
# Launching train.py, the draws of a step, the EMA
# ------------------------------------------------------------------------------------------------------------------

def launch(cfg, quiet=False):
    """Run train.py on `cfg` in a fresh process (accelerate's state and the memory start clean; what the demo and the
    experiments use); `quiet` drops its stdout. Returns the run folder."""
    import subprocess
    cmd = [sys.executable, TRAIN_SCRIPT, *configs.to_argv(cfg)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)
    return os.path.join(cfg.run.results_dir, cfg.run.run_name)


def sjfb_counts(cfg, step):
    """The S-JFB counts (n iterations without a graph, m with one) of optimizer step `step` (0-based), shared by its
    micro-batches: a function of (seed, step) alone. Every process draws the same pair, so DDP never waits for a rank
    that drew more iterations; runs on any number of processes and any accumulation split draw the same sequence; a
    resume replays it. (The generator is keyed (seed, step, 0): runs without accumulation keep the counts they drew
    when each micro-batch had its own.)"""
    fp = cfg.fp
    rng = np.random.default_rng([cfg.optim.seed, step, 0])
    return (int(rng.integers(fp.fixed_point_no_grad_min_iters, fp.fixed_point_no_grad_max_iters + 1)),
            int(rng.integers(fp.fixed_point_with_grad_min_iters, fp.fixed_point_with_grad_max_iters + 1)))


class ExampleDraws:
    """Every random choice of an optimizer step for each example of its global batch — timestep, noise, label dropout
    (None when the model has none) and the dataset's augmentation draw (`augment_draw`: flips, the latent posterior
    sample) — drawn on the device from a generator seeded by (seed, step) alone. Each process takes the slice of the
    examples it holds (`select`), so 1 or N processes and any accumulation split train on the same numbers, and a
    run resumed at step s (on any number of processes) draws what the uninterrupted run drew."""

    def __init__(self, cfg, dataset, num_timesteps, label_dropout, device):
        self.seed, self.size, self.shape = cfg.optim.seed, cfg.optim.global_batch_size, tuple(dataset.image_shape)
        self.num_timesteps, self.label_dropout, self.augment_draw = num_timesteps, label_dropout, dataset.augment_draw
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)

    def draw(self, step):
        entropy = np.random.SeedSequence([self.seed, step]).generate_state(2, np.uint32)
        self.generator.manual_seed(int(entropy[0]) << 32 | int(entropy[1]))
        g, n, where = self.generator, self.size, {"device": self.device}
        self.drawn = {"t": torch.randint(0, self.num_timesteps, (n,), generator=g, **where),
                      "noise": torch.randn(n, *self.shape, generator=g, **where),
                      "drop": torch.rand(n, generator=g, **where) < self.label_dropout if self.label_dropout > 0
                      else None,
                      "augment": {None: lambda: None, "uniform": lambda: torch.rand(n, generator=g, **where),
                                  "normal": lambda: torch.randn(n, *self.shape, generator=g, **where)
                                  }[self.augment_draw]()}

    def select(self, start, size):
        """The draws of global-batch positions [start, start + size) of the current step."""
        return {k: None if v is None else v[start:start + size] for k, v in self.drawn.items()}


@torch.no_grad()
def update_ema(ema, model, decay):
    """ema <- ema + (1 - decay)(model - ema), all parameters in one foreach call (one kernel launch per group on a
    GPU instead of one per tensor; bit-identical to the per-tensor loop)."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1 - decay)


# ------------------------------------------------------------------------------------------------------------------
# Run folder, resume, checkpoints
# ------------------------------------------------------------------------------------------------------------------

def open_run(cfg):
    """(run folder, checkpoint path, checkpoint) for this configuration; refuses to mix two runs in one folder and a
    resume whose settings differ from the run's (configs.check_resume_settings)."""
    r = cfg.run
    run_name = r.run_name or (f"{cfg.net.model.replace('/', '-')}-{'fpdm' if cfg.fp.fixed_point else 'dit'}-"
                              f"{os.path.basename(os.path.normpath(cfg.data.data_path))}")
    run_dir = os.path.join(r.results_dir, run_name)
    check_writable(r.results_dir, "--results-dir")
    ckpt_path, ckpt = resume_checkpoint(r.resume, run_dir)
    if ckpt_path is None and os.path.isfile(os.path.join(run_dir, "latest.json")):
        raise FileExistsError(f"{run_dir} already holds checkpoints: pass --resume auto to continue it, or choose "
                              f"another --run-name")
    if ckpt_path is None and r.resume is None and any(
            os.path.exists(os.path.join(run_dir, f)) for f in ("config.json", "metrics.csv")):
        raise FileExistsError(f"{run_dir} holds a run that has not written a checkpoint yet: pass --resume auto to "
                              f"start it over, or choose another --run-name")
    if ckpt is not None:
        configs.check_resume_settings(ckpt["config"], cfg)
        if cfg.optim.max_steps < ckpt["step"]:
            raise ValueError(f"{ckpt_path} is at step {ckpt['step']}, beyond --max-steps {cfg.optim.max_steps}: raise "
                             f"--max-steps to continue the run")
    return run_dir, ckpt_path, ckpt


# Preemption. On SIGTERM or SIGUSR1 (run_folders.StopSignals) every process finishes its current step, the main
# process checkpoints that step and writes PREEMPTED_FILE, the run lock is released and every process exits with
# PREEMPTED_EXIT_CODE (run_folders.STOPPED_EXIT_CODE): a job requeued on it continues with `--resume auto` exactly
# where it stopped.
PREEMPTED_EXIT_CODE = STOPPED_EXIT_CODE
PREEMPTED_FILE = "preempted.json"  # in the run folder; removed when the run starts again
RUN_CSVS = ("metrics.csv", "eval.csv", "fp_diagnostics.csv")  # appended rows, synced before each checkpoint


OUT_OF_MEMORY = 1000  # in an evaluation's per-chunk check: above any signal number


class EvaluationOutOfMemory(Exception):
    """A process ran out of device memory in an evaluation (Evaluator): every process gives the evaluation up at the
    same chunk, and the run trains on without its row."""


class EvaluationStopped(Exception):
    """A stop signal ended an evaluation (Evaluator) between two chunks, on every process; `signum` is its number.
    The step's checkpoint comes first, so the resumed run makes the evaluation again."""

    def __init__(self, signum):
        super().__init__(f"evaluation stopped by {signal_name(signum)}")
        self.signum = signum


class TrainingPreempted(Exception):
    """train.main stopped on a stop signal after checkpointing `step`; `str()` is the line the main process logged.
    `python train.py` (each process of a launch) exits with PREEMPTED_EXIT_CODE."""

    def __init__(self, message, signal_name, step, checkpoint):
        super().__init__(message)
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_code = PREEMPTED_EXIT_CODE


def signal_name(number):
    try:
        return signal.Signals(int(number)).name
    except ValueError:
        return f"signal {int(number)}"


def preempted(run_dir, signum, step, checkpoint, accelerator):
    """After the checkpoint of the step a stop signal ended: the main process records it in PREEMPTED_FILE (for a
    launcher that does not pass exit codes on, e.g. accelerate launch / torchrun, which exit 1) and logs one line;
    returns the TrainingPreempted to raise on every process."""
    name, code = signal_name(signum), PREEMPTED_EXIT_CODE
    message = (f"preempted by {name} at step {step}: checkpoint {os.path.basename(checkpoint)} written; resume with "
               f"--resume auto (exit code {code})")
    if accelerator.is_main_process:
        record = {"signal": name, "step": step, "checkpoint": os.path.relpath(checkpoint, run_dir), "exit_code": code}
        atomic_write(os.path.join(run_dir, PREEMPTED_FILE), lambda f: json.dump(record, f))
        logger.info("%s", message)
    return TrainingPreempted(message, name, step, checkpoint)


def make_accelerator(cfg, run_dir):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
    # find_unused_parameters only when an S-JFB draw may have no with-grad iteration (see models.py). Gradients are
    # views into DDP's all-reduce buckets, not a second copy (2.7 GB per GPU at DiT-XL/2), and the only buffers (the
    # fixed positional embedding) are not re-sent from rank 0 at every forward.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.fp.fixed_point and
                                        cfg.fp.fixed_point_with_grad_min_iters == 0,
                                        gradient_as_bucket_view=True, broadcast_buffers=False)
    tracker = choose_tracker(cfg.run.tracker)
    # mixed_precision None: the accelerate launch config (or its --mixed_precision) decides; "no" without one.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.optim.mixed_precision,
                              kwargs_handlers=[ddp, InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
                              log_with=tracker, project_dir=run_dir)
    return accelerator, tracker


def local_batch_size(cfg, world, device):
    o = cfg.optim
    if o.global_batch_size % (world * o.grad_accum_steps):
        raise ValueError(f"--global-batch-size {o.global_batch_size} is not divisible by processes ({world}) x "
                         f"--grad-accum-steps ({o.grad_accum_steps})")
    return o.global_batch_size // (world * o.grad_accum_steps)


def make_optimizer(cfg, model, device):
    """AdamW (the fused kernel on GPUs: one launch for all parameters; the CPU keeps the reference implementation)
    and its linear warm-up."""
    o = cfg.optim
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else 1.0)
    return optimizer, scheduler


def make_loader(cfg, dataset, local_batch, accelerator, step, cleanup):
    """This process's batches from `step` on (StepBatchSampler), as an iterator; its workers ignore the stop signals
    and are shut down by `cleanup` however the run ends."""
    from fpdm.run_folders import ignore_stop_signals
    world, rank = accelerator.num_processes, accelerator.process_index
    sampler = StepBatchSampler(len(dataset), local_batch * world, rank, world, cfg.optim.seed,
                               start_micro_step=step * cfg.optim.grad_accum_steps)
    # The loader gets its own generator: creating its iterator must not advance the training RNG.
    loader = iter(torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                              pin_memory=accelerator.device.type == "cuda",
                                              generator=torch.Generator(),
                                              persistent_workers=cfg.data.num_workers > 0,
                                              worker_init_fn=ignore_stop_signals))
    cleanup.callback(close_loader, loader)
    return loader


def build_model(cfg, dataset, ckpt):
    """The network for `dataset` (random init, or --init-from weights on a fresh run); (model, init report)."""
    from models import DiT_models
    model = DiT_models[cfg.net.model](**configs.model_kwargs(cfg, dataset.image_shape, dataset.num_classes))
    if ckpt is not None:
        check_same_architecture(ckpt["model_config"], model.config)
    elif cfg.run.init_from:
        return model, initialise_from(model, cfg)
    return model, None


def restore(ckpt, raw_model, ema, optimizer, scheduler, cfg, accelerator):
    """Load a checkpoint's weights, EMA, optimizer, schedule and fp16 loss scale; returns its step."""
    raw_model.load_state_dict(ckpt["model"])
    ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["opt"])
    scheduler.load_state_dict(ckpt["sched"])
    if accelerator.scaler is not None and ckpt.get("scaler"):  # fp16: the scale it had found, not 65536 again
        accelerator.scaler.load_state_dict(ckpt["scaler"])
    # The optimizer state carries the old run's rates: apply this run's (equal unless --override changed them).
    lr, weight_decay = cfg.optim.lr, cfg.optim.weight_decay
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, rate in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = lr, weight_decay
        group["lr"] = lr * rate(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return ckpt["step"]


def check_ranks_agree(cfg, ckpt_path, ckpt, accelerator, dataset=None):
    """Every process must start from the same place: the same step, checkpoint, settings and data. A node that cannot
    see the results folder would start from step 0 while the others resume, and a node with another copy of the data
    (node-local disks: a stale extraction) would draw other batches; the ranks would drift apart silently."""
    if accelerator.num_processes == 1:
        return
    import hashlib
    from accelerate.utils import gather_object
    digest = lambda value: hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]  # noqa: E731
    settings = {k: v for k, v in cfg.flat().items() if k not in ("results_dir", "resume")}
    data = None if dataset is None else f"{len(dataset)} examples" + (
        f", meta.json {digest(dataset.meta)}" if isinstance(getattr(dataset, "meta", None), dict) else "")
    mine = (ckpt["step"] if ckpt is not None else 0, os.path.basename(ckpt_path) if ckpt_path else None,
            digest(settings), data)
    seen = gather_object([mine])
    if any(other != seen[0] for other in seen):
        ranks = "; ".join(f"rank {i}: step {s}, checkpoint {c or 'none'}, settings {h}" + (f", data {d}" if d else "")
                          for i, (s, c, h, d) in enumerate(seen) if i == 0 or (s, c, h, d) != seen[0])
        raise ValueError(f"the processes disagree on where the run stands ({ranks}): every node must see the same "
                         f"--results-dir (shared storage) and the same data, and get the same flags")


def check_resume_precision(cfg, ckpt, accelerator):
    """A resumed run keeps the precision it trained in, whichever way it was set (flag, preset or launch config)."""
    if ckpt is None:
        return
    saved = ckpt.get("mixed_precision_used") or ckpt["config"].get("mixed_precision") or "no"
    if accelerator.mixed_precision != saved and "mixed_precision" not in configs.overridden_keys(cfg):
        raise ValueError(f"this run trained with mixed precision {saved!r} but this launch gives "
                         f"{accelerator.mixed_precision!r} (flag, preset or the accelerate config): pass "
                         f"--mixed-precision {saved}, or --override mixed_precision={accelerator.mixed_precision} to "
                         f"change it on purpose")


def check_data_flags(cfg, dataset):
    """Refuse, in one line and before anything is written, data flags the data cannot use: --vae on pixel data (an
    image folder trains in pixel space: train.py encodes nothing; DiT's train.py encodes at every step, here
    extract_features.py does it once), --skip-bad-images on a latent folder (its images were read at extraction)."""
    if dataset.kind != "latents" and cfg.data.vae:
        raise ValueError(f"--vae {cfg.data.vae}: {cfg.data.data_path} is pixel data, trained in pixel space (nothing "
                         f"is encoded while training); to train on latents run extract_features.py --vae "
                         f"{cfg.data.vae} on it and pass its output folder as --data-path")
    if dataset.kind == "latents" and cfg.data.skip_bad_images:
        raise ValueError(f"--skip-bad-images: {cfg.data.data_path} holds latents, whose images were read at "
                         f"extraction (extract_features.py --skip-bad-images); drop the flag")


def latent_decoder_path(cfg, dataset):
    """The VAE that turns a latent run's samples into images for previews and FID (--vae, else the one the latent
    folder was extracted with); None for pixel data or when nothing is decoded. Refuses, in one line and before
    anything is written, a latent run that would preview or evaluate without one."""
    r = cfg.run
    if dataset.kind != "latents" or not (r.num_sample_images or r.eval_every):
        return None
    path = cfg.data.vae or dataset.meta.get("vae")
    uses = " and ".join(f for f, on in (("previews (--num-sample-images)", r.num_sample_images),
                                        ("--eval-every", r.eval_every)) if on)
    if not path:
        raise ValueError(f"{uses} on latents need the VAE that decodes them: pass --vae PATH (a local diffusers "
                         f"AutoencoderKL folder), or --num-sample-images 0 and no --eval-every")
    return os.path.expanduser(path)


def load_latent_decoder(path, device, needed, scaling_factor=None):
    """The VAE (in eval mode on `device`) on the processes that decode (`needed`), loaded once per process; a path
    that does not load stops the run in one line (vae.load), and so does a VAE whose scaling factor is not the
    latents' (`scaling_factor`, from their meta.json): its decoded previews and FID would be off."""
    if path is None or not needed:
        return None
    from fpdm import vae as vae_io
    vae = vae_io.load(path)
    if scaling_factor is not None and abs(vae_io.scaling_factor(vae) - scaling_factor) > 1e-6:
        raise ValueError(f"--vae {path} has scaling factor {vae_io.scaling_factor(vae)}, the latents were extracted "
                         f"with {scaling_factor}: pass the VAE they were extracted with (or one of its family)")
    return vae.to(device).eval().requires_grad_(False)


class BackgroundWork:
    """One worker thread for what need not hold up training (redrawing plots from their CSVs): `submit` queues a
    call, the next `submit` or `close` re-raises a failure of an earlier one."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor
        self.pool, self.pending = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plots"), []

    def submit(self, fn, *args):
        self._collect(wait=False)
        self.pending.append(self.pool.submit(fn, *args))

    def _collect(self, wait):
        done = [f for f in self.pending if wait or f.done()]
        self.pending = [f for f in self.pending if f not in done]
        for f in done:
            f.result()

    def close(self):
        self._collect(wait=True)

    def exit(self, exc_type, exc, tb):
        """close() as an ExitStack exit callback: while another error ends the run (a checkpoint that could not be
        written, say) a plot's failure is logged, not raised in its place."""
        try:
            self.close()
        except Exception as e:
            if exc_type is None:
                raise
            logger.warning("a background plot failed too: %s: %s", type(e).__name__, e)
        return False


def start_run_folder(cfg, run_dir, accelerator, cleanup, raw_model, dataset, step, local_batch, ckpt_path,
                     init_report, tracker):
    """Lock the folder (main process), remove a killed run's temporaries, drop metrics rows after `step`, write
    config.json, start logging and the tracker; returns the MetricsWindow."""
    lock, dropped, stale = None, 0, {}
    if accelerator.is_main_process:  # one writer per run folder, for the whole run
        lock = RunLock(run_dir).acquire()
        cleanup.callback(lock.release)
        # A kill mid-write leaves `*.tmp-PID` files that nothing else removes; a checkpoint's is as large as the
        # checkpoint (~11 GB at DiT-XL/2).
        for folder in (run_dir, os.path.join(run_dir, "checkpoints")):
            stale.update(remove_stale_temporaries(folder))
        # Rows logged after the checkpoint we continue from (or by a start that never checkpointed) are logged again.
        dropped = truncate_metrics(os.path.join(run_dir, "metrics.csv"), step)
        if os.path.exists(os.path.join(run_dir, PREEMPTED_FILE)):  # that preemption is over: this run continues it
            os.remove(os.path.join(run_dir, PREEMPTED_FILE))
    for sub in ("checkpoints", "samples"):
        os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
    accelerator.wait_for_everyone()
    metrics = MetricsWindow(os.path.join(run_dir, "metrics.csv"), cfg, accelerator, tracker)
    if not accelerator.is_main_process:
        return metrics
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S", force=True,
                        handlers=[TqdmHandler(), logging.FileHandler(os.path.join(run_dir, "log.txt"))])
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({"train": cfg.flat(), "model": raw_model.config, "mixed_precision_used": accelerator.mixed_precision,
                   "processes": accelerator.num_processes}, f, indent=2)
    logger.info("%s | %s, %s parameters | %d process(es) on %s, micro-batch %d x %d accumulation, mixed precision "
                "%s | %s", run_dir, "FPDM" if cfg.fp.fixed_point else "DiT", f"{raw_model.num_parameters():,}",
                accelerator.num_processes, accelerator.device.type, local_batch, cfg.optim.grad_accum_steps,
                accelerator.mixed_precision, dataset.describe())
    for condition, message in ((lock.previous_owner, f"took over the lock of {lock.previous_owner}, which did not "
                                                     f"exit cleanly"),
                               (lock.unlocked, f"this file system gives no lock ({lock.unlocked}): a second run on the "
                                               f"folder is stopped at its next checkpoint instead of at its start"),
                               (dropped, f"dropped {dropped} metrics.csv rows after step {step} (they are logged "
                                         f"again)"),
                               (stale, f"removed {len(stale)} temporary file(s) a killed run left "
                                       f"({', '.join(sorted(stale))}): {sum(stale.values()):,} bytes freed"),
                               (cfg.run.override, f"settings changed on purpose (--override): "
                                                  f"{', '.join(cfg.run.override)}"),
                               (ckpt_path, f"resumed from {ckpt_path} at step {step}"),
                               (init_report and not ckpt_path, f"initialised from {cfg.run.init_from}: {init_report}")):
        if condition:
            logger.info("%s", message)
    if tracker:  # wandb: project "fpdm" (WANDB_PROJECT overrides), the run's name, files under the run folder
        accelerator.init_trackers(os.environ.get("WANDB_PROJECT", "fpdm") if tracker == "wandb" else "tensorboard",
                                  config={k: v for k, v in cfg.flat().items() if isinstance(v, (int, float, str, bool))},
                                  init_kwargs={"wandb": {"dir": run_dir, "name": os.path.basename(run_dir),
                                                         "id": wandb_run_id(run_dir), "resume": "allow"}})
    return metrics


def save_checkpoint(cfg, run_dir, step, raw_model, ema, optimizer, scheduler, accelerator):
    """Every process's RNG state gathered, the main process writes; returns the checkpoint's path."""
    from accelerate.utils import gather_object
    states = gather_object([rng_state()])  # every process's RNG state, in rank order
    name = f"checkpoints/step_{step:07d}.pt"
    if accelerator.is_main_process:
        RunLock.check_held(run_dir)
        sync_files([os.path.join(run_dir, csv_name) for csv_name in RUN_CSVS])
        try:
            write_training_checkpoint(run_dir, step, {
                "model": raw_model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(),
                "sched": scheduler.state_dict(), "config": cfg.flat(), "model_config": raw_model.config,
                "world_size": accelerator.num_processes, "rng": states,
                "mixed_precision_used": accelerator.mixed_precision,
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None},
                cfg.run.keep_last, cfg.run.keep_every)
        except OSError as e:  # disk full, quota, read-only: atomic writes leave the previous checkpoint whole
            raise CheckpointWriteError(checkpoint_write_failure(run_dir, name, e)) from None
        logger.info("saved %s", name)
    accelerator.wait_for_everyone()
    return os.path.join(run_dir, name)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (one line: why, what survived, how to continue)."""


def checkpoint_write_failure(run_dir, name, error):
    """The line for a failed checkpoint write: the reason, the checkpoint latest.json still names, the remedy."""
    reason = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded", errno.EROFS: "read-only file system",
              errno.EFBIG: "file too large for the file system or `ulimit -f`"}.get(
        error.errno, error.strerror or type(error).__name__)
    latest = os.path.join(run_dir, "latest.json")
    try:
        with open(latest) as f:
            kept = f"{os.path.join(run_dir, json.load(f)['path'])} and latest.json are intact"
    except FileNotFoundError:
        kept = "no earlier checkpoint exists"
    except (OSError, ValueError, KeyError, TypeError) as e:  # a stale handle on shared storage, a damaged file
        kept = f"latest.json could not be read ({type(e).__name__}: {e}), so what it names is unchecked"
    return (f"cannot write {os.path.join(run_dir, name)} ({reason}); {kept} (the partial file was removed): free "
            f"space, then rerun with --resume auto to continue from there")


def check_same_architecture(saved, current):
    for key in sorted(set(saved) | set(current)):
        if key in ("use_gradient_checkpointing", "fixed_point_checkpoint_iterations") or key.endswith("_iters"):
            continue  # memory switches, and S-JFB ranges (training settings: check_resume_settings)
        if saved.get(key) != current.get(key):
            raise ValueError(f"cannot resume: the checkpoint was trained with {key}={saved.get(key)!r} but this run "
                             f"asks for {current.get(key)!r}; use the checkpoint's settings or a new --run-name")


def initialise_from(model, cfg):
    """Load --init-from weights: FPDM from a DiT (block mapping of checkpoints.init_fpdm_from_dit), DiT from DiT."""
    from fpdm.checkpoints import init_fpdm_from_dit, load_model
    from models import load_state_dict_checked
    source, info = load_model(cfg.run.init_from, model_name=cfg.net.model, trust_checkpoint=cfg.run.trust_checkpoint)
    if source.fixed_point:
        raise ValueError(f"--init-from {cfg.run.init_from} holds an FPDM; resume it with --resume or pass a DiT")
    if model.fixed_point:
        return init_fpdm_from_dit(model, source)
    load_state_dict_checked(model, source.state_dict())
    return {"format": info["format"], "weights": info["weights"]}


# ------------------------------------------------------------------------------------------------------------------
# Data order, metrics, previews
# ------------------------------------------------------------------------------------------------------------------

def close_loader(loader):
    """Stop a DataLoader iterator's worker processes now, however the run ends. They ignore the stop signals
    (run_folders.ignore_stop_signals), so a run that ended with an exception (a preemption, a NaN) must not leave them
    to multiprocessing's exit hook, which SIGTERMs its children and then waits for them."""
    shutdown = getattr(loader, "_shutdown_workers", None)  # multi-process iterators only; safe to call twice
    if shutdown is not None:
        shutdown()


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
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).tolist(), epoch  # once per epoch
        return self._perm[offset]

    def __iter__(self):
        step = self.start
        while True:
            lo = step * self.global_batch + self.rank * self.local_batch
            yield [self._index(p) for p in range(lo, lo + self.local_batch)]
            step += 1


class MetricsWindow:
    """The steps since the last log line: loss, S-JFB counts and fixed-point residuals summed on the device (no host
    sync per step), then one row for metrics.csv, the tracker and the log line. With --fp-diagnostics, also each
    example's final relative residual summed per timestep bucket (row 0) with the bucket's count (row 1) since the
    last diagnostics row, all processes' added up and read with one sync per diagnostics row (`take_residual_by_t`;
    fpdm/diagnostics.py). `tflops_per_gpu`: this process's model FLOPs (DiT.training_flops, S-JFB's counts as drawn)
    per second; `mfu` on a GPU of measure.PEAK_BF16_TFLOPS: that over its dense bf16 peak, whatever the precision."""

    FIELDS = ["step", "loss", "grad_norm", "lr", "steps_per_s", "images_per_s", "peak_mem_mb", "sjfb_no_grad",
              "sjfb_with_grad", "fp_residual", "tflops_per_gpu", "mfu"]

    def __init__(self, path, cfg, accelerator, tracker):
        from fpdm.measure import peak_tflops
        self.path, self.cfg, self.tracker = path, cfg, tracker
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device
        self.peak = peak_tflops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.by_t = cfg.fp.fixed_point and cfg.run.fp_diagnostics
        self.buckets = torch.arange(BUCKETS, device=self.device)
        self.residual_by_t = torch.zeros(2, BUCKETS, device=self.device)
        self.columns = self.FIELDS
        if self.is_main and os.path.exists(path):  # a resumed run's file keeps its columns (an older run's: fewer)
            with open(path, newline="") as f:
                self.columns = next(csv.reader(f), None) or self.FIELDS
        elif self.is_main:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)
        self.reset()

    def reset(self):
        self.loss, self.steps, self.start = torch.zeros((), device=self.device), 0, time.time()
        self.micro, self.sjfb, self.residual, self.flops = 0, [0, 0], 0.0, 0.0
        if self.device.type == "cuda":  # peak_mem_mb: this window's (a CPU run's is the process's peak RSS)
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def apart(self):
        """Work between steps (previews, evaluations) inside: its time and GPU memory stay out of the window's
        images/s and peak_mem_mb."""
        start = time.time()
        try:
            yield
        finally:
            self.start += time.time() - start
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)

    def take_residual_by_t(self, accelerator):
        """The mean final relative residual per timestep bucket since the last call, over all processes (NaN where
        no example fell); a collective call: every process makes it."""
        sums, counts = accelerator.reduce(self.residual_by_t, reduction="sum").tolist()
        self.residual_by_t = torch.zeros_like(self.residual_by_t)
        return [s / n if n else math.nan for s, n in zip(sums, counts)]

    def add(self, loss, stats=None, t=None, flops=0.0):
        """One micro-batch: its loss (already divided by the accumulation steps), the FPDM call's stats, the
        micro-batch's timesteps and its model FLOPs."""
        self.loss += loss
        self.micro += 1
        self.flops += flops
        self.steps = self.micro // self.cfg.optim.grad_accum_steps
        if stats is not None:
            self.sjfb = [self.sjfb[0] + stats.sjfb[0], self.sjfb[1] + stats.sjfb[1]]
            if stats.residual is not None:  # a tensor: no device sync on the hot path
                self.residual = self.residual + stats.residual
            if self.by_t and t is not None and stats.example_residuals is not None:
                # One-hot sums rather than index_add_: deterministic on every device, and no matmul (TF32).
                hit = (timestep_buckets(t, self.cfg.diffusion.diffusion_steps)[:, None] == self.buckets).float()
                self.residual_by_t += torch.stack(((hit * stats.example_residuals[:, None].float()).sum(0),
                                                   hit.sum(0)))

    def log(self, step, grad_norm, lr, accelerator, progress):
        elapsed, steps, micro = time.time() - self.start, max(self.steps, 1), max(self.micro, 1)
        # Loss and fixed-point residual averaged over all processes in one all-reduce, read in one sync.
        sums = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device).detach()
                            for v in (self.loss, self.residual)])
        loss, residual = accelerator.reduce(sums, reduction="mean").tolist()
        row = {"step": step, "loss": loss / steps,
               "grad_norm": float(grad_norm), "lr": lr, "steps_per_s": steps / elapsed,
               "images_per_s": steps * self.cfg.optim.global_batch_size / elapsed,
               "peak_mem_mb": peak_memory_bytes(self.device) / 2**20, "sjfb_no_grad": self.sjfb[0] / micro,
               "sjfb_with_grad": self.sjfb[1] / micro, "fp_residual": residual / micro,
               "tflops_per_gpu": self.flops / elapsed / 1e12}
        row["mfu"] = row["tflops_per_gpu"] / self.peak if self.peak else None
        if self.is_main:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow(["" if row.get(k) is None else row.get(k, "") for k in self.columns])
            progress.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
            fixed_point = (f"  S-JFB n {row['sjfb_no_grad']:.1f} m {row['sjfb_with_grad']:.1f}  residual "
                           f"{row['fp_residual']:.3g}" if self.cfg.fp.fixed_point else "")
            mfu = f"  MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
            logger.info("step %d  loss %.4f  grad %.3f  %.2f steps/s  %.0f img/s  %.1f TFLOP/s per GPU%s  mem %.0f "
                        "MB%s", step, row["loss"], row["grad_norm"], row["steps_per_s"], row["images_per_s"],
                        row["tflops_per_gpu"], mfu, row["peak_mem_mb"], fixed_point)
        if self.tracker:
            accelerator.log({k: row[k] for k in self.FIELDS if k != "step" and row[k] is not None}, step=step)
        self.reset()
        return row


def log_layer_diagnostics(diagnostics, step, raw_model, residual_by_t, accelerator, tracker, background):
    """A row of fixed-point diagnostics (fpdm/diagnostics.py, every --fp-diagnostics-every steps): a row of
    fp_diagnostics.csv, its plots (redrawn in the background, then sent to the tracker), a log line, the tracker's
    scalars. Main process only; the RNG and the model are left as they were."""
    start = time.time()
    row = diagnostics.write(step, raw_model, residual_by_t)
    background.submit(lambda: log_images(accelerator if tracker else None, step, {
        os.path.splitext(os.path.basename(path))[0]: path for path in diagnostics.plot()}))
    logger.info("step %d  fixed-point layer: contraction %.3f (probe mean %.3f, residual at z* %.2g), residual by t "
                "%s  (%.2f s)", step, row["contraction"], row["contraction_mean"], row["probe_residual"],
                " ".join(f"{v:.2g}" for v in residual_by_t or []), time.time() - start)
    if tracker:
        accelerator.log({k: v for k, v in row.items() if k != "step" and math.isfinite(v)}, step=step)


def to_pixels(samples, decoder):
    """Samples in model space -> images in [-1, 1]: latents decode through the run's VAE (`decoder`), pixel
    samples pass through."""
    if decoder is None:
        return samples
    from fpdm import vae as vae_io
    return vae_io.decode(samples.float(), decoder)


def log_images(accelerator, step, paths):
    """PNG files (plots, sample grids; {name: path}) to every tracker of `accelerator` (None: no tracker)."""
    if accelerator is None or not paths:
        return
    from PIL import Image
    images = {}
    for name, path in paths.items():
        with Image.open(path) as image:
            images[name] = np.asarray(image.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for name, array in images.items():
                tracker.writer.add_image(name, array, step, dataformats="HWC")
        else:
            tracker.log_images({name: [array] for name, array in images.items()}, step=step)


@contextlib.contextmanager
def seeded(seed):
    """Inside, every RNG (torch, CUDA, NumPy, Python) starts from `seed`; afterwards each is as before. Previews and
    evaluations draw inside (DDPM's step noise), so they do not depend on when they run, a resumed run gives the
    same, and the training RNG, with exact resume, is untouched."""
    from accelerate.utils import set_seed
    saved = rng_state()
    set_seed(seed % 2**32)  # NumPy's seeds are 32-bit
    try:
        yield
    finally:
        set_rng_state(saved)


class Preview:
    """EMA sample grids on fixed noise and labels (their own generator), any further draws (DDPM's) seeded by the
    step (`seeded`); latent samples decoded through the run's VAE."""

    def __init__(self, cfg, dataset, ema, run_dir, device, decoder=None):
        from fpdm.sampling import diffusion_for_sampling
        self.cfg, self.dataset, self.ema, self.run_dir, self.decoder = cfg, dataset, ema, run_dir, decoder
        n = cfg.run.num_sample_images
        g = torch.Generator().manual_seed(cfg.optim.seed)
        self.noise = torch.randn(n, *dataset.image_shape, generator=g).to(device)
        self.labels = (torch.arange(n) % dataset.num_classes).to(device)
        self.diffusion = diffusion_for_sampling(cfg.flat(), cfg.run.sample_steps)  # trailing spacing

    def path(self, step):
        return os.path.join(self.run_dir, "samples", f"step_{step:07d}.png")

    def write(self, step, accelerator=None):
        """The grid of `step` (also to the trackers of `accelerator`); returns its path."""
        from fpdm.sampling import sample_images, save_grid
        cfg_scale = self.cfg.run.sample_cfg_scale if self.ema.y_embedder.dropout_prob > 0 else 1.0
        with seeded(self.cfg.optim.seed * 1_000_003 + step):
            images, _ = sample_images(self.ema, self.diffusion, self.noise, self.labels, cfg_scale=cfg_scale,
                                      sampler=self.cfg.run.sample_sampler)
        images = to_pixels(images, self.decoder)
        classes = self.dataset.num_classes
        path = save_grid(images, self.path(step), nrow=classes if 1 < classes <= 16 else int(math.sqrt(len(images))))
        log_images(accelerator, step, {"samples": path})
        return path


class Evaluator:
    """FID during training (--eval-every N, --eval-samples K): the EMA model samples K images on fixed noise and
    labels (their own generator), sharded over the processes (process r takes samples r, r + world, ...), in chunks
    of --eval-batch-size per process (latents decoded there, through the run's VAE, in the VAE's own chunks), with
    the network calls in bf16 under a bf16 launch (as sample.py --precision bf16). On image data every process also
    computes its samples' Inception features, and only those (2048 numbers per image) are gathered; the bundled
    digits gather the samples themselves. The main process scores them — FID-MNIST and class accuracy on the digits,
    Inception FID against --eval-reference otherwise — and appends a row to eval.csv and the tracker. The Inception
    weights and the reference statistics load when the run starts (and their paths are checked before the run folder
    is made), so a wrong one fails before step 1, not at the first evaluation. Any draws of the sampler (DDPM's) are
    seeded by the step and the process (`seeded`)."""

    FIELDS = ["step", "metric", "value", "accuracy", "num_samples", "seconds"]

    def __init__(self, cfg, dataset, ema, run_dir, accelerator, step, tracker, decoder=None, stop_signals=None):
        from fpdm.sampling import diffusion_for_sampling
        self.cfg, self.dataset, self.ema, self.accelerator, self.tracker = cfg, dataset, ema, accelerator, tracker
        self.decoder = decoder
        self.stop_signals = stop_signals  # a run_folders.StopSignals: a stop signal ends an evaluation between chunks
        self.path = os.path.join(run_dir, "eval.csv")
        k, world, rank = cfg.run.eval_samples, accelerator.num_processes, accelerator.process_index
        g = torch.Generator().manual_seed(cfg.optim.seed + 1)
        noise = torch.randn(k, *dataset.image_shape, generator=g)
        labels = torch.arange(k) % dataset.num_classes
        self.labels = labels
        self.mine = torch.arange(rank, k, world)
        self.noise, self.my_labels = noise[self.mine].to(accelerator.device), labels[self.mine].to(accelerator.device)
        self.per_process = -(-k // world)
        self.diffusion = diffusion_for_sampling(cfg.flat(), cfg.run.eval_steps)
        self.precision = "bf16" if accelerator.mixed_precision == "bf16" else "fp32"
        self.mnist = cfg.data.data_path == "mnist"
        if not self.mnist:
            from fpdm import metrics
            weights = os.path.expanduser(cfg.run.eval_inception or metrics.DEFAULT_INCEPTION)
            self.inception = metrics.InceptionFeatures(weights=weights).to(accelerator.device)
            self.reference = None
            if accelerator.is_main_process:
                try:
                    self.reference = metrics.load_reference(cfg.run.eval_reference, self.inception,
                                                            need_features=False)
                except FileNotFoundError as e:
                    raise FileNotFoundError(f"--eval-reference: {e}") from None
        if accelerator.is_main_process:
            truncate_metrics(self.path, step)  # rows after the checkpoint a resumed run continues from
            if not os.path.exists(self.path):
                with open(self.path, "w", newline="") as f:
                    csv.writer(f).writerow(self.FIELDS)

    def has_row(self, step):
        """Whether eval.csv holds a row of `step` (read by the main process, the answer shared with every process,
        which all take part in an evaluation)."""
        def read():
            with open(self.path, newline="") as f:
                return any(int(row["step"]) == step for row in csv.DictReader(f))
        return from_main_process(self.accelerator, read)

    @torch.no_grad()
    def run(self, step, background=None):
        """Sample, gather and score, any draws (DDPM's) seeded by the step and process (`seeded`). eval.png is
        redrawn on `background` (a BackgroundWork) if given."""
        with seeded((self.cfg.optim.seed * 1_000_003 + step) * 1024 + self.accelerator.process_index + 1):
            return self._run(step, background)

    def _shares(self):
        """This process's share, --eval-batch-size at a time: the digits as images in [-1, 1], image data as
        Inception features (float64)."""
        from fpdm.sampling import sample_images, to_uint8
        cfg_scale = self.cfg.run.sample_cfg_scale if self.ema.y_embedder.dropout_prob > 0 else 1.0
        size = self.cfg.run.eval_batch_size
        out_of_memory = False
        for i in range(0, self.per_process + size, size):  # as many chunks on every process, then a last check
            self._check(out_of_memory, stop=i < self.per_process)  # finished: a stop signal is the loop's to act on
            if i >= len(self.noise) or out_of_memory:
                continue
            try:
                samples, _ = sample_images(self.ema, self.diffusion, self.noise[i:i + size],
                                           self.my_labels[i:i + size], cfg_scale=cfg_scale,
                                           sampler=self.cfg.run.sample_sampler, precision=self.precision)
                images = to_pixels(samples, self.decoder)
                if self.mnist:
                    yield images.float()
                else:
                    features = self.inception.features(to_uint8(images), progress=False)
                    yield torch.from_numpy(features).to(self.accelerator.device)
            except torch.OutOfMemoryError:  # told to every process at the next check
                out_of_memory = True
            if out_of_memory and torch.cuda.is_available():  # the failed chunk's memory, its exception gone
                samples = images = None
                torch.cuda.empty_cache()

    def _check(self, out_of_memory, stop=True):
        """One collective per chunk, made as often on every process: whether any ran out of memory
        (EvaluationOutOfMemory), and with `stop` the largest stop signal any process has received (an evaluation at
        ImageNet scale outlasts a scheduler's grace period, so it gives way at a chunk's end: EvaluationStopped)."""
        received = self.stop_signals.received if self.stop_signals is not None and stop else 0
        flag = torch.full((), float(received + OUT_OF_MEMORY * out_of_memory), device=self.accelerator.device)
        status = int(self.accelerator.reduce(flag, reduction="max").item())
        if status >= OUT_OF_MEMORY:
            raise EvaluationOutOfMemory()
        if status:
            raise EvaluationStopped(status)

    def _run(self, step, background=None):
        start = time.time()
        shares = list(self._shares())
        shape = self.dataset.image_shape if self.mnist else (2048,)
        padded = torch.zeros(self.per_process, *shape, device=self.accelerator.device,
                             dtype=torch.float32 if self.mnist else torch.float64)
        if shares:
            padded[:len(self.noise)] = torch.cat(shares)
        gathered = self.accelerator.gather(padded.contiguous())  # rank-major: rank r's j-th is sample r + j·world
        if not self.accelerator.is_main_process:
            return None
        world, k = self.accelerator.num_processes, self.cfg.run.eval_samples
        order = torch.tensor([r * self.per_process + j for i in range(k) for r, j in [(i % world, i // world)]])
        gathered = gathered[order.to(gathered.device)].cpu()
        metric, value, accuracy = self._score(gathered)
        row = {"step": step, "metric": metric, "value": value, "accuracy": accuracy, "num_samples": k,
               "seconds": time.time() - start}
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([row[name] for name in self.FIELDS])
        tracker = self.accelerator if self.tracker else None
        if background is None:
            log_images(tracker, step, {"eval": self.plot()})
        else:
            background.submit(lambda: log_images(tracker, step, {"eval": self.plot()}))
        logger.info("step %d  %s %.3f%s  (%d samples, %.0f s)", step, metric, value,
                    "" if accuracy is None else f"  accuracy {accuracy:.3f}", k, row["seconds"])
        if self.tracker:
            self.accelerator.log({f"eval/{metric}": value, **({} if accuracy is None else {"eval/accuracy": accuracy})},
                                 step=step)
        return row

    def plot(self):
        """eval.png beside eval.csv: the metric against training steps (rewritten after every evaluation); returns
        its path. matplotlib's object API without pyplot: safe on a thread of its own."""
        from matplotlib.figure import Figure
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        fig = Figure(figsize=(5, 3.4))
        ax = fig.subplots()
        ax.plot([int(r["step"]) for r in rows], [float(r["value"]) for r in rows], "o-")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{rows[-1]['metric']} of the EMA model ({rows[-1]['num_samples']} samples)")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = os.path.join(os.path.dirname(self.path), "eval.png")
        from fpdm.run_folders import atomic_write
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110), "wb")
        return path

    def _score(self, gathered):
        """(metric, value, accuracy) of all K samples: `gathered` holds the digits' images, or image data's
        Inception features."""
        from fpdm import metrics
        if self.mnist:
            result = metrics.evaluate_mnist(gathered, self.labels)
            return "fid_mnist", result["fid_mnist"], result["accuracy"]
        fid = metrics.frechet_distance(*metrics.feature_statistics(gathered.numpy()), self.reference.mu,
                                       self.reference.sigma)
        return "fid", fid, None


def peak_memory_bytes(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return peak_rss_bytes()


def wandb_run_id(run_dir):
    """One wandb run per run folder (a resume continues it): the folder's name and a hash of its absolute path."""
    import hashlib
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in os.path.basename(run_dir))[:40]
    return f"{name}-{hashlib.sha256(os.path.abspath(run_dir).encode()).hexdigest()[:8]}"


def _importable(module):
    """Whether `module` imports as a real package (a stray folder of that name imports as an empty namespace
    package, and find_spec accepts it: neither is the tracker)."""
    import importlib
    try:
        return getattr(importlib.import_module(module), "__file__", None) is not None
    except Exception:  # noqa: BLE001 (missing or broken: not usable either way)
        return False


def choose_tracker(name):
    """The accelerate tracker for --tracker: auto = wandb (offline unless WANDB_MODE says otherwise) if it imports,
    else tensorboard if it imports, else none. A tracker asked for by name that does not import stops the run."""
    if name == "auto":
        name = next((n for n in ("wandb", "tensorboard") if _importable(n)), "none")
    elif name != "none" and not _importable(name):
        raise ValueError(f"--tracker {name}: the {name} package does not import here; install it (pip install "
                         f"{name}) or pass --tracker none")
    if name == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
    return None if name == "none" else name


class TqdmHandler(logging.StreamHandler):
    """Log lines printed above the progress bar instead of through it."""

    def emit(self, record):
        tqdm.write(self.format(record), file=sys.stdout)
