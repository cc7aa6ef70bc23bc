"""Sample N images for FID with several processes (accelerate or torchrun), resumably.

    accelerate launch --num_processes 8 sample_ddp.py --ckpt CKPT --vae VAE --preset dit-fid50k --precision bf16
    python sample_ddp.py --ckpt CKPT --num-fid-samples 1000 --budget-block-evals 560 --reuse   # one process

Sample i's noise and label derive from (seed, i) alone (--class-labels: label i mod their count), and batches are
fixed blocks of consecutive indices whose RNG is seeded by (seed, batch), so the images do not depend on the number of
processes. The folder holds one configuration: `args.json` (every setting that changes the samples, N and the batch
size included) is written first and a rerun with other settings is refused (sample.py's rules). Each finished batch is
committed as one file, `batches/{b:06d}.npz` (images and labels together, written atomically); a killed run, restarted
on any number of processes, deals the batches still missing to them in turn; on SIGTERM or SIGUSR1 (a scheduler's
preemption) each process finishes and commits the batch in flight, writes `preempted.json` and exits with code 3
(`accelerate launch` itself exits 1: a requeue script checks the file, and `failed.json`, which a process that failed
writes; docs/sampling.md). Background threads write each image as `images/{i:06d}.png` for viewing while the next
batch samples (--no-png: none; the batch files are the record). At the end the main process writes the PNGs still
missing, exactly N samples as an ADM-format `samples.npz` (`arr_0`: uint8 N×H×W×3, `labels`: N) and `compute.json`.
All sampling flags are sample.py's (--precision, --tf32 included).
"""

import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from fpdm import cpu_threads  # before torch: OpenMP reads its wait policy (OMP_WAIT_POLICY) when torch loads
import numpy as np
import torch

from fpdm import cli, sample_config
from fpdm.run_folders import (COLLECTIVE_TIMEOUT, LOCK_FILE, STOPPED_EXIT_CODE, RunLock, StopSignals, atomic_write,
                               check_writable, from_main_process, remove_stale_temporaries)
from fpdm.sampling import FAILED_FILE, PREEMPTED_FILE, claim_output_folder, resolve_device, to_uint8


class SamplingStopped(Exception):
    """SIGTERM or SIGUSR1 (a scheduler's preemption): the batch in flight was finished and committed."""


def parse_args(argv=None):
    return sample_config.parse_args(argv, "sample_ddp", __doc__)


SEED_BLOCK = 1_000_003  # seeds per --seed: sample i's noise counts up from the block's start, batch b's steps down


def sample_noise_and_label(seed, index, shape, num_classes, labels=None):
    """Noise and label of global sample `index`: a function of (seed, index) only. The label is drawn at random, or
    with `labels` (--class-labels) the (index mod their count)-th of them; the noise is the same either way."""
    g = torch.Generator().manual_seed(seed * SEED_BLOCK + index)
    noise = torch.randn(*shape, generator=g)
    label = int(torch.randint(0, num_classes, (), generator=g)) if labels is None else labels[index % len(labels)]
    return noise, label


def check_seed_block(seed, num_samples, num_batches):
    """Refuse what would make two samples (or a sample and a batch's step noise) share a generator seed: torch's CPU
    generator keeps only the low 32 bits of a seed, so seed blocks beyond 2^32 wrap onto other seeds' blocks."""
    top = 2 ** 32 // SEED_BLOCK - 1
    if not 0 <= seed <= top:
        raise ValueError(f"--seed {seed}: sample_ddp.py takes seeds 0 to {top} (each seed's samples draw from a block of "
                         f"{SEED_BLOCK:,} generator seeds, and torch keeps 32 bits of a seed: a larger one would "
                         f"repeat another seed's noise)")
    if num_samples + num_batches > SEED_BLOCK:
        raise ValueError(f"--num-fid-samples {num_samples:,} in {num_batches:,} batches: at most {SEED_BLOCK:,} "
                         f"samples and batches together per seed; split the run over several --seed values")


