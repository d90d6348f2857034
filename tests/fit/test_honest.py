"""Honest reports (issue 15, section 1) and any table in (section 2), each on a minimal input.

Every expected number is recomputed independently here (numpy polyfit on the raw rows) or is a
hand-derived value of the synthetic data.
"""

import math
import warnings

import numpy as np
import pandas as pd
import pytest

from relscale.errors import DataError
from relscale.fit import (
    BudgetSnapWarning,
    DroppedDataWarning,
    EdgeOfRangeWarning,
    aggregate_dumps,
    cli,
    fit_isoflop,
    fit_relative_laws,
    from_table,
    load,
    run_fit,
    snap_budgets,
)
from relscale.fit.io import row_filter
from relscale.fit.laws import CONSTANT, CROSSED
from relscale.fit.synthetic import chinchilla_loss


def _two_groups_three_models() -> pd.DataFrame:
    """Columns group, params, tokens, loss: two groups x three models, no model column."""
    params = np.array([1e6, 4e6, 1.6e7])
    tokens = 20 * params
    flops = 6 * params * tokens
    rows = []
    for group, (coef, beta) in {"web": (40.0, 0.05), "code": (80.0, 0.08)}.items():
        for n, d, f in zip(params, tokens, flops):
            rows.append({"group": group, "params": n, "tokens": d, "loss": coef * f**-beta})
    return pd.DataFrame(rows)


# ---- 1. model key -------------------------------------------------------------------------------


def test_long_table_without_model_column_finds_the_model_key():
    table = _two_groups_three_models()
    data = from_table(table)
    assert data.frame["model_id"].nunique() == 3 and data.groups == ["code", "web"]
    rel = fit_relative_laws(data, baseline="web", n_boot=50)
    assert rel.n_models.tolist() == [3]
    # code / web = 2 F^(-0.03): delta_beta = beta_web - beta_code = -0.03, exactly
    assert rel.delta_beta[0] == pytest.approx(-0.03, abs=1e-10)
    f = 6 * table["params"] * table["tokens"]
    loss = table.set_index("group")["loss"]
    ratio = loss.loc["code"].to_numpy() / loss.loc["web"].to_numpy()
    assert rel.delta_beta[0] == pytest.approx(np.polyfit(np.log(f[:3]), np.log(ratio), 1)[0], abs=1e-10)


def test_repeated_model_key_refuses_and_names_the_group_column_flag():
    table = _two_groups_three_models().rename(columns={"group": "domain"})
    with pytest.raises(DataError, match=r"--group-col.*'domain'"):
        from_table(table)
    # a model column that repeats within a group blames the group column, not the model column
    table["run"] = ["a", "b", "c"] * 2
    with pytest.raises(DataError, match="--group-col"):
        from_table(table, columns={"model_id": "run"})
    # groups given, but (params, tokens) repeat within a group: ask for the model column
    dup = _two_groups_three_models()
    dup.loc[1, ["params", "tokens"]] = dup.loc[0, ["params", "tokens"]].to_numpy()
    with pytest.raises(DataError, match="--model-col"):
        from_table(dup)


# ---- 1. intervals come with their counts and flags ----------------------------------------------


