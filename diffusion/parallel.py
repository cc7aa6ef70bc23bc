"""Parallel DDIM: the whole sampling chain as one fixed point.

[DEQ-DDIM] Pokle, Geng & Kolter 2022, "Deep Equilibrium Approaches to Diffusion Models", Sec. 3.
[ParaDiGMS] Shih, Belkhale, Ermon, Sadigh & Anari 2023, "Parallel Sampling of Diffusion Models", Alg. 1.

A DDIM chain of T' (respaced) steps from x_T is unrolled as x_{s−1} = √ᾱ_{s−1} · (x_T/√ᾱ_T + Σ_{k=s..T} c_k ε_k (+ noise
terms)), so the unknown X = (x_{T'−1}, …, x_0), stacked as a (T', B, C, H, W) tensor, satisfies X = h(X; x_T): one
batched network call on all T' states, then a cumulative sum (`ddim_chain_map`). Its exact fixed point is the
sequential DDIM trajectory, and Picard iteration reaches it after T' evaluations (the chain is triangular: after k
evaluations the first k states of h(X) are exact, and the Picard sampler returns h(X) of its best iterate X, evaluated
already); Anderson acceleration usually gets within tolerance much sooner.
`parallel_ddim_sample` solves it with Anderson, Picard, or ParaDiGMS' sliding window of Picard iterations.

    x, y2 = guided_batch(noise, y, 4.0, model.num_classes)  # guidance: the batch doubled, null class second
    x0 = parallel_ddim_sample(GuidedModel(model, cfg_scale=4.0), diffusion, x, model_kwargs={"y": y2})[:len(noise)]
    # (or all of it in one call: sampling.sample_images(model, diffusion, noise, y, sampler="ddim-parallel", ...))

Costs: memory ≈ T' × a sequential step (all states are live; `chunk_size` bounds the states per network call);
FLOPs are (iterations × T') network evaluations instead of T'. Wall-clock drops only when the hardware runs a batch
of T' states at little more than the cost of one (a GPU with spare capacity, several devices); on a CPU the gain
from batching (~3× for DiT-B at 16 tokens, bench/bench_parallel.py) does not pay for ~8× the evaluations.

The formulation is for clip_denoised=False: clipping x̂_0 makes the step nonlinear in ways the sum does not
express, so compare with `ddim_sample_loop(..., clip_denoised=False)`. ε comes from `p_mean_variance`, exactly as
in the sequential sampler, so ε-, x_0- and v-prediction all work (learned-variance channels are ignored). Batches
are ordered sample-major (all states of sample 0, then of sample 1, …), so a CFG wrapper that splits a doubled
batch in halves (e.g. `sampling.GuidedModel`) still sees conditional samples first; model_kwargs tensors with the
batch size are repeated per state to match. FPDM models must run a fixed iteration count without solution reuse
(a batch mixes all timesteps).
"""

import contextlib
import dataclasses
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .solvers import MIXINGS, SYNC_EVERY_GPU, SolverResult, solve, solve_batched


def _coefficients(diffusion, first, n, eta, like, positions=None):
    """Per-step float64 coefficients for chain positions first..first+n−1 (diffusion index i = T'−1−position),
    shaped (n, 1, …) to broadcast over (n, B, C, H, W):
      sqrt_prev = √ᾱ_{i−1};  d = √(1 − ᾱ_{i−1} − σ_i²)/√ᾱ_{i−1};  c = d − √((1 − ᾱ_i)/ᾱ_i);  s = σ_i/√ᾱ_{i−1}
    with σ_i(η) as in `GaussianDiffusion.ddim_sample` [DDIM Eq. 16]. Computed for the whole chain once per
    (diffusion, η, device) and kept on the device: iterations slice them without a host-to-device copy. `positions`
    (a device tensor of n chain positions) gathers them instead of first..first+n−1."""
    tables = diffusion.__dict__.setdefault("_chain_coefficients", {})
    key = (float(eta), like.device)
    if key not in tables:
        i = diffusion.num_timesteps - 1 - np.arange(diffusion.num_timesteps)
        a, a_prev = diffusion.alphas_cumprod[i], diffusion.alphas_cumprod_prev[i]
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        d = np.sqrt(np.maximum(1 - a_prev - sigma ** 2, 0.0)) / np.sqrt(a_prev)
        with np.errstate(divide="ignore"):  # ᾱ = 0 only at x_T of a zero-terminal-SNR chain, whose c is never used
            c = d - np.sqrt((1 - a) / a)
        tables[key] = tuple(torch.from_numpy(v).to(device=like.device, dtype=torch.float64)
                            for v in (np.sqrt(a_prev), d, c, sigma / np.sqrt(a_prev)))
    shape = (n,) + (1,) * (like.dim() - 1)
    if positions is not None:
        return tuple(v[positions].view(shape) for v in tables[key])
    return tuple(v[first:first + n].view(shape) for v in tables[key])


