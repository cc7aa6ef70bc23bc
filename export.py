"""Export DiT/FPDM checkpoints: a diffusers DiTTransformer2DModel folder (DiT only) or safetensors + JSON config.

    python export.py --ckpt results/run/checkpoints/0100000.pt --format safetensors --out exports/run
    python export.py --ckpt DiT-XL-2-256x256.pt --format diffusers --out exports/dit-xl-2
    python export.py --ckpt dit-train.pt --trust-checkpoint --no-use-ema --format safetensors --out exports/raw

The key mapping and the numerics of diffusers' DiT: diffusers_dit.py.
"""

import argparse
import json
import os

from checkpoints import SAFETENSORS_FORMAT, diffusion_settings, load_model
from diffusers_dit import to_diffusers


def from_diffusers(folder, **kwargs):
    """Our DiT from a diffusers DiTTransformer2DModel folder (kwargs as for `checkpoints.load_model`)."""
    return load_model(folder, **kwargs)[0]


# ------------------------------------------------------------------------------------------------------------------
# safetensors + JSON config (DiT and FPDM)
# ------------------------------------------------------------------------------------------------------------------

def to_safetensors(model, out_dir, metadata=None, diffusion=None):
    """Write `model.safetensors` (every state-dict entry, pos_embed included) and `config.json` (`model.config`).

    metadata: strings stored in the safetensors header (e.g. which weights, from which checkpoint). diffusion: the
    diffusion settings (train.py names), stored as JSON under "diffusion" so that sampling uses them.
    """
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    header = {"format": "pt", "fpdm_format": SAFETENSORS_FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}}
    if diffusion:
        header["diffusion"] = json.dumps(diffusion)
    save_file(state_dict, os.path.join(out_dir, "model.safetensors"), metadata=header)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model.config, f, indent=2)
    return out_dir


# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="any checkpoint checkpoints.load_model reads")
    parser.add_argument("--format", required=True, choices=["diffusers", "safetensors"])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--model", default=None, help="registry name (e.g. DiT-XL/2) for checkpoints without config")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a pickled argparse.Namespace (DiT/FPDM training checkpoints); nothing else")
    parser.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=True,
                        help="export the EMA weights when the checkpoint has both (default)")
    args = parser.parse_args(argv)
    run_files = [f for f in ("latest.json", "checkpoints", "metrics.csv") if os.path.exists(os.path.join(args.out, f))]
    if run_files:
        raise ValueError(f"--out {args.out} holds a training run ({', '.join(run_files)}): export into another folder")
    model, info = load_model(args.ckpt, model_name=args.model, use_ema=args.use_ema,
                             trust_checkpoint=args.trust_checkpoint)
    diffusion = diffusion_settings(info["training_config"])
    if diffusion is not None:
        diffusion["learn_sigma"] = model.learn_sigma
    else:
        info["notes"].append("the checkpoint records no diffusion settings: the export carries none (sampling "
                             "assumes DiT's linear schedule and epsilon-prediction unless told otherwise)")
    if args.format == "diffusers":
        to_diffusers(model, args.out, diffusion)
    else:
        to_safetensors(model, args.out, metadata={"weights": info["weights"], "source_format": info["format"],
                                                  "source": os.path.basename(os.path.normpath(args.ckpt))},
                       diffusion=diffusion)
    for note in info["notes"]:
        print(f"note: {note}")
    print(f"{args.ckpt} ({info['format']}, {info['weights']} weights, "
          f"{model.num_parameters():,} parameters) -> {args.out} ({args.format})")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
