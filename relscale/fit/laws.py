"""Absolute per-group laws E_g(F) = coef_g * F**(-beta_g) and relative laws G(F) = E_t(F) / E_b(F).

Everything is vectorised over groups and bootstrap draws: errors live in a (groups x models)
matrix, a bootstrap draw is a vector of model counts, and every log-log line fit for every
(group, draw) is obtained from five matrix products (powerlaw.line_fits). The bootstrap resamples
whole models, so a target and its baseline always see the same resampled models (paired).

Relative law: ln G = ln gamma + delta_beta ln F, fitted on the models where both errors exist, so
delta_beta = beta_b - beta_t exactly (OLS is linear in y): > 0 when the target's error falls more
slowly than the baseline's. Verdict, in this order:
  - "insufficient data": fewer than min_models models or fewer than 3 distinct compute values;
  - "metric constant across models": the target's (or baseline's) error does not vary across
    models (e.g. a constant predictor), so no law can be estimated;
  - "no significant change": the delta_beta interval contains 0;
  - "crossed parity at F* (inside the data)": the fitted G(F) equals 1 at F* =
    gamma**(-1/delta_beta) with F_min <= F* <= F_max, the sampled compute range (G went from one
    side of parity to the other inside the data); F* comes with its bootstrap interval;
  - "converging": |ln G| shrinks as F grows (G moves toward parity 1); parity compute F* lies
    beyond F_max, the largest sampled compute (an extrapolation);
  - "diverging": |ln G| grows with F, and G does not cross 1 inside the data.
gamma depends on the FLOP convention (F -> kF multiplies gamma by k**(-delta_beta)); delta_beta does
not, for one constant factor k.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy.optimize import least_squares

from relscale.errors import DataError

from ._threads import single_threaded_blas
from .bootstrap import inflate, percentile_interval, resample_counts, small_sample_inflation
from .diagnostics import ConvergenceWarning, DroppedDataWarning, EdgeOfRangeWarning, warn
from .io import FitData
from .isoflop import snap_budgets
from .powerlaw import line_fits

CONVERGING, DIVERGING, NO_CHANGE, INSUFFICIENT, NO_INTERVAL, CROSSED, CONSTANT = (
    "converging",
    "diverging",
    "no significant change",
    "insufficient data",
    "no interval (n_boot=0)",
    "crossed parity at F* (inside the data)",
    "metric constant across models",
)


def constant_rows(values: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """(G, M) -> (G,) bool: rows whose finite values do not vary (spread <= rtol * |mean|)."""
    v = np.where(np.isfinite(values), values, np.nan)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        spread = np.nanmax(v, axis=-1) - np.nanmin(v, axis=-1)
        scale = np.abs(np.nanmean(v, axis=-1))
    return np.asarray(spread <= rtol * np.maximum(scale, 1e-300))


@dataclass(frozen=True, eq=False)
class ErrorMatrix:
    """errors[g, m]: error of group g for model m (NaN where missing); models sorted by flops."""

    groups: tuple[str, ...]
    model_ids: tuple[str, ...]
    flops: np.ndarray
    budget: np.ndarray
    params: np.ndarray
    tokens: np.ndarray
    errors: np.ndarray
    flop_convention: str
    metric: str = "error"
    transform: str = "identity"
    group_dataset: tuple[str, ...] | None = None  # dataset of each group when there are several

    def subset(self, models: np.ndarray) -> ErrorMatrix:
        m = np.asarray(models, dtype=int)
        return replace(
            self,
            model_ids=tuple(self.model_ids[i] for i in m),
            flops=self.flops[m],
            budget=self.budget[m],
            params=self.params[m],
            tokens=self.tokens[m],
            errors=self.errors[:, m],
        )

    def restrict(self, model_ids: Sequence[str]) -> ErrorMatrix:
        """The columns of the given models (e.g. those a law was fitted on), in this matrix's order."""
        wanted = set(model_ids)
        return self.subset(np.array([i for i, m in enumerate(self.model_ids) if m in wanted], dtype=int))

    def pooled(self) -> np.ndarray:
        """Per-model mean error over all groups (the 'pooled' baseline of a single dataset)."""
        return np.nanmean(self.errors, axis=0)

    def pooled_rows(self, rows: Sequence[int] | None = None) -> np.ndarray:
        """(R, M) pooled baseline of each group at index `rows`: the per-model mean error over the
        groups of the same dataset (so a baseline never mixes eval sets), over all groups otherwise."""
        rows = np.arange(len(self.groups)) if rows is None else np.asarray(rows, dtype=int)
        if self.group_dataset is None:
            return np.broadcast_to(self.pooled(), (rows.size, self.errors.shape[1])).copy()
        datasets = np.array(self.group_dataset)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a model with no error in one dataset
            return np.stack([np.nanmean(self.errors[datasets == datasets[r]], axis=0) for r in rows])

    def with_flops(self, flops: np.ndarray, convention: str) -> ErrorMatrix:
        """The same errors against FLOPs in another convention (e.g. flops_train instead of flops_marin)."""
        return replace(self, flops=np.asarray(flops, dtype=float), flop_convention=convention)


