"""bench/harness.py and bench/run_all.py on the CPU: timing, limits, atomic result files, and an
end-to-end ``run_all.py --profile ci --only rmsnorm`` that writes valid JSON into a temp dir."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402


def test_datasheet_limits_by_device_name():
    assert harness.datasheet_bandwidth("NVIDIA H100 80GB HBM3") == 3350
    assert harness.datasheet_bandwidth("NVIDIA H200") == 4800
    assert harness.datasheet_bf16_tflops("NVIDIA H100 80GB HBM3") == 989
    assert harness.datasheet_bandwidth("cpu (x86_64)") is None


def test_achieved_rates_by_hand():
    # 2e9 bytes in 1 ms = 2000 GB/s = 50% of a 4000 GB/s copy; CPU has no datasheet entry.
    record = harness.bandwidth_record(2e9, 1.0, 4000.0, "cpu")
    assert record["gbps"] == pytest.approx(2000.0)
    assert record["pct_of_copy"] == pytest.approx(50.0)
    assert record["pct_of_datasheet"] is None
    assert harness.flops_record(3e12, 2.0, "cpu")["tflops"] == pytest.approx(1500.0)


def test_time_fn_measures_a_known_sleep():
    timing = harness.time_fn(lambda: time.sleep(0.003), warmup=1, rep=30)
    assert 3.0 <= timing["median_ms"] < 30.0
    assert timing["p20_ms"] <= timing["median_ms"] <= timing["p80_ms"]


def test_write_results_is_atomic_and_never_overwrites(tmp_path):
    first = harness.write_results("demo", [{"x": 1}], meta={"device": "cpu"}, out_dir=tmp_path)
    second = harness.write_results("demo", [{"x": 2}], meta={"device": "cpu"}, out_dir=tmp_path)
    assert first != second and first.name.startswith("demo-cpu-")
    assert json.loads(first.read_text())["records"] == [{"x": 1}]
    assert json.loads(second.read_text())["records"] == [{"x": 2}]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.name, second.name])  # no temp files
    with pytest.raises(ValueError, match="benchmark name"):
        harness.write_results("bad/name", [], out_dir=tmp_path)


def test_run_all_ci_rmsnorm_writes_valid_json(tmp_path):
    results_before = set((BENCH_DIR / "results").glob("rmsnorm-*.json"))
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH_DIR / "run_all.py"),
            "--profile",
            "ci",
            "--only",
            "rmsnorm",
            "--device",
            "cpu",
            "--out-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = list(tmp_path.glob("rmsnorm-cpu-*.json"))
    assert len(files) == 1, os.listdir(tmp_path)
    payload = json.loads(files[0].read_text())
    assert payload["name"] == "rmsnorm" and payload["meta"]["profile"] == "ci"
    for key in ("device", "torch", "triton", "python", "git_commit", "hostname", "time_utc"):
        assert key in payload["provenance"]
    measured = [r for r in payload["records"] if "skipped" not in r]
    assert {r["impl"] for r in measured} >= {"triton", "torch_eager", "torch_compile"}
    assert {r["direction"] for r in measured} == {"fwd", "bwd"}
    for r in measured:
        assert r["median_ms"] > 0
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["median_ms"] * 1e-3) / 1e9)
    # Every baseline either measured or skipped with a reason (Liger is optional).
    assert all(r["skipped"] for r in payload["records"] if "skipped" in r)
    results_after = set((BENCH_DIR / "results").glob("rmsnorm-*.json"))
    assert results_after == results_before, "a run with --out-dir must not write into bench/results"
