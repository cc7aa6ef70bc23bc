"""The GPU benchmark: one command that fits a short lease (at most 9 minutes on one H100/H200, each section capped).

    python bench/gpu.py                       # on a GPU; writes bench/results/gpu-<name>.json (e.g. gpu-nvidia-h200)
    python bench/gpu.py --device cpu --tiny   # a dry run at tiny sizes (tests/test_bench.py runs it)
    python bench/gpu.py --sections train-eager,residual   # a subset

Needs what the GPU machine has (torch, numpy, timm, accelerate, tqdm, pyyaml, matplotlib) and, for the vae section
alone, diffusers: a pure-Python wheel to carry there (with huggingface-hub's if the machine's is older than diffusers
asks); without it that section is recorded as skipped, not failed. No dataset, no download: the inputs are random
32×32×4 latents (256 px images through the VAE) and 1,000 classes. Sections, each in its own process group under its
cap (a section that runs over is killed with its children and recorded as timed out with what it measured so far, the
others still run, within --deadline); the report is rewritten after every section, so a run cut off from outside keeps
the sections it finished. On a lease whose machine returns only one folder, write the report there:
`python bench/gpu.py --out $OUT/gpu.json`.

  train-eager     DiT-XL/2 vs FPDM-XL/2 training steps at batch 32, bf16 autocast, TF32, fused AdamW: images/s, peak CUDA
                  memory, and MFU (model FLOPs from torch's FLOP counter over the GPU's peak bf16 FLOP/s). FPDM draws
                  its S-JFB counts with training.sjfb_counts from the fpdm-xl2-in256 preset (n in 0..10, m in 1..12),
                  the same sequence in every variant; its FLOPs per step follow exactly from (n, m).
  sjfb            an FPDM-XL/2 training step with fixed S-JFB counts (n = 8, m = 2, batch 32, --dtype): ours (the
                  n iterations under torch.no_grad()) vs the release's style (recorded by autograd, then detached:
                  bench/bench_model.py's release_style_forward), same weights and batch, interleaved, medians:
                  the time ratio (issue 29's target: <= 0.95), peak memory, and each variant's top 10 kernels by
                  device time (torch.profiler, one step).
  train-compiled  the same with model.compile_regions() (compile time reported apart, steps after warm-up; FPDM's
                  blocks see DiT's shapes and strides: one more graph, for its no-grad iterations). Skipped, with the
                  reason, where torch.compile cannot build here (Triton needs a C compiler and Python's headers).
  sampling        20 DDIM steps at batch 32, DiT-XL/2 vs FPDM-XL/2 at equal block evaluations (with reuse):
                  images/s.
  precision       DiT-XL/2 sampling as sample.py runs it (sampling.sample_images, DDPM, guidance: the batch of 32
                  doubled) in fp32 (TF32 off), TF32, and bf16 autocast with TF32 (--precision bf16): images/s, ratios
                  to fp32, and the hours 50,000 DDPM-250 samples with guidance take on 8 GPUs at that rate; bf16 also
                  with autocast casting the float32 weights at every call (before DiT.cast_matmul_weights).
  latency         sequential DDIM (sample_steps) at batch 1 and 4 with DiT-XL/2 and FPDM-XL/2 (reuse): eager vs each
                  network call replayed from a CUDA graph (sample.py --cuda-graphs, fpdm/graphs.py): seconds, the
                  ratio, the largest sample difference, graphs captured. (Dry run: graphs emulated on the CPU.)
                  In bf16 the weights are cast once, as sample.py holds them (DiT.cast_matmul_weights).
  parallel        DEQ-DDIM (Anderson, per image) vs sequential DDIM at T' = 50 with DiT-B/2, one image: wall-clock;
                  the parallel solve reading the device every 1, 2 (default) and 4 iterations; ParaDiGMS' window
                  (all steps, τ = 0.1) reading it every 2 (default) and every iteration.
  two-axis        two-axis sampling (fpdm/two_axis.py, k = 1) vs sequential FPDM with reuse (k = 3), a contractive
                  FPDM-B/2, one image, sample_steps steps: wall-clock, block evaluations, critical path.
  residual        FPDM-XL/2's fixed-point residual floor: the smallest relative residual ||f(z) - z|| / ||z|| reached
                  in 60 iterations in bf16 autocast and in fp32 (the state stays fp32 under autocast).
  diagnostics     train.py's FPDM diagnostics at XL/2: seconds per fp_diagnostics.contraction call (probe batch of
                  10, the layer settled 2 (n_max + m_max) iterations, then 20 JVP power iterations), and apart, the
                  seconds TrainingDiagnostics.plot takes on a CSV of 200 rows (CPU work).
  vae             an SD-VAE-sized AutoencoderKL (sd-vae-ft-ema's architecture, random weights) at 256 px, batch 16:
                  encode and decode images/s (vae.encode_moments, vae.decode) in fp32, TF32 and bf16 autocast.
  checkpoint      a DiT-XL/2 training checkpoint (model + EMA + AdamW state, 10.8 GB) written with
                  checkpoints.write_training_checkpoint into --scratch (skipped under 30 GB free): GB/s; then, out of
                  the page cache, read back with checkpoints.read_training_checkpoint (memory-mapped) into the model,
                  EMA and optimizer as train.py resumes: seconds, and the peak RSS growth (all of it, and its anonymous
                  part: memory-mapped file pages count in the RSS but are page cache the kernel may drop).

The sampling, latency, parallel and two-axis sections sample as sample.py does with --precision <--dtype> (bf16 by
default): TF32 on, bf16 autocast around each network call on weights cast to bf16 once, everything the samplers do
between calls in float32.
Random weights are perturbed (adaLN-Zero makes a fresh model output zero); the FPDM layer is scaled to contract so
that the residual floor is one of precision, not of convergence.
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager

STARTED = time.perf_counter()  # --deadline counts from here: torch's import and CUDA's start are part of the run

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # the repository's packages also where it is not installed (a GPU machine's copy)

from fpdm.measure import peak_key, peak_tflops  # noqa: E402 -- the MFU denominators

# section -> (cap in seconds, expected seconds on an H100/H200 at full size); the caps add up to 8 min 50 s, under a
# 9-minute lease slot with the driver's own few seconds (DEADLINE_S bounds the whole run). Each child spends ~10 s
# importing torch and the models and starting CUDA; the models are built on the GPU. The expected times are estimates
# (FLOPs at the GPU's rates, a local NVMe disk for the checkpoint), none measured yet.
SECTIONS = {"train-eager": (75, 45), "sjfb": (20, 15), "train-compiled": (130, 100), "sampling": (35, 25),
            "precision": (40, 25), "latency": (30, 15), "parallel": (30, 15), "two-axis": (25, 15),
            "residual": (20, 10), "diagnostics": (25, 15), "vae": (30, 15), "checkpoint": (70, 45)}
DEADLINE_S = 540  # the whole run; what --deadline defaults to at full size
MIN_SECTION_S = 10  # no section starts with less time than this left
KILL_WAIT_S = 15  # how long the driver waits for a killed section's processes to exit

FULL = {"input_size": 32, "batch": 32, "dit": "DiT-XL/2", "fpdm": "DiT-XL/2", "parallel_model": "DiT-B/2",
        "train_steps": 20, "warmup": 3, "sample_steps": 20, "parallel_steps": 50, "num_classes": 1000, "size": {},
        "precision_steps": 10, "contraction_calls": 2, "plot_rows": 200, "vae_channels": (128, 256, 512, 512),
        "vae_resolution": 256, "vae_batch": 16, "vae_repeats": 3, "checkpoint_free_gb": 30, "sjfb_repeats": 10}
TINY = {"input_size": 8, "batch": 4, "dit": "DiT-S/2", "fpdm": "DiT-S/2", "parallel_model": "DiT-S/2",
        "train_steps": 3, "warmup": 1, "sample_steps": 4, "parallel_steps": 6, "num_classes": 10,
        "size": {"hidden_size": 32, "num_heads": 2, "depth": 4},
        "precision_steps": 3, "contraction_calls": 1, "plot_rows": 200, "vae_channels": (32, 32),
        "vae_resolution": 16, "vae_batch": 2, "vae_repeats": 1, "checkpoint_free_gb": 0.1, "sjfb_repeats": 2}

# The precisions sample.py offers, named as its args.json records them: (name, TF32 on, sample_images' precision).
PRECISIONS = (("fp32", False, "fp32"), ("tf32", True, "fp32"), ("bf16+tf32", True, "bf16"))
FID_SAMPLES, FID_STEPS, FID_GPUS = 50_000, 250, 8  # DiT's FID-50K: DDPM-250 with guidance, here spread on 8 GPUs


# ------------------------------------------------------------------------------------------------------------------
# Sections (each runs in its own process)
# ------------------------------------------------------------------------------------------------------------------

def build(name, sizes, fixed_point=False, device="cpu", contract=False):
    """A DiT or FPDM, initialised and perturbed on `device` (at XL/2 a CPU takes ~20 s of a section's short cap)."""
    import torch

    from fpdm.measure import perturb_parameters_
    from models import DiT_models
    torch.manual_seed(0)
    fp = dict(fixed_point=True, fixed_point_pre_depth=1, fixed_point_post_depth=1) if fixed_point else {}
    with torch.device(device):
        model = DiT_models[name](input_size=sizes["input_size"], in_channels=4, num_classes=sizes["num_classes"],
                                 learn_sigma=True, **sizes["size"], **fp)
        perturb_parameters_(model)
    if contract:  # shrink the projection MLP: the layer becomes a clear contraction
        with torch.no_grad():
            model.block_fixed_point_projection_fc1.weight.mul_(0.3)
            model.block_fixed_point_projection_fc2.weight.mul_(0.3)
    return model.to(device)


def synchronize(device):
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize()


def autocast(device, dtype):
    import torch
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


def set_tf32(enabled):
    """TensorFloat-32 for matmuls and cuDNN convolutions, both or neither, as sample.py and train.py set it (--tf32);
    the CPU ignores it."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled


def as_sample_py(args):
    """The precision sample.py runs at with --precision <--dtype>: TF32 on (its default, --tf32) and bf16 autocast
    per network call (GuidedModel's), everything between calls float32. Returns sample_images' `precision`."""
    set_tf32(True)
    return args.dtype


def for_sampling(model, precision):
    """`model` as sample.py holds it at `precision`: under bf16 its linear and convolution weights cast once
    (cli.Setup: DiT.cast_matmul_weights)."""
    import torch
    return model.cast_matmul_weights(torch.bfloat16) if precision == "bf16" else model


def one_image(sizes, device):
    """The one-image sections' input: seeded noise (1, 4, input_size, input_size) and class 0."""
    import torch
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, sizes["input_size"], sizes["input_size"], generator=g).to(device)
    return noise, torch.zeros(1, dtype=torch.long, device=device)


def timed(device, fn, repeats):
    """Seconds per call of fn(), the mean of `repeats` calls after one to warm up."""
    fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def keep_partial(args, result):
    """Write what a section has measured so far, atomically: the driver keeps it if the section then overruns its
    cap. Tensors (samples kept for a comparison still to come) are written as a note, not their values."""
    import torch

    from fpdm.run_folders import atomic_write

    def tensor_note(value):
        if isinstance(value, torch.Tensor):
            return "(a tensor, kept for a comparison)"
        raise TypeError(f"{type(value).__name__} in a section's result")
    atomic_write(args.section_out, lambda f: json.dump(result, f, default=tensor_note))


def compiler_problem(device):
    """None where torch.compile builds and runs a one-line function on `device`, else why not, in one line: its
    first compile needs a C compiler (and on CUDA, for Triton's launcher, Python's headers), which a machine may lack."""
    import torch
    try:
        torch.compile(lambda v: v * 2 + 1)(torch.ones(8, device=device))
        synchronize(device)
    except Exception as e:  # noqa: BLE001 -- any failure to build means the section cannot measure
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return f"torch.compile does not build here ({type(e).__name__}: {first})"
    return None


def scratch(args, name):
    """A new folder `name` in the driver's temporary folder (under --scratch): removed when the run ends, also after
    a section killed at its cap."""
    path = os.path.join(os.path.dirname(os.path.abspath(args.section_out)), name)
    os.makedirs(path)
    return path


def train_section(args, sizes, compiled):
    """images/s, peak memory and MFU of DiT vs FPDM training steps (eager or regionally compiled)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion import create_diffusion
    from fpdm import config as configs
    from fpdm import training
    device = torch.device(args.device)
    set_tf32(True)  # train.py's default (--tf32): matmuls outside autocast (and all of them with --dtype fp32)
    diffusion = create_diffusion("", learn_sigma=True).prepare(device)
    cfg = configs.preset("fpdm-xl2-in256")
    steps = sizes["warmup"] + sizes["train_steps"]
    draws = [training.sjfb_counts(cfg, step) for step in range(steps)]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sizes["batch"], 4, sizes["input_size"], sizes["input_size"], generator=g).to(device)
    y = torch.randint(0, sizes["num_classes"], (sizes["batch"],), generator=g).to(device)
    t = torch.randint(0, 1000, (steps, sizes["batch"]), generator=g).to(device)
    peak = peak_tflops(args.device_name) if device.type == "cuda" else None
    out = {}
    if compiled:
        problem = compiler_problem(device)
        if problem:
            return {"skipped": problem}
    for variant, fixed_point in (("dit", False), ("fpdm", True)):
        model = build(sizes["fpdm" if fixed_point else "dit"], sizes, fixed_point, device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step(i, counts=None):
            kwargs = {"y": y}
            if fixed_point:
                kwargs["num_iterations"] = counts or draws[i]
            with autocast(device, args.dtype):
                loss = diffusion.training_losses(model, x, t[i], model_kwargs=kwargs)["loss"].mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        def flops(counts=None):
            with FlopCounterMode(display=False) as counter:
                step(0, counts)
            return counter.get_total_flops()
        # Model FLOPs per step: DiT's is constant; FPDM's is F(n, m) = F0 + a·n + b·m, exact from three counts.
        if fixed_point:
            f01, f11, f02 = flops((0, 1)), flops((1, 1)), flops((0, 2))
            a, b = f11 - f01, f02 - f01
            per_step = [f01 - b + a * n + b * m for n, m in draws]
        else:
            per_step = [flops()] * steps
        compile_s = 0.0
        if compiled:
            start = time.perf_counter()
            model.compile_regions()
            for i in range(sizes["warmup"]):
                step(i)
            synchronize(device)
            compile_s = time.perf_counter() - start
        else:
            for i in range(sizes["warmup"]):
                step(i)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        synchronize(device)
        start = time.perf_counter()
        for i in range(sizes["warmup"], steps):
            step(i)
        synchronize(device)
        elapsed = time.perf_counter() - start
        timed_flops = sum(per_step[sizes["warmup"]:])
        out[variant] = {"params": sum(p.numel() for p in model.parameters()),
                        "images_per_s": sizes["batch"] * sizes["train_steps"] / elapsed,
                        "step_s": elapsed / sizes["train_steps"],
                        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
                        "tflops_per_step": timed_flops / sizes["train_steps"] / 1e12,
                        "achieved_tflops": timed_flops / elapsed / 1e12,
                        "mfu": timed_flops / elapsed / 1e12 / peak if peak else None,
                        "compile_s": compile_s if compiled else None,
                        "sjfb_draws": draws[sizes["warmup"]:] if fixed_point else None}
        keep_partial(args, out)
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["fpdm/dit images_per_s"] = out["fpdm"]["images_per_s"] / out["dit"]["images_per_s"]
    out["fpdm/dit peak_mem"] = (out["fpdm"]["peak_mem_mb"] / out["dit"]["peak_mem_mb"]
                                if out["dit"]["peak_mem_mb"] else None)
    return out


def sjfb_section(args, sizes):
    """Our S-JFB training step vs the release's style at fixed counts (bench_model's variants), side by side."""
    import statistics
    from types import SimpleNamespace

    import torch

    import bench_model
    device = torch.device(args.device)
    width = sizes["size"].get("hidden_size", 1152)
    config = SimpleNamespace(input_size=sizes["input_size"], patch_size=2, hidden_size=width,
                             num_heads=sizes["size"].get("num_heads", 16), depth=sizes["size"].get("depth", 28),
                             grad_ckpt=False, device=device.type, dtype=args.dtype, no_grad_iters=8,
                             with_grad_iters=2, batch_size=sizes["batch"])
    model = bench_model.build(config, "fpdm").to(device).train()
    batch = bench_model.make_batch(config)
    variants = ("fpdm", "fpdm_release_nograd")
    names = {"fpdm": "ours", "fpdm_release_nograd": "release-style"}

    def step(variant):
        bench_model.train_step(model, variant, batch, config)
    out = {"model": f"FPDM width {width}, {sizes['input_size']}x{sizes['input_size']}x4, patch 2",
           "batch": sizes["batch"], "n": 8, "m": 2, "dtype": args.dtype}
    for variant in variants:  # warm-up (kernels chosen, allocator grown)
        step(variant)
    times = {variant: [] for variant in variants}
    for _ in range(sizes["sjfb_repeats"]):  # round-robin: machine noise hits both alike
        for variant in variants:
            synchronize(device)
            start = time.perf_counter()
            step(variant)
            synchronize(device)
            times[variant].append(time.perf_counter() - start)
    for variant in variants:
        out[names[variant]] = {"step_s": statistics.median(times[variant]), "steps": len(times[variant])}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step(variant)
            synchronize(device)
            out[names[variant]]["peak_mem_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    out["ours/release-style step time"] = out["ours"]["step_s"] / out["release-style"]["step_s"]
    keep_partial(args, out)
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for variant in variants:
        with profile(activities=activities) as prof:
            step(variant)
            synchronize(device)
        def self_us(e):  # the time of the kernels themselves (a CPU op's own time on the CPU); torch < 2.4: cuda_
            if device.type != "cuda":
                return e.self_cpu_time_total
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        events = sorted(prof.key_averages(), key=self_us, reverse=True)[:10]
        out[names[variant]]["top_kernels"] = [{"name": e.key[:80], "ms": self_us(e) / 1e3, "calls": e.count}
                                              for e in events]
        keep_partial(args, out)
    return out


def sampling_section(args, sizes):
    """DDIM images/s, DiT vs FPDM at the DiT's block-evaluation budget (FPDM with reuse)."""
    import torch

    from fpdm.sampling import diffusion_for_sampling, iterations_from_block_budget, sample_images
    device = torch.device(args.device)
    diffusion = diffusion_for_sampling({"learn_sigma": True}, sizes["sample_steps"])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(sizes["batch"], 4, sizes["input_size"], sizes["input_size"], generator=g).to(device)
    labels = torch.randint(0, sizes["num_classes"], (sizes["batch"],), generator=g).to(device)
    precision = as_sample_py(args)
    out = {"precision": precision}
    dit = for_sampling(build(sizes["dit"], sizes, False, device).eval(), precision)
    budget = sizes["sample_steps"] * dit.block_evaluations()
    for variant, fixed_point in (("dit", False), ("fpdm", True)):
        model = dit if not fixed_point else for_sampling(build(sizes["fpdm"], sizes, True, device).eval(), precision)
        iters = iterations_from_block_budget(model, budget, sizes["sample_steps"]) if fixed_point else None

        def run():
            _, fn = sample_images(model, diffusion, noise, labels, iterations_per_step=iters, reuse=fixed_point,
                                  precision=precision)
            synchronize(device)
            return fn
        run()  # warm-up
        start = time.perf_counter()
        fn = run()
        elapsed = time.perf_counter() - start
        out[variant] = {"images_per_s": sizes["batch"] / elapsed, "block_evals": fn.compute()["block_evals"]}
        keep_partial(args, out)
    out["fpdm/dit images_per_s"] = out["fpdm"]["images_per_s"] / out["dit"]["images_per_s"]
    return out


