"""Model inversion: find the noise x_T whose DDIM sample (η = 0, no clipping) reproduces target images.

    python invert.py --ckpt results/run/checkpoints/step_0050000.pt --images targets/ --num-sampling-steps 10 \\
        --steps 50 --lr 0.05 --out inversions/run

Adam on the pixel MSE, from x_T = DDIM forward inversion of the target, with two gradients side by side:
  - "phantom" [DEQ-DDIM Sec. 4]: solve the whole chain X* = h(X*; x_T) without a graph (diffusion/parallel.py,
    warm-started from the previous step's X*), then back-propagate through one damped step
    x̂ = (1 − τ) X* + τ h(X*; x_T) (τ = 0.1), a "phantom gradient" [Geng et al. 2021, "On Training Implicit Models"];
  - "sequential": back-propagate through the T' sequential DDIM steps (memory grows with T').
Writes inversion.json (MSE against optimisation step and wall time, for both), mse.png, and grid.png (rows: target,
DDIM-inversion start, phantom result, sequential result). Pixel-space models only.

[DEQ-DDIM] Pokle, Geng & Kolter 2022, "Deep Equilibrium Approaches to Diffusion Models".
"""

import argparse
import json
import os
import sys
import time

from fpdm import cpu_threads  # before torch: OpenMP reads its wait policy (OMP_WAIT_POLICY) when torch loads
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffusion import TIMESTEP_SPACINGS
from diffusion.parallel import check_model, ddim_chain_map
from diffusion.solvers import solve
from fpdm.data import IMAGE_EXTENSIONS, list_images, read_image, training_crop



# ------------------------------------------------------------------------------------------------------------------
# Differentiable samples
# ------------------------------------------------------------------------------------------------------------------

def sequential_ddim(model, diffusion, x_T, model_kwargs=None):
    """DDIM (η = 0, clip_denoised=False) from x_T, with autograd (`ddim_sample_loop` runs under no_grad)."""
    x = x_T
    for index in reversed(range(diffusion.num_timesteps)):
        t = torch.full((len(x),), index, dtype=torch.long, device=x.device)
        x = diffusion.ddim_sample(model, x, t, clip_denoised=False, model_kwargs=model_kwargs)["sample"]
    return x


def phantom_sample(model, diffusion, x_T, X_star, tau=0.1, model_kwargs=None, chunk_size=None):
    """x̂ = (1 − τ) X* + τ h(X*; x_T) with X* detached: its last state is the sample, and its gradient with respect
    to x_T is the one-step phantom gradient [DEQ-DDIM Sec. 4]."""
    X_star = X_star.detach()
    return (1 - tau) * X_star + tau * ddim_chain_map(model, diffusion, x_T, X_star, model_kwargs=model_kwargs,
                                                     chunk_size=chunk_size)


def invert(model, diffusion, target, x_T, method="phantom", steps=50, lr=0.05, tau=0.1, model_kwargs=None,
           max_iter=15, tol=1e-3, chunk_size=None, callback=None):
    """Optimise x_T (a copy of the given start) with Adam so that its DDIM sample matches `target` in MSE.

    Returns (x_T, history): history[k] = {"step", "mse" (of the sample at x_T before update k; "phantom" takes it
    from the solver's X*), "time_s" (cumulative), and for "phantom" "solver_iterations"}.
    """
    if method not in ("phantom", "sequential"):
        raise ValueError(f"unknown method {method!r}; use 'phantom' or 'sequential'")
    check_model(model)
    x_T = x_T.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x_T], lr=lr)
    X_star, history, elapsed = None, [], 0.0
    for step in range(steps):
        began = time.perf_counter()
        record = {"step": step}
        if method == "phantom":
            with torch.no_grad():  # warm start: the previous fixed point is close to the new one
                x_fixed = x_T.detach()
                h = lambda X: ddim_chain_map(model, diffusion, x_fixed, X, model_kwargs=model_kwargs,
                                             chunk_size=chunk_size)
                start = x_fixed.expand(diffusion.num_timesteps, *x_fixed.shape) if X_star is None else X_star
                result = solve(h, start.clone(), "anderson", max_iter, tol)
            X_star = result.x
            record["mse"] = F.mse_loss(X_star[-1], target).item()
            record["solver_iterations"] = result.num_iterations
            sample = phantom_sample(model, diffusion, x_T, X_star, tau, model_kwargs, chunk_size)[-1]
        else:
            sample = sequential_ddim(model, diffusion, x_T, model_kwargs)
        loss = F.mse_loss(sample, target)
        if method == "sequential":
            record["mse"] = loss.item()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if x_T.is_cuda:
            torch.cuda.synchronize(x_T.device)
        elapsed += time.perf_counter() - began
        record["time_s"] = elapsed
        history.append(record)
        if callback is not None:
            callback(record)
    return x_T.detach(), history


