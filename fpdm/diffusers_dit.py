"""Our DiT <-> diffusers: the DiTTransformer2DModel key mapping and the DDIMScheduler config (the one place both
live; `checkpoints.load_model` reads with it, `export.py` writes a DiTPipeline folder with it).

Folders read: a pipeline (model_index.json, transformer/, scheduler/, vae/) or a bare transformer folder
(config.json + diffusion_pytorch_model.safetensors, optionally scheduler_config.json beside: the old export layout).

Key mapping, ours -> diffusers (as in diffusers' DiT conversion script):
  x_embedder.proj -> pos_embed.proj (pos_embed itself is a fixed, unsaved buffer in diffusers)
  blocks.i.attn.qkv -> transformer_blocks.i.attn1.to_q / to_k / to_v (rows split in three), attn.proj -> to_out.0
  blocks.i.adaLN_modulation.1 -> norm1.linear (same chunk order: shift, scale, gate for attention, then MLP)
  blocks.i.mlp.fc1 / fc2 -> ff.net.0.proj / ff.net.2
  t_embedder.mlp.0 / 2 and y_embedder.embedding_table -> norm1.emb.{timestep_embedder.linear_1 / linear_2,
      class_embedder.embedding_table} copied into EVERY block (diffusers keeps one embedder per block)
  final_layer.adaLN_modulation.1 -> proj_out_1, final_layer.linear -> proj_out_2
Numerics: both put cosines first (`flip_sin_to_cos=True`), but diffusers' DiT uses `downscale_freq_shift=1`, i.e.
timestep frequencies exp(-ln(1e4)·i/127) where DiT uses i/128: the same weights give different outputs in the two
libraries (timestep features in [-1, 1] differ by up to 1.98 near t = 999). No diffusers config field sets the shift
(CombinedTimestepLabelEmbeddings hard-codes it): call `diffusers_dit.use_dit_timestep_frequencies` on a loaded
model (`pipe.transformer`) to reproduce ours exactly. Our side is the original DiT function. diffusers' MLP LayerNorm
takes `norm_eps`; we write DiT's 1e-6.
"""

import json
import os

import torch

from models import get_2d_sincos_pos_embed

_TOP = {"pos_embed.proj": "x_embedder.proj", "proj_out_1": "final_layer.adaLN_modulation.1",
        "proj_out_2": "final_layer.linear"}
_BLOCK = {"norm1.linear": "adaLN_modulation.1", "attn1.to_out.0": "attn.proj", "ff.net.0.proj": "mlp.fc1",
          "ff.net.2": "mlp.fc2"}
_EMBEDDERS = {"norm1.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
              "norm1.emb.timestep_embedder.linear_2": "t_embedder.mlp.2"}
_TABLE = "norm1.emb.class_embedder.embedding_table.weight"
_QKV = ("attn1.to_q", "attn1.to_k", "attn1.to_v")
DIFFUSERS_CONFIG_KEY = "_fpdm_model_config"  # diffusers ignores config keys starting with "_"
PIPELINE_NULL_CLASS = 1000  # DiTPipeline's class id for the unconditional branch (hard-coded, ImageNet's count)


def _pairs(depth):
    """(diffusers key, our key) of every one-to-one weight/bias; embedder keys repeat once per block."""
    pairs = list(_TOP.items())
    for i in range(depth):
        block = f"transformer_blocks.{i}."
        pairs += [(block + theirs, f"blocks.{i}.{ours}") for theirs, ours in _BLOCK.items()]
        pairs += [(block + theirs, ours) for theirs, ours in _EMBEDDERS.items()]
    return [(f"{theirs}.{p}", f"{ours}.{p}") for theirs, ours in pairs for p in ("weight", "bias")]


# ------------------------------------------------------------------------------------------------------------------
# diffusers
# ------------------------------------------------------------------------------------------------------------------