def error_matrix(data: FitData | pd.DataFrame, *, flop_convention: str | None = None) -> ErrorMatrix:
    """Pivot a long table (model_id, group, flops, error[, budget, params, tokens]) to an ErrorMatrix."""
    if isinstance(data, FitData):
        frame, convention = data.frame, flop_convention or data.flop_convention
        metric, transform = data.metric, data.transform
    else:
        frame, convention, metric, transform = data, flop_convention or "unspecified", "error", "identity"
    missing = [c for c in ("model_id", "group", "flops", "error") if c not in frame.columns]
    if missing:
        raise DataError(f"group laws: missing column(s) {missing}; columns present: {sorted(frame.columns)}")
    frame = frame.assign(model_id=frame["model_id"].astype(str), group=frame["group"].astype(str))
    for optional in ("budget", "params", "tokens"):
        if optional not in frame.columns:
            frame[optional] = np.nan
    if frame.duplicated(["model_id", "group"]).any():
        raise DataError("group laws: a (model_id, group) pair occurs more than once")
    models = frame.groupby("model_id", sort=True)[["flops", "budget", "params", "tokens"]].first()
    models = models.reset_index().sort_values(["flops", "model_id"], kind="stable")
    bad = ~(np.isfinite(models["flops"]) & (models["flops"] > 0))
    if bad.any():
        raise DataError(
            f"group laws: flops must be finite and > 0; models {models.loc[bad, 'model_id'].tolist()[:20]}"
        )
    error = pd.to_numeric(frame["error"], errors="coerce")
    bad_error = error.notna() & ~(np.isfinite(error) & (error > 0))
    if bad_error.any():
        where = frame.loc[bad_error, ["model_id", "group"]].head(5).to_dict("records")
        raise DataError(
            f"group laws: errors must be > 0 (log-log fits); {int(bad_error.sum())} are not, e.g. {where}"
        )
    wide = frame.pivot(index="group", columns="model_id", values="error")
    wide = wide.reindex(columns=models["model_id"]).sort_index()
    group_dataset = None
    if "dataset" in frame.columns and frame["dataset"].nunique() > 1:
        owner = frame.groupby("group")["dataset"].first().astype(str)
        group_dataset = tuple(owner.loc[wide.index])
    return ErrorMatrix(
        groups=tuple(wide.index.astype(str)),
        model_ids=tuple(models["model_id"]),
        flops=models["flops"].to_numpy(float),
        budget=models["budget"].to_numpy(float),
        params=models["params"].to_numpy(float),
        tokens=models["tokens"].to_numpy(float),
        errors=wide.to_numpy(float),
        flop_convention=convention,
        metric=metric,
        transform=transform,
        group_dataset=group_dataset,
    )


