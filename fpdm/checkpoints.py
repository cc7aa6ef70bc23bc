"""One loader for every checkpoint this codebase meets, and DiT -> FPDM initialisation.

    model, info = load_model("results/run/checkpoints/0100000.pt")         # ours: EMA weights by default
    model, info = load_model("DiT-XL-2-256x256.pt")                         # official DiT: architecture inferred
    model, info = load_model("fpdm/latest.pt", trust_checkpoint=True)       # pickled argparse args: explicit opt-in
    info["format"], info["weights"], info["sources"], info["notes"]

Formats (`info["format"]`):
  fpdm-train-v1   train.py checkpoint: architecture from "model_config", training config from "config".
  dit-state-dict  a bare state dict, e.g. DiT's released `DiT-XL-2-256x256.pt`: architecture inferred from shapes.
  dit-train       DiT's train.py checkpoint {"model", "ema", "opt", "args"}; "args" is a pickled argparse.Namespace.
  fpdm-release    the FPDM release's training checkpoint: as dit-train with FPDM keys (blocks_pre.*, ...).
  diffusers       a DiTTransformer2DModel folder (config.json + diffusion_pytorch_model.safetensors/.bin), or a
                  diffusers pipeline folder (export.py) holding one in transformer/.
  safetensors     our export (export.py): model.safetensors + config.json holding `model.config`.

Files are read with `torch.load(weights_only=True)`: tensors and plain containers only. The one exception is
argparse.Namespace (DiT-style "args"), allowed only with `trust_checkpoint=True`; anything else is refused.
"""

import argparse
import json
import math
import os
import pickle
import re
import zipfile
from functools import lru_cache

import torch
import torch.nn as nn

from diffusion import DIFFUSION_DEFAULTS
from fpdm.diffusers_dit import read_diffusers, read_scheduler_config, transformer_folder
from models import DiT, DiT_models, load_state_dict_checked

TRAIN_FORMAT = "fpdm-train-v1"  # train.py checkpoints (written below)
SAFETENSORS_FORMAT = "fpdm-safetensors-v1"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_KNOWN = ("a train.py checkpoint, a DiT/FPDM state dict or training checkpoint, a diffusers DiTTransformer2DModel "
          "folder, or an export.py safetensors folder")


# ------------------------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------------------------

def load_model(path, *, model_name=None, use_ema=True, trust_checkpoint=False, device="cpu", **overrides):
    """Build the model a checkpoint describes and load its weights; returns (model in eval mode, info).

    model_name: a registry name (e.g. "DiT-XL/2") for formats without a stored config; it supplies num_heads and
    depth, which weights do not reveal. use_ema: take the EMA weights when the checkpoint has both.
    overrides: DiT keyword arguments that replace the stored or inferred ones (e.g. fixed_point_reuse_solution=True);
    an override that contradicts the weights fails with the first mismatched key and both shapes.
    info: format, weights ("ema", "model" or "weights"), model_config, training_config, step, sources (where each
    config value came from: "checkpoint", "weights", "args", "registry ...", "default ...", "override"), notes.
    device="meta" builds the model without allocating memory (shape checks only).
    """
    path = os.fspath(path)
    info = {"path": path, "format": None, "weights": "weights", "training_config": None, "step": None,
            "sources": {}, "notes": []}
    state_dict, config = _read(path, info, model_name, use_ema, trust_checkpoint, overrides)
    config = {**config, **overrides}
    info["sources"].update(dict.fromkeys(overrides, "override"))
    model = _build(config, device)
    load_state_dict_checked(model, state_dict)
    info["model_config"] = model.config
    return model.eval(), info