def to_diffusers(model, out_dir, num_embeds=None):
    """Write our DiT as a diffusers DiTTransformer2DModel folder (config.json + diffusion_pytorch_model.safetensors).

    Our full config rides along under the private key "_fpdm_model_config", so the way back is exact. diffusers
    always allocates a null row after the classes: a model without one (class_dropout_prob = 0) gets an unused zero
    row. num_embeds: the class count diffusers is told (DiTPipeline needs PIPELINE_NULL_CLASS, its null id): the
    table is padded to it with copies of the null row (zero rows without one), so those labels sample unconditionally.
    """
    from safetensors.torch import save_file
    cfg = model.config
    if model.fixed_point:
        raise ValueError("FPDM has no diffusers model class: export it with --format safetensors")
    height, width = model.input_hw
    if height != width or cfg["mlp_ratio"] != 4:
        raise ValueError(f"diffusers' DiT needs square inputs and mlp_ratio 4, this model has input "
                         f"{height}x{width} and mlp_ratio {cfg['mlp_ratio']}")
    num_embeds = cfg["num_classes"] if num_embeds is None else num_embeds
    if num_embeds < cfg["num_classes"]:
        raise ValueError(f"cannot write {cfg['num_classes']} classes as {num_embeds}")
    ours = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    table = ours["y_embedder.embedding_table.weight"]
    classes, null = table[:cfg["num_classes"]], table[cfg["num_classes"]:]
    if cfg["class_dropout_prob"] <= 0:
        null = table.new_zeros(1, table.shape[1])
    table = torch.cat([classes, null.expand(num_embeds - cfg["num_classes"] + 1, -1)])
    # clone(): every block holds its own embedder copy, and safetensors refuses tensors that share memory.
    theirs = {t: ours[o].clone() for t, o in _pairs(cfg["depth"])}
    for i in range(cfg["depth"]):
        block = f"transformer_blocks.{i}."
        theirs[block + _TABLE] = table.clone()
        for p in ("weight", "bias"):
            for name, part in zip(_QKV, ours[f"blocks.{i}.attn.qkv.{p}"].chunk(3)):
                theirs[f"{block}{name}.{p}"] = part.clone()

    hidden, heads = cfg["hidden_size"], cfg["num_heads"]
    config = {"_class_name": "DiTTransformer2DModel", "_diffusers_version": diffusers_version(),
              "num_attention_heads": heads, "attention_head_dim": hidden // heads, "in_channels": cfg["in_channels"],
              "out_channels": model.out_channels, "num_layers": cfg["depth"], "dropout": 0.0,
              "norm_num_groups": 32, "attention_bias": True, "sample_size": height, "patch_size": cfg["patch_size"],
              "activation_fn": "gelu-approximate", "num_embeds_ada_norm": num_embeds,
              "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
              "norm_eps": 1e-6, DIFFUSERS_CONFIG_KEY: cfg}
    os.makedirs(out_dir, exist_ok=True)
    save_file(theirs, os.path.join(out_dir, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return out_dir


def transformer_folder(folder):
    """The DiTTransformer2DModel folder inside `folder`: a pipeline's transformer/, else `folder` itself."""
    inner = os.path.join(folder, "transformer")
    return inner if os.path.isfile(os.path.join(inner, "config.json")) else folder


def read_diffusers(folder):
    """A diffusers DiT folder as (our config, our state dict, notes); used by `checkpoints.load_model`."""
    with open(os.path.join(folder, "config.json")) as f:
        dc = json.load(f)
    if dc.get("_class_name") not in (None, "DiTTransformer2DModel", "Transformer2DModel"):
        raise ValueError(f"{folder} holds a diffusers {dc['_class_name']}, not a DiTTransformer2DModel")
    expected = {"norm_type": "ada_norm_zero", "activation_fn": "gelu-approximate", "norm_elementwise_affine": False,
                "attention_bias": True}
    for key, value in expected.items():
        if dc.get(key, value) != value:
            raise ValueError(f"{folder}: {key}={dc[key]!r} has no counterpart in DiT (expected {value!r})")
    theirs = _read_diffusers_weights(folder)
    hidden, depth = dc["num_attention_heads"] * dc["attention_head_dim"], dc["num_layers"]
    in_channels = dc.get("in_channels", 4)
    out_channels = dc.get("out_channels") or in_channels
    notes = ["diffusers' DiT uses timestep frequencies i/127 (downscale_freq_shift=1) where DiT uses i/128: this "
             "model computes the original DiT function, not diffusers' (outputs differ)"]
    config = dc.get(DIFFUSERS_CONFIG_KEY)
    if config is None:
        if out_channels not in (in_channels, 2 * in_channels):
            raise ValueError(f"{folder}: out_channels {out_channels} is neither in_channels nor twice it")
        mlp_width = theirs["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
        config = dict(input_size=dc["sample_size"], patch_size=dc["patch_size"], in_channels=in_channels,
                      hidden_size=hidden, depth=depth, num_heads=dc["num_attention_heads"],
                      mlp_ratio=mlp_width / hidden, class_dropout_prob=0.1, num_classes=dc["num_embeds_ada_norm"],
                      learn_sigma=out_channels == 2 * in_channels)
        if dc.get("norm_eps", 1e-5) != 1e-6:
            notes.append(f"diffusers config has norm_eps={dc.get('norm_eps', 1e-5)} for the MLP LayerNorm; "
                         f"DiT (and this model) uses 1e-6")

    ours = {o: theirs[t] for t, o in reversed(_pairs(depth))}  # block 0's embedder copies win
    for t, o in _pairs(depth):
        if not torch.equal(theirs[t], ours[o]):
            raise ValueError(f"{t} differs from block 0's copy: this DiT has per-block embedders, which our DiT "
                             f"(one shared embedder) cannot represent")
    tables = [theirs[f"transformer_blocks.{i}.{_TABLE}"] for i in range(depth)]
    if any(not torch.equal(t, tables[0]) for t in tables):
        raise ValueError("class embedding tables differ between blocks: our DiT has one shared table")
    # our classes, then the null row (the last): drops to_diffusers' padding, and the zero row of a null-free model
    classes = config["num_classes"]
    table = tables[0]
    ours["y_embedder.embedding_table.weight"] = \
        torch.cat([table[:classes], table[-1:]]) if config.get("class_dropout_prob", 0.1) > 0 else table[:classes]
    for i in range(depth):
        for p in ("weight", "bias"):
            ours[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([theirs[f"transformer_blocks.{i}.{n}.{p}"] for n in _QKV])
    grid = dc["sample_size"] // dc["patch_size"]
    ours["pos_embed"] = get_2d_sincos_pos_embed(hidden, grid).unsqueeze(0)
    return dict(config), ours, notes


SCHEDULER_CONFIG = "scheduler_config.json"
DIFFUSERS_DIFFUSION_KEY = "_fpdm_diffusion"
_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}


def scheduler_config(diffusion):
    """A diffusers DDIMScheduler config that samples our DDIM (trailing spacing), with ours under a private key.

    Built by `sampling.diffusers_scheduler` from our base betas (written as `trained_betas`; beta_schedule only
    names them) and our parameterisation. `set_alpha_to_one`: our last DDIM step goes to ᾱ = 1 (x̂_0 itself).
    diffusers steps from t to t - T // N, which is our next timestep when N divides T (e.g. 10, 25, 50, 250 of 1000).
    """
    from fpdm.sampling import diffusers_scheduler, diffusion_for_sampling, diffusion_kwargs
    settings = diffusion_kwargs(diffusion)
    spaced = diffusion_for_sampling(settings, settings["diffusion_steps"])  # all T steps: trailing is tried first
    scheduler = diffusers_scheduler(spaced, "DDIMScheduler", clip_sample=False, set_alpha_to_one=True,
                                    steps_offset=0, beta_schedule=_BETA_SCHEDULES[settings["noise_schedule"]])
    return {**json.loads(scheduler.to_json_string()), DIFFUSERS_DIFFUSION_KEY: diffusion}


def read_scheduler_config(folder):
    """Diffusion settings (train.py names) from a diffusers scheduler config beside the model (`scheduler_config.json`)
    or in a pipeline's `../scheduler/`; None when there is none. Settings we cannot reproduce are refused."""
    for path in (os.path.join(folder, SCHEDULER_CONFIG),
                 os.path.join(os.path.dirname(os.path.normpath(folder)), "scheduler", SCHEDULER_CONFIG)):
        if os.path.isfile(path):
            break
    else:
        return None
    with open(path) as f:
        sc = json.load(f)
    if DIFFUSERS_DIFFUSION_KEY in sc:
        return dict(sc[DIFFUSERS_DIFFUSION_KEY])
    schedules = {v: k for k, v in _BETA_SCHEDULES.items()}
    prediction = sc.get("prediction_type", "epsilon")
    if sc.get("trained_betas") is not None:
        raise ValueError(f"{path}: explicit trained_betas without our diffusion settings: pass the diffusion flags")
    if sc.get("beta_schedule", "linear") not in schedules or prediction not in ("epsilon", "v_prediction"):
        raise ValueError(f"{path}: beta_schedule {sc.get('beta_schedule')!r} / prediction_type {prediction!r} have no "
                         f"counterpart here (linear or squaredcos_cap_v2; epsilon or v_prediction)")
    return {"noise_schedule": schedules[sc.get("beta_schedule", "linear")], "predict_v": prediction == "v_prediction",
            "zero_terminal_snr": bool(sc.get("rescale_betas_zero_snr", False)),
            "diffusion_steps": int(sc.get("num_train_timesteps", 1000))}


def use_dit_timestep_frequencies(diffusers_model):
    """Make a diffusers DiTTransformer2DModel compute DiT's timestep features (frequencies i/128, not i/127), so
    an exported model reproduces our outputs in diffusers (float32: max |diff| 0 in our tests). Returns the model."""
    for block in diffusers_model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return diffusers_model


def _read_diffusers_weights(folder):
    file = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if os.path.isfile(file):
        from safetensors.torch import load_file
        return load_file(file)
    return torch.load(os.path.join(folder, "diffusion_pytorch_model.bin"), map_location="cpu", weights_only=True)


def diffusers_version():
    try:
        import diffusers
        return diffusers.__version__
    except ImportError:
        return "unknown"
