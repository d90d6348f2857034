"""Approach 2: exact vertices, published exponents (Chinchilla, Llama 3), warnings, robust fits."""

import warnings

import numpy as np
import pandas as pd
import pytest

from relscale.errors import DataError
from relscale.fit import ConcaveFitWarning, EdgeOfRangeWarning, fit_isoflop
from relscale.fit.bootstrap import resample_counts
from relscale.fit.isoflop import _plain_fits, snap_budgets

from ._shared import shared_csv


def _parabola_points(budgets, vertex_exponent=0.5, coef=0.1, curvature=0.3, span=1.0, n=9, noise=0.0, seed=0):
    """loss = L*(C) + curvature * (log10 N - log10 N*)^2 with N* = coef * C^vertex_exponent, D = C / 6N."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        n_star = coef * c**vertex_exponent
        for u in np.linspace(-span, span, n):
            params = n_star * 10**u
            loss = 3.0 * c**-0.05 + curvature * u**2 + noise * rng.standard_normal()
            rows.append({"params": params, "tokens": c / (6 * params), "budget": c, "loss": loss})
    return pd.DataFrame(rows)


def test_exact_vertices_and_frontier_on_noise_free_parabolas():
    budgets = np.geomspace(1e18, 1e21, 5)
    result = fit_isoflop(_parabola_points(budgets), n_boot=0)
    for b, fit in zip(budgets, result.budgets):
        assert fit.n_opt == pytest.approx(0.1 * b**0.5, rel=1e-9)
        assert fit.d_opt == pytest.approx(b / (6 * 0.1 * b**0.5), rel=1e-9)  # read off the budget's own line
        assert fit.loss_opt == pytest.approx(3.0 * b**-0.05, rel=1e-9)
        assert not fit.at_edge and not fit.concave
    assert result.n_opt_law.exponent == pytest.approx(0.5, abs=1e-9)
    assert result.n_opt_law.coef == pytest.approx(0.1, rel=1e-7)
    assert result.d_opt_law.exponent == pytest.approx(0.5, abs=1e-9)


def test_vectorised_bootstrap_parabolas_match_polyfit():
    rng = np.random.default_rng(3)
    u = np.linspace(-1, 1, 8)
    y = 0.3 * u**2 + 0.1 * u + 2 + 0.01 * rng.standard_normal(8)
    counts = resample_counts(rng, 8, 5).astype(float)
    coeffs = _plain_fits(u, y, counts)
    for d in range(5):
        idx = np.repeat(np.arange(8), counts[d].astype(int))
        if np.unique(u[idx]).size >= 3:
            np.testing.assert_allclose(coeffs[d], np.polyfit(u[idx], y[idx], 2), rtol=1e-8, atol=1e-12)


def test_bootstrap_intervals_cover_the_vertex():
    data = _parabola_points([1e19, 1e20, 1e21], noise=0.01, n=15, seed=1)
    result = fit_isoflop(data, n_boot=400, seed=0)
    for fit in result.budgets:
        assert fit.n_opt_ci[0] < fit.n_opt < fit.n_opt_ci[1]
        assert fit.n_opt_ci[0] < 0.1 * fit.budget**0.5 < fit.n_opt_ci[1]
    lo, hi = result.n_opt_law.exponent_ci
    assert lo < 0.5 < hi


def test_reproduces_chinchilla_n_star_exponent():
    data = pd.read_csv(shared_csv("isoflops_chinchilla.csv"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EdgeOfRangeWarning)  # the 1e20 budget of the extracted data is flat
        result = fit_isoflop(data, fit_var="params", n_boot=0)
    assert len(result.frontier_budgets) == 9
    assert result.n_opt_law.exponent == pytest.approx(0.49, abs=0.01)


def test_reproduces_llama3_d_star_law():
    data = pd.read_csv(shared_csv("isoflops_llama3.csv"))
    data = data[data["condition"] == "raw_loss"]
    result = fit_isoflop(data, fit_var="tokens", n_boot=0)
    law = result.d_opt_law
    assert law.exponent == pytest.approx(0.537, abs=0.002)
    assert law.coef == pytest.approx(0.299, rel=0.02)


def test_edge_and_concave_warnings_are_flagged():
    data = _parabola_points([1e19, 1e20, 1e21])
    # keep only the small-N half of the 1e20 budget: its minimum is at the sampled edge
    drop = (data["budget"] == 1e20) & (data["params"] > 0.1 * 1e20**0.5 * 1.01)
    with pytest.warns(EdgeOfRangeWarning, match="1e\\+20"):
        result = fit_isoflop(data[~drop], n_boot=0)
    assert [f.at_edge for f in result.budgets] == [False, True, False]
    assert result.any_edge
    concave = data.copy()
    sel = concave["budget"] == 1e21
    concave.loc[sel, "loss"] = 5 - (concave.loc[sel, "loss"] - 3)  # flip the parabola
    with pytest.warns(ConcaveFitWarning, match="1e\\+21"):
        result = fit_isoflop(concave, n_boot=0)
    assert result.budgets[2].concave and np.isnan(result.budgets[2].loss_opt)
    assert 1e21 not in result.frontier_budgets


def test_robust_fit_resists_an_outlier():
    data = _parabola_points([1e20], n=11, noise=0.002, seed=4)
    data.loc[1, "loss"] += 0.5  # one diverged run
    plain = fit_isoflop(data, n_boot=0).budgets[0].n_opt
    robust = fit_isoflop(data, robust="soft_l1", n_boot=20).budgets[0]
    truth = 0.1 * 1e20**0.5
    assert abs(np.log(robust.n_opt / truth)) < 0.05 < abs(np.log(plain / truth))
    assert robust.converged


def test_budgets_are_snapped_when_missing_and_bad_input_is_named():
    flops = np.array([1.0e19, 1.02e19, 0.99e19, 3e19, 3.05e19])
    snapped = snap_budgets(flops)
    assert len(np.unique(snapped)) == 2
    with pytest.raises(DataError, match="'loss'"):
        fit_isoflop(pd.DataFrame({"params": [1.0], "budget": [1.0]}))