def timed_sampling(device, *args, seed=None, **options):
    """sampling.sample_images(*args, **options) once to warm up, then timed: (seconds, samples, GuidedModel, the
    sampler's numeric info). With a seed, torch's RNG is seeded before each run, so that DDPM's draws are the same in
    every run and samples compare one to one."""
    import torch

    from fpdm.sampling import sample_images

    def run():
        if seed is not None:
            torch.manual_seed(seed)
        x, fn = sample_images(*args, **options)
        synchronize(device)
        return x, fn
    run()
    start = time.perf_counter()
    x, fn = run()
    return time.perf_counter() - start, x, fn, {k: v for k, v in fn.info.items() if isinstance(v, (int, float, bool))}


def precision_section(args, sizes):
    """DiT-XL/2 sampling throughput as sample.py runs it (sample_images, DDPM, guidance at 1.5: the network sees the
    batch doubled) in each of PRECISIONS: images/s at `precision_steps` steps, the ratio to fp32, the largest
    difference of the samples to fp32's (the same DDPM draws), and the hours FID_SAMPLES samples of FID_STEPS steps
    take on FID_GPUS GPUs at this batch (the network alone: no VAE decode, no PNGs)."""
    import torch

    from fpdm.sampling import diffusion_for_sampling
    device = torch.device(args.device)
    steps = sizes["precision_steps"]
    model = build(sizes["dit"], sizes, False, device).eval()
    diffusion = diffusion_for_sampling({"learn_sigma": True}, steps)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(sizes["batch"], 4, sizes["input_size"], sizes["input_size"], generator=g).to(device)
    labels = torch.randint(0, sizes["num_classes"], (sizes["batch"],), generator=g).to(device)
    out = {"model": sizes["dit"], "batch": sizes["batch"], "steps": steps, "sampler": "ddpm", "cfg_scale": 1.5}
    reference = None
    # bf16 first as autocast alone runs it (the float32 weights cast at every call), then as sample.py does
    for name, tf32, precision in (*PRECISIONS[:-1], ("bf16+tf32 per-call casts", True, "bf16"), PRECISIONS[-1]):
        set_tf32(tf32)
        if name == PRECISIONS[-1][0]:
            for_sampling(model, precision)
        seconds, x, fn, _ = timed_sampling(device, model, diffusion, noise, labels, seed=0, sampler="ddpm",
                                           cfg_scale=1.5, precision=precision)
        reference = x if reference is None else reference
        image_step_s = seconds / (sizes["batch"] * steps)  # one guided image through one step (two network rows)
        out[name] = {"images_per_s": sizes["batch"] / seconds, "ms_per_image_step": 1e3 * image_step_s,
                     "cfg_passes": fn.compute()["cfg_passes"], "tf32": tf32,
                     "max_abs_diff_to_fp32": (x.float() - reference.float()).abs().max().item(),
                     "fid50k_hours_8gpus": FID_SAMPLES * FID_STEPS * image_step_s / FID_GPUS / 3600}
        keep_partial(args, out)
    for name, _, _ in PRECISIONS[1:]:
        out[f"{name}/fp32 images_per_s"] = out[name]["images_per_s"] / out["fp32"]["images_per_s"]
    out["bf16 weights cast once/per call images_per_s"] = (out[PRECISIONS[-1][0]]["images_per_s"] /
                                                           out["bf16+tf32 per-call casts"]["images_per_s"])
    return out


