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
    """`x`: the iterate with the lowest residual; `fx`: f(x) of that iterate, already evaluated (one Picard step
    further: the better answer where f contracts; for a DDIM chain, one more state exact); `residuals[k]`: relative
    residual of the k-th evaluated iterate; `num_iterations`: iterations run; `num_evaluations`: evaluations of f (for
    the DDIM solvers: network evaluations per sample, i.e. states evaluated); `converged`: the tolerance was
    reached."""
    x: torch.Tensor
    residuals: list = field(default_factory=list)
    num_iterations: int = 0
    num_evaluations: int = 0
    converged: bool = False
    fx: torch.Tensor = None


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
    result.fx = x0 if best_fx is None else best_fx
    return result


def _bordered_solve(H, rhs):
    """Solutions of the bordered systems H (K, n+1, n+1) · a = rhs (K, n+1, 1), without reading anything back to the
    host: a direct solve (λ > 0 keeps them regular however different the residuals' magnitudes are), and where a
    system is singular or nearly so (λ = 0 with repeated residuals: no solution, or mixing weights beyond ±1e3, a wild
    extrapolation) the solution with a ridge of 1e-6 added to the α block, the minimum-norm α to that precision. (A
    pseudo-inverse would need an eigendecomposition that checks its result on the host; it also truncates the ridge
    block as soon as old residuals dwarf the newest, ‖g‖² ratios of 1e10 and more, which sends the iterate off to a
    residual of ~1.)"""
    a, info = torch.linalg.solve_ex(H, rhs)
    bad = (info != 0) | ~torch.isfinite(a).flatten(1).all(1) | (a[:, 1:].flatten(1).abs().amax(1) > 1e3)
    ridge = torch.ones(H.shape[-1], dtype=H.dtype, device=H.device)
    ridge[0] = 0
    fallback, _ = torch.linalg.solve_ex(H + 1e-6 * torch.diag(ridge), rhs)
    return torch.where(bad[:, None, None], fallback, a)


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


MIXINGS = ("image", "state", "global")  # parallel DDIM's; solve_batched takes the first two ("global" is `solve`)
SYNC_EVERY_GPU = 2  # solve_batched's reads of the device on a GPU: every 2nd iteration (see its docstring)


@dataclass
class BatchedSolverResult(SolverResult):
    """`SolverResult` of `solve_batched`, per image as well: `image_residuals[b]` is image b's residual history,
    `image_evaluations[b]` how many times f evaluated it until it converged, `image_converged[b]` whether it reached
    the tolerance. `residuals[k]` is the largest residual among the images still iterating at the k-th iteration
    that had one; `num_iterations` counts every evaluation of f, `masked_evaluations` the image evaluations spent on
    images that had converged but were still in the batch, waiting for the next read (0 with sync_every = 1);
    `host_reads` how often the loop read the device. `fx` holds f(x) of the best iterate of each image (no extra
    evaluation; x0 for an image whose every evaluation was not finite)."""
    image_residuals: list = field(default_factory=list)
    image_evaluations: list = field(default_factory=list)
    image_converged: list = field(default_factory=list)
    masked_evaluations: int = 0
    host_reads: int = 0


