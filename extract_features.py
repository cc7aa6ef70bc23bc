"""Encode an image folder into VAE latents once, so training never runs the VAE (as in fast-DiT and FPDM).

    python extract_features.py --data-path imagenet/train --output latents/in256 --vae stabilityai/sd-vae-ft-mse
    accelerate launch --num_processes 8 extract_features.py ...            # one GPU per process
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        extract_features.py --device cpu ...                                # several CPU processes (gloo)

Output (format "fpdm-latents-v1", read by data.LatentDataset): process r encodes images i = r (mod world) and
writes its own `shard-r{r:03d}-{k:05d}.safetensors`, each holding float16 "mean" and "std" of the posterior
(times the VAE scaling factor), int64 "labels" and "index" (position in the image folder), and with flips also
"mean_flip", "std_flip" of the mirrored image. Process 0 then writes meta.json, the mark of a finished
extraction. Files are written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

import argparse
import glob
import json
import os

import torch
from tqdm import tqdm

import vae as vae_io
from data import LATENT_FORMAT, ImageFolderDataset
from run_folders import atomic_write

def _save_shard(path, tensors):
    from safetensors.torch import save

    # Slices of one batch (and chunks of the VAE output): give each its own packed storage.
    tensors = {k: v.clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    atomic_write(path, lambda f: f.write(save(tensors)), "wb")
    return {"file": os.path.basename(path), "count": len(tensors["index"])}


@torch.no_grad()
def extract(data_path, output, vae, image_size=256, batch_size=32, shard_size=4096, flip=True,
            accelerator=None, device=None, num_workers=0, skip_bad_images=False):
    """Encode `data_path` into shards in `output`; return the meta dict (also written to output/meta.json).

    `vae` is a path / hub id or an AutoencoderKL. Without `accelerator` this runs as a single process on
    `device` (default: cuda if available), so tests and notebooks need not create accelerate's global state.
    """
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    is_main = rank == 0
    device = accelerator.device if accelerator else torch.device(device or ("cuda" if torch.cuda.is_available()
                                                                             else "cpu"))
    vae_name = vae if isinstance(vae, str) else getattr(vae.config, "_name_or_path", "") or type(vae).__name__
    vae = (vae_io.load(vae) if isinstance(vae, str) else vae).to(device).eval()
    scaling_factor = vae_io.scaling_factor(vae)
    dataset = ImageFolderDataset(data_path, image_size, skip_bad_images=skip_bad_images, scan=False)
    if accelerator:  # every file decoded once before encoding starts (one scan per node, cached)
        with accelerator.local_main_process_first():
            dataset.scan()
    else:
        dataset.scan()
    if os.path.isfile(os.path.join(output, "meta.json")):
        with open(os.path.join(output, "meta.json")) as f:
            if json.load(f).get("format") != LATENT_FORMAT:
                raise ValueError(f"{output} holds a foreign meta.json; choose an empty output folder")

    # Clear a previous extraction first: stale shards (e.g. from another process count) would be read twice.
    os.makedirs(output, exist_ok=True)
    if accelerator:
        accelerator.wait_for_everyone()  # every process has checked meta.json before process 0 removes it
    if is_main:
        for stale in glob.glob(os.path.join(output, "shard-r*.safetensors")) + [os.path.join(output, "meta.json")]:
            if os.path.exists(stale):
                os.remove(stale)
    if accelerator:
        accelerator.wait_for_everyone()

    mine = list(range(rank, len(dataset), world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         num_workers=num_workers)
    pending, shards = [], []  # pending: encoded batches not yet in a shard (concatenated once per shard)

    def write_shard(part):
        path = os.path.join(output, f"shard-r{rank:03d}-{len(shards):05d}.safetensors")
        shards.append(_save_shard(path, part))

    for start, (x, y) in zip(range(0, len(mine), batch_size),
                             tqdm(loader, desc="encoding", disable=not is_main, unit="batch")):
        n = len(x)
        x = x.to(device)
        if flip:  # one VAE call for both views
            x = torch.cat([x, x.flip(-1)])
        mean, std = (m.half().cpu() for m in vae_io.encode_moments(vae, x))
        batch = {"mean": mean[:n], "std": std[:n], "labels": y.long(),
                 "index": torch.tensor(mine[start:start + n], dtype=torch.long)}
        if flip:
            batch.update(mean_flip=mean[n:], std_flip=std[n:])
        pending.append(batch)
        while sum(len(b["index"]) for b in pending) >= shard_size:  # a shard may end mid-batch
            merged = {k: torch.cat([b[k] for b in pending]) for k in batch}
            write_shard({k: v[:shard_size] for k, v in merged.items()})
            pending = [{k: v[shard_size:] for k, v in merged.items()}]
    if sum(len(b["index"]) for b in pending):
        write_shard({k: torch.cat([b[k] for b in pending]) for k in pending[0]})

    if accelerator:
        from accelerate.utils import gather_object
        accelerator.wait_for_everyone()
        shards = gather_object([shards])  # one list per process, in rank order
        shards = [s for per_rank in shards for s in per_rank]
    latent_channels = vae.config.latent_channels
    latent_size = image_size // 2 ** (len(vae.config.block_out_channels) - 1)
    meta = {
        "format": LATENT_FORMAT, "num_images": len(dataset),
        "latent_shape": [latent_channels, latent_size, latent_size],
        "num_classes": len(dataset.classes), "classes": dataset.classes,
        "scaling_factor": scaling_factor, "vae": vae_name, "image_size": image_size, "flip": flip,
        "shards": sorted(shards, key=lambda s: s["file"]), "dtype": "float16",
        "skipped_files": len(dataset.skipped),
    }
    if is_main:
        atomic_write(os.path.join(output, "meta.json"), lambda f: json.dump(meta, f, indent=1))
    if accelerator:
        accelerator.wait_for_everyone()
    return meta


def main(args):
    from accelerate import Accelerator

    # cpu=True is what makes several CPU processes cooperate (gloo); without it each would encode everything.
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    accelerator = Accelerator(cpu=cpu)
    meta = extract(args.data_path, args.output, args.vae, args.image_size, args.batch_size, args.shard_size,
                   flip=not args.no_flip, accelerator=accelerator, num_workers=args.num_workers,
                   skip_bad_images=args.skip_bad_images)
    if accelerator.is_main_process:
        skipped = f", {meta['skipped_files']} unreadable files skipped" if meta.get("skipped_files") else ""
        print(f"{meta['num_images']} images -> {len(meta['shards'])} shards of latents "
              f"{tuple(meta['latent_shape'])} in {args.output} ({accelerator.num_processes} processes{skipped})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-path", required=True, help="image folder: <root>/<class>/<images>")
    parser.add_argument("--output", required=True, help="folder for shards and meta.json")
    parser.add_argument("--vae", required=True, help="local AutoencoderKL folder or hub id "
                                                     "(e.g. stabilityai/sd-vae-ft-mse, needs network)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="images per process per VAE call")
    parser.add_argument("--shard-size", type=int, default=4096, help="images per shard file")
    parser.add_argument("--no-flip", action="store_true", help="skip the latents of mirrored images")
    parser.add_argument("--num-workers", type=int, default=4, help="image decoding workers per process")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="encode without unreadable files (counted) instead of stopping before the first batch")
    try:
        main(parser.parse_args())
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
