"""Absolute and relative laws: exact recovery, identities, the paired bootstrap against a per-draw
loop, the FLOP-convention property, verdicts, and 95% coverage over repeated synthetic sweeps."""

import numpy as np
import pandas as pd
import pytest

from relscale.errors import DataError
from relscale.fit import EdgeOfRangeWarning, error_matrix, fit_group_laws, fit_relative_laws
from relscale.fit.bootstrap import resample_counts, small_sample_inflation
from relscale.fit.laws import CONVERGING, DIVERGING, NO_CHANGE, relative_power_laws, select_models
from relscale.fit.synthetic import make_group_errors

FLOPS = np.geomspace(1e18, 1e21, 20)


def _long(errors: np.ndarray, flops=FLOPS, names=None) -> pd.DataFrame:
    names = names or [f"g{i}" for i in range(errors.shape[0])]
    return pd.DataFrame(
        {
            "model_id": np.tile([f"m{m:03d}" for m in range(flops.size)], len(names)),
            "flops": np.tile(flops, len(names)),
            "group": np.repeat(names, flops.size),
            "error": errors.ravel(),
        }
    )


def test_absolute_laws_recover_noise_free_parameters():
    frame, truth = make_group_errors(FLOPS, 6, shared_noise=0, noise=0, seed=0)
    laws = fit_group_laws(frame, n_boot=0)
    np.testing.assert_allclose(laws.beta, truth["beta"], rtol=1e-9)
    np.testing.assert_allclose(laws.coef, truth["coef"], rtol=1e-6)
    assert laws.objective.max() < 1e-20


def test_irreducible_term_is_recovered():
    c, coef, beta = 0.8, 40.0, 0.12
    errors = (c + coef * FLOPS**-beta)[None, :]
    laws = fit_group_laws(_long(errors), irreducible=True, n_boot=0)
    assert laws.irreducible[0] == pytest.approx(c, rel=1e-4)
    assert laws.beta[0] == pytest.approx(beta, rel=1e-4)
    assert laws.coef[0] == pytest.approx(coef, rel=1e-3)
    assert laws.converged[0] and not laws.irreducible_at_bound[0]


def test_delta_beta_is_the_difference_of_absolute_exponents():
    frame, _ = make_group_errors(FLOPS, 5, seed=1)
    em = error_matrix(frame)
    rel = fit_relative_laws(em, baseline="group0000", n_boot=0)
    laws = fit_group_laws(em, n_boot=0)
    np.testing.assert_allclose(rel.delta_beta, laws.beta[0] - laws.beta[1:], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rel.beta, laws.beta[1:], rtol=1e-9)


def test_paired_bootstrap_matches_a_loop_over_resampled_models():
    rng = np.random.default_rng(2)
    x = np.log(FLOPS)
    yt = np.log(FLOPS**-0.1) + 0.05 * rng.standard_normal((3, 20))
    yb = np.log(FLOPS**-0.15) + 0.05 * rng.standard_normal(20)
    counts = resample_counts(rng, 20, 6).astype(float)
    out = relative_power_laws(x, yt, yb, counts=counts, small_sample=False)  # the raw bootstrap
    for d in range(6):
        idx = np.repeat(np.arange(20), counts[d].astype(int))  # the SAME models for target and baseline
        for g in range(3):
            slope, intercept = np.polyfit(x[idx], yt[g, idx] - yb[idx], 1)
            assert out["draws_delta_beta"][g, d] == pytest.approx(slope, rel=1e-9)
            assert out["draws_log_gamma"][g, d] == pytest.approx(intercept, rel=1e-9)


def test_small_sample_widening_factor():
    # sqrt(25/23) * t_{23}(0.975) / z(0.975) with t_{23}(0.975) = 2.068658 and z(0.975) = 1.959964
    assert small_sample_inflation(25, 0.95) == pytest.approx(1.042572 * 2.068658 / 1.959964, rel=1e-5)
    assert small_sample_inflation(10_000, 0.95) == pytest.approx(1.0, abs=1e-3)
    assert np.isnan(small_sample_inflation(2, 0.95))


