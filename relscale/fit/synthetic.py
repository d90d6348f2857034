"""Synthetic sweeps with known parameters, for tests, the benchmark and demos.

make_isoflop_sweep: models on IsoFLOP lines (C = 6 N D) with losses from a Chinchilla law.
make_group_errors: per-group errors E_g(m) = coef_g * F_m**(-beta_g) * exp(u_m + e_gm), where u_m is
a model effect shared by every group (it is what makes target and baseline errors correlated, and
why the bootstrap must be paired) and e_gm is independent noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd


def chinchilla_loss(n, d, E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28):
    """The Chinchilla parametric loss L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022,
    their fitted constants by default) for parameters ``n`` and tokens ``d`` (arrays broadcast)."""
    return E + A / np.asarray(n, float) ** alpha + B / np.asarray(d, float) ** beta


def make_isoflop_sweep(
    budgets: Sequence[float] = (1e18, 3e18, 1e19, 3e19, 1e20),
    n_per_budget: int = 9,
    *,
    law: dict[str, float] | None = None,
    span_decades: float = 1.2,
    offset_decades: float = 0.0,
    noise: float = 0.005,
    seed: int = 0,
) -> pd.DataFrame:
    """Models spread log-uniformly over span_decades of N around each budget's optimum (shifted by
    offset_decades), with multiplicative log-normal noise."""
    law = law or {}
    params = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28} | law
    rng = np.random.default_rng(seed)
    g = (params["alpha"] * params["A"] / (params["beta"] * params["B"])) ** (
        1 / (params["alpha"] + params["beta"])
    )
    a = params["beta"] / (params["alpha"] + params["beta"])
    rows = []
    for c in budgets:
        n_opt = g * (c / 6) ** a
        for i, log_n in enumerate(
            offset_decades + np.linspace(-span_decades / 2, span_decades / 2, n_per_budget)
        ):
            n = n_opt * 10**log_n
            d = c / (6 * n)
            loss = chinchilla_loss(n, d, **params) * np.exp(noise * rng.standard_normal())
            rows.append(
                {"model_id": f"C{c:.0e}-{i}", "params": n, "tokens": d, "flops": c, "budget": c, "loss": loss}
            )
    return pd.DataFrame(rows)


def make_group_errors(
    flops: np.ndarray,
    n_groups: int,
    *,
    beta: np.ndarray | None = None,
    coef: np.ndarray | None = None,
    shared_noise: float = 0.03,
    noise: float = 0.02,
    seed: int = 0,
) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
    """Long table (model_id, flops, group, error) and the true coef / beta per group."""
    rng = np.random.default_rng(seed)
    flops = np.asarray(flops, dtype=float)
    beta = rng.uniform(0.05, 0.25, n_groups) if beta is None else np.asarray(beta, float)
    coef = np.exp(rng.uniform(2.0, 6.0, n_groups)) if coef is None else np.asarray(coef, float)
    shared = shared_noise * rng.standard_normal(flops.size)
    own = noise * rng.standard_normal((n_groups, flops.size))
    errors = coef[:, None] * flops[None, :] ** (-beta[:, None]) * np.exp(shared[None, :] + own)
    groups = [f"group{g:04d}" for g in range(n_groups)]
    frame = pd.DataFrame(
        {
            "model_id": np.tile([f"m{m:04d}" for m in range(flops.size)], n_groups),
            "flops": np.tile(flops, n_groups),
            "group": np.repeat(groups, flops.size),
            "error": errors.ravel(),
        }
    )
    return frame, {"beta": beta, "coef": coef, "groups": np.array(groups)}