def load_model_for_sampling(path, use_ema=True, device="cpu", trust_checkpoint=False, model_name=None):
    """(model in eval mode on `device`, training config dict or None) from any checkpoint `load_model` reads: ours,
    official DiT, the FPDM release, diffusers folders, safetensors exports. EMA weights by default."""
    model, info = load_model(path, model_name=model_name, use_ema=use_ema, trust_checkpoint=trust_checkpoint,
                             device=device)
    if model_name is not None and set(info["sources"].values()) == {"checkpoint"}:
        named, config = registry_config(model_name), model.config  # the architecture is recorded: a name may agree
        differ = [f"{k} {named[k]} (checkpoint: {config[k]})" for k in ("hidden_size", "depth", "num_heads",
                                                                       "patch_size") if config.get(k) != named[k]]
        if differ:
            raise ValueError(f"--model {model_name} contradicts the architecture {path} records ({', '.join(differ)})"
                             f": drop --model, which only completes checkpoints that record none")
    for note in info.get("notes", []):
        print(f"note: {note}")
    return model.eval(), info.get("training_config")


def _build(config, device):
    """DiT.from_config on `device`, skipping the random init of tensors the checkpoint is about to overwrite."""
    with torch.device("meta"):
        model = DiT.from_config(config)
    if torch.device(device).type == "meta":
        return model
    if set(dict(model.named_buffers())) - set(model.state_dict()):  # a buffer no checkpoint holds: initialise it
        with torch.device(device):
            return DiT.from_config(config)
    return model.to_empty(device=device)


def latest_checkpoint(path):
    """The checkpoint file that a train.py run folder's latest.json names; any other `path` as it is."""
    pointer = os.path.join(path, "latest.json")
    if not (os.path.isdir(path) and os.path.isfile(pointer)):
        return path
    with open(pointer) as f:
        return os.path.join(path, json.load(f)["path"])


def detect_format(path, trust_checkpoint=False):
    """The format name `load_model` would report for `path` (reads the file)."""
    info = {"notes": [], "sources": {}}
    _read(os.fspath(path), info, None, True, trust_checkpoint, {}, infer=False)
    return info["format"]


def _read(path, info, model_name, use_ema, trust, overrides, infer=True):
    """Fill `info` and return (state_dict, DiT config) for any supported format."""
    if (latest := latest_checkpoint(path)) != path:  # a train.py run folder
        info["notes"].append(f"{path} is a run folder: loading its latest checkpoint {latest}")
        info["path"] = latest
        return _read(latest, info, model_name, use_ema, trust, overrides, infer)
    if os.path.isdir(path) or path.endswith(".safetensors"):
        named = None if os.path.isdir(path) else os.path.basename(path)  # a file is read with its folder's config
        if named not in (None, "model.safetensors", *DIFFUSERS_WEIGHTS):
            raise ValueError(f"{path}: a .safetensors file is read with the config.json beside it, as export.py "
                             f"(model.safetensors) or diffusers ({DIFFUSERS_WEIGHTS[0]}) write them; {named} is "
                             f"neither: pass such a file or its folder")
        folder = transformer_folder(path if os.path.isdir(path) else os.path.dirname(path) or ".")
        if named != "model.safetensors" and any(os.path.isfile(os.path.join(folder, f)) for f in DIFFUSERS_WEIGHTS):
            info["format"] = "diffusers"
            config, state_dict, notes = read_diffusers(folder)
            info["notes"] += notes
            info["training_config"] = read_scheduler_config(folder)
            info["sources"] = dict.fromkeys(config, "checkpoint")
            return state_dict, config
        if os.path.isfile(os.path.join(folder, "model.safetensors")):
            info["format"] = "safetensors"
            return _read_safetensors(folder, info)
        found = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        raise ValueError(f"{path}: unknown checkpoint folder (files: {found[:8]}); expected {_KNOWN}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")

    ckpt = _torch_load(path, trust)
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path}: unknown checkpoint format (a {type(ckpt).__name__}); expected {_KNOWN}")
    if "format" in ckpt:
        if ckpt["format"] != TRAIN_FORMAT:
            raise ValueError(f"{path}: unsupported checkpoint format {ckpt['format']!r}; "
                             f"this code reads {TRAIN_FORMAT}")
        info["format"] = TRAIN_FORMAT
        info.update(training_config=ckpt.get("config"), step=ckpt.get("step"))
        state_dict = _pick_weights(ckpt, use_ema, info)
        info["sources"] = dict.fromkeys(ckpt["model_config"], "checkpoint")
        return state_dict, dict(ckpt["model_config"])
    if "model" in ckpt or "ema" in ckpt:
        state_dict = _strip_prefixes(_pick_weights(ckpt, use_ema, info))
        fixed_point = _is_fpdm(state_dict)
        info["format"] = "fpdm-release" if fixed_point else "dit-train"
        args = ckpt.get("args")
        args = _release_args(vars(args) if isinstance(args, argparse.Namespace) else dict(args or {}), path)
        info.update(training_config=args or None, step=ckpt.get("train_steps"))
        return state_dict, (_infer(state_dict, info, model_name, overrides, args) if infer else {})
    if _looks_like_state_dict(ckpt):
        state_dict = _strip_prefixes(ckpt)
        info["format"] = "dit-state-dict"
        return state_dict, (_infer(state_dict, info, model_name, overrides, {}) if infer else {})
    raise ValueError(f"{path}: unknown checkpoint format (top-level keys {sorted(map(str, ckpt))[:8]}); "
                     f"expected {_KNOWN}")


