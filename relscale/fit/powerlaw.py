"""Straight-line fits in log-log space, for one series or for many series x many bootstrap draws at once.

A power law y = c * x**k is a line log y = log c + k log x. Ordinary least squares has a closed form
made of five weighted sums, and the sums for every (series, draw) pair are matrix products of a
(series x points) matrix with a (points x draws) count matrix, so thousands of series times
thousands of draws cost a handful of BLAS calls instead of a Python loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .bootstrap import percentile_interval


def line_fits(
    x: np.ndarray, y: np.ndarray, mask: np.ndarray | None = None, counts: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares intercept and slope of y[g] on x for every series g, for every count vector.

    x: (M,) shared abscissa; y: (G, M); mask: (G, M) bool, False where y[g, m] is missing;
    counts: (D, M) bootstrap counts (weights). Returns (intercept, slope), each (G, D), or (G,)
    when counts is None. A fit with fewer than two distinct x values gives NaN.
    """
    x = np.asarray(x, dtype=float)
    y = np.atleast_2d(np.asarray(y, dtype=float))
    if mask is None:
        mask = np.isfinite(y)
    weights_g = np.where(mask, 1.0, 0.0)
    y = np.where(mask, y, 0.0)
    single = counts is None
    counts = np.ones((1, x.size)) if single else np.asarray(counts, dtype=float)
    # Centre x: log FLOPs are ~40-50 and the normal equations would lose digits otherwise.
    x_mean = x.mean()
    xc = x - x_mean
    wt = counts.T  # (M, D)
    s0 = weights_g @ wt
    s1 = (weights_g * xc) @ wt
    s2 = (weights_g * xc * xc) @ wt
    sy = (weights_g * y) @ wt
    sxy = (weights_g * xc * y) @ wt
    with np.errstate(divide="ignore", invalid="ignore"):
        det = s0 * s2 - s1 * s1
        # det is n^2 * var(x) of the resampled points: zero (up to rounding) when all x coincide.
        degenerate = det <= 1e-12 * np.maximum(s0 * s2, 1e-300)
        slope = np.where(degenerate, np.nan, (s0 * sxy - s1 * sy) / det)
        intercept = (sy - slope * s1) / s0 - slope * x_mean
    if single:
        return intercept[:, 0], slope[:, 0]
    return intercept, slope


@dataclass(frozen=True)
class PowerLawFit:
    """y = coef * x**exponent, fitted by least squares on log y against log x.

    Intervals are percentile bootstrap intervals at `level` (NaN when no bootstrap was run);
    exponent_se is the classical OLS standard error, given for reference only.
    """

    coef: float
    exponent: float
    coef_ci: tuple[float, float]
    exponent_ci: tuple[float, float]
    exponent_se: float
    n_points: int
    objective: float  # sum of squared residuals of ln y
    r2: float
    level: float
    converged: bool = True  # closed form: always, kept so every fit result reports it

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.coef * np.asarray(x, dtype=float) ** self.exponent


def fit_power_law(
    x: np.ndarray,
    y: np.ndarray,
    *,
    boot_log_y: np.ndarray | None = None,
    counts: np.ndarray | None = None,
    level: float = 0.95,
) -> PowerLawFit:
    """Fit y = coef * x**exponent on positive x, y.

    Intervals come either from boot_log_y, (D, M) ln y values of D bootstrap replicates of the
    points (e.g. IsoFLOP minima re-estimated per draw; NaN = missing), or from counts, (D, M)
    resampling counts of the points themselves. Neither: intervals are NaN.
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-d arrays of the same length, got {x.shape} and {y.shape}")
    ok = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    lx, ly = np.log(x), np.log(y)
    n = int(ok.sum())
    intercept, slope = line_fits(lx[ok], ly[ok][None])
    intercept, slope = float(intercept[0]), float(slope[0])
    resid = ly[ok] - (intercept + slope * lx[ok])
    ssr = float(resid @ resid)
    sst = float(((ly[ok] - ly[ok].mean()) ** 2).sum()) if n else np.nan
    sxx = float(((lx[ok] - lx[ok].mean()) ** 2).sum()) if n else np.nan
    se = float(np.sqrt(ssr / (n - 2) / sxx)) if n > 2 and sxx > 0 else np.nan
    coef_ci = exponent_ci = (np.nan, np.nan)
    draws_b0 = draws_b1 = None
    if boot_log_y is not None:
        boot = np.asarray(boot_log_y, dtype=float)[:, ok]
        draws_b0, draws_b1 = line_fits(lx[ok], boot)  # each draw is a "series" over the same x
    elif counts is not None:
        b0, b1 = line_fits(lx[ok], ly[ok][None], counts=np.asarray(counts)[:, ok])
        draws_b0, draws_b1 = b0[0], b1[0]
    if draws_b1 is not None and draws_b1.size:
        lo, hi = percentile_interval(draws_b1, level)
        exponent_ci = (float(lo), float(hi))
        with np.errstate(over="ignore"):  # a wild draw's coefficient beyond float range is inf
            lo, hi = percentile_interval(np.exp(draws_b0), level)
        coef_ci = (float(lo), float(hi))
    return PowerLawFit(
        coef=float(np.exp(intercept)),
        exponent=slope,
        coef_ci=coef_ci,
        exponent_ci=exponent_ci,
        exponent_se=se,
        n_points=n,
        objective=ssr,
        r2=1 - ssr / sst if sst and sst > 0 else np.nan,
        level=level,
    )
