"""The GPU benchmark: one command that fits a short lease (at most 8 minutes on one H100/H200, each section capped).

    python bench/gpu.py                       # on a GPU; writes bench/results/gpu-<name>.json (e.g. gpu-nvidia-h200)
    python bench/gpu.py --device cpu --tiny   # a dry run at tiny sizes (tests/test_bench.py runs it)
    python bench/gpu.py --sections train-eager,residual   # a subset

Needs only what the GPU machine has (torch, numpy, timm, accelerate, tqdm, pyyaml): no dataset, no download; the
inputs are random 32×32×4 latents (256 px images through the VAE) and 1,000 classes. Sections, each in its own
process under its cap (a section that runs over is recorded as timed out, the others still run):

  train-eager     DiT-XL/2 vs FPDM-XL/2 training steps at batch 32, bf16 autocast, fused AdamW: images/s, peak CUDA
                  memory, and MFU (model FLOPs from torch's FLOP counter over the GPU's peak bf16 FLOP/s). FPDM draws
                  its S-JFB counts with training.sjfb_counts from the fpdm-xl2-in256 preset (n in 0..10, m in 1..12),
                  the same sequence in every variant; its FLOPs per step follow exactly from (n, m).
  train-compiled  the same with model.compile_regions() (compile time reported apart, steps after warm-up).
  sampling        20 DDIM steps at batch 32, DiT-XL/2 vs FPDM-XL/2 at equal block evaluations (with reuse):
                  images/s.
  parallel        DEQ-DDIM (Anderson, per image) vs sequential DDIM at T' = 50 with DiT-B/2, one image: wall-clock.
  residual        FPDM-XL/2's fixed-point residual floor: the smallest relative residual ||f(z) - z|| / ||z|| reached
                  in 60 iterations in bf16 autocast and in fp32 (the state stays fp32 under autocast).

Random weights are perturbed (adaLN-Zero makes a fresh model output zero); the FPDM layer is scaled to contract so
that the residual floor is one of precision, not of convergence.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# section -> (cap in seconds, expected seconds on an H100/H200 at full size)
SECTIONS = {"train-eager": (100, 45), "train-compiled": (190, 120), "sampling": (50, 25), "parallel": (45, 15),
            "two-axis": (45, 15), "residual": (30, 10)}
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.1, "L4": 121.0, "A10G": 70.0}

FULL = {"input_size": 32, "batch": 32, "dit": "DiT-XL/2", "fpdm": "DiT-XL/2", "parallel_model": "DiT-B/2",
        "train_steps": 20, "warmup": 3, "sample_steps": 20, "parallel_steps": 50, "num_classes": 1000, "size": {}}
TINY = {"input_size": 8, "batch": 4, "dit": "DiT-S/2", "fpdm": "DiT-S/2", "parallel_model": "DiT-S/2",
        "train_steps": 3, "warmup": 1, "sample_steps": 4, "parallel_steps": 6, "num_classes": 10,
        "size": {"hidden_size": 32, "num_heads": 2, "depth": 4}}


def peak_tflops(device_name):
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


# ------------------------------------------------------------------------------------------------------------------
# Sections (each runs in its own process)
# ------------------------------------------------------------------------------------------------------------------

def build(name, sizes, fixed_point=False, device="cpu", contract=False):
    import torch

    from fpdm.measure import perturb_parameters_
    from models import DiT_models
    torch.manual_seed(0)
    fp = dict(fixed_point=True, fixed_point_pre_depth=1, fixed_point_post_depth=1) if fixed_point else {}
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


def train_section(args, sizes, compiled):
    """images/s, peak memory and MFU of DiT vs FPDM training steps (eager or regionally compiled)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from diffusion import create_diffusion
    from fpdm import config as configs
    from fpdm import training
    device = torch.device(args.device)
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
        del model, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["fpdm/dit images_per_s"] = out["fpdm"]["images_per_s"] / out["dit"]["images_per_s"]
    out["fpdm/dit peak_mem"] = (out["fpdm"]["peak_mem_mb"] / out["dit"]["peak_mem_mb"]
                                if out["dit"]["peak_mem_mb"] else None)
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
    out = {}
    dit = build(sizes["dit"], sizes, False, device).eval()
    budget = sizes["sample_steps"] * dit.block_evaluations()
    for variant, fixed_point in (("dit", False), ("fpdm", True)):
        model = dit if not fixed_point else build(sizes["fpdm"], sizes, True, device).eval()
        iters = iterations_from_block_budget(model, budget, sizes["sample_steps"]) if fixed_point else None

        def run():
            with autocast(device, args.dtype):
                _, fn = sample_images(model, diffusion, noise, labels, iterations_per_step=iters, reuse=fixed_point)
            synchronize(device)
            return fn
        run()  # warm-up
        start = time.perf_counter()
        fn = run()
        elapsed = time.perf_counter() - start
        out[variant] = {"images_per_s": sizes["batch"] / elapsed, "block_evals": fn.compute()["block_evals"]}
    out["fpdm/dit images_per_s"] = out["fpdm"]["images_per_s"] / out["dit"]["images_per_s"]
    return out