def _parabola_points(budgets, n=7, span=1.0, centre=1.0, noise=0.0, seed=0):
    """IsoFLOP points of the Chinchilla loss at each budget (C = 6ND), N spread over `span` decades
    around centre x the true optimum."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        n_opt = 0.1 * c**0.5
        mid = n_opt * centre
        for i, n_ in enumerate(np.geomspace(mid / 10 ** (span / 2), mid * 10 ** (span / 2), n)):
            d = c / (6 * n_)
            rows.append({"model_id": f"{c:.0e}-{i}", "params": n_, "tokens": d, "flops": c, "budget": c,
                         "loss": chinchilla_loss(n_, d) + noise * rng.standard_normal()})
    return pd.DataFrame(rows)


def test_two_budget_frontier_has_no_interval_and_is_flagged():
    data = _parabola_points([1e19, 1e20], noise=0.002)
    with pytest.warns(EdgeOfRangeWarning, match="not a result"):
        iso = fit_isoflop(data, n_boot=200)
    law = iso.n_opt_law
    assert law.n_points == 2 and np.isnan(law.exponent_ci).all()
    assert "at least 3" in iso.frontier_flag
    assert (iso.laws_table()["flag"] != "").all() and (iso.laws_table()["n_budgets"] == 2).all()
    report = run_fit(data, what="isoflop", n_boot=200, echo=None)
    line = next(s for s in report.summary.splitlines() if s.startswith("IsoFLOP"))
    assert "from 2 budgets" in line and "NOT A RESULT" in line and "(no interval)" in line


def test_extrapolating_bootstrap_is_flagged_in_table_text_and_plot():
    # five noisy points, all on one side of the optimum: the minimum is an extrapolation
    data = _parabola_points([1e19, 1e20, 1e21], n=5, span=0.6, noise=0.004, seed=3)
    shifted = _parabola_points([1e20], n=5, span=0.6, centre=4.0, noise=0.004, seed=3)
    data = pd.concat([data[data.budget != 1e20], shifted], ignore_index=True)
    report = run_fit(data, what="isoflop", n_boot=300, echo=None)
    iso = report.isoflop
    b = next(b for b in iso.budgets if b.budget == 1e20)
    assert b.boot_outside > 0.05 and b.unreliable
    table = iso.table().set_index("budget")
    assert "outside the sampled range" in table.loc[1e20, "flag"] or "edge" in table.loc[1e20, "flag"]
    assert iso.frontier_flag and "NOT A RESULT" in report.summary
    assert any("budget 1e+20" in s for s in report.summary.splitlines())
    from relscale.fit import plots

    fig = plots.plot_isoflop(iso, data)
    frontier = fig.axes[1]
    laws = [ln for ln in frontier.get_lines() if ln.get_label().startswith(("N*", "D*"))]
    assert laws and all(ln.get_linestyle() == "--" for ln in laws)
    assert all(ln.get_color() in ("0.55", "gray", "tab:gray") for ln in laws)


# ---- 1. verdict: a crossing inside the data -----------------------------------------------------


def test_crossing_inside_the_data_is_reported_with_its_interval():
    flops = np.geomspace(1e18, 1e21, 12)
    rng = np.random.default_rng(0)
    base = 3.0 * (flops / 1e18) ** -0.05
    # G goes from 1.10 at 1e18 to 0.95 at 1e21: ln G linear in ln F
    slope = math.log(0.95 / 1.10) / math.log(1e3)
    ratio = 1.10 * (flops / 1e18) ** slope * np.exp(0.002 * rng.standard_normal(12))
    rows = [{"model_id": f"m{i}", "flops": f, "group": "base", "error": b}
            for i, (f, b) in enumerate(zip(flops, base))]
    rows += [{"model_id": f"m{i}", "flops": f, "group": "t", "error": b * r}
             for i, (f, b, r) in enumerate(zip(flops, base, ratio))]
    rel = fit_relative_laws(pd.DataFrame(rows), baseline="base", n_boot=400)
    assert rel.verdict == (CROSSED,)
    true_parity = 1e18 * (1 / 1.10) ** (1 / slope)  # where 1.10 (F/1e18)^slope = 1
    assert rel.parity_flops[0] == pytest.approx(true_parity, rel=0.3)
    lo, hi = rel.parity_ci[0]
    assert 1e18 < lo <= rel.parity_flops[0] <= hi < 1e21


# ---- 1. constant predictor ----------------------------------------------------------------------


def test_constant_metric_is_warned_and_not_presented_as_a_result():
    table = _two_groups_three_models()
    more = _two_groups_three_models().assign(params=lambda t: t.params * 2, tokens=lambda t: t.tokens * 3)
    table = pd.concat([table, more], ignore_index=True)
    table.loc[table.group == "code", "loss"] = 0.75  # every model: the same error (a constant predictor)
    report = run_fit(table, what="all", baseline="web", n_boot=50, echo=None)
    assert report.relative.verdict == (CONSTANT,)
    assert np.isnan(report.relative.delta_beta[0]) and np.isnan(report.relative.delta_beta_ci[0]).all()
    assert any("does not vary across models" in w for w in report.warnings)
    assert "metric constant across models" in report.summary and "[+0.000, +0.000]" not in report.summary
    pooled = run_fit(table.assign(loss=0.5), what="all", n_boot=20, echo=None)
    assert "parametric" in pooled.skipped and "does not vary" in pooled.skipped["parametric"]


# ---- 1. FLOP conventions ------------------------------------------------------------------------


def test_budget_column_without_flops_is_not_labelled_with_a_convention(tmp_path):
    data = _parabola_points([1e19, 1e20, 1e21]).drop(columns=["flops"]).rename(columns={"budget": "C"})
    fd = from_table(data, columns={"budget": "C"})
    assert fd.flop_convention.startswith("6ND") and "not stated" in fd.budget_convention
    report = run_fit(fd, what="isoflop", n_boot=50, echo=None)
    assert "C in as given in column 'C' (convention not stated)" in report.summary
    stated = from_table(data, columns={"budget": "C"}, budget_convention="flops_train")
    assert stated.budget_convention == "flops_train"
    # --flops for a table names a column; one that is missing is an error, never ignored
    data.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match="--flops 'flops_train'.*--flops-col"):
        load(tmp_path / "t.csv", flops="flops_train")
    # the footer states the convention, and the constant-factor condition of exponent invariance
    assert "6ND" in report.summary and "one constant factor" in report.summary
    assert "do not depend" not in report.summary


# ---- 1. budget snapping -------------------------------------------------------------------------


def test_snapping_does_not_chain_neighbours_and_reports_merges():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(np.unique(snap_budgets(np.array([9e18, 1e19])))) == 2  # no merge, no warning
    decade = np.geomspace(1e19, 1e20, 23)  # neighbours 0.045 decades apart
    assert len(np.unique(snap_budgets(decade, report=False))) >= 11  # was one budget
    with pytest.warns(BudgetSnapWarning, match=r"2 points in \[1e\+19, 1\.01e\+19\]"):
        snapped = snap_budgets(np.array([1e19, 1.01e19, 3e19]))
    assert len(np.unique(snapped)) == 2
    declared = snap_budgets(np.array([0.995e19, 1.004e19, 2.98e19]), declared=np.array([1e19, 3e19]),
                            report=False)
    assert declared.tolist() == [1e19, 1e19, 3e19]
    with pytest.raises(DataError, match="declared budget"):
        snap_budgets(np.array([2e19]), declared=np.array([1e19, 3e19]))


# ---- 1. warnings once, in words; where the tables went ------------------------------------------


def test_cli_prints_warnings_once_in_words_and_says_nothing_was_written(tmp_path, capsys):
    data = _parabola_points([1e19, 1e20], noise=0.002)
    data.to_csv(tmp_path / "t.csv", index=False)
    assert cli.main([str(tmp_path / "t.csv"), "--what", "isoflop", "--n-boot", "50"]) == 0
    captured = capsys.readouterr()
    assert "lambda" not in captured.err and "warn(" not in captured.err and ".py:" not in captured.err
    text = captured.out
    assert "warnings:" in text and "[]" not in text
    listed = [s for s in text.splitlines() if s.startswith("  - ")]
    assert len(listed) == len(set(listed)) >= 1
    assert "no --out given: nothing was written" in text


# ---- 1. several eval sets are kept apart --------------------------------------------------------


def test_grouping_over_several_eval_sets_keeps_them_apart():
    rows = []
    params = [1e6, 2e6, 4e6, 8e6]
    for i, n in enumerate(params):
        for dataset, offset in (("paloma", 1.0), ("sotu", 3.0)):
            for group, scale in (("1800s", 1.0 + 0.1 * i), ("1900s", 1.0)):
                rows.append(dict(model_id=f"m{i}", params=n, non_embedding_params=n, tokens=20 * n,
                                 flops_train=120 * n * n, flops_marin=40 * n * n, dataset=dataset,
                                 grouping="century", group=group, example_id="0",
                                 nll=offset * scale * (i + 2.0) ** -0.3, n_tokens=1, n_bytes=1))
    data = aggregate_dumps(pd.DataFrame(rows), metric="nll", grouping="century")
    assert data.groups == ["paloma/1800s", "paloma/1900s", "sotu/1800s", "sotu/1900s"]
    rel = fit_relative_laws(data, n_boot=0)
    # the pooled baseline of paloma/1800s is the mean of the paloma groups only
    frame = data.frame
    e = frame.pivot(index="model_id", columns="group", values="error")
    f = frame.groupby("model_id")["flops"].first().loc[e.index]
    pooled = e[["paloma/1800s", "paloma/1900s"]].mean(axis=1)
    expected = np.polyfit(np.log(f), np.log(e["paloma/1800s"] / pooled), 1)[0]
    assert rel.delta_beta[rel.groups.index("paloma/1800s")] == pytest.approx(expected, abs=1e-10)


# ---- 1. bad CSVs: header only, the file's own row numbers ---------------------------------------


def test_header_only_csv_exits_2_with_one_line(tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("group,params,tokens,loss\n")
    assert cli.main([str(tmp_path / "empty.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no data rows" in err and "empty.csv" in err


def test_errors_name_the_files_own_line_numbers(tmp_path):
    table = pd.DataFrame({"params": [4e6, 1e6, 2e6], "tokens": [1e8, 1e8, 1e8], "loss": [3.0, 2.9, -1.0]})
    table.to_csv(tmp_path / "t.csv", index=False)
    # the bad value is on the 4th line of the file (header = line 1), whatever the sorting inside
    with pytest.raises(DataError, match="line 4"):
        load(tmp_path / "t.csv")
    table.loc[0, "loss"] = np.nan
    table.loc[2, "loss"] = 2.0
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"'loss'.*line 2\b"):
        load(tmp_path / "t.csv")


# ---- 2. any table in ----------------------------------------------------------------------------


def test_wide_table_matches_the_long_table(tmp_path):
    long = _two_groups_three_models()
    wide = long.pivot_table(index=["params", "tokens"], columns="group", values="loss").reset_index()
    wide.columns = ["params", "tokens", "loss_code", "loss_web"]
    wide["run"] = ["a", "b", "c"]
    wide.to_csv(tmp_path / "wide.csv", index=False)
    ref = run_fit(long.assign(group="loss_" + long.group), what="relative", baseline="loss_web",
                  n_boot=50, echo=None).relative
    for spec in ("loss_code,loss_web", "loss_*"):
        got = run_fit(tmp_path / "wide.csv", wide=spec, columns={"model_id": "run"}, what="relative",
                      baseline="loss_web", n_boot=50, echo=None).relative
        assert got.groups == ("loss_code",)
        assert got.delta_beta[0] == pytest.approx(ref.delta_beta[0], abs=1e-12)
    with pytest.raises(DataError, match="--wide 'acc_\\*' matches no column"):
        load(tmp_path / "wide.csv", wide="acc_*")


def test_folder_of_csvs_and_where_filter(tmp_path):
    long = _two_groups_three_models()
    folder = tmp_path / "tables"
    folder.mkdir()
    long[long.group == "web"].to_csv(folder / "web.csv", index=False)
    long[long.group == "code"].to_csv(folder / "code.csv", index=False)
    data = load(folder)
    assert data.groups == ["code", "web"] and data.frame["model_id"].nunique() == 3
    only = load(folder, where="file == 'web' and params >= 4e6")
    assert only.groups == ["web"] and sorted(only.frame["params"]) == [4e6, 1.6e7]
    frame = pd.DataFrame({"source": ["x", "y", "x"], "n": [1, 2, 3]})
    assert row_filter(frame, "source == 'x'").tolist() == [True, False, True]
    assert row_filter(frame, "source in ['y'] or not n < 3").tolist() == [False, True, True]
    assert row_filter(frame, "1 < n <= 3").tolist() == [False, True, True]
    for unsafe in ("__import__('os').system('true')", "n.__class__", "open('f')", "n + 1 == 2"):
        with pytest.raises(DataError, match="--where"):
            row_filter(frame, unsafe)
    with pytest.raises(DataError, match="no column 'sauce'"):
        row_filter(frame, "sauce == 'x'")


def test_dropped_rows_warning_names_file_lines(tmp_path):
    table = pd.DataFrame({"params": [1e6, 2e6, 4e6], "tokens": [1e8, 1e8, 1e8], "loss": [3.0, np.nan, 2.8]})
    table.to_csv(tmp_path / "t.csv", index=False)
    with pytest.warns(DroppedDataWarning, match="line 3"):
        load(tmp_path / "t.csv", dropna=True)


def test_measured_frontier_leaves_out_unmeasured_minima():
    good = _parabola_points([1e19, 1e20, 1e21], n=7, span=1.2, noise=0.001, seed=1)
    bad = _parabola_points([1e22], n=5, span=0.6, centre=4.0, noise=0.004, seed=3)
    data = pd.concat([good, bad], ignore_index=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        every = fit_isoflop(data, n_boot=300)
        measured = fit_isoflop(data, n_boot=300, frontier="measured")
    assert every.frontier_budgets == (1e19, 1e20, 1e21, 1e22) and every.frontier_flag
    assert measured.frontier_budgets == (1e19, 1e20, 1e21) and measured.frontier_flag is None
    assert measured.n_opt_law.n_points == 3 and np.all(np.isfinite(measured.n_opt_law.exponent_ci))
    assert measured.n_opt_law.exponent == pytest.approx(0.5, abs=0.05)  # N* = 0.1 C^0.5 by construction
    table = measured.table().set_index("budget")
    assert not table.loc[1e22, "in_frontier"] and table.loc[1e22, "flag"]


def test_unidentified_approach_3_is_flagged_not_a_result():
    from relscale.fit.parametric import fit_parametric
    from relscale.fit.report import parametric_flag

    rng = np.random.default_rng(0)
    # A real grid: N and D vary independently -> identified, no flag.
    n, d = np.meshgrid(np.geomspace(1e7, 1e9, 6), np.geomspace(1e9, 1e11, 6))
    n, d = n.ravel(), d.ravel()
    loss = chinchilla_loss(n, d) * np.exp(rng.normal(0, 0.002, n.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = fit_parametric(n, d, loss, n_boot=20, n_starts=16, seed=0)
    assert parametric_flag(good) == ""
    # N and D both proportional to sqrt(C): the N and D terms cannot be told apart.
    c = np.geomspace(1e18, 1e19, 23)
    n1, d1 = 0.1 * np.sqrt(c), 10 * np.sqrt(c)
    loss1 = chinchilla_loss(n1, d1) * np.exp(rng.normal(0, 0.002, c.size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = fit_parametric(n1, d1, loss1, n_boot=20, n_starts=16, seed=0)
    assert parametric_flag(bad) != ""


def test_missing_column_errors_list_only_the_files_columns():
    with pytest.raises(DataError, match=r"columns present: \['group', 'loss', 'params', 'tokens'\]$"):
        from_table(_two_groups_three_models(), columns={"params": "nosuch"})


def test_budgets_whose_bootstrap_mostly_fails_are_not_a_result():
    # Three models per budget: 7 in 9 resamples have < 3 distinct points and give no parabola,
    # so each interval would rest on the few draws left; the frontier is not a result.
    from relscale.fit.isoflop import FAILED_LIMIT, fit_isoflop

    rows = []
    for budget in (1e18, 1e19, 1e20):
        n_opt = 0.1 * budget ** 0.5
        for ratio in (0.25, 1.0, 4.0):
            n = n_opt * ratio
            rows.append(dict(model_id=f"{budget:g}-{ratio}", params=n, tokens=budget / (6 * n),
                             flops=budget, loss=2.0 + 0.1 * np.log10(ratio) ** 2))
    frame = pd.DataFrame(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fit_isoflop(frame, n_boot=400, seed=0)
    assert all(b.boot_failed > FAILED_LIMIT and b.unreliable for b in result.budgets)
    assert result.frontier_flag and "at least 3 are needed" in result.frontier_flag
