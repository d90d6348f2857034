"""Every figure at 1, 2, 3 and 6 groups: no text artist (titles, tick and axis labels, legends)
leaves the figure, every visible panel has axis labels, and the verdict colours differ in hue."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from relscale.fit import error_matrix, fit_group_laws, fit_isoflop, fit_relative_laws, plots  # noqa: E402
from relscale.fit.synthetic import make_isoflop_sweep  # noqa: E402


def _groups_table(n_groups: int, seed: int = 0) -> pd.DataFrame:
    """A baseline and n_groups targets with long names (they must wrap, not leave the figure)."""
    rng = np.random.default_rng(seed)
    flops = np.geomspace(1e17, 1e21, 10)
    rows = []
    drifts = np.linspace(-0.04, 0.05, n_groups)
    for i, f in enumerate(flops):
        base = 3.0 * (f / 1e17) ** -0.05
        rows.append({"model_id": f"m{i}", "flops": f, "group": "baseline", "error": base})
        for g, d in enumerate(drifts):
            name = f"a rather long group name number {g} (sotu_type=written)"
            error = base * (f / 1e19) ** d * np.exp(0.003 * rng.standard_normal())
            rows.append({"model_id": f"m{i}", "flops": f, "group": name, "error": error})
    return pd.DataFrame(rows)


def _outside(fig) -> list[str]:
    """Texts drawn outside the figure: the figure's own texts one by one, and each panel's tight
    box (its title, axis labels, the tick labels actually drawn, legend), as matplotlib draws them."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    box = fig.bbox

    def out(ext) -> bool:
        return ext.x0 < box.x0 - 1 or ext.y0 < box.y0 - 1 or ext.x1 > box.x1 + 1 or ext.y1 > box.y1 + 1

    own = [c for c in fig.get_children() if isinstance(c, Text)]  # suptitle, figure texts
    bad = [t.get_text() for t in own if t.get_visible() and t.get_text().strip()
           and out(t.get_window_extent(renderer))]
    for ax in fig.axes:
        if ax.get_visible() and out(ax.get_tightbbox(renderer)):
            texts = [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
            bad.append(f"panel {' / '.join(t for t in texts if t)}")
    return bad


def _check(fig) -> None:
    assert _outside(fig) == []
    for ax in fig.axes:
        if ax.get_visible() and ax.has_data():
            assert ax.get_xlabel().strip() and ax.get_ylabel().strip(), ax.get_title()


@pytest.mark.parametrize("n_groups", [1, 2, 3, 6])
def test_relative_and_group_figures_keep_text_inside(n_groups):
    table = _groups_table(n_groups)
    em = error_matrix(table)
    rel = fit_relative_laws(em, baseline="baseline", n_boot=100)
    laws = fit_group_laws(em, n_boot=50)
    for fig in (
        plots.plot_relative_trajectories(rel, em),
        plots.plot_relative_forest(rel),
        plots.plot_group_laws(laws, em),
    ):
        _check(fig)


@pytest.mark.parametrize("n_budgets", [1, 2, 3, 6])
def test_isoflop_figure_keeps_text_inside(n_budgets):
    sweep = make_isoflop_sweep(n_per_budget=7, seed=0)
    budgets = sorted(sweep["budget"].unique())
    while len(budgets) < n_budgets:  # make_isoflop_sweep has five budgets; add a sixth
        extra = make_isoflop_sweep(budgets=(budgets[-1] * 10,), n_per_budget=7, seed=1)
        sweep = pd.concat([sweep, extra], ignore_index=True)
        budgets = sorted(sweep["budget"].unique())
    sweep = sweep[sweep["budget"].isin(budgets[:n_budgets])]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        iso = fit_isoflop(sweep, n_boot=50)
    _check(plots.plot_isoflop(iso, sweep))


def test_verdict_and_group_colours_are_distinguishable():
    def hue(color):
        import colorsys

        return colorsys.rgb_to_hsv(*to_rgb(color))[0]

    verdict = list(plots.VERDICT_COLORS.values())
    for i, a in enumerate(verdict):
        for b in verdict[i + 1 :]:
            gap = abs(hue(a) - hue(b))
            assert min(gap, 1 - gap) > 0.08, (a, b)
    # no red/green pair among the verdicts (the most common colour-vision deficiency)
    assert not {"tab:red", "tab:green"} <= set(verdict)
    colors = plots.group_colors(6)
    for a, b in zip(colors, colors[1:]):  # neighbours in a legend differ in hue
        gap = abs(hue(a) - hue(b))
        assert min(gap, 1 - gap) > 0.04, (a, b)


def test_the_check_catches_clipped_text():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3, 2), layout="constrained")
    ax = fig.subplots()
    ax.plot([1, 2], [1, 2])
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    assert _outside(fig) == []
    ax.set_title("a title far too long to fit over a panel three inches wide, so it leaves the figure")
    assert _outside(fig)
    fig2 = Figure(figsize=(3, 2), layout=None)
    fig2.subplots_adjust(left=0.0, bottom=0.0)  # no room for tick labels
    fig2.subplots().plot([1, 2], [1, 2])
    assert _outside(fig2)