def solve_batched(f, x0, method="anderson", max_iter=15, tol=1e-3, m=5, lam=1e-3, beta=1.0, mixing="image",
                  callback=None, sync_every=None):
    """Solve x_b = f(x)_b for every image b of x0 (S, B, ...) — S states per image, e.g. the T' states of a DDIM
    chain — each on its own: per-image relative residuals and stopping, and converged images frozen, so an image's
    result does not depend on what else is in its batch. f(x, idx) evaluates the images `idx` (a LongTensor on x0's
    device) from their iterates x (S, len(idx), ...). Anderson [AA] mixes with one set of coefficients per image
    ("image") or per state of each image ("state", as DEQ-DDIM's release does); the least-squares problems are
    solved together (batched). As `solve`: best iterate per image, a Picard step where a least-squares solution is
    not finite, a restart from the best f(x), with a fresh history, for an image whose f is not finite.

    Host reads: everything an iteration decides (residuals, stopping, best iterate, restarts, Anderson's history
    and least squares) stays on the device with fixed shapes: the history is a ring of m slots with a validity mask
    and a Gram matrix updated one row per iteration, and an image that converges is masked (still evaluated, its
    iterate and result frozen). The loop reads the device once every `sync_every` iterations (default: every
    iteration on the CPU, where a read costs nothing; SYNC_EVERY_GPU on a GPU) to stop, to report and to drop
    converged images from the batch; the iterations in between queue up without the host waiting, and one of them
    can be captured as a CUDA graph. Per image, the results do not depend on sync_every; it trades waiting for the
    host against evaluations of images that have already converged (`masked_evaluations`)."""
    if method not in ("anderson", "picard"):
        raise ValueError(f"unknown solver {method!r}; use 'anderson' or 'picard'")
    if mixing not in MIXINGS[:2]:
        raise ValueError(f"unknown mixing {mixing!r} for per-image solving; use image or state (one solve over the "
                         f"whole batch is solvers.solve)")
    if max_iter < 1 or m < 1:
        raise ValueError("max_iter and m must be >= 1")
    device = x0.device
    sync_every = (1 if device.type == "cpu" else SYNC_EVERY_GPU) if sync_every is None else int(sync_every)
    if sync_every < 1:
        raise ValueError("sync_every must be >= 1")
    batch = x0.shape[1]
    best_x, best_fx = x0.clone(), x0.clone()
    result = BatchedSolverResult(x=best_x, image_residuals=[[] for _ in range(batch)],
                                 image_evaluations=[0] * batch, image_converged=[False] * batch)
    active = list(range(batch))  # on the host: the images in the batch, in order
    s = _BatchState(x0, m if method == "anderson" else 0, mixing, lam)
    norms = (0, *range(2, x0.dim()))  # each image's S states and values
    pending = []  # (iteration, residual, live) since the last read
    for i in range(max_iter):
        fx = f(s.x, s.idx)
        diff = fx - s.x
        residual = torch.nan_to_num(  # float64 per image; not finite -> inf
            torch.linalg.vector_norm(diff, dim=norms, dtype=torch.float64) /
            (torch.linalg.vector_norm(fx, dim=norms, dtype=torch.float64) + 1e-5), nan=math.inf, posinf=math.inf)
        live = s.live
        improved = live & (residual < s.best)
        s.best = torch.where(improved, residual, s.best)
        s.best_x = _per_image_where(improved, s.x, s.best_x)
        s.best_fx = _per_image_where(improved, fx, s.best_fx)
        s.live = live & (residual >= tol)  # frozen from here on: x, best iterate and history stay as they are
        pending.append((i, residual, live))
        if i < max_iter - 1:
            # Where f was not finite: restart from the best f(x) (x0 if none), with a fresh history. (Everything
            # here is also computed for frozen images; their results no longer change.)
            finite = residual != math.inf
            fx = _per_image_where(finite, fx, s.best_fx)
            new = fx if method == "picard" else s.anderson(i % m, diff, fx, finite, beta)
            s.x = _per_image_where(s.live, new, s.x)
        if len(pending) == sync_every or i == max_iter - 1:
            done = _read(pending, s.live, active, result, callback)  # converged, per batch position
            pending = []
            if all(done) or i == max_iter - 1:
                break
            if any(done):  # the converged images leave the batch
                s.save(best_x, best_fx)
                active = [b for b, d in zip(active, done) if not d]
                s.keep(torch.tensor([j for j, d in enumerate(done) if not d], device=device))
    s.save(best_x, best_fx)
    result.x, result.fx = best_x, best_fx
    result.converged = all(result.image_converged)
    result.num_evaluations = max(result.image_evaluations)
    return result


