"""Encode an image folder into VAE latents once, so training never runs the VAE (as in fast-DiT and FPDM).

    python extract_features.py --data-path imagenet/train --output latents/in256 --vae stabilityai/sd-vae-ft-mse
    accelerate launch --num_processes 8 extract_features.py ...            # one GPU per process
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        extract_features.py --device cpu ...                                # several CPU processes (gloo)

Output (format "fpdm-latents-v1", read by data.LatentDataset): shard k, `shard-{k:05d}.safetensors`, holds the images
at positions k·S .. (k+1)·S - 1 of the image folder (S = --shard-size, less unreadable files skipped): float16 "mean"
and "std" of the posterior (times the VAE scaling factor), int64 "labels" and "index" (position in the image folder),
and with flips also "mean_flip", "std_flip" of the mirrored image. The shards still missing are dealt to the processes
in turn, so the layout does not depend on the number of processes. Process 0 then writes meta.json, the mark of a
finished extraction. Files are written to a temporary name and renamed, so a crash never leaves a half-written file.
Training reads latents at random, so they should sit on local disk or in the page cache (ImageNet with flips as
float16 mean and std: 42 GB), not on a network file system.

Resuming: extraction.json, written before the first shard, records the setup (image list with file sizes, image
size, VAE weights, flips, shard size, --skip-bad-images). A rerun with the same setup keeps every finished shard
and encodes the rest, on any number of processes (the batch size may change too); another setup is refused in one
line naming what differs, and with --overwrite the old extraction's files (shards, meta.json, extraction.json,
nothing else) are removed and it starts over.

Each process checks its own images in its loader workers as it encodes them, so none waits for a scan of the
whole folder: an unreadable file stops the run with its path, or with --skip-bad-images is left out and listed in
meta.json ("skipped"). Every other image keeps its position in the folder as "index", so the dataset is the same
whatever the number of processes.
"""

import argparse
import glob
import hashlib
import json
import os

from fpdm import cpu_threads  # before torch: OpenMP reads its wait policy (OMP_WAIT_POLICY) when torch loads
import torch
from tqdm import tqdm

from fpdm import vae as vae_io
from fpdm.data import LATENT_FORMAT, ImageFolderDataset
from fpdm.run_folders import COLLECTIVE_TIMEOUT, RunLock, atomic_write, check_writable

SETUP_FILE = "extraction.json"
SHARD_LAYOUT = "folder-blocks"  # shard k: image positions k·S .. (k+1)·S - 1 (before: per-process shards)


def _save_shard(path, tensors):
    from safetensors.torch import save

    # Slices of one batch (and chunks of the VAE output): give each its own packed storage.
    tensors = {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    atomic_write(path, lambda f: f.write(save(tensors)), "wb")


def _shard_path(output, k):
    return os.path.join(output, f"shard-{k:05d}.safetensors")


def _setup(dataset, vae, image_size, flip, shard_size, skip_bad_images):
    """What decides the contents of the shards: a rerun with the same setup may keep those of an earlier run."""
    files = hashlib.sha256()
    for path in dataset.files:  # names (hence labels) and sizes: a copy resized under the same names differs
        files.update(f"{os.path.relpath(path, dataset.root)}\0{os.path.getsize(path)}\n".encode())
    weights = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return {"format": LATENT_FORMAT, "num_files": len(dataset.files), "files_sha256": files.hexdigest(),
            "image_size": image_size, "vae_sha256": weights.hexdigest(), "scaling_factor": vae_io.scaling_factor(vae),
            "flip": flip, "shard_size": shard_size, "shard_layout": SHARD_LAYOUT, "skip_bad_images": skip_bad_images}


def check_same_files(dataset, gather):
    """Refuse, on every process alike, an extraction whose processes list different image folders (a stale
    node-local copy would encode other images under the same shard indices): `gather` is accelerate's
    gather_object, a collective every process calls."""
    names = hashlib.sha256("\n".join(os.path.relpath(p, dataset.root) for p in dataset.files).encode()).hexdigest()
    seen = gather([(len(dataset.files), names)])
    if len(set(seen)) > 1:
        listed = ", ".join(f"process {r}: {n} files ({h[:12]})" for r, (n, h) in enumerate(seen))
        raise ValueError(f"the processes see different image folders at {dataset.root} ({listed}): give every node "
                         f"the same copy")


def _prepare(output, setup, overwrite=False):
    """On process 0, before any shard: keep an earlier extraction with the same setup (a run with --skip-bad-images
    also continues one without: its shards skipped nothing); one of another setup is refused in one line naming what
    differs, unless `overwrite` (then its files are removed); return whether it resumes. Either way meta.json goes
    (it marks a finished run) and extraction.json records `setup`."""
    path = os.path.join(output, SETUP_FILE)
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    resume = old in (setup, {**setup, "skip_bad_images": False})
    stale = [os.path.join(output, "meta.json")] + glob.glob(os.path.join(output, "*.tmp-*"))  # tmp: a killed write
    stale = [p for p in stale if os.path.basename(p).startswith(("shard-", "meta.json", SETUP_FILE))]
    if not resume:
        shards = glob.glob(os.path.join(output, "shard-*.safetensors"))
        if isinstance(old, dict) and "shard_layout" not in old:
            what = "the extraction there has per-process shards (an older extract_features.py)"
        elif isinstance(old, dict):
            changed = ", ".join(k for k in {**setup, **old} if old.get(k) != setup.get(k))
            what = f"the extraction there has another {changed}"
        else:
            what = f"shards without a readable {SETUP_FILE} (an older extraction?)"
        if shards and not overwrite:  # hours of encoding at ImageNet scale: never removed unasked
            hint = ("rerun with --skip-bad-images to continue it, or " if old == {**setup, "skip_bad_images": True}
                    else "finish it with that version, or " if "per-process" in what
                    else "rerun with its settings to continue it, or ")
            raise FileExistsError(f"{output}: {what} ({len(shards)} shards): {hint}pass --overwrite to start over "
                                  f"(removing them)")
        if isinstance(old, dict) or shards:
            print(f"{output}: {what}: starting over")
        stale += shards
    for p in stale:
        if os.path.exists(p):
            os.remove(p)
    atomic_write(path, lambda f: json.dump(setup, f, indent=1))
    return resume


def _shard_index(path):
    """The "index" tensor of a finished shard, or None where it is missing or unreadable (then it is encoded again;
    a shard is written under its final name only when complete)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.get_tensor("index")
    except Exception:  # noqa: BLE001 (whatever is wrong with it, it is encoded again)
        return None


class _CheckedImages(torch.utils.data.Dataset):
    """Items `indices` of an ImageFolderDataset as (image, label, index, reason): an image that cannot be read gives
    zeros and the reason, so that loader workers check each file as it is encoded, never in a scan beforehand."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        try:
            return (*self.dataset[index], index, "")
        except Exception as e:  # noqa: BLE001 (every unreadable file is reported the same way)
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:200]
            return torch.zeros(self.dataset.image_shape), self.dataset.labels[index], index, reason