def _model_outputs(model, diffusion, states, first, model_kwargs, chunk_size, layer=None, idx=None, positions=None):
    """ε and x̂_0 for the states (n, B, …) entering chain positions first..first+n−1 (or `positions`, a device
    tensor of n positions), from one network call per chunk of at most `chunk_size` states (all B samples each).
    With `layer` (two-axis sampling's layer states of images `idx`) each FPDM call starts its layer from the chunk's
    stored states and stores its solutions back."""
    n, batch = states.shape[:2]
    chunk = n if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError("chunk_size must be >= 1")
    eps, pred_xstart = [], []
    for start in range(0, n, chunk):
        part = states[start:start + chunk]
        k = len(part)
        x = part.transpose(0, 1).reshape(batch * k, *part.shape[2:])  # sample-major: b·k + j
        at = (torch.arange(first + start, first + start + k, device=x.device) if positions is None
              else positions[start:start + k])
        t = (diffusion.num_timesteps - 1 - at).repeat(batch)
        kwargs = {key: value.repeat_interleave(k, dim=0) if torch.is_tensor(value) and value.dim() > 0
                  and len(value) == batch else value for key, value in (model_kwargs or {}).items()}
        if layer is not None:
            layer.cache.solution = layer.start(idx, first + start, k)
        out = diffusion.p_mean_variance(model, x, t, clip_denoised=False, model_kwargs=kwargs)
        if layer is not None:
            layer.store(idx, first + start, k, layer.cache.solution)
        unflatten = lambda v: v.reshape(batch, k, *part.shape[2:]).transpose(0, 1)
        eps.append(unflatten(out["eps"]))
        pred_xstart.append(unflatten(out["pred_xstart"]))
    return torch.cat(eps), torch.cat(pred_xstart)


def _chain_outputs(diffusion, eps, pred_xstart, first, eta=0.0, noise=None, positions=None):
    """Outputs of the consecutive steps at positions first.. (or `positions`) given ε and x̂_0 at their inputs, by
    the cumulative sum of [DEQ-DDIM Eq. 6] in float64. The first input is the anchor (x_T, or the state before a
    window); its term x_anchor/√ᾱ + c ε is written as x̂_0 + d ε (equal by definition of x̂_0), which also holds at
    ᾱ_T = 0."""
    sqrt_prev, d, c, s = _coefficients(diffusion, first, len(eps), eta, eps, positions)
    eps64 = eps.double()
    terms = torch.cat([pred_xstart[:1].double() + d[:1] * eps64[:1], c[1:] * eps64[1:]])
    if eta > 0:
        if noise is None:
            raise ValueError("eta > 0 needs the pre-sampled noise z_k of every step")
        terms = terms + s * noise.double()
    return (sqrt_prev * terms.cumsum(0)).to(eps.dtype)


def ddim_chain_map(model, diffusion, x_T, X, eta=0.0, noise=None, model_kwargs=None, chunk_size=None):
    """h(X; x_T) [DEQ-DDIM Eq. 6]: X = (x_{T'−1}, …, x_0) of shape (T', B, …), states entering the steps are
    (x_T, x_{T'−1}, …, x_1). For η > 0, `noise` (T', B, …) holds the z_k of each step, in chain order."""
    states = torch.cat([x_T[None], X[:-1]])
    eps, pred_xstart = _model_outputs(model, diffusion, states, 0, model_kwargs, chunk_size)
    return _chain_outputs(diffusion, eps, pred_xstart, 0, eta, noise)


