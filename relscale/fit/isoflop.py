"""Chinchilla approach 2: IsoFLOP parabolas, their minima, and compute-optimal frontier power laws.

Per budget C, loss is fitted as a quadratic in u = log10 N (or log10 D): plain least squares, or a
robust fit (scipy.optimize.least_squares with a soft_l1 / huber loss). The vertex gives N*, D*, L*.
D* (resp. N*) is read off the budget's own points: on an IsoFLOP line log D is linear in log N
(exactly so when C = k N D), so a line through the points is evaluated at the vertex, with no
assumption on k. Bootstrap: points are resampled within each budget, each budget independently.
Frontier laws N* = a C**alpha, D* = b C**beta, L* = l C**lambda are log-log lines over budgets; their
intervals refit the line on every bootstrap draw of the minima.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from relscale.errors import DataError

from ._threads import single_threaded_blas
from .bootstrap import percentile_interval, resample_counts
from .diagnostics import BudgetSnapWarning, ConcaveFitWarning, DroppedDataWarning, EdgeOfRangeWarning, warn
from .io import FitData
from .powerlaw import PowerLawFit, fit_power_law

ROBUST_LOSSES = (None, "soft_l1", "huber", "cauchy", "arctan")


@dataclass(frozen=True)
class BudgetFit:
    """The parabola loss = c2 u**2 + c1 u + c0, u = log10(x) - center, of one IsoFLOP budget."""

    budget: float
    n_points: int
    fit_var: str  # "params" or "tokens": the x of the parabola
    coeffs: tuple[float, float, float]  # (c2, c1, c0)
    center: float
    objective: float  # sum of squared residuals (plain) or robust cost (least_squares .cost)
    converged: bool
    concave: bool  # opens downward: no minimum
    at_edge: bool  # vertex outside, or within edge_fraction of an end of, the sampled x range
    x_range: tuple[float, float]
    n_opt: float
    d_opt: float
    loss_opt: float
    n_opt_ci: tuple[float, float]
    d_opt_ci: tuple[float, float]
    loss_opt_ci: tuple[float, float]
    n_boot_failed: int  # draws with < 3 distinct points or a concave parabola
    boot_outside: float = 0.0  # share of fitted draws whose minimum is missing or outside the sampled range
    n_boot: int = 0  # bootstrap draws asked for

    @property
    def boot_failed(self) -> float:
        """Share of the bootstrap draws that gave no parabola with a minimum."""
        return self.n_boot_failed / self.n_boot if self.n_boot else 0.0

    @property
    def unreliable(self) -> bool:
        """The interval leans on extrapolated minima, or on the few draws that gave a minimum at all
        (shares above EXTRAPOLATION_LIMIT and FAILED_LIMIT)."""
        return self.boot_outside > EXTRAPOLATION_LIMIT or self.boot_failed > FAILED_LIMIT

    def curve(self, x: np.ndarray) -> np.ndarray:
        u = np.log10(np.asarray(x, dtype=float)) - self.center
        c2, c1, c0 = self.coeffs
        return c2 * u * u + c1 * u + c0


@dataclass(frozen=True)
class IsoFlopResult:
    """Result of :func:`fit_isoflop` (Chinchilla approach 2, Hoffmann et al. 2022): one parabola fit
    per budget and the frontier laws N* = a C^b, D* and L* against the budgets C (in
    ``budget_convention`` FLOPs) with bootstrap intervals at ``level``; ``frontier_budgets`` are
    the budgets the laws were fitted on."""
    budgets: tuple[BudgetFit, ...]
    n_opt_law: PowerLawFit | None  # N* = coef * C**exponent
    d_opt_law: PowerLawFit | None
    loss_law: PowerLawFit | None  # L* = coef * C**exponent
    fit_var: str
    robust: str | None
    budget_convention: str  # FLOP convention of the budgets C
    frontier_budgets: tuple[float, ...]  # budgets used for the frontier laws
    n_boot: int
    level: float
    seed: int
    group: str | None = None  # the group whose loss was fitted (None: a single loss or the mean over groups)

    @property
    def any_edge(self) -> bool:
        return any(b.at_edge for b in self.budgets)

    @property
    def any_concave(self) -> bool:
        return any(b.concave for b in self.budgets)

    @property
    def frontier_flag(self) -> str | None:
        """Why the frontier laws are not a result (None when they are): fewer than 3 usable budgets
        (an interior minimum whose bootstrap rarely extrapolates), or a budget in the frontier whose
        minimum is at the edge or whose bootstrap extrapolates in more than EXTRAPOLATION_LIMIT of draws."""
        used = [b for b in self.budgets if b.budget in self.frontier_budgets]
        usable = [b for b in used if not b.at_edge and not b.unreliable]
        if len(usable) < 3:
            return (
                f"{len(usable)} of {len(self.budgets)} budgets have a measured minimum (interior, bootstrap "
                "inside the sampled range and mostly fitted): at least 3 are needed"
            )
        edge = ", ".join(f"{b.budget:.3g}" for b in used if b.at_edge)
        wild = ", ".join(f"{b.budget:.3g}" for b in used if b.unreliable)
        reasons = []
        if edge:
            reasons.append(f"minimum at the edge of the sampled range at budgets {edge}")
        if wild:
            reasons.append(
                f"bootstrap minima outside the sampled range in > {EXTRAPOLATION_LIMIT:.0%} of draws, or "
                f"missing in > {FAILED_LIMIT:.0%}, at {wild}"
            )
        return "; ".join(reasons) or None

    def table(self) -> pd.DataFrame:
        rows = []
        for b in self.budgets:
            rows.append(
                {
                    "budget": b.budget,
                    "flop_convention": self.budget_convention,
                    "n_points": b.n_points,
                    "fit_var": b.fit_var,
                    "n_opt": b.n_opt,
                    "n_opt_lo": b.n_opt_ci[0],
                    "n_opt_hi": b.n_opt_ci[1],
                    "d_opt": b.d_opt,
                    "d_opt_lo": b.d_opt_ci[0],
                    "d_opt_hi": b.d_opt_ci[1],
                    "loss_opt": b.loss_opt,
                    "loss_opt_lo": b.loss_opt_ci[0],
                    "loss_opt_hi": b.loss_opt_ci[1],
                    "objective": b.objective,
                    "converged": b.converged,
                    "concave": b.concave,
                    "at_edge": b.at_edge,
                    "in_frontier": b.budget in self.frontier_budgets,
                    "n_boot_failed": b.n_boot_failed,
                    "boot_outside_share": b.boot_outside,
                    "flag": _budget_flag(b),
                }
            )
        return pd.DataFrame(rows)

    def laws_table(self) -> pd.DataFrame:
        rows = []
        for name, law in (("n_opt", self.n_opt_law), ("d_opt", self.d_opt_law), ("loss_opt", self.loss_law)):
            if law is None:
                continue
            rows.append(
                {
                    "quantity": name,
                    "flop_convention": self.budget_convention,
                    "coef": law.coef,
                    "coef_lo": law.coef_ci[0],
                    "coef_hi": law.coef_ci[1],
                    "exponent": law.exponent,
                    "exponent_lo": law.exponent_ci[0],
                    "exponent_hi": law.exponent_ci[1],
                    "exponent_se": law.exponent_se,
                    "n_budgets": law.n_points,
                    "r2": law.r2,
                    "flag": self.frontier_flag or "",
                }
            )
        return pd.DataFrame(rows)


SNAP_TOLERANCE_DECADES = 0.02  # about +-5%: Marin's achieved FLOPs are within 1% of the budget
EXTRAPOLATION_LIMIT = 0.05  # a budget whose bootstrap minima leave the sampled range more often is flagged
# ... and one where most draws give no parabola with a minimum (3 models: 7 in 9 resamples have
# fewer than 3 distinct points): its interval rests on a minority of draws
FAILED_LIMIT = 0.5


def snap_budgets(
    flops: np.ndarray,
    tolerance_decades: float = SNAP_TOLERANCE_DECADES,
    declared: np.ndarray | None = None,
    report: bool = True,
) -> np.ndarray:
    """Assign every run's FLOPs to an IsoFLOP budget, for tables without a budget column.

    declared: the sweep's budgets; each point goes to the nearest one (in log FLOPs), and a point
    farther than tolerance_decades from every declared budget raises DataError. Without declared
    budgets, points are clustered around anchors: the smallest remaining point opens a budget and
    takes every point within tolerance_decades (log10) of it, so clusters never chain neighbours
    (9e18 and 1e19 stay apart); a budget is its members' geometric mean. Each merge of distinct
    FLOP values is reported (BudgetSnapWarning) when report is set.
    """
    f = np.asarray(flops, dtype=float)
    log_f = np.log10(f)
    budgets = np.empty_like(log_f)
    merges: list[str] = []
    if declared is not None:
        declared = np.asarray(declared, dtype=float).reshape(-1)
        targets = np.log10(declared)
        nearest = np.abs(log_f[:, None] - targets[None, :]).argmin(axis=1)
        far = np.abs(log_f - targets[nearest]) > tolerance_decades
        if far.any():
            raise DataError(
                f"FLOPs {f[far][:10].tolist()} are more than {tolerance_decades} decades from every "
                f"declared budget {sorted(declared.tolist())}"
            )
        budgets = declared[nearest]
        for j in np.unique(nearest):
            members = f[nearest == j]
            if np.unique(members).size > 1 or not np.isclose(members[0], declared[j], rtol=1e-9):
                merges.append(f"{members.size} points in [{members.min():.4g}, {members.max():.4g}] -> "
                              f"{declared[j]:.4g}")
    else:
        order = np.argsort(log_f, kind="stable")
        start = 0
        while start < order.size:
            anchor = log_f[order[start]]
            stop = start
            while stop < order.size and log_f[order[stop]] - anchor <= tolerance_decades:
                stop += 1
            members = order[start:stop]
            budgets[members] = 10 ** log_f[members].mean()
            if np.unique(f[members]).size > 1:
                merges.append(f"{members.size} points in [{f[members].min():.4g}, {f[members].max():.4g}] -> "
                              f"{budgets[members[0]]:.4g}")
            start = stop
    if merges and report:
        warn(
            BudgetSnapWarning,
            "no budget column: runs were grouped into IsoFLOP budgets by their FLOPs (within "
            f"{tolerance_decades} decades): " + "; ".join(merges),
        )
    return budgets


def _fmt(budgets: list[float]) -> str:
    return ", ".join(f"{b:.3g}" for b in budgets)


def _budget_flag(b: BudgetFit) -> str:
    """Why one budget's minimum is not a measurement ('' when it is)."""
    if b.concave:
        return "parabola opens downward: no minimum"
    reasons = []
    if b.at_edge:
        reasons.append("minimum at the edge of the sampled range")
    if b.boot_outside > EXTRAPOLATION_LIMIT:
        reasons.append(f"{b.boot_outside:.0%} of bootstrap minima outside the sampled range")
    if b.boot_failed > FAILED_LIMIT:
        reasons.append(f"{b.boot_failed:.0%} of bootstrap draws gave no minimum")
    return "; ".join(reasons)