def select_models(
    em: ErrorMatrix, select: str = "all", by: str = "pooled"
) -> tuple[ErrorMatrix, tuple[float, ...]]:
    """'all' models, or the 'optimal' one per budget: least error of `by` (a group or 'pooled').

    Returns the selected matrix and the budgets whose chosen model is the smallest or largest of
    that budget (an optimum at the edge of the sampled range: the true optimum may lie beyond).
    """
    if select == "all":
        return em, ()
    if select != "optimal":
        raise DataError(f"model selection must be 'all' or 'optimal', got {select!r}")
    if by == "pooled":
        reference = em.pooled()
    elif by in em.groups:
        reference = em.errors[em.groups.index(by)]
    else:
        raise DataError(
            f"optimal-model reference {by!r} is neither 'pooled' nor a group; groups: {em.groups[:20]}"
        )
    budget = em.budget if np.isfinite(em.budget).all() else snap_budgets(em.flops)
    size = em.params if np.isfinite(em.params).all() else em.flops
    chosen, edge = [], []
    for b in np.unique(budget):
        members = np.flatnonzero(budget == b)
        finite = members[np.isfinite(reference[members])]
        if finite.size == 0:
            continue
        best = finite[np.argmin(reference[finite])]
        chosen.append(best)
        if members.size > 1 and size[best] in (size[members].min(), size[members].max()):
            edge.append(float(b))
    if edge:
        warn(
            EdgeOfRangeWarning,
            f"the compute-optimal model of budgets {edge} is the smallest or largest model "
            "sampled there; the true optimum may lie outside the sampled range",
        )
    return em.subset(np.sort(np.array(chosen, dtype=int))), tuple(edge)


@dataclass(frozen=True, eq=False)
class GroupLaws:
    """E_g(F) = irreducible_g + coef_g * F**(-beta_g) (irreducible = 0 for the pure power law)."""

    groups: tuple[str, ...]
    coef: np.ndarray
    beta: np.ndarray
    coef_ci: np.ndarray  # (G, 2)
    beta_ci: np.ndarray  # (G, 2)
    irreducible: np.ndarray  # (G,), zeros for the pure power law
    irreducible_ci: np.ndarray  # (G, 2)
    irreducible_at_bound: np.ndarray  # (G,) bool: c on a bound (0 or min error), the floor is not identified
    objective: np.ndarray  # sum of squared ln-error residuals
    converged: np.ndarray
    n_models: np.ndarray
    flop_range: tuple[float, float]
    flop_convention: str
    metric: str
    transform: str
    selection: str
    edge_budgets: tuple[float, ...]
    with_irreducible: bool
    n_boot: int
    level: float
    seed: int
    model_ids: tuple[str, ...] = ()  # the models the laws were fitted on (after selection)

    def predict(self, flops: np.ndarray | float) -> np.ndarray:
        f = np.atleast_1d(np.asarray(flops, dtype=float))
        return self.irreducible[:, None] + self.coef[:, None] * f[None, :] ** (-self.beta[:, None])

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "group": self.groups,
                "flop_convention": self.flop_convention,
                "metric": self.metric,
                "transform": self.transform,
                "selection": self.selection,
                "n_models": self.n_models,
                "beta": self.beta,
                "beta_lo": self.beta_ci[:, 0],
                "beta_hi": self.beta_ci[:, 1],
                "coef": self.coef,
                "coef_lo": self.coef_ci[:, 0],
                "coef_hi": self.coef_ci[:, 1],
                "irreducible": self.irreducible,
                "irreducible_lo": self.irreducible_ci[:, 0],
                "irreducible_hi": self.irreducible_ci[:, 1],
                "objective": self.objective,
                "converged": self.converged,
            }
        )


def _bootstrap_counts(n_models: int, n_boot: int, seed: int) -> np.ndarray:
    return resample_counts(np.random.default_rng(seed), n_models, n_boot).astype(float)


def _ssr(x, y, mask, intercept, slope):
    resid = np.where(mask, y - (intercept[:, None] + slope[:, None] * x[None, :]), 0.0)
    return (resid * resid).sum(axis=1)