def parallel_section(args, sizes):
    """DEQ-DDIM (Anderson per image) vs sequential DDIM wall-clock, one image, T' = parallel_steps."""
    import torch

    from fpdm.sampling import diffusion_for_sampling
    device = torch.device(args.device)
    precision = as_sample_py(args)
    model = for_sampling(build(sizes["parallel_model"], sizes, False, device).eval(), precision)
    diffusion = diffusion_for_sampling({"learn_sigma": True}, sizes["parallel_steps"])
    noise, labels = one_image(sizes, device)
    out = {"precision": precision}
    for name, options in (("sequential", {"sampler": "ddim"}), ("parallel", {"sampler": "ddim-parallel"}),
                          ("parallel-sync1", {"sampler": "ddim-parallel", "sync_every": 1}),
                          ("parallel-sync4", {"sampler": "ddim-parallel", "sync_every": 4}),
                          ("window", {"sampler": "ddim-parallel", "solver": "window"}),
                          ("window-sync1", {"sampler": "ddim-parallel", "solver": "window", "sync_every": 1})):
        seconds, x, fn, info = timed_sampling(device, model, diffusion, noise, labels, precision=precision,
                                              **options)
        out[name] = {"seconds": seconds, "info": info, "result": x}
        keep_partial(args, out)
    for name in ("parallel", "parallel-sync1", "parallel-sync4", "window", "window-sync1"):
        out[name]["max_abs_difference"] = (out[name].pop("result") - out["sequential"]["result"]).abs().max().item()
        out[f"sequential/{name} time"] = out["sequential"]["seconds"] / out[name]["seconds"]
    out["sequential"].pop("result")
    return out


