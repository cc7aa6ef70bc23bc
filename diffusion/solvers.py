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


def _anderson_step(xs, gs, lam, beta):
    """x_new = Σ α_i (x_i + β g_i) with α = argmin ‖Σ α_i g_i‖² + λ' ‖α‖², Σ α_i = 1 [AA Sec. 2, DEQ's bordered
    system]. λ' = λ · ‖g_newest‖²: relative to the current residual, so the ridge is scale-free and stays small as
    the iteration converges (the release adds λ to GGᵀ as is, which dominates once ‖g‖² ≲ λ and stalls there).
    The system is solved by pseudo-inverse, so a singular one (λ = 0 with repeated residuals) gives the
    minimum-norm α; None (a Picard step) when nothing finite comes out."""
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
    alpha = (torch.linalg.pinv(H, rtol=1e-10, hermitian=True) @ rhs)[1:]
    if not torch.isfinite(alpha).all():
        return None
    alpha = alpha.to(xs[0].dtype)
    x_new = sum(a * (x + beta * g) for a, x, g in zip(alpha, xs, gs))
    return x_new if torch.isfinite(x_new).all() else None
