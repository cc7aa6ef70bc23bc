"""Two-axis sampling: one fixed point over time (the DDIM chain) and depth (FPDM's implicit layer) together.

DEQ-DDIM (diffusion/parallel.py) solves the chain X = (x_{T'−1}, …, x_0) = h(X; x_T) with a network call on all T'
states per iteration; with an FPDM every such call solves the layer z = f(z; u(x_s), t_s) of every state again from
scratch. Here the layer states Z = (z_s for every state) are unknowns too. One outer iteration evaluates all states
in one batched call, running `inner_iterations` = k layer iterations per state warm-started from that state's z of
the previous outer iteration, then applies the DDIM chain map. (Starting from the neighbouring state's z instead, as
solution reuse does in sequential sampling, is not an option here: repeated at every outer iteration it changes the
fixed point to z_s = f_s(z_{s−1}), a chain of single iterations, not a converged layer; tested.) The outer update of X is Picard or
Anderson (per image, `solvers.solve_batched`); Z follows the evaluations. The exact fixed point is sequential DDIM
with a converged layer at every step: X is h's fixed point when every z_s is f's fixed point.

Compute is reported in block evaluations per image (pre + k + post blocks per state evaluated) and as the critical
path, the dependent work a step of wall-clock cannot overlap: `critical_path_calls` batched network calls (one per
outer iteration; chunks of one iteration are independent) and `critical_path_blocks` block evaluations along them
(outer iterations × (pre + k + post)). Sequential FPDM sampling has T' calls and all its block evaluations on the
critical path.

    x, y2 = guided_batch(noise, y, 2.0, fpdm.num_classes)  # guidance: the batch doubled, null class second
    x0, result, stats = two_axis_sample(GuidedModel(fpdm, cfg_scale=2.0, iterations_per_step=1), diffusion, x,
                                        model_kwargs={"y": y2}, return_result=True)  # x0[:len(noise)]: the images
"""

import contextlib
import time

import torch
from tqdm.auto import tqdm

from diffusion.parallel import _chain_outputs, _model_outputs, check_model, images_of_guided_batch, returned_sample
from diffusion.solvers import solve_batched
from models import StateCache

class _LayerStates:
    """Z: every image's layer state at every chain position, (halves, B, T', tokens, hidden), filled by the first
    outer iteration; `cache` (a models.StateCache) hands a chunk's rows to the FPDM and takes its solutions back.
    halves = 2 where each call also evaluates the images' null-class twins (guidance): the network's rows are the
    images' then the twins'."""

    def __init__(self, cache, batch, n_steps, halves=1):
        self.cache, self.batch, self.n_steps, self.halves, self.z = cache, batch, n_steps, halves, None

    def start(self, idx, first, k):
        """Rows (halves·len(idx)·k, tokens, hidden), sample-major in each half, for positions first..first+k−1 of
        images idx."""
        if self.z is None:
            return None
        return self.z[:, idx, first:first + k].reshape(-1, *self.z.shape[3:])

    def store(self, idx, first, k, rows):
        rows = rows.reshape(self.halves, len(idx), k, *rows.shape[1:])
        if self.z is None:
            self.z = rows.new_zeros(self.halves, self.batch, self.n_steps, *rows.shape[3:])
        self.z[:, idx, first:first + k] = rows


