"""Sample a grid from a DiT or FPDM checkpoint, with FPDM's compute dials and a compute report.

    python sample.py --ckpt results/run/checkpoints/step_0002500.pt --num-sampling-steps 50 --cfg-scale 2
    # FPDM at a budget of 560 block evaluations per image over 40 steps, more iterations at noisy steps, reuse on:
    python sample.py --ckpt ... --num-sampling-steps 40 --budget-block-evals 560 --schedule more-noisy --reuse
    # adaptive: stop each step's iterations once the relative residual < 1e-2 (at most 12):
    python sample.py --ckpt ... --adaptive-tol 1e-2 --iterations 12
    # budget-aware: exactly 560 block evaluations, each step's iterations decided online from its residuals:
    python sample.py --ckpt ... --num-sampling-steps 40 --budget-block-evals 560 --fp-allocation budget --reuse
    # the same with each step weighted by its measured effect on the samples (a 20-image calibration first):
    python sample.py --ckpt ... --num-sampling-steps 40 --budget-block-evals 560 --fp-allocation calibrated --reuse

Writes `args.json` (every setting that changes the samples, the checkpoint by content hash), then `grid.png` and
`compute.json` (model calls, block evaluations, FLOPs, iterations and final residual per step, wall time) into the
output folder. Its default name is readable and ends in a hash of those settings; a folder made with other settings
is never reused (one-line refusal; --overwrite starts over). DDIM and DDPM start at t = T - 1 ("trailing" spacing)
and clip x̂_0 only for pixel-space models (see --timestep-spacing, --clip-denoised). On CUDA, matmuls and
convolutions run in TF32 (--no-tf32: full fp32); --precision bf16 runs the network under bf16 autocast. args.json
records the precision ("fp32", "tf32", "bf16", "bf16+tf32"), so each has its own folder.
"""

import json
import os
import time

from fpdm import cpu_threads  # before torch: OpenMP reads its wait policy (OMP_WAIT_POLICY) when torch loads
import torch

from fpdm import cli, sample_config
from fpdm.run_folders import atomic_write
from fpdm.sampling import capabilities, claim_output_folder, resolve_device, save_grid


def parse_args(argv=None):
    return sample_config.parse_args(argv, "sample", __doc__)


def main(cfg):
    device = resolve_device(cfg.output.device)
    threads = cpu_threads.configure(device)  # CPU: the free cores only
    if threads:
        print(threads)
    setup = cli.Setup(cfg, device)
    model = setup.model
    labels = cli.class_labels(cfg, model.num_classes)
    cfg.grid.num_samples = cli.num_samples(cfg, labels)  # resolved, as compute.json records it
    labels = labels or [i % model.num_classes for i in range(cfg.grid.num_samples)]
    settings = cli.sample_settings(cfg, setup, labels)
    out = claim_output_folder(cli.output_folder(cfg, settings), settings, cfg.output.overwrite)
    setup.calibrate(cfg, device, out)

    g = torch.Generator().manual_seed(cfg.sampler.seed)
    noise = torch.randn(len(labels), model.in_channels, *model.input_hw, generator=g).to(device)
    y = torch.tensor(labels, device=device)

    def timed(sampler=None):  # every run draws its sampler noise (eta > 0, DDPM) from the same seed
        torch.manual_seed(cfg.sampler.seed)
        start = time.perf_counter()
        samples, fn = setup.sample(cfg, noise, y, sampler=sampler, progress=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return samples, fn, time.perf_counter() - start

    samples, fn, wall = timed()
    caps = capabilities(setup.sampler)
    compute, extra = (fn.info if caps.parallel else fn.compute()), {}
    if caps.parallel and cfg.parallel.compare_sequential:
        reference, seq_fn, seq_wall = timed("ddim")
        seq_calls = seq_fn.compute()["model_calls"]
        extra["sequential"] = {"wall_time_s": seq_wall, "network_evaluations": seq_calls,
                               "max_abs_difference": float((samples - reference).abs().max()),
                               "grid": "grid_sequential.png"}
        print(f"sequential DDIM: {seq_calls} network evaluations, {seq_wall:.1f} s; parallel: "
              f"{compute['network_evaluations']} in {compute.get('parallel_iterations', compute.get('outer_iterations'))} "
              f"parallel iterations, "
              f"{wall:.1f} s; max |difference| {extra['sequential']['max_abs_difference']:.2e}")
    nrow = model.num_classes if 1 < model.num_classes <= 16 and not cfg.output.class_labels else 8
    save_grid(cli.decode(samples, setup.vae), os.path.join(out, "grid.png"), nrow=nrow)
    if "sequential" in extra:  # the reference beside the parallel result, never over it
        save_grid(cli.decode(reference, setup.vae), os.path.join(out, extra["sequential"]["grid"]), nrow=nrow)
    report = {"args": cfg.flat(), "settings": settings, "precision": settings["resolved"]["precision"],
              "num_images": len(labels), "wall_time_s": wall,
              "wall_time_per_image_s": wall / len(labels), **compute, **extra}
    atomic_write(os.path.join(out, "compute.json"), lambda f: json.dump(report, f, indent=2))
    kind = "FPDM" if model.fixed_point else "DiT"
    if caps.sets_layer_iterations:
        print(f"FPDM, two-axis ({setup.options['solver']}, {compute['inner_iterations']} inner iterations): "
              f"{compute['outer_iterations']} outer iterations, {compute['block_evaluations']:.0f} block evaluations "
              f"per image, critical path {compute['critical_path_calls']} calls / {compute['critical_path_blocks']} "
              f"blocks (sequential: {compute['sequential_critical_path_calls']} calls), residual "
              f"{compute['residual']:.2e}, {wall:.1f} s")
    elif caps.parallel:
        print(f"{kind}, parallel DDIM ({setup.options['solver']}): {compute['parallel_iterations']} parallel "
              f"iterations, {compute['network_evaluations']} network evaluations per image (sequential: "
              f"{compute['sequential_evaluations']}), residual {compute['residual']:.2e}, {wall:.1f} s")
    else:
        print(f"{kind}: {len(labels)} images, {report['model_calls']} model calls, {report['block_evals']} block "
              f"evaluations per image and pass (x{report['cfg_passes']} with guidance), "
              f"{report['flops_per_image'] / 1e9:.2f} GFLOPs per image, {wall:.1f} s")
        if model.fixed_point:
            print(f"iterations per step: {report['iterations_per_step']}")
    print(f"wrote {os.path.join(out, 'grid.png')} and compute.json")
    return out, report


if __name__ == "__main__":
    cli.run_script(main, parse_args)