def step_noise_seed(seed, b):
    """The seed of batch `b`'s DDPM step noise: counted down from the end of the block whose start sample 0's
    noise uses, so that no step noise repeats a sample's starting noise (up to a million samples and batches
    together; torch's CPU generator keeps only 32 bits of a seed, so an offset above them would change nothing)."""
    return seed * SEED_BLOCK + SEED_BLOCK - 1 - b


def mean_compute(stats):
    """Compute per image over the batches this run sampled, all processes' ([(images, GuidedModel.compute())]):
    block evaluations and FLOPs per image and the iterations of each step, averaged over images (with --adaptive-tol
    each batch stops on its own), the most guided passes; `compute_images` says how many images they cover (those of
    batches an earlier run committed are not measured again)."""
    if not stats:
        return {"compute_images": 0}
    n = sum(count for count, _ in stats)

    def mean(values):
        values = list(values)
        return values[0] if len(set(values)) == 1 else sum(c * v for (c, _), v in zip(stats, values)) / n
    steps = len(stats[0][1]["iterations_per_step"])
    return {"compute_images": n, "cfg_passes": max(s["cfg_passes"] for _, s in stats),
            "block_evals": mean(s["block_evals"] for _, s in stats),
            "flops_per_image": mean(s["flops_per_image"] for _, s in stats),
            "iterations_per_step": [mean(s["iterations_per_step"][i] for _, s in stats) for i in range(steps)]}


def batch_path(batch_dir, b):
    return os.path.join(batch_dir, f"{b:06d}.npz")


def commit_batch(batch_dir, b, images, indices, labels):
    """Images and labels of batch `b` in one atomically written file: a batch is either wholly done or not at all."""
    atomic_write(batch_path(batch_dir, b),
                 lambda f: np.savez(f, images=images, indices=indices, labels=labels), "wb")


def images_shape(batch_dir):
    """(H, W, 3) of the committed batches."""
    with np.load(batch_path(batch_dir, 0)) as batch:
        return batch["images"].shape[1:]


PNG_THREADS = 4  # Pillow encodes and writes outside the GIL: the threads run beside sampling, and in parallel


def write_png(path, array):
    """One PNG written under a temporary name (`*.tmp-PID`, atomic_write's), then renamed: no process kill leaves a
    half-written PNG under its final name. Without atomic_write's fsync (the batch files are the record): a machine
    crash may leave the last PNGs empty; delete them, and a rerun writes them again."""
    from PIL import Image
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_pngs(pool, image_dir, images, indices, only_missing=False):
    """Submit `images/{i:06d}.png` (for viewing) to the executor `pool`; returns the futures (their .result() raises
    what a write raised)."""
    paths = [os.path.join(image_dir, f"{int(i):06d}.png") for i in indices]
    return [pool.submit(write_png, path, array) for path, array in zip(paths, images)
            if not (only_missing and os.path.exists(path))]


def wait(futures):
    """Wait for the futures; the first failure is raised here."""
    for future in futures:
        future.result()
    return []


def write_record(out, name, content):
    """Write one of a run's end records (preempted.json, failed.json) for a requeue script, best effort: several
    processes write the same one at once (one wins), and a folder that refuses it must not replace the error or the
    stop being recorded."""
    try:
        atomic_write(os.path.join(out, name), lambda f: json.dump(content, f))
    except OSError:
        pass


def main(cfg):
    # Stop signals are recorded from the start: one that comes while the model loads or the checkpoint is hashed
    # stops the run before its first batch (preempted.json); one during the final samples.npz is let finish it (with
    # preempted.json on disk until it has, for a kill that comes first).
    with StopSignals() as stop:
        return _main(cfg, stop)