# The FPDM release's train.py arguments (its `Args`, saved as checkpoint["args"]) under another name than ours.
RELEASE_ARG_NAMES = {"use_zero_terminal_snr": "zero_terminal_snr"}


def _release_args(args, path):
    """A DiT / FPDM-release checkpoint's training args under this code's names (so that its diffusion settings, e.g.
    zero-terminal SNR, are read); its flow-matching and DINO-conditioned models are refused: they are not diffusion
    models with class labels."""
    if args.get("flow"):
        raise ValueError(f"{path}: a flow-matching model of the FPDM release (args flow=True); this code samples its "
                         f"diffusion models only")
    if args.get("dino_supervised"):
        raise ValueError(f"{path}: an FPDM release model conditioned on DINO features (args dino_supervised=True); "
                         f"this code conditions on class labels only")
    return {RELEASE_ARG_NAMES.get(k, k): v for k, v in args.items()}


def _torch_load(path, trust):
    """torch.load with weights_only=True; argparse.Namespace is allowed only when trusted, nothing else ever.
    Memory-mapped where the file allows it (torch.save's zip format): only the tensors used are read, so eight
    sampling processes on a train.py checkpoint (model, EMA and Adam state: 10.8 GB at DiT-XL/2) do not each hold
    all of it in RAM."""
    mmap = zipfile.is_zipfile(path)  # the legacy format (torch < 1.6) cannot be mapped

    def load():  # the checkpoint, or the name of the global that weights_only loading refused
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # noqa: BLE001 (torch raises many kinds for files that are not checkpoints)
            if isinstance(e, pickle.UnpicklingError) and (match := re.search(r"GLOBAL ([\w.]+)", str(e))):
                return match.group(1)
            lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
            reason = next((line for line in lines if line.startswith(("Unsupported", "Trying"))), lines[0])
            raise ValueError(f"cannot read {path} as a torch checkpoint ({e.__class__.__name__}: {reason}); "
                             f"expected {_KNOWN}") from None

    def refuse(blocked):
        return ValueError(f"refusing to load {path}: it pickles {blocked}, which weights_only loading does not allow "
                          f"(unpickling it could run arbitrary code); only tensors, plain data and, with "
                          f"--trust-checkpoint, argparse.Namespace are accepted")

    result = load()
    if not isinstance(result, str):
        return result
    if result != "argparse.Namespace":
        raise refuse(result)
    if not trust:
        raise ValueError(f"{path} stores its training arguments as a pickled argparse.Namespace (a DiT or FPDM "
                         f"training checkpoint), which weights_only loading refuses: if you trust this file, pass "
                         f"--trust-checkpoint (trust_checkpoint=True) to allow exactly that class")
    with torch.serialization.safe_globals([argparse.Namespace]):
        result = load()
    if isinstance(result, str):
        raise refuse(result)
    return result


def diffusion_settings(training_config):
    """The recorded diffusion settings of a training config (only the keys of diffusion.DIFFUSION_DEFAULTS it has),
    or None when it has none."""
    found = {k: training_config[k] for k in DIFFUSION_DEFAULTS if k in (training_config or {})}
    return found or None


