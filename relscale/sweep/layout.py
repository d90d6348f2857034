"""The sweep-folder contract: file names, run states and the results index of a sweep directory.

Written by the sweep (relscale.sweep.registry for runs, states and leases; relscale.sweep.results
for the index). Every other part (the evaluator's model discovery, the fits) finds a sweep's runs
and results through the functions here, never through the file names.

Torch-free: it imports only the standard library, pyarrow and the torch-free sweep modules.

Layout of a sweep directory ``SWEEP_DIR`` (format 1)::

    SWEEP_DIR/sweep.json        the sweep config (written once; a different config is refused)
    SWEEP_DIR/runs.json         every run: run_id, folder, grid row, TrainConfig overrides of a base
    SWEEP_DIR/marks/            one small file per fact, named <run_id>.<kind>: done / diverged /
                                failed are terminal and hold {"row": <results row>, ...};
                                fail-<k> (attempt k raised), lost-<k>-<tag> (its worker died)
    SWEEP_DIR/leases/<run_id>   present while a worker trains the run (owner token, heartbeat)
    SWEEP_DIR/runs/<folder>/    the trainer's run folder (final/ weights, checkpoints, metrics),
                                plus spec.json, attempts.jsonl, error-<k>.txt
    SWEEP_DIR/workers/          one JSON-lines log per worker
    SWEEP_DIR/results.parquet   the results index: one row per finished run (schema
                                relscale.sweep.results.SCHEMA); a cache of the terminal marks

A run's state is one of :data:`STATES`: ``pending`` (no lease, no terminal mark), ``running``
(a fresh lease), ``stale`` (a lease whose heartbeat is older than the timeout), ``done``,
``diverged`` (the trainer stopped on a non-finite loss) or ``failed`` (retries used up).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SWEEP_CONFIG = "sweep.json"
RUN_LISTING = "runs.json"
MARKS_DIR = "marks"
LEASES_DIR = "leases"
RUNS_DIR = "runs"
WORKERS_DIR = "workers"
RESULTS_INDEX = "results.parquet"

DONE = "done"
TERMINAL = ("done", "diverged", "failed")
STATES = ("pending", "running", "stale", "done", "diverged", "failed")
DEFAULT_LEASE_TIMEOUT_S = 120.0


def mark_name(run_id: str, kind: str) -> str:
    """The file name of a mark in ``marks/``: ``<run_id>.<kind>`` (kind e.g. ``done``, ``fail-2``)."""
    return f"{run_id}.{kind}"


def parse_mark_name(name: str) -> tuple[str, str] | None:
    """``(run_id, kind)`` of a mark file name; None for hidden or temporary files (leading dot)."""
    if name.startswith("."):
        return None
    run_id, _, kind = name.partition(".")
    return (run_id, kind) if kind else None


def is_sweep_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a sweep directory: it holds sweep.json, results.parquet or marks/.

    A folder with only results.parquet and marks/ (copied without its run listing) counts too, so
    readers of finished results do not need the listing."""
    path = Path(path)
    return (path / SWEEP_CONFIG).is_file() or (path / RESULTS_INDEX).is_file() or (path / MARKS_DIR).is_dir()


def results_path(sweep_dir: str | Path) -> Path:
    """``SWEEP_DIR/results.parquet`` (it need not exist yet)."""
    return Path(sweep_dir) / RESULTS_INDEX


