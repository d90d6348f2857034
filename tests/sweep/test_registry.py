"""The sweep directory: exclusive claims, stale-lease take-over, refusal of a changed config,
the results index, and speed at 10,000 runs (all with synthetic runs: no training here)."""

import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from relscale.config import TrainConfig, to_dict
from relscale.errors import ConfigError
from relscale.sweep.cli import list_text, status_text
from relscale.sweep.registry import HOST_KEY, Lease, Sweep, write_atomic
from relscale.sweep.results import INDEX_FILE, update_index


def synthetic_sweep(root, n: int, config: dict | None = None) -> Sweep:
    base = to_dict(TrainConfig())
    base["out_dir"] = ""

    def runs():
        for i in range(n):
            train = json.loads(json.dumps(base))
            train["steps"] = 10 + i
            row = {"name": f"run{i}", "dataset": "ds", "budget": float(10 ** (i % 3)), "hidden": 64,
                   "layers": 2, "heads": 4, "batch": 8, "steps": 10 + i, "tokens": 1024 * (10 + i),
                   "params": 1000, "non_embedding_params": 100, "lr": 1e-3, "beta2": 0.95,
                   "flops_train": 1e9, "flops_marin": 3e8}
            yield f"{i:016x}", f"run{i}-{i:08x}", row, train

    return Sweep.create(root, config or {"name": "synthetic", "n": n}, base, runs())


def finish(sweep: Sweep, claim, status="done"):
    row = {**claim.record.row, "run_id": claim.record.run_id, "status": status, "final_train_loss": 1.0,
           "final_val_loss": 2.0, "wall_s": 1.0, "gpu_hours": 0.0, "run_dir": f"runs/{claim.record.folder}"}
    sweep.mark(claim.record.run_id, status, {"row": row})
    sweep.release(claim)


def test_claims_are_exclusive_across_processes(tmp_path):
    """Four processes claim from one 300-run directory at once; every run is claimed exactly once."""
    synthetic_sweep(tmp_path / "s", 300)
    script = (
        "import sys, time\n"
        "from relscale.sweep.registry import Sweep\n"
        "sweep, out, start = Sweep(sys.argv[1]), open(sys.argv[2], 'w'), float(sys.argv[3])\n"
        "while time.time() < start: time.sleep(0.001)\n"
        "while (claim := sweep.claim(sys.argv[2])) is not None:\n"
        "    out.write(claim.record.run_id + '\\n'); out.flush()\n"
        "    sweep.mark(claim.record.run_id, 'done', {}); sweep.release(claim)\n"
    )
    start = time.time() + 1.5
    outs = [tmp_path / f"claims{i}.txt" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "s"), str(o), str(start)])
             for o in outs]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    claimed = [line for o in outs for line in o.read_text().split()]
    assert len(claimed) == len(set(claimed)) == 300
    assert sum(bool(o.read_text()) for o in outs) >= 2  # they really raced


def test_stale_lease_is_taken_over_once(tmp_path):
    sweep = synthetic_sweep(tmp_path / "s", 2)
    a = sweep.claim("worker-a")
    assert a.record.run_id == f"{0:016x}" and a.lease.attempt == 1
    b = sweep.claim("worker-b", lease_timeout_s=60)
    assert b.record.run_id == f"{1:016x}"
    assert sweep.claim("worker-c", lease_timeout_s=60) is None  # both held by live workers
    # worker-a stops heartbeating: back-date its lease past the timeout
    old = json.loads((sweep.leases / a.record.run_id).read_text())
    stale = Lease(**{**old, "heartbeat": time.time() - 600})
    write_atomic(sweep.leases / a.record.run_id, stale.to_json())
    os.utime(sweep.leases / a.record.run_id, (stale.heartbeat, stale.heartbeat))  # heartbeats touch it
    states = sweep.states(lease_timeout_s=60)
    assert [s.state for s in states.values()] == ["stale", "running"]
    c = sweep.claim("worker-c", lease_timeout_s=60)
    assert c.record.run_id == a.record.run_id and c.took_over and c.lease.attempt == 2
    assert len(list(sweep.marks.glob(f"{a.record.run_id}.lost-*"))) == 1
    # a second taker holding the same stale view loses the race and leaves c's lease alone
    d = sweep._take_over(c.record, stale, "worker-d", 0, 0, 2, 5, 60)
    assert d is None and sweep.owns(c.lease)
    # the old owner learns from its next heartbeat that the run is no longer its own
    assert sweep.heartbeat(a.lease) is False and sweep.heartbeat(c.lease) is True
    events = [json.loads(line)["event"] for line in (c.run_dir / "attempts.jsonl").read_text().splitlines()]
    assert events == ["start", "lost", "start"]


