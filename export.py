"""Export DiT/FPDM checkpoints: a diffusers DiTPipeline folder (DiT only) or safetensors + JSON config (any model).

    python export.py --ckpt results/run/checkpoints/step_0100000.pt --format safetensors --out exports/run
    python export.py --ckpt DiT-XL-2-256x256.pt --format diffusers --vae sd-vae-ft-ema --out exports/dit-xl-2
    python export.py --ckpt dit-train.pt --trust-checkpoint --no-use-ema --format safetensors --out exports/raw

--format diffusers writes model_index.json, transformer/ (DiTTransformer2DModel), scheduler/ (a DDIMScheduler that
samples our DDIM: trailing spacing, last step to ᾱ = 1) and, with --vae (a local diffusers AutoencoderKL folder),
vae/. Then, for samples equal to our sample.py (sampler ddim, --num-sampling-steps N dividing 1000, same seed):

    pipe = DiTPipeline.from_pretrained(OUT)  # no --vae: from_pretrained(OUT, vae=AutoencoderKL.from_pretrained(...))
    diffusers_dit.use_dit_timestep_frequencies(pipe.transformer)  # DiT's timestep frequencies i/128, not i/127
    pipe(class_labels, guidance_scale=4.0, num_inference_steps=N, generator=torch.Generator().manual_seed(seed))

DiTPipeline takes class 1000 as its null class: a model with fewer classes has its label table padded to 1000 with
copies of the null row (labels past its classes sample unconditionally); one with more must sample with
guidance_scale 1. Pixel-space models (1 or 3 channels) get transformer/ and scheduler/ only: DiTPipeline always
decodes with a VAE. `checkpoints.load_model` and sample.py read the folder (and the older flat transformer folder).
The key mapping and the numerics of diffusers' DiT: fpdm/diffusers_dit.py.
"""

import argparse
import json
import os
import shutil

from diffusion import DIFFUSION_DEFAULTS
from fpdm.checkpoints import SAFETENSORS_FORMAT, diffusion_settings, load_model
from fpdm.diffusers_dit import PIPELINE_NULL_CLASS, SCHEDULER_CONFIG, diffusers_version, scheduler_config, to_diffusers
from fpdm.sampling import check_only_ours, remove_outputs

# What an export writes (either format): all that --overwrite may remove.
OUTPUTS = ("model_index.json", "transformer", "scheduler", "vae", "model.safetensors", "config.json")


def from_diffusers(folder, **kwargs):
    """Our DiT from a diffusers DiTTransformer2DModel folder (kwargs as for `checkpoints.load_model`)."""
    return load_model(folder, **kwargs)[0]


# ------------------------------------------------------------------------------------------------------------------
# diffusers DiTPipeline (DiT)
# ------------------------------------------------------------------------------------------------------------------