def test_flop_convention_changes_gamma_but_not_delta_beta():
    frame, _ = make_group_errors(FLOPS, 4, seed=3)
    em = error_matrix(frame, flop_convention="flops_marin")
    a = fit_relative_laws(em, n_boot=200, seed=0)
    b = fit_relative_laws(em.with_flops(3 * em.flops, "flops_train"), n_boot=200, seed=0)
    np.testing.assert_allclose(b.delta_beta, a.delta_beta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.delta_beta_ci, a.delta_beta_ci, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(b.gamma, a.gamma * 3.0**-a.delta_beta, rtol=1e-9)
    assert b.flop_convention == "flops_train" and (b.table()["flop_convention"] == "flops_train").all()
    assert a.verdict == b.verdict


def _mirrored_noise(scale: float) -> np.ndarray:
    """Noise symmetric in the (evenly spaced) log-FLOP grid, hence orthogonal to it: fitted slope 0."""
    half = scale * (-1.0) ** np.arange(FLOPS.size // 2)
    return np.concatenate([half, half[::-1]])


def test_verdicts_and_parity_compute():
    base = 10 * FLOPS**-0.1
    rng = np.random.default_rng(4)
    noise = np.exp(0.01 * rng.standard_normal((4, FLOPS.size)))
    errors = np.stack(
        [
            base,
            2.0 * base * (FLOPS / 1e18) ** -0.05,  # above the baseline, falling toward it: converging
            2.0 * base * (FLOPS / 1e18) ** 0.05,  # above and rising: diverging
            0.5 * base * (FLOPS / 1e18) ** 0.05,  # below and rising toward it: converging
            1.5
            * base
            * np.exp(_mirrored_noise(0.01)),  # a constant gap plus noise with zero slope: no change
        ]
    )
    errors[1:4] *= noise[:3]
    rel = fit_relative_laws(_long(errors), baseline="g0", n_boot=500, seed=0, project_at=[1e24])
    assert rel.verdict == (CONVERGING, DIVERGING, CONVERGING, NO_CHANGE)
    # parity: 2 (F/1e18)^-0.05 = 1  ->  F* = 1e18 * 2^(1/0.05)
    assert rel.parity_flops[0] == pytest.approx(1e18 * 2**20, rel=0.15)
    assert rel.parity_ci[0, 0] < rel.parity_flops[0] < rel.parity_ci[0, 1]
    assert np.isnan(rel.parity_flops[1])
    assert rel.projection[1, 0] == pytest.approx(2 * 1e6**0.05, rel=0.05)
    assert rel.projection_ci[1, 0, 0] < rel.projection[1, 0] < rel.projection_ci[1, 0, 1]


def test_pooled_baseline_is_the_mean_error_over_groups():
    frame, _ = make_group_errors(FLOPS, 3, seed=5)
    em = error_matrix(frame)
    rel = fit_relative_laws(em, baseline="pooled", n_boot=0)
    pooled = em.errors.mean(axis=0)
    slope = np.polyfit(np.log(em.flops), np.log(em.errors[1] / pooled), 1)[0]
    assert rel.groups == em.groups
    assert rel.delta_beta[1] == pytest.approx(slope, rel=1e-9)


def test_relative_intervals_cover_the_truth_95_percent_of_the_time():
    """200 independent synthetic sweeps of 25 models (fixed seed); binomial band 0.88-0.99 around 0.95.

    (Without the small-sample widening this design covers 0.88-0.92: see small_sample_inflation.)
    """
    rng = np.random.default_rng(2024)
    flops = np.geomspace(1e18, 1e21, 25)
    x = np.log(flops)
    beta_t, beta_b = 0.10, 0.15
    covered, estimates, half_widths = [], [], []
    for rep in range(200):
        shared = 0.05 * rng.standard_normal(flops.size)  # model effect common to target and baseline
        yt = np.log(30.0) - beta_t * x + shared + 0.02 * rng.standard_normal(flops.size)
        yb = np.log(50.0) - beta_b * x + shared + 0.02 * rng.standard_normal(flops.size)
        out = relative_power_laws(x, yt[None], yb, n_boot=1000, seed=rep)
        lo, hi = np.quantile(out["draws_delta_beta"][0], [0.025, 0.975])
        covered.append(lo <= beta_b - beta_t <= hi)
        estimates.append(out["delta_beta"][0])
        half_widths.append((hi - lo) / 2)
    coverage = np.mean(covered)
    assert 0.88 <= coverage <= 0.99, coverage
    assert np.mean(estimates) == pytest.approx(beta_b - beta_t, abs=0.002)
    # Pairing cancels the shared model effect: the interval reflects the true spread of the estimate.
    assert np.mean(half_widths) / 1.96 == pytest.approx(np.std(estimates), rel=0.25)


def test_optimal_selection_and_its_edge_warning():
    budget = np.repeat([1e19, 1e20], 3)
    params = np.tile([1e8, 2e8, 4e8], 2)
    pooled = np.array([3.0, 2.9, 3.1, 2.5, 2.6, 2.7])  # optimum in the middle, then at the smallest model
    frame = pd.DataFrame(
        {
            "model_id": [f"m{i}" for i in range(6)],
            "flops": budget * np.tile([1, 1.01, 0.99], 2),
            "budget": budget,
            "params": params,
            "group": "a",
            "error": pooled,
        }
    )
    em = error_matrix(frame)
    with pytest.warns(EdgeOfRangeWarning, match="1e\\+20"):
        chosen, edge = select_models(em, "optimal", "pooled")
    assert set(chosen.model_ids) == {"m1", "m3"} and edge == (1e20,)


def test_unknown_baseline_or_target_is_named():
    frame, _ = make_group_errors(FLOPS, 3, seed=6)
    with pytest.raises(DataError, match="'nope'"):
        fit_relative_laws(frame, baseline="nope")
    with pytest.raises(DataError, match="missing"):
        fit_relative_laws(frame, targets=["missing"])