# ------------------------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------------------------

def load_targets(path, image_size, channels, num_images=None):
    """Images in [-1, 1] of shape (N, channels, S, S) from a folder of images or an ADM `.npz` (`arr_0`: uint8
    N×H×W×3, N×H×W×1 or N×H×W), through the training transform (`data.training_crop`: ADM's centre crop to
    `image_size`, as ImageFolderDataset reads training images), so a non-square target is cropped, not squashed.
    One channel: the mean of RGB. `image_size`: int or (H, W) with H = W (training crops are square)."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if height != width:
        raise ValueError(f"the model takes {height}x{width} inputs: invert.py prepares targets as training does, by a "
                         f"square centre crop, so it inverts square models only")
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels} channels: invert.py inverts pixel-space models (1 or 3)")
    if str(path).endswith(".npz"):
        with np.load(path) as data:
            arrays = data["arr_0"][:num_images]
        if arrays.ndim == 4 and arrays.shape[-1] == 1:
            arrays = arrays[..., 0]
        if arrays.dtype != np.uint8 or not (arrays.ndim == 3 or (arrays.ndim == 4 and arrays.shape[-1] == 3)):
            raise ValueError(f"{path}: arr_0 must hold uint8 images (N, H, W, 3), (N, H, W, 1) or (N, H, W), got "
                             f"{arrays.dtype} {arrays.shape}")
        pictures = [Image.fromarray(array) for array in arrays]
    else:
        files = list_images(path)[:num_images]
        if not files:
            raise FileNotFoundError(f"{path}: no images ({', '.join(IMAGE_EXTENSIONS)}) found")
        pictures = [read_image(f) for f in files]
    images = torch.stack([training_crop(picture, height) for picture in pictures])
    return images.mean(dim=1, keepdim=True) if channels == 1 else images


def build(args):
    """Network (EMA weights), model callable and diffusion from a checkpoint (any format load_model reads)."""
    from fpdm.checkpoints import load_model_for_sampling
    from fpdm.sampling import GuidedModel, diffusion_for_sampling, resolve_device
    net, train_config = load_model_for_sampling(args.ckpt, device=resolve_device(args.device))
    if net.in_channels not in (1, 3):
        raise ValueError(f"{args.ckpt} is a {net.in_channels}-channel model, presumably of VAE latents: invert.py "
                         f"works in pixel space only (inverting through the VAE decoder is not implemented)")
    net.requires_grad_(False)  # gradients flow to x_T only
    iterations = args.num_iterations if net.fixed_point else None
    model = GuidedModel(net, args.cfg_scale, iterations_per_step=iterations, images_only=True)  # no doubled batch
    return net, model, diffusion_for_sampling(train_config, args.num_sampling_steps, args.timestep_spacing)


# ------------------------------------------------------------------------------------------------------------------
# Script
# ------------------------------------------------------------------------------------------------------------------

def plot(histories, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for method, history in histories.items():
        mse = [h["mse"] for h in history]
        by_step.plot([h["step"] for h in history], mse, label=method)
        by_time.plot([h["time_s"] for h in history], mse, label=method)
    for ax, xlabel in ((by_step, "Adam step"), (by_time, "wall time (s)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("reconstruction MSE")
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


OUTPUTS = ("args.json", "inversion.json", "mse.png", "grid.png")  # all that --overwrite may remove


def main(args):
    from torchvision.utils import save_image

    from fpdm.sampling import claim_output_folder, file_fingerprint, resolve_device
    args.device = str(resolve_device(args.device))
    threads = cpu_threads.configure(args.device)  # CPU: the free cores only
    if threads:
        print(threads)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in ("phantom", "sequential")]
    if unknown or not methods:
        raise ValueError(f"--methods {args.methods}: choose from phantom, sequential (comma-separated)")
    if "phantom" not in methods:  # every flag given is used or refused
        refused = [flag for flag in ("--tau", "--max-iter", "--tol", "--chunk-size") if flag in args.given]
        if refused:
            raise ValueError(f"{', '.join(refused)} set(s) the phantom gradient's solve: not used by --methods "
                             f"{args.methods}")
    torch.manual_seed(args.seed)
    net, model, diffusion = build(args)
    if not net.fixed_point and "--num-iterations" in args.given:
        raise ValueError(f"--num-iterations sets an FPDM's iterations; {args.ckpt} is a DiT")
    if not 0 <= args.class_label < net.num_classes:  # num_classes itself would be the null class of guidance
        raise ValueError(f"--class-label must lie in [0, {net.num_classes - 1}] for this model")
    # The folder holds one configuration: args.json first, a rerun with other settings refused.
    settings = {**{k: v for k, v in vars(args).items() if k not in ("out", "device", "overwrite", "given")},
                "checkpoint_sha256": file_fingerprint(args.ckpt), "images_sha256": file_fingerprint(args.images)}
    claim_output_folder(args.out, settings, args.overwrite, outputs=OUTPUTS)
    target = load_targets(args.images, net.input_hw, net.in_channels, args.num_images).to(args.device)
    labels = torch.full((len(target),), args.class_label, dtype=torch.long, device=args.device)
    kwargs = {"y": labels}
    start = diffusion.ddim_reverse_sample_loop(model, target, clip_denoised=False, model_kwargs=kwargs)
    with torch.no_grad():
        start_sample = sequential_ddim(model, diffusion, start, kwargs)
    report = {"config": {k: v for k, v in vars(args).items() if k != "given"}, "initial_mse": F.mse_loss(start_sample, target).item(), "methods": {}}
    print(f"DDIM-inversion start: MSE {report['initial_mse']:.5f}")
    rows, histories = [target, start_sample], {}
    for method in methods:
        x_T, history = invert(model, diffusion, target, start, method, args.steps, args.lr, args.tau, kwargs,
                              args.max_iter, args.tol, args.chunk_size)
        with torch.no_grad():
            final = sequential_ddim(model, diffusion, x_T, kwargs)  # the exact sample, for both methods
        final_mse = F.mse_loss(final, target).item()
        report["methods"][method] = {"final_mse": final_mse, "wall_time_s": history[-1]["time_s"],
                                     "history": history}
        histories[method] = history
        rows.append(final)
        print(f"{method:>10}: MSE {history[0]['mse']:.5f} -> {final_mse:.5f} in {args.steps} steps, "
              f"{history[-1]['time_s']:.1f} s")
    with open(os.path.join(args.out, "inversion.json"), "w") as f:
        json.dump(report, f, indent=1)
    plot(histories, os.path.join(args.out, "mse.png"))
    grid = torch.cat(rows).float().clamp(-1, 1) * 0.5 + 0.5
    save_image(grid, os.path.join(args.out, "grid.png"), nrow=len(target), padding=1, pad_value=1.0)
    print(f"wrote {args.out}/inversion.json, mse.png, grid.png (rows: target, start, {', '.join(histories)})")
    return report


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="train.py checkpoint (EMA weights are used)")
    parser.add_argument("--images", required=True, help="folder of images, or an ADM .npz (arr_0: uint8 NxHxWx3), "
                                                        "centre-cropped to the model's size as training crops")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=8, help="first N targets")
    parser.add_argument("--num-sampling-steps", type=int, default=10, help="DDIM steps T'")
    parser.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS, default=TIMESTEP_SPACINGS[0],
                        help="the DDIM timesteps (diffusers' names; trailing starts at T-1)")
    parser.add_argument("--steps", type=int, default=50, help="Adam steps")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    parser.add_argument("--tau", type=float, default=0.1, help="phantom-gradient damping τ")
    parser.add_argument("--max-iter", type=int, default=15, help="Anderson iterations per step (phantom)")
    parser.add_argument("--tol", type=float, default=1e-3, help="Anderson relative-residual tolerance (phantom)")
    parser.add_argument("--chunk-size", type=int, default=None, help="states per network call (memory limit)")
    parser.add_argument("--methods", default="phantom,sequential", help="comma-separated: phantom, sequential")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--class-label", type=int, default=0, help="class label of all targets, in [0, N-1] for a "
                                                                   "model of N classes")
    parser.add_argument("--num-iterations", type=int, default=None, help="FPDM iterations per step (default: model's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="start over in an --out of other settings")
    args = parser.parse_args(argv)
    tokens = sys.argv[1:] if argv is None else argv
    args.given = {option for action in parser._actions for option in action.option_strings
                  if any(t == option or t.startswith(option + "=") for t in tokens)}  # the flags given, not defaulted
    return args


if __name__ == "__main__":
    from fpdm import cli
    cli.run_script(main, parse_args)
