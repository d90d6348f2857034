"""Sweep robustness: the lease is a compare-and-set under forced interleavings of a stalled
worker's heartbeat and another worker's take-over; a truncated or planted checkpoint fails its run
with the cause recorded (the worker lives on) and the sweep exits non-zero; a corrupted
results.parquet is rebuilt from the marks."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
import time
import warnings
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from relscale.sweep import registry
from relscale.sweep.cli import init_sweep
from relscale.sweep.executors import WorkerOptions, worker_loop
from relscale.sweep.registry import HOST_KEY, Lease, Sweep
from relscale.sweep.results import INDEX_FILE, read_index, update_index
from relscale.train import checkpoint as ckpt
from tests.sweep.test_registry import finish, synthetic_sweep

FAST = dict(heartbeat_s=0.2, lease_timeout_s=30.0, poll_s=0.2, verbose=False, threads=1)


def backdate(sweep: Sweep, run_id: str, seconds: float = 600) -> None:
    """Make a lease look stalled: its inode's mtime (what heartbeats touch) and JSON time old."""
    path = sweep.leases / run_id
    old = time.time() - seconds
    os.utime(path, (old, old))


def lease_token(sweep: Sweep, run_id: str) -> str:
    return json.loads((sweep.leases / run_id).read_text())["token"]


# ------------------------------------------------------------------------------- lease races


def test_late_heartbeat_between_takeover_read_and_write_leaves_one_owner(tmp_path, monkeypatch):
    """Worker a stalls; b takes over. a's late heartbeat is forced to land after b judged the
    lease stale (read) and before b writes its own lease. Exactly one owner remains: b."""
    sweep = synthetic_sweep(tmp_path / "s", 1)
    a = sweep.claim("worker-a")
    backdate(sweep, a.record.run_id)
    beats: list[bool] = []
    threads: list[threading.Thread] = []

    def race(point: str) -> None:
        if point == "takeover:judged" and not threads:
            thread = threading.Thread(target=lambda: beats.append(sweep.heartbeat(a.lease)))
            threads.append(thread)
            thread.start()
            time.sleep(0.2)  # a's heartbeat runs now, between b's read and b's write

    monkeypatch.setattr(registry, "_race_point", race)
    b = sweep.claim("worker-b", lease_timeout_s=60)
    threads[0].join()
    monkeypatch.setattr(registry, "_race_point", lambda point: None)
    assert b is not None and b.took_over
    assert beats == [False]  # the stalled worker learns it lost the run
    assert lease_token(sweep, b.record.run_id) == b.lease.token
    assert sweep.owns(b.lease) and not sweep.owns(a.lease)
    assert sweep.heartbeat(b.lease) is True and sweep.heartbeat(a.lease) is False
    assert lease_token(sweep, b.record.run_id) == b.lease.token  # a never overwrote b's lease


def test_takeover_between_heartbeat_touch_and_check_keeps_the_live_owner(tmp_path, monkeypatch):
    """The other interleaving: a's heartbeat touched its lease, then (forced) b tries a take-over
    before a checks ownership. b sees a fresh heartbeat and backs off; a still owns the run."""
    sweep = synthetic_sweep(tmp_path / "s", 1)
    a = sweep.claim("worker-a")
    backdate(sweep, a.record.run_id)
    stale_view = sweep.read_lease(a.record.run_id)
    assert stale_view.is_stale(60)  # what b saw when it listed the leases
    taken: list[object] = []

    def race(point: str) -> None:
        if point == "heartbeat:touched" and not taken:
            taken.append(sweep._take_over(a.record, stale_view, "worker-b", 0, 0, 2, 5, 60))

    monkeypatch.setattr(registry, "_race_point", race)
    assert sweep.heartbeat(a.lease) is True
    monkeypatch.setattr(registry, "_race_point", lambda point: None)
    assert taken == [None]
    assert sweep.owns(a.lease) and lease_token(sweep, a.record.run_id) == a.lease.token
    assert not list(sweep.marks.glob("*.lost-*"))