def timed_sampling(device, *args, **options):
    """sampling.sample_images(*args, **options) once to warm up, then timed: (seconds, samples, GuidedModel, the
    sampler's numeric info)."""
    from fpdm.sampling import sample_images

    def run():
        x, fn = sample_images(*args, **options)
        synchronize(device)
        return x, fn
    run()
    start = time.perf_counter()
    x, fn = run()
    return time.perf_counter() - start, x, fn, {k: v for k, v in fn.info.items() if isinstance(v, (int, float, bool))}


def parallel_section(args, sizes):
    """DEQ-DDIM (Anderson per image) vs sequential DDIM wall-clock, one image, T' = parallel_steps."""
    import torch

    from fpdm.sampling import diffusion_for_sampling
    device = torch.device(args.device)
    model = build(sizes["parallel_model"], sizes, False, device).eval()
    diffusion = diffusion_for_sampling({"learn_sigma": True}, sizes["parallel_steps"])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, sizes["input_size"], sizes["input_size"], generator=g).to(device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    out = {}
    for name, options in (("sequential", {"sampler": "ddim"}), ("parallel", {"sampler": "ddim-parallel"})):
        seconds, x, fn, info = timed_sampling(device, model, diffusion, noise, labels, **options)
        out[name] = {"seconds": seconds, "info": info, "result": x}
    difference = (out["parallel"].pop("result") - out["sequential"].pop("result")).abs().max().item()
    out["max_abs_difference"] = difference
    out["sequential/parallel time"] = out["sequential"]["seconds"] / out["parallel"]["seconds"]
    return out


def two_axis_section(args, sizes):
    """Two-axis sampling (fpdm/two_axis.py: the DDIM chain and FPDM's layer as one fixed point, k = 1 layer
    iteration per state per outer iteration) vs sequential FPDM DDIM with reuse at 3 iterations per step: wall-clock,
    block evaluations and critical path, one image, T' = sample_steps, the contractive FPDM of parallel_model size."""
    import torch

    from fpdm.sampling import diffusion_for_sampling
    device = torch.device(args.device)
    model = build(sizes["parallel_model"], sizes, True, device, contract=True).eval()
    diffusion = diffusion_for_sampling({"learn_sigma": True}, sizes["sample_steps"])
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, sizes["input_size"], sizes["input_size"], generator=g).to(device)
    labels = torch.zeros(1, dtype=torch.long, device=device)
    out = {}
    for name, options in (("sequential", {"sampler": "ddim", "iterations_per_step": 3, "reuse": True}),
                          ("two-axis", {"sampler": "ddim-two-axis", "iterations_per_step": 1})):
        seconds, x, fn, info = timed_sampling(device, model, diffusion, noise, labels, **options)
        out[name] = {"seconds": seconds, "block_evals": fn.compute()["block_evals"],
                     "critical_path_calls": info.get("critical_path_calls", fn.calls), "info": info, "result": x}
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
    return out


def run_section(name, args):
    sizes = TINY if args.tiny else FULL
    if name.startswith("train"):
        return train_section(args, sizes, compiled=name == "train-compiled")
    return {"sampling": sampling_section, "parallel": parallel_section, "two-axis": two_axis_section,
            "residual": residual_section}[name](args, sizes)