def two_axis_sample(model, diffusion, noise, inner_iterations=None, solver="anderson", model_kwargs=None, eta=0.0,
                    noise_seq=None, max_iter=50, tol=1e-3, m=5, lam=1e-3, beta=1.0, chunk_size=None,
                    progress=False, return_result=False, sync_every=None):
    """DDIM sampling (clip_denoised=False) of an FPDM over time and depth at once; returns x_0, or with
    `return_result` (x_0, BatchedSolverResult, stats).

    model: a `sampling.GuidedModel` around an FPDM (its fixed iteration count is the inner count; guidance with a
    constant scale works), or the FPDM itself with `inner_iterations`. solver: "anderson" (per image) or "picard"
    for the outer update of X; max_iter, tol (relative residual of X per image), m, lam, beta as in
    `solvers.solve_batched` (and sync_every: how often it reads the device). η > 0 takes `noise_seq` (T', B, …), or draws it after x_T as the sequential sampler
    does.
    stats: outer_iterations, network_evaluations (states per image), block_evaluations (per image),
    critical_path_calls, critical_path_blocks, sequential_* (the same for sequential DDIM with this inner count
    and reuse), residual, converged, wall_time_s, per-image evaluations and residual histories.
    """
    check_model(model)
    net = getattr(model, "model", model)
    if not getattr(net, "fixed_point", False):
        raise ValueError("two-axis sampling solves FPDM's layer along with the chain: this model is a DiT (use "
                         "--parallel anderson for DEQ-DDIM)")
    if solver not in ("anderson", "picard"):
        raise ValueError(f"unknown outer solver {solver!r} for two-axis sampling; use 'anderson' or 'picard'")
    kwargs = dict(model_kwargs or {})
    cache = StateCache()
    if hasattr(model, "iterations_per_step"):  # a GuidedModel: it passes its cache and its iteration count
        k = model.iterations_per_step if inner_iterations is None else inner_iterations
        model.iterations_per_step, model.cache = k, cache
    else:
        k = inner_iterations
        kwargs.update(num_iterations=k, reuse=cache)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"two-axis sampling needs a fixed inner iteration count >= 1, got {k!r}")
    x_T = noise
    n_steps = diffusion.num_timesteps
    if eta > 0 and noise_seq is None:
        noise_seq = torch.stack([torch.randn_like(x_T) for _ in range(n_steps)])
    if noise_seq is not None and tuple(noise_seq.shape) != (n_steps, *x_T.shape):
        raise ValueError(f"noise_seq must have shape {(n_steps, *x_T.shape)}, got {tuple(noise_seq.shape)}")
    x_T, kwargs, noise_seq, doubled = images_of_guided_batch(model, x_T, kwargs, noise_seq)
    layer = _LayerStates(cache, len(x_T), n_steps, 1 + doubled)
    bar = tqdm(total=max_iter, disable=not progress, desc="two-axis")

    def report(info):
        bar.set_postfix(residual=f"{info['residual']:.2e}", active=info["active"])
        bar.update(1)

    def f(X, idx):  # the chains of images idx
        part = {key: v[idx] if torch.is_tensor(v) and v.dim() > 0 and len(v) == len(x_T) else v
                for key, v in kwargs.items()}
        states = torch.cat([x_T[idx][None], X[:-1]])
        eps, pred_xstart = _model_outputs(model, diffusion, states, 0, part, chunk_size, layer, idx)
        return _chain_outputs(diffusion, eps, pred_xstart, 0, eta, None if noise_seq is None else noise_seq[:, idx])

    began = time.perf_counter()
    with torch.no_grad(), model.images_only() if doubled else contextlib.nullcontext():
        result = solve_batched(f, x_T.expand(n_steps, *x_T.shape).clone(), solver, max_iter, tol, m, lam, beta,
                               "image", callback=report, sync_every=sync_every)
    if x_T.is_cuda:
        torch.cuda.synchronize(x_T.device)
    bar.close()
    per_call = len(net.blocks_pre) + k + len(net.blocks_post)
    per_image = [e * n_steps for e in result.image_evaluations]
    stats = {"solver": solver, "inner_iterations": k,
             "outer_iterations": result.num_iterations,
             "network_evaluations": sum(per_image) / len(per_image),
             "block_evaluations": sum(per_image) / len(per_image) * per_call,
             "critical_path_calls": result.num_iterations, "critical_path_blocks": result.num_iterations * per_call,
             "sequential_network_evaluations": n_steps, "sequential_critical_path_calls": n_steps,
             "residual": max(min(r) for r in result.image_residuals), "converged": result.converged,
             "wall_time_s": time.perf_counter() - began, "network_evaluations_per_image": per_image,
             "host_reads": result.host_reads, "masked_chain_evaluations": result.masked_evaluations,
             "residuals_per_image": result.image_residuals}
    x_0 = returned_sample(result, solver, doubled)
    return (x_0, result, stats) if return_result else x_0