def fit_group_laws(
    data: ErrorMatrix | FitData | pd.DataFrame,
    *,
    select: str = "all",
    optimal_by: str = "pooled",
    irreducible: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    min_models: int = 3,
    small_sample: bool = True,
) -> GroupLaws:
    """Fit every group's absolute law on the selected models; bootstrap resamples models.

    Pure power laws: intervals from the vectorised bootstrap, widened by the small-sample factor
    (bootstrap.small_sample_inflation) unless small_sample=False. With the irreducible term: one
    nonlinear least-squares refit per draw and plain percentile intervals.
    """
    em = data if isinstance(data, ErrorMatrix) else error_matrix(data)
    em, edge = select_models(em, select, optimal_by)
    x = np.log(em.flops)
    y = np.log(em.errors)
    mask = np.isfinite(y)
    n_models = mask.sum(axis=1)
    few = n_models < min_models
    if few.any():
        warn(
            DroppedDataWarning,
            f"groups {np.array(em.groups)[few].tolist()[:20]} have fewer than {min_models} "
            "models with an error; their laws are NaN",
        )
    constant = constant_rows(np.where(mask, y, np.nan)) & ~few
    if constant.any():
        warn(
            DroppedDataWarning,
            "the metric does not vary across models for groups "
            f"{np.array(em.groups)[constant].tolist()[:20]} "
            "(e.g. a constant predictor): no scaling law can be estimated for them; their laws are NaN",
        )
        few = few | constant
    counts = _bootstrap_counts(x.size, n_boot, seed)
    n_groups = len(em.groups)
    nan2 = np.full((n_groups, 2), np.nan)
    if not irreducible:
        intercept, slope = line_fits(x, y, mask)
        objective = _ssr(x, y, mask, intercept, slope)
        coef, beta = np.exp(intercept), -slope
        c = np.zeros(n_groups)
        coef_ci, beta_ci, c_ci = nan2, nan2.copy(), np.zeros((n_groups, 2))
        if n_boot:
            b0, b1 = line_fits(x, y, mask, counts)
            factor = small_sample_inflation(n_models, level) if small_sample else np.ones(n_groups)
            b0, b1 = inflate(b0, intercept, factor), inflate(b1, slope, factor)
            beta_ci = np.stack(percentile_interval(-b1, level), axis=-1)
            coef_ci = np.stack(percentile_interval(np.exp(b0), level), axis=-1)
        coef, beta, objective = (np.where(few, np.nan, v) for v in (coef, beta, objective))
        beta_ci, coef_ci = (np.where(few[:, None], np.nan, v) for v in (beta_ci, coef_ci))
        converged = ~few  # closed form: converged wherever there is a fit
        at_bound = np.zeros(n_groups, bool)
    else:
        coef, beta, c, objective = (np.full(n_groups, np.nan) for _ in range(4))
        converged, at_bound = np.zeros(n_groups, bool), np.zeros(n_groups, bool)
        coef_ci, beta_ci, c_ci = nan2, nan2.copy(), nan2.copy()
        with single_threaded_blas():  # many tiny least-squares problems
            for g in np.flatnonzero(~few):
                m = mask[g]
                fit = _fit_irreducible(x[m], em.errors[g, m], np.ones(m.sum()))
                c[g], coef[g], beta[g], objective[g], converged[g] = fit
                # on a bound of [0, smallest error): the floor is not identified by these data
                floor_max = np.nanmin(em.errors[g, m])
                at_bound[g] = fit[0] <= 1e-9 * floor_max or fit[0] >= (1 - 1e-6) * floor_max
                if n_boot:
                    draws = np.array(
                        [
                            _fit_irreducible(x[m], em.errors[g, m], counts[d, m], start=fit[:3])[:3]
                            for d in range(n_boot)
                        ]
                    )
                    lo, hi = percentile_interval(draws, level, axis=0)
                    c_ci[g], coef_ci[g], beta_ci[g] = (lo[0], hi[0]), (lo[1], hi[1]), (lo[2], hi[2])
        if (~converged & ~few).any():
            warn(
                ConvergenceWarning,
                f"irreducible-term fits did not converge for groups "
                f"{np.array(em.groups)[~converged & ~few].tolist()[:20]}",
            )
        if at_bound.any():
            warn(
                EdgeOfRangeWarning,
                f"irreducible term fitted on a bound (0 or the smallest error) for groups "
                f"{np.array(em.groups)[at_bound].tolist()[:20]}: the floor is not identified by these data",
            )
    return GroupLaws(
        groups=em.groups,
        coef=coef,
        beta=beta,
        coef_ci=coef_ci,
        beta_ci=beta_ci,
        irreducible=c,
        irreducible_ci=c_ci,
        irreducible_at_bound=at_bound,
        objective=objective,
        converged=converged,
        n_models=n_models,
        flop_range=(float(em.flops.min()), float(em.flops.max())),
        flop_convention=em.flop_convention,
        metric=em.metric,
        transform=em.transform,
        selection=select,
        edge_budgets=edge,
        with_irreducible=irreducible,
        n_boot=n_boot,
        level=level,
        seed=seed,
        model_ids=em.model_ids,
    )


