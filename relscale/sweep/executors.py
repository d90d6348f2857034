"""Workers and executors: who trains the runs of a sweep directory, and where.

A *worker* loops: claim the next free run (registry lease), train it with ``train(resume=True)``
while a background thread heartbeats the lease, record the outcome (marks, attempt log, results
index), repeat; when nothing is free it waits for runs held by other workers (taking them over
if their worker dies) until every run is finished. Executors start workers:

* ``inprocess``: this process is the worker and calls relscale.train.train directly, so imports,
  compiled kernels, the open data and allocator caches stay warm from one run to the next;
  ``--workers N`` > 1 starts N such workers as local subprocesses.
* ``local-gpus``: one subprocess worker per local GPU, pinned with CUDA_VISIBLE_DEVICES.
* ``torchrun``: this process is the worker, but each claimed run is trained by
  ``python -m torch.distributed.run --nproc_per_node G -m relscale.train CONFIG --resume`` (G =
  the sweep's batch.gpus_per_run), for runs that need several GPUs.
* ``slurm``: N Slurm jobs (through submitit, an optional extra), each running one worker.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from relscale.config import to_dict
from relscale.errors import RelscaleError
from relscale.sweep.registry import (
    DEFAULT_HEARTBEAT_S,
    DEFAULT_LEASE_TIMEOUT_S,
    TERMINAL,
    Claim,
    Heartbeat,
    Sweep,
    new_worker_id,
    write_atomic,
)
from relscale.sweep.results import result_row, update_index
from relscale.train import run_dir as run_folder  # torch-free run-folder contract

EXECUTORS = ("inprocess", "local-gpus", "torchrun", "slurm")


@dataclass
class WorkerOptions:
    """How a sweep worker behaves: retry limits, lease heartbeat and timeout (seconds), polling,
    when to stop, how a claimed run is launched, and torch CPU threads."""

    max_retries: int = 2  # a run that raised is tried again this many times
    max_lost: int = 5  # ... and taken over from dead workers this many times
    heartbeat_s: float = DEFAULT_HEARTBEAT_S
    lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S
    poll_s: float = 5.0  # wait between looks when every unfinished run is held by another worker
    wait: bool = True  # False: stop when nothing is free instead of waiting for other workers
    max_runs: int | None = None  # stop after this many runs (benchmarks, tests)
    launcher: str = "inprocess"  # how a claimed run is trained: "inprocess" | "torchrun"
    nproc_per_run: int = 1  # torchrun processes per run
    threads: int | None = None  # torch CPU threads in the worker (None: torch's default)
    keep_checkpoints: bool = False  # False: delete a finished run's checkpoints (final/ stays)
    verbose: bool = True


class LeaseLost(Exception):
    """Our lease was taken over (we were presumed dead): stop training, record nothing."""


def _log(opts: WorkerOptions, message: str) -> None:
    if opts.verbose:
        print(f"[sweep {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------------------------------
# TOML for torchrun: the trainer's command line reads a TOML config


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value == math.inf else "-inf" if value == -math.inf
                                                  else repr(value))
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # inside a list: an inline table
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A config dict as TOML (None values are left out: in these configs None is the default)."""
    scalars = [f"{k} = {_toml_value(v)}" for k, v in data.items()
               if v is not None and not isinstance(v, dict)]
    tables = [to_toml(v, f"{prefix}{k}.") for k, v in data.items() if isinstance(v, dict)]
    head = [f"[{prefix[:-1]}]"] if prefix and scalars else []
    return "\n".join(head + scalars) + "\n" + "".join("\n" + t for t in tables)


# ---------------------------------------------------------------------------------------------
# Training one claimed run


