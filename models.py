"""DiT and Fixed Point Diffusion Models (FPDM) in one file.

DiT (Peebles & Xie, 2023) is a stack of adaLN-Zero transformer blocks over patch tokens. FPDM (Bai &
Melas-Kyriazi, CVPR 2024) keeps a few of those blocks before ("pre") and after ("post") and replaces the middle of
the stack with ONE block iterated to a fixed point (`FPDM.solve`, the only place iterations happen); `FPDM` is a
subclass of `DiT` that overrides the trunk between embedding and final layer. State-dict keys match official DiT
checkpoints (DiT) and the FPDM release (FPDM).

    model = DiT_models["DiT-XL/2"]()                                   # DiT-XL/2, 675M parameters
    fpdm = DiT_models["DiT-XL/2"](fixed_point=True)                     # FPDM-XL/2, 86.5M parameters
    out = fpdm(x, t, y, num_iterations=26)                              # sampling: a fixed iteration count
    fpdm.last_stats.residual_values()                                   # ||f(z) - z|| / ||z|| per iteration
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp, PatchEmbed
from torch.utils.checkpoint import checkpoint


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _checkpointed(fn, *args):
    # Non-reentrant checkpointing works under torch.no_grad, with DDP, and with inputs that need no grad.
    return checkpoint(fn, *args, use_reentrant=False)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################

class TimestepEmbedder(nn.Module):
    """Embeds scalar (possibly fractional) timesteps: 256-d sinusoidal features -> MLP."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """(N,) timesteps -> (N, dim) features, cosine half first then sine (GLIDE/DiT convention)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t):
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels; with dropout > 0 the extra last row is the "null" class used by classifier-free guidance."""

    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


#################################################################################
#                                 Core DiT Model                                #
#################################################################################

class DiTBlock(nn.Module):
    """A transformer block with adaptive layer norm zero (adaLN-Zero) conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(in_features=hidden_size, hidden_features=int(hidden_size * mlp_ratio),
                       act_layer=lambda: nn.GELU(approximate="tanh"), drop=0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from tokens to patch_size² · out_channels values."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass
class FixedPointStats:
    """What one FPDM call did: the iterations run, the S-JFB counts asked for (n without a graph, m with one) and the
    relative residual ||f(z) - z|| / ||z|| (norm over the batch) after each iteration, as 0-d tensors (no device
    sync until read; in training mode and with IterationPolicy(history=False), the samplers' default, unless a
    tolerance or stop rule needs them all, only the last iteration's);
    with them, the last iteration's residual of each example (norm over its tokens), a (B,) tensor (train.py
    buckets it by timestep). `FPDM.last_stats` holds the last call's."""
    iterations: int = 0
    sjfb: tuple = (0, 0)
    residuals: list = field(default_factory=list)
    image_iterations: list = None  # per image, where images stop on their own (Anderson with a tolerance)
    example_residuals: torch.Tensor = None  # (B,) after the last iteration; None when residuals are not tracked

    @property
    def residual(self):
        """The final relative residual as a 0-d tensor, or None when none was tracked."""
        return self.residuals[-1] if self.residuals else None

    def residual_values(self):
        """Every iteration's residual as floats (one device sync)."""
        return torch.stack(self.residuals).tolist() if self.residuals else []


class SolutionCache:
    """Solution reuse between consecutive calls (sampling timesteps): the fixed-point state z of the last call, the
    next call's starting point. A sampler owns one per batch and passes it as `model(..., reuse=cache)`; a model built
    with `fixed_point_reuse_solution=True` (the release's keyword) uses its own `model.solution_cache`."""

    def __init__(self):
        self.solution = None

    def start(self, h):
        """The starting point for pre-block output `h`: the stored solution, or None on the first call."""
        if self.solution is not None and self.solution.shape != h.shape:
            raise ValueError(f"reused solution has shape {tuple(self.solution.shape)} but this batch gives "
                             f"{tuple(h.shape)}: call reset() between batches")
        return None if self.solution is None else self.solution.to(h.dtype)

    def reset(self):
        self.solution = None


class StateCache(SolutionCache):
    """A start per row, for a batch whose rows may have different timesteps (two-axis sampling: every state of a
    DDIM chain keeps its own layer state between outer iterations). The caller sets `solution` before a call, in the
    batch's row order, and reads the call's solution back from it."""

    per_example = True


@dataclass(frozen=True)
class IterationPolicy:
    """How one call of FPDM's layer iterates, and the one place its options are checked (`FPDM.solve` takes it;
    `model(x, t, y, num_iterations=..., tol=..., ...)` builds it from the same names).

    num_iterations: None (training: an S-JFB draw; eval: the model's default), k (k iterations, all with autograd
    when grad is enabled) or (n, m) (n without a graph, then m with one). tol: stop once the relative residual falls
    below it (the count is then the cap). reuse: a SolutionCache, False (never) or None (the model's own cache if
    built with reuse). fp_solver: an object with `method` and `run` (fpdm.sampling.FixedPointSolver); "anderson"
    accelerates the iterations of a call without autograd. stop: stats -> bool, asked after every iteration
    (fpdm.allocation.BudgetAllocator), ends the call when it returns True. history (eval mode, where the model
    tracks residuals): the residual after every iteration (True), or only after the last (False: the samplers'
    default, what their reports read; about 9 small kernels per iteration fewer, a quarter of an iteration's launches
    at batch 1); a tol or a stop rule reads every one and records them all."""
    num_iterations: object = None
    tol: float = None
    reuse: object = None
    fp_solver: object = None
    stop: object = None
    history: bool = True

    def __post_init__(self):
        counts = self.num_iterations
        if isinstance(counts, (tuple, list)):
            if len(counts) != 2 or any(int(v) < 0 for v in counts):
                raise ValueError(f"iteration counts (n, m) must be two numbers >= 0, got {counts}")
        elif counts is not None and int(counts) < 0:
            raise ValueError(f"iteration counts must be >= 0, got {counts}")
        if self.tol is not None and not self.tol > 0:
            raise ValueError(f"the residual tolerance must be > 0, got {self.tol}")
        if self.stop is not None and (self.anderson or self.tol is not None):
            raise ValueError("budget allocation (a stop rule) spends its budget exactly with plain iteration: drop "
                             "the tolerance and the Anderson solver")

    @property
    def anderson(self):
        return self.fp_solver is not None and self.fp_solver.method == "anderson"

    @property
    def tracks_residuals(self):
        return self.tol is not None or self.stop is not None


class DiT(nn.Module):
    """Diffusion transformer (Peebles & Xie, 2023): patch embedding, `depth` adaLN-Zero blocks, final layer.

    `DiT(..., fixed_point=True)` — the release's keyword, also `DiT_models[name](fixed_point=True)` — builds an
    `FPDM`, the subclass below that replaces the trunk of blocks. Both take the same keywords (`config` records them
    all, so a checkpoint rebuilds either with `DiT.from_config`); a DiT ignores the `fixed_point_*` ones.
    """

    fixed_point = False

    def __new__(cls, *args, **kwargs):
        if cls is DiT and kwargs.get("fixed_point", False):
            cls = FPDM
        return super().__new__(cls)

    def __init__(
        self,
        input_size=32,
        patch_size=2,
        in_channels=4,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=1000,
        learn_sigma=True,
        use_gradient_checkpointing=False,
        fixed_point=False,
        fixed_point_pre_depth=1,
        fixed_point_post_depth=1,
        fixed_point_no_grad_min_iters=0,
        fixed_point_no_grad_max_iters=10,
        fixed_point_with_grad_min_iters=1,
        fixed_point_with_grad_max_iters=12,
        fixed_point_reuse_solution=False,
        fixed_point_pre_post_timestep_conditioning=False,
        fixed_point_checkpoint_iterations=False,
        fixed_point_track_residuals=True,
    ):
        super().__init__()
        if fixed_point != self.fixed_point:
            raise ValueError(f"{type(self).__name__}(fixed_point={fixed_point}): build a DiT with DiT(...) and an "
                             f"FPDM with FPDM(...) or DiT(..., fixed_point=True)")
        # Plain data that rebuilds this model: saved in every checkpoint (see `DiT.from_config`).
        self.config = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self.input_hw = _as_hw(input_size)
        # JSON-friendly: an int for square inputs (as DiT and the FPDM release take it), else [height, width].
        self.config["input_size"] = self.input_hw[0] if self.input_hw[0] == self.input_hw[1] else list(self.input_hw)
        _validate_config(self.config, self.input_hw)

        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.use_gradient_checkpointing = use_gradient_checkpointing

        height, width = self.input_hw
        self.grid_size = (height // patch_size, width // patch_size)
        self.x_embedder = PatchEmbed((height, width), patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed 2-D sin-cos table. A buffer (as in the FPDM release) rather than DiT's frozen parameter: the key is the
        # same, so both kinds of checkpoint load, and `parameters()` counts only trainable weights.
        self.register_buffer("pos_embed", torch.zeros(1, self.grid_size[0] * self.grid_size[1], hidden_size))
        self.build_trunk(lambda: DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def build_trunk(self, make_block):
        """The blocks between embedding and final layer: `depth` DiT blocks."""
        self.blocks = nn.ModuleList([make_block() for _ in range(self.config["depth"])])

    def transformer_blocks(self):
        """Every DiTBlock, in order of use (an FPDM's fixed-point block once)."""
        return list(self.blocks)

    def cast_matmul_weights(self, dtype=torch.bfloat16):
        """For inference under torch.autocast to `dtype` only: the weights and biases of every linear and
        convolution layer cast to `dtype` once, the values autocast would cast them to at every call (so the outputs
        are bit-identical), without re-reading the float32 weights per call (2.7 GB at DiT-XL/2: about 1 ms of an
        H100's memory bandwidth per call, inside every CUDA-graph replay too) and in half their memory. Everything
        else (embedding tables, positional embedding) stays float32. Returns the model."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                module.to(dtype)
        return self

    def compile_regions(self, **options):
        """torch.compile each transformer block in place ("regional compilation"): the repeated unit is compiled
        once per shape and grad mode and reused by every block and every fixed-point iteration, whatever the
        iteration counts; the Python around them (S-JFB draws, stopping, reuse) stays eager. Returns the model."""
        for block in self.transformer_blocks():
            block.compile(**options)
        return self

    @classmethod
    def from_config(cls, config):
        """Rebuild a model from `model.config` (e.g. as stored in a checkpoint); unknown keys are an error."""
        unknown = sorted(set(config) - set(cls.config_keys()))
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {cls.config_keys()}")
        return DiT(**config)

    @staticmethod
    def config_keys():
        import inspect
        return [p for p in inspect.signature(DiT.__init__).parameters if p != "self"]

    def initialize_weights(self):
        """DiT's scheme: xavier-uniform linears, zero biases, N(0, 0.02) embeddings, adaLN-Zero and a zero output."""
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)
        self.apply(_basic_init)

        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size).unsqueeze(0))

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))  # like nn.Linear over the flattened patch
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.transformer_blocks():
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def unpatchify(self, x):
        """(N, T, p² · C) tokens -> (N, C, H, W) images."""
        c, p = self.out_channels, self.patch_size
        h, w = self.grid_size
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _run_block(self, block, x, c):
        if self.use_gradient_checkpointing and torch.is_grad_enabled():
            return _checkpointed(block, x, c)
        return block(x, c)

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------

    def forward(self, x, t, y, force_drop_ids=None, **solver):
        """x: (N, C, H, W) images or latents; t: (N,) timesteps; y: (N,) labels -> (N, out_channels, H, W).

        `force_drop_ids`: (N,) booleans, which labels to replace by the null class (training draws them per example;
        without it a training forward drops labels from torch's RNG, as DiT does).
        `solver`: FPDM only: `policy=IterationPolicy(...)` or its fields as keywords (`num_iterations`, `tol`,
        `reuse`, `fp_solver`, `stop`).
        """
        self._check_input(x, t, y, **solver)
        tokens = self.embed(x)
        t_emb = self.t_embedder(t)
        y_emb = self.y_embedder(y, self.training, force_drop_ids)
        tokens, c_final = self.trunk(tokens, t_emb + y_emb, y_emb, **solver)
        return self.unpatchify(self.final_layer(tokens, c_final))

    def embed(self, x):
        """Patch tokens of x plus the positional table: (N, T, D), contiguous. timm's PatchEmbed returns a transposed
        view of its convolution's output, and a residual stream kept in that layout (every add follows its first
        operand's) makes each LayerNorm copy it and each residual add read it strided, in every block; one copy here
        instead, the same values."""
        return self.x_embedder(x).contiguous() + self.pos_embed

    def trunk(self, tokens, c, y_emb, **solver):
        """Blocks between embedding and final layer; returns (tokens, the final layer's conditioning)."""
        if any(v is not None for v in solver.values()):
            raise ValueError(f"{'/'.join(solver)} apply to FPDM models only (build with fixed_point=True)")
        for block in self.blocks:
            tokens = self._run_block(block, tokens, c)
        return tokens, c

    def _check_input(self, x, t, y, **solver):
        expected = (self.in_channels, *self.input_hw)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"input has shape {tuple(x.shape)} but this model takes (N, {', '.join(map(str, expected))})")

    def reset(self):
        """Forget state carried between calls (an FPDM's reused solution); a DiT has none."""

    def forward_with_cfg(self, x, t, y, cfg_scale, guidance_channels=None, **kwargs):
        """Classifier-free guidance over a doubled batch (first half conditional labels, second half null labels).

        Guidance applies to all `in_channels` output channels by default. Official DiT guides only the first 3
        channels "for exact reproducibility": pass `guidance_channels=3` to reproduce its published numbers.
        """
        if self.y_embedder.dropout_prob <= 0:
            raise ValueError("classifier-free guidance needs a model trained with class_dropout_prob > 0")
        half = x[: len(x) // 2]
        # The guidance mix in float32 even under bf16 autocast (the scale amplifies cond - uncond).
        model_out = self.forward(torch.cat([half, half], dim=0), t, y, **kwargs).float()
        channels = self.in_channels if guidance_channels is None else guidance_channels
        eps, rest = model_out[:, :channels], model_out[:, channels:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    # ----------------------------------------------------------------------------------------------------------
    # Accounting: parameters, transformer-block evaluations and FLOPs per sample
    # ----------------------------------------------------------------------------------------------------------

    def num_parameters(self, include_pos_embed=False):
        """Trainable parameter count; `include_pos_embed` adds the fixed table (DiT stores it as a parameter)."""
        n = sum(p.numel() for p in self.parameters())
        return n + (self.pos_embed.numel() if include_pos_embed else 0)

    def block_evaluations(self, num_iterations=None):
        """Transformer-block evaluations of one forward call (an FPDM's: pre + iterations + post)."""
        return len(self.blocks)

    def block_flops(self):
        """FLOPs (2 x multiply-adds) of one transformer block per sample: 12·D² per token (qkv, proj, MLP at ratio 4),
        2·T·D per token (attention scores and values), and the adaLN projection's 6·D² once."""
        hidden, tokens = self.pos_embed.shape[-1], self.pos_embed.shape[1]
        per_token = (4 + 2 * self.config["mlp_ratio"]) * hidden ** 2 + 2 * tokens * hidden
        return 2 * (tokens * per_token + 6 * hidden ** 2)

    def forward_flops(self, num_iterations=None):
        """Estimated FLOPs of one forward call per sample, embedders and final layer included."""
        return self._embed_and_final_flops() + len(self.blocks) * self.block_flops()

    def training_flops(self, sjfb=None):
        """Model FLOPs of one training step per sample: the forward and its backward (twice the forward's
        matmuls). For FPDM `sjfb` = (n, m): the n no-grad iterations run forward only. Recomputation under gradient
        checkpointing is not counted (model FLOPs, as MFU counts them)."""
        return 3 * self.forward_flops()

    def _embed_and_final_flops(self):
        hidden, tokens = self.pos_embed.shape[-1], self.pos_embed.shape[1]
        embed = 2 * (tokens * self.patch_size ** 2 * self.in_channels * hidden + 256 * hidden + hidden ** 2)
        final = 2 * (tokens * hidden * self.patch_size ** 2 * self.out_channels + 2 * hidden ** 2)
        return embed + final


class FPDM(DiT):
    """Fixed Point Diffusion Model (Bai & Melas-Kyriazi, CVPR 2024): `fixed_point_pre_depth` DiT blocks, ONE block
    iterated towards a fixed point with input injection (`solve`, the only place iterations happen), then
    `fixed_point_post_depth` blocks. `depth` only sets the default iteration count at evaluation (depth - pre - post,
    so one call costs as many block evaluations as a DiT of that depth).

    Iteration counts per call:
      - `forward(..., num_iterations=k)`: exactly k iterations, all with autograd (if grad is enabled);
      - `forward(..., num_iterations=(n, m))`: n iterations without a graph, then m with one (explicit S-JFB);
      - training mode, no count given: Stochastic Jacobian-Free Backprop, n ~ U{no_grad_min..no_grad_max},
        m ~ U{with_grad_min..with_grad_max} drawn from torch's global RNG (so a saved RNG state replays them);
      - eval mode, no count given: `default_num_iterations`.
    `tol` stops once the relative residual falls below it (the count is then the cap); `reuse` (a SolutionCache)
    starts from the previous call's solution (False: never; None: the model's own cache if built with reuse). After each call `last_stats` (FixedPointStats) says what happened.
    """

    fixed_point = True

    def build_trunk(self, make_block):
        cfg, hidden = self.config, self.config["hidden_size"]
        self.blocks_pre = nn.ModuleList([make_block() for _ in range(cfg["fixed_point_pre_depth"])])
        self.block_pre_projection = nn.Linear(hidden, hidden)
        self.block_fixed_point_projection_fc1 = nn.Linear(2 * hidden, 2 * hidden)
        self.block_fixed_point_projection_fc2 = nn.Linear(2 * hidden, hidden)
        self.block_fixed_point = make_block()
        self.blocks_post = nn.ModuleList([make_block() for _ in range(cfg["fixed_point_post_depth"])])
        self.fixed_point_no_grad_iters = (cfg["fixed_point_no_grad_min_iters"], cfg["fixed_point_no_grad_max_iters"])
        self.fixed_point_with_grad_iters = (cfg["fixed_point_with_grad_min_iters"],
                                            cfg["fixed_point_with_grad_max_iters"])
        self.fixed_point_reuse_solution = cfg["fixed_point_reuse_solution"]
        self.fixed_point_pre_post_timestep_conditioning = cfg["fixed_point_pre_post_timestep_conditioning"]
        self.fixed_point_checkpoint_iterations = cfg["fixed_point_checkpoint_iterations"]
        self.fixed_point_track_residuals = cfg["fixed_point_track_residuals"]
        self.default_num_iterations = max(cfg["depth"] - cfg["fixed_point_pre_depth"] - cfg["fixed_point_post_depth"], 0)
        self.solution_cache = SolutionCache()
        self.last_stats = FixedPointStats()

    def transformer_blocks(self):
        return [*self.blocks_pre, self.block_fixed_point, *self.blocks_post]

    def trunk(self, tokens, c, y_emb, policy=None, **options):
        """Pre blocks, the fixed-point layer, post blocks. Pre/post blocks and the final layer see only the class
        embedding unless `fixed_point_pre_post_timestep_conditioning` (as in the release). `policy` (an
        IterationPolicy) or its fields as keywords."""
        if policy is not None and options:
            raise ValueError("give an IterationPolicy or its options as keywords, not both")
        policy = policy or IterationPolicy(**options)
        c_outer = c if self.fixed_point_pre_post_timestep_conditioning else y_emb
        for block in self.blocks_pre:
            tokens = self._run_block(block, tokens, c_outer)
        z = self.solve(tokens, c, policy)
        for block in self.blocks_post:
            z = self._run_block(block, z, c_outer)
        return z, c_outer

    def fixed_point_function(self, z, injection, c):
        """f(z; u, c) = block( fc2( gelu( fc1([z, u]) ) ), c ): one iteration of the implicit layer. The state keeps
        z's dtype: under bf16 autocast fc2's output would turn it bf16, whose resolution (2^-8) is coarser than the
        residuals FPDM stops on; like DiT's residual stream it stays float32 (the block adds bf16 updates to it)."""
        projected = self.block_fixed_point_projection_fc1(torch.cat((z, injection), dim=-1))
        projected = self.block_fixed_point_projection_fc2(F.gelu(projected, approximate="tanh"))
        return self.block_fixed_point(projected.to(z.dtype), c)

    def solve(self, h, c, policy=IterationPolicy()):
        """Iterate f from the pre-blocks' output h (or from the reused solution) as `policy` (IterationPolicy) says;
        returns z_N. Residuals are tracked when the policy stops on them (tol, stop) or the model was built to."""
        no_grad_iters, with_grad_iters = self.iteration_counts(policy.num_iterations)
        tol, stop = policy.tol, policy.stop
        cache = self._cache_for(policy.reuse)
        injection = self.block_pre_projection(h)  # input injection: computed once per call, inside the graph
        start = cache.start(h) if cache is not None else None
        # z_0 is detached, as in the release: parameters get gradient through the with-grad iterations (and the
        # injection) only, never through the starting point.
        z = (h if start is None else start).detach()
        if policy.anderson and not torch.is_grad_enabled():
            z, self.last_stats = policy.fp_solver.run(self.fixed_point_function, z, injection, c,
                                                      no_grad_iters + with_grad_iters, tol)
            if cache is not None:
                cache.solution = z.detach()
            return z
        stats = FixedPointStats(sjfb=(no_grad_iters, with_grad_iters))
        track = self.fixed_point_track_residuals or policy.tracks_residuals
        # Every iteration's residual where something stops on them, or reads them in eval mode (policy.history); a
        # training step and the samplers read only the last one, computed once.
        every = track and (policy.tracks_residuals or (policy.history and not self.training))
        stopped, previous = False, None

        def record(z, z_next):
            with torch.no_grad():  # a cheap diagnostic, kept off the autograd graph and not synced here
                # two passes over the state: each example's norms; the batch's follow from them
                step_size = (z_next - z).float().flatten(1).norm(dim=1)
                size = z.float().flatten(1).norm(dim=1)
                stats.residuals.append(step_size.norm() / size.norm().clamp_min(1e-12))
                stats.example_residuals = step_size / size.clamp_min(1e-12)

        def step(z, with_grad):
            nonlocal stopped, previous
            if with_grad and self.fixed_point_checkpoint_iterations and torch.is_grad_enabled():
                z_next = _checkpointed(self.fixed_point_function, z, injection, c)
            else:
                z_next = self.fixed_point_function(z, injection, c)
            stats.iterations += 1
            if every:
                record(z, z_next)
            else:
                previous = z
            if stop is not None:
                stopped = bool(stop(stats))
            return z_next

        def converged():
            return stopped or (tol is not None and bool(stats.residuals) and bool(stats.residuals[-1] < tol))

        # No-grad phase of S-JFB. torch.no_grad() records nothing for autograd, so none of these iterations is
        # stored or back-propagated. DDP still works: its reducer only waits for gradients of parameters that the
        # autograd graph reaches, and with m >= 1 with-grad iterations every parameter is reached there. (Only
        # when m = 0 is allowed must DDP use find_unused_parameters=True; train.py sets that.) The injection is
        # detached implicitly, which is the S-JFB gradient: d/dθ flows through the last m iterations only.
        with torch.no_grad():
            for _ in range(no_grad_iters):
                z = step(z, with_grad=False)
                if converged():
                    break
        if not converged():
            for _ in range(with_grad_iters):
                z = step(z, with_grad=True)
                if converged():
                    break
        if track and not every and previous is not None:
            record(previous, z)
        self.last_stats = stats
        if cache is not None:
            cache.solution = z.detach()
        return z

    def iteration_counts(self, num_iterations=None):
        """(n no-grad, m with-grad) iterations for a call given `num_iterations` (see the class docstring)."""
        if num_iterations is None:
            if not self.training:
                return 0, self.default_num_iterations
            return _randint(*self.fixed_point_no_grad_iters), _randint(*self.fixed_point_with_grad_iters)
        if isinstance(num_iterations, (tuple, list)):
            return tuple(int(v) for v in num_iterations)
        return 0, int(num_iterations)

    def _cache_for(self, reuse):
        """reuse: a SolutionCache, False (no reuse) or None (the model's own cache if built with reuse)."""
        if reuse is None:
            return self.solution_cache if self.fixed_point_reuse_solution else None
        return reuse or None

    def _check_input(self, x, t, y, policy=None, reuse=None, **solver):
        super()._check_input(x, t, y)
        cache = self._cache_for(policy.reuse if policy is not None else reuse)
        if cache is not None and not getattr(cache, "per_example", False) and t.numel() > 1:  # on the device: no sync
            torch._assert_async((t == t[0]).all(), "solution reuse needs one shared timestep per batch, got mixed "
                                "timesteps: sample with a shared t or turn reuse off")

    def reset(self):
        """Forget the model's own stored solution (call between batches when built with reuse)."""
        self.solution_cache.reset()

    def block_evaluations(self, num_iterations=None):
        k = self.default_num_iterations if num_iterations is None else num_iterations
        return len(self.blocks_pre) + k + len(self.blocks_post)

    def iteration_flops(self):
        """FLOPs of one fixed-point iteration per sample: a block plus the projection MLP's 6·D² per token
        (fc1 2D->2D, fc2 2D->D), about 1.48 blocks at XL/2 with 256 tokens. Not one block: report both."""
        hidden, tokens = self.pos_embed.shape[-1], self.pos_embed.shape[1]
        return self.block_flops() + 2 * tokens * 6 * hidden ** 2

    def forward_flops(self, num_iterations=None):
        k = self.default_num_iterations if num_iterations is None else num_iterations
        hidden, tokens = self.pos_embed.shape[-1], self.pos_embed.shape[1]
        injection = 2 * tokens * hidden ** 2
        pre_post = len(self.blocks_pre) + len(self.blocks_post)
        return self._embed_and_final_flops() + pre_post * self.block_flops() + injection + k * self.iteration_flops()

    def training_flops(self, sjfb=None):
        n, m = sjfb
        return 3 * self.forward_flops(0) + (n + 3 * m) * self.iteration_flops()


def _randint(low, high):
    return int(torch.randint(low, high + 1, ()).item())


def _as_hw(size):
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or (height, width), got {size}")
    return size


def _validate_config(cfg, input_hw):
    height, width = input_hw
    p = cfg["patch_size"]
    if p < 1 or height % p or width % p:
        raise ValueError(f"input size {height}x{width} is not divisible by patch size {p}: "
                         f"pad or resize the input, or pick a patch size that divides it")
    if cfg["hidden_size"] % cfg["num_heads"]:
        raise ValueError(f"hidden_size {cfg['hidden_size']} is not divisible by num_heads {cfg['num_heads']}")
    if cfg["hidden_size"] % 4:
        raise ValueError(f"hidden_size {cfg['hidden_size']} must be divisible by 4 (2-D sin-cos position table)")
    if cfg["num_classes"] < 1:
        raise ValueError("num_classes must be >= 1 (use 1 class and class_dropout_prob=0 for unconditional models)")
    if not cfg["fixed_point"]:
        return
    for name in ("no_grad", "with_grad"):
        lo, hi = cfg[f"fixed_point_{name}_min_iters"], cfg[f"fixed_point_{name}_max_iters"]
        if lo < 0 or hi < lo:
            raise ValueError(f"fixed_point_{name} iteration range [{lo}, {hi}] is invalid: need 0 <= min <= max")
    if cfg["fixed_point_pre_depth"] < 0 or cfg["fixed_point_post_depth"] < 0:
        raise ValueError("fixed_point_pre_depth and fixed_point_post_depth must be >= 0")


#################################################################################
#                   Sine/Cosine Positional Embedding Functions                  #
#################################################################################

def get_1d_sincos_pos_embed(embed_dim, positions):
    """(M,) positions -> (M, embed_dim): sines then cosines of positions · 10000^(-2i/embed_dim), in float64."""
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2))
    angles = positions.reshape(-1, 1).double() * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(H·W, embed_dim) table, row-major over the patch grid, as in MAE/DiT: the first half of the channels
    encodes the column (x) coordinate, the second half the row (y) coordinate."""
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    rows, cols = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
    emb = torch.cat([get_1d_sincos_pos_embed(embed_dim // 2, cols), get_1d_sincos_pos_embed(embed_dim // 2, rows)],
                    dim=1)
    return emb.float()


#################################################################################
#                                   DiT Configs                                 #
#################################################################################

class _Registry(dict):
    def __missing__(self, name):
        raise KeyError(f"unknown model {name!r}; choose one of: {', '.join(self)}")


_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def _make_constructor(depth, hidden_size, num_heads, patch_size):
    def constructor(**kwargs):
        # Keywords override the registry's size, so small variants of a named model stay one call.
        return DiT(**{"depth": depth, "hidden_size": hidden_size, "patch_size": patch_size, "num_heads": num_heads,
                      **kwargs})
    return constructor


DiT_models = _Registry()
for _size, (_depth, _hidden, _heads) in _SIZES.items():
    for _patch in (2, 4, 8):
        _name = f"DiT-{_size}/{_patch}"
        DiT_models[_name] = _make_constructor(_depth, _hidden, _heads, _patch)
        DiT_models[_name].__name__ = f"DiT_{_size}_{_patch}"
        globals()[f"DiT_{_size}_{_patch}"] = DiT_models[_name]  # DiT_XL_2(...) etc., as in DiT's models.py


def create_model(name, **kwargs):
    """`DiT_models[name](**kwargs)` with a readable error for unknown names."""
    if name not in DiT_models:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(DiT_models)}")
    return DiT_models[name](**kwargs)


def _fits(state_dict):
    """What the weights fit, as a remedy: their width and patch size, and the registry names with both."""
    embed = state_dict.get("x_embedder.proj.weight")
    if embed is None:
        return "build the model with the checkpoint's config"
    hidden, patch = embed.shape[0], embed.shape[-1]
    names = [n for n, make in DiT_models.items() if n.endswith(f"/{patch}") and _registry_width(n) == hidden]
    return (f"the weights have hidden size {hidden} and patch size {patch}: build the model with "
            + (f"--model {names[0]}" if names else f"--hidden-size {hidden} --patch-size {patch}")
            + " (and the checkpoint's depth and heads)")


def _registry_width(name):
    with torch.device("meta"):
        return DiT_models[name]().config["hidden_size"]


def load_state_dict_checked(model, state_dict):
    """Strict load that names the first problem: a missing or unexpected key, or a key whose shape differs."""
    own = model.state_dict()
    for key, value in state_dict.items():
        if key not in own:
            raise ValueError(f"checkpoint has key {key!r} that this model lacks (checkpoint from a different "
                             f"architecture? DiT vs FPDM, or other pre/post depth)")
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch at {key!r}: checkpoint {tuple(value.shape)} vs model "
                             f"{tuple(own[key].shape)}; {_fits(state_dict)}")
    missing = [k for k in own if k not in state_dict]
    if missing:
        raise ValueError(f"checkpoint lacks key {missing[0]!r} ({len(missing)} missing in all): "
                         f"build the model with the checkpoint's config")
    model.load_state_dict(state_dict, strict=True)
    return model
