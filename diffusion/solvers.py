"""Fixed-point solvers for x = f(x), with one signature and one result type.

    result = solve(f, x0, method="anderson", max_iter=15, tol=1e-3)
    result.x, result.residuals, result.converged

Used by the parallel DDIM sampler (`diffusion/parallel.py`), whose sliding-window solver returns the same
`SolverResult`. References:
  [AA]  Walker & Ni 2011, "Anderson Acceleration for Fixed-Point Iterations" (type-II Anderson mixing).
  [DEQ] Bai, Kolter & Koltun 2019, "Deep Equilibrium Models" (the bordered least-squares form with a ridge term).
  [DEQ-DDIM] Pokle, Geng & Kolter 2022, "Deep Equilibrium Approaches to Diffusion Models" (m = 5, λ = 1e-3, β = 1,
        15 iterations, tolerance 1e-3 on the relative residual below).
"""

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SolverResult:
    """`x`: the iterate with the lowest residual; `residuals[k]`: relative residual of the k-th evaluated iterate;
    `num_iterations`: iterations run; `num_evaluations`: evaluations of f (for the DDIM solvers: network
    evaluations per sample, i.e. states evaluated); `converged`: the tolerance was reached."""
    x: torch.Tensor
    residuals: list = field(default_factory=list)
    num_iterations: int = 0
    num_evaluations: int = 0
    converged: bool = False


def relative_residual(fx, x):
    """‖f(x) − x‖ / (‖f(x)‖ + 1e-5), one norm over the whole tensor (DEQ-DDIM's stopping criterion); NaN → inf."""
    dtype = torch.promote_types(fx.dtype, torch.float32)  # half precision would overflow the norm
    value = ((fx.to(dtype) - x.to(dtype)).norm() / (fx.to(dtype).norm() + 1e-5)).item()
    return value if math.isfinite(value) else math.inf


def solve(f, x0, method="anderson", max_iter=15, tol=1e-3, m=5, lam=1e-3, beta=1.0, callback=None):
    """Solve x = f(x) from x0 by "picard" (x ← f(x)) or "anderson" [AA] iteration; returns a `SolverResult`.

    Each iteration evaluates f once; stops when the relative residual of the evaluated iterate drops below `tol`
    or after `max_iter` evaluations. `callback(info)` gets {"i", "x", "fx", "residual"} after every evaluation.
    Anderson (history m, ridge λ, mixing β) never fails: a singular or non-finite least-squares solution falls
    back to a Picard step, and a non-finite f(x) restarts from the best iterate so far.
    """
    if method not in ("anderson", "picard"):
        raise ValueError(f"unknown solver {method!r}; use 'anderson' or 'picard' (or 'window' in parallel DDIM)")
    if max_iter < 1:
        raise ValueError("max_iter must be >= 1")
    history_x, history_g = [], []  # iterates and their residuals g = f(x) − x, newest last
    result = SolverResult(x=x0)
    best_residual, best_fx = math.inf, None
    x = x0
    for i in range(max_iter):
        fx = f(x)
        residual = relative_residual(fx, x)
        result.residuals.append(residual)
        result.num_iterations = result.num_evaluations = i + 1
        if callback is not None:
            callback({"i": i, "x": x, "fx": fx, "residual": residual})
        if residual < best_residual:
            best_residual, result.x, best_fx = residual, x, fx
        if residual < tol:
            result.converged = True
            break
        if residual == math.inf:  # f blew up (at an extrapolated point, say)
            if best_fx is None or x is best_fx:
                break  # nothing finite to restart from, or the restart itself failed
            history_x, history_g = [], []
            x = best_fx
            continue
        if method == "picard":
            x = fx
            continue
        history_x.append(x)
        history_g.append(fx - x)
        if len(history_x) > m:
            history_x.pop(0)
            history_g.pop(0)
        x = _anderson_step(history_x, history_g, lam, beta)
        if x is None:  # ill-posed least squares: plain Picard step
            x = fx
    return result


def _bordered_solve(H, rhs):
    """Solutions of the bordered systems H (K, n+1, n+1) · a = rhs (K, n+1, 1): a direct solve (λ > 0 keeps them
    regular however different the residuals' magnitudes are), the pseudo-inverse (minimum-norm α) where a system is
    singular or nearly so (λ = 0 with repeated residuals: no solution, or mixing weights beyond ±1e3, i.e. a wild
    extrapolation). A pseudo-inverse alone truncates the ridge block as soon as old residuals dwarf the newest
    (‖g‖² ratios of 1e10 and more), which sends the iterate off to a residual of ~1."""
    a, info = torch.linalg.solve_ex(H, rhs)
    bad = (info != 0) | ~torch.isfinite(a).flatten(1).all(1) | (a[:, 1:].flatten(1).abs().amax(1) > 1e3)
    if bad.any():
        a[bad] = torch.linalg.pinv(H[bad], rtol=1e-10, hermitian=True) @ rhs[bad]
    return a


