"""The GPU session tooling checked on the CPU (it cannot run here): gpu_session.sh's argument
handling, run_all's skip rules (missing package, missing profile) and the summary table."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import run_all  # noqa: E402
import summarize  # noqa: E402


def _bash(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BENCH / "gpu_session.sh"), *args], capture_output=True, text=True,
                          timeout=60)


def test_gpu_session_script_parses_and_refuses_bad_arguments():
    assert subprocess.run(["bash", "-n", str(BENCH / "gpu_session.sh")]).returncode == 0
    bad = _bash("--fast")
    assert bad.returncode == 2 and "unknown option '--fast'" in bad.stderr
    two = _bash("out_a", "out_b")
    assert two.returncode == 2 and "one output folder only" in two.stderr
    usage = _bash("--help")
    assert usage.returncode == 0 and "--quick" in usage.stdout and "--dry-run" in usage.stdout
    if shutil.which("shellcheck"):
        check = subprocess.run(["shellcheck", str(BENCH / "gpu_session.sh")], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout


def test_missing_package_is_found_through_the_exception_chain():
    try:
        try:
            import relscale_no_such_package  # noqa: F401
        except ImportError as inner:
            raise RuntimeError("benchmark set-up failed") from inner
    except RuntimeError as outer:
        assert run_all.missing_package(outer) == "relscale_no_such_package"
    assert run_all.missing_package(ValueError("no import involved")) is None


def test_quick_profile_exists_for_every_headline_benchmark():
    benchmarks, broken, _ = run_all.discover()
    for name in ("ceilings", "rmsnorm", "cross_entropy", "attention", "train_step"):
        assert name in benchmarks, (name, broken)
        assert "quick" in benchmarks[name].PROFILES, name


def test_summary_lists_measured_and_skipped_records(tmp_path):
    payload = {
        "name": "train_step", "provenance": {"device": "NVIDIA H200", "torch": "2.11.0", "git_commit": "abc"},
        "records": [
            {"hidden": 512, "seq": 4096, "status": "ok", "median_ms": 123.4, "tokens_per_s": 265000.0,
             "mfu_vs_matmul_pct": 41.5},
            {"op": "rmsnorm", "impl": "liger", "skipped": "liger_kernel not importable"},
        ],
    }
    (tmp_path / "train_step-x.json").write_text(json.dumps(payload))
    (tmp_path / "broken.json").write_text("{not json")
    lines = summarize.summarize(tmp_path)
    text = "\n".join(lines)
    assert "== train_step on NVIDIA H200" in text
    assert "hidden=512 seq=4096" in text and "123.400 ms" in text and "MFU 41.5% of matmul" in text
    assert "265,000 tok/s" in text and "skipped: liger_kernel not importable" in text
    assert "broken.json: unreadable" in text
    with pytest.raises(SystemExit):
        summarize.main([str(tmp_path / "missing")])
