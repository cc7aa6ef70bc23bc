"""What a DEQ researcher watches while an FPDM trains: how far each training forward leaves the implicit layer from
its fixed point, per timestep, and how strongly the layer contracts there.

  - Residual per timestep bucket: `FixedPointStats.example_residuals` (each example's ‖f(z) − z‖ / ‖z‖ after the
    last iteration of its training forward) summed on the device per bucket of t (`timestep_buckets`) by
    training.MetricsWindow, read once per log row.
  - Contraction: the spectral radius ρ of ∂f/∂z at the layer's fixed point z*, on a fixed probe batch, by power
    iteration with Jacobian-vector products (`contraction`). ρ < 1: plain iteration converges near z*, the residual
    shrinking by about ρ per iteration; ρ ≥ 1: z* is not attracting, and more iterations will not help.

    rho, details = contraction(model, x, t, y)                         # float; per-example values in details
    diagnostics = TrainingDiagnostics(run_dir, dataset, diffusion, device, power_iterations=20)   # train.py
    diagnostics.write(step, model, residual_by_t)                      # a row of fp_diagnostics.csv, two PNGs

Nothing here draws from torch's global RNG (the probe and the power iteration's start have their own generators,
and `write` forks the RNG besides) or changes the model (it runs without autograd and restores its mode), so a run
trains bit for bit the same with and without it (tested).
"""

import csv
import io
import math
import os
from contextlib import contextmanager

import torch

BUCKETS = 10  # equal ranges of the training timestep t in [0, T)


def timestep_buckets(t, num_timesteps, buckets=BUCKETS):
    """The bucket of each timestep: t · buckets // T, in [0, buckets)."""
    return t * buckets // num_timesteps


@contextmanager
def _jvp_friendly():
    """The math attention kernel (the fused ones have no forward-mode derivative) and eager blocks (a model compiled
    with `compile_regions` would otherwise recompile for the probe's shape and for forward mode)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]), torch.compiler.set_stance("force_eager"):
        yield


def layer_problem(model, x, t, y):
    """(h, injection, c) of FPDM `model`'s implicit layer for inputs x, t, y, exactly as `DiT.forward` and
    `FPDM.trunk` build them in eval mode (no label dropout): the pre-blocks' output (where iteration starts), the
    input injection and the layer's conditioning. The layer is f(z) = model.fixed_point_function(z, injection, c)."""
    tokens = model.embed(x)
    t_emb, y_emb = model.t_embedder(t), model.y_embedder(y, False)
    c = t_emb + y_emb
    c_outer = c if model.fixed_point_pre_post_timestep_conditioning else y_emb
    for block in model.blocks_pre:
        tokens = block(tokens, c_outer)
    return tokens, model.block_pre_projection(tokens), c


def _norms(v):
    """‖v‖ of each example (over its tokens and channels), in float32: (B,)."""
    return v.float().flatten(1).norm(dim=1)


