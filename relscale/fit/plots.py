"""Figures of the fits (matplotlib, imported lazily; object-oriented Figure API, no pyplot state).

Each function returns a matplotlib Figure; save_figure writes it as PNG and PDF atomically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from relscale.atomic import atomic_write

from .isoflop import IsoFlopResult
from .laws import CONVERGING, CROSSED, DIVERGING, ErrorMatrix, GroupLaws, RelativeLaws

# Blue / orange / purple: told apart with the common colour-vision deficiencies (red/green is not).
VERDICT_COLORS = {CONVERGING: "tab:blue", DIVERGING: "tab:orange", CROSSED: "tab:purple"}
FLAGGED = "0.55"  # grey: an estimate that is not a result (too few budgets, extrapolated minima)
# tab10 minus its grey, then its darker/lighter variants: neighbours in the list differ in hue.
_QUALITATIVE = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                "tab:olive", "tab:cyan")


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width, break_long_words=True, break_on_hyphens=False)) or text


def group_colors(n: int) -> list:
    """n colours whose neighbours differ in hue (tab10 first; beyond 9, the tab20 shades in hue order)."""
    import matplotlib as mpl

    if n <= len(_QUALITATIVE):
        return list(_QUALITATIVE[:n])
    cmap = mpl.colormaps["tab20"]
    order = [i for i in range(0, 20, 2) if i != 14] + [i for i in range(1, 20, 2) if i != 15]
    return [cmap(order[i % len(order)]) for i in range(n)]


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
    """Left: loss against N (or D) per budget, fitted parabolas and minima. Right: the frontier.

    Budgets whose minimum is at the edge or whose bootstrap extrapolates are drawn grey; frontier
    laws that are not a result (IsoFlopResult.frontier_flag) are grey and dashed."""
    import matplotlib as mpl

    fig = _figure(11, 4.8)
    ax, ax_f = fig.subplots(1, 2)
    cmap = mpl.colormaps["viridis"]
    budgets = [b.budget for b in result.budgets]
    norm = mpl.colors.LogNorm(min(budgets), max(budgets) * 1.5) if len(budgets) > 1 else None
    for b in result.budgets:
        color = cmap(norm(b.budget)) if norm else "tab:blue"
        if points is not None:
            sel = np.isclose(points["budget"].to_numpy(float), b.budget, rtol=1e-9)
            ax.scatter(points[result.fit_var][sel], points["loss"][sel], s=12, color=color, alpha=0.7)
        grid = np.geomspace(b.x_range[0], b.x_range[1], 100)
        flagged = b.concave or b.at_edge or b.unreliable
        ax.plot(grid, b.curve(grid), color=color, lw=1, ls="--" if flagged else "-",
                label=f"C={b.budget:.2g}")
        if not b.concave:
            star = b.n_opt if result.fit_var == "params" else b.d_opt
            marker = "X" if flagged else "o"
            ax.plot(star, b.loss_opt, marker=marker, color="k", ms=6, mfc=color, ls="none")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(mpl.ticker.NullFormatter())  # minor labels overlap within a decade
    ax.set_xlabel("parameters N" if result.fit_var == "params" else "tokens D")
    ax.set_ylabel("loss")
    ax.set_title("IsoFLOP profiles (X, dashed: minimum not measured)", fontsize=9)
    ax.legend(fontsize=6, ncol=2)

    c = np.array(budgets)
    flag = result.frontier_flag
    bad = np.array([b.at_edge or b.unreliable or b.concave for b in result.budgets], dtype=bool)
    for key, law, label, color in (
        ("n_opt", result.n_opt_law, "N*", "tab:blue"),
        ("d_opt", result.d_opt_law, "D*", "tab:orange"),
    ):
        vals = np.array([getattr(b, key) for b in result.budgets])
        ci = np.array([getattr(b, f"{key}_ci") for b in result.budgets])
        for sel, point_color in ((~bad, color), (bad, FLAGGED)):
            ok = np.isfinite(vals) & sel
            if not ok.any():
                continue
            yerr = np.abs(np.stack([vals - ci[:, 0], ci[:, 1] - vals]))[:, ok]
            yerr = np.where(np.isfinite(yerr), yerr, 0)
            ax_f.errorbar(c[ok], vals[ok], yerr=yerr, fmt="o", color=point_color, ms=4, capsize=2)
        if law is not None:
            grid = np.geomspace(c.min(), c.max(), 50)
            interval = (
                f" [{law.exponent_ci[0]:.3f}, {law.exponent_ci[1]:.3f}]"
                if np.all(np.isfinite(law.exponent_ci)) else " (no interval)"
            )
            ax_f.plot(
                grid,
                law(grid),
                color=FLAGGED if flag else color,
                ls="--" if flag else "-",
                label=f"{label} = {law.coef:.3g} C^{law.exponent:.3f}{interval}, {law.n_points} budgets"
                + (" (not a result)" if flag else ""),
            )
    ax_f.set_xscale("log")
    ax_f.set_yscale("log")
    ax_f.set_xlabel(_wrap(f"budget C ({result.budget_convention})", 60))
    ax_f.set_ylabel("N* (parameters), D* (tokens)")
    title = "compute-optimal frontier"
    if flag:
        title += "\n" + _wrap(f"not a result: {flag}", 70)
    ax_f.set_title(title, fontsize=8 if flag else 9)
    if ax_f.get_legend_handles_labels()[0]:  # no frontier line when every parabola opens down
        ax_f.legend(fontsize=6)
    return fig


def plot_group_laws(laws: GroupLaws, em: ErrorMatrix, max_groups: int = 20):
    """Error against compute per group, with each group's fitted absolute law (log-log)."""
    em = em.restrict(laws.model_ids) if laws.model_ids else em
    fig = _figure(7, 5)
    ax = fig.subplots()
    order = np.argsort(np.nan_to_num(laws.beta))
    shown = order[_pick(len(order), max_groups)]
    colors = group_colors(len(shown))
    grid = np.geomspace(*laws.flop_range, 50)
    for i, g in enumerate(shown):
        color = colors[i]
        row = em.groups.index(laws.groups[g])
        ax.scatter(em.flops, em.errors[row], s=8, color=color, alpha=0.6)
        beta = f"{laws.beta[g]:.3f}" if np.isfinite(laws.beta[g]) else "n/a"
        ax.plot(grid, laws.predict(grid)[g], color=color, lw=1,
                label=f"{_wrap(laws.groups[g], 28)}: beta={beta} (n={laws.n_models[g]})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(_wrap(f"compute F ({laws.flop_convention})", 70))
    ax.set_ylabel(f"error ({laws.metric}, {laws.transform})")
    title = "absolute laws per group"
    if len(shown) < len(laws.groups):
        title += f" ({len(shown)} of {len(laws.groups)} groups, spread over beta)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, ncol=2 if len(shown) > 6 else 1)
    return fig


def plot_relative_trajectories(rel: RelativeLaws, em: ErrorMatrix, max_panels: int = 16):
    """Small multiples of G(F) with the bootstrap band and parity at 1, for up to max_panels groups."""
    import matplotlib as mpl

    em = em.restrict(rel.model_ids) if rel.model_ids else em
    order = np.argsort(-np.abs(np.nan_to_num(rel.delta_beta)))
    shown = np.sort(order[:max_panels])
    ncols = min(4, len(shown))
    nrows = int(np.ceil(len(shown) / ncols))
    width = max(3.4 * ncols, 5.0)
    # The constrained layout keeps every title and label inside; above 8 panels fixed margins
    # (the layout engine doubled the save time of a 16-panel grid).
    fig = _figure(width, 2.9 * nrows + 0.8, layout="constrained" if len(shown) <= 8 else None)
    if len(shown) > 8:
        fig.subplots_adjust(left=0.07, right=0.98, bottom=0.06, top=1 - 1.0 / (2.9 * nrows + 0.8),
                            hspace=0.9, wspace=0.4)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    hi = max([rel.flop_range[1], *rel.project_at]) if rel.project_at.size else rel.flop_range[1]
    grid = np.geomspace(rel.flop_range[0], hi, 80)
    rows = [em.groups.index(rel.groups[g]) for g in shown]
    if rel.baseline == "pooled":
        bases = em.pooled_rows(rows)
    else:
        bases = np.broadcast_to(em.errors[em.groups.index(rel.baseline)], (len(rows), em.flops.size))
    has_draws = rel.draws_delta_beta is not None and rel.draws_delta_beta.shape[1] > 0
    band = rel.ratio_band(grid, rows=shown) if has_draws else None
    chars = int(9 * width / ncols)  # characters that fit over one panel at 7 pt
    for i, (ax, g) in enumerate(zip(axes, shown)):
        color = VERDICT_COLORS.get(rel.verdict[g], FLAGGED)
        observed = em.errors[rows[i]] / bases[i]
        ax.scatter(em.flops, observed, s=6, color="k", alpha=0.5)
        if np.isfinite(rel.delta_beta[g]):
            ax.plot(grid, rel.ratio(grid)[g], color=color)
            if band is not None and np.isfinite(band[0][i]).any():
                ax.fill_between(grid, band[0][i], band[1][i], color=color, alpha=0.25, lw=0)
        if np.isfinite(rel.parity_flops[g]):
            ax.axvline(rel.parity_flops[g], color=color, lw=0.8, ls="-.")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.axvline(rel.flop_range[1], color="gray", lw=0.5, ls=":")
        ax.set_xscale("log")
        # Ratios span a few percent: a linear axis with plain numbers reads better than a log axis
        # with no major tick in range (a power law in F is a straight line only in log-log anyway).
        ax.yaxis.set_major_formatter(mpl.ticker.ScalarFormatter(useOffset=False))
        ax.xaxis.set_major_locator(mpl.ticker.LogLocator(numticks=4))
        lo, hi_ = rel.delta_beta_ci[g]
        db = f"db={rel.delta_beta[g]:+.3f} [{lo:+.3f}, {hi_:+.3f}]" if np.isfinite(lo) else "db: -"
        ax.set_title(
            _wrap(rel.groups[g], chars) + "\n" + _wrap(f"{db}, n={rel.n_models[g]}; {rel.verdict[g]}", chars),
            fontsize=7,
        )
        ax.set_xlabel(f"F ({_wrap(rel.flop_convention, chars)})", fontsize=7)
        ax.set_ylabel(f"G = E / E_{rel.baseline}", fontsize=7)
        ax.tick_params(which="both", labelsize=6)
    for ax in axes[len(shown) :]:
        ax.set_visible(False)
    fig.suptitle(
        _wrap(f"G(F) = E_group / E_{rel.baseline}; {int(rel.level * 100)}% paired-bootstrap band; "
              "dash-dot: parity F*", int(13 * width)),
        fontsize=9,
    )
    return fig


def plot_relative_forest(rel: RelativeLaws):
    """delta_beta with its interval for every group, sorted, coloured by verdict."""
    n = len(rel.groups)
    fig = _figure(6.5, max(2.8, 0.18 * n + 1.4))
    ax = fig.subplots()
    order = np.argsort(np.nan_to_num(rel.delta_beta))
    y = np.arange(n)
    for yi, g in zip(y, order):
        color = VERDICT_COLORS.get(rel.verdict[g], FLAGGED)
        ax.plot(rel.delta_beta_ci[g], [yi, yi], color=color, lw=1.5)
        ax.plot(rel.delta_beta[g], yi, "o", color=color, ms=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, [_wrap(rel.groups[g], 30) for g in order], fontsize=max(4, min(8, 400 // max(n, 1))))
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlabel(f"delta_beta (slope of ln G against ln F), baseline {rel.baseline}", fontsize=8)
    ax.set_ylabel("group")
    ax.set_title(
        "relative scaling: blue converging, orange diverging, purple crossed parity,\n"
        "grey no significant change or not estimable",
        fontsize=8,
    )
    return fig
