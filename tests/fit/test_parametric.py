"""Approach 3: exact recovery on noise-free data, analytic gradient, compute-optimal allocation, and
Epoch AI's published replication of Chinchilla."""

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import approx_fprime, minimize_scalar

from relscale.errors import DataError
from relscale.fit import EdgeOfRangeWarning
from relscale.fit.parametric import _objective_and_grad, fit_parametric
from relscale.fit.synthetic import make_isoflop_sweep

from ._shared import shared_csv

TRUTH = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Hoffmann et al. 2022


def test_recovers_known_law_from_noise_free_points():
    sweep = make_isoflop_sweep(
        budgets=np.geomspace(1e17, 1e21, 9), n_per_budget=9, span_decades=2.0, noise=0.0
    )
    fit = fit_parametric(sweep["params"], sweep["tokens"], sweep["loss"], n_starts=32)
    assert fit.converged
    assert fit.objective < 1e-12
    for name, value in TRUTH.items():
        assert getattr(fit, name) == pytest.approx(value, rel=2e-3), name


def test_analytic_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    n, d = np.exp(rng.uniform(17, 23, 40)), np.exp(rng.uniform(20, 26, 40))
    loss = 1.7 + 400 / n**0.34 + 410 / d**0.28 + 0.02 * rng.standard_normal(40)
    args = (np.log(n), np.log(d), np.log(loss), rng.uniform(0.5, 2, 40), 1e-3)
    theta = np.array([6.1, 6.0, 0.5, 0.33, 0.29])
    _, grad = _objective_and_grad(theta, *args)
    numeric = approx_fprime(theta, lambda t: _objective_and_grad(t, *args)[0], 1e-8)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-9)


def test_compute_optimal_allocation_minimises_loss_on_the_budget():
    sweep = make_isoflop_sweep(noise=0.0)
    fit = fit_parametric(sweep["params"], sweep["tokens"], sweep["loss"], n_starts=16)
    for c in (1e20, 1e23):
        # independent check: minimise L(N, C / 6N) over N numerically
        best = minimize_scalar(
            lambda u, c=c: fit.predict(np.exp(u), c / (6 * np.exp(u))),
            bounds=(10, 40),
            method="bounded",
            options={"xatol": 1e-10},
        )
        assert fit.n_opt(c) == pytest.approx(np.exp(best.x), rel=1e-4)
        assert fit.n_opt(c) * fit.d_opt(c) * 6 == pytest.approx(c, rel=1e-10)
    assert fit.a_opt + fit.b_opt == pytest.approx(1.0)


def test_warns_when_the_implied_optimum_is_outside_the_sampled_sizes():
    sweep = make_isoflop_sweep(noise=0.0, span_decades=0.6, offset_decades=1.0)  # all models 3-20x too big
    with pytest.warns(EdgeOfRangeWarning, match="outside the sampled model sizes"):
        fit = fit_parametric(sweep["params"], sweep["tokens"], sweep["loss"], n_starts=8)
    assert len(fit.optimum_outside_range) == 5


def test_bad_points_are_named():
    with pytest.raises(DataError, match="bad rows"):
        fit_parametric([1e8, -1, 1e9, 1e9, 1e9, 1e9], [1e9] * 6, [3.0] * 6)


def test_reproduces_epoch_replication_of_chinchilla():
    data = pd.read_csv(shared_csv("chinchilla_epoch_svg_extracted.csv"))
    data = data.sort_values("loss", kind="stable").iloc[:-5]  # Epoch drop the 5 highest losses
    n = data["Model Size"].to_numpy()
    d = data["Training FLOP"].to_numpy() / (6 * n)
    # 150 bootstrap draws (Epoch used 4,000): enough for a loose check within the test time budget.
    fit = fit_parametric(n, d, data["loss"], n_boot=150, seed=0)
    assert fit.n_points == 240 and fit.converged
    assert fit.objective == pytest.approx(1.0183e-3, rel=1e-3)
    assert fit.E == pytest.approx(1.8172, abs=2e-3)
    assert fit.alpha == pytest.approx(0.3473, abs=1e-3)
    assert fit.beta == pytest.approx(0.3672, abs=1e-3)
    # A and B are poorly identified: compare their logs loosely
    assert np.log(fit.A) == pytest.approx(np.log(477.8), abs=0.05)
    assert np.log(fit.B) == pytest.approx(np.log(2143), abs=0.05)
    lo, hi = fit.ci["alpha"]  # Epoch: 0.317-0.373 with 4,000 draws
    assert lo == pytest.approx(0.317, abs=0.02) and hi == pytest.approx(0.373, abs=0.02)
    lo, hi = fit.ci["E"]  # Epoch: 1.769-1.871
    assert lo == pytest.approx(1.769, abs=0.04) and hi == pytest.approx(1.871, abs=0.04)