def latency_section(args, sizes):
    """Sequential DDIM at small batches, eager vs CUDA graphs (one graph per distinct network call, fpdm/graphs.py):
    DiT and FPDM (reuse, the DiT's block budget), batch 1 and 4, sample_steps steps, in --dtype as sample.py's
    --precision. On the CPU (dry run) the graphs are emulated, which checks the plumbing, not the speed."""
    import torch

    from fpdm.graphs import EmulatedGraphs, GraphedCalls
    from fpdm.sampling import diffusion_for_sampling, iterations_from_block_budget
    device = torch.device(args.device)
    diffusion = diffusion_for_sampling({"learn_sigma": True}, sizes["sample_steps"])
    out, precision = {}, as_sample_py(args)
    dit = for_sampling(build(sizes["dit"], sizes, False, device).eval(), precision)
    budget = sizes["sample_steps"] * dit.block_evaluations()
    for variant, fixed_point in (("dit", False), ("fpdm", True)):
        model = dit if not fixed_point else for_sampling(build(sizes["fpdm"], sizes, True, device).eval(), precision)
        options = {"iterations_per_step": iterations_from_block_budget(model, budget, sizes["sample_steps"]),
                   "reuse": True} if fixed_point else {}
        for batch in (1, 4):
            g = torch.Generator().manual_seed(batch)
            noise = torch.randn(batch, 4, sizes["input_size"], sizes["input_size"], generator=g).to(device)
            labels = torch.randint(0, sizes["num_classes"], (batch,), generator=g).to(device)
            row, results = {}, {}
            for mode in ("eager", "graphs"):
                graphs = None if mode == "eager" else GraphedCalls(EmulatedGraphs() if device.type == "cpu" else None)
                # as sample.py runs it: --precision bf16 is GuidedModel's own autocast, per call, on weights cast
                # to bf16 once (a replay casts activations only)
                seconds, x, fn, _ = timed_sampling(device, model, diffusion, noise, labels, graphs=graphs,
                                                   precision=precision, **options)
                row[f"{mode}_s"], results[mode] = seconds, x
                if graphs is not None:
                    row["graphs_captured"] = graphs.captures
            row["eager/graphs time"] = row["eager_s"] / row["graphs_s"]
            row["max_abs_difference"] = (results["graphs"] - results["eager"]).abs().max().item()
            out[f"{variant}-batch{batch}"] = row
            keep_partial(args, out)
    return out


