"""Sweeps that really train (micro budgets on a subset of the default corpus, on the CPU):
kill-and-resume gives the uninterrupted results, two workers never run a run twice, NaN runs
are marked diverged, failing runs are retried then marked failed, and the submitit and torchrun
executors drive the same worker."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from relscale.sweep.cli import init_sweep
from relscale.sweep.executors import WorkerOptions, execute, run_slurm, to_toml, worker_loop
from relscale.sweep.registry import Sweep
from relscale.sweep.results import INDEX_FILE
from relscale.sweep.spec import DatasetSpec, LRRule, WidthRule, load_sweep_config, sweep_config_to_dict
from relscale.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.slow
FAST = dict(heartbeat_s=0.2, lease_timeout_s=30.0, poll_s=0.2, verbose=False, threads=1)


def results(sweep_dir) -> dict[str, dict]:
    return {row["run_id"]: row for row in pq.read_table(Path(sweep_dir) / INDEX_FILE).to_pylist()}


def attempt_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "attempts.jsonl").read_text().splitlines()]


def worker_command(sweep_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "relscale", "sweep", "run", str(sweep_dir), "--threads", "1", "--quiet",
            "--heartbeat", "0.2", "--poll", "0.2", *extra]


def test_killed_sweep_resumes_to_the_uninterrupted_results(tmp_path, micro_config, one_thread):
    cfg = micro_config()
    reference = init_sweep(tmp_path / "reference", cfg)
    assert worker_loop(reference.root, WorkerOptions(**FAST)) == {"done": 4}
    expected = results(reference.root)
    assert all(row["status"] == "done" for row in expected.values()) and len(expected) == 4

    # Start the same sweep in a worker process; SIGKILL it once a run has its first checkpoint.
    sweep = init_sweep(tmp_path / "killed", cfg)
    worker = subprocess.Popen(worker_command(sweep.root), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline and worker.poll() is None:
        for record in sweep.records:
            run_dir = sweep.run_dir(record)
            if latest_checkpoint(run_dir) is not None and not (run_dir / "result.json").exists():
                victim = record
                break
        time.sleep(0.005)
    assert victim is not None, "the worker finished before it could be killed"
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    finished_before = {rid for rid, s in sweep.states().items() if s.state == "done"}
    assert victim.run_id not in finished_before

    # Start again: the dead worker's lease is taken over at once (its process is gone), the
    # interrupted run resumes from its checkpoint, and nothing finished is trained again.
    assert sum(worker_loop(sweep.root, WorkerOptions(**FAST)).values()) == 4 - len(finished_before)
    got = results(sweep.root)
    assert set(got) == set(expected)
    for run_id, row in expected.items():
        assert got[run_id]["status"] == "done"
        assert got[run_id]["final_train_loss"] == pytest.approx(row["final_train_loss"], rel=1e-6, abs=1e-7)
        assert got[run_id]["final_val_loss"] == pytest.approx(row["final_val_loss"], rel=1e-6, abs=1e-7)
    for record in sweep.records:
        events = attempt_events(sweep.run_dir(record))
        starts = [e for e in events if e["event"] == "start"]
        if record.run_id == victim.run_id:
            assert [e["event"] for e in events] == ["start", "lost", "start", "end"]
            assert starts[1]["took_over"] and events[-1]["first_step_index"] > 1  # resumed mid-run
        else:
            assert len(starts) == 1


def test_two_workers_share_a_sweep_without_repeating_a_run(tmp_path, micro_config):
    """Two worker processes started together on a fresh directory: both initialise it from the
    config file (one creates, the other finds the same config), then share the runs."""
    cfg = micro_config(budgets=[2e8, 4e8, 6e8])
    config = tmp_path / "micro.toml"
    config.write_text(to_toml(sweep_config_to_dict(cfg)))
    assert load_sweep_config(config) == cfg
    root = tmp_path / "shared"
    command = worker_command(root, "--config", str(config))
    workers = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err
    sweep = Sweep(root)
    states = sweep.states()
    assert len(states) == 6 and all(s.state == "done" for s in states.values())
    for record in sweep.records:
        events = attempt_events(sweep.run_dir(record))
        assert [e["event"] for e in events] == ["start", "end"]
    logs = [[json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((sweep.root / "workers").glob("*.jsonl"))]
    assert len(logs) == 2  # two workers ran
    runs = [e for log in logs for e in log if e["event"] == "run"]
    assert sorted(e["run_id"] for e in runs) == sorted(r.run_id for r in sweep.records)
    # fixed cost of a warm worker: from the claim of the next run to its first optimizer step
    warm = [e["start_to_first_step_s"] for log in logs for e in log[2:] if e["event"] == "run"]
    assert warm and max(warm) < 5.0


def test_nan_runs_are_marked_diverged_and_not_retried(tmp_path, micro_config, one_thread):
    cfg = micro_config(budgets=[2e8], lr=LRRule(rule="fixed", value=1e30))
    sweep = init_sweep(tmp_path / "nan", cfg)
    assert worker_loop(sweep.root, WorkerOptions(**FAST, max_retries=3)) == {"diverged": 2}
    rows = results(sweep.root)
    assert [row["status"] for row in rows.values()] == ["diverged", "diverged"]
    for record in sweep.records:
        assert [e["event"] for e in attempt_events(sweep.run_dir(record))] == ["start", "end"]
        assert json.loads((sweep.run_dir(record) / "result.json").read_text())["status"] == "diverged"


def test_in_process_workers_write_the_dumps_of_dump_steps(tmp_path, micro_config, one_thread):
    # The trainer only calls on_step hooks; the in-process executor must attach the dump hook itself.
    from relscale.config import TrainConfig

    train = TrainConfig(ckpt_interval=5, eval_batches=2, log_interval=5, progress=False, dump_steps=[4])
    cfg = micro_config(budgets=[2e8], width=WidthRule(min=16, max=16, step=16), train=train)
    sweep = init_sweep(tmp_path / "dumps", cfg)
    assert worker_loop(sweep.root, WorkerOptions(**FAST)) == {"done": 1}
    (record,) = sweep.records
    dumps = sorted((sweep.run_dir(record) / "evals").rglob("*.parquet"))
    assert dumps and all("step_0000004" in str(path) for path in dumps)
    assert pq.read_table(dumps[0]).num_rows > 0


def test_failing_runs_are_retried_then_failed(tmp_path, micro_config, one_thread, sotu_subset):
    datasets = [DatasetSpec("sotu", sotu_subset), DatasetSpec("gone", str(tmp_path / "gone"))]
    cfg = micro_config(budgets=[2e8], vocab_size=512, datasets=datasets)
    sweep = init_sweep(tmp_path / "failing", cfg)
    counts = worker_loop(sweep.root, WorkerOptions(**FAST, max_retries=1))
    assert counts == {"done": 2, "retry": 2, "failed": 2}
    rows = results(sweep.root)
    assert sorted(row["status"] for row in rows.values()) == ["done", "done", "failed", "failed"]
    for record in sweep.records:
        if record.row["dataset"] == "gone":
            run_dir = sweep.run_dir(record)
            assert sorted(p.name for p in run_dir.glob("error-*.txt")) == ["error-1.txt", "error-2.txt"]
            assert "Traceback" in (run_dir / "error-2.txt").read_text()
            assert str(tmp_path / "gone") in (run_dir / "error-2.txt").read_text()


def test_slurm_executor_with_submitit_local(tmp_path, micro_config):
    pytest.importorskip("submitit")
    sweep = init_sweep(tmp_path / "slurm", micro_config(budgets=[2e8]))
    jobs = run_slurm(sweep.root, WorkerOptions(**FAST), 1, folder=tmp_path / "jobs", cluster="local")
    assert jobs[0].result() == {"done": 2}
    assert all(s.state == "done" for s in Sweep(sweep.root).states().values())


def test_torchrun_executor_trains_a_run(tmp_path, micro_config):
    cfg = micro_config(budgets=[2e8], width=WidthRule(min=16, max=16, step=16))
    sweep = init_sweep(tmp_path / "torchrun", cfg)
    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        assert execute(sweep.root, "torchrun", 1, WorkerOptions(**FAST)) == 0
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads
    (row,) = results(sweep.root).values()
    assert row["status"] == "done" and row["final_val_loss"] > 0
    run_dir = sweep.root / row["run_dir"]
    assert (run_dir / "train_config.toml").is_file() and (run_dir / "final").is_dir()
