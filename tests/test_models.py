"""models.py: key names and parameter counts of the paper's models, an independent functional reference for the
forward pass, S-JFB gradient properties, solution reuse, residuals, CFG, and errors for bad input."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

from models import FPDM, DiT, DiT_models, SolutionCache, create_model, get_2d_sincos_pos_embed, load_state_dict_checked

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=5, num_heads=4, num_classes=10)


def tiny(**kwargs):
    torch.manual_seed(0)
    return DiT(**{**TINY, **kwargs})


def randomize(model, scale=0.2, seed=1):
    """adaLN-Zero makes a fresh model output zeros; give every parameter random values so outputs mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def make_contractive(model, scale=0.3):
    """Shrink the projection MLP so f(z) = block(fc2(gelu(fc1([z, u])))) is a contraction in z."""
    with torch.no_grad():
        model.block_fixed_point_projection_fc1.weight.mul_(scale)
        model.block_fixed_point_projection_fc2.weight.mul_(scale)
    return model


def inputs(batch=3, channels=4, size=8, seed=2, same_t=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, size, size, generator=g)
    t = torch.full((batch,), 417) if same_t else torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    return x, t, y


# ----------------------------------------------------------------------------------------------------------------
# Independent functional reference, written from the spec's equations over raw state-dict tensors.
# ----------------------------------------------------------------------------------------------------------------