def test_dead_owner_on_this_host_is_stale_at_once(tmp_path):
    sweep = synthetic_sweep(tmp_path / "s", 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    now = time.time()
    lease = Lease(f"{0:016x}", "t", "dead-worker", HOST_KEY, dead.pid, 1, now, now)
    assert lease.is_stale(timeout_s=3600)
    assert not Lease(f"{0:016x}", "t", "me", HOST_KEY, os.getpid(), 1, now, now).is_stale(3600)
    # a pid on another host (or PID namespace) is never judged by liveness, only by heartbeat
    assert not Lease(f"{0:016x}", "t", "far", "other-host|ns", dead.pid, 1, now, now).is_stale(3600)
    write_atomic(sweep.leases / f"{0:016x}", lease.to_json())
    claim = sweep.claim("me", lease_timeout_s=3600)
    assert claim is not None and claim.took_over


def test_retries_then_failed(tmp_path):
    sweep = synthetic_sweep(tmp_path / "s", 1)
    for attempt in (1, 2):
        claim = sweep.claim("w", max_retries=1)
        assert claim.lease.attempt == attempt
        sweep.mark(claim.record.run_id, f"fail-{attempt}", {})
        sweep.release(claim)
    # two failures > max_retries=1: the next claimer closes the run as failed instead of running it
    assert sweep.claim("w", max_retries=1) is None
    assert sweep.states()[f"{0:016x}"].state == "failed"


def test_changed_config_is_refused_by_key(tmp_path):
    synthetic_sweep(tmp_path / "s", 3, {"name": "a", "budgets": [1.0, 2.0]})
    synthetic_sweep(tmp_path / "s", 3, {"name": "a", "budgets": [1.0, 2.0]})  # same config: reopens
    with pytest.raises(ConfigError, match=r"budgets: \[1.0, 2.0\] -> \[1.0, 3.0\]"):
        synthetic_sweep(tmp_path / "s", 3, {"name": "a", "budgets": [1.0, 3.0]})


def test_results_index_follows_marks(tmp_path):
    sweep = synthetic_sweep(tmp_path / "s", 6)
    for status in ("done", "diverged", "done"):
        finish(sweep, sweep.claim("w"), status)
    assert update_index(sweep) == 3
    # a busy index (another worker holds its lock) is skipped, and caught up by the next refresh
    lock = sweep.root / "results.lock"
    lock.write_text("{}")
    finish(sweep, sweep.claim("w"))
    assert update_index(sweep) is None
    lock.unlink()
    assert update_index(sweep) == 4
    table = pq.read_table(sweep.root / INDEX_FILE).to_pylist()
    assert sorted(r["status"] for r in table) == ["diverged", "done", "done", "done"]
    assert {r["run_id"] for r in table} == {f"{i:016x}" for i in range(4)}
    assert not list(sweep.root.glob(f".{INDEX_FILE}*"))  # no temp file left behind


def test_ten_thousand_runs_status_and_claim_under_a_second(tmp_path):
    root = tmp_path / "big"
    synthetic_sweep(root, 10_000)
    sweep = Sweep(root)
    for i in range(0, 10_000, 2):  # half finished (plain writes: setting up needs no fsync per file)
        (sweep.marks / f"{i:016x}.{'done' if i % 10 else 'diverged'}").write_text("{}")
    for i in (1, 3, 5):  # three runs held by live workers
        lease = Lease(f"{i:016x}", "t", "w", "other", 1, 1, time.time(), time.time())
        write_atomic(sweep.leases / f"{i:016x}", lease.to_json())

    start = time.perf_counter()
    text = status_text(Sweep(root), lease_timeout_s=120)  # a fresh process's view: reads runs.json
    status_s = time.perf_counter() - start
    assert "5000/10000 finished" in text

    start = time.perf_counter()
    claim = Sweep(root).claim("new-worker")
    claim_s = time.perf_counter() - start
    assert claim.record.run_id == f"{7:016x}"  # the first run neither finished nor held

    start = time.perf_counter()
    listing = list_text(Sweep(root), lease_timeout_s=120)
    list_s = time.perf_counter() - start
    assert listing.count("\n") == 10_000
    assert status_s < 1.0 and claim_s < 1.0, (status_s, claim_s, list_s)


def test_cli_refuses_missing_data_with_the_prepare_command(tmp_path, capsys):
    from relscale.cli import main

    config = tmp_path / "sweep.toml"
    config.write_text(f'budgets = [1e18]\nvocab_size = 128256\n[[datasets]]\nname = "sotu"\n'
                      f'path = "{tmp_path / "absent"}"\n')
    assert main(["sweep", "run", str(tmp_path / "s"), "--config", str(config)]) == 2
    assert f"relscale prepare --out {tmp_path / 'absent'}" in capsys.readouterr().err
    assert main(["sweep", "status", str(tmp_path / "s")]) == 0  # initialised, nothing run
    assert "0/5 finished" in capsys.readouterr().out  # 1e18: five widths, as in the marin preset
    assert main(["sweep", "status", str(tmp_path / "elsewhere")]) == 2
    assert "not a sweep directory" in capsys.readouterr().err


def test_torchrun_config_file_round_trips(tmp_path):
    from relscale.config import load_train_config
    from relscale.sweep.executors import to_toml
    from relscale.sweep.grid import build_grid
    from relscale.sweep.presets import marin

    run = build_grid(marin())[40]
    train = run.train
    train.out_dir = str(tmp_path / "out")
    train.dump_steps = [10, 20]
    path = tmp_path / "train.toml"
    path.write_text(to_toml(to_dict(train)))
    assert load_train_config(path) == train
