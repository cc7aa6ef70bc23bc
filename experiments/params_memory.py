"""Parameter counts and training memory of FPDM vs DiT at the paper's sizes (256 px images = 32x32x4 latents).

    python experiments/params_memory.py      # ~5 minutes on 2 cores (real forward + backward at batch 1, fp32)

Parameters: every DiT size with patch 2, and FPDM (1 pre + fixed-point block + 1 post) of the same size.
Training memory: the bytes autograd saves for backward in one training step per image (fp32, exact and
repeatable, measured with saved-tensor hooks): DiT, and FPDM with m = 1..12 with-grad S-JFB iterations (n no-grad
iterations save nothing: checked with n = 0 and n = 8), with and without gradient checkpointing. From these, the
per-GPU training memory at batch 32 in fp32 is estimated as 20 bytes per parameter (weights, gradients, AdamW's two
moments, EMA) + 32 × activations. Writes experiments/results/params_memory.{json,png}.
"""

import argparse

import torch

import common
from fpdm.measure import perturb_parameters_, saved_tensor_bytes
from models import DiT_models

BYTES_PER_PARAM = 20  # fp32 weights + gradients + AdamW exp_avg + exp_avg_sq + EMA copy


def build(name, fixed_point, checkpointing):
    torch.manual_seed(0)
    kwargs = dict(input_size=32, num_classes=1000, use_gradient_checkpointing=checkpointing)
    if fixed_point:
        kwargs.update(fixed_point=True, fixed_point_checkpoint_iterations=checkpointing)
    model = DiT_models[name](**kwargs).train()
    return perturb_parameters_(model)


def saved_mb_per_image(model, num_iterations=None):
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([500]), torch.tensor([1])
    kwargs = {} if num_iterations is None else {"num_iterations": num_iterations}

    def step():
        model(x, t, y, **kwargs).square().mean().backward()
        model.zero_grad(set_to_none=True)
    return saved_tensor_bytes(step) / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="S,B,L,XL", help="DiT sizes for training memory (all are counted)")
    p.add_argument("--with-grad", default="1,2,3,6,12", help="S-JFB with-grad iteration counts m to measure")
    p.add_argument("--batch-size", type=int, default=32, help="per-GPU batch for the memory estimate")
    args = p.parse_args()
    ms = [int(m) for m in args.with_grad.split(",")]

    params = {}
    with torch.device("meta"):
        for size in ("S", "B", "L", "XL"):
            name = f"DiT-{size}/2"
            dit, fpdm = DiT_models[name](), DiT_models[name](fixed_point=True)
            params[name] = {"dit": dit.num_parameters(), "fpdm": fpdm.num_parameters(),
                            "depth": dit.block_evaluations()}
            print(f"{name}: DiT {params[name]['dit']:>12,}  FPDM {params[name]['fpdm']:>11,}  "
                  f"ratio {params[name]['fpdm'] / params[name]['dit']:.3f}", flush=True)

    memory = {}
    for size in args.sizes.split(","):
        name = f"DiT-{size}/2"
        row = {}
        for ckpt in (False, True):
            key = "checkpointed" if ckpt else "plain"
            dit = build(name, False, ckpt)
            dit_mb = saved_mb_per_image(dit)
            del dit
            fpdm = build(name, True, ckpt)
            fpdm_mb = {m: saved_mb_per_image(fpdm, (0, m)) for m in ms}
            if not ckpt:  # iterations without a graph must save nothing
                row["no_grad_check_mb"] = {"n=0,m=2": saved_mb_per_image(fpdm, (0, 2)),
                                           "n=8,m=2": saved_mb_per_image(fpdm, (8, 2))}
                print(f"{name} no-grad iterations save nothing: n=0,m=2 and n=8,m=2 save "
                      f"{row['no_grad_check_mb']['n=0,m=2']:.2f} and {row['no_grad_check_mb']['n=8,m=2']:.2f} MB")
            del fpdm
            row[key] = {"dit_mb": dit_mb, "fpdm_mb": {str(m): v for m, v in fpdm_mb.items()}}
            print(f"{name} {key:<12}: DiT {dit_mb:8.1f} MB/image  FPDM m=" +
                  "  ".join(f"{m}: {v:.1f}" for m, v in fpdm_mb.items()), flush=True)
        p_dit, p_fpdm = params[name]["dit"], params[name]["fpdm"]
        gib = 2**30
        row["estimate_gib"] = {
            "dit": (BYTES_PER_PARAM * p_dit + args.batch_size * row["plain"]["dit_mb"] * 2**20) / gib,
            **{f"fpdm_m{m}": (BYTES_PER_PARAM * p_fpdm + args.batch_size * row["plain"]["fpdm_mb"][str(m)] * 2**20)
               / gib for m in ms}}
        memory[name] = row
        print(f"{name} estimated fp32 training memory at batch {args.batch_size}: DiT "
              f"{row['estimate_gib']['dit']:.1f} GiB, FPDM " +
              ", ".join(f"m={m} {row['estimate_gib'][f'fpdm_m{m}']:.1f}" for m in ms) + " GiB", flush=True)

    report = {"args": vars(args), "bytes_per_param": BYTES_PER_PARAM, "params": params, "memory": memory}
    path = common.write_json("params_memory", report)
    plot(report)
    print(f"wrote {path} and params_memory.png")


def plot(report):
    params, memory = report["params"], report["memory"]
    ms = [int(m) for m in report["args"]["with_grad"].split(",")]
    with common.figure("params_memory", "FPDM (1 pre + FP block + 1 post) vs DiT at 256 px (patch 2, fp32)", "", "",
                       ncols=2, size=(11, 4.4)) as (left, right):
        names = list(params)
        left.bar([i - 0.2 for i in range(len(names))], [params[n]["dit"] / 1e6 for n in names], 0.4, label="DiT")
        left.bar([i + 0.2 for i in range(len(names))], [params[n]["fpdm"] / 1e6 for n in names], 0.4, label="FPDM")
        left.set_xticks(range(len(names)))
        left.set_xticklabels([n[len("DiT-"):] for n in names])
        left.set_title("parameters (millions)")
        for k, (name, row) in enumerate(memory.items()):
            size = name[len("DiT-"):]
            right.plot(ms, [row["plain"]["fpdm_mb"][str(m)] for m in ms], "o-", color=f"C{k}", label=f"FPDM-{size}")
            right.axhline(row["plain"]["dit_mb"], color=f"C{k}", ls="--", label=f"DiT-{size}")
        right.set_yscale("log")
        right.set_xlabel("S-JFB with-grad iterations m")
        right.set_title("activations saved for backward (MB / image)")
        right.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))


if __name__ == "__main__":
    main()