@torch.no_grad()
def spectral_radius(f, z, power_iterations=20, seed=0):
    """Per example, the spectral radius of ∂f/∂z at z by power iteration v ← Jv / ‖Jv‖ with JVPs, from a random v
    (its own generator). The estimate is the geometric mean of the growth ratios ‖Jv_k‖ / ‖v_k‖ over the last half
    of the iterations, (‖J^K v‖ / ‖J^(K/2) v‖)^(2/K): it averages out the oscillation of a complex dominant pair.
    f must act on each example alone (FPDM's layer does: its Jacobian is block-diagonal over the batch), so the
    batch's spectral radius is the maximum. Returns ((B,) estimates, f(z))."""
    if power_iterations < 2:
        raise ValueError(f"power iteration needs at least 2 steps, got {power_iterations}")
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(z.shape, generator=g).to(device=z.device, dtype=z.dtype)
    shape = (-1, *([1] * (z.dim() - 1)))
    v = v / _norms(v).view(shape).to(v.dtype)
    log_growth, fz = [], None
    for _ in range(power_iterations):
        f_z, jv = torch.func.jvp(f, (z,), (v,))
        fz = f_z if fz is None else fz
        norm = _norms(jv).clamp_min(1e-30)
        log_growth.append(norm.log())
        v = jv / norm.view(shape).to(jv.dtype)
    return torch.stack(log_growth[power_iterations // 2:]).mean(0).exp(), fz


@torch.no_grad()
def contraction(model, x, t, y, settle_iterations=None, power_iterations=20, seed=0):
    """The spectral radius of the layer's Jacobian ∂f/∂z at its fixed point for inputs x, t, y: the pre-blocks and
    the injection, `settle_iterations` plain iterations from the pre-blocks' output towards z* (default twice the
    S-JFB maximum, n_max + m_max, so further than any training forward goes), then `spectral_radius`. Runs in eval
    mode, without autograd, and leaves the model's mode as it was. Returns (ρ, the maximum over the examples, as a
    float; details: "per_example" ρ, "mean", and "residual" ‖f(z*) − z*‖ / ‖z*‖ per example, which says how close
    to a fixed point the estimate was taken)."""
    if settle_iterations is None:
        settle_iterations = 2 * (model.fixed_point_no_grad_iters[1] + model.fixed_point_with_grad_iters[1])
    was_training = model.training
    model.eval()
    try:
        with _jvp_friendly():
            h, injection, c = layer_problem(model, x, t, y)
            f = lambda z: model.fixed_point_function(z, injection, c)  # noqa: E731
            z = h
            for _ in range(settle_iterations):
                z = f(z)
            rho, fz = spectral_radius(f, z, power_iterations, seed)
    finally:
        model.train(was_training)
    residual = _norms(fz - z) / _norms(z).clamp_min(1e-12)
    per_example, residual = rho.tolist(), residual.tolist()  # the only reads: once per call
    return max(per_example), {"per_example": per_example, "mean": sum(per_example) / len(per_example),
                              "residual": residual, "t": t.tolist()}


def probe_batch(dataset, diffusion, device, size=BUCKETS, seed=0):
    """(x_t, t, y): `size` training examples chosen by their own generator, augmented as in training (flips, latent
    sampling) from a forked RNG, noised with fixed noise to the timesteps at the centres of `size` equal ranges of
    [0, T). Built once; torch's global RNG is as before afterwards."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(dataset), generator=g).tolist()
    x, y = zip(*(dataset[order[i % len(order)]] for i in range(size)))
    x, y = torch.stack([torch.as_tensor(v) for v in x]).float(), torch.tensor([int(v) for v in y])
    with torch.random.fork_rng(devices=[]):  # CPU only: the CUDA generators are not touched here
        torch.default_generator.manual_seed(seed)
        x = dataset.augment(x)
    T = diffusion.num_timesteps
    t = ((torch.arange(size) + 0.5) * T / size).long()
    noise = torch.randn(x.shape, generator=g)
    return diffusion.q_sample(x.to(device), t.to(device), noise=noise.to(device)), t.to(device), y.to(device)


class TrainingDiagnostics:
    """fp_diagnostics.csv in a run folder, a row per log row — the step, the contraction estimate on the probe batch
    (maximum and mean over its examples), the probe's residual at the settled z* (its maximum), and the training
    forwards' mean relative residual per timestep bucket r_b0 … r_b9 since the previous row (NaN for a bucket
    without examples) — and its plots fp_contraction.png and fp_residual_by_t.png, redrawn from the CSV by `plot`
    (train.py calls it on a background thread after each row; main process only)."""

    FIELDS = ["step", "contraction", "contraction_mean", "probe_residual", *(f"r_b{b}" for b in range(BUCKETS))]

    def __init__(self, run_dir, dataset, diffusion, device, power_iterations=20, step=0):
        from fpdm.run_folders import truncate_metrics
        self.run_dir, self.power_iterations = run_dir, power_iterations
        self.path = os.path.join(run_dir, "fp_diagnostics.csv")
        self.probe = probe_batch(dataset, diffusion, device)
        truncate_metrics(self.path, step)  # rows after the checkpoint a resumed run continues from
        if not os.path.exists(self.path):
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)
        device = torch.device(device)
        self.rng_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []

    def write(self, step, model, residual_by_t):
        """Estimate the contraction of `model` (unwrapped) on the probe and append the row (one write, like
        metrics.csv); returns the row as a dict. The plots are `plot`'s."""
        with torch.random.fork_rng(devices=self.rng_devices):  # belt and braces: nothing here draws from it
            rho, details = contraction(model, *self.probe, power_iterations=self.power_iterations)
        residual_by_t = residual_by_t if residual_by_t is not None else [math.nan] * BUCKETS
        row = dict(zip(self.FIELDS, [step, rho, details["mean"], max(details["residual"]), *residual_by_t]))
        line = io.StringIO()
        csv.writer(line).writerow([row[k] for k in self.FIELDS])
        with open(self.path, "a", newline="") as f:
            f.write(line.getvalue())
        return row

    def rows(self):
        with open(self.path, newline="") as f:
            return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]

    def plot(self):
        """fp_contraction.png (ρ over training steps, with the line ρ = 1) and fp_residual_by_t.png (residual per t
        bucket: a line for each of up to 6 logged steps, and a steps × buckets heatmap of all of them); returns their
        paths. matplotlib's object API without pyplot: safe on a thread of its own."""
        import matplotlib
        from matplotlib.colors import LogNorm
        from matplotlib.figure import Figure

        from fpdm.run_folders import atomic_write
        rows = self.rows()
        if not rows:
            return []
        steps = [int(r["step"]) for r in rows]
        paths = [os.path.join(self.run_dir, name) for name in ("fp_contraction.png", "fp_residual_by_t.png")]

        fig = Figure(figsize=(5.5, 3.6))
        ax = fig.subplots()
        ax.plot(steps, [r["contraction"] for r in rows], "o-", ms=3, label="max over the probe batch")
        ax.plot(steps, [r["contraction_mean"] for r in rows], "o-", ms=3, alpha=0.6, label="mean")
        ax.axhline(1.0, color="crimson", lw=1, ls="--", label="ρ = 1 (no contraction)")
        ax.set(xlabel="training step", ylabel="spectral radius ρ of ∂f/∂z at z*",
               title="FPDM layer: contraction estimate (power iteration)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(paths[0], lambda f: fig.savefig(f, format="png", dpi=110), "wb")

        table = torch.tensor([[r[f"r_b{b}"] for b in range(BUCKETS)] for r in rows])
        finite = table[torch.isfinite(table) & (table > 0)]
        fig = Figure(figsize=(10, 3.8))
        lines, heat = fig.subplots(1, 2)
        shown = sorted({round(i * (len(rows) - 1) / 5) for i in range(6)})
        cmap = matplotlib.colormaps["viridis"]
        for i in shown:
            lines.plot(range(BUCKETS), table[i].tolist(), "o-", ms=3, color=cmap(i / max(len(rows) - 1, 1)),
                       label=f"step {steps[i]}")
        if len(finite):
            lines.set_yscale("log")
        lines.set(xticks=range(BUCKETS), xlabel=f"timestep bucket b: t in [bT/{BUCKETS}, (b+1)T/{BUCKETS})",
                  ylabel="‖f(z) − z‖ / ‖z‖, last iteration", title="training forwards: residual per t")
        lines.grid(alpha=0.3)
        lines.legend(fontsize=8)
        norm = LogNorm(vmin=float(finite.min()), vmax=float(finite.max())) if len(finite) else None
        image = heat.imshow(table.numpy(), aspect="auto", interpolation="nearest", cmap="magma", norm=norm,
                            extent=(-0.5, BUCKETS - 0.5, len(rows) - 0.5, -0.5))
        ticks = shown if len(rows) > 6 else range(len(rows))
        heat.set(xticks=range(BUCKETS), yticks=list(ticks), yticklabels=[steps[i] for i in ticks],
                 xlabel="timestep bucket b", ylabel="training step", title="all log rows (blank: no examples)")
        fig.colorbar(image, ax=heat, label="relative residual")
        fig.tight_layout()
        atomic_write(paths[1], lambda f: fig.savefig(f, format="png", dpi=110), "wb")
        return paths