def two_axis_section(args, sizes):
    """Two-axis sampling (fpdm/two_axis.py: the DDIM chain and FPDM's layer as one fixed point, k = 1 layer
    iteration per state per outer iteration) vs sequential FPDM DDIM with reuse at 3 iterations per step: wall-clock,
    block evaluations and critical path, one image, T' = sample_steps, the contractive FPDM of parallel_model size."""
    import torch

    from fpdm.sampling import diffusion_for_sampling
    device = torch.device(args.device)
    precision = as_sample_py(args)
    model = for_sampling(build(sizes["parallel_model"], sizes, True, device, contract=True).eval(), precision)
    diffusion = diffusion_for_sampling({"learn_sigma": True}, sizes["sample_steps"])
    noise, labels = one_image(sizes, device)
    out = {"precision": precision}
    for name, options in (("sequential", {"sampler": "ddim", "iterations_per_step": 3, "reuse": True}),
                          ("two-axis", {"sampler": "ddim-two-axis", "iterations_per_step": 1})):
        seconds, x, fn, info = timed_sampling(device, model, diffusion, noise, labels, precision=precision,
                                              **options)
        out[name] = {"seconds": seconds, "block_evals": fn.compute()["block_evals"],
                     "critical_path_calls": info.get("critical_path_calls", fn.calls), "info": info, "result": x}
        keep_partial(args, out)
    out["max_abs_difference"] = (out["two-axis"].pop("result") - out["sequential"].pop("result")).abs().max().item()
    out["sequential/two-axis time"] = out["sequential"]["seconds"] / out["two-axis"]["seconds"]
    return out


def residual_section(args, sizes):
    """The smallest relative residual FPDM's layer reaches in 60 iterations, bf16 autocast vs fp32."""
    import torch
    device = torch.device(args.device)
    model = build(sizes["fpdm"], sizes, True, device, contract=True).eval()
    model.fixed_point_track_residuals = True
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sizes["batch"], 4, sizes["input_size"], sizes["input_size"], generator=g).to(device)
    y = torch.randint(0, sizes["num_classes"], (sizes["batch"],), generator=g).to(device)
    t = torch.full((sizes["batch"],), 500, device=device)
    out = {}
    for dtype in ("fp32", "bf16"):
        with torch.no_grad(), autocast(device, dtype):
            model(x, t, y, num_iterations=60)
        residuals = model.last_stats.residual_values()
        out[dtype] = {"floor": min(residuals), "final": residuals[-1], "iterations": len(residuals)}
        keep_partial(args, out)
    return out


class ProbeLatents(list):
    """(latent, label) pairs: all TrainingDiagnostics needs of a dataset besides `augment`, here the identity."""

    def augment(self, x):
        return x


def diagnostics_section(args, sizes):
    """train.py's FPDM diagnostics at the fpdm-xl2-in256 preset's sizes: seconds per fp_diagnostics.contraction call
    on a probe batch as probe_batch builds it (10 examples, t at the centres of the 10 buckets) in train.py's default
    TF32, and apart, TrainingDiagnostics.plot on a CSV of `plot_rows` rows (its first call includes importing
    matplotlib)."""
    import math

    import torch

    from fpdm import config as configs
    from diffusion import create_diffusion
    from fpdm.diagnostics import BUCKETS, TrainingDiagnostics, contraction
    device = torch.device(args.device)
    set_tf32(True)
    power_iterations = configs.preset("fpdm-xl2-in256").run.fp_power_iterations
    model = build(sizes["fpdm"], sizes, True, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BUCKETS, 4, sizes["input_size"], sizes["input_size"], generator=g).to(device)
    y = torch.randint(0, sizes["num_classes"], (BUCKETS,), generator=g).to(device)
    t = ((torch.arange(BUCKETS) + 0.5) * 1000 / BUCKETS).long().to(device)
    result = {}

    def call():  # contraction reads its result back: it ends synchronised
        result["rho"], details = contraction(model, x, t, y, power_iterations=power_iterations)
        result["probe_residual"] = max(details["residual"])
    seconds = timed(device, call, sizes["contraction_calls"])
    settle = 2 * (model.fixed_point_no_grad_iters[1] + model.fixed_point_with_grad_iters[1])  # contraction's default
    out = {"model": sizes["fpdm"], "contraction_s": seconds, "probe_batch": BUCKETS,
           "power_iterations": power_iterations, "settle_iterations": settle, **result}
    keep_partial(args, out)

    folder = scratch(args, "diagnostics")
    plots = TrainingDiagnostics(folder, ProbeLatents([(torch.zeros(4, 2, 2), 0)]), create_diffusion(""), "cpu")
    with open(plots.path, "a", newline="") as f:  # rows as train.py appends them, ρ near 1, residuals over decades
        writer = csv.writer(f)
        for i in range(sizes["plot_rows"]):
            rho = 0.9 + 0.1 * math.sin(i / 10)
            residuals = [math.nan if (i + b) % 37 == 0 else 10 ** (-1 - b / 5 - i / 100) for b in range(BUCKETS)]
            writer.writerow([100 * (i + 1), rho, rho - 0.05, 1e-3, *residuals])
    for key in ("plot_first_s", "plot_s"):
        start = time.perf_counter()
        plots.plot()
        out[key] = time.perf_counter() - start
    out["plot_rows"] = len(plots.rows())
    return out