def ref_linear(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def ref_block(sd, name, x, c, heads):
    mod = ref_linear(sd, f"{name}.adaLN_modulation.1", F.silu(c))
    shift1, scale1, gate1, shift2, scale2, gate2 = [m[:, None] for m in mod.chunk(6, dim=1)]
    norm = lambda v: F.layer_norm(v, v.shape[-1:], eps=1e-6)
    b, n, d = x.shape
    h = norm(x) * (1 + scale1) + shift1
    q, k, v = ref_linear(sd, f"{name}.attn.qkv", h).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
    x = x + gate1 * ref_linear(sd, f"{name}.attn.proj", att.transpose(1, 2).reshape(b, n, d))
    h = norm(x) * (1 + scale2) + shift2
    mlp = ref_linear(sd, f"{name}.mlp.fc2", F.gelu(ref_linear(sd, f"{name}.mlp.fc1", h), approximate="tanh"))
    return x + gate2 * mlp


def ref_forward(sd, x, t, y, *, patch, heads, out_channels, fixed_point=False, pre=0, post=0, iters=0,
                pre_post_t=False):
    b, _, height, width = x.shape
    tok = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tok = tok.flatten(2).transpose(1, 2) + sd["pos_embed"]
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
    args = t[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    t_emb = ref_linear(sd, "t_embedder.mlp.2", F.silu(ref_linear(sd, "t_embedder.mlp.0", t_freq)))
    y_emb = sd["y_embedder.embedding_table.weight"][y]
    c = t_emb + y_emb
    if not fixed_point:
        i = 0
        while f"blocks.{i}.attn.qkv.weight" in sd:
            tok = ref_block(sd, f"blocks.{i}", tok, c, heads)
            i += 1
        c_out = c
    else:
        c_out = c if pre_post_t else y_emb
        for i in range(pre):
            tok = ref_block(sd, f"blocks_pre.{i}", tok, c_out, heads)
        u = ref_linear(sd, "block_pre_projection", tok)
        z = tok
        for _ in range(iters):
            z = ref_linear(sd, "block_fixed_point_projection_fc1", torch.cat([z, u], dim=-1))
            z = ref_linear(sd, "block_fixed_point_projection_fc2", F.gelu(z, approximate="tanh"))
            z = ref_block(sd, "block_fixed_point", z, c, heads)
        tok = z
        for i in range(post):
            tok = ref_block(sd, f"blocks_post.{i}", tok, c_out, heads)
    shift, scale = ref_linear(sd, "final_layer.adaLN_modulation.1", F.silu(c_out)).chunk(2, dim=1)
    tok = F.layer_norm(tok, tok.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
    tok = ref_linear(sd, "final_layer.linear", tok)
    gh, gw = height // patch, width // patch
    out = tok.reshape(b, gh, gw, patch, patch, out_channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(b, out_channels, height, width)


def expected_keys(fixed_point, depth=28, pre=1, post=1):
    block_keys = [f"{m}.{p}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")
                  for p in ("weight", "bias")]
    keys = {"x_embedder.proj.weight", "x_embedder.proj.bias", "pos_embed", "t_embedder.mlp.0.weight",
            "t_embedder.mlp.0.bias", "t_embedder.mlp.2.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight", "final_layer.linear.weight", "final_layer.linear.bias",
            "final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias"}
    if not fixed_point:
        return keys | {f"blocks.{i}.{k}" for i in range(depth) for k in block_keys}
    keys |= {f"blocks_pre.{i}.{k}" for i in range(pre) for k in block_keys}
    keys |= {f"blocks_post.{i}.{k}" for i in range(post) for k in block_keys}
    keys |= {f"block_fixed_point.{k}" for k in block_keys}
    for name in ("block_pre_projection", "block_fixed_point_projection_fc1", "block_fixed_point_projection_fc2"):
        keys |= {f"{name}.weight", f"{name}.bias"}
    return keys


# ----------------------------------------------------------------------------------------------------------------
# Sizes and key names (meta device: no 2.7 GB allocations)
# ----------------------------------------------------------------------------------------------------------------

def test_paper_parameter_counts_and_keys():
    with torch.device("meta"):
        dit = DiT_models["DiT-XL/2"]()
        fpdm = DiT_models["DiT-XL/2"](fixed_point=True)
        fpdm2 = DiT_models["DiT-XL/2"](fixed_point=True, fixed_point_pre_depth=2, fixed_point_post_depth=2)
        fpdm4 = DiT_models["DiT-XL/2"](fixed_point=True, fixed_point_pre_depth=4, fixed_point_post_depth=4)
    assert dit.num_parameters(include_pos_embed=True) == 675_129_632
    assert dit.num_parameters() == 674_834_720
    assert fpdm.num_parameters() == 86_500_256
    assert round(100 * (1 - fpdm.num_parameters() / dit.num_parameters()), 1) == 87.2
    assert fpdm2.num_parameters() == 134_310_560
    assert fpdm4.num_parameters() == 229_931_168
    assert set(dit.state_dict()) == expected_keys(False)
    assert set(fpdm.state_dict()) == expected_keys(True)
    assert set(fpdm4.state_dict()) == expected_keys(True, pre=4, post=4)
    sd = dit.state_dict()
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 1152)
    assert fpdm.state_dict()["block_fixed_point_projection_fc1.weight"].shape == (2304, 2304)
    assert fpdm.state_dict()["block_fixed_point_projection_fc2.weight"].shape == (1152, 2304)
    # Default sampling iterations: pre + N + post block evaluations equal one DiT-XL/2 call.
    assert fpdm.default_num_iterations == 26 and fpdm.block_evaluations() == 28 == dit.block_evaluations()
    # An FPDM iteration costs ~1.48 DiT blocks at XL/2 with 256 tokens (spec §2): check the FLOP estimate.
    assert fpdm.iteration_flops() / fpdm.block_flops() == pytest.approx(1.48, abs=0.01)
    assert fpdm.forward_flops(27) - fpdm.forward_flops(26) == fpdm.iteration_flops()
    assert dit.forward_flops() - dit.block_flops() * 28 == fpdm.forward_flops(0) - 2 * fpdm.block_flops() - 2 * 256 * 1152 ** 2


def counted_flops(model, **kwargs):
    """FLOPs per sample by torch's counter; attention on its math path (matmuls), which every torch version counts
    (the fused CPU kernel is not counted by older versions)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    x, t, y = inputs(2, channels=model.in_channels, size=round(model.pos_embed.shape[1] ** 0.5) * model.patch_size)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, t, y, **kwargs)
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("patch,size", [(2, 8), (4, 16)])
def test_flop_estimates_equal_torch_flop_counter(patch, size):
    """forward_flops / iteration_flops against torch.utils.flop_counter on real forward calls (matmuls, convolution,
    attention), for DiT and for FPDM at several iteration counts."""
    dit = tiny(input_size=size, patch_size=patch).eval()
    assert counted_flops(dit) == dit.forward_flops()
    fpdm = tiny(input_size=size, patch_size=patch, fixed_point=True, fixed_point_pre_depth=2).eval()
    for k in (0, 1, 3):
        assert counted_flops(fpdm, num_iterations=k) == fpdm.forward_flops(k)
    assert counted_flops(fpdm, num_iterations=3) - counted_flops(fpdm, num_iterations=2) == fpdm.iteration_flops()


@pytest.mark.parametrize("name", list(DiT_models))
def test_every_registry_entry_forward_shape(name):
    with torch.device("meta"):
        model = DiT_models[name](input_size=16, num_classes=10)
        x = torch.empty(2, 4, 16, 16)
        out = model(x, torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    assert out.shape == (2, 8, 16, 16)
    depth = {"S": 12, "B": 12, "L": 24, "XL": 28}[name.split("-")[1].split("/")[0]]
    assert model.block_evaluations() == depth


@pytest.mark.parametrize("patch", [2, 4, 8])
def test_fpdm_with_random_weights_matches_reference_for_every_patch_size(patch):
    """A fresh model outputs zeros (adaLN-Zero), which a model ignoring its input would too: random weights, compared
    with the functional reference at patch 2, 4 and 8 (16 px: 64, 16 and 4 tokens)."""
    for fixed_point in (False, True):
        model = randomize(tiny(input_size=16, patch_size=patch, fixed_point=fixed_point), scale=0.1).eval()
        x, t, y = inputs(2, size=16)
        ref = ref_forward(model.state_dict(), x, t, y, patch=patch, heads=4, out_channels=8, fixed_point=fixed_point,
                          pre=1, post=1, iters=2)
        out = model(x, t, y, **({"num_iterations": 2} if fixed_point else {}))
        assert out.shape == (2, 8, 16, 16) and out.abs().mean() > 0.1
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_fresh_registry_model_outputs_zeros():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/8"](input_size=16, num_classes=10, fixed_point=True).eval()
    x, t, y = inputs(2, size=16)
    with torch.no_grad():
        out = model(x, t, y, num_iterations=2)
    assert out.shape == (2, 8, 16, 16) and out.abs().max() == 0  # adaLN-Zero: the output layer starts at zero


@pytest.mark.parametrize("channels,size,classes,dropout,learn_sigma", [
    (1, 8, 10, 0.1, False),       # MNIST-like pixels
    (3, (8, 12), 10, 0.1, True),  # RGB, non-square
    (4, 8, 1, 0.0, True),         # unconditional latents: one class, no null row
])
def test_channels_sizes_and_unconditional(channels, size, classes, dropout, learn_sigma):
    for fixed_point in (False, True):
        model = randomize(tiny(in_channels=channels, input_size=size, num_classes=classes,
                               class_dropout_prob=dropout, learn_sigma=learn_sigma, fixed_point=fixed_point)).eval()
        h, w = (size, size) if isinstance(size, int) else size
        x = torch.randn(2, channels, h, w)
        y = torch.zeros(2, dtype=torch.long)
        t = torch.tensor([3, 900])
        out = model(x, t, y)
        out_channels = channels * (2 if learn_sigma else 1)
        assert out.shape == (2, out_channels, h, w)
        ref = ref_forward(model.state_dict(), x, t, y, patch=2, heads=4, out_channels=out_channels,
                          fixed_point=fixed_point, pre=1, post=1, iters=3)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        assert model.y_embedder.embedding_table.weight.shape[0] == classes + (dropout > 0)
        if classes == 1:
            with pytest.raises(ValueError, match="class_dropout_prob"):
                model.forward_with_cfg(torch.cat([x, x]), torch.tensor([1] * 4), torch.zeros(4, dtype=torch.long), 2.0)


# ----------------------------------------------------------------------------------------------------------------
# Numerics against the independent reference
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [8, (8, 12)])
def test_dit_matches_reference(size):
    model = randomize(tiny(input_size=size)).eval()
    h, w = (size, size) if isinstance(size, int) else size
    x = torch.randn(3, 4, h, w)
    t, y = torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10])  # 10 = the null class
    sd = model.state_dict()
    ref = ref_forward(sd, x, t, y, patch=2, heads=4, out_channels=8)
    torch.testing.assert_close(model(x, t, y), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixed_point", [False, True])
def test_every_block_gets_contiguous_tokens_and_the_same_numbers(fixed_point, monkeypatch):
    """The residual stream is contiguous from the embedding on (timm's PatchEmbed hands back a transposed view, which
    every add then kept: each LayerNorm copied it, each residual add read it strided, and a regionally compiled
    block saw other strides in FPDM's layer than in DiT's). The outputs and gradients equal the transposed layout's
    bit for bit."""
    model = randomize(tiny(fixed_point=fixed_point), scale=0.1).train()
    x, t, y = inputs()
    seen = []
    for block in model.modules():
        if type(block).__name__ == "DiTBlock":
            block.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))

    def run():
        model.zero_grad()
        torch.manual_seed(0)  # the same label dropout and S-JFB counts
        out = model(x, t, y, **({"num_iterations": (2, 2)} if fixed_point else {}))
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]
    out, grads = run()
    # DiT's blocks; FPDM's pre and post blocks and 4 iterations of its layer's block
    blocks = len(model.blocks_pre) + 4 + len(model.blocks_post) if fixed_point else len(model.blocks)
    assert len(seen) == blocks >= 5 and all(seen)
    monkeypatch.setattr(type(model), "embed", lambda self, x: self.x_embedder(x) + self.pos_embed)
    seen.clear()
    old_out, old_grads = run()
    assert not all(seen)  # the transposed layout, as before
    assert torch.equal(out, old_out) and all(torch.equal(a, b) for a, b in zip(grads, old_grads))


@pytest.mark.parametrize("pre,post,pre_post_t", [(1, 1, False), (2, 1, True), (0, 0, False)])
def test_fpdm_matches_reference(pre, post, pre_post_t):
    model = randomize(tiny(fixed_point=True, fixed_point_pre_depth=pre, fixed_point_post_depth=post,
                           fixed_point_pre_post_timestep_conditioning=pre_post_t), scale=0.1).eval()
    x, t, y = inputs()
    sd = model.state_dict()
    for iters in (0, 1, 4):
        ref = ref_forward(sd, x, t, y, patch=2, heads=4, out_channels=8, fixed_point=True, pre=pre, post=post,
                          iters=iters, pre_post_t=pre_post_t)
        torch.testing.assert_close(model(x, t, y, num_iterations=iters), ref, atol=1e-5, rtol=1e-5)
        assert model.last_stats.iterations == iters and len(model.last_stats.residuals) == iters
    # Eval default: depth - pre - post iterations.
    ref = ref_forward(sd, x, t, y, patch=2, heads=4, out_channels=8, fixed_point=True, pre=pre, post=post,
                      iters=5 - pre - post, pre_post_t=pre_post_t)
    torch.testing.assert_close(model(x, t, y), ref, atol=1e-5, rtol=1e-5)


def test_checkpoint_style_state_dicts_load_strict_and_config_round_trip():
    # A state dict with exactly the spec's key names (as DiT / the FPDM release write them) loads strictly, and the
    # model rebuilt from its JSON config gives identical outputs.
    for fixed_point in (False, True):
        source = randomize(tiny(fixed_point=fixed_point)).eval()
        config = json.loads(json.dumps(source.config))
        target = DiT.from_config(config).eval()
        sd = {k: v.clone() for k, v in source.state_dict().items()}
        assert set(sd) == expected_keys(fixed_point, depth=5)
        load_state_dict_checked(target, sd)
        x, t, y = inputs()
        torch.testing.assert_close(target(x, t, y), source(x, t, y), atol=0, rtol=0)


def test_initialisation_is_adaln_zero_and_sincos():
    model = tiny(fixed_point=True)
    for block in model.transformer_blocks():
        assert block.adaLN_modulation[-1].weight.abs().max() == 0
    assert model.final_layer.linear.weight.abs().max() == 0
    assert model.block_fixed_point_projection_fc1.bias.abs().max() == 0
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    # Position (row r, col c) of a 4x4 grid at index 4r + c: first half encodes c, second half r.
    table = get_2d_sincos_pos_embed(32, 4)
    r, c = 2, 3
    omega = 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
    expected = torch.cat([torch.sin(c * omega), torch.cos(c * omega), torch.sin(r * omega), torch.cos(r * omega)])
    torch.testing.assert_close(table[4 * r + c].double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.pos_embed[0], get_2d_sincos_pos_embed(32, 4))


# ----------------------------------------------------------------------------------------------------------------
# S-JFB
# ----------------------------------------------------------------------------------------------------------------

def fp_grads(model):
    names = ("block_fixed_point.", "block_fixed_point_projection_fc")
    return {n: p.grad for n, p in model.named_parameters() if n.startswith(names)}


def test_zero_iterations_is_identity_layer_and_fixed_point_block_gets_no_gradient():
    model = randomize(tiny(fixed_point=True), scale=0.1).train()
    x, t, y = inputs()
    out = model(x, t, y, num_iterations=(3, 0))  # 3 no-grad iterations, none with grad
    out.square().mean().backward()
    assert all(g is None for g in fp_grads(model).values())
    assert model.blocks_pre[0].attn.qkv.weight.grad is None  # z_0 is detached and the injection is unused
    assert model.blocks_post[0].attn.qkv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(x, t, y, num_iterations=(3, 1)).square().mean().backward()
    assert all(g is not None and g.abs().sum() > 0 for g in fp_grads(model).values())
    assert model.blocks_pre[0].attn.qkv.weight.grad.abs().sum() > 0  # via the injection


def test_sjfb_gradient_comes_only_from_with_grad_iterations():
    # Property: n no-grad iterations then m with grad has the same output AND the same gradients as m with-grad
    # iterations started (via solution reuse) from the no-grad iterate z_n: the first n iterations contribute nothing.
    model = randomize(tiny(fixed_point=True, class_dropout_prob=0.0), scale=0.1).train()
    x, t, y = inputs(same_t=True)
    out_sjfb = model(x, t, y, num_iterations=(4, 2))
    out_sjfb.square().mean().backward()
    grads_sjfb = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    model.fixed_point_reuse_solution = True
    with torch.no_grad():
        model(x, t, y, num_iterations=4)  # stores z_4
    out_split = model(x, t, y, num_iterations=2)  # starts from z_4 (detached)
    out_split.square().mean().backward()
    torch.testing.assert_close(out_split, out_sjfb, atol=1e-6, rtol=1e-6)
    grads_split = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads_split.keys() == grads_sjfb.keys()
    for n in grads_sjfb:
        torch.testing.assert_close(grads_split[n], grads_sjfb[n], atol=1e-6, rtol=1e-5)


def test_no_graph_is_built_during_no_grad_phase():
    model = randomize(tiny(fixed_point=True), scale=0.1).train()
    x, t, y = inputs()

    def saved_tensor_count(iters):
        count = 0

        def pack(tensor):
            nonlocal count
            count += 1
            return tensor
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(x, t, y, num_iterations=iters)
        return count

    assert saved_tensor_count((0, 2)) == saved_tensor_count((10, 2)) > saved_tensor_count((0, 1))
    grad_modes = []
    hook = model.block_fixed_point.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    model(x, t, y, num_iterations=(10, 2))
    hook.remove()
    assert grad_modes == [False] * 10 + [True] * 2


def test_training_draws_sjfb_counts_from_torch_rng_within_ranges():
    model = tiny(fixed_point=True, fixed_point_no_grad_min_iters=1, fixed_point_no_grad_max_iters=3,
                 fixed_point_with_grad_min_iters=2, fixed_point_with_grad_max_iters=4).train()
    x, t, y = inputs()
    torch.manual_seed(5)
    draws = []
    for _ in range(30):
        model(x, t, y)
        draws.append(model.last_stats.sjfb)
        assert model.last_stats.iterations == sum(model.last_stats.sjfb)
    assert {n for n, _ in draws} == {1, 2, 3} and {m for _, m in draws} == {2, 3, 4}
    torch.manual_seed(5)
    replay = []
    for _ in range(30):
        model(x, t, y)
        replay.append(model.last_stats.sjfb)
    assert replay == draws


@pytest.mark.parametrize("fixed_point", [False, True])
def test_gradient_checkpointing_gives_same_gradients(fixed_point):
    extra = dict(fixed_point=True, fixed_point_checkpoint_iterations=True) if fixed_point else {}
    grads = []
    for use_ckpt in (False, True):
        model = randomize(tiny(use_gradient_checkpointing=use_ckpt, class_dropout_prob=0.0, **extra), scale=0.1)
        model.train()
        if not use_ckpt and fixed_point:
            model.fixed_point_checkpoint_iterations = False
        x, t, y = inputs()
        kwargs = {"num_iterations": (2, 3)} if fixed_point else {}
        model(x, t, y, **kwargs).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_ddp_single_process_gradients_equal_the_plain_model(tmp_path):
    import copy
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    plain = randomize(tiny(fixed_point=True, class_dropout_prob=0.0), 0.1).train()
    reference = copy.deepcopy(plain)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = DistributedDataParallel(plain)
        for seed in range(3):  # a second step would fail if the reducer had waited on unused parameters
            x, t, y = inputs(seed=seed)
            model.zero_grad()
            reference.zero_grad()
            model(x, t, y, num_iterations=(3, 1)).square().mean().backward()
            reference(x, t, y, num_iterations=(3, 1)).square().mean().backward()
            for (name, a), b in zip(plain.named_parameters(), reference.parameters()):
                if b.grad is None:
                    assert a.grad is None or not a.grad.any(), name
                else:
                    torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-6, msg=name)
        assert plain.block_fixed_point.attn.qkv.weight.grad.abs().sum() > 0
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Solution reuse and residuals
# ----------------------------------------------------------------------------------------------------------------

def test_reuse_continues_from_stored_solution_and_reset_clears_it():
    model = randomize(tiny(fixed_point=True, fixed_point_reuse_solution=True), scale=0.1).eval()
    x, t, y = inputs(same_t=True)
    with torch.no_grad():
        straight = model(x, t, y, num_iterations=5)
        model.reset()
        model(x, t, y, num_iterations=2)
        assert model.solution_cache.solution is not None
        resumed = model(x, t, y, num_iterations=3)  # 2 + 3 iterations from the same input = 5 straight
        torch.testing.assert_close(resumed, straight, atol=1e-6, rtol=1e-6)
        model.reset()
        assert model.solution_cache.solution is None
        fresh = model(x, t, y, num_iterations=3)
        model.fixed_point_reuse_solution = False
        torch.testing.assert_close(fresh, model(x, t, y, num_iterations=3), atol=0, rtol=0)


def test_sampler_owned_cache_equals_model_reuse_and_false_turns_reuse_off():
    """An explicit SolutionCache (what samplers pass) continues from its own solution like the model's built-in reuse;
    reuse=False overrides a model built with reuse; separate caches do not interfere."""
    model = randomize(tiny(fixed_point=True, fixed_point_reuse_solution=True), scale=0.1).eval()
    x, t, y = inputs(same_t=True)
    with torch.no_grad():
        straight = model(x, t, y, num_iterations=5, reuse=False)
        assert model.solution_cache.solution is None  # reuse=False neither reads nor writes the model's cache
        a, b = SolutionCache(), SolutionCache()
        model(x, t, y, num_iterations=2, reuse=a)
        model(x, t, y, num_iterations=1, reuse=b)
        torch.testing.assert_close(model(x, t, y, num_iterations=3, reuse=a), straight, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(model(x, t, y, num_iterations=4, reuse=b), straight, atol=1e-6, rtol=1e-6)
        assert model.solution_cache.solution is None
    with pytest.raises(RuntimeError, match="mixed timesteps"):
        model(x, torch.tensor([1, 2, 3]), y, reuse=SolutionCache())
    model(x, torch.tensor([1, 2, 3]), y, reuse=False)  # no reuse: mixed timesteps are fine


def test_fpdm_is_a_subclass_built_by_the_release_keyword():
    fpdm, dit = tiny(fixed_point=True), tiny()
    assert type(fpdm) is FPDM and isinstance(fpdm, DiT) and type(dit) is DiT
    assert type(DiT_models["DiT-S/8"](fixed_point=True, depth=3, hidden_size=64, num_heads=2)) is FPDM
    assert type(DiT.from_config(fpdm.config)) is FPDM and type(DiT.from_config(dit.config)) is DiT
    assert type(copy.deepcopy(fpdm)) is FPDM and fpdm.config["fixed_point"] is True
    with pytest.raises(ValueError, match="FPDM"):
        FPDM(fixed_point=False)
    with pytest.raises(ValueError, match="apply to FPDM models only"):
        dit(*inputs(), num_iterations=2)


def test_reuse_errors():
    model = tiny(fixed_point=True, fixed_point_reuse_solution=True).eval()
    x, t, y = inputs()
    with pytest.raises(RuntimeError, match="mixed timesteps"):
        model(x, torch.tensor([1, 2, 3]), y)
    model(x, torch.full((3,), 7), y, num_iterations=1)
    with pytest.raises(ValueError, match="reset"):
        model(x[:2], torch.full((2,), 7), y[:2], num_iterations=1)


def test_reuse_covers_cfg_doubled_batch():
    """Under guidance the stored solution covers the doubled batch: 2 + 3 reused iterations equal 5 straight."""
    model = randomize(tiny(fixed_point=True, fixed_point_reuse_solution=True), scale=0.1).eval()
    x, _, y = inputs(batch=2)
    t, yy, xx = torch.full((4,), 100), torch.cat([y, torch.full((2,), 10)]), torch.cat([x, x])
    with torch.no_grad():
        straight = model.forward_with_cfg(xx, t, yy, 4.0, num_iterations=5)
        model.reset()
        model.forward_with_cfg(xx, t, yy, 4.0, num_iterations=2)
        assert model.solution_cache.solution.shape[0] == 4
        resumed = model.forward_with_cfg(xx, t, yy, 4.0, num_iterations=3)
    torch.testing.assert_close(resumed, straight, atol=1e-6, rtol=1e-6)
    assert not torch.equal(resumed, model.forward_with_cfg(xx, t, yy, 4.0, num_iterations=3))  # reuse matters


def test_residuals_match_definition_and_decay_for_contraction():
    model = make_contractive(randomize(tiny(fixed_point=True), scale=0.1)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        model(x, t, y, num_iterations=12)
        res = model.last_stats.residual_values()
        assert len(res) == 12 and model.last_stats.residual.item() == res[-1]
        assert res[-1] < 1e-5 * res[0]
        above_noise = [r for r in res if r > 1e-5]
        assert len(above_noise) >= 3 and all(b < 0.5 * a for a, b in zip(above_noise, above_noise[1:]))
        # First residual by hand: ||f(z0) - z0|| / ||z0|| with z0 = pre-block output.
        tok = model.x_embedder(x) + model.pos_embed
        y_emb = model.y_embedder(y, False)
        h = model.blocks_pre[0](tok, y_emb)
        z1 = model.fixed_point_function(h, model.block_pre_projection(h), model.t_embedder(t) + y_emb)
        assert res[0] == pytest.approx(((z1 - h).norm() / h.norm()).item(), rel=1e-5)
    model.fixed_point_track_residuals = False
    model(x, t, y, num_iterations=3)
    assert model.last_stats.residuals == [] and model.last_stats.residual is None


def test_a_training_step_computes_only_the_last_residual():
    """Training reads only the last iteration's residual (the logged one, the residual by timestep): computed once
    there, equal to what evaluation reports for the same iteration; a tolerance still sees every iteration's."""
    model = make_contractive(randomize(tiny(fixed_point=True), scale=0.1))
    model.y_embedder.dropout_prob = 0.0  # training mode then computes what evaluation computes
    x, t, y = inputs()
    model.train()
    model(x, t, y, num_iterations=(3, 2))
    trained = model.last_stats
    assert trained.iterations == 5 and len(trained.residuals) == 1
    model.eval()
    with torch.no_grad():
        model(x, t, y, num_iterations=5)
    assert len(model.last_stats.residuals) == 5
    torch.testing.assert_close(trained.residuals[0], model.last_stats.residuals[-1])
    torch.testing.assert_close(trained.example_residuals, model.last_stats.example_residuals)
    model.train()
    model(x, t, y, num_iterations=5, tol=1e-12)
    assert len(model.last_stats.residuals) == 5


def test_without_history_no_residual_op_runs_inside_the_iteration_loop():
    """IterationPolicy(history=False) (the samplers' default): an eval call's iterations run the ops of a model that
    tracks no residual at all; the one residual comes after the loop."""
    from torch.profiler import ProfilerActivity, profile

    model = randomize(tiny(fixed_point=True), scale=0.1).eval()
    x, t, y = inputs()

    def ops(iterations, **options):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x, t, y, num_iterations=iterations, **options)
        return sum(1 for e in prof.events() if e.name.startswith("aten::") and
                   (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))

    def per_iteration(**options):
        return (ops(8, **options) - ops(4, **options)) / 4
    model.fixed_point_track_residuals = False
    untracked = per_iteration()
    model.fixed_point_track_residuals = True
    assert per_iteration(history=False) == untracked < per_iteration(history=True) - 5
    model(x, t, y, num_iterations=3, history=False)
    assert len(model.last_stats.residuals) == 1


def test_tolerance_stops_early_and_respects_cap():
    model = make_contractive(randomize(tiny(fixed_point=True), scale=0.1)).eval()
    x, t, y = inputs()
    with torch.no_grad():
        model(x, t, y, num_iterations=50, tol=1e-3)
        res = model.last_stats.residual_values()
        assert model.last_stats.iterations == len(res) < 50 and res[-1] < 1e-3
        assert all(r >= 1e-3 for r in res[:-1])
        model(x, t, y, num_iterations=2, tol=1e-12)
        assert model.last_stats.iterations == 2


# ----------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fixed_point", [False, True])
def test_cfg_scale_one_equals_conditional(fixed_point):
    model = randomize(tiny(fixed_point=fixed_point), scale=0.1).eval()
    x, _, y = inputs(batch=2)
    t = torch.tensor([250, 250])
    with torch.no_grad():
        cond = model(x, t, y)
        guided = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full((2,), 10)]), 1.0)
        torch.testing.assert_close(guided[:2], cond, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(guided[2:, :4], guided[:2, :4])
        uncond = model(x, t, torch.full((2,), 10))
        g4 = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full((2,), 10)]), 4.0)
        torch.testing.assert_close(g4[:2, :4], uncond[:, :4] + 4 * (cond[:, :4] - uncond[:, :4]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g4[:2, 4:], cond[:, 4:], atol=1e-5, rtol=1e-5)  # variance channels unguided
        dit3 = model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full((2,), 10)]), 4.0,
                                      guidance_channels=3)
        torch.testing.assert_close(dit3[:, :3], g4[:, :3])
        torch.testing.assert_close(dit3[:2, 3], cond[:, 3], atol=1e-5, rtol=1e-5)  # DiT's 4th channel: unguided


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

