"""Train DiT or FPDM with Stochastic Jacobian-Free Backprop, under accelerate, from a laptop CPU to many GPU nodes.

    python train.py --preset demo-mnist-fpdm                                                      # one process
    python train.py --data-path mnist --model DiT-S/2 --fixed-point --max-steps 1000
    accelerate launch --config_file aconfs/cpu_2proc.yaml train.py --data-path mnist ...          # two CPU processes
    accelerate launch --config_file aconfs/1node_8gpu_bf16.yaml train.py --preset fpdm-xl2-in256 --data-path latents/

The settings (fpdm/config.py: typed groups, presets, one validator per group) come from flags or from Python:
`train.main(configs.preset("demo-mnist-fpdm", max_steps=500))`. This file is the training loop, top to bottom;
what it calls (run folder, resume, checkpoints, data order, metrics, previews, FID) is fpdm/training.py.

N processes train as one: every random choice of an optimizer step — batch composition, each example's timestep,
noise, label dropout and augmentation (`ExampleDraws`), the S-JFB counts (`sjfb_counts`) — is a function of
(seed, step, position in the global batch) alone. One process, N processes and any --grad-accum-steps split take the
same optimizer steps (same losses and weights up to float summation order), and `--resume auto` continues an
interrupted run exactly (on another number of processes: up to float summation order). The whole configuration is
saved with each checkpoint as plain data.
"""

import copy
import logging
import os
import signal
import sys
from contextlib import ExitStack, nullcontext
from dataclasses import asdict

from fpdm import cpu_threads  # before torch: OpenMP reads its wait policy (OMP_WAIT_POLICY) when torch loads
import torch
from tqdm.auto import tqdm

from fpdm.checkpoints import set_rng_state
from fpdm.config import parse_args
from fpdm.diagnostics import TrainingDiagnostics
from fpdm.run_folders import (STEP_LOOP_TIMEOUT, STOP_SIGNALS, StopSignals, exit_with_error, exit_with_parent,
                               set_collective_timeout)
from fpdm.training import (BackgroundWork, EvaluationOutOfMemory, EvaluationStopped, Evaluator, ExampleDraws, Preview,
                           TrainingPreempted, build_model, check_data_flags, check_ranks_agree, check_resume_precision,
                           latent_decoder_path, load_latent_decoder, local_batch_size, log_layer_diagnostics,
                           make_accelerator, make_loader, make_optimizer, open_run, preempted, restore,
                           save_checkpoint, signal_name, sjfb_counts, start_run_folder, update_ema)

logger = logging.getLogger("train")


# ------------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------------

def main(cfg):
    """Train as `cfg` (a configs.TrainConfig) says; returns the run folder. On SIGTERM or SIGUSR1 (a scheduler's
    preemption) every process finishes its step, the step is checkpointed, and TrainingPreempted is raised."""
    with ExitStack() as cleanup:  # releases the run lock however the run ends, then restores the signal handlers
        # SIGTERM / SIGUSR1 from here on only note the signal: train_step shares it with every process, all stop after
        # the same step, and that step is checkpointed (then no preview, evaluation or diagnostics row for it).
        stop_signals = cleanup.enter_context(StopSignals())
        return _train(cfg.validate(), cleanup, stop_signals)