def sliding_window_solve(model, diffusion, x_T, window=None, tol=0.1, eta=0.0, noise=None, model_kwargs=None,
                         chunk_size=None, callback=None, sync_every=None):
    """ParaDiGMS [Alg. 1]: Picard iteration over a window of `window` steps (default all), one batched call per
    iteration. After each iteration the window slides past the leading steps whose update satisfies
    ‖Δx‖² / (σ² D) < tol² (D = values per sample, the worst sample of the batch), σ² = 1 − ᾱ_t being the variance
    of the noise level of the state entering the step; it always slides at least one step, since the first step
    of a window starts from a finished state and is exact. Steps entering the window start from the newest state
    at its end. Terminates within T' iterations (max_iter does not apply); tol = 0 gives the exact trajectory.

    The slide is decided on the device: the host reads it (and the residuals) once every `sync_every` iterations
    (default: every iteration on the CPU, solvers.SYNC_EVERY_GPU on a GPU). Between reads the window keeps the size
    it had at the last read, min(window, steps left then); its positions past the chain's end, and whole
    iterations once the chain is done, are evaluated but change nothing (`masked_evaluations`). Iterations, slides
    and evaluations do not depend on sync_every, nor does the trajectory beyond rounding (the network's batch holds
    the masked states too). Returns a SolverResult whose x is the whole trajectory and num_evaluations counts the
    states evaluated within the chain, with `host_reads` and `masked_evaluations` set."""
    n_steps = diffusion.num_timesteps
    window = n_steps if window is None else int(window)
    if window < 1:
        raise ValueError("window must be >= 1")
    device = x_T.device
    sync_every = (1 if device.type == "cpu" else SYNC_EVERY_GPU) if sync_every is None else int(sync_every)
    if sync_every < 1:
        raise ValueError("sync_every must be >= 1")
    window = min(window, n_steps)
    # E[i] is the state entering chain position i: E[0] = x_T and E[i + 1] = x at position i (the trajectory). The
    # rows past the chain's end take the window's positions beyond it, so every index written is distinct.
    E = x_T.expand(n_steps + 1 + window, *x_T.shape).clone()
    variances = diffusion.__dict__.setdefault("_chain_variances", {})  # per device, as _coefficients' tables
    if device not in variances:
        variances[device] = torch.from_numpy(1 - diffusion.alphas_cumprod[::-1].copy()).to(device)  # chain order
    variance = variances[device]
    per_sample, limit = x_T[0].numel(), n_steps - 1
    start = torch.zeros((), dtype=torch.long, device=device)
    iterations, evaluations, masked = (torch.zeros((), dtype=torch.long, device=device) for _ in range(3))
    result = SolverResult(x=None, converged=True)
    result.host_reads, done, pending = 0, 0, []
    while done < n_steps:
        size = min(window, n_steps - done)  # fixed until the next read
        offsets = torch.arange(size, device=device)
        for _ in range(sync_every):
            positions = start + offsets
            valid = positions < n_steps
            working = start < n_steps  # False once the chain is done: the iteration changes nothing
            at = positions.clamp(max=limit)  # timesteps and coefficients for the positions past the end
            eps, pred_xstart = _model_outputs(model, diffusion, E[positions], 0, model_kwargs, chunk_size,
                                              positions=at)
            new = _chain_outputs(diffusion, eps, pred_xstart, 0, eta, None if noise is None else noise[at],
                                 positions=at)
            old = E[positions + 1]
            keep = valid & working
            row = keep.view(-1, *(1,) * (new.dim() - 1))
            change = torch.where(row, new - old, 0)
            error = (change.double() ** 2).flatten(2).sum(-1).amax(1) / (variance[at] * per_sample)
            dtype = torch.promote_types(new.dtype, torch.float32)  # as solvers.relative_residual
            pending.append(change.to(dtype).norm() / (torch.where(row, new, 0).to(dtype).norm() + 1e-5))
            E[positions + 1] = torch.where(row, new, old)
            # the first step at or above tol² (else all steps in the chain) is where the window starts next
            above = (error >= tol ** 2) & keep
            advance = torch.where(above.any(), above.int().argmax(), keep.sum()).clamp(min=1) * working
            end = (start + size).clamp(max=n_steps)  # one past the window's last step in the chain
            entering = end + 1 + offsets  # rows of E that the slide brings into the window, from its newest state
            fill = (entering <= (start + advance + size).clamp(max=n_steps)).view(row.shape)
            E[entering] = torch.where(fill, E[end.view(1)], E[entering])  # a 1-d index: a 0-d one is read on the host
            start = start + advance
            iterations += working
            evaluations += keep.sum()
            masked += size - keep.sum()
        done, its, result.num_evaluations, result.masked_evaluations, residuals = _read_window(
            (start, iterations, evaluations, masked), pending)
        result.host_reads += 1
        result.residuals += residuals[:its - result.num_iterations]
        result.num_iterations, pending = its, []
        if callback is not None:
            callback({"i": its - 1, "done": done, "residual": result.residuals[-1]})
    result.x = E[1:n_steps + 1]
    return result