def _main(cfg, stop):
    from accelerate import PartialState
    check_seed_block(cfg.sampler.seed, cfg.fid.num_fid_samples, -(-cfg.fid.num_fid_samples // cfg.fid.batch_size))
    device = resolve_device(cfg.output.device)  # as sample.py: a GPU this machine lacks is an error, not a CPU run
    state = PartialState(cpu=device.type == "cpu", timeout=COLLECTIVE_TIMEOUT)
    rank, world = state.process_index, state.num_processes
    if world > 1:  # each process on its own GPU, as accelerate assigns them (one process keeps --device's index)
        device = state.device
    cfg.output.device = str(device)
    threads = cpu_threads.configure(device, world)  # CPU: the free cores, shared by the processes
    if threads and rank == 0:
        print(threads)
    # What --ckpt names and the folder's identity (the checkpoint's sha256: 10.8 GB read at XL/2) come from the main
    # process: a live run folder's latest.json may move between two processes' reads, and one hash is enough.
    cfg.checkpoint.ckpt = from_main_process(state, lambda: cli.resolve_checkpoint(cfg.checkpoint.ckpt))
    setup = cli.Setup(cfg, device)
    model, fid, seed = setup.model, cfg.fid, cfg.sampler.seed
    given_labels = cli.class_labels(cfg, model.num_classes)
    settings = from_main_process(state, lambda: cli.sample_settings(cfg, setup, given_labels))
    out = cli.output_folder(cfg, settings, suffix=f"-n{fid.num_fid_samples}")
    # The main process claims the folder (checks it, writes args.json) and clears a killed run's temporaries while
    # the others wait: checking concurrently, they could see its half-written args.json and refuse. If it refuses,
    # its exit stops the others (accelerate launch ends the whole group).
    batch_dir, image_dir = os.path.join(out, "batches"), os.path.join(out, "images")
    lock, claimed = None, False
    try:
        if state.is_main_process:
            # One job per folder (a second one, e.g. a duplicate array task, would sample every batch again and remove
            # this one's temporaries; --overwrite would remove its batches): an existing folder is locked before it is
            # judged, a new one once claimed.
            check_writable(out, "--out")
            had_lock = os.path.exists(os.path.join(out, LOCK_FILE))
            lock = RunLock(out).acquire() if os.path.isdir(out) else None
            try:
                claim_output_folder(out, settings, cfg.output.overwrite)
            except BaseException:  # a folder that is not ours (a training run, a user's): left as it was found
                if lock is not None:
                    lock.release()
                    lock = None
                    if not had_lock:
                        os.remove(os.path.join(out, LOCK_FILE))
                raise
            lock = lock or RunLock(out).acquire()
            for folder in (out, batch_dir, image_dir):
                remove_stale_temporaries(folder)
            for record in (PREEMPTED_FILE, FAILED_FILE):  # an earlier run's ending: this run continues it
                if os.path.exists(os.path.join(out, record)):
                    os.remove(os.path.join(out, record))
        state.wait_for_everyone()
        claimed = True
        setup.calibrate(cfg, device, out, state)  # --fp-allocation calibrated: measured once, on the main process
        os.makedirs(batch_dir, exist_ok=True)
        os.makedirs(image_dir, exist_ok=True)

        shape = (model.in_channels, *model.input_hw)
        num_batches = -(-fid.num_fid_samples // fid.batch_size)
        # The batches still missing (a rerun: those a stopped run left, however unevenly) are dealt to the processes
        # in turn; every process lists them before any writes one.
        missing = [b for b in range(num_batches) if not os.path.exists(batch_path(batch_dir, b))]
        state.wait_for_everyone()
        mine, done = missing[rank::world], num_batches - len(missing)
        stats, wall, pending = [], 0.0, []
        from tqdm.auto import tqdm
        with ThreadPoolExecutor(PNG_THREADS) as pool:
            for b in tqdm(mine, disable=not state.is_main_process, desc=f"batches (rank {rank})"):
                if stop.received:  # preemption: the batch in flight was committed; a rerun samples from the next one
                    break
                indices = range(b * fid.batch_size, min((b + 1) * fid.batch_size, fid.num_fid_samples))
                pairs = [sample_noise_and_label(seed, i, shape, model.num_classes, given_labels) for i in indices]
                noise = torch.stack([n for n, _ in pairs]).to(device)
                labels = torch.tensor([label for _, label in pairs], device=device)
                torch.manual_seed(step_noise_seed(seed, b))  # DDPM's per-step noise: fixed per batch, not per process
                start = time.perf_counter()
                samples, fn = setup.sample(cfg, noise, labels)
                images = to_uint8(cli.decode(samples, setup.vae))
                wall += time.perf_counter() - start
                stats.append((len(indices), fn.compute()))
                pending = wait(pending)  # the last batch's PNGs, written while this one sampled (one batch in memory)
                commit_batch(batch_dir, b, images, np.array(indices), labels.cpu().numpy())
                if fid.png:
                    pending = write_pngs(pool, image_dir, images, indices)
            wait(pending)
            signum = stop.received
        if signum:  # each process stops on its own (batches are independent): no collective a stopped one would miss
            name = signal.Signals(signum).name
            # what a requeue script reads (`accelerate launch` itself exits 1 when a worker exits 3)
            write_record(out, PREEMPTED_FILE, {"signal": name, "exit_code": STOPPED_EXIT_CODE})
            raise SamplingStopped(f"stopped by {name} on rank {rank} after {len(stats)} of its {len(mine)} batches "
                                  f"(all committed): rerun the same command to continue (exit code "
                                  f"{STOPPED_EXIT_CODE})")

        if world > 1:  # every process's batches (a few numbers each), for the compute report
            from accelerate.utils import gather_object
            stats = [s for per_process in gather_object([stats]) for s in per_process]
        state.wait_for_everyone()
        if state.is_main_process:
            # A signal now is let finish the assembly (minutes for 50k images), but the kill that follows it may come
            # first: the record is written when the signal comes, and removed once samples.npz is complete.
            stop.notify(lambda signum: write_record(out, PREEMPTED_FILE, {
                "signal": signal.Signals(signum).name, "exit_code": STOPPED_EXIT_CODE, "during": "samples.npz"}))
            arrays = np.zeros((fid.num_fid_samples, *images_shape(batch_dir)), dtype=np.uint8)
            labels = np.zeros(fid.num_fid_samples, dtype=np.int64)
            for b in range(num_batches):
                with np.load(batch_path(batch_dir, b)) as batch:
                    arrays[batch["indices"]], labels[batch["indices"]] = batch["images"], batch["labels"]
            if fid.png:  # those of batches a killed run (or --no-png) left without (rows of `arrays`: no copies)
                with ThreadPoolExecutor(PNG_THREADS) as pool:
                    wait(write_pngs(pool, image_dir, arrays, range(len(arrays)), only_missing=True))
            atomic_write(os.path.join(out, "samples.npz"), lambda f: np.savez(f, arr_0=arrays, labels=labels), "wb")
            report = {"args": cfg.flat(), "settings": settings, "precision": settings["resolved"]["precision"],
                      "num_images": fid.num_fid_samples, "processes": world,
                      "batches_kept_from_earlier_runs": done, "wall_time_rank0_s": wall, **mean_compute(stats)}
            atomic_write(os.path.join(out, "compute.json"), lambda f: json.dump(report, f, indent=2))
            stop.notify(None)  # complete: a signal from here on is no preemption of this run
            if stop.received and os.path.exists(os.path.join(out, PREEMPTED_FILE)):  # finished all the same
                os.remove(os.path.join(out, PREEMPTED_FILE))
            print(f"wrote {arrays.shape[0]} samples to {os.path.join(out, 'samples.npz')}")
        state.wait_for_everyone()
    except BaseException as e:
        # A process that fails records it: under accelerate launch the others then get SIGTERM and may stop as if
        # preempted (preempted.json), and a requeue on that alone would repeat a failure that recurs (a bad GPU).
        if claimed and not isinstance(e, SamplingStopped):
            write_record(out, FAILED_FILE, {"rank": rank, "error": f"{type(e).__name__}: {e}"})
        raise
    finally:
        if lock is not None:
            lock.release()
    return out


if __name__ == "__main__":
    try:
        cli.run_script(main, parse_args)
    except SamplingStopped as e:
        print(e, file=sys.stderr)
        sys.exit(STOPPED_EXIT_CODE)
