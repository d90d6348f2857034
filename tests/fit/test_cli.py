"""End to end: `relscale fit` on a small synthetic CSV writes tables and figures; run_fit returns the
result objects; finished results are never overwritten; bad input exits with status 2."""

import argparse

import numpy as np
import pandas as pd
import pytest

from relscale.errors import DataError
from relscale.fit import cli, run_fit
from relscale.fit.synthetic import make_isoflop_sweep


def _synthetic_csv(path, seed=0):
    """Five IsoFLOP budgets; four groups whose errors are the sweep loss times known power laws of F."""
    sweep = make_isoflop_sweep(n_per_budget=7, seed=seed)
    rng = np.random.default_rng(seed)
    drifts = {"g0": 0.0, "g1": 0.04, "g2": -0.03, "g3": 0.0}
    frames = [
        sweep.assign(
            group=g,
            loss=sweep["loss"]
            * (sweep["flops"] / 1e19) ** d
            * np.exp(0.005 * rng.standard_normal(len(sweep))),
        )
        for g, d in drifts.items()
    ]
    pd.concat(frames).to_csv(path, index=False)
    return drifts


def test_cli_writes_tables_and_figures(tmp_path, capsys):
    drifts = _synthetic_csv(tmp_path / "sweep.csv")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "fit"
    args = parser.parse_args(
        [
            str(tmp_path / "sweep.csv"),
            "--out",
            str(out),
            "--baseline",
            "g0",
            "--n-boot",
            "200",
            "--parametric-boot",
            "10",
            "--project-at",
            "1e22",
            "--flops-col",
            "flops",
            "--isoflop-group",
            "g0",
        ]
    )
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "delta_beta" in printed and "FLOP convention" in printed
    for stem in ("isoflop_budgets", "isoflop_laws", "parametric", "group_laws", "relative_laws"):
        assert (out / f"{stem}.csv").stat().st_size > 0
        assert "FLOP" in (out / f"{stem}.md").read_text()  # the convention is spelled out under each table
    for stem in ("isoflop", "group_laws_plot", "relative_trajectories", "relative_forest"):
        assert (out / f"{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert (out / f"{stem}.pdf").read_bytes()[:4] == b"%PDF"
    rel = pd.read_csv(out / "relative_laws.csv").set_index("group")
    for g in ("g1", "g2", "g3"):  # recovered drifts, intervals cover them
        assert rel.loc[g, "delta_beta"] == pytest.approx(drifts[g], abs=0.01)
        assert rel.loc[g, "delta_beta_lo"] <= drifts[g] <= rel.loc[g, "delta_beta_hi"]
    # G_g1 = (F / 1e19)^0.04 passes parity at 1e19, inside the sampled budgets: a crossing, not "diverging"
    assert rel.loc["g1", "verdict"] == "crossed parity at F* (inside the data)"
    assert rel.loc["g1", "parity_lo"] <= 1e19 <= rel.loc["g1", "parity_hi"]
    assert rel.loc["g1", "parity_flops"] == pytest.approx(1e19, rel=0.5)
    assert rel.loc["g3", "verdict"] == "no significant change"
    assert (rel["flop_convention"] == "flops").all()
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temp files behind

    # finished results are not overwritten
    with pytest.raises(DataError, match="already holds"):
        cli.run(args)


def test_run_fit_returns_results_without_writing(tmp_path):
    _synthetic_csv(tmp_path / "sweep.csv", seed=1)
    report = run_fit(tmp_path / "sweep.csv", what=["relative", "groups"], n_boot=100, echo=None)
    assert report.isoflop is None and report.parametric is None
    assert report.relative.groups == ("g0", "g1", "g2", "g3") and report.relative.baseline == "pooled"
    assert report.groups.beta.shape == (4,)
    assert "verdict" in report.summary and report.files == ()


def test_cli_reports_bad_input_with_exit_status_2(tmp_path, capsys):
    pd.DataFrame({"params": [1e6], "tokens": [1e8]}).to_csv(tmp_path / "bad.csv", index=False)
    assert cli.main([str(tmp_path / "bad.csv"), "--no-plots"]) == 2
    assert "'loss'" in capsys.readouterr().err