def _read_window(counters, pending):
    """The window solver's one read per sync_every iterations: its counters (steps done, iterations that did work,
    states evaluated, masked) as ints, then the residuals of the pending iterations, a non-finite one as inf (as
    solvers.relative_residual reads it)."""
    values = torch.cat([torch.stack(counters).double(), torch.stack(pending).double()]).tolist()
    n = len(counters)
    return (*(int(v) for v in values[:n]), [v if math.isfinite(v) else math.inf for v in values[n:]])


def check_model(model):
    """Refuse models whose outputs depend on call order or batch composition (training mode, FPDM reuse)."""
    net = getattr(model, "model", model)  # sampling.GuidedModel keeps the network in .model
    if getattr(net, "training", False):
        raise ValueError("call model.eval() first: in training mode labels are dropped at random (and FPDM draws "
                         "random iteration counts), so no two evaluations of h agree")
    if getattr(model, "reuse", False) or getattr(net, "fixed_point_reuse_solution", False):
        raise ValueError("FPDM solution reuse needs one timestep per call, but parallel DDIM mixes all timesteps "
                         "in one batch: turn reuse off and use a fixed iteration count")
    if isinstance(getattr(model, "iterations_per_step", None), (list, tuple)):
        raise ValueError("a per-step iteration schedule follows the sequential sampler's call order; use one int")


def images_of_guided_batch(model, x_T, model_kwargs, noise_seq):
    """(x_T, model_kwargs, noise_seq, doubled) for the chains a parallel sampler solves: for a guided model's doubled
    batch (images, then their null-class twins on the same states: sampling.guided_batch) the images alone, whose
    calls the model's `images_only()` evaluates with their twins; anything else as given (doubled False). η > 0
    noise drawn for the doubled batch keeps its images' part: what the sequential sampler gives the images."""
    if not getattr(model, "doubles_batch", False):
        return x_T, model_kwargs, noise_seq, False
    n = len(x_T) // 2
    if len(x_T) % 2 or not torch.equal(x_T[:n], x_T[n:]):
        raise ValueError("a guided batch holds each image's state twice (the images, then their null-class twins: "
                         "sampling.guided_batch)")
    kwargs = {k: v[:n] if torch.is_tensor(v) and v.dim() > 0 and len(v) == len(x_T) else v
              for k, v in (model_kwargs or {}).items()}
    return x_T[:n], kwargs, None if noise_seq is None else noise_seq[:, :n], True


def returned_sample(result, solver, doubled):
    """x_0 of a parallel solve (parallel DDIM, two-axis). Picard: h(X) of the best iterate X, evaluated already, i.e.
    its next iterate (one more state exact; 4-7x closer to sequential DDIM at tol 1e-3). Anderson: X itself, as DEQ
    returns it (h(X) was farther in 4 of 6 runs, by ~2.5x: an extrapolated iterate's error is not damped by one more
    step). The window: its final states. A doubled batch goes back as it came (each twin: its image)."""
    final = result.fx if solver == "picard" else result.x
    return torch.cat([final[-1]] * (1 + doubled))