def _design(u: np.ndarray) -> np.ndarray:
    return np.stack([u * u, u, np.ones_like(u)], axis=-1)


def _plain_fits(u: np.ndarray, y: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Weighted quadratic fits for every count vector at once: (D, n) counts -> (D, 3) coefficients.

    Draws with fewer than 3 distinct u values have no unique parabola and give NaN.
    """
    design = _design(u)
    normal = np.einsum("di,ij,ik->djk", counts, design, design)
    rhs = np.einsum("di,ij,i->dj", counts, design, y)
    _, inverse = np.unique(u, return_inverse=True)
    distinct = (counts @ np.eye(inverse.max() + 1)[inverse] > 0).sum(axis=1)
    degenerate = distinct < 3
    normal[degenerate] = np.eye(3)
    coeffs = np.linalg.solve(normal, rhs[..., None])[..., 0]
    coeffs[degenerate] = np.nan
    return coeffs


def _robust_fit(u: np.ndarray, y: np.ndarray, loss: str, f_scale: float, x0: np.ndarray):
    design = _design(u)
    return least_squares(
        lambda c: design @ c - y,
        x0,
        loss=loss,
        f_scale=f_scale,
        method="trf",
        xtol=1e-12,
        ftol=1e-12,
        gtol=1e-12,
    )


def _vertex(coeffs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(…, 3) -> vertex u*, loss*; NaN where the parabola is not convex."""
    c2, c1, c0 = coeffs[..., 0], coeffs[..., 1], coeffs[..., 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u_star = np.where(c2 > 0, -c1 / (2 * c2), np.nan)
        return u_star, c0 - c1 * c1 / (4 * c2) + 0 * u_star


def fit_isoflop(
    data: pd.DataFrame | FitData,
    *,
    fit_var: str = "params",
    group: str | None = None,
    robust: str | None = None,
    f_scale: float | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    edge_fraction: float = 0.05,
    exclude_edge: bool = False,
    budget_convention: str | None = None,
    declared_budgets: np.ndarray | None = None,
    frontier: str = "all",
) -> IsoFlopResult:
    """IsoFLOP (approach 2) analysis of points with columns params, tokens, budget (or flops), loss.

    data: a DataFrame with those columns, or a FitData (its per-model loss: one group, or the mean
    over groups when group is None). Budgets missing -> snapped from flops (snap_budgets).
    exclude_edge leaves budgets whose vertex is at the edge out of the frontier laws. frontier:
    "all" (every convex budget) or "measured" (with 3 or more budgets whose minimum is measured,
    i.e. interior with a bootstrap inside the range, only those; the rest are listed).
    declared_budgets: snap FLOPs to the nearest of these (see snap_budgets) when there is no budget.
    Frontier laws from fewer than 3 budgets get no interval (NaN); IsoFlopResult.frontier_flag says
    when the frontier is not a result (too few usable budgets, edge minima, extrapolating bootstrap).
    """
    if fit_var not in ("params", "tokens"):
        raise DataError(f"fit_var must be 'params' or 'tokens', got {fit_var!r}")
    if frontier not in ("all", "measured"):
        raise DataError(f"frontier must be 'all' or 'measured', got {frontier!r}")
    if robust not in ROBUST_LOSSES:
        raise DataError(f"robust must be one of {ROBUST_LOSSES}, got {robust!r}")
    if isinstance(data, FitData):
        convention = budget_convention or data.budget_convention
        frame = data.per_model(group)
    else:
        convention = budget_convention or "unspecified"
        frame = data
    needed = [fit_var, "loss"]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"IsoFLOP fit: missing column(s) {missing}; columns present: {sorted(frame.columns)}")
    if "budget" in frame.columns and np.isfinite(frame["budget"].to_numpy(float)).all():
        budget = frame["budget"].to_numpy(float)
    elif "flops" in frame.columns:
        budget = snap_budgets(frame["flops"].to_numpy(float), declared=declared_budgets)
        if not isinstance(data, FitData) and budget_convention is None:
            convention = "unspecified (budgets snapped from flops)"
        elif isinstance(data, FitData):
            convention = data.flop_convention
    else:
        raise DataError("IsoFLOP fit: need a 'budget' column (or 'flops' to snap budgets from)")
    other_var = "tokens" if fit_var == "params" else "params"
    x = frame[fit_var].to_numpy(float)
    loss = frame["loss"].to_numpy(float)
    other = frame[other_var].to_numpy(float) if other_var in frame.columns else np.full_like(x, np.nan)
    bad = ~(np.isfinite(x) & (x > 0) & np.isfinite(loss))
    if bad.any():
        raise DataError(
            f"IsoFLOP fit: non-finite or non-positive {fit_var}/loss in rows {np.flatnonzero(bad)[:20]}"
        )

    rng = np.random.default_rng(seed)
    fits: list[BudgetFit] = []
    boot_log = {"n": [], "d": [], "l": []}
    skipped = []
    for b in np.unique(budget):
        sel = budget == b
        if len(np.unique(x[sel])) < 3:
            skipped.append(float(b))
            continue
        fit, draws = _fit_budget(
            float(b),
            x[sel],
            other[sel],
            loss[sel],
            fit_var,
            robust,
            f_scale,
            n_boot,
            rng,
            level,
            edge_fraction,
        )
        fits.append(fit)
        for key, d in zip(("n", "d", "l"), draws):
            boot_log[key].append(d)
    if skipped:
        warn(
            DroppedDataWarning,
            f"IsoFLOP budgets {_fmt(skipped)} have fewer than 3 distinct {fit_var} values; skipped",
        )
    concave = [f.budget for f in fits if f.concave]
    if concave:
        warn(
            ConcaveFitWarning,
            f"IsoFLOP parabolas open downward (no minimum) at budgets {_fmt(concave)}; "
            "left out of the frontier",
        )
    edge = [f.budget for f in fits if f.at_edge]
    if edge:
        warn(
            EdgeOfRangeWarning,
            f"IsoFLOP minima at or beyond the edge of the sampled {fit_var} range at "
            f"budgets {_fmt(edge)}: sample wider around them"
            + ("; left out of the frontier" if exclude_edge else ""),
        )

    use = [i for i, f in enumerate(fits) if not f.concave and not (exclude_edge and f.at_edge)]
    # frontier="measured": budgets whose minimum is measured (interior, bootstrap minima inside the
    # sampled range) make the frontier when there are 3 of them; the others are listed and left
    # out. Otherwise every convex budget is used (published reproductions do so) and a frontier
    # leaning on unmeasured minima is flagged as not a result (frontier_flag).
    usable = [i for i in use if not fits[i].at_edge and not fits[i].unreliable]
    if frontier == "measured" and len(usable) >= 3 and len(usable) < len(use):
        left_out = [fits[i].budget for i in use if i not in usable]
        warn(
            EdgeOfRangeWarning,
            f"IsoFLOP budgets {_fmt(left_out)} left out of the frontier: their minimum is at the edge or "
            f"their bootstrap minima leave the sampled range in > {EXTRAPOLATION_LIMIT:.0%} of draws",
        )
        use = usable
    laws: list[PowerLawFit | None] = [None, None, None]
    if len(use) >= 2:
        c = np.array([fits[i].budget for i in use])
        values = [np.array([getattr(fits[i], k) for i in use]) for k in ("n_opt", "d_opt", "loss_opt")]
        for j, key in enumerate(("n", "d", "l")):
            boot = np.stack([boot_log[key][i] for i in use], axis=1) if n_boot else None
            if np.isfinite(values[j]).sum() >= 2:
                law = fit_power_law(c, values[j], boot_log_y=boot, level=level)
                if law.n_points < 3:  # a line through two points: any interval would be spurious
                    law = replace(law, coef_ci=(np.nan, np.nan), exponent_ci=(np.nan, np.nan))
                laws[j] = law
    result = IsoFlopResult(
        budgets=tuple(fits),
        n_opt_law=laws[0],
        d_opt_law=laws[1],
        loss_law=laws[2],
        fit_var=fit_var,
        robust=robust,
        budget_convention=convention,
        frontier_budgets=tuple(fits[i].budget for i in use),
        n_boot=n_boot,
        level=level,
        seed=seed,
        group=group,
    )
    if result.frontier_flag and laws[0] is not None:
        warn(EdgeOfRangeWarning, f"the compute-optimal frontier is not a result: {result.frontier_flag}")
    return result


def _fit_budget(budget, x, other, loss, fit_var, robust, f_scale, n_boot, rng, level, edge_fraction):
    log_x = np.log10(x)
    center = float(log_x.mean())
    u = log_x - center
    n = u.size
    coeffs = _plain_fits(u, loss, np.ones((1, n)))[0]
    objective = float(((_design(u) @ coeffs - loss) ** 2).sum())
    converged = True
    if robust is not None:
        scale = f_scale if f_scale is not None else _robust_scale(_design(u) @ coeffs - loss, loss)
        res = _robust_fit(u, loss, robust, scale, coeffs)
        coeffs, objective, converged = res.x, float(res.cost), bool(res.success)

    # log10 of the other variable as a line in u over this budget's points (NaN if unavailable).
    log_other = np.log10(other)
    if np.isfinite(log_other).all():
        slope, intercept = np.polyfit(u, log_other, 1)
    else:
        slope = intercept = np.nan

    u_star, l_star = _vertex(coeffs)
    concave = not coeffs[0] > 0
    lo, hi = u.min(), u.max()
    margin = edge_fraction * (hi - lo)
    at_edge = bool(not concave and not (lo + margin < u_star < hi - margin))

    # Bootstrap within the budget.
    log_n_draws = log_d_draws = log_l_draws = np.full(n_boot, np.nan)
    n_failed = 0
    boot_outside = 0.0
    if n_boot:
        counts = resample_counts(rng, n, n_boot).astype(float)
        if robust is None:
            boot = _plain_fits(u, loss, counts)
        else:
            scale = f_scale if f_scale is not None else _robust_scale(_design(u) @ coeffs - loss, loss)
            boot = np.full((n_boot, 3), np.nan)
            with single_threaded_blas():
                for i in range(n_boot):
                    idx = np.repeat(np.arange(n), counts[i].astype(int))
                    if len(np.unique(u[idx])) >= 3:
                        boot[i] = _robust_fit(u[idx], loss[idx], robust, scale, coeffs).x
        bu, bl = _vertex(boot)
        n_failed = int(np.isnan(bu).sum())
        # Draws with fewer than 3 distinct points have no parabola at all (resampling noise, not
        # extrapolation): they are left out; a concave draw has no minimum and counts as outside.
        fitted = np.isfinite(boot).all(axis=1)
        outside = fitted & (np.isnan(bu) | (bu < u.min()) | (bu > u.max()))
        boot_outside = float(outside.sum() / max(fitted.sum(), 1))
        log_x_draws = center + bu
        other_draws = intercept + slope * bu
        log_n_draws, log_d_draws = (
            (log_x_draws, other_draws) if fit_var == "params" else (other_draws, log_x_draws)
        )
        log_n_draws, log_d_draws = log_n_draws * np.log(10), log_d_draws * np.log(10)
        with np.errstate(invalid="ignore", divide="ignore"):
            log_l_draws = np.log(bl)

    x_star = 10 ** (center + u_star)
    other_star = 10 ** (intercept + slope * u_star)
    n_opt, d_opt = (x_star, other_star) if fit_var == "params" else (other_star, x_star)

    def ci(log_draws):
        if not n_boot:
            return (np.nan, np.nan)
        a, b = percentile_interval(np.exp(log_draws), level)
        return (float(a), float(b))

    fit = BudgetFit(
        budget=budget,
        n_points=n,
        fit_var=fit_var,
        coeffs=tuple(float(c) for c in coeffs),
        center=center,
        objective=objective,
        converged=converged,
        concave=concave,
        at_edge=at_edge,
        x_range=(float(x.min()), float(x.max())),
        n_opt=float(n_opt),
        d_opt=float(d_opt),
        loss_opt=float(l_star) if not concave else np.nan,
        n_opt_ci=ci(log_n_draws),
        d_opt_ci=ci(log_d_draws),
        loss_opt_ci=ci(log_l_draws),
        n_boot_failed=n_failed,
        boot_outside=boot_outside,
        n_boot=n_boot,
    )
    return fit, (log_n_draws, log_d_draws, log_l_draws)


def _robust_scale(residuals: np.ndarray, loss: np.ndarray) -> float:
    """Residual scale at which the robust loss starts to down-weight: 1.4826 MAD, floored."""
    mad = 1.4826 * np.median(np.abs(residuals - np.median(residuals)))
    return float(max(mad, 1e-6 * max(np.abs(loss).max(), 1e-12)))