def _read_safetensors(folder, info):
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    file = os.path.join(folder, "model.safetensors")
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    try:
        with safe_open(file, framework="pt") as f:
            meta = f.metadata() or {}
        weights = load_file(file)
    except SafetensorError as e:  # cut off (a copy that did not finish), or not a safetensors file
        raise ValueError(f"{file} cannot be read ({e}): copy or export it again") from None
    info["weights"] = meta.get("weights", "weights")
    if meta.get("source_format"):
        info["notes"].append(f"exported from a {meta['source_format']} checkpoint ({meta.get('source', '?')})")
    info["sources"] = dict.fromkeys(config, "checkpoint")
    if meta.get("diffusion"):
        info["training_config"] = json.loads(meta["diffusion"])
    return weights, config


def _pick_weights(ckpt, use_ema, info):
    name = "ema" if use_ema and ckpt.get("ema") is not None else "model"
    if use_ema and name == "model":
        info["notes"].append("no EMA weights in this checkpoint: using the raw model weights")
    if ckpt.get(name) is None:
        raise ValueError(f"{info['path']}: checkpoint has no {name!r} weights")
    info["weights"] = name
    return ckpt[name]


def _looks_like_state_dict(obj):
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values()) and any(
        k.endswith("x_embedder.proj.weight") for k in obj)


def _strip_prefixes(state_dict):
    """Drop wrapper prefixes (DDP's "module.", torch.compile's "_orig_mod.") shared by every key."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def _is_fpdm(state_dict):
    return any(k.startswith(("blocks_pre.", "block_fixed_point")) for k in state_dict)


# ------------------------------------------------------------------------------------------------------------------
# Architecture inference (shapes only, so it works on meta tensors)
# ------------------------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def registry_config(name):
    """The DiT config of a registry name, read from a model built on the meta device (no memory)."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(DiT_models)}")
    with torch.device("meta"):
        return dict(DiT_models[name]().config)


def _registry_for_hidden(hidden):
    names = [n for n in DiT_models if n.endswith("/2") and registry_config(n)["hidden_size"] == hidden]
    return names[0].rsplit("/", 1)[0] if names else None


def _count_blocks(state_dict, prefix):
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"state dict has non-contiguous {prefix}* indices {sorted(indices)}")
    return len(indices)