def _fit_irreducible(log_f: np.ndarray, err: np.ndarray, weights: np.ndarray, start=None):
    """Weighted fit of ln err = ln(c + exp(k - beta (ln F - ref))); returns (c, coef, beta, objective, ok)."""
    keep = weights > 0
    log_f, err, sw = log_f[keep], err[keep], np.sqrt(weights[keep])
    if np.unique(log_f).size < 3:
        return (np.nan,) * 4 + (False,)
    ref = log_f.mean()
    log_err = np.log(err)

    def resid(p):
        c, k, beta = p
        return sw * (np.log(c + np.exp(k - beta * (log_f - ref))) - log_err)

    starts = []
    if start is not None:
        c0, coef0, beta0 = start
        starts.append((c0, np.log(coef0) - beta0 * ref, beta0))
    for frac in (0.0, 0.5, 0.9):  # floors as fractions of the smallest error, then a power law on the rest
        c0 = frac * err.min()
        slope, intercept = np.polyfit(log_f - ref, np.log(err - c0), 1)
        starts.append((c0, intercept, max(-slope, 1e-3)))
    best = None
    upper = err.min() * (1 - 1e-9)
    for p0 in starts:
        p0 = np.clip(p0, [0, -np.inf, 0], [upper, np.inf, 10])
        res = least_squares(
            resid,
            p0,
            bounds=([0, -np.inf, 0], [upper, np.inf, 10]),
            method="trf",
            xtol=1e-12,
            ftol=1e-12,
            gtol=1e-12,
        )
        if best is None or res.cost < best.cost:
            best = res
    c, k, beta = best.x
    return float(c), float(np.exp(k + beta * ref)), float(beta), float(2 * best.cost), bool(best.success)