class _Trainer:
    """Trains claimed runs. In-process it keeps the open data folders between runs."""

    def __init__(self, opts: WorkerOptions):
        self.opts = opts
        self._data: dict[str, Any] = {}

    def data(self, path: str):
        if path not in self._data:
            from relscale.data import PreparedData

            self._data[path] = PreparedData(path)
        return self._data[path]

    def inprocess(self, cfg, on_step) -> dict[str, Any]:
        from relscale.train import train
        from relscale.train.cli import dump_hook_for  # relscale.eval's dump hook when cfg.dump_steps is set

        dump = dump_hook_for(cfg)
        hooks = [on_step] if dump is None else [dump, on_step]
        result = train(cfg, resume=True, data=self.data(cfg.data.path), progress=False, on_step=hooks)
        return asdict(result)

    def torchrun(self, cfg, run_dir: Path, heartbeat: Heartbeat) -> dict[str, Any]:
        config_path = run_dir / "train_config.toml"
        write_atomic(config_path, to_toml(to_dict(cfg)))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={self.opts.nproc_per_run}", "-m", "relscale.train", str(config_path),
                   "--resume"]
        with open(run_dir / "torchrun.log", "a") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            while process.poll() is None:
                if heartbeat.lost:
                    process.terminate()
                    process.wait()
                    raise LeaseLost()
                time.sleep(0.5)
        result = run_folder.read_result(cfg.out_dir)  # None while unfinished; DataError naming a garbage file
        if result is not None and result.get("status") == "diverged":
            from relscale.train import TrainingDiverged

            raise TrainingDiverged(result.get("diverged_step"), result.get("diverged_loss"))
        if process.returncode != 0 or result is None:
            tail = (run_dir / "torchrun.log").read_text()[-4000:]
            raise RuntimeError(f"torchrun exited with status {process.returncode}:\n{tail}")
        return result


def _gpus_used(cfg, opts: WorkerOptions) -> int:
    if cfg.device == "cpu":
        return 0
    try:
        import torch

        on_gpu = torch.cuda.is_available()
    except ImportError:
        on_gpu = False
    return (opts.nproc_per_run if opts.launcher == "torchrun" else 1) if on_gpu else 0


def run_claim(sweep: Sweep, claim: Claim, trainer: _Trainer, worker: str,
              opts: WorkerOptions) -> dict[str, Any]:
    """Train one claimed run and record its outcome; returns timing and outcome for the log."""
    from relscale.train import TrainingDiverged

    record, run_dir = claim.record, claim.run_dir
    cfg = None
    attempt = claim.lease.attempt
    timing: dict[str, Any] = {"train_start": time.perf_counter(), "first_step": None,
                              "first_step_index": None, "last_step": None}
    status, result, error = "failed", None, None
    with Heartbeat(sweep, claim.lease, opts.heartbeat_s) as heartbeat:
        def on_step(done: int, model: Any) -> None:
            if timing["first_step"] is None:
                timing["first_step"] = time.perf_counter()
                timing["first_step_index"] = done  # > 1 when resumed from a checkpoint
            timing["last_step"] = time.perf_counter()
            if heartbeat.lost:
                raise LeaseLost()

        try:
            cfg = sweep.train_config(record, run_dir)
            if opts.launcher == "torchrun":
                result = trainer.torchrun(cfg, run_dir, heartbeat)
            else:
                result = trainer.inprocess(cfg, on_step)
            status = "done"
        except TrainingDiverged as err:
            status, error = "diverged", str(err)
            result = run_folder.read_result(run_dir)
        except LeaseLost:
            status = "lost"
        except KeyboardInterrupt:
            sweep.log_attempt(run_dir, {"event": "interrupted", "attempt": attempt, "worker": worker})
            sweep.release(claim)  # the checkpoint stays: the next worker resumes it at once
            raise
        except (SystemExit, GeneratorExit):
            raise
        except BaseException:  # noqa: BLE001 -- any error of a run is recorded, the sweep goes on
            # BaseException, not Exception: torch's CheckpointException (a truncated checkpoint)
            # derives from BaseException and would otherwise kill the worker with no cause recorded.
            error = traceback.format_exc()
    timing["train_end"] = time.perf_counter()
    if status == "lost" or heartbeat.lost or not sweep.owns(claim.lease):
        # Presumed dead and taken over: the new owner records the run; we record nothing.
        sweep.log_attempt(run_dir, {"event": "lease-lost", "attempt": attempt, "worker": worker})
        return {"status": "lost", **timing}

    rid = record.run_id
    if status in ("done", "diverged"):
        row = result_row(sweep, rid, status, result, _gpus_used(cfg, opts) if cfg is not None else 0)
        sweep.mark(rid, status, {"row": row, "result": result, "error": error})
    else:
        write_atomic(run_dir / f"error-{attempt}.txt", error or "")
        failures = claim.previous_failures + 1
        last_line = [error_summary(error or "")]
        sweep.mark(rid, f"fail-{attempt}", {"worker": worker, "error": last_line})
        if failures > opts.max_retries:
            row = result_row(sweep, rid, "failed", None, 0)
            sweep.mark(rid, "failed", {"row": row, "error": error})
            status = "failed"
        else:
            status = "retry"
    sweep.log_attempt(run_dir, {"event": "end", "attempt": attempt, "worker": worker, "status": status,
                                "wall_s": timing["train_end"] - timing["train_start"],
                                "first_step_index": timing["first_step_index"]})
    sweep.release(claim)  # after the mark: a run is never both unleased and unmarked once done
    if status == "done" and not opts.keep_checkpoints:
        # Optimizer state is 3x the weights; thousands of finished runs only need final/.
        shutil.rmtree(run_folder.checkpoints_dir(run_dir), ignore_errors=True)
    return {"status": status, "result": result, "error": error, **timing}


