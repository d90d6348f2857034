"""relscale.fit is torch-free; the vectorised line fits and bootstrap helpers match plain numpy."""

import subprocess
import sys

import numpy as np
import pytest

from relscale.fit.bootstrap import percentile_interval, resample_counts
from relscale.fit.powerlaw import fit_power_law, line_fits


def test_import_does_not_pull_torch_or_matplotlib():
    code = (
        "import relscale.fit, sys; assert 'torch' not in sys.modules, 'torch'; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_line_fits_match_polyfit_per_series_with_missing_values():
    rng = np.random.default_rng(0)
    x = np.log(np.geomspace(1e18, 1e21, 12))
    y = rng.normal(size=(5, 12)) + 0.3 * x
    y[2, [0, 5]] = np.nan  # a series with missing models
    b0, b1 = line_fits(x, y)
    for g in range(5):
        ok = np.isfinite(y[g])
        slope, intercept = np.polyfit(x[ok], y[g, ok], 1)
        assert b1[g] == pytest.approx(slope, rel=1e-10)
        assert b0[g] == pytest.approx(intercept, rel=1e-10)


def test_count_weights_equal_a_fit_on_the_resampled_points():
    rng = np.random.default_rng(1)
    x = np.log(np.geomspace(1e18, 1e21, 9))
    y = rng.normal(size=(3, 9)) - 0.1 * x
    counts = resample_counts(rng, 9, 4)
    assert (counts.sum(axis=1) == 9).all()
    b0, b1 = line_fits(x, y, counts=counts)
    for d in range(4):
        idx = np.repeat(np.arange(9), counts[d])
        for g in range(3):
            slope, intercept = np.polyfit(x[idx], y[g, idx], 1)
            assert b1[g, d] == pytest.approx(slope, rel=1e-9)
            assert b0[g, d] == pytest.approx(intercept, rel=1e-9)


def test_degenerate_draw_is_nan():
    x = np.log(np.array([1e18, 1e19, 1e20]))
    counts = np.array([[3, 0, 0], [1, 1, 1]])
    _, slope = line_fits(x, np.array([[1.0, 2.0, 3.0]]), counts=counts)
    assert np.isnan(slope[0, 0]) and np.isfinite(slope[0, 1])


def test_percentile_interval_ignores_nan_and_keeps_infinity():
    draws = np.concatenate([np.arange(100.0), [np.nan] * 10])
    lo, hi = percentile_interval(draws, 0.9)
    assert (lo, hi) == (4.0, 94.0)  # inverted CDF: the 5% and 95% order statistics of 0..99
    # the 25th and 975th smallest of 1000 draws (n q is 25 and 975 exactly, despite float rounding)
    rows = np.stack([np.arange(1000.0), np.arange(1000.0)[::-1]])
    lo, hi = percentile_interval(rows, 0.95)
    assert lo.tolist() == [24.0, 24.0] and hi.tolist() == [974.0, 974.0]
    lo, hi = percentile_interval(np.concatenate([np.zeros(90), np.full(10, np.inf)]), 0.9)
    assert lo == 0 and hi == np.inf


def test_fit_power_law_exact_and_bootstrapped():
    x = np.geomspace(1e18, 1e22, 8)
    law = fit_power_law(x, 0.3 * x**0.55)
    assert law.coef == pytest.approx(0.3, rel=1e-8) and law.exponent == pytest.approx(0.55, rel=1e-10)
    rng = np.random.default_rng(2)
    noisy = 0.3 * x**0.55 * np.exp(0.05 * rng.standard_normal(8))
    law = fit_power_law(x, noisy, counts=resample_counts(rng, 8, 500))
    assert law.exponent_ci[0] < law.exponent < law.exponent_ci[1]
    assert law.exponent_se > 0 and 0.9 < law.r2 <= 1