def test_racing_heartbeats_and_takeovers_never_give_two_owners(tmp_path):
    """Many rounds of a stalled owner heartbeating while two takers race: after each round at
    most one lease holder believes it owns the run, and it is the one the lease file names."""
    rid = f"{0:016x}"
    for round_ in range(15):
        sweep = synthetic_sweep(tmp_path / f"s{round_}", 1)
        owner = sweep.claim("owner", lease_timeout_s=60)
        backdate(sweep, rid)
        claims: list[object] = []
        beats: list[bool] = []

        def take(worker: str, sweep=sweep, claims=claims) -> None:
            claims.append(sweep.claim(worker, lease_timeout_s=60))

        def beat(sweep=sweep, owner=owner, beats=beats) -> None:
            beats.append(sweep.heartbeat(owner.lease))

        workers = [threading.Thread(target=take, args=(w,)) for w in ("t1", "t2")]
        workers.append(threading.Thread(target=beat))
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        holders = [c.lease for c in claims if c is not None] + ([owner.lease] if beats[0] else [])
        owning = [lease for lease in holders if sweep.owns(lease)]
        assert len(owning) <= 1
        if (sweep.leases / rid).exists() and owning:
            assert lease_token(sweep, rid) == owning[0].token
        assert sum(c is not None for c in claims) <= 1  # of two takers, at most one wins


# ------------------------------------------------------------------ broken checkpoints in a sweep


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, sotu_subset) -> Path:
    """A one-budget micro sweep trained to the end, checkpoints kept."""
    from relscale.config import TrainConfig
    from tests.sweep.conftest import BatchRule, DatasetSpec, DepthRule, LRRule, SweepConfig, WidthRule

    cfg = SweepConfig(
        name="micro", budgets=[2e8], flop_convention="marin", flop_tolerance=0.05, seq_len=32, head_dim=8,
        target_steps=16, width=WidthRule(min=16, max=16, step=16), depth=DepthRule(rule="fixed", layers=1),
        batch=BatchRule(rule="fixed", size=4), lr=LRRule(rule="fixed", value=0.01),
        datasets=[DatasetSpec(name="sotu", path=sotu_subset)],
        train=TrainConfig(ckpt_interval=5, eval_batches=2, log_interval=5, progress=False))
    cfg.validate()
    root = tmp_path_factory.mktemp("robust") / "sweep"
    sweep = init_sweep(root, cfg)
    assert worker_loop(sweep.root, WorkerOptions(**FAST, keep_checkpoints=True)) == {"done": 1}
    return root


def unfinish(src: Path, dest: Path) -> tuple[Sweep, Path]:
    """A copy of a finished one-run sweep whose run must resume from its latest checkpoint, held
    by a dead worker's lease (so the next worker takes it over)."""
    shutil.copytree(src, dest)
    sweep = Sweep(dest)
    record = sweep.records[0]
    run_dir = sweep.run_dir(record)
    (sweep.marks / f"{record.run_id}.done").unlink()
    (dest / INDEX_FILE).unlink()
    for name in ("result.json", "final"):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    now = time.time()
    dead = Lease(record.run_id, "deadbeef", "dead-worker", HOST_KEY, 2**22 + 12345, 1, now, now)
    (sweep.leases / record.run_id).write_text(dead.to_json())
    return sweep, ckpt.latest_checkpoint(run_dir)


def test_truncated_checkpoint_fails_the_run_with_its_cause_and_the_sweep_exits_1(
        tmp_path, finished_sweep, capsys, one_thread):
    sweep, step = unfinish(finished_sweep, tmp_path / "s")
    meta = json.loads((step / ckpt.META).read_text())
    del meta["files"]  # an older checkpoint without checksums: DCP itself meets the truncation
    (step / ckpt.META).write_text(json.dumps(meta))
    shard = step / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    from relscale.cli import main

    code = main(["sweep", "run", str(sweep.root), "--max-retries", "0", "--threads", "1", "--quiet",
                 "--heartbeat", "0.2", "--poll", "0.2", "--no-wait"])
    err = capsys.readouterr().err
    assert code == 1
    rid = sweep.records[0].run_id
    assert sweep.states()[rid].state == "failed"
    failed = json.loads((sweep.marks / f"{rid}.failed").read_text())
    assert str(step) in failed["error"] and "unreadable checkpoint" in failed["error"]
    assert f"run {sweep.records[0].folder} failed" in err and str(step) in err
    assert [r["status"] for r in pq.read_table(sweep.root / INDEX_FILE).to_pylist()] == ["failed"]


def test_raw_checkpoint_exception_is_a_run_failure_not_a_dead_worker(tmp_path, finished_sweep, monkeypatch):
    """torch's CheckpointException derives from BaseException: raised by the trainer it is
    recorded as the run's failure (with its message) and the worker goes on."""
    from torch.distributed.checkpoint.api import CheckpointException

    from relscale.sweep import executors

    sweep, _ = unfinish(finished_sweep, tmp_path / "s")

    def broken(self, cfg, on_step):
        raise CheckpointException("load failed", {0: (RuntimeError("unexpected pos 704 vs 598"), None)})

    monkeypatch.setattr(executors._Trainer, "inprocess", broken)
    counts = worker_loop(sweep.root, WorkerOptions(**FAST, max_retries=0))
    assert counts == {"failed": 1}
    rid = sweep.records[0].run_id
    fail_marks = [json.loads(p.read_text()) for p in sweep.marks.glob(f"{rid}.fail-*")]
    assert len(fail_marks) == 1 and "unexpected pos 704 vs 598" in fail_marks[0]["error"][0]
    failed = json.loads((sweep.marks / f"{rid}.failed").read_text())
    assert "CheckpointException" in failed["error"]