def error_summary(text: str) -> str:
    """The one line of a formatted traceback that says what went wrong: its last line, or for
    torch's CheckpointException (which nests the rank's traceback) the nested exception's line."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    for line in reversed(lines):
        if not line.startswith(" ") and ":" in line and not line.startswith("Traceback"):
            return line.strip()
    return lines[-1].strip()


# ---------------------------------------------------------------------------------------------
# The worker loop


def worker_loop(sweep_dir: str | Path, opts: WorkerOptions | None = None, worker: str | None = None) -> dict:
    """Work on a sweep until every run is finished (or nothing is free and ``opts.wait`` is False).

    Returns counts of the outcomes of this worker's runs.
    """
    opts = opts or WorkerOptions()
    sweep = Sweep(sweep_dir)
    worker = worker or new_worker_id()
    trainer = _Trainer(opts)
    if opts.threads:
        import torch

        # Tiny CPU models gain little from intra-op threads, and oversubscribed OpenMP threads
        # (several workers, or other jobs, on few cores) slow a step down many times over.
        torch.set_num_threads(opts.threads)
    total = len(sweep.records)
    counts: dict[str, int] = {}
    previous_end: float | None = None
    previous_last_step: float | None = None
    _log(opts, f"worker {worker}: {total} runs in {sweep.root}")
    sweep.log_worker(worker, {"event": "start", "pid": os.getpid()})
    while opts.max_runs is None or sum(counts.values()) < opts.max_runs:
        claim_start = time.perf_counter()
        claim = sweep.claim(worker, max_retries=opts.max_retries, max_lost=opts.max_lost,
                            lease_timeout_s=opts.lease_timeout_s)
        claimed = time.perf_counter()
        if claim is None:
            states = sweep.states(opts.lease_timeout_s)
            unfinished = [s for s in states.values() if s.state not in TERMINAL]
            if not unfinished or not opts.wait:
                break
            time.sleep(opts.poll_s)
            continue
        name = claim.record.folder
        taken = ", taken over" if claim.took_over else ""
        _log(opts, f"{name}: start (attempt {claim.lease.attempt}{taken})")
        outcome = run_claim(sweep, claim, trainer, worker, opts)
        update_index(sweep)
        recorded = time.perf_counter()
        counts[outcome["status"]] = counts.get(outcome["status"], 0) + 1
        result = outcome.get("result") or {}
        event = {
            "event": "run", "run_id": claim.record.run_id, "folder": name, "status": outcome["status"],
            "attempt": claim.lease.attempt,
            # fixed costs: the gap since the previous run returned, claim time, run start -> first step
            "since_previous_run_s": None if previous_end is None else claim_start - previous_end,
            "claim_s": claimed - claim_start,
            "start_to_first_step_s": (None if outcome["first_step"] is None
                                      else outcome["first_step"] - claim_start),
            "train_s": outcome["train_end"] - outcome["train_start"],
            # the dead time between runs: last optimizer step of the previous run -> first of this one
            "previous_last_step_to_first_step_s": (None if previous_last_step is None or outcome["first_step"]
                                                   is None else outcome["first_step"] - previous_last_step),
            "last_step_to_return_s": (None if outcome["last_step"] is None
                                      else outcome["train_end"] - outcome["last_step"]),
            "record_s": recorded - outcome["train_end"],
            "trainer_time_to_first_step_s": result.get("time_to_first_step_s"),
        }
        sweep.log_worker(worker, event)
        previous_end = outcome["train_end"]
        previous_last_step = outcome["last_step"]
        loss = result.get("final_val_loss")
        _log(opts, f"{name}: {outcome['status']} in {event['train_s']:.1f} s"
                   + (f", val loss {loss:.4f}" if isinstance(loss, float) else ""))
    update_index(sweep)
    return counts


# ---------------------------------------------------------------------------------------------
# Executors


def _worker_command(sweep_dir: Path, opts: WorkerOptions) -> list[str]:
    return [
        sys.executable, "-m", "relscale", "sweep", "run", str(sweep_dir), "--executor", "inprocess",
        "--workers", "1", "--max-retries", str(opts.max_retries), "--heartbeat", str(opts.heartbeat_s),
        "--lease-timeout", str(opts.lease_timeout_s), "--poll", str(opts.poll_s),
        *([] if opts.wait else ["--no-wait"]), *([] if opts.verbose else ["--quiet"]),
        *([] if opts.threads is None else ["--threads", str(opts.threads)]),
        *(["--keep-checkpoints"] if opts.keep_checkpoints else []),
    ]


def run_subprocess_workers(sweep_dir: Path, opts: WorkerOptions, n: int,
                           gpus: list[str] | None = None) -> int:
    """Start ``n`` worker processes (pinned to ``gpus[i]`` when given) and wait for all."""
    processes = []
    if gpus is None and opts.threads is None:
        # CPU workers share the cores instead of each taking all of them.
        opts = replace(opts, threads=max(1, (os.cpu_count() or 1) // n))
    for i in range(n):
        env = dict(os.environ)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        processes.append(subprocess.Popen(_worker_command(sweep_dir, opts), env=env))
    try:
        codes = [p.wait() for p in processes]
    except KeyboardInterrupt:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait()
        raise
    return max(codes, default=0)


def local_gpus() -> list[str]:
    """The GPU ids a local-gpus executor may use: CUDA_VISIBLE_DEVICES, else every visible device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_slurm(sweep_dir: Path, opts: WorkerOptions, n: int, *, folder: str | Path | None = None,
              cluster: str | None = None, slurm_parameters: dict[str, Any] | None = None) -> list[Any]:
    """Submit ``n`` jobs, each one worker, through submitit; returns the jobs (``job.result()``
    waits). ``cluster="local"`` runs them as local processes (for tests)."""
    try:
        import submitit
    except ImportError:
        raise RelscaleError("the slurm executor needs submitit: pip install submitit") from None
    folder = Path(folder) if folder is not None else sweep_dir / "slurm" / "%j"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
    if slurm_parameters:
        executor.update_parameters(**slurm_parameters)
    with executor.batch():
        jobs = [executor.submit(worker_loop, str(sweep_dir), opts) for _ in range(n)]
    return jobs