def _train(cfg, cleanup, stop_signals):
    from accelerate.utils import set_seed

    from diffusion import create_diffusion
    from fpdm import data
    o, r = cfg.optim, cfg.run
    dataset = data.build_dataset(cfg.data.data_path, image_size=cfg.data.image_size, skip_bad_images=
                                 cfg.data.skip_bad_images, unconditional=cfg.data.unconditional, scan=False)
    check_data_flags(cfg, dataset)
    vae_path = latent_decoder_path(cfg, dataset)
    run_dir, ckpt_path, ckpt = open_run(cfg)
    if "LOCAL_RANK" in os.environ:  # a worker of accelerate launch / torchrun: stop when the launcher dies
        exit_with_parent()
    accelerator, tracker = make_accelerator(cfg, run_dir)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    check_ranks_agree(cfg, ckpt_path, ckpt, accelerator, dataset)
    check_resume_precision(cfg, ckpt, accelerator)
    decoder = load_latent_decoder(vae_path, device, accelerator.is_main_process or bool(cfg.run.eval_every),
                                  dataset.meta.get("scaling_factor") if dataset.kind == "latents" else None)
    if hasattr(dataset, "scan"):  # image folders: every file decoded once before step 1 (one scan per node, cached)
        with accelerator.local_main_process_first():
            dataset.scan()
    local_batch = local_batch_size(cfg, world, device)
    threads = cpu_threads.configure(device, world)  # CPU runs: the free cores only (logged below)
    if device.type == "cuda":  # TensorFloat-32 matmuls and convolutions on Ampere and later (--no-tf32: full fp32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = o.tf32
    # The initial weights from one seed on every process: DDP's prepare gives every model rank 0's weights, but not
    # the EMA copied here, which each process keeps and samples its share of FID during training from.
    set_seed(o.seed * 1000)
    model, init_report = build_model(cfg, dataset, ckpt)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    set_seed(o.seed * 1000 + rank)  # everything after: per process
    diffusion = create_diffusion("", **asdict(cfg.diffusion), min_snr_gamma=o.min_snr_gamma).prepare(device)
    optimizer, scheduler = make_optimizer(cfg, model, device)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    if o.compile:  # after prepare (DDP keeps its overlap), block by block (any S-JFB counts reuse the graphs); the
        raw_model.compile_regions()  # EMA too: previews and FID during training sample with it
        ema.compile_regions()
    ema.to(device)
    step, saved_rng = 0, None
    if ckpt is not None:
        step = restore(ckpt, raw_model, ema, optimizer, scheduler, cfg, accelerator)
        saved_rng = ckpt["rng"][rank] if ckpt["world_size"] == world else None
    ckpt = None  # the checkpoint's tensors are in the model and optimizer now: nothing else holds the file's pages

    metrics = start_run_folder(cfg, run_dir, accelerator, cleanup, raw_model, dataset, step, local_batch, ckpt_path,
                               init_report, tracker)
    if threads and accelerator.is_main_process:
        logger.info("%s", threads)
    draws = ExampleDraws(cfg, dataset, diffusion.num_timesteps, raw_model.y_embedder.dropout_prob, device)
    loader = make_loader(cfg, dataset, local_batch, accelerator, step, cleanup)
    preview = Preview(cfg, dataset, ema, run_dir, device, decoder)
    evaluator = (Evaluator(cfg, dataset, ema, run_dir, accelerator, step, tracker, decoder, stop_signals)
                 if r.eval_every else None)
    background = BackgroundWork()  # plots drawn off the training path
    cleanup.push(background.exit)
    diagnostics = None
    if cfg.fp.fixed_point and r.fp_diagnostics and accelerator.is_main_process:
        diagnostics = TrainingDiagnostics(run_dir, dataset, diffusion, device, r.fp_power_iterations, step)
    if saved_rng is not None:
        set_rng_state(saved_rng)  # last, so that nothing above consumes the restored stream (previews, evaluation)

    # Due at the checkpoint this run resumes from, and not made there (a preempted run stops before them; a run that
    # died in one continues after its checkpoint, which comes first):
    if (r.sample_every and r.num_sample_images and step and step % r.sample_every == 0 and accelerator.is_main_process
            and not os.path.exists(preview.path(step))):
        logger.info("samples: %s", preview.write(step, accelerator if tracker else None))
    stop = 0
    if evaluator is not None and step and step % r.eval_every == 0 and not evaluator.has_row(step):
        stop = evaluate(evaluator, step, background)  # a stop signal during it: this run ends at its checkpoint
    if set_collective_timeout(STEP_LOOP_TIMEOUT):  # the start's long waits (scans, reference statistics) are over
        logger.info("collectives now time out after %s (a process that hangs ends the job)", STEP_LOOP_TIMEOUT)
    model.train()
    progress = tqdm(total=o.max_steps, initial=step, disable=not accelerator.is_main_process, desc="train",
                    dynamic_ncols=True)
    last_good = ckpt_path
    while step < o.max_steps and not stop:
        grad_norm, lr, stop = train_step(cfg, model, raw_model, diffusion, dataset, loader, optimizer, scheduler,
                                         accelerator, metrics, step, last_good, draws, stop_signals)
        step += 1
        stop = stop if step < o.max_steps else 0  # a signal during the last step: the run ends as finished
        update_ema(ema, raw_model, min(o.ema_decay, (1 + step) / (10 + step)) if o.ema_warmup else o.ema_decay)
        progress.update(1)
        if step % r.log_every == 0 or step == o.max_steps or stop:
            metrics.log(step, grad_norm, lr, accelerator, progress)
        if metrics.by_t and (step % r.fp_diagnostics_every == 0 or step == o.max_steps):
            residual_by_t = metrics.take_residual_by_t(accelerator)  # every process: a reduction
            if diagnostics is not None:  # the contraction estimate on the probe batch: here, never per step
                log_layer_diagnostics(diagnostics, step, raw_model, residual_by_t, accelerator, tracker, background)
        due_preview = r.sample_every and r.num_sample_images and step % r.sample_every == 0
        due_eval = evaluator is not None and step % r.eval_every == 0
        # The checkpoint first, at every evaluation's step too: an evaluation that fails (memory, a bad reference)
        # loses no training, and the resumed run makes it first.
        if stop or step % r.ckpt_every == 0 or step == o.max_steps or due_eval:
            last_good = save_checkpoint(cfg, run_dir, step, raw_model, ema, optimizer, scheduler, accelerator)
        if stop:  # now (a scheduler's grace period is short): its preview and evaluation, if due, are made by the
            break  # resumed run first (above)
        if due_preview or due_eval:
            with metrics.apart():
                if due_preview and accelerator.is_main_process:
                    logger.info("samples: %s", preview.write(step, accelerator if tracker else None))
                if due_eval:
                    stop = evaluate(evaluator, step, background)
            if stop:  # during the evaluation (it outlasts a grace period at scale): dropped, made by the resumed run
                break  # from this step's checkpoint
    progress.close()
    if stop:  # before the last barrier: no process exits before the main one has recorded it
        preemption = preempted(run_dir, stop, step, last_good, accelerator)
    elif accelerator.is_main_process and r.num_sample_images and not os.path.exists(preview.path(step)):
        logger.info("samples: %s", preview.write(step, accelerator if tracker else None))  # (a finished run has it)
    background.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if stop:
        raise preemption
    return run_dir