def _anderson_step(xs, gs, lam, beta):
    """x_new = Σ α_i (x_i + β g_i) with α = argmin ‖Σ α_i g_i‖² + λ' ‖α‖², Σ α_i = 1 [AA Sec. 2, DEQ's bordered
    system]. λ' = λ · ‖g_newest‖²: relative to the current residual, so the ridge is scale-free and stays small as
    the iteration converges (the release adds λ to GGᵀ as is, which dominates once ‖g‖² ≲ λ and stalls there).
    The system is solved directly (`_bordered_solve`; a singular one, λ = 0 with repeated residuals, by
    pseudo-inverse: the minimum-norm α); None (a Picard step) when nothing finite comes out."""
    n = len(xs)
    if n == 1:
        return xs[0] + beta * gs[0]
    G = torch.stack([g.reshape(-1) for g in gs]).double()
    gram = G @ G.T
    scale = gram[-1, -1]
    if not torch.isfinite(gram).all() or scale <= 0:
        return None
    # Bordered system [[0, 1ᵀ], [1, GGᵀ/s + λI]] [ν, α] = [1, 0]: the constrained least squares in one solve
    # (dividing GGᵀ by s = ‖g_newest‖² leaves α unchanged and keeps the entries O(1)).
    H = torch.zeros(n + 1, n + 1, dtype=torch.float64, device=G.device)
    H[0, 1:] = H[1:, 0] = 1
    H[1:, 1:] = gram / scale + lam * torch.eye(n, dtype=torch.float64, device=G.device)
    rhs = torch.zeros(n + 1, dtype=torch.float64, device=G.device)
    rhs[0] = 1
    alpha = _bordered_solve(H[None], rhs[None, :, None])[0, 1:, 0]
    if not torch.isfinite(alpha).all():
        return None
    alpha = alpha.to(xs[0].dtype)
    x_new = sum(a * (x + beta * g) for a, x, g in zip(alpha, xs, gs))
    return x_new if torch.isfinite(x_new).all() else None


MIXINGS = ("image", "state", "global")


@dataclass
class BatchedSolverResult(SolverResult):
    """`SolverResult` of `solve_batched`, per image as well: `image_residuals[b]` is image b's residual history,
    `image_evaluations[b]` how many times f evaluated it, `image_converged[b]` whether it reached the tolerance.
    `residuals[k]` is the largest residual among the images still iterating at iteration k; `fx` holds f(x) of the
    best iterate of each image (no extra evaluation)."""
    fx: torch.Tensor = None
    image_residuals: list = field(default_factory=list)
    image_evaluations: list = field(default_factory=list)
    image_converged: list = field(default_factory=list)


def solve_batched(f, x0, method="anderson", max_iter=15, tol=1e-3, m=5, lam=1e-3, beta=1.0, mixing="image",
                  callback=None):
    """Solve x_b = f(x)_b for every image b of x0 (S, B, ...) — S states per image, e.g. the T' states of a DDIM
    chain — each on its own: per-image relative residuals and stopping, and converged images frozen, so an image's
    result does not depend on what else is in its batch. f(x, idx) evaluates the images `idx` (a LongTensor) from
    their iterates x (S, len(idx), ...). Anderson [AA] mixes with one set of coefficients per image ("image"), per
    state of each image ("state", as DEQ-DDIM's release does), or over the whole active batch ("global"); the
    least-squares problems are solved together (batched). As `solve`: best iterate per image, a Picard step where a
    least-squares solution is not finite, a restart from the best f(x) where f is not finite."""
    if method not in ("anderson", "picard"):
        raise ValueError(f"unknown solver {method!r}; use 'anderson' or 'picard'")
    if mixing not in MIXINGS:
        raise ValueError(f"unknown mixing {mixing!r}; use one of {', '.join(MIXINGS)}")
    if max_iter < 1:
        raise ValueError("max_iter must be >= 1")
    batch = x0.shape[1]
    x, best_x, best_fx = x0.clone(), x0.clone(), torch.full_like(x0, math.nan)
    best = torch.full((batch,), math.inf, dtype=torch.float64)
    result = BatchedSolverResult(x=best_x, image_residuals=[[] for _ in range(batch)],
                                 image_evaluations=[0] * batch, image_converged=[False] * batch)
    active = torch.arange(batch, device=x0.device)
    history_x, history_g = [], []  # (S, len(active), ...) tensors for the images still active, newest last
    for i in range(max_iter):
        xa = x[:, active]
        fx = f(xa, active)
        residual = _per_image_residual(fx, xa)
        for j, b in enumerate(active.tolist()):
            result.image_residuals[b].append(float(residual[j]))
            result.image_evaluations[b] += 1
        improved = residual < best[active.cpu()]
        if improved.any():
            rows = active[improved.to(active.device)]
            best[rows.cpu()] = residual[improved]
            best_x[:, rows], best_fx[:, rows] = xa[:, improved.to(xa.device)], fx[:, improved.to(fx.device)]
        result.num_iterations = i + 1
        result.residuals.append(float(residual.max()))
        if callback is not None:
            callback({"i": i, "residual": result.residuals[-1], "active": len(active)})
        done = (residual < tol).to(active.device)
        for b in active[done].tolist():
            result.image_converged[b] = True
        blown = ~torch.isfinite(residual).to(active.device)
        keep = ~done
        if not keep.any() or i == max_iter - 1:
            break
        if blown.any():  # restart those images from their best f(x); the history restarts for all
            rows = active[blown]
            fx[:, blown] = torch.where(torch.isfinite(best_fx[:, rows]), best_fx[:, rows], xa[:, blown])
            history_x, history_g = [], []
        if method == "picard" or blown.any():
            new = fx
        else:
            history_x.append(xa)
            history_g.append(fx - xa)
            if len(history_x) > m:
                history_x.pop(0)
                history_g.pop(0)
            new = _anderson_batched(history_x, history_g, lam, beta, mixing, fallback=fx)
        x[:, active] = new
        active = active[keep]
        history_x = [h[:, keep] for h in history_x]
        history_g = [h[:, keep] for h in history_g]
    result.x, result.fx = best_x, best_fx
    result.converged = all(result.image_converged)
    result.num_evaluations = max(result.image_evaluations)
    return result