def execute(sweep_dir: str | Path, executor: str, workers: int | None, opts: WorkerOptions,
            **slurm: Any) -> int:
    """Run a sweep directory with an executor; returns a process exit code.

    ``workers``: worker processes (inprocess), GPUs to use (local-gpus; None: all), or Slurm jobs.
    """
    sweep_dir = Path(sweep_dir).resolve()  # workers elsewhere (Slurm nodes) may start in another cwd
    if executor not in EXECUTORS:
        raise RelscaleError(f"--executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
    if executor == "inprocess" and (workers or 1) <= 1:
        worker_loop(sweep_dir, opts)
        return 0
    if executor == "inprocess":
        return run_subprocess_workers(sweep_dir, opts, workers or 1)
    if executor == "local-gpus":
        gpus = local_gpus()
        if not gpus:
            raise RelscaleError("--executor local-gpus: no CUDA device is visible")
        n = min(workers, len(gpus)) if workers else len(gpus)
        return run_subprocess_workers(sweep_dir, opts, n, gpus[:n])
    if executor == "torchrun":
        opts.launcher = "torchrun"
        worker_loop(sweep_dir, opts)
        return 0
    jobs = run_slurm(sweep_dir, opts, max(workers or 1, 1), **slurm)
    print(f"submitted {len(jobs)} Slurm job(s): {', '.join(str(j.job_id) for j in jobs)}")
    return 0