def evaluate(evaluator, step, background):
    """evaluator.run(step); returns 0, or the stop signal that ended it between two chunks (on every process)."""
    try:
        evaluator.run(step, background)
        return 0
    except EvaluationStopped as e:
        logger.info("the evaluation of step %d stopped by %s: the resumed run makes it", step,
                    signal_name(e.signum))
        return e.signum
    except EvaluationOutOfMemory:  # on every process at the same chunk: the run goes on (a resume would retry it)
        logger.warning("the evaluation of step %d ran out of device memory on a process and was skipped: lower "
                       "--eval-batch-size (now %d)", step, evaluator.cfg.run.eval_batch_size)
        return 0


def train_step(cfg, model, raw_model, diffusion, dataset, loader, optimizer, scheduler, accelerator, metrics, step,
               last_good, draws, stop_signals=None):
    """One optimizer step over `grad_accum_steps` micro-batches; returns (gradient norm, the rate it used, the stop
    signal: the largest signal number any process's `stop_signals` (a run_folders.StopSignals) received by the end of
    the step, the same on every process; 0: none)."""
    accum, device = cfg.optim.grad_accum_steps, accelerator.device
    nonfinite = torch.zeros((), device=device)  # non-finite micro-batch losses of this step (no sync to count)
    draws.draw(step)
    for micro in range(accum):
        x, y = next(loader)
        # This micro-batch's examples sit at these positions of the step's global batch (as StepBatchSampler's).
        mine = draws.select((micro * accelerator.num_processes + accelerator.process_index) * x.shape[0], x.shape[0])
        x, y = dataset.augment(x.to(device, non_blocking=True), mine["augment"]), y.to(device, non_blocking=True)
        kwargs = {"y": y}
        if mine["drop"] is not None:
            kwargs["force_drop_ids"] = mine["drop"]
        if cfg.fp.fixed_point:
            kwargs["num_iterations"] = sjfb_counts(cfg, step)
        t = mine["t"]
        with nullcontext() if micro == accum - 1 else accelerator.no_sync(model), accelerator.autocast():
            loss = diffusion.training_losses(model, x, t, model_kwargs=kwargs, noise=mine["noise"])["loss"].mean()
        accelerator.backward(loss / accum)
        nonfinite += ~torch.isfinite(loss.detach())
        stats = raw_model.last_stats if raw_model.fixed_point else None
        metrics.add(loss.detach() / accum, stats, t, raw_model.training_flops(stats and stats.sjfb) * len(t))
    # NaN guard, before anything reaches the optimizer: every micro-batch's loss on every process, and the
    # (all-reduced) gradient norm, checked with one host sync per step. All processes agree, nothing is saved,
    # and the weights, optimizer state and last good checkpoint stay as they were. The same all-reduce (max) and
    # read carry the stop signal (preemption): a signal reaches the processes at different steps, and all must stop
    # after the same one. (One small collective and one sync per step, as before; the flag is filled on the device.)
    if cfg.optim.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
    else:  # the norm alone: clipping to inf would still multiply every gradient by 1 (a pass over all of them)
        accelerator.unscale_gradients()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    # fp16's GradScaler: infinite gradients are its overflow signal, no error (it skips the step and lowers its
    # scale); a non-finite loss still is.
    bad_grad = ~torch.isfinite(torch.as_tensor(grad_norm).to(device)) if accelerator.scaler is None else 0
    local = torch.stack([nonfinite + bad_grad,
                         torch.full((), float(getattr(stop_signals, "received", 0)), device=device)])
    bad, stop = accelerator.reduce(local, reduction="max").tolist()
    if bad:
        raise NonFiniteLossError(f"non-finite loss or gradient at step {step + 1} ({int(nonfinite.item())} of {accum} "
                                 f"micro-batches on this process had a non-finite loss): stopping without saving; last "
                                 f"good checkpoint: {last_good or 'none'} (lower --lr, enable --max-grad-norm, or "
                                 f"check the data)")
    lr = scheduler.get_last_lr()[0]  # the rate this step uses (logged with it)
    optimizer.step()
    if accelerator.scaler is None or not optimizer.step_was_skipped:  # fp16: a skipped step leaves the rate too
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr, int(stop)


class NonFiniteLossError(RuntimeError):
    pass


if __name__ == "__main__":
    try:
        main(parse_args(description=__doc__))
    except (ValueError, OSError, NonFiniteLossError) as e:  # OSError: a full disk, a quota, a vanished folder too
        exit_with_error(e)
    except TrainingPreempted as e:  # checkpointed, lock released; the main process logged the line
        for sig in STOP_SIGNALS:  # a launcher's own SIGTERM now must not turn the exit code into 143
            signal.signal(sig, signal.SIG_IGN)
        sys.exit(e.exit_code)  # training.PREEMPTED_EXIT_CODE, on every process