def parallel_ddim_sample(model, diffusion, noise, solver="anderson", model_kwargs=None, eta=0.0, noise_seq=None,
                         max_iter=15, tol=1e-3, m=5, lam=1e-3, beta=1.0, window=None, window_tol=0.1,
                         chunk_size=None, progress=False, return_result=False, device=None, mixing="image",
                         sync_every=None):
    """DDIM sampling (clip_denoised=False) of the whole chain at once; returns x_0, or with `return_result`
    (x_0, SolverResult, stats).

    noise: x_T (B, C, H, W), or a shape to draw it from (on `device`). solver: "anderson" or "picard" on
    `ddim_chain_map` (max_iter, tol, m, lam, beta: see `solvers.solve`), or "window" (`sliding_window_solve` with
    window, window_tol). mixing: "image" (default) or "state" solve every image's chain on its own
    (`solvers.solve_batched`: per-image residuals, stopping and Anderson coefficients, one set per image or per
    state; converged images leave the batch, so no image's result depends on the others); "global" is one solve
    over the whole batch with one residual (DEQ-DDIM's stopping rule). `sync_every`: how often "image"/"state" and
    the window read the device (`solvers.solve_batched`, `sliding_window_solve`; default 1 on the CPU, 2 on a GPU).
    η > 0 uses `noise_seq` (T', B, C, H, W) as the z of each step, in sampling order; if none is given it is drawn
    after x_T one step at a time, as `ddim_sample_loop` draws it, so both agree for one seed.
    stats: parallel_iterations, network_evaluations (states evaluated per sample, averaged over the batch;
    sequential DDIM needs T'), sequential_evaluations (T'), residual (relative, ‖h(X) − X‖ / ‖h(X)‖ of the best
    iterate X, which Anderson returns and Picard returns h(X) of; per image: the largest; window: of its last
    update), converged, wall_time_s, and per image (mixing "image"/"state")
    network_evaluations_per_image and residuals_per_image, with host_reads and masked_chain_evaluations (chains
    evaluated after they had converged, waiting for a read; not in network_evaluations); the window: host_reads and
    masked_chain_evaluations (states evaluated past the chain's end or after it was done).
    """
    check_model(model)
    if mixing not in MIXINGS:
        raise ValueError(f"unknown mixing {mixing!r}; use one of {', '.join(MIXINGS)}")
    x_T = noise if torch.is_tensor(noise) else torch.randn(*noise, device=device)
    n_steps = diffusion.num_timesteps
    if eta > 0 and noise_seq is None:
        noise_seq = torch.stack([torch.randn_like(x_T) for _ in range(n_steps)])
    if noise_seq is not None and tuple(noise_seq.shape) != (n_steps, *x_T.shape):
        raise ValueError(f"noise_seq must have shape {(n_steps, *x_T.shape)}, got {tuple(noise_seq.shape)}")
    x_T, model_kwargs, noise_seq, doubled = images_of_guided_batch(model, x_T, model_kwargs, noise_seq)
    bar = tqdm(total=n_steps if solver == "window" else max_iter, disable=not progress)

    def report(info):
        bar.set_postfix(residual=f"{info['residual']:.2e}")
        bar.update(info["done"] - bar.n if "done" in info else 1)

    began = time.perf_counter()
    with torch.no_grad(), model.images_only() if doubled else contextlib.nullcontext():
        if solver == "window":
            result = sliding_window_solve(model, diffusion, x_T, window, window_tol, eta, noise_seq, model_kwargs,
                                          chunk_size, callback=report, sync_every=sync_every)
        elif mixing == "global":
            f = lambda X: ddim_chain_map(model, diffusion, x_T, X, eta, noise_seq, model_kwargs, chunk_size)
            result = solve(f, x_T.expand(n_steps, *x_T.shape).clone(), solver, max_iter, tol, m, lam, beta,
                           callback=report)
            result = dataclasses.replace(result, num_evaluations=result.num_evaluations * n_steps)
        else:
            def f(X, idx):  # the chains of images idx only
                kwargs = {k: v[idx] if torch.is_tensor(v) and v.dim() > 0 and len(v) == len(x_T) else v
                          for k, v in (model_kwargs or {}).items()}
                return ddim_chain_map(model, diffusion, x_T[idx], X, eta,
                                      None if noise_seq is None else noise_seq[:, idx], kwargs, chunk_size)
            result = solve_batched(f, x_T.expand(n_steps, *x_T.shape).clone(), solver, max_iter, tol, m, lam, beta,
                                   mixing, callback=report, sync_every=sync_every)
    if x_T.is_cuda:
        torch.cuda.synchronize(x_T.device)
    bar.close()
    stats = {"solver": solver, "mixing": mixing if solver != "window" else None,
             "parallel_iterations": result.num_iterations,
             "network_evaluations": result.num_evaluations, "sequential_evaluations": n_steps,
             "residual": min(result.residuals) if solver != "window" else result.residuals[-1],
             "converged": result.converged, "wall_time_s": time.perf_counter() - began}
    if solver == "window":
        stats.update(host_reads=result.host_reads, masked_chain_evaluations=result.masked_evaluations)
    if hasattr(result, "image_evaluations"):
        per_image = [e * n_steps for e in result.image_evaluations]
        stats.update(network_evaluations=sum(per_image) / len(per_image), network_evaluations_per_image=per_image,
                     host_reads=result.host_reads, masked_chain_evaluations=result.masked_evaluations,
                     residual=max(min(r) for r in result.image_residuals),
                     residuals_per_image=result.image_residuals)
    x_0 = returned_sample(result, solver, doubled)
    return (x_0, result, stats) if return_result else x_0