class _BatchState:
    """What `solve_batched` keeps on the device for the A images still in the batch: iterates x (S, A, ...),
    converged flags, best residual, best iterate and its f(x); for Anderson, a ring of m history slots per
    least-squares group (K = A groups of S·D values for "image" mixing, K = S·A groups of D for "state"): residuals
    g (float64, for the Gram matrix) and x + β g (the points the update combines), their Gram matrix (K, m, m) and
    which slots are valid (K, m)."""

    def __init__(self, x0, m, mixing, lam):
        batch, device = x0.shape[1], x0.device
        self.mixing, self.states = mixing, x0.shape[0]
        self.idx = torch.arange(batch, device=device)
        self.x, self.best_x, self.best_fx = x0.clone(), x0.clone(), x0.clone()
        self.live = torch.ones(batch, dtype=torch.bool, device=device)
        self.best = torch.full((batch,), math.inf, dtype=torch.float64, device=device)
        groups = self.grouped(x0)
        self.hist_g = torch.zeros(len(groups), m, *groups.shape[1:], dtype=torch.float64, device=device)
        self.hist_y = x0.new_zeros(len(groups), m, *groups.shape[1:])
        self.gram = torch.zeros(len(groups), m, m, dtype=torch.float64, device=device)
        self.valid = torch.zeros(len(groups), m, dtype=torch.bool, device=device)
        self.eye = torch.eye(m, dtype=torch.float64, device=device)
        self.ridge = lam * self.eye

    def grouped(self, t):
        """(S, A, ...) -> (K, ...): the values of each least-squares group (a view)."""
        return t.transpose(0, 1) if self.mixing == "image" else t.flatten(0, 1)

    def ungrouped(self, t):
        return t.transpose(0, 1) if self.mixing == "image" else t.unflatten(0, (self.states, -1))

    def per_group(self, flags):
        """(A,) image flags -> (K,) group flags."""
        return flags if self.mixing == "image" else flags.repeat(self.states)

    def anderson(self, slot, g, fx, finite, beta):
        """The next iterate: Σ α_j (x_j + β g_j) over the valid history with α = argmin ‖Σ α_j g_j‖² + λ' ‖α‖²,
        Σ α_j = 1, per group (`_anderson_step`'s update); fx (the restart point) where an image's f was not
        `finite` (its history starts over) and where its coefficients are not finite (a Picard step)."""
        x = self.x
        self.hist_g[:, slot] = self.grouped(g)
        torch.lerp(self.grouped(x), self.grouped(fx), beta, out=self.hist_y[:, slot])
        row = torch.bmm(self.hist_g.flatten(2), self.hist_g[:, slot].flatten(1)[:, :, None])[:, :, 0]  # (K, m)
        self.gram[:, slot, :] = row
        self.gram[:, :, slot] = row
        self.valid[:, slot] = True
        self.valid &= self.per_group(finite)[:, None]
        alpha, ok = _anderson_weights(self.gram, self.valid, slot, self.ridge, self.eye)
        # in the iterates' dtype also where the solver runs inside an autocast network call (FPDM's layer under
        # --precision bf16): a bf16 mix would floor the residual near 1e-3
        with torch.autocast(x.device.type, enabled=False):
            new = torch.bmm(alpha[:, None, :].to(self.hist_y.dtype), self.hist_y.flatten(2))[:, 0]
        new = self.ungrouped(new.view(self.hist_y[:, 0].shape))
        trailing = (1,) * (x.dim() - 2)
        use = ok.view(1 if self.mixing == "image" else self.states, -1, *trailing) & finite.view(1, -1, *trailing)
        return torch.where(use, new, fx)

    def save(self, best_x, best_fx):
        """Copy the batch's best iterates into the full (S, B, ...) results."""
        best_x.index_copy_(1, self.idx, self.best_x)
        best_fx.index_copy_(1, self.idx, self.best_fx)

    def keep(self, rows):
        """Keep only the batch positions `rows` (a LongTensor)."""
        before = len(self.idx)
        self.idx, self.live, self.best = self.idx[rows], self.live[rows], self.best[rows]
        self.x, self.best_x, self.best_fx = self.x[:, rows], self.best_x[:, rows], self.best_fx[:, rows]
        if self.mixing == "image":
            groups = rows
        else:  # group s·A + a for state s of image a
            groups = (torch.arange(self.states, device=rows.device)[:, None] * before + rows[None]).flatten()
        self.hist_g, self.hist_y = self.hist_g[groups], self.hist_y[groups]
        self.gram, self.valid = self.gram[groups], self.valid[groups]


