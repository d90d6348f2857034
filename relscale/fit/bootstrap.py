"""Resampling helpers shared by every fit: bootstrap counts and percentile intervals.

A bootstrap draw is stored as a vector of counts (how often each item was drawn) rather than a list
of indices: a weighted least-squares fit with count weights is the fit on the resampled data, and
counts for all draws form one matrix, so every draw can be fitted at once with matrix products.
"""

from __future__ import annotations

import numpy as np


def resample_counts(rng: np.random.Generator, n_items: int, n_draws: int) -> np.ndarray:
    """(n_draws, n_items) int counts of a with-replacement resample of n_items items, per draw."""
    if n_draws == 0:
        return np.zeros((0, n_items), dtype=np.int64)
    picks = rng.integers(0, n_items, size=(n_draws, n_items))
    offsets = (np.arange(n_draws) * n_items)[:, None]
    return np.bincount((picks + offsets).ravel(), minlength=n_draws * n_items).reshape(n_draws, n_items)


def percentile_interval(draws: np.ndarray, level: float, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of draws along axis; NaN draws (failed fits) are ignored.

    Order statistics without interpolation (numpy's 'inverted_cdf': the smallest draw whose
    empirical CDF reaches q), so draws that are +-inf (e.g. a parity compute that is never
    reached) give an infinite bound instead of NaN. Vectorised: one sort for every row at once
    (np.nanquantile loops over rows in Python).
    """
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    tail = (1 - level) / 2
    values = np.moveaxis(np.asarray(draws, dtype=float), axis, -1)
    ordered = np.sort(values, axis=-1)  # NaN sorts last
    n_valid = (~np.isnan(values)).sum(axis=-1)

    def order_statistic(q: float) -> np.ndarray:
        # round: n * q = 25.000000000000004 must pick the 25th draw, as exact arithmetic would
        k = np.ceil(np.round(n_valid * q, 9)).astype(int) - 1
        k = np.clip(k, 0, np.maximum(n_valid - 1, 0))
        if ordered.shape[-1] == 0:
            return np.full(n_valid.shape, np.nan)
        picked = np.take_along_axis(ordered, k[..., None], axis=-1)[..., 0]
        return np.where(n_valid > 0, picked, np.nan)

    return order_statistic(tail), order_statistic(1 - tail)


def small_sample_inflation(n_points: np.ndarray | int, level: float, n_params: int = 2) -> np.ndarray:
    """Factor by which to widen bootstrap draws of a least-squares fit around its estimate.

    The pairs bootstrap of an OLS fit reproduces the HC0 sandwich variance, which is biased low by
    (n - p) / n, and percentile intervals use normal rather than Student-t tails. Both matter at
    the 10-30 models of a sweep: with n = 25 the plain percentile interval covered the true
    delta_beta in 88-92% of synthetic sweeps instead of 95%. The factor sqrt(n / (n - p)) *
    t_{n-p}(q) / z(q) (the HC1 correction and t quantile) brings it back to 93-96%; it tends to 1
    as n grows. NaN where n <= p.
    """
    from scipy.special import ndtri, stdtrit  # normal and Student-t quantiles (scipy.stats is slow to import)

    n = np.asarray(n_points, dtype=float)
    q = 0.5 + level / 2
    with np.errstate(divide="ignore", invalid="ignore"):
        dof = np.where(n > n_params, n - n_params, np.nan)
        return np.sqrt(n / dof) * stdtrit(dof, q) / ndtri(q)


def inflate(draws: np.ndarray, estimate: np.ndarray, factor: np.ndarray) -> np.ndarray:
    """estimate + factor * (draws - estimate), per row: draws (G, D), estimate and factor (G,)."""
    return estimate[:, None] + factor[:, None] * (draws - estimate[:, None])
