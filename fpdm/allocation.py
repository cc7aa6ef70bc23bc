"""Budget-aware allocation of FPDM's fixed-point iterations over the sampling steps.

`BudgetAllocator` spends a GIVEN total of iterations exactly, deciding online, step by step, how many each sampling
step gets from the residuals it observes (the FPDM paper's stated future work). `sampling.GuidedModel` takes one as
its `iterations_per_step`; sample.py exposes it as `--fp-allocation budget` with `--budget-block-evals`, and with
per-step weights measured by `sampling.calibrate_step_weights` as `--fp-allocation calibrated`.
"""

import math

import numpy as np

RHO_RANGE = (1e-6, 1.0 - 1e-6)  # contraction-rate estimates are kept strictly inside (0, 1)
TINY = 1e-30  # a residual of exactly 0 (converged) is read as this, so that logarithms stay finite


class BudgetAllocator:
    """Spend exactly `total_iterations` fixed-point iterations over `num_steps` model calls (sampling steps), one
    decision per call for the whole batch, taken online from the residuals observed.

    Objective. Write r_i(k) for step i's relative residual ||f(z) - z|| / ||z|| after k iterations. The allocator
    aims at the split that minimises Σ_i w_i r_i(k_i) subject to Σ_i k_i = B and k_i >= 1, with step weights w_i
    given in advance (`weights`; all 1 by default, or measured by `sampling.calibrate_step_weights`: how much the
    samples move per unit of residual removed at each step, which a residual alone cannot tell). For r_i convex and
    decreasing in k that optimum is greedy on marginal gains: there is a price λ such that every step runs exactly the
    iterations whose gain r_i(k - 1) - r_i(k) is at least λ. The allocator runs that rule with λ tuned online.

    What it sees. At step i: the residuals of steps < i and of step i's iterations so far; nothing of later steps.
    It models each step's residuals as geometric, r_i(k) = b_i ρ_i^(k-1) (b_i: the first iteration's residual; ρ_i:
    the geometric mean ratio of the step's residuals so far, or, after its first iteration only, the previous steps'
    level), and projects later steps' (log b, log ρ) from the last `window` steps: they are assumed to look like the
    recent ones (the mean level over the window, step 0 left out once a later step is seen: it starts cold, the others
    from the previous solution with reuse). After every iteration it sets λ by bisection so that the projected total (iterations spent,
    plus the current and later steps' counts at λ under the model) matches the budget, and continues while the
    predicted gain of the next iteration, w_i r_i(k) (1 - ρ_i), is at least λ. The first step's first iteration has
    nothing to predict from: a second follows when the cap allows; an iteration that did not lower the residual
    ends its step.

    Why a level, not a trend. With reuse, step 0 starts cold (b ≈ 6 on the experiments' FPDM), step 1 from step 0's
    solution (b ≈ 0.4) and the rest near 0.1–0.2. A least-squares line through the first two or three steps falls by
    a factor of ~10 per step and projects later residuals of 1e-8 and below: such a projection (tried, and deleted)
    spent 20–30 iterations on steps 1–3 and one on each of the rest, and lost 5–8 FID to every fixed schedule
    (docs/results.md, (c')). The level is exact when the steps share (b, ρ) and within one iteration per step of the
    offline optimum under slow drift (tests/test_allocation.py).

    Optimality. For residuals that follow the model the rule is the greedy optimum; step 0 is blind (it assumes the
    later steps behave like itself: a flat-like share). Real steps are not geometric (λ is re-tuned at every
    iteration) and, with reuse, interact: a step starts from the last one's solution and inherits what it left, a
    gain this rule does not credit to the earlier step.

    Exactness. Every step runs at least one iteration and at most what leaves one for each later step, and the last
    step runs all that is left, so the iterations spent always equal the budget, whatever the residuals do.

    Cost: the rule reads each residual on the host, one device sync per iteration (fixed schedules make none per
    step), and a bisection over the S steps per iteration on the host.

    Use: `next_step()` -> (cap, stop) before each call, `stop(stats)` after each iteration of the call (FPDM.solve's
    `stop`), `finish_step(iterations)` after the call. A sampler uses a fresh copy per batch (`restarted()`). The
    weights scale the gains, not the residual model: trends are fitted to the residuals themselves.
    """

    def __init__(self, total_iterations, num_steps, window=5, weights=None):
        if num_steps < 1:
            raise ValueError(f"need at least one sampling step, got {num_steps}")
        if total_iterations < num_steps:
            raise ValueError(f"an iteration budget of {total_iterations} is below one iteration per step for "
                             f"{num_steps} steps: raise the budget or use fewer steps")
        if window < 1:
            raise ValueError(f"the trend window must be >= 1 step, got {window}")
        if weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != num_steps or not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(f"step weights must be {num_steps} finite positive numbers (one per step), got "
                                 f"{len(weights)}: calibrate them for this number of steps (calibrate_step_weights)")
        self.total_iterations, self.num_steps, self.window = int(total_iterations), int(num_steps), int(window)
        self.weights = weights  # w_i of the objective Σ w_i r_i(k_i) (None: all 1)
        self.spent = []  # iterations of each finished step
        self.curves = []  # (step, b, ρ or None when the step ran one iteration) of each step that was observed
        self.lambdas = []  # the last λ of each finished step (None where no choice was made)
        self._residuals = None  # the running step's residuals, as floats
        self._lambda = None

    def restarted(self):
        """A new allocator with the same settings (one per batch)."""
        return BudgetAllocator(self.total_iterations, self.num_steps, self.window, self.weights)

    def to_dict(self):
        return {"allocator": "budget", "total_iterations": self.total_iterations, "num_steps": self.num_steps,
                "window": self.window, **({"weights": list(self.weights)} if self.weights is not None else {})}

    def weight(self, steps):
        """w_i of the objective at step(s) `steps` (1 without weights)."""
        if self.weights is None:
            return np.ones(np.shape(steps)) if np.ndim(steps) else 1.0
        return np.asarray(self.weights)[steps] if np.ndim(steps) else self.weights[steps]

    @property
    def remaining(self):
        """Iterations not yet spent by finished steps."""
        return self.total_iterations - sum(self.spent)

    def next_step(self):
        """(cap, stop) for the next model call: at most `cap` iterations, ended early when `stop(stats)` says so
        (None when there is no choice: the last step runs exactly the rest)."""
        i = len(self.spent)
        if i >= self.num_steps:
            raise ValueError(f"the budget allocator was made for {self.num_steps} model calls but the sampler made "
                             f"more: give it one step per model call")
        cap = self.remaining - (self.num_steps - i - 1)
        self._residuals, self._lambda = [], None
        return cap, (None if i == self.num_steps - 1 or cap == 1 else self._stop)

    def finish_step(self, iterations):
        """Close the running step, which ran `iterations` iterations."""
        i = len(self.spent)
        observed = self._residuals or []
        if observed:
            own_rho = self._own_rho(observed)
            self.curves.append((i, observed[0], own_rho))
        self.spent.append(int(iterations))
        self.lambdas.append(self._lambda)
        self._residuals, self._lambda = None, None

    def report(self):
        """The settings and the last price λ of each step (None: no choice was made), for compute reports."""
        return {**self.to_dict(), "lambda_per_step": list(self.lambdas)}

    # --------------------------------------------------------------------------------------------------------------
    # The rule
    # --------------------------------------------------------------------------------------------------------------

    def _stop(self, stats):
        """After each iteration of the running step: whether to end it (reads the newest residual: one sync)."""
        self._residuals.append(max(float(stats.residuals[-1]), TINY))
        i, observed = len(self.spent), self._residuals
        if len(observed) >= 2 and observed[-1] >= observed[-2]:
            return True  # the last iteration gained nothing: no rate to predict more gains from
        rho = self._own_rho(observed)
        if rho is None:
            rho = self._trend(i, observed[0])[1]
        if rho is None:
            return False  # the first step's first iteration: take a second to learn the rate
        self._lambda = self._price(rho)
        return self.weight(i) * observed[-1] * (1.0 - rho) < self._lambda

    @staticmethod
    def _own_rho(observed):
        if len(observed) < 2:
            return None
        rho = (observed[-1] / observed[0]) ** (1.0 / (len(observed) - 1))
        return min(max(rho, RHO_RANGE[0]), RHO_RANGE[1])

    def _trend(self, step, first_residual=None, steps=None):
        """(log b, ρ) projected at `steps` (default: `step`): the mean level of the last `window` observed steps
        (the running one's b included when given; step 0 left out once a later step is seen); ρ is None when no step
        has shown a rate yet."""
        points = self.curves + ([(step, first_residual, self._own_rho(self._residuals))]
                                if first_residual is not None else [])
        at = np.atleast_1d(step if steps is None else steps).astype(float)

        def level(pairs):
            if len(pairs) > 1:
                pairs = [p for p in pairs if p[0] != 0]  # step 0 starts cold: not what reused steps look like
            return np.full_like(at, np.mean([y for _, y in pairs[-self.window:]]))

        log_b = np.clip(level([(s, math.log(b)) for s, b, _ in points]), -69.0, 69.0)
        rates = [(s, math.log(r)) for s, _, r in points if r is not None]
        rho = np.clip(np.exp(level(rates)), *RHO_RANGE) if rates else None
        if steps is None:
            return float(log_b[0]), (None if rho is None else float(rho[0]))
        return log_b, rho

    def _price(self, rho):
        """λ such that the projected total matches the budget: the running step's iterations so far plus those
        whose predicted gain is >= λ, and for each later step one plus its iterations of gain >= λ."""
        i, observed = len(self.spent), self._residuals
        left = self.remaining  # what this step and the later ones may spend
        cap = left - (self.num_steps - i - 1)
        later = np.arange(i + 1, self.num_steps)
        gains = np.array([self.weight(i) * observed[-1] * (1.0 - rho)])  # the running step's next gain, its rate
        rates = np.array([rho])
        if len(later):
            log_b, later_rho = self._trend(i, observed[0], later)  # the residual model: weights are known apart
            gains = np.concatenate([gains, self.weight(later) * np.exp(log_b) * (1.0 - later_rho)])  # their 2nd
            rates = np.concatenate([rates, later_rho])
        limits = np.concatenate([[cap - len(observed)], np.full(len(later), left - 1)])
        base = len(observed) + len(later)

        def total(lam):
            more = np.floor(np.log(lam / gains) / np.log(rates)) + 1.0
            return base + np.minimum(np.where(gains >= lam, more, 0.0), limits).sum()

        lo, hi = math.log(max(gains.min(), TINY) * 1e-12), math.log(gains.max() * 2.0)
        if total(math.exp(lo)) <= left:
            return math.exp(lo)  # even the smallest price does not fill the budget: spend all that is allowed
        for _ in range(60):  # total(e^lo) > left >= total(e^hi); total falls as λ rises
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if total(math.exp(mid)) > left else (lo, mid)
        return math.exp(hi)
