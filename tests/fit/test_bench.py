"""bench/bench_fit.py runs (ci profile) and reports what it measured."""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_bench_fit_ci_profile_runs():
    sys.path.insert(0, str(BENCH))
    try:
        import bench_fit
    finally:
        sys.path.remove(str(BENCH))
    assert bench_fit.NAME == "fit"
    records = bench_fit.run("ci", "cpu")
    by_name = {r["name"]: r for r in records}
    rel = by_name["relative_laws_paired_bootstrap"]
    assert (rel["groups"], rel["models"], rel["draws"]) == (50, 30, 200)
    assert rel["median_ms"] > 0 and sum(rel["verdicts"].values()) == 50
    assert by_name["approach3_lbfgsb_64_starts_plus_bootstrap"]["converged"]