def vae_section(args, sizes):
    """Encode and decode images/s of an AutoencoderKL of sd-vae-ft-ema's architecture (random weights: the shapes
    set the cost) at `vae_resolution` px, batch `vae_batch`, through vae.encode_moments and vae.decode, in each of
    PRECISIONS (bf16 as autocast; sample.py keeps its decode in float32, under TF32 by default)."""
    import torch
    try:
        from diffusers import AutoencoderKL
    except (ImportError, RuntimeError) as e:  # diffusers' lazy imports raise RuntimeError for a broken dependency
        return {"skipped": f"no diffusers here ({e}): carry its wheel to run this section"}

    from fpdm import vae
    device = torch.device(args.device)
    channels, size, batch = sizes["vae_channels"], sizes["vae_resolution"], sizes["vae_batch"]
    torch.manual_seed(0)
    model = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                          block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * len(channels),
                          up_block_types=("UpDecoderBlock2D",) * len(channels), sample_size=size).to(device).eval()
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device)
    latent = size // 2 ** (len(channels) - 1)
    latents = torch.randn(batch, 4, latent, latent, generator=g).to(device)
    out = {"params": sum(p.numel() for p in model.parameters()), "resolution": size, "batch": batch,
           "latent_shape": [4, latent, latent]}
    for name, tf32, precision in PRECISIONS:
        set_tf32(tf32)
        with autocast(device, precision), torch.no_grad():  # as extract_features.py encodes: no graph kept
            encode_s = timed(device, lambda: vae.encode_moments(model, pixels), sizes["vae_repeats"])
            decode_s = timed(device, lambda: vae.decode(latents, model), sizes["vae_repeats"])
        out[name] = {"encode_images_per_s": batch / encode_s, "decode_images_per_s": batch / decode_s}
        keep_partial(args, out)
    for name, _, _ in PRECISIONS[1:]:
        out[f"{name}/fp32 decode images_per_s"] = (out[name]["decode_images_per_s"] /
                                                   out["fp32"]["decode_images_per_s"])
    return out