# ------------------------------------------------------------------------------------------------------------------
# The driver: one process per section, each under its cap
# ------------------------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if available (else an error unless --tiny)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a dry run of every section")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=None, help="default: bench/results/gpu-<device name>.json")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # child mode: run one section, write --section-out
    parser.add_argument("--section-out", help=argparse.SUPPRESS)
    parser.add_argument("--device-name", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.section:
        result = run_section(args.section, args)
        with open(args.section_out, "w") as f:
            json.dump(result, f)
        return

    import torch
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    if args.device == "cpu" and not args.tiny:
        parser.error("full sizes (XL/2) need a GPU: pass --device cuda on a GPU machine, or --tiny for a dry run")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f"--sections {','.join(unknown) or '(empty)'}: choose from {', '.join(SECTIONS)}")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    out = args.out or os.path.join(HERE, "results", f"gpu-{slug}.json")
    caps = {s: SECTIONS[s][0] for s in sections}
    expected = sum(SECTIONS[s][1] for s in sections)
    print(f"{name}, torch {torch.__version__}, {args.dtype}{', tiny sizes' if args.tiny else ''}: sections "
          f"{', '.join(sections)}; expected about {expected // 60} min {expected % 60} s at full size on an H100/H200, "
          f"at most {sum(caps.values()) // 60} min {sum(caps.values()) % 60} s (caps "
          f"{', '.join(f'{s} {c} s' for s, c in caps.items())})", flush=True)

    report = {"device": name, "torch": torch.__version__, "python": platform.python_version(), "dtype": args.dtype,
              "tiny": args.tiny, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "peak_bf16_tflops": peak_tflops(name) if args.device == "cuda" else None, "sections": {}, "wall_s": {}}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        for section in sections:
            part = os.path.join(tmp, f"{section}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--section", section, "--section-out", part,
                   "--device", args.device, "--dtype", args.dtype, "--device-name", name, *(["--tiny"] * args.tiny)]
            start = time.perf_counter()
            try:
                rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=caps[section]).returncode
                result = json.load(open(part)) if rc == 0 else {"error": f"exit {rc}"}
            except subprocess.TimeoutExpired:
                result = {"error": f"timed out after its cap of {caps[section]} s"}
            report["wall_s"][section] = round(time.perf_counter() - start, 1)
            report["sections"][section] = result
            print(f"{section}: {report['wall_s'][section]:.0f} s  {summary(section, result)}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {out} (total {sum(report['wall_s'].values()):.0f} s)")
    failed = [s for s, r in report["sections"].items() if "error" in r]
    if failed:
        sys.exit(f"error: section(s) {', '.join(failed)} did not finish; the others are in {out}")


def summary(section, r):
    if "error" in r:
        return r["error"]
    if section.startswith("train"):
        mfu = lambda v: f", MFU {v['mfu']:.1%}" if v["mfu"] is not None else ""  # noqa: E731
        mem = lambda v: f", peak {v['peak_mem_mb']:.0f} MB" if v["peak_mem_mb"] is not None else ""  # noqa: E731
        comp = lambda v: f", compile {v['compile_s']:.0f} s" if v["compile_s"] is not None else ""  # noqa: E731
        return "; ".join(f"{k} {v['images_per_s']:.1f} img/s{mem(v)}{mfu(v)}{comp(v)}" for k, v in r.items()
                         if isinstance(v, dict))
    if section == "sampling":
        return (f"dit {r['dit']['images_per_s']:.1f} img/s, fpdm {r['fpdm']['images_per_s']:.1f} img/s at "
                f"{r['fpdm']['block_evals']} block evals")
    if section == "parallel":
        return (f"sequential {r['sequential']['seconds']:.2f} s, parallel {r['parallel']['seconds']:.2f} s "
                f"(ratio {r['sequential/parallel time']:.2f}, max |diff| {r['max_abs_difference']:.1e})")
    if section == "two-axis":
        return (f"sequential (k=3, reuse) {r['sequential']['seconds']:.2f} s over "
                f"{r['sequential']['critical_path_calls']} calls, two-axis (k=1) {r['two-axis']['seconds']:.2f} s "
                f"over {r['two-axis']['critical_path_calls']} calls (ratio {r['sequential/two-axis time']:.2f}, "
                f"max |diff| {r['max_abs_difference']:.1e})")
    return f"fp32 floor {r['fp32']['floor']:.1e}, bf16 floor {r['bf16']['floor']:.1e}"


if __name__ == "__main__":
    main()
