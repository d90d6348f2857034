"""The reduced demo end to end: corpus -> sweep -> dumps -> fits, and an interrupted demo resumed.

Budgets are fixed (not sized to the machine) and small, so the whole test is about a minute.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

from relscale.demo import GROUPINGS, _open_sweep, run_demo
from relscale.sweep.executors import WorkerOptions, worker_loop

BUDGETS = [1e10, 3e10]


def _starts(run_dir):
    lines = (run_dir / "attempts.jsonl").read_text().splitlines()
    return sum(json.loads(line)["event"] == "start" for line in lines)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    from relscale.data import prepare_default

    prepare_default(out / "data", log=lambda _: None)
    # An interrupted demo: the sweep directory exists and two runs finished before the stop.
    sweep = _open_sweep(out / "sweep", out / "data", "cpu", 1.0, BUDGETS, echo=lambda _: None)
    worker_loop(sweep.root, WorkerOptions(max_runs=2, wait=False, threads=1, verbose=False))
    finished_before = [r for r in sweep.records if (sweep.run_dir(r) / "result.json").exists()]
    assert len(finished_before) == 2
    lines: list[str] = []
    result = run_demo(out, budgets=BUDGETS, n_boot=200, device="cpu", echo=lines.append)
    return out, sweep, finished_before, result, "\n".join(lines)


def test_demo_resumes_without_redoing_finished_runs(demo):
    out, sweep, finished_before, result, _ = demo
    assert result.runs == len(sweep.records) >= 6
    for record in sweep.records:  # every run trained exactly once, the two early ones included
        assert _starts(sweep.run_dir(record)) == 1, record.folder
    # A second demo finds everything done: no run starts, no dump is rewritten.
    dumps = sorted((out / "evals").rglob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in dumps]
    again = run_demo(out, budgets=BUDGETS, n_boot=200, device="cpu", echo=lambda _: None)
    assert again.runs == result.runs
    assert [p.stat().st_mtime_ns for p in dumps] == stamps
    assert all(_starts(sweep.run_dir(r)) == 1 for r in sweep.records)
    assert finished_before


def test_demo_outputs_have_the_expected_shapes(demo):
    out, sweep, _, result, printed = demo
    index = pd.read_parquet(out / "sweep" / "results.parquet")
    assert len(index) == len(sweep.records) and set(index["status"]) == {"done"}
    dumps = pd.concat(pd.read_parquet(p) for p in (out / "evals").rglob("*.parquet"))
    assert dumps["model_id"].nunique() == len(sweep.records)
    assert set(GROUPINGS) <= set(dumps["grouping"])  # the data's group fields (party too)
    for grouping in GROUPINGS:
        folder = out / "fit" / grouping
        for name in ("relative_laws.csv", "group_laws.csv", "isoflop_budgets.csv", "summary.txt",
                     "relative_trajectories.png", "isoflop.png"):
            assert (folder / name).stat().st_size > 0, folder / name
        assert f"groups by {grouping}" in printed
    assert "delta_beta" in printed and "verdict" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["runs_finished"] == len(sweep.records)


def test_demo_fits_are_finite_and_match_the_dumps(demo):
    out, _, _, result, _ = demo
    dumps = pd.concat(pd.read_parquet(p) for p in (out / "evals").rglob("*.parquet"))
    for grouping in GROUPINGS:
        report = result.reports[grouping]
        rel = pd.read_csv(out / "fit" / grouping / "relative_laws.csv")
        expected_groups = sorted(dumps.loc[dumps["grouping"] == grouping, "group"].unique())
        assert sorted(rel["group"]) == expected_groups
        numeric = rel[["delta_beta", "gamma"]].to_numpy(dtype=float)
        assert np.isfinite(numeric).all()
        # Independent recomputation: bits-per-byte per (model, group) from the raw dumps, then
        # the relative law of the first group against the pooled mean by log-log least squares.
        rows = dumps[dumps["grouping"] == grouping]
        bpb = rows.groupby(["model_id", "group"]).apply(
            lambda g: g["nll"].sum() / (math.log(2) * g["n_bytes"].sum()), include_groups=False
        ).unstack()
        flops = rows.groupby("model_id")["flops_marin"].first().loc[bpb.index]
        group = expected_groups[0]
        ratio = bpb[group] / bpb.mean(axis=1)
        slope = np.polyfit(np.log(flops.to_numpy()), np.log(ratio.to_numpy()), 1)[0]
        fitted = float(rel.set_index("group").loc[group, "delta_beta"])
        assert fitted == pytest.approx(slope, rel=1e-6, abs=1e-9)
        assert report is not None