def _per_image_residual(fx, x):
    """‖f(x)_b − x_b‖ / (‖f(x)_b‖ + 1e-5) over each image's S states (float64 on the CPU); NaN → inf."""
    dtype = torch.promote_types(fx.dtype, torch.float32)
    diff = (fx.to(dtype) - x.to(dtype)).transpose(0, 1).flatten(1).norm(dim=1)
    value = (diff / (fx.to(dtype).transpose(0, 1).flatten(1).norm(dim=1) + 1e-5)).double().cpu()
    return torch.where(torch.isfinite(value), value, torch.full_like(value, math.inf))


def _anderson_batched(xs, gs, lam, beta, mixing, fallback):
    """The Anderson update of `_anderson_step` for many least-squares problems at once: one per image (columns of
    the (S, B, ...) tensors), per (state, image), or one over everything; groups whose coefficients are not finite
    take the Picard step `fallback`."""
    n = len(xs)
    if n == 1:
        return xs[0] + beta * gs[0]
    S, B = gs[0].shape[:2]
    G = torch.stack(gs).double()  # (n, S, B, ...)
    if mixing == "image":
        G = G.transpose(1, 2).reshape(n, B, -1).transpose(0, 1)  # (B, n, D)
    elif mixing == "state":
        G = G.reshape(n, S * B, -1).transpose(0, 1)  # (S·B, n, D)
    else:
        G = G.reshape(1, n, -1)
    gram = G @ G.transpose(1, 2)  # (K, n, n)
    scale = gram[:, -1, -1].clamp_min(1e-300)
    K = len(gram)
    H = torch.zeros(K, n + 1, n + 1, dtype=torch.float64, device=G.device)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    H[:, 1:, 1:] = gram / scale[:, None, None] + lam * torch.eye(n, dtype=torch.float64, device=G.device)
    rhs = torch.zeros(K, n + 1, 1, dtype=torch.float64, device=G.device)
    rhs[:, 0] = 1
    alpha = _bordered_solve(H, rhs)[:, 1:, 0]  # (K, n)
    ok = torch.isfinite(alpha).all(1) & torch.isfinite(gram).flatten(1).all(1)
    alpha = torch.where(ok[:, None], alpha, torch.zeros_like(alpha))
    # Back to (n, S, B, 1, ...) weights.
    if mixing == "image":
        weights = alpha.T[:, None, :]
        good = ok[None, :]
    elif mixing == "state":
        weights = alpha.T.reshape(n, S, B)
        good = ok.reshape(S, B)
    else:
        weights = alpha.T[:, :, None].expand(n, 1, 1)
        good = ok.reshape(1, 1)
    extra = (1,) * (gs[0].dim() - 2)
    weights = weights.reshape(n, *weights.shape[1:], *extra).to(xs[0].dtype)
    new = sum(w * (x + beta * g) for w, x, g in zip(weights, xs, gs))
    good = good.reshape(*good.shape, *extra).to(new.device) & torch.isfinite(new)
    return torch.where(good, new, fallback)
