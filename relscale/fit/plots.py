"""Figures of the fits (matplotlib, imported lazily; object-oriented Figure API, no pyplot state).

Each function returns a matplotlib Figure; save_figure writes it as PNG and PDF atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from relscale.atomic import atomic_write

from .isoflop import IsoFlopResult
from .laws import CONVERGING, DIVERGING, ErrorMatrix, GroupLaws, RelativeLaws

VERDICT_COLORS = {CONVERGING: "tab:green", DIVERGING: "tab:red"}


def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout=layout)


def save_figure(fig, path_stem: str | Path, formats: tuple[str, ...] = ("png", "pdf")) -> list[Path]:
    """Write fig as <stem>.png and <stem>.pdf, each to a temp file in the same folder then renamed."""
    stem = Path(path_stem)
    written = []
    for fmt in formats:
        target = stem.with_suffix(f".{fmt}")
        atomic_write(target, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=150))
        written.append(target)
    return written


def _pick(n: int, limit: int) -> np.ndarray:
    return np.arange(n) if n <= limit else np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def plot_isoflop(result: IsoFlopResult, points=None):
    """Left: loss against N (or D) per budget, fitted parabolas and minima. Right: the frontier."""
    import matplotlib as mpl

    fig = _figure(11, 4.5)
    ax, ax_f = fig.subplots(1, 2)
    cmap = mpl.colormaps["viridis"]
    budgets = [b.budget for b in result.budgets]
    norm = mpl.colors.LogNorm(min(budgets), max(budgets)) if len(budgets) > 1 else None
    for b in result.budgets:
        color = cmap(norm(b.budget)) if norm else "tab:blue"
        if points is not None:
            sel = np.isclose(points["budget"].to_numpy(float), b.budget, rtol=1e-9)
            ax.scatter(points[result.fit_var][sel], points["loss"][sel], s=12, color=color, alpha=0.7)
        grid = np.geomspace(b.x_range[0], b.x_range[1], 100)
        ax.plot(grid, b.curve(grid), color=color, lw=1, label=f"C={b.budget:.2g}")
        if not b.concave:
            star = b.n_opt if result.fit_var == "params" else b.d_opt
            marker = "X" if b.at_edge else "o"
            ax.plot(star, b.loss_opt, marker=marker, color="k", ms=6, mfc=color)
    ax.set_xscale("log")
    ax.set_xlabel("parameters N" if result.fit_var == "params" else "tokens D")
    ax.set_ylabel("loss")
    ax.set_title("IsoFLOP profiles (X: minimum at the edge)")
    ax.legend(fontsize=6, ncol=2)

    c = np.array(budgets)
    for key, law, label, color in (
        ("n_opt", result.n_opt_law, "N*", "tab:blue"),
        ("d_opt", result.d_opt_law, "D*", "tab:orange"),
    ):
        vals = np.array([getattr(b, key) for b in result.budgets])
        ci = np.array([getattr(b, f"{key}_ci") for b in result.budgets])
        ok = np.isfinite(vals)
        if not ok.any():
            continue
        yerr = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))[:, ok]
        yerr = np.where(np.isfinite(yerr), yerr, 0)
        ax_f.errorbar(c[ok], vals[ok], yerr=yerr, fmt="o", color=color, ms=4, capsize=2)
        if law is not None:
            grid = np.geomspace(c.min(), c.max(), 50)
            ax_f.plot(
                grid,
                law(grid),
                color=color,
                label=f"{label} = {law.coef:.3g} C^{law.exponent:.3f} "
                f"[{law.exponent_ci[0]:.3f}, {law.exponent_ci[1]:.3f}]",
            )
    ax_f.set_xscale("log")
    ax_f.set_yscale("log")
    ax_f.set_xlabel(f"budget C ({result.budget_convention})")
    ax_f.set_title("compute-optimal frontier")
    if ax_f.get_legend_handles_labels()[0]:  # no frontier line when every parabola opens down
        ax_f.legend(fontsize=7)
    return fig


def plot_group_laws(laws: GroupLaws, em: ErrorMatrix, max_groups: int = 20):
    em = em.restrict(laws.model_ids) if laws.model_ids else em
    fig = _figure(7, 5)
    ax = fig.subplots()
    import matplotlib as mpl

    order = np.argsort(laws.beta)
    shown = order[_pick(len(order), max_groups)]
    cmap = mpl.colormaps["tab20"]
    grid = np.geomspace(*laws.flop_range, 50)
    for i, g in enumerate(shown):
        color = cmap(i % 20)
        row = em.groups.index(laws.groups[g])
        ax.scatter(em.flops, em.errors[row], s=8, color=color, alpha=0.6)
        ax.plot(
            grid, laws.predict(grid)[g], color=color, lw=1, label=f"{laws.groups[g]}: beta={laws.beta[g]:.3f}"
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"compute F ({laws.flop_convention})")
    ax.set_ylabel(f"error ({laws.metric}, {laws.transform})")
    title = "absolute laws per group"
    if len(shown) < len(laws.groups):
        title += f" ({len(shown)} of {len(laws.groups)} groups, spread over beta)"
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    return fig


def plot_relative_trajectories(rel: RelativeLaws, em: ErrorMatrix, max_panels: int = 16):
    """Small multiples of G(F) with the bootstrap band and parity at 1, for up to max_panels groups."""
    import matplotlib as mpl

    em = em.restrict(rel.model_ids) if rel.model_ids else em
    order = np.argsort(-np.abs(np.nan_to_num(rel.delta_beta)))
    shown = np.sort(order[:max_panels])
    ncols = min(4, len(shown))
    nrows = int(np.ceil(len(shown) / ncols))
    # Fixed margins: the constrained layout engine doubled the save time of this 16-panel grid.
    fig = _figure(3.2 * ncols, 2.6 * nrows + 0.6, layout=None)
    fig.subplots_adjust(
        left=0.07, right=0.98, bottom=0.06, top=1 - 0.9 / (2.6 * nrows + 0.6), hspace=0.65, wspace=0.35
    )
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    hi = max([rel.flop_range[1], *rel.project_at]) if rel.project_at.size else rel.flop_range[1]
    grid = np.geomspace(rel.flop_range[0], hi, 80)
    base = em.pooled() if rel.baseline == "pooled" else em.errors[em.groups.index(rel.baseline)]
    has_draws = rel.draws_delta_beta is not None and rel.draws_delta_beta.shape[1] > 0
    band = rel.ratio_band(grid, rows=shown) if has_draws else None
    for i, (ax, g) in enumerate(zip(axes, shown)):
        color = VERDICT_COLORS.get(rel.verdict[g], "tab:gray")
        observed = em.errors[em.groups.index(rel.groups[g])] / base
        ax.scatter(em.flops, observed, s=6, color="k", alpha=0.5)
        ax.plot(grid, rel.ratio(grid)[g], color=color)
        if band is not None:
            ax.fill_between(grid, band[0][i], band[1][i], color=color, alpha=0.25, lw=0)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.axvline(rel.flop_range[1], color="gray", lw=0.5, ls=":")
        ax.set_xscale("log")
        # Ratios span a few percent: a linear axis with plain numbers reads better than a log axis
        # with no major tick in range (a power law in F is a straight line only in log-log anyway).
        ax.yaxis.set_major_formatter(mpl.ticker.ScalarFormatter(useOffset=False))
        lo, hi_ = rel.delta_beta_ci[g]
        ax.set_title(
            f"{rel.groups[g]}\ndb={rel.delta_beta[g]:.3f} [{lo:.3f}, {hi_:.3f}] {rel.verdict[g]}", fontsize=7
        )
        ax.tick_params(which="both", labelsize=6)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"G(F) = E_group / E_{rel.baseline}; F in {rel.flop_convention}; "
        f"{int(rel.level * 100)}% paired-bootstrap band",
        fontsize=9,
    )
    return fig


def plot_relative_forest(rel: RelativeLaws):
    """delta_beta with its interval for every group, sorted, coloured by verdict."""
    n = len(rel.groups)
    fig = _figure(6, max(2.5, 0.18 * n + 1))
    ax = fig.subplots()
    order = np.argsort(np.nan_to_num(rel.delta_beta))
    y = np.arange(n)
    for yi, g in zip(y, order):
        color = VERDICT_COLORS.get(rel.verdict[g], "tab:gray")
        ax.plot(rel.delta_beta_ci[g], [yi, yi], color=color, lw=1.5)
        ax.plot(rel.delta_beta[g], yi, "o", color=color, ms=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [rel.groups[g] for g in order], fontsize=max(4, min(8, 400 // max(n, 1))))
    ax.set_xlabel(f"delta_beta (slope of ln G against ln F), baseline {rel.baseline}")
    ax.set_title("relative scaling: green converging, red diverging, gray no significant change", fontsize=8)
    return fig