def read_results(sweep_dir: str | Path):
    """The results index of a sweep directory as a ``pyarrow.Table`` (schema
    relscale.sweep.results.SCHEMA, one row per finished run, sorted by dataset, budget, hidden).

    Robust to a damaged cache: an unreadable results.parquet is rebuilt from the terminal marks
    (with a warning) when marks/ exists; a missing one is assembled from the marks in memory
    (nothing written). Empty table for a folder with neither. Raises DataError naming the file
    when results.parquet is unreadable and there are no marks to rebuild it from.
    """
    from relscale.sweep import results

    sweep_dir = Path(sweep_dir)
    if results_path(sweep_dir).exists():
        return results.read_index(sweep_dir)
    if (sweep_dir / MARKS_DIR).is_dir():
        return results.table_from_marks(sweep_dir)
    return results.SCHEMA.empty_table()


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep as a reader sees it.

    ``run_dir``: the trainer's run folder (absolute if ``sweep_dir`` was); ``state``: one of
    :data:`STATES`; ``row``: the results-index row for a finished run (grid columns plus losses,
    wall time, status, run_dir relative to the sweep), else the grid row from runs.json (name,
    dataset, budget in FLOPs, hidden, layers, heads, batch in sequences, steps, tokens, params,
    lr, beta2, ...)."""

    run_id: str
    folder: str
    run_dir: Path
    state: str
    row: dict[str, Any] = field(default_factory=dict)


def _run_dir(sweep_dir: Path, run_id: str, row: dict[str, Any]) -> Path:
    return sweep_dir / (row.get("run_dir") or f"{RUNS_DIR}/{run_id}")


def sweep_runs(sweep_dir: str | Path, *, lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S) -> list[SweepRun]:
    """Every run of a sweep in listing order, with its state (see :data:`STATES`) and row.

    Needs the run listing (sweep.json and runs.json); raises RelscaleError naming the folder when
    ``sweep_dir`` is not a complete sweep directory. ``lease_timeout_s``: seconds without a
    heartbeat after which a held run counts as ``stale``."""
    from relscale.sweep.registry import Sweep

    sweep = Sweep(sweep_dir)
    states = sweep.states(lease_timeout_s)
    runs = []
    for record in sweep.records:
        state = states[record.run_id].state
        row = dict(record.row)
        if state in TERMINAL:
            row = (sweep.read_mark(record.run_id, state) or {}).get("row") or row
        runs.append(SweepRun(record.run_id, record.folder, sweep.run_dir(record), state, row))
    return runs


def run_train_config(sweep_dir: str | Path, run_id: str):
    """The full, validated TrainConfig (relscale.config) a run of the sweep trains with, with
    ``out_dir`` set to its run folder: the listing's base config plus the run's overrides.

    Needs the run listing; KeyError if the sweep has no run ``run_id``, RelscaleError naming the
    file if the listing is unreadable."""
    from relscale.sweep.registry import Sweep

    sweep = Sweep(sweep_dir)
    record = sweep.record(run_id)
    return sweep.train_config(record, sweep.run_dir(record))


def finished_runs(sweep_dir: str | Path, statuses: tuple[str, ...] = (DONE,)) -> list[SweepRun]:
    """The runs whose terminal state is in ``statuses``: first those of the results index (in its
    order), then those only the marks know yet (sorted by run id).

    Works without the run listing (a folder with results.parquet and/or marks/ is enough); a
    damaged results.parquet is rebuilt as in :func:`read_results`; a mark whose JSON is unreadable
    still counts, with an empty row."""
    import json

    sweep_dir = Path(sweep_dir)
    runs: dict[str, SweepRun] = {}
    for row in read_results(sweep_dir).to_pylist():
        if row.get("status") in statuses:
            run_dir = _run_dir(sweep_dir, row["run_id"], row)
            runs[row["run_id"]] = SweepRun(row["run_id"], run_dir.name, run_dir, row["status"], row)
    marks = sweep_dir / MARKS_DIR
    names = sorted(p.name for p in marks.iterdir()) if marks.is_dir() else []
    for name in names:
        parsed = parse_mark_name(name)
        if parsed is None or parsed[1] not in statuses or parsed[0] in runs:
            continue
        run_id, kind = parsed
        try:
            payload = json.loads((marks / name).read_text())
            row = payload.get("row") or {} if isinstance(payload, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            row = {}
        run_dir = _run_dir(sweep_dir, run_id, row)
        runs[run_id] = SweepRun(run_id, run_dir.name, run_dir, kind, row)
    return list(runs.values())