def test_takeover_refuses_a_planted_checkpoint_payload(tmp_path, finished_sweep, one_thread):
    from tests.cli.test_checkpoint_safety import plant_payload

    sweep, step = unfinish(finished_sweep, tmp_path / "s")
    marker = tmp_path / "marker"
    plant_payload(step, marker)
    counts = worker_loop(sweep.root, WorkerOptions(**FAST, max_retries=0))
    assert counts == {"failed": 1} and not marker.exists()
    rid = sweep.records[0].run_id
    assert len(list(sweep.marks.glob(f"{rid}.lost-*"))) == 1  # it was a take-over
    failed = json.loads((sweep.marks / f"{rid}.failed").read_text())
    assert "refusing to load" in failed["error"] and "builtins.exec" in failed["error"]


def test_runs_failed_after_lost_attempts_record_the_last_error(tmp_path):
    sweep = synthetic_sweep(tmp_path / "s", 1)
    rid = f"{0:016x}"
    sweep.mark(rid, "fail-1", {"error": ["DataError: shard_00003.bin is corrupted"]})
    for k in range(6):
        sweep.mark(rid, f"lost-{k}-x", {})
    assert sweep.claim("w", max_retries=2, max_lost=5) is None
    failed = json.loads((sweep.marks / f"{rid}.failed").read_text())
    assert "shard_00003.bin is corrupted" in failed["error"] and "6 lost" in failed["reason"]


# --------------------------------------------------------------------------- the results index


def test_corrupted_results_index_is_rebuilt_from_the_marks(tmp_path):
    sweep = synthetic_sweep(tmp_path / "s", 4)
    for status in ("done", "diverged", "done"):
        finish(sweep, sweep.claim("w"), status)
    assert update_index(sweep) == 3
    expected = sorted(map(json.dumps, read_index(sweep.root).to_pylist()))
    index = sweep.root / INDEX_FILE
    data = bytearray(index.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\0" * 64  # corrupted in place
    index.write_bytes(bytes(data[: len(data) - 7]))
    with pytest.warns(UserWarning, match=rf"{INDEX_FILE}: unreadable results index.*rebuilding"):
        table = read_index(sweep.root)
    assert sorted(map(json.dumps, table.to_pylist())) == expected
    assert sorted(map(json.dumps, pq.read_table(index).to_pylist())) == expected  # rewritten
    # a worker refreshing the index after a new result also survives a corrupted file
    index.write_bytes(b"not parquet at all")
    finish(sweep, sweep.claim("w"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert update_index(sweep) == 4
    assert any("rebuilding" in str(w.message) for w in caught)


def test_pickle_is_not_used_for_marks(tmp_path):
    """Marks and leases are JSON: a garbage mark is a warning and the grid row, not a crash."""
    sweep = synthetic_sweep(tmp_path / "s", 2)
    finish(sweep, sweep.claim("w"))
    (sweep.marks / f"{1:016x}.done").write_bytes(pickle.dumps(object()))
    with pytest.warns(UserWarning, match=r"unreadable JSON.*grid row"):
        assert update_index(sweep) == 2


def corrupted_index_sweep(root: Path) -> Sweep:
    sweep = synthetic_sweep(root, 4)
    for _ in range(3):
        finish(sweep, sweep.claim("w"))
    update_index(sweep)
    (sweep.root / INDEX_FILE).write_bytes(b"PAR1 garbage PAR1")
    return sweep


def test_fit_reads_a_sweep_whose_index_is_corrupted(tmp_path):
    from relscale.fit.io import read_results_index

    sweep = corrupted_index_sweep(tmp_path / "s")
    with pytest.warns(UserWarning, match="rebuilding"):
        data = read_results_index(sweep.root)
    assert len(data.frame) == 3


def test_eval_lists_a_sweep_whose_index_is_corrupted(tmp_path):
    from relscale.eval.runner import _sweep_runs

    sweep = corrupted_index_sweep(tmp_path / "s")
    with pytest.warns(UserWarning, match="rebuilding"):
        runs = _sweep_runs(sweep.root)
    assert len(runs) == 3