def _anderson_weights(gram, valid, newest, ridge, eye):
    """Anderson's coefficients for K groups from their Gram matrices (K, n, n) of the history's residuals, of which
    `valid` (K, n) says which slots hold one (the others get weight 0): α = w / Σ w with (GGᵀ/s + ridge) w = 1 on the
    valid slots, s = ‖g_newest‖² — the constrained least squares of `_anderson_step` (its bordered system's
    solution). A singular system (λ = 0 with repeated residuals) or wild weights (beyond ±1e3) take the solution
    with a ridge of 1e-6 (the minimum-norm α to that precision); `ok` (K,) is False where neither is finite."""
    pair = valid[:, :, None] & valid[:, None, :]  # entries of invalid slots may be stale or NaN: replaced below
    scale = gram[:, newest, newest].clamp_min(1e-300)
    system = torch.where(pair, gram / scale[:, None, None] + ridge, eye)
    rhs = valid.double()[:, :, None]
    w, info = torch.linalg.solve_ex(system, rhs)
    alpha = w[:, :, 0] / w[:, :, 0].sum(1, keepdim=True)
    bad = (info != 0) | ~(alpha.abs().amax(1) <= 1e3)  # NaN compares False
    w, _ = torch.linalg.solve_ex(system + 1e-6 * eye, rhs)
    alpha = torch.where(bad[:, None], w[:, :, 0] / w[:, :, 0].sum(1, keepdim=True), alpha)
    ok = torch.isfinite(alpha).all(1)
    return torch.where(ok[:, None], alpha, 0.0), ok
def _read(pending, live, active, result, callback):
    """The one read of the device per `sync_every` iterations: the residuals of those iterations, which images were
    live (not yet converged) in each, and which are live now; recorded per image (and reported to `callback`).
    Returns, per batch position, whether it has stopped iterating (converged), as host booleans."""
    k, size = len(pending), len(active)
    packed = torch.cat([torch.stack([r for _, r, _ in pending]).flatten(),
                        torch.stack([was for _, _, was in pending] + [live]).flatten().double()])
    values = packed.tolist()
    result.host_reads += 1
    residuals, lives, now = values[:k * size], values[k * size:2 * k * size], values[2 * k * size:]
    for j, (i, _, _) in enumerate(pending):
        row = [(b, residuals[j * size + p]) for p, b in enumerate(active) if lives[j * size + p]]
        result.num_iterations = i + 1
        result.masked_evaluations += size - len(row)
        if not row:
            continue
        for b, r in row:
            result.image_residuals[b].append(r)
            result.image_evaluations[b] += 1
        result.residuals.append(max(r for _, r in row))
        if callback is not None:
            callback({"i": i, "residual": result.residuals[-1], "active": len(row)})
    stopped = [not v for v in now]
    for b, d in zip(active, stopped):
        result.image_converged[b] = result.image_converged[b] or d
    return stopped


def _per_image_where(mask, a, b):
    """a where mask (one flag per image: (A,) over (S, A, ...) tensors), else b."""
    return torch.where(mask.view(1, -1, *(1,) * (a.dim() - 2)), a, b)