def infer_config(state_dict, model_name=None, given=None):
    """DiT keyword arguments implied by a DiT/FPDM state dict; returns (config, sources).

    From shapes: hidden size, in_channels and patch size (x_embedder.proj.weight is (D, C, p, p)), input size
    (pos_embed tokens x patch), learn_sigma (final layer width), num_classes (table rows - 1: DiT and the FPDM
    release always allocate the null row; 0 dropout via `given` counts every row as a class), mlp_ratio, DiT depth or
    FPDM pre/post depths. From `model_name` or, failing that, the registry entry of that width: num_heads, and depth
    (FPDM: sets the default iteration count). `given` values (training args, overrides) win.
    """
    given = dict(given or {})
    sd = state_dict
    if "x_embedder.proj.weight" not in sd or "final_layer.linear.weight" not in sd:
        raise ValueError("not a DiT/FPDM state dict: x_embedder.proj.weight or final_layer.linear.weight is missing")
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    config = dict(hidden_size=hidden, in_channels=in_channels, patch_size=patch, fixed_point=_is_fpdm(sd))
    sources = dict.fromkeys(config, "weights")

    def put(key, value, source):
        config[key], sources[key] = value, source

    out = sd["final_layer.linear.weight"].shape[0] // patch ** 2
    if out not in (in_channels, 2 * in_channels):
        raise ValueError(f"final layer predicts {out} channels for {in_channels} input channels: expected "
                         f"{in_channels} or {2 * in_channels} (learned sigma)")
    put("learn_sigma", out == 2 * in_channels, "weights")
    dropout = given.get("class_dropout_prob", 0.1)
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    put("num_classes", rows - 1 if dropout > 0 and rows > 1 else rows, "weights (table rows - null row)")
    put("class_dropout_prob", dropout if rows > 1 else 0.0, "default (DiT's 0.1: the table has a null row)")
    if "pos_embed" in sd:
        side = math.isqrt(sd["pos_embed"].shape[1])
        if side * side == sd["pos_embed"].shape[1]:
            put("input_size", side * patch, "weights (pos_embed tokens x patch)")
    first = "blocks_pre.0." if config["fixed_point"] else "blocks.0."
    if config["fixed_point"] and f"{first}mlp.fc1.weight" not in sd:
        first = "block_fixed_point."
    if f"{first}mlp.fc1.weight" in sd:
        put("mlp_ratio", sd[f"{first}mlp.fc1.weight"].shape[0] / hidden, "weights")

    size = None
    if model_name is not None:
        named = registry_config(model_name)
        if (named["hidden_size"], named["patch_size"]) != (hidden, patch):
            raise ValueError(f"model {model_name} has hidden size {named['hidden_size']} and patch "
                             f"{named['patch_size']} but the weights have {hidden} and {patch}")
        size, label = named, f"registry {model_name}"
    elif (prefix := _registry_for_hidden(hidden)) is not None:
        size, label = registry_config(f"{prefix}/2"), f"registry {prefix} (by hidden size {hidden})"
    if size is not None:
        put("num_heads", size["num_heads"], label)
        put("depth", size["depth"], label)
    if config["fixed_point"]:
        put("fixed_point_pre_depth", _count_blocks(sd, "blocks_pre."), "weights")
        put("fixed_point_post_depth", _count_blocks(sd, "blocks_post."), "weights")
        put("fixed_point_pre_post_timestep_conditioning", False, "default (the FPDM release trained with False)")
        if "depth" not in config:
            pre_post = config["fixed_point_pre_depth"] + config["fixed_point_post_depth"]
            put("depth", pre_post + 1, "default (1 iteration per call)")
    else:
        put("depth", _count_blocks(sd, "blocks."), "weights")

    for key, value in given.items():
        put(key, value, "given")
    for key in ("num_heads", "input_size"):
        if key not in config:
            raise ValueError(f"cannot infer {key} from these weights (hidden size {hidden}, not a registry width, or "
                             f"no square pos_embed): pass model_name= or {key}=")
    return config, sources