@torch.no_grad()
def extract(data_path, output, vae, image_size=256, batch_size=32, shard_size=4096, flip=True,
            accelerator=None, device=None, num_workers=0, skip_bad_images=False, overwrite=False):
    """Encode `data_path` into shards in `output`; return the meta dict (also written to output/meta.json).

    `vae` is a path / hub id or an AutoencoderKL. Without `accelerator` this runs as a single process on
    `device` (default: cuda if available), so tests and notebooks need not create accelerate's global state.
    An interrupted extraction with the same setup is continued, not redone (see the module docstring).
    """
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    is_main = rank == 0
    dataset = ImageFolderDataset(data_path, image_size, scan=False)  # checked while encoding, see _CheckedImages
    check_writable(output, "--output")  # before the VAE is loaded
    os.makedirs(output, exist_ok=True)
    # One extraction per folder: a second job on it would remove this one's temporaries and shards.
    lock = RunLock(output).acquire() if is_main else None
    try:
        return _extract(data_path, output, vae, image_size, batch_size, shard_size, flip, accelerator, device,
                        num_workers, skip_bad_images, overwrite, dataset, rank, world, is_main)
    finally:
        if lock is not None:
            lock.release()


def _extract(data_path, output, vae, image_size, batch_size, shard_size, flip, accelerator, device, num_workers,
             skip_bad_images, overwrite, dataset, rank, world, is_main):
    device = accelerator.device if accelerator else torch.device(device or ("cuda" if torch.cuda.is_available()
                                                                             else "cpu"))
    vae_name = vae if isinstance(vae, str) else getattr(vae.config, "_name_or_path", "") or type(vae).__name__
    if os.path.isdir(os.path.expanduser(vae_name)):  # a local folder: absolute, so that train.py finds it anywhere
        vae_name = os.path.abspath(os.path.expanduser(vae_name))
    vae = (vae_io.load(vae) if isinstance(vae, str) else vae).eval()
    scaling_factor = vae_io.scaling_factor(vae)
    if os.path.isfile(os.path.join(output, "meta.json")):
        with open(os.path.join(output, "meta.json")) as f:
            if json.load(f).get("format") != LATENT_FORMAT:
                raise ValueError(f"{output} holds a foreign meta.json; choose an empty output folder")
    if accelerator and world > 1:
        from accelerate.utils import gather_object
        check_same_files(dataset, gather_object)
    setup = _setup(dataset, vae, image_size, flip, shard_size, skip_bad_images) if is_main else None
    vae = vae.to(device)
    if accelerator:
        accelerator.wait_for_everyone()  # every process has checked meta.json before process 0 removes it
    if is_main and _prepare(output, setup, overwrite):
        print(f"{output}: same setup as the extraction there: its finished shards are kept")
    if accelerator:
        accelerator.wait_for_everyone()

    # Every process lists the finished shards before any writes a new one, so all deal the missing ones alike.
    num_shards = -(-len(dataset) // shard_size)
    missing = [k for k in range(num_shards) if _shard_index(_shard_path(output, k)) is None]
    if accelerator:
        accelerator.wait_for_everyone()
    mine = [i for k in missing[rank::world] for i in range(k * shard_size, min((k + 1) * shard_size, len(dataset)))]
    loader = torch.utils.data.DataLoader(_CheckedImages(dataset, mine), batch_size=batch_size,
                                         num_workers=num_workers)
    pending, current = [], None  # encoded rows of shard `current` (concatenated when it is complete)

    def write_shard():
        if pending:
            _save_shard(_shard_path(output, current), {k: torch.cat([b[k] for b in pending]) for k in pending[0]})
            pending.clear()

    for x, y, index, reasons in tqdm(loader, desc="encoding", disable=not is_main, unit="batch"):
        bad = [i for i, reason in enumerate(reasons) if reason]
        if bad and not skip_bad_images:
            path, reason = dataset.files[index[bad[0]]], reasons[bad[0]]
            raise ValueError(f"{path} cannot be read ({reason}): fix or remove it and rerun with --overwrite (a "
                             f"changed image list starts over), or rerun with --skip-bad-images to go on without it "
                             f"from here")
        last = int(index[-1])  # the batch's last position, read or not
        if bad:
            keep = torch.tensor([not reason for reason in reasons])
            x, y, index = x[keep], y[keep], index[keep]
        if len(x):
            n = len(x)
            x = x.to(device)
            if flip:  # one VAE call for both views
                x = torch.cat([x, x.flip(-1)])
            mean, std = (m.half().cpu() for m in vae_io.encode_moments(vae, x))
            batch = {"mean": mean[:n], "std": std[:n], "labels": y.long(), "index": index.long()}
            if flip:
                batch.update(mean_flip=mean[n:], std_flip=std[n:])
            shard = index // shard_size  # a batch may span the end of a shard
            for k in shard.unique().tolist():
                if k != current:  # rows come in folder order: shard `current` is complete
                    write_shard()
                    current = k
                pending.append({name: v[shard == k] for name, v in batch.items()})
        if (last + 1) % shard_size == 0 or last + 1 == len(dataset):  # the batch ends a shard
            write_shard()

    if accelerator:
        accelerator.wait_for_everyone()
    # What the shards hold, whoever wrote them in whichever run, is the dataset (read back: only their "index").
    shards, held = [], set()
    for k in range(num_shards):
        index = _shard_index(_shard_path(output, k))
        if index is not None:
            shards.append({"file": os.path.basename(_shard_path(output, k)), "count": len(index)})
            held.update(index.tolist())
    skipped = sorted(set(range(len(dataset))) - held)
    latent_channels = vae.config.latent_channels
    latent_size = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    meta = {
        "format": LATENT_FORMAT, "num_images": sum(s["count"] for s in shards),
        "latent_shape": [latent_channels, latent_size, latent_size],
        "num_classes": len(dataset.classes), "classes": dataset.classes,
        "scaling_factor": scaling_factor, "vae": vae_name, "image_size": image_size, "flip": flip,
        "shards": shards, "dtype": "float16",
        "skipped_files": len(skipped), "skipped": [os.path.relpath(dataset.files[i], data_path) for i in skipped],
    }
    if is_main:
        atomic_write(os.path.join(output, "meta.json"), lambda f: json.dump(meta, f, indent=1))
    if accelerator:
        accelerator.wait_for_everyone()
    return meta


def main(args):
    from accelerate import Accelerator, InitProcessGroupKwargs

    # cpu=True is what makes several CPU processes cooperate (gloo); without it each would encode everything.
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)])
    threads = cpu_threads.configure(accelerator.device, accelerator.num_processes)  # CPU: the free cores, shared
    if threads and accelerator.is_main_process:
        print(threads)
    meta = extract(args.data_path, args.output, args.vae, args.image_size, args.batch_size, args.shard_size,
                   flip=not args.no_flip, accelerator=accelerator, num_workers=args.num_workers,
                   skip_bad_images=args.skip_bad_images, overwrite=args.overwrite)
    if accelerator.is_main_process:
        skipped = f", {meta['skipped_files']} unreadable files skipped (meta.json lists them)" \
            if meta.get("skipped_files") else ""
        print(f"{meta['num_images']} images -> {len(meta['shards'])} shards of latents "
              f"{tuple(meta['latent_shape'])} in {args.output} ({accelerator.num_processes} processes{skipped})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="image folder: <root>/<class>/<images>")
    parser.add_argument("--output", required=True, help="folder for shards, meta.json and extraction.json "
                                                        "(a rerun with the same setup resumes)")
    parser.add_argument("--vae", required=True, help="local AutoencoderKL folder or hub id "
                                                     "(e.g. stabilityai/sd-vae-ft-mse, needs network)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="images per process per VAE call")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--no-flip", action="store_true", help="skip the latents of mirrored images")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding workers per process")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="leave unreadable files out (meta.json lists them) instead of stopping at the first one")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over when --output holds an extraction of another setup (removing its shards)")
    try:
        main(parser.parse_args())
    except (ValueError, OSError) as e:  # OSError: also a full disk, a quota, a read-only or vanished folder
        from fpdm.run_folders import exit_with_error
        exit_with_error(e)
