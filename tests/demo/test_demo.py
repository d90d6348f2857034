"""The reduced demo end to end: corpus -> one sweep per budget -> dumps -> fits, and an
interrupted demo resumed.

Budgets are fixed (not sized to the machine) and small, so the whole module is a minute or two on
an idle 2-core CPU. The demo's point is checked on it: every budget's IsoFLOP parabola opens upward
with its minimum inside the sampled widths, and the frontier has 3 points and a finite interval.
"""

import json
import math

import numpy as np
import pandas as pd
import pytest

from relscale.demo import (
    DEMO_VOCAB,
    GROUPINGS,
    MAX_EPOCHS,
    TOKENS_PER_PARAM,
    _open_sweeps,
    _shape,
    budget_sweeps,
    epochs_report,
    run_demo,
)
from relscale.sweep.executors import WorkerOptions, worker_loop

BUDGETS = [1.25e9, 2.5e9, 5e9]


def _starts(run_dir):
    lines = (run_dir / "attempts.jsonl").read_text().splitlines()
    return sum(json.loads(line)["event"] == "start" for line in lines)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    from relscale.data import prepare_default

    prepare_default(out / "data", log=lambda _: None, vocab_size=DEMO_VOCAB)
    # An interrupted demo: the sweep directories exist and two runs finished before the stop.
    sweeps = _open_sweeps(out / "sweep", out / "data", "cpu", 1.0, BUDGETS, echo=lambda _: None)
    worker_loop(sweeps[0].root, WorkerOptions(max_runs=2, wait=False, threads=1, verbose=False))
    finished_before = [r for r in sweeps[0].records if (sweeps[0].run_dir(r) / "result.json").exists()]
    assert len(finished_before) == 2
    lines: list[str] = []
    result = run_demo(out, budgets=BUDGETS, n_boot=200, device="cpu", echo=lines.append)
    return out, sweeps, finished_before, result, "\n".join(lines)


def test_demo_resumes_without_redoing_finished_runs(demo):
    out, sweeps, finished_before, result, _ = demo
    records = [(s, r) for s in sweeps for r in s.records]
    assert result.runs == len(records) >= 9
    for sweep, record in records:  # every run trained exactly once, the two early ones included
        assert _starts(sweep.run_dir(record)) == 1, record.folder
    # A second demo finds everything done: no run starts, no dump is rewritten.
    dumps = sorted((out / "evals").rglob("*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in dumps]
    again = run_demo(out, budgets=BUDGETS, n_boot=50, device="cpu", echo=lambda _: None)
    assert again.runs == result.runs
    assert [p.stat().st_mtime_ns for p in dumps] == stamps
    assert all(_starts(s.run_dir(r)) == 1 for s, r in records)
    assert finished_before


def test_every_budget_has_an_interior_minimum_and_the_frontier_three_points(demo):
    _, sweeps, _, result, printed = demo
    assert len(sweeps) == len(BUDGETS) >= 3
    for grouping in GROUPINGS:
        iso = result.reports[grouping].isoflop
        assert len(iso.budgets) == len(BUDGETS)
        for b in iso.budgets:
            assert not b.concave, f"budget {b.budget:.3g}: parabola opens downward"
            assert not b.at_edge, f"budget {b.budget:.3g}: minimum at the edge of {b.x_range}"
            assert b.x_range[0] < b.n_opt < b.x_range[1]
        law = iso.n_opt_law
        assert law is not None and law.n_points >= 3
        assert np.isfinite(law.exponent) and np.all(np.isfinite(law.exponent_ci))
    assert result.plan["frontier_points"] >= 3 and all(result.plan["interior_minima"])
    # the point of the output: the relative-law table, with the models behind each law
    assert "Relative laws" in printed and "verdict" in printed and " n " in printed


def test_demo_outputs_have_the_expected_shapes(demo):
    out, sweeps, _, result, printed = demo
    n_runs = sum(len(s.records) for s in sweeps)
    index = pd.concat(pd.read_parquet(s.root / "results.parquet") for s in sweeps)
    assert len(index) == n_runs and set(index["status"]) == {"done"}
    dumps = pd.concat(pd.read_parquet(p) for p in (out / "evals").rglob("*.parquet"))
    assert dumps["model_id"].nunique() == n_runs
    assert set(GROUPINGS) <= set(dumps["grouping"])  # the data's group fields (party too)
    for grouping in GROUPINGS:
        folder = out / "fit" / grouping
        for name in ("relative_laws.csv", "group_laws.csv", "isoflop_budgets.csv", "summary.txt",
                     "relative_trajectories.png", "isoflop.png"):
            assert (folder / name).stat().st_size > 0, folder / name
        assert f"groups by {grouping}" in printed
    assert "delta_beta" in printed and "verdict" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["runs_finished"] == n_runs and summary["plan"]["budgets"] == BUDGETS


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


def test_widths_are_chosen_around_each_budgets_predicted_optimum():
    from relscale.sweep.grid import build_grid, chinchilla_optimal_params

    shape = _shape("cpu")
    budgets = [2.5e9, 1e10, 4e10, 1.6e11]
    configs = budget_sweeps(shape, budgets, DEMO_VOCAB)
    previous = 0
    for budget, cfg in zip(budgets, configs):
        runs = build_grid(cfg, {"sotu": DEMO_VOCAB})
        params = sorted(r.params for r in runs)
        assert len(runs) == 5 and {r.budget for r in runs} == {budget}
        # the window surrounds the prediction (or starts at the narrowest width the rule allows)
        n_opt = chinchilla_optimal_params(budget, tokens_per_param=TOKENS_PER_PARAM)
        assert params[-1] > n_opt and (params[0] < n_opt or cfg.width.min == shape.width.min)
        assert cfg.width.min >= previous  # widths move up with the budget
        previous = cfg.width.min
    # 6ND with 20 tokens per parameter, by hand: C_train = 3 x 1e10, N = sqrt(3e10 / 120)
    assert chinchilla_optimal_params(1e10) == pytest.approx(math.sqrt(3e10 / 120))
    assert chinchilla_optimal_params(3e10, flop_convention="train") == pytest.approx(math.sqrt(3e10 / 120))


def test_runs_that_repeat_their_data_are_reported():
    shape = _shape("cpu")
    configs = budget_sweeps(shape, [1e10], DEMO_VOCAB)
    assert epochs_report(configs, DEMO_VOCAB, train_tokens=10**9) == []
    lines = epochs_report(configs, DEMO_VOCAB, train_tokens=10_000)  # a 10k-token corpus
    assert lines and all(f"> {MAX_EPOCHS:g} epochs" in line for line in lines)