def _infer(state_dict, info, model_name, overrides, args):
    """Config for inferred formats: weights first, then training args (model name, fixed-point settings)."""
    from_args = {k: v for k, v in args.items() if k.startswith("fixed_point_") and k in DiT.config_keys()}
    if not _is_fpdm(state_dict):
        from_args = {}
    named = args.get("model")
    if model_name is None and isinstance(named, str) and named in DiT_models:
        width = tuple(state_dict.get("x_embedder.proj.weight", torch.empty(0, 0, 0)).shape)
        if (registry_config(named)["hidden_size"], registry_config(named)["patch_size"]) == width[::2]:
            model_name = named
            info["notes"].append(f"model name {named} read from the checkpoint's args")
        else:
            info["notes"].append(f"the checkpoint's args name {named}, which does not match the weights: ignored")
    config, sources = infer_config(state_dict, model_name, {**from_args, **overrides})
    sources.update(dict.fromkeys(from_args, "args"))
    if args.get("image_size") and config.get("input_size") not in (None, args["image_size"] // 8):
        info["notes"].append(f"args say image_size {args['image_size']} but pos_embed gives latent size "
                             f"{config['input_size']}: the weights win")
    info["sources"] = sources
    info["notes"].append("architecture inferred: see info['sources'] for what was read and what was assumed")
    return config


# ------------------------------------------------------------------------------------------------------------------
# Initialising an FPDM from a pretrained DiT
# ------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def init_fpdm_from_dit(fpdm_model, dit, fixed_point_block=None):
    """Start an FPDM from a pretrained DiT of the same width (a DiT model or its state dict); returns a report.

    Copied: patch/timestep/label embedders, pos_embed, final layer; pre blocks <- the first DiT blocks, post blocks
    <- the last ones, the fixed-point block <- a middle block (`fixed_point_block`, default the middle of the
    blocks left over). Projections make the first iteration exactly that block's own map, f(z) = block(z, c):
      block_pre_projection = 0, so the injection u = 0;
      fc1 = [[I, *], [-I, *]] and fc2 = [I, -I], so fc2(gelu(fc1([z, u]))) = gelu(z) - gelu(-z) = z,
      exact for GELU (x·Φ(x) + x·Φ(-x) = x) and for its tanh approximation (tanh is odd).
    The injection columns `*` of fc1 keep the FPDM's random init: were they zero too, the injection path would get
    exactly zero gradient forever (u = 0 and no path to it). num_heads is invisible in a state dict: pass the DiT
    model to have it checked.
    """
    if not fpdm_model.fixed_point:
        raise ValueError("init_fpdm_from_dit needs an FPDM model (fixed_point=True)")
    if isinstance(dit, nn.Module):
        for key in ("hidden_size", "num_heads", "patch_size", "mlp_ratio", "in_channels", "num_classes"):
            if dit.config[key] != fpdm_model.config[key]:
                raise ValueError(f"DiT has {key}={dit.config[key]} but the FPDM has {fpdm_model.config[key]}")
        dit = dit.state_dict()
    dit = _strip_prefixes(dict(dit))
    depth = _count_blocks(dit, "blocks.")
    pre, post = len(fpdm_model.blocks_pre), len(fpdm_model.blocks_post)
    if depth < pre + post + 1:
        raise ValueError(f"a DiT with {depth} blocks cannot fill {pre} pre + 1 fixed-point + {post} post blocks")
    middle = pre + (depth - pre - post) // 2 if fixed_point_block is None else fixed_point_block
    if not pre <= middle < depth - post:
        raise ValueError(f"fixed_point_block {middle} must lie between the pre and post blocks "
                         f"({pre}..{depth - post - 1})")
    placement = {f"blocks_pre.{j}": j for j in range(pre)}
    placement["block_fixed_point"] = middle
    placement.update({f"blocks_post.{j}": depth - post + j for j in range(post)})

    state = {k: v for k, v in dit.items() if not k.startswith("blocks.")}
    for target, index in placement.items():
        source = f"blocks.{index}."
        state.update({f"{target}.{k[len(source):]}": v for k, v in dit.items() if k.startswith(source)})
    hidden = fpdm_model.config["hidden_size"]
    eye = torch.eye(hidden)
    fc1 = fpdm_model.block_fixed_point_projection_fc1.weight.detach().float().cpu().clone()
    fc1[:, :hidden] = torch.cat([eye, -eye], dim=0)
    state.update({
        "block_pre_projection.weight": torch.zeros(hidden, hidden),
        "block_pre_projection.bias": torch.zeros(hidden),
        "block_fixed_point_projection_fc1.weight": fc1,
        "block_fixed_point_projection_fc1.bias": torch.zeros(2 * hidden),
        "block_fixed_point_projection_fc2.weight": torch.cat([eye, -eye], dim=1),
        "block_fixed_point_projection_fc2.bias": torch.zeros(hidden),
    })
    state.setdefault("pos_embed", fpdm_model.pos_embed)
    load_state_dict_checked(fpdm_model, state)

    used = set(placement.values())
    notes = []
    if not fpdm_model.config["fixed_point_pre_post_timestep_conditioning"]:
        notes.append("pre/post blocks and the final layer see only the label embedding "
                     "(fixed_point_pre_post_timestep_conditioning=False) but were trained in DiT on t + y: "
                     "the initial model differs from the truncated DiT until fine-tuned")
    return {"dit_depth": depth, "placement": placement, "unused_dit_blocks": [i for i in range(depth) if i not in used],
            "projections": "pre_projection = 0; fc1 = [[I, init], [-I, init]], fc2 = [I, -I]: first iteration = "
                           f"DiT block {middle}", "notes": notes}


# ------------------------------------------------------------------------------------------------------------------
# Training checkpoints (train.py): find, read, write (with latest.json and keep-last), every process's RNG state
# ------------------------------------------------------------------------------------------------------------------

def find_training_checkpoint(resume, run_dir):
    """Resolve --resume ('auto', a checkpoint file or a run folder) to a checkpoint path; None for 'auto' with nothing
    to resume, or for no --resume."""
    if resume is None:
        return None
    folder = run_dir if resume == "auto" else resume
    if os.path.isfile(folder):
        return folder
    if (path := latest_checkpoint(folder)) != folder:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{os.path.join(folder, 'latest.json')} names {path}, which is missing; "
                                    f"{_others(folder, path)}")
        return path
    if resume == "auto":
        return None
    raise FileNotFoundError(f"--resume {resume}: no checkpoint file and no latest.json there")


