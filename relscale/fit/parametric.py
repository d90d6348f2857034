"""Chinchilla approach 3: fit L(N, D) = E + A / N**alpha + B / D**beta to every (N, D, loss) point.

Following Hoffmann et al. (2022) and Epoch AI's replication (Besiroglu et al. 2024): parameters
a = ln A, b = ln B, e = ln E, alpha, beta; prediction ln L_hat = LSE(a - alpha ln N, b - beta ln D, e);
objective = SUM (not mean) of Huber(delta=1e-3) of (ln L_hat - ln L); L-BFGS-B with the analytic
gradient, started from a grid of points. The whole grid is scored first (cheap, vectorised) and
the optimiser runs from the best `n_starts` grid points; n_starts=None runs from all of them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import huber, logsumexp

from relscale.errors import DataError

from ._threads import single_threaded_blas
from .bootstrap import percentile_interval, resample_counts
from .diagnostics import ConvergenceWarning, EdgeOfRangeWarning, warn

PARAM_NAMES = ("a", "b", "e", "alpha", "beta")

# Hoffmann et al. / Epoch grid of initialisations (4,500 points).
DEFAULT_GRID: dict[str, np.ndarray] = {
    "a": np.arange(0.0, 30.0, 5.0),
    "b": np.arange(0.0, 30.0, 5.0),
    "e": np.arange(-1.0, 1.5, 0.5),
    "alpha": np.arange(0.0, 2.5, 0.5),
    "beta": np.arange(0.0, 2.5, 0.5),
}

# Box for L-BFGS-B: wide enough never to bind on sensible data; a parameter that ends on it is
# reported (at_bound) because its value is then a property of the box, not of the data.
BOUNDS: dict[str, tuple[float, float]] = {
    "a": (-20.0, 60.0),
    "b": (-20.0, 60.0),
    "e": (-10.0, 5.0),
    "alpha": (0.0, 5.0),
    "beta": (0.0, 5.0),
}


def _predict_log(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """ln L_hat for theta of shape (5,) or (K, 5); returns (M,) or (K, M)."""
    theta = np.asarray(theta, dtype=float)
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e + 0 * log_n), axis=-1)
    return logsumexp(terms, axis=-1)


def _objective_and_grad(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, w: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    a, b, e, alpha, beta = theta
    t1 = a - alpha * log_n
    t2 = b - beta * log_d
    # log-sum-exp of (t1, t2, e) by hand: this runs thousands of times per fit.
    top = np.maximum(np.maximum(t1, t2), e)
    x1, x2, x3 = np.exp(t1 - top), np.exp(t2 - top), np.exp(e - top)
    total = x1 + x2 + x3
    r = top + np.log(total) - log_l
    value = float(w @ huber(delta, r))
    # d huber / d r = r clipped to [-delta, delta]; d pred / d t_i = softmax weight x_i / total.
    dr = w * np.clip(r, -delta, delta) / total
    g1, g2 = dr * x1, dr * x2
    return value, np.array([g1.sum(), g2.sum(), dr @ x3, -(g1 @ log_n), -(g2 @ log_d)])


def _minimise(theta0, log_n, log_d, log_l, w, delta, maxiter, restarts: int = 3):
    # Scale by 1/delta so the objective is O(1): L-BFGS-B's ftol is relative to max(|f|, 1), and
    # a raw objective of ~1e-3 would otherwise stop it early.
    scale = 1.0 / delta

    def fun(theta):
        v, g = _objective_and_grad(theta, log_n, log_d, log_l, w, delta)
        return v * scale, g * scale

    bounds = [BOUNDS[k] for k in PARAM_NAMES]
    options = {"maxiter": maxiter, "ftol": 1e-13, "gtol": 1e-9, "maxcor": 20}
    res = minimize(fun, theta0, jac=True, method="L-BFGS-B", bounds=bounds, options=options)
    # The Huber kinks can make a line search fail ("ABNORMAL") next to the optimum; restarting
    # from there with a fresh curvature memory usually finishes the job.
    for _ in range(restarts):
        if res.success:
            break
        again = minimize(fun, res.x, jac=True, method="L-BFGS-B", bounds=bounds, options=options)
        if again.fun > res.fun:
            break
        res = again
    if not res.success and _stationary(res, bounds):
        # Checked against BFGS and Nelder-Mead on Epoch's data: such points are the optimum to 1e-14.
        res.success = True
        res.message = f"line search stalled at a stationary point (max |grad| {np.abs(res.jac).max():.1e})"
    return res


def _stationary(res, bounds, tol: float = 1e-4) -> bool:
    """Projected gradient of the (scaled, O(1)) objective below tol: nowhere left to go."""
    lower = np.array([b[0] for b in bounds])
    upper = np.array([b[1] for b in bounds])
    grad = np.asarray(res.jac, dtype=float).copy()
    grad[(res.x <= lower) & (grad > 0)] = 0  # pushing into a bound is not a descent direction
    grad[(res.x >= upper) & (grad < 0)] = 0
    return bool(np.all(np.isfinite(grad)) and np.abs(grad).max() < tol)


@dataclass(frozen=True)
class ParametricFit:
    """L(N, D) = E + A / N**alpha + B / D**beta, fitted as described in the module docstring.

    Compute-optimal allocation for C = k N D (k = flops_per_param_token, 6 for 6ND training FLOPs):
    N_opt(C) = G (C/k)**a_opt, D_opt(C) = (C/k)**b_opt / G, G = (alpha A / (beta B))**(1/(alpha+beta)),
    a_opt = beta / (alpha + beta), b_opt = alpha / (alpha + beta).
    ci maps each of E, A, B, alpha, beta, G, a_opt, b_opt to a percentile bootstrap interval.
    """

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # summed Huber of ln-loss residuals at the optimum
    converged: bool
    message: str
    n_points: int
    delta: float
    n_starts: int
    at_bound: tuple[str, ...]  # parameters that ended on their L-BFGS-B bound
    flops_per_param_token: float
    n_boot: int
    n_boot_failed: int
    level: float
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    # compute of the sampled points (k N D) where the implied N_opt lies outside the sampled N range
    optimum_outside_range: tuple[float, ...] = ()
    boot_draws: np.ndarray | None = field(default=None, repr=False)  # (n_boot, 5) a, b, e, alpha, beta

    @property
    def theta(self) -> np.ndarray:
        return np.array([np.log(self.A), np.log(self.B), np.log(self.E), self.alpha, self.beta])

    @property
    def G(self) -> float:
        return float((self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta)))

    @property
    def a_opt(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b_opt(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def predict(self, n: np.ndarray | float, d: np.ndarray | float) -> np.ndarray:
        n, d = np.asarray(n, dtype=float), np.asarray(d, dtype=float)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    def n_opt(self, flops: np.ndarray | float) -> np.ndarray:
        return self.G * (np.asarray(flops, dtype=float) / self.flops_per_param_token) ** self.a_opt

    def d_opt(self, flops: np.ndarray | float) -> np.ndarray:
        return (np.asarray(flops, dtype=float) / self.flops_per_param_token) ** self.b_opt / self.G

    def summary(self) -> dict[str, float]:
        out = {
            "E": self.E,
            "A": self.A,
            "B": self.B,
            "alpha": self.alpha,
            "beta": self.beta,
            "G": self.G,
            "a_opt": self.a_opt,
            "b_opt": self.b_opt,
        }
        return out


def _derived(theta: np.ndarray) -> np.ndarray:
    """(…, 5) a, b, e, alpha, beta -> (…, 8) E, A, B, alpha, beta, G, a_opt, b_opt."""
    a, b, e, alpha, beta = np.moveaxis(theta, -1, 0)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = alpha + beta
        log_g = (np.log(alpha) + a - np.log(beta) - b) / s
        return np.stack(
            [np.exp(e), np.exp(a), np.exp(b), alpha, beta, np.exp(log_g), beta / s, alpha / s], -1
        )


DERIVED_NAMES = ("E", "A", "B", "alpha", "beta", "G", "a_opt", "b_opt")


def fit_parametric(
    params: np.ndarray,
    tokens: np.ndarray,
    loss: np.ndarray,
    *,
    delta: float = 1e-3,
    grid: dict[str, np.ndarray] | None = None,
    n_starts: int | None = 64,
    n_boot: int = 0,
    seed: int = 0,
    level: float = 0.95,
    flops_per_param_token: float = 6.0,
    maxiter: int = 20_000,
    keep_draws: bool = False,
) -> ParametricFit:
    """Fit E + A/N**alpha + B/D**beta to points (params N, tokens D, loss), see the module docstring.

    n_boot > 0 adds a bootstrap: points resampled with replacement, each replicate refitted from the
    full-data optimum (one L-BFGS-B run per draw).
    """
    n, d, l = (np.asarray(v, dtype=float) for v in (params, tokens, loss))
    if not (n.shape == d.shape == l.shape) or n.ndim != 1:
        raise DataError(f"params, tokens, loss must be 1-d of one length: {n.shape}, {d.shape}, {l.shape}")
    bad = ~(np.isfinite(n) & np.isfinite(d) & np.isfinite(l) & (n > 0) & (d > 0) & (l > 0))
    if bad.any():
        raise DataError(
            f"params, tokens and loss must be finite and > 0; bad rows: {np.flatnonzero(bad)[:20]}"
        )
    log_n, log_d, log_l = np.log(n), np.log(d), np.log(l)
    if log_n.size < 5:
        raise DataError(f"need at least 5 points to fit 5 parameters, got {log_n.size}")
    grid = DEFAULT_GRID if grid is None else grid
    starts = np.array(list(itertools.product(*(np.asarray(grid[k], float) for k in PARAM_NAMES))))
    w = np.ones_like(log_n)

    # Score the whole grid in chunks (K x M work), then optimise from the best starts.
    scores = np.concatenate(
        [
            (w * huber(delta, _predict_log(chunk, log_n, log_d) - log_l)).sum(-1)
            for chunk in np.array_split(starts, max(1, len(starts) // 512))
        ]
    )
    order = np.argsort(scores, kind="stable")
    chosen = starts[order if n_starts is None else order[:n_starts]]
    best = None
    with single_threaded_blas():
        for theta0 in chosen:
            res = _minimise(theta0, log_n, log_d, log_l, w, delta, maxiter)
            if best is None or res.fun < best.fun:
                best = res
    theta = best.x
    objective = best.fun * delta
    converged = bool(best.success)
    if not converged:
        warn(ConvergenceWarning, f"approach-3 fit did not converge from its best start: {best.message}")
    at_bound = tuple(
        name
        for name, value in zip(PARAM_NAMES, theta)
        if np.isclose(value, BOUNDS[name][0], atol=1e-6) or np.isclose(value, BOUNDS[name][1], atol=1e-6)
    )
    if at_bound:
        warn(
            EdgeOfRangeWarning,
            f"approach-3 parameters {at_bound} ended on their bounds {BOUNDS}; "
            "their values are set by the box, not the data",
        )

    ci: dict[str, tuple[float, float]] = {}
    draws = np.full((n_boot, 5), np.nan)
    if n_boot > 0:
        counts = resample_counts(np.random.default_rng(seed), log_n.size, n_boot).astype(float)
        with single_threaded_blas():
            for i in range(n_boot):
                res = _minimise(theta, log_n, log_d, log_l, counts[i], delta, maxiter)
                if res.success:
                    draws[i] = res.x
        derived = _derived(draws)
        lo, hi = percentile_interval(derived, level, axis=0)
        ci = {name: (float(lo[j]), float(hi[j])) for j, name in enumerate(DERIVED_NAMES)}
    n_failed = int(np.isnan(draws[:, 0]).sum())
    if n_failed:
        warn(
            ConvergenceWarning,
            f"{n_failed} of {n_boot} approach-3 bootstrap refits did not converge "
            "and were left out of the intervals",
        )
    a, b, e, alpha, beta = (float(v) for v in theta)
    outside = _optimum_outside_range(theta, n, d, flops_per_param_token)
    if outside:
        warn(
            EdgeOfRangeWarning,
            f"the approach-3 compute-optimal N_opt(C) lies outside the sampled model sizes "
            f"at compute {[f'{c:.3g}' for c in outside[:10]]}: the allocation there is an extrapolation",
        )
    return ParametricFit(
        E=float(np.exp(e)),
        A=float(np.exp(a)),
        B=float(np.exp(b)),
        alpha=alpha,
        beta=beta,
        objective=float(objective),
        converged=converged,
        message=str(best.message),
        n_points=int(log_n.size),
        delta=delta,
        n_starts=len(chosen),
        at_bound=at_bound,
        flops_per_param_token=flops_per_param_token,
        n_boot=n_boot,
        n_boot_failed=n_failed,
        level=level,
        ci=ci,
        optimum_outside_range=outside,
        boot_draws=draws if keep_draws else None,
    )


def _optimum_outside_range(theta: np.ndarray, n: np.ndarray, d: np.ndarray, k: float) -> tuple[float, ...]:
    """IsoFLOP budgets (points clustered by k N D) of 3+ points whose N_opt lies outside their N range."""
    from .isoflop import snap_budgets

    _, _, _, _, _, g, a_opt, _ = _derived(theta)
    if not np.isfinite(g):
        return ()
    budgets = snap_budgets(k * n * d, report=False)
    outside = []
    for c in np.unique(budgets):
        members = n[budgets == c]
        n_opt = g * (c / k) ** a_opt
        if members.size >= 3 and not members.min() <= n_opt <= members.max():
            outside.append(float(c))
    return tuple(outside)
