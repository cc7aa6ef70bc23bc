"""Forward and training-step cost of a small FPDM vs a DiT of the same width, and vs the same FPDM with its no-grad
phase run as the reference release does (iterations recorded by autograd, then detached).

    python bench/bench_model.py                 # CPU defaults: 32x32x4 inputs, patch 4, width 384, batch 32
    python bench/bench_model.py --device cuda --hidden-size 1152 --patch-size 2 --batch-size 32 --dtype bf16

Prints one table with times, memory and ratios measured side by side in this run, and writes JSON (--out).
Memory: on CUDA the peak allocated bytes of the step; on CPU the bytes autograd saves for backward (exact and
repeatable) and, measured in a fresh subprocess per variant, the peak resident-set increase (approximate).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from fpdm.measure import peak_rss_bytes, perturb_parameters_, saved_tensor_bytes
from models import DiT

VARIANTS = ("dit", "fpdm", "fpdm_release_nograd")


def build(args, variant):
    torch.manual_seed(0)
    common = dict(input_size=args.input_size, patch_size=args.patch_size, in_channels=4, hidden_size=args.hidden_size,
                  num_heads=args.num_heads, num_classes=10, learn_sigma=True,
                  use_gradient_checkpointing=args.grad_ckpt)
    if variant == "dit":
        model = DiT(depth=args.depth, **common)
    else:
        model = DiT(depth=args.depth, fixed_point=True, fixed_point_pre_depth=1, fixed_point_post_depth=1, **common)
    return perturb_parameters_(model).to(args.device)


def release_style_forward(model, x, t, y, n, m):
    """The release's S-JFB: the n 'no-grad' iterations run with autograd recording (torch.no_grad clashed with its
    DDP setup), and the result is detached afterwards. Same numbers as ours, more memory and time."""
    tokens = model.embed(x)
    y_emb = model.y_embedder(y, model.training)
    c = model.t_embedder(t) + y_emb
    for block in model.blocks_pre:
        tokens = block(tokens, y_emb)
    u = model.block_pre_projection(tokens)
    z = tokens.detach()
    u_detached = u.detach()
    for _ in range(n):
        z = model.fixed_point_function(z, u_detached, c)
    z = z.detach()
    for _ in range(m):
        z = model.fixed_point_function(z, u, c)
    for block in model.blocks_post:
        z = block(z, y_emb)
    return model.unpatchify(model.final_layer(z, y_emb))


def train_step(model, variant, batch, args):
    x, t, y = batch
    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        if variant == "dit":
            out = model(x, t, y)
        elif variant == "fpdm":
            out = model(x, t, y, num_iterations=(args.no_grad_iters, args.with_grad_iters))
        else:
            out = release_style_forward(model, x, t, y, args.no_grad_iters, args.with_grad_iters)
        loss = out.float().square().mean()
    loss.backward()
    model.zero_grad(set_to_none=True)


def forward(model, variant, batch, args):
    x, t, y = batch
    with torch.no_grad(), torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
        if variant == "dit":
            model(x, t, y)
        else:
            model(x, t, y, num_iterations=args.depth - 2)  # same block evaluations as the DiT


def make_batch(args):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 4, args.input_size, args.input_size, generator=g)
    t = torch.randint(0, 1000, (args.batch_size,), generator=g)
    y = torch.randint(0, 10, (args.batch_size,), generator=g)
    return x.to(args.device), t.to(args.device), y.to(args.device)


def sync(args):
    if args.device == "cuda":
        torch.cuda.synchronize()


def saved_activation_bytes(model, variant, batch, args):
    return saved_tensor_bytes(lambda: train_step(model, variant, batch, args))


def peak_memory(args, variant):
    """Peak bytes of one training step: CUDA allocator peak, or RSS growth measured in a fresh subprocess on CPU."""
    if args.device == "cuda":
        model, batch = build(args, variant), make_batch(args)
        train_step(model, variant, batch, args)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step(model, variant, batch, args)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-child", variant] + sys.argv[1:]
    return int(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def rss_child(args, variant):
    model, batch = build(args, variant), make_batch(args)
    forward(model, "dit" if variant == "dit" else "fpdm", batch, args)  # allocator warm-up without a graph
    before = peak_rss_bytes()
    train_step(model, variant, batch, args)
    print(peak_rss_bytes() - before)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=384)
    parser.add_argument("--num-heads", type=int, default=6)
    parser.add_argument("--depth", type=int, default=12, help="DiT depth; FPDM forward uses depth - 2 iterations")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-grad-iters", type=int, default=8, help="S-JFB n (fixed here for a fair comparison)")
    parser.add_argument("--with-grad-iters", type=int, default=2, help="S-JFB m")
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--out", default="bench/results/bench_model.json")
    parser.add_argument("--rss-child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        return rss_child(args, args.rss_child)

    batch = make_batch(args)
    models = {variant: build(args, variant) for variant in VARIANTS}
    jobs = {(v, "train_step_s"): (lambda v=v: train_step(models[v], v, batch, args)) for v in VARIANTS}
    jobs.update({(v, "forward_s"): (lambda v=v: forward(models[v], v, batch, args)) for v in ("dit", "fpdm")})
    for job in jobs.values():
        job()  # warm-up
    # Round-robin over variants, so that machine noise hits them alike; report medians.
    times = {key: [] for key in jobs}
    for _ in range(args.repeats):
        for key, job in jobs.items():
            sync(args)
            start = time.perf_counter()
            job()
            sync(args)
            times[key].append(time.perf_counter() - start)
    rows = {}
    for variant, model in models.items():
        rows[variant] = {
            "params": model.num_parameters(),
            "forward_s": statistics.median(times[(variant, "forward_s")]) if (variant, "forward_s") in times else None,
            "train_step_s": statistics.median(times[(variant, "train_step_s")]),
            "saved_activation_bytes": saved_activation_bytes(model, variant, batch, args),
        }
    del models
    for variant in VARIANTS:
        rows[variant]["peak_memory_bytes"] = peak_memory(args, variant)

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device_name}, dtype {args.dtype}, batch {args.batch_size}, {args.input_size}x{args.input_size}x4, "
          f"patch {args.patch_size}, width {args.hidden_size}; DiT depth {args.depth}; FPDM 1 pre + 1 post, forward "
          f"{args.depth - 2} iterations, train S-JFB n={args.no_grad_iters} m={args.with_grad_iters}")
    mem_name = "peak CUDA alloc" if args.device == "cuda" else "peak RSS growth"
    print(f"{'variant':<22}{'params':>12}{'forward s':>11}{'train s':>10}{'train img/s':>13}{'saved MB':>10}"
          f"{mem_name:>17}")
    for name, r in rows.items():
        r["train_images_per_s"] = args.batch_size / r["train_step_s"]
        fwd = f"{r['forward_s']:.3f}" if r["forward_s"] is not None else "-"
        print(f"{name:<22}{r['params']:>12,}{fwd:>11}{r['train_step_s']:>10.3f}{r['train_images_per_s']:>13.1f}"
              f"{r['saved_activation_bytes'] / 2**20:>10.1f}{r['peak_memory_bytes'] / 2**20:>14.1f} MB")
    dit, fpdm, rel = rows["dit"], rows["fpdm"], rows["fpdm_release_nograd"]
    ratios = {
        "fpdm/dit params": fpdm["params"] / dit["params"],
        "fpdm/dit forward time (same block evals)": fpdm["forward_s"] / dit["forward_s"],
        "fpdm/dit train step time": fpdm["train_step_s"] / dit["train_step_s"],
        "fpdm/dit saved activations": fpdm["saved_activation_bytes"] / dit["saved_activation_bytes"],
        "fpdm/dit peak memory": fpdm["peak_memory_bytes"] / max(dit["peak_memory_bytes"], 1),
        "ours/release-style train step time": fpdm["train_step_s"] / rel["train_step_s"],
        "ours/release-style saved activations": fpdm["saved_activation_bytes"] / rel["saved_activation_bytes"],
        "ours/release-style peak memory": fpdm["peak_memory_bytes"] / max(rel["peak_memory_bytes"], 1),
    }
    print("ratios (measured side by side in this run):")
    for name, value in ratios.items():
        print(f"  {name:<42}{value:6.3f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": device_name, "args": {k: v for k, v in vars(args).items() if k != "rss_child"},
                   "rows": rows, "ratios": ratios}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