def status_bytes(field):
    """A memory field of /proc/self/status (VmRSS, RssAnon, ...) in bytes; None where the system has none."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


@contextmanager
def anonymous_peak(every_s=0.01):
    """Sample RssAnon every `every_s` seconds while the block runs; yields a dict whose "peak" is the largest sample
    (None without /proc). The anonymous part is what a process holds as its own; the RSS besides counts the file
    pages a memory map has touched, page cache the kernel can drop at any time."""
    seen, stop = {"peak": status_bytes("RssAnon")}, threading.Event()

    def sample():
        while not stop.wait(every_s):
            value = status_bytes("RssAnon")
            if value is not None:
                seen["peak"] = max(seen["peak"], value)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield seen
    finally:
        stop.set()
        sampler.join()
        value = status_bytes("RssAnon")
        if value is not None:
            seen["peak"] = max(seen["peak"], value)


def filesystem(path):
    """The type of the filesystem that holds `path` (ext4, xfs, overlay, tmpfs, ...) from /proc/mounts, or None."""
    path, best, kind = os.path.realpath(path), "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                mount, mount_kind = line.split()[1:3]
                if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                    best, kind = mount, mount_kind
    except OSError:
        pass
    return kind


def checkpoint_section(args, sizes):
    """A DiT training checkpoint as train.py writes it (model, EMA, AdamW's two moments: 4 × 4 bytes a parameter,
    10.8 GB at XL/2) through checkpoints.write_training_checkpoint (the copy to the CPU, torch.save, fsync) into the
    scratch folder: GB/s. Then the file is dropped from the page cache (posix_fadvise; its pages are clean after the
    fsync) and read back as a resume does, checkpoints.read_training_checkpoint (memory-mapped) then load_state_dict
    into the model, EMA and optimizer: seconds, and the peak RSS growth, all of it and its anonymous part."""
    import copy
    import shutil

    import torch

    from fpdm.checkpoints import read_training_checkpoint, rng_state, write_training_checkpoint
    from fpdm.measure import peak_rss_bytes, reset_peak_rss
    from models import DiT_models
    device = torch.device(args.device)
    folder = scratch(args, "checkpoint")
    os.makedirs(os.path.join(folder, "checkpoints"))  # train.py makes it when the run starts
    free = shutil.disk_usage(folder).free
    out = {"model": sizes["dit"], "filesystem": filesystem(folder), "free_gb": free / 1e9}
    if free < sizes["checkpoint_free_gb"] * 1e9:
        return {**out, "skipped": f"{free / 1e9:.1f} GB free where the checkpoint would go, under the "
                                  f"{sizes['checkpoint_free_gb']} GB this section asks for (choose --scratch)"}
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it lives: the values do not matter to the file's size
        model = DiT_models[sizes["dit"]](input_size=sizes["input_size"], num_classes=sizes["num_classes"],
                                         learn_sigma=True, **sizes["size"])
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=device.type == "cuda")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # AdamW's moments exist from the first step on
    optimizer.zero_grad(set_to_none=True)
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": optimizer.state_dict(), "sched": {},
             "config": {}, "model_config": model.config, "world_size": 1, "rng": [rng_state()]}
    synchronize(device)
    start = time.perf_counter()
    name = write_training_checkpoint(folder, 1, state, keep_last=1)
    out["write_s"] = time.perf_counter() - start
    path = os.path.join(folder, name)
    out["gb"] = os.path.getsize(path) / 1e9
    out["write_gb_per_s"] = out["gb"] / out["write_s"]
    del state
    keep_partial(args, out)  # the write's figures survive a read that overruns the cap

    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out["page_cache_dropped"] = True
    except (AttributeError, OSError):  # not on this system: the read below comes from the page cache
        out["page_cache_dropped"] = False
    finally:
        os.close(fd)
    reset_peak_rss()
    rss, anonymous = peak_rss_bytes(), status_bytes("RssAnon")
    with anonymous_peak() as seen:
        start = time.perf_counter()
        ckpt = read_training_checkpoint(path)
        out["read_s"] = time.perf_counter() - start
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["opt"])
        synchronize(device)
        out["restore_s"] = time.perf_counter() - start
        del ckpt
    out["restore_gb_per_s"] = out["gb"] / out["restore_s"]
    out["rss_peak_growth_gb"] = (peak_rss_bytes() - rss) / 1e9
    out["anonymous_peak_growth_gb"] = (seen["peak"] - anonymous) / 1e9 if anonymous is not None else None
    return out


def run_section(name, args):
    sizes = TINY if args.tiny else FULL
    if name.startswith("train"):
        return train_section(args, sizes, compiled=name == "train-compiled")
    return {"sjfb": sjfb_section, "sampling": sampling_section, "precision": precision_section,
            "latency": latency_section,
            "parallel": parallel_section,
            "two-axis": two_axis_section, "residual": residual_section, "diagnostics": diagnostics_section,
            "vae": vae_section, "checkpoint": checkpoint_section}[name](args, sizes)


# ------------------------------------------------------------------------------------------------------------------
# The driver: one process per section, each under its cap
# ------------------------------------------------------------------------------------------------------------------

def main():
    began = STARTED
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available (else an error unless --tiny)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                        help="autocast of the train and sampling sections (precision, residual and vae run several)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a dry run of every section")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=None, help="default: bench/results/gpu-<device name>.json")
    parser.add_argument("--scratch", default=None, help="folder for the sections' temporary files, the checkpoint "
                                                        "section's 10.8 GB among them (default: the system's)")
    parser.add_argument("--deadline", type=float, default=None,
                        help=f"seconds for the whole run: a section gets the smaller of its cap and what is left, "
                             f"and none starts with under {MIN_SECTION_S} s left (default: {DEADLINE_S}; a dry run: "
                             f"its tripled caps)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # child mode: run one section, write --section-out
    parser.add_argument("--section-out", help=argparse.SUPPRESS)
    parser.add_argument("--device-name", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.section:
        keep_partial(args, run_section(args.section, args))
        return

    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(args.device).type == "cuda"
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}, but torch sees no CUDA device")
    if not cuda and not args.tiny:
        parser.error("full sizes (XL/2) need a GPU: pass --device cuda on a GPU machine, or --tiny for a dry run")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f"--sections {','.join(unknown) or '(empty)'}: choose from {', '.join(SECTIONS)}")
    name = torch.cuda.get_device_name(args.device) if cuda else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = args.out or os.path.join(HERE, "results", f"gpu-{slug}.json")
    caps = {s: SECTIONS[s][0] for s in sections}
    expected = sum(SECTIONS[s][1] for s in sections)
    print(f"{name}, torch {torch.__version__}, {args.dtype}{', tiny sizes' if args.tiny else ''}: sections "
          f"{', '.join(sections)}; expected about {expected // 60} min {expected % 60} s at full size on an H100/H200, "
          f"at most {sum(caps.values()) // 60} min {sum(caps.values()) % 60} s (caps "
          f"{', '.join(f'{s} {c} s' for s, c in caps.items())})", flush=True)
    if args.tiny:  # a dry run on CPU cores others may share: the caps are the lease's, so they get room here
        caps = {s: 3 * c for s, c in caps.items()}
        print("dry run: each cap tripled", flush=True)
    deadline = args.deadline or (sum(caps.values()) + 60 if args.tiny else DEADLINE_S)

    report = {"device": name, "torch": torch.__version__, "python": platform.python_version(), "dtype": args.dtype,
              "tiny": args.tiny, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "peak_key": peak_key(name) if cuda else None, "peak_bf16_tflops": peak_tflops(name) if cuda else None,
              "deadline_s": deadline, "sections": {}, "wall_s": {}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    from fpdm.run_folders import atomic_write
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        for section in sections:
            part = os.path.join(tmp, f"{section}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--section", section, "--section-out", part,
                   "--device", args.device, "--dtype", args.dtype, "--device-name", name, *(["--tiny"] * args.tiny)]
            start = time.perf_counter()
            left = deadline - (start - began)
            if left < MIN_SECTION_S:
                error = f"not run: {left:.0f} s of the --deadline of {deadline:.0f} s left"
            else:
                error = run_capped(cmd, min(caps[section], left), env)
            result = json.load(open(part)) if os.path.exists(part) else {}  # with an error: what it kept so far
            if error:
                result["error"] = error
            report["wall_s"][section] = round(time.perf_counter() - start, 1)
            report["sections"][section] = result
            report["scale_table"] = formatted(scale_table, report["sections"], default=report.get("scale_table", []))
            atomic_write(out, lambda f: json.dump(report, f, indent=2))  # a run cut off keeps the sections done
            line = formatted(summary, section, result, default="(in the JSON; its summary line failed)")
            print(f"{section}: {report['wall_s'][section]:.0f} s  {line}", flush=True)
    if report["scale_table"]:
        width = max(len(what) for what, _ in report["scale_table"])
        print(f"\n{'the ImageNet path at scale (issue 27)':<{width}}  measured")
        for what, value in report["scale_table"]:
            print(f"{what:<{width}}  {value}")
    print(f"wrote {out} (total {sum(report['wall_s'].values()):.0f} s)")
    failed = [s for s, r in report["sections"].items() if "error" in r]
    if failed:
        sys.exit(f"error: section(s) {', '.join(failed)} did not finish; the others are in {out}")


def formatted(fn, *args, default):
    """fn(*args), or `default` where it raises: a section that stopped early may lack a key its summary or the
    scale table reads, and the driver must go on to the next section (the numbers are in the JSON either way)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- formatting only; the run goes on
        print(f"(formatting {fn.__name__} failed: {type(e).__name__}: {e})", flush=True)
        return default


def run_capped(cmd, cap, env):
    """Run a section's process in a process group of its own; at `cap` seconds kill the whole group (torch.compile's
    workers too) and wait at most KILL_WAIT_S for it (a process stuck in the driver may never exit: it is left
    behind). Returns None, or the error to record."""
    import signal
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=cap)
        return f"exit {rc}" if rc else None
    except subprocess.TimeoutExpired:
        return f"timed out after its cap of {cap:.0f} s"
    finally:
        if proc.poll() is None:  # over its cap, or the driver interrupted: the group goes too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                pass