@dataclass(frozen=True, eq=False)
class RelativeLaws:
    """G_t(F) = E_t(F) / E_b(F) = gamma_t * F**delta_beta_t for every target group t (see module doc)."""

    groups: tuple[str, ...]
    baseline: str
    gamma: np.ndarray
    delta_beta: np.ndarray
    gamma_ci: np.ndarray  # (G, 2)
    delta_beta_ci: np.ndarray  # (G, 2)
    beta: np.ndarray  # target's absolute exponent on the same models
    beta_ci: np.ndarray
    beta_baseline: np.ndarray
    verdict: tuple[str, ...]
    ratio_at_ref: np.ndarray  # G at the largest sampled compute
    reference_flops: float
    parity_flops: np.ndarray  # F* where converging, NaN otherwise
    parity_ci: np.ndarray  # (G, 2); an upper bound of inf: some draws never reach parity
    project_at: np.ndarray  # (P,)
    projection: np.ndarray  # (G, P)
    projection_ci: np.ndarray  # (G, P, 2)
    objective: np.ndarray  # sum of squared ln G residuals
    n_models: np.ndarray
    flop_range: tuple[float, float]
    flop_convention: str
    metric: str
    transform: str
    selection: str
    edge_budgets: tuple[float, ...]
    n_boot: int
    level: float
    seed: int
    draws_log_gamma: np.ndarray | None = None  # (G, n_boot), after the small-sample widening
    draws_delta_beta: np.ndarray | None = None
    model_ids: tuple[str, ...] = ()  # the models the laws were fitted on (after selection)
    ci_inflation: np.ndarray | None = None  # (G,) small-sample widening of the draws (1 = none)

    def ratio(self, flops: np.ndarray | float) -> np.ndarray:
        """(G, P) fitted G(F)."""
        f = np.atleast_1d(np.asarray(flops, dtype=float))
        return self.gamma[:, None] * f[None, :] ** self.delta_beta[:, None]

    def ratio_band(
        self, flops: np.ndarray | float, rows: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(R, P) lower and upper percentile band of G(F) from the bootstrap draws, for the groups at
        index `rows` (default all; a (G, n_boot, P) array is built, so ask for the rows you plot)."""
        if self.draws_delta_beta is None or self.draws_delta_beta.shape[1] == 0:
            raise ValueError("this result kept no bootstrap draws (keep_draws=False or n_boot=0)")
        rows = np.arange(len(self.groups)) if rows is None else np.asarray(rows, dtype=int)
        log_f = np.log(np.atleast_1d(np.asarray(flops, dtype=float)))
        dg, dd = self.draws_log_gamma[rows], self.draws_delta_beta[rows]
        log_g = dg[:, :, None] + dd[:, :, None] * log_f[None, None, :]
        lo, hi = percentile_interval(log_g, self.level, axis=1)
        return np.exp(lo), np.exp(hi)

    def table(self) -> pd.DataFrame:
        out = pd.DataFrame(
            {
                "group": self.groups,
                "baseline": self.baseline,
                "flop_convention": self.flop_convention,
                "metric": self.metric,
                "transform": self.transform,
                "selection": self.selection,
                "n_models": self.n_models,
                "beta": self.beta,
                "beta_lo": self.beta_ci[:, 0],
                "beta_hi": self.beta_ci[:, 1],
                "beta_baseline": self.beta_baseline,
                "delta_beta": self.delta_beta,
                "delta_beta_lo": self.delta_beta_ci[:, 0],
                "delta_beta_hi": self.delta_beta_ci[:, 1],
                "gamma": self.gamma,
                "gamma_lo": self.gamma_ci[:, 0],
                "gamma_hi": self.gamma_ci[:, 1],
                "ratio_at_ref": self.ratio_at_ref,
                "verdict": self.verdict,
                "parity_flops": self.parity_flops,
                "parity_lo": self.parity_ci[:, 0],
                "parity_hi": self.parity_ci[:, 1],
                "objective": self.objective,
                "ci_inflation": self.ci_inflation if self.ci_inflation is not None else np.nan,
            }
        )
        for j, f in enumerate(self.project_at):
            out[f"ratio_at_{f:.3g}"] = self.projection[:, j]
            out[f"ratio_at_{f:.3g}_lo"] = self.projection_ci[:, j, 0]
            out[f"ratio_at_{f:.3g}_hi"] = self.projection_ci[:, j, 1]
        return out


def _verdict(log_gamma, delta_beta, lo, hi, log_f_min, log_f_max, n_boot, constant=None):
    """Verdict per group (see the module docstring for the rule); returns (verdict, converging,
    crossed, ln G at the largest sampled compute)."""
    log_ratio_ref = log_gamma + delta_beta * log_f_max
    log_ratio_min = log_gamma + delta_beta * log_f_min
    converging = np.sign(log_ratio_ref) * delta_beta < 0
    # G(F) = 1 inside [F_min, F_max]: the fitted line changes sign (or touches 1) over the data.
    crossed = (np.sign(log_ratio_min) != np.sign(log_ratio_ref)) & (delta_beta != 0)
    verdict = np.where(converging, CONVERGING, DIVERGING).astype(object)
    verdict[crossed] = CROSSED
    verdict[(lo <= 0) & (hi >= 0)] = NO_CHANGE
    verdict[~np.isfinite(lo) | ~np.isfinite(hi)] = NO_INTERVAL if n_boot == 0 else INSUFFICIENT
    if constant is not None:
        verdict[constant] = CONSTANT
    verdict[~np.isfinite(delta_beta) & (verdict != CONSTANT)] = INSUFFICIENT
    return verdict, converging, crossed, log_ratio_ref


def relative_power_laws(
    log_flops: np.ndarray,
    log_target: np.ndarray,
    log_baseline: np.ndarray,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    counts: np.ndarray | None = None,
    small_sample: bool = True,
) -> dict[str, np.ndarray]:
    """Core of fit_relative_laws on arrays: ln F (M,), ln E_t (G, M), ln E_b (M,) or (G, M).

    Returns point estimates (log_gamma, delta_beta, beta_target, beta_baseline, objective, n_models)
    and bootstrap draws (draws_log_gamma, draws_delta_beta, draws_beta_target), each (G, n_boot).
    small_sample widens the draws around the estimate by bootstrap.small_sample_inflation (the
    factor is returned as "inflation"); without it percentile intervals under-cover at ~25 models.
    """
    x = np.asarray(log_flops, dtype=float)
    yt = np.atleast_2d(np.asarray(log_target, dtype=float))
    yb = np.broadcast_to(np.asarray(log_baseline, dtype=float), yt.shape)
    mask = np.isfinite(yt) & np.isfinite(yb)  # the same models for target and baseline
    rel = yt - yb
    if counts is None:
        counts = _bootstrap_counts(x.size, n_boot, seed)
    log_gamma, delta_beta = line_fits(x, rel, mask)
    _, slope_t = line_fits(x, yt, mask)
    _, slope_b = line_fits(x, yb, mask)
    out = {
        "log_gamma": log_gamma,
        "delta_beta": delta_beta,
        "beta_target": -slope_t,
        "beta_baseline": -slope_b,
        "objective": _ssr(x, rel, mask, log_gamma, delta_beta),
        "n_models": mask.sum(axis=1),
    }
    if counts.shape[0]:
        b0, b1 = line_fits(x, rel, mask, counts)
        _, bt = line_fits(x, yt, mask, counts)
        factor = small_sample_inflation(out["n_models"], level) if small_sample else np.ones(len(rel))
        out |= {
            "draws_log_gamma": inflate(b0, log_gamma, factor),
            "draws_delta_beta": inflate(b1, delta_beta, factor),
            "draws_beta_target": inflate(-bt, out["beta_target"], factor),
            "inflation": factor,
        }
    else:
        empty = np.zeros((yt.shape[0], 0))
        out |= {
            "draws_log_gamma": empty,
            "draws_delta_beta": empty,
            "draws_beta_target": empty,
            "inflation": np.ones(len(rel)),
        }
    return out


def fit_relative_laws(
    data: ErrorMatrix | FitData | pd.DataFrame,
    *,
    baseline: str = "pooled",
    targets: Sequence[str] | None = None,
    select: str = "all",
    optimal_by: str | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    project_at: Sequence[float] = (),
    keep_draws: bool = True,
    min_models: int = 3,
    small_sample: bool = True,
) -> RelativeLaws:
    """Relative laws of every target group against `baseline` (a group, or 'pooled': the mean error
    over all groups per model), all groups in one vectorised call; see the module docstring."""
    em = data if isinstance(data, ErrorMatrix) else error_matrix(data)
    if baseline != "pooled" and baseline not in em.groups:
        raise DataError(
            f"baseline {baseline!r} is neither 'pooled' nor a group; groups: {list(em.groups)[:20]}"
        )
    em, edge = select_models(em, select, optimal_by or baseline)
    if targets is None:
        targets = [g for g in em.groups if g != baseline]
    unknown = [t for t in targets if t not in em.groups]
    if unknown:
        raise DataError(f"target groups {unknown[:20]} not found; groups: {list(em.groups)[:20]}")
    if not targets:
        raise DataError("no target group to compare with the baseline")
    rows = np.array([em.groups.index(t) for t in targets])
    base = em.pooled_rows(rows) if baseline == "pooled" else em.errors[em.groups.index(baseline)]
    x = np.log(em.flops)
    with np.errstate(divide="ignore", invalid="ignore"):
        yt, yb = np.log(em.errors[rows]), np.log(base)
    core = relative_power_laws(x, yt, yb, n_boot=n_boot, seed=seed, level=level, small_sample=small_sample)
    mask = np.isfinite(yt) & np.isfinite(np.broadcast_to(yb, yt.shape))
    distinct_f = np.array([np.unique(x[m]).size for m in mask])
    few = (core["n_models"] < min_models) | (distinct_f < 3)
    # A metric that does not vary across models (a constant predictor) has no scaling law: its
    # "fit" is exact and its interval zero-width, which is not a result.
    constant = (constant_rows(np.where(mask, yt, np.nan)) | constant_rows(np.where(mask, yb, np.nan))) & ~few
    blank = few | constant
    for key in ("log_gamma", "delta_beta", "beta_target"):
        core[key] = np.where(blank, np.nan, core[key])
    for key in ("draws_log_gamma", "draws_delta_beta", "draws_beta_target"):
        core[key] = np.where(blank[:, None], np.nan, core[key])
    if few.any():
        warn(
            DroppedDataWarning,
            f"targets {np.array(targets)[few].tolist()[:20]} share fewer than {min_models} models "
            "(or fewer than 3 distinct compute values) with the baseline; their laws are not estimated",
        )
    if constant.any():
        warn(
            DroppedDataWarning,
            f"the metric does not vary across models for targets {np.array(targets)[constant].tolist()[:20]}"
            f"{' or the baseline' if baseline != 'pooled' else ''} (e.g. a constant predictor): "
            "no relative law can be estimated for them",
        )

    log_gamma, delta_beta = core["log_gamma"], core["delta_beta"]
    db_lo, db_hi = percentile_interval(core["draws_delta_beta"], level)
    g_lo, g_hi = percentile_interval(np.exp(core["draws_log_gamma"]), level)
    bt_lo, bt_hi = percentile_interval(core["draws_beta_target"], level)
    log_f_ref = float(x.max())
    verdict, converging, crossed, log_ratio_ref = _verdict(
        log_gamma, delta_beta, db_lo, db_hi, float(x.min()), log_f_ref, n_boot, constant
    )
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        has_parity = (verdict == CONVERGING) | (verdict == CROSSED)
        parity = np.where(has_parity, np.exp(-log_gamma / delta_beta), np.nan)
        dg, dd = core["draws_log_gamma"], core["draws_delta_beta"]
        draw_conv = np.sign(dg + dd * log_f_ref) * dd < 0
        # Converging: draws that never reach parity beyond F_max count as +inf. Crossed: every
        # draw's own crossing point (a draw with a flat G never crosses: +inf).
        log_parity_draws = np.where(draw_conv, -dg / dd, np.inf)
        crossing_draws = np.where(dd != 0, -dg / dd, np.inf)
        log_parity_draws = np.where((verdict == CROSSED)[:, None], crossing_draws, log_parity_draws)
        log_parity_draws = np.where(np.isnan(dd), np.nan, log_parity_draws)
    p_lo, p_hi = percentile_interval(log_parity_draws, level)
    with np.errstate(over="ignore"):  # a parity beyond ~1e308 FLOPs is "never" anyway
        parity_ci = np.where(has_parity[:, None], np.exp(np.stack([p_lo, p_hi], -1)), np.nan)

    project_at = np.asarray(project_at, dtype=float).reshape(-1)
    log_p = np.log(project_at)
    projection = np.exp(log_gamma[:, None] + delta_beta[:, None] * log_p[None, :])
    draws_proj = (
        core["draws_log_gamma"][:, :, None] + core["draws_delta_beta"][:, :, None] * log_p[None, None, :]
    )
    pr_lo, pr_hi = percentile_interval(draws_proj, level, axis=1)
    return RelativeLaws(
        groups=tuple(targets),
        baseline=baseline,
        gamma=np.exp(log_gamma),
        delta_beta=delta_beta,
        gamma_ci=np.stack([g_lo, g_hi], -1),
        delta_beta_ci=np.stack([db_lo, db_hi], -1),
        beta=core["beta_target"],
        beta_ci=np.stack([bt_lo, bt_hi], -1),
        beta_baseline=core["beta_baseline"],
        verdict=tuple(verdict),
        ratio_at_ref=np.exp(log_ratio_ref),
        reference_flops=float(np.exp(log_f_ref)),
        parity_flops=parity,
        parity_ci=parity_ci,
        project_at=project_at,
        projection=projection,
        projection_ci=np.exp(np.stack([pr_lo, pr_hi], -1)),
        objective=core["objective"],
        n_models=core["n_models"],
        flop_range=(float(em.flops.min()), float(em.flops.max())),
        flop_convention=em.flop_convention,
        metric=em.metric,
        transform=em.transform,
        selection=select,
        edge_budgets=edge,
        n_boot=n_boot,
        level=level,
        seed=seed,
        draws_log_gamma=core["draws_log_gamma"] if keep_draws else None,
        draws_delta_beta=core["draws_delta_beta"] if keep_draws else None,
        model_ids=em.model_ids,
        ci_inflation=core["inflation"],
    )
