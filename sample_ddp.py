"""Sample N images for FID with several processes (accelerate or torchrun), resumably.

    accelerate launch --num_processes 8 sample_ddp.py --ckpt CKPT --num-fid-samples 50000 --cfg-scale 1.5 \
        --sampler ddpm --num-sampling-steps 250
    python sample_ddp.py --ckpt CKPT --num-fid-samples 1000 --budget-block-evals 560 --reuse   # one process

Sample i's noise and label derive from (seed, i) alone, and batches are fixed blocks of consecutive indices whose
RNG is seeded by (seed, batch), so the images do not depend on the number of processes. Each image is written as
`images/{i:06d}.png` (atomically); a killed run skips finished batches when started again. At the end the main
process writes exactly N samples as an ADM-format `samples.npz` (`arr_0`: uint8 N×H×W×3, `labels`: N) and
`compute.json`. All sampling flags are sample.py's.
"""

import json
import os
import sys
import time

import numpy as np
import torch

import sample as sample_cli
from sampling import diffusion_for_sampling, load_model_for_sampling, sample_images


def parse_args(argv=None):
    parser = sample_cli.build_parser(__doc__)  # every sample.py flag, plus:
    parser.add_argument("--num-fid-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (fixes the batches' contents)")
    return parser.parse_args(argv)


def sample_noise_and_label(seed, index, shape, num_classes):
    """Noise and label of global sample `index`: a function of (seed, index) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    noise = torch.randn(*shape, generator=g)
    label = int(torch.randint(0, num_classes, (), generator=g))
    return noise, label


def to_uint8(images):
    """[-1, 1] float (N, C, H, W) -> uint8 (N, H, W, 3); grayscale is repeated to RGB as ADM's format expects."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def write_png(array, path):
    from PIL import Image
    tmp = f"{path}.tmp-{os.getpid()}.png"
    Image.fromarray(array).save(tmp)
    os.replace(tmp, path)


def main(args):
    from accelerate import PartialState
    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    if args.num_fid_samples < 1 or args.batch_size < 1:
        raise ValueError("--num-fid-samples and --batch-size must be >= 1")
    device = state.device
    args.device = str(device)
    if device.type == "cpu" and world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    model, train_config = load_model_for_sampling(args.ckpt, use_ema=not args.no_ema, device=device,
                                                  trust_checkpoint=args.trust_checkpoint, model_name=args.model)
    iterations = sample_cli.fpdm_iterations(args, model)
    diffusion = diffusion_for_sampling(train_config, args.num_sampling_steps, args.sampler)
    out = args.out or sample_cli.output_folder(args) + f"-n{args.num_fid_samples}"
    image_dir = os.path.join(out, "images")
    os.makedirs(image_dir, exist_ok=True)

    shape = (model.in_channels, *model.input_hw)
    num_batches = -(-args.num_fid_samples // args.batch_size)
    mine = [b for b in range(num_batches) if b % world == rank]
    stats, wall, done = [], 0.0, 0
    from tqdm.auto import tqdm
    for b in tqdm(mine, disable=not state.is_main_process, desc=f"batches (rank {rank})"):
        indices = range(b * args.batch_size, min((b + 1) * args.batch_size, args.num_fid_samples))
        paths = [os.path.join(image_dir, f"{i:06d}.png") for i in indices]
        if all(os.path.exists(p) for p in paths):
            done += 1
            continue
        pairs = [sample_noise_and_label(args.seed, i, shape, model.num_classes) for i in indices]
        noise = torch.stack([n for n, _ in pairs]).to(device)
        labels = torch.tensor([label for _, label in pairs], device=device)
        torch.manual_seed(args.seed * 1_000_003 + b)  # DDPM's per-step noise: fixed per batch, not per process
        start = time.perf_counter()
        samples, fn = sample_images(model, diffusion, noise, labels, cfg_scale=args.cfg_scale, sampler=args.sampler,
                                    eta=args.eta, iterations_per_step=iterations, reuse=args.reuse,
                                    tol=args.adaptive_tol, clip_denoised=not args.no_clip,
                                    guidance_channels=args.guidance_channels)
        images = to_uint8(sample_cli.decode(samples, model, args.vae, device))
        wall += time.perf_counter() - start
        stats.append(fn.compute())
        for array, path in zip(images, paths):
            write_png(array, path)
        with open(os.path.join(image_dir, f"labels_{b:06d}.json"), "w") as f:
            json.dump({"indices": list(indices), "labels": labels.tolist()}, f)

    state.wait_for_everyone()
    if state.is_main_process:
        from PIL import Image
        arrays = np.stack([np.asarray(Image.open(os.path.join(image_dir, f"{i:06d}.png")).convert("RGB"))
                           for i in range(args.num_fid_samples)])
        labels = np.zeros(args.num_fid_samples, dtype=np.int64)
        for b in range(num_batches):
            with open(os.path.join(image_dir, f"labels_{b:06d}.json")) as f:
                record = json.load(f)
            labels[record["indices"]] = record["labels"]
        np.savez(os.path.join(out, "samples.npz"), arr_0=arrays, labels=labels)
        report = {"args": vars(args), "num_images": args.num_fid_samples, "processes": world,
                  "batches_skipped_as_done_on_rank0": done, "wall_time_rank0_s": wall}
        if stats:
            report.update({k: stats[0][k] for k in ("cfg_passes", "block_evals", "flops_per_image",
                                                     "iterations_per_step")})
        with open(os.path.join(out, "compute.json"), "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {arrays.shape[0]} samples to {os.path.join(out, 'samples.npz')}")
    state.wait_for_everyone()
    return out


if __name__ == "__main__":
    try:
        main(parse_args())
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