def summary(section, r):
    if "error" in r:
        return r["error"]
    if "skipped" in r:
        return f"skipped: {r['skipped']}"
    if section in ("precision", "vae", "diagnostics", "checkpoint"):
        return "(in the table at the end)"
    if section.startswith("train"):
        mfu = lambda v: f", MFU {v['mfu']:.1%}" if v["mfu"] is not None else ""  # noqa: E731
        mem = lambda v: f", peak {v['peak_mem_mb']:.0f} MB" if v["peak_mem_mb"] is not None else ""  # noqa: E731
        comp = lambda v: f", compile {v['compile_s']:.0f} s" if v["compile_s"] is not None else ""  # noqa: E731
        return "; ".join(f"{k} {v['images_per_s']:.1f} img/s{mem(v)}{mfu(v)}{comp(v)}" for k, v in r.items()
                         if isinstance(v, dict))
    if section == "sjfb":
        return (f"ours {r['ours']['step_s'] * 1e3:.1f} ms, release-style {r['release-style']['step_s'] * 1e3:.1f} ms "
                f"a step (ratio {r['ours/release-style step time']:.3f}; target <= 0.95)")
    if section == "sampling":
        return (f"dit {r['dit']['images_per_s']:.1f} img/s, fpdm {r['fpdm']['images_per_s']:.1f} img/s at "
                f"{r['fpdm']['block_evals']} block evals")
    if section == "parallel":
        return (f"sequential {r['sequential']['seconds']:.2f} s, parallel {r['parallel']['seconds']:.2f} s "
                f"(ratio {r['sequential/parallel time']:.2f}, max |diff| {r['parallel']['max_abs_difference']:.1e}; "
                f"reading every 1 / 4 iterations: ratio {r['sequential/parallel-sync1 time']:.2f} / "
                f"{r['sequential/parallel-sync4 time']:.2f}; ParaDiGMS window ratio {r['sequential/window time']:.2f}, "
                f"reading every iteration {r['sequential/window-sync1 time']:.2f})")
    if section == "latency":
        return "; ".join(f"{k} eager/graphs {v['eager/graphs time']:.2f} (|diff| {v['max_abs_difference']:.1e})"
                         for k, v in r.items())
    if section == "two-axis":
        return (f"sequential (k=3, reuse) {r['sequential']['seconds']:.2f} s over "
                f"{r['sequential']['critical_path_calls']} calls, two-axis (k=1) {r['two-axis']['seconds']:.2f} s "
                f"over {r['two-axis']['critical_path_calls']} calls (ratio {r['sequential/two-axis time']:.2f}, "
                f"max |diff| {r['max_abs_difference']:.1e})")
    return f"fp32 floor {r['fp32']['floor']:.1e}, bf16 floor {r['bf16']['floor']:.1e}"


def scale_table(sections):
    """(what, value) rows of issue 27's checks, the ImageNet path on GPUs, from whichever of the precision,
    diagnostics, vae and checkpoint sections ran (a timed-out section gives what it kept)."""
    rows = []
    vae = sections.get("vae", {})
    precision = sections.get("precision", {})
    for name, _, _ in PRECISIONS:
        if name not in precision:
            continue
        r = precision[name]
        ratio = precision.get(f"{name}/fp32 images_per_s")  # absent where the section stopped early
        ratio = f" ({ratio:.2f}x fp32)" if ratio is not None else ""
        rows.append((f"{precision['model']} sampling, DDPM + guidance, batch {precision['batch']}: {name}",
                     f"{r['images_per_s']:.2f} img/s{ratio}, max |diff| to fp32 {r['max_abs_diff_to_fp32']:.1e}"))
        hours = f"{r['fid50k_hours_8gpus']:.2f} h"
        decode = vae.get("fp32" if name == "fp32" else "tf32")  # sample.py decodes in float32, under its TF32 flag
        if decode:
            decode_hours = FID_SAMPLES / decode["decode_images_per_s"] / FID_GPUS / 3600
            hours += f" (+ VAE decode: {r['fid50k_hours_8gpus'] + decode_hours:.2f} h)"
        rows.append((f"  {FID_SAMPLES // 1000}k DDPM-{FID_STEPS} samples with guidance on {FID_GPUS} GPUs", hours))
    diagnostics = sections.get("diagnostics", {})
    if "contraction_s" in diagnostics:
        rows.append((f"FPDM {diagnostics['model']} contraction: probe {diagnostics['probe_batch']}, "
                     f"{diagnostics['settle_iterations']} settle + {diagnostics['power_iterations']} JVP iterations",
                     f"{diagnostics['contraction_s']:.2f} s a call"))
    if "plot_s" in diagnostics:
        rows.append((f"  TrainingDiagnostics.plot, {diagnostics['plot_rows']} rows (CPU)",
                     f"{diagnostics['plot_s']:.2f} s ({diagnostics['plot_first_s']:.2f} s the first, matplotlib "
                     f"imported)"))
    for name, _, _ in PRECISIONS:
        if name in vae:
            rows.append((f"SD-VAE AutoencoderKL at {vae['resolution']} px, batch {vae['batch']}: {name}",
                         f"encode {vae[name]['encode_images_per_s']:.1f} img/s, decode "
                         f"{vae[name]['decode_images_per_s']:.1f} img/s"))
    if "skipped" in vae:
        rows.append(("SD-VAE AutoencoderKL", f"skipped: {vae['skipped']}"))
    checkpoint = sections.get("checkpoint", {})
    if "write_s" in checkpoint:
        rows.append((f"{checkpoint['model']} training checkpoint (model + EMA + AdamW), {checkpoint['gb']:.2f} GB: "
                     f"write",
                     f"{checkpoint['write_gb_per_s']:.2f} GB/s ({checkpoint['write_s']:.1f} s, "
                     f"{checkpoint['filesystem']})"))
    if "restore_s" in checkpoint:
        anonymous = checkpoint["anonymous_peak_growth_gb"]
        in_memory = checkpoint["filesystem"] in ("tmpfs", "ramfs")  # posix_fadvise drops nothing there
        cache = ("from memory (tmpfs)" if in_memory else "from disk" if checkpoint["page_cache_dropped"]
                 else "from the page cache")
        rows.append(("  read (memory-mapped) into model, EMA and AdamW",
                     f"{checkpoint['restore_s']:.1f} s {cache} (torch.load {checkpoint['read_s']:.2f} s), peak RSS "
                     f"+{checkpoint['rss_peak_growth_gb']:.2f} GB"
                     + (f", anonymous +{anonymous:.2f} GB" if anonymous is not None else "")))
    elif "write_s" in checkpoint and "error" in checkpoint:
        rows.append(("  read (memory-mapped) into model, EMA and AdamW", checkpoint["error"]))
    if "skipped" in checkpoint:
        rows.append(("training checkpoint", f"skipped: {checkpoint['skipped']}"))
    return rows


if __name__ == "__main__":
    main()