def to_pipeline(model, out_dir, diffusion, vae_path=None):
    """Write a diffusers DiTPipeline folder (see the module docstring); returns notes for the user.

    diffusion: the diffusion settings (train.py names) the scheduler samples. vae_path: a local AutoencoderKL folder,
    copied to vae/ (loaded and saved by diffusers, so any format it reads works).
    """
    from fpdm.sampling import is_pixel_model
    pixel, classes, has_null = is_pixel_model(model), model.num_classes, model.config["class_dropout_prob"] > 0
    if pixel and vae_path:
        raise ValueError(f"--vae: this is a pixel-space model ({model.in_channels} channels), which needs no VAE")
    autoencoder = None
    if vae_path:  # checked before anything is written
        from fpdm.vae import load as load_vae
        autoencoder = load_vae(vae_path)
        if autoencoder.config.latent_channels != model.in_channels:
            raise ValueError(f"--vae {vae_path} has {autoencoder.config.latent_channels} latent channels, the model "
                             f"{model.in_channels}")
    notes = []
    if not pixel and classes != PIPELINE_NULL_CLASS:
        padded = f"the label table is padded to {PIPELINE_NULL_CLASS} with " + (
            f"null rows (labels {classes}..999 sample unconditionally)" if has_null else "zero rows")
        notes.append(f"{classes} classes, but DiTPipeline takes class {PIPELINE_NULL_CLASS} as its null class: " +
                     (padded if classes < PIPELINE_NULL_CLASS else "sample it with guidance_scale=1"))
    if not pixel and not has_null:
        notes.append("the model has no null class (class_dropout_prob 0): sample it with guidance_scale=1")
    to_diffusers(model, os.path.join(out_dir, "transformer"), None if pixel else max(classes, PIPELINE_NULL_CLASS))
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(out_dir, "scheduler", SCHEDULER_CONFIG), "w") as f:
        json.dump(scheduler_config(diffusion), f, indent=2)
    if pixel:
        return notes + ["pixel-space model: DiTPipeline always decodes with a VAE, so no model_index.json; load "
                        "DiTTransformer2DModel and DDIMScheduler with subfolder='transformer' / 'scheduler'"]
    if autoencoder is not None:
        autoencoder.save_pretrained(os.path.join(out_dir, "vae"))
    else:
        notes.append("no --vae: vae/ is not written; pass one to DiTPipeline.from_pretrained(OUT, vae=...) or export "
                     "again with --vae")
    index = {"_class_name": "DiTPipeline", "_diffusers_version": diffusers_version(),
             "transformer": ["diffusers", "DiTTransformer2DModel"], "scheduler": ["diffusers", "DDIMScheduler"],
             "vae": ["diffusers", "AutoencoderKL"]}
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return notes + ["for samples equal to ours, call diffusers_dit.use_dit_timestep_frequencies(pipe.transformer) "
                    "after DiTPipeline.from_pretrained (diffusers' DiT uses timestep frequencies i/127, DiT i/128)"]


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
    parser.add_argument("--vae", default=None,
                        help="--format diffusers: a local AutoencoderKL folder (e.g. sd-vae-ft-ema), copied to vae/")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an export in --out (only the files an export writes; anything else is refused)")
    args = parser.parse_args(argv)
    if args.vae and args.format != "diffusers":
        raise ValueError("--vae goes with --format diffusers (a DiTPipeline folder)")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file: choose a folder path")
    if os.path.isdir(args.out) and os.listdir(args.out):
        check_only_ours(args.out, sorted(os.listdir(args.out)), OUTPUTS, args.overwrite)
        if not args.overwrite:
            raise FileExistsError(f"--out {args.out} holds an export: choose another folder, or pass --overwrite to "
                                  f"replace it")
    # Written beside --out first, then swapped in by renaming whole folders: a failed or killed export leaves the
    # previous one intact (under --out, or under --out.old-PID if killed between the two renames).
    final, args.out = args.out, f"{os.path.normpath(args.out)}.tmp-{os.getpid()}"
    old = f"{os.path.normpath(final)}.old-{os.getpid()}"
    try:
        write(args)
        if os.path.isdir(final):  # holds only an export's files (checked above)
            os.replace(final, old)
        os.replace(args.out, final)
        if os.path.isdir(old):
            remove_outputs(old, OUTPUTS)  # checks again that nothing else is there
            os.rmdir(old)
    finally:
        shutil.rmtree(args.out, ignore_errors=True)
    print(f"{args.ckpt} -> {final} ({args.format})")


def write(args):
    """The export of --ckpt into the folder args.out."""
    model, info = load_model(args.ckpt, model_name=args.model, use_ema=args.use_ema,
                             trust_checkpoint=args.trust_checkpoint)
    diffusion = diffusion_settings(info["training_config"])
    if diffusion is not None:
        diffusion["learn_sigma"] = model.learn_sigma
    elif args.format == "diffusers":  # a pipeline needs a scheduler: DiT's, which sampling assumes anyway
        diffusion = {**DIFFUSION_DEFAULTS, "learn_sigma": model.learn_sigma}
        info["notes"].append("the checkpoint records no diffusion settings: scheduler/ gets DiT's (linear schedule, "
                             "epsilon-prediction, 1000 steps)")
    else:
        info["notes"].append("the checkpoint records no diffusion settings: the export carries none (sampling "
                             "assumes DiT's linear schedule and epsilon-prediction unless told otherwise)")
    if args.format == "diffusers":
        info["notes"] += to_pipeline(model, args.out, diffusion, args.vae)
    else:
        to_safetensors(model, args.out, metadata={"weights": info["weights"], "source_format": info["format"],
                                                  "source": os.path.basename(os.path.normpath(args.ckpt))},
                       diffusion=diffusion)
    for note in info["notes"]:
        print(f"note: {note}")
    print(f"{args.ckpt}: {info['format']}, {info['weights']} weights, {model.num_parameters():,} parameters")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:  # OSError: also a full disk, a quota, a read-only or vanished folder
        raise SystemExit(f"error: {e}")