def _others(run_dir, bad):
    """What to do when checkpoint `bad` of a run cannot be used: the newest readable other checkpoint, if any."""
    folder = os.path.join(run_dir, "checkpoints")
    names = sorted((n for n in os.listdir(folder) if re.fullmatch(r"step_\d+\.pt", n)), reverse=True) \
        if os.path.isdir(folder) else []
    for name in names:
        path = os.path.join(folder, name)
        if os.path.abspath(path) == os.path.abspath(bad):
            continue
        try:
            read_training_checkpoint(path)
        except ValueError:
            continue
        return f"the newest readable checkpoint is {path}: pass --resume {path} to continue from it"
    return f"no other readable checkpoint in {folder}: start the run over under another --run-name"


def resume_checkpoint(resume, run_dir):
    """(path, checkpoint dict) for --resume, or (None, None); one line naming the newest good checkpoint beside an
    unreadable (torn, truncated) one."""
    path = find_training_checkpoint(resume, run_dir)
    if path is None:
        return None, None
    try:
        return path, read_training_checkpoint(path)
    except ValueError as e:
        if os.path.abspath(os.path.dirname(path)) != os.path.abspath(os.path.join(run_dir, "checkpoints")):
            raise
        raise ValueError(f"{e}; {_others(run_dir, path)}") from None


def read_training_checkpoint(path):
    """A train.py checkpoint as a dict (tensors and plain data only), or a one-line error. Memory-mapped: its tensors
    are read from the file as they are copied into the model and optimizer, not held in RAM (10.8 GB at DiT-XL/2, on
    every process)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 (any unreadable file gets the same line)
        reason = (str(e).splitlines() or [""])[0].split(". ")[0][:100]
        raise ValueError(f"cannot read {path} as a train.py checkpoint (truncated, or not one: {reason}); pass a "
                         f"checkpoints/step_*.pt of a train.py run") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != TRAIN_FORMAT:
        raise ValueError(f"{path} is not a train.py checkpoint (format {TRAIN_FORMAT}); pass a checkpoints/step_*.pt "
                         f"of a train.py run (other checkpoints start a run with --init-from)")
    return ckpt


def write_training_checkpoint(run_dir, step, state, keep_last, keep_every=0):
    """Write `state` (plus format and step) as checkpoints/step_NNNNNNN.pt atomically, point latest.json at it, then
    keep the `keep_last` newest by step (never the one just written) and those at multiples of `keep_every`. Returns
    the checkpoint's relative path."""
    from fpdm.run_folders import atomic_write, prune_checkpoints
    name = f"checkpoints/step_{step:07d}.pt"
    # CPU tensors: a checkpoint written on a GPU loads anywhere with plain torch.load.
    ckpt = {"format": TRAIN_FORMAT, "step": step, **to_cpu(state)}
    atomic_torch_save(ckpt, os.path.join(run_dir, name))
    atomic_write(os.path.join(run_dir, "latest.json"), lambda f: json.dump({"step": step, "path": name}, f))
    prune_checkpoints(os.path.join(run_dir, "checkpoints"), step, keep_last, keep_every)
    return name


def atomic_torch_save(obj, path):
    """torch.save through run_folders.atomic_write: a crash mid-write leaves the old file intact. A write the file
    system refuses (disk full, quota, file too large) is raised as its OSError: torch.save's zip writer reports one
    that strikes while it writes tensor data as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos",
    with the OSError only as its context."""
    from fpdm.run_folders import atomic_write
    try:
        atomic_write(path, lambda f: torch.save(obj, f), "wb")
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from e
        raise


def to_cpu(obj):
    """obj with every tensor inside (dicts, lists, tuples) moved to the CPU."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def rng_state():
    """This process's torch, Python, NumPy (and CUDA) RNG states, as tensors and plain data."""
    import random

    import numpy as np
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:])
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    import random

    import numpy as np
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