def test_bad_input_errors():
    with pytest.raises(ValueError, match="unknown model 'DiT-Q/2'"):
        create_model("DiT-Q/2")
    with pytest.raises(KeyError, match="choose one of"):
        DiT_models["DiT-XXL/2"]
    with pytest.raises(ValueError, match="not divisible by patch size 4"):
        tiny(input_size=10, patch_size=4)
    with pytest.raises(ValueError, match=r"no_grad iteration range \[3, 1\]"):
        tiny(fixed_point=True, fixed_point_no_grad_min_iters=3, fixed_point_no_grad_max_iters=1)
    with pytest.raises(ValueError, match="unknown model config keys"):
        DiT.from_config({**tiny().config, "blocks_pre_depth": 2})
    model = tiny()
    with pytest.raises(ValueError, match=r"takes \(N, 4, 8, 8\)"):
        model(torch.randn(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="FPDM models only"):
        model(*inputs(), num_iterations=3)
    fpdm = tiny(fixed_point=True)
    with pytest.raises(ValueError, match=">= 0"):
        fpdm(*inputs(), num_iterations=(-1, 2))
    # Checkpoint/config mismatch: name the key and both shapes; FPDM weights into a DiT name a key.
    wide = tiny(hidden_size=64).state_dict()
    with pytest.raises(ValueError, match=r"shape mismatch at 'pos_embed': checkpoint \(1, 16, 64\) vs model \(1, 16, 32\)"):
        load_state_dict_checked(tiny(), wide)
    with pytest.raises(ValueError, match="blocks_pre.0"):
        load_state_dict_checked(tiny(), fpdm.state_dict())
    partial = dict(tiny().state_dict())
    partial.pop("final_layer.linear.bias")
    with pytest.raises(ValueError, match="lacks key 'final_layer.linear.bias'"):
        load_state_dict_checked(tiny(), partial)


def test_label_dropout_rate_and_null_class():
    """Training drops each label with probability class_dropout_prob to the null class (the last row); each example of
    a training forward equals the eval forward with either its own label or the null label; eval never drops."""
    from models import LabelEmbedder
    torch.manual_seed(0)
    embedder = LabelEmbedder(10, 8, 0.1)
    labels = torch.randint(0, 10, (40_000,))
    dropped = embedder.token_drop(labels)
    is_null = dropped == 10
    assert is_null.float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert torch.equal(dropped[~is_null], labels[~is_null])
    assert torch.equal(embedder(labels, train=False), embedder.embedding_table.weight[labels])

    model = randomize(tiny(class_dropout_prob=0.5), scale=0.1)
    x, t, y = inputs(batch=16)
    torch.manual_seed(1)
    trained = model.train()(x, t, y)
    model.eval()
    conditional, null = model(x, t, y), model(x, t, torch.full_like(y, 10))
    took_null = [(trained[i] - null[i]).abs().max() < 1e-6 for i in range(16)]
    took_label = [(trained[i] - conditional[i]).abs().max() < 1e-6 for i in range(16)]
    assert all(a != b for a, b in zip(took_null, took_label)) and 3 <= sum(took_null) <= 13


# ----------------------------------------------------------------------------------------------------------------
# Anderson inside the fixed-point layer (sampling)
# ----------------------------------------------------------------------------------------------------------------

def test_anderson_in_the_layer_reaches_the_fixed_point_in_fewer_evaluations():
    """On a contractive layer with a slow rate, Anderson (per image) reaches a relative residual of 1e-6 in fewer
    evaluations of f than plain iteration, to the same fixed point; with a fixed count it spends exactly that count."""
    from fpdm.sampling import FixedPointSolver
    model = make_contractive(randomize(tiny(fixed_point=True), scale=0.1), scale=1.6).eval()  # a slow contraction
    x, t, y = inputs(same_t=True)
    anderson = FixedPointSolver("anderson", history=5)
    with torch.no_grad():
        plain = model(x, t, y, num_iterations=300, tol=1e-6)
        plain_count = model.last_stats.iterations  # measured: 201
        fast = model(x, t, y, num_iterations=300, tol=1e-6, fp_solver=anderson)
        fast_stats = model.last_stats  # measured: 125
        assert fast_stats.iterations < 0.8 * plain_count and max(fast_stats.image_iterations) == fast_stats.iterations
        torch.testing.assert_close(fast, plain, atol=5e-4, rtol=1e-3)
        model(x, t, y, num_iterations=7, fp_solver=anderson)  # a budget: exactly 7 evaluations, every image
        assert model.last_stats.iterations == 7 and model.last_stats.image_iterations == [7, 7, 7]
        assert model.block_evaluations(model.last_stats.iterations) == 9
    with pytest.raises(ValueError, match="unknown fixed-point solver"):
        FixedPointSolver("broyden")


def test_anderson_in_the_layer_works_with_reuse_guidance_and_budgets():
    from fpdm.sampling import FixedPointSolver, diffusion_for_sampling, iterations_from_block_budget, sample_images
    model = make_contractive(randomize(tiny(fixed_point=True), scale=0.1), scale=0.5).eval()
    config = {"noise_schedule": "linear", "learn_sigma": True, "predict_v": False, "zero_terminal_snr": False,
              "diffusion_steps": 1000}
    diffusion = diffusion_for_sampling(config, 5)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    iterations = iterations_from_block_budget(model, 30, 5, "more-noisy")
    runs = {}
    for solver in (None, FixedPointSolver("anderson")):
        out, fn = sample_images(model, diffusion, noise, torch.tensor([1, 2]), cfg_scale=2.0, reuse=True,
                                iterations_per_step=iterations, fp_solver=solver)
        assert fn.compute()["block_evals"] == 30 and torch.isfinite(out).all()
        runs[solver is None] = out
    assert not torch.equal(runs[True], runs[False])


def test_fixed_point_state_stays_float32_under_bf16_autocast():
    """Under bf16 autocast the layer's state (and so its residual) stays float32, and a contraction's residual falls
    below 1e-4. (Measured: the floor under bf16 is set by the bf16 arithmetic inside the block — 2.9e-5 here, 2.8e-3
    with weights 3x larger — and was about the same with the bf16 state: 2.4e-5 and 3.2e-3.)"""
    model = make_contractive(randomize(tiny(fixed_point=True), scale=0.03)).eval()
    x, t, y = inputs()
    dtypes = []
    handle = model.block_fixed_point.register_forward_hook(
        lambda module, args, out: dtypes.append((args[0].dtype, out.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, t, y, num_iterations=40, tol=1e-4)
    handle.remove()
    assert set(dtypes) == {(torch.float32, torch.float32)}
    residuals = model.last_stats.residual_values()
    assert residuals[-1] < 1e-4 and model.last_stats.iterations < 40


def test_regional_compile_reuses_graphs_for_any_sjfb_counts():
    """compile_regions compiles the transformer blocks, not the Python around them: 100 training steps with random
    S-JFB counts (n in 0..4, m in 1..4; more distinct pairs than dynamo's recompile limit of 8) compile a constant number of graphs (no recompile per count, no fallback), and the
    compiled loss and gradients equal eager ones."""
    import shutil
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile's CPU backend needs a C++ compiler (none found)")
    import torch._dynamo
    from torch._dynamo.utils import counters
    kwargs = dict(fixed_point=True, fixed_point_no_grad_max_iters=4, fixed_point_with_grad_max_iters=4)
    eager, compiled = tiny(**kwargs).train(), tiny(**kwargs).train().compile_regions()
    x, t, y = inputs()
    torch._dynamo.reset()
    counters.clear()
    draws = set()
    for step in range(100):
        losses = []
        for model in (eager, compiled):
            model.zero_grad()
            torch.manual_seed(step)  # the same S-JFB draws and label dropout for both
            loss = model(x, t, y).square().mean()
            loss.backward()
            losses.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        draws.add(compiled.last_stats.sjfb)
        assert compiled.last_stats.sjfb == eager.last_stats.sjfb
        torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-5, rtol=1e-4)
        for a, b in zip(losses[1][1], losses[0][1]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    assert len(draws) > 8  # more distinct (n, m) than dynamo's recompile limit: a whole-model compile fell back
    assert 1 <= counters["stats"]["unique_graphs"] <= 4 and not counters["recompiles"]


@pytest.mark.parametrize("fixed_point", [False, True])
def test_training_flops_equal_torchs_flop_counter_at_xl2(fixed_point):
    """train.py's TFLOP/s and MFU come from DiT.training_flops: at XL/2 (on the meta device: shapes only) it is the
    figure torch's FLOP counter gives for a training step, S-JFB's no-grad iterations counted forward only."""
    from torch.utils.flop_counter import FlopCounterMode
    fp = dict(fixed_point=True, fixed_point_pre_depth=1, fixed_point_post_depth=1) if fixed_point else {}
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32, num_classes=1000, **fp).train()
        x, t, y = torch.randn(2, 4, 32, 32), torch.tensor([1, 2]), torch.tensor([1, 2])
    with FlopCounterMode(display=False) as counter:
        model(x, t, y, **({"num_iterations": (5, 3)} if fixed_point else {})).sum().backward()
    estimate = 2 * model.training_flops((5, 3) if fixed_point else None)
    assert estimate == pytest.approx(counter.get_total_flops(), rel=1e-3)


def test_iteration_policy_is_checked_in_one_place():
    """FPDM.solve takes one IterationPolicy; its conflicts are refused when it is built, whoever builds it (the
    model's keywords, GuidedModel, two-axis sampling)."""
    from types import SimpleNamespace

    from models import IterationPolicy
    anderson = SimpleNamespace(method="anderson")
    for options, message in (({"num_iterations": -1}, "must be >= 0"), ({"num_iterations": (1, 2, 3)}, "two numbers"),
                             ({"tol": 0.0}, "tolerance must be > 0"),
                             ({"stop": bool, "fp_solver": anderson}, "budget allocation"),
                             ({"stop": bool, "tol": 1e-3}, "budget allocation")):
        with pytest.raises(ValueError, match=message):
            IterationPolicy(**options)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=4, num_classes=10,
                fixed_point=True).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 2])
    with torch.no_grad():
        by_keywords = model(x, t, y, num_iterations=3)
        torch.testing.assert_close(model(x, t, y, policy=IterationPolicy(num_iterations=3)), by_keywords, rtol=0,
                                   atol=0)
        with pytest.raises(ValueError, match="not both"):
            model(x, t, y, policy=IterationPolicy(), num_iterations=3)
        with pytest.raises(ValueError, match="must be >= 0"):
            model(x, t, y, num_iterations=-2)
