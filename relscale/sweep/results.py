"""The results index: results.parquet in the sweep directory, one row per finished run.

Readers outside the sweep go through relscale.sweep.layout (read_results, finished_runs).

The source of truth is the per-run marks (marks/<run_id>.done|.diverged|.failed hold the result
row as JSON, written once); the Parquet file is a cache of them that any worker may refresh.
A refresh reads only marks the index does not hold yet, writes a temp file and os.replace()s it,
so a reader never sees a torn file and a killed worker never loses a finished result. Refreshes
are serialised by an exclusive lock file; a worker that finds the lock taken skips, because the
holder re-lists the marks after writing and so picks up whatever finished meanwhile.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from relscale.atomic import atomic_write
from relscale.errors import DataError
from relscale.sweep.layout import MARKS_DIR, RESULTS_INDEX, RUNS_DIR, TERMINAL, parse_mark_name
from relscale.sweep.registry import Sweep, _listdir, _unlink, create_exclusive

INDEX_FILE = RESULTS_INDEX
SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("name", pa.string()),
    ("dataset", pa.string()),
    ("budget", pa.float64()),
    ("hidden", pa.int64()),
    ("layers", pa.int64()),
    ("heads", pa.int64()),
    ("batch", pa.int64()),
    ("steps", pa.int64()),
    ("tokens", pa.int64()),
    ("params", pa.int64()),
    ("non_embedding_params", pa.int64()),
    ("flops_train", pa.float64()),
    ("flops_marin", pa.float64()),
    ("lr", pa.float64()),
    ("beta2", pa.float64()),
    ("final_train_loss", pa.float64()),
    ("final_val_loss", pa.float64()),
    ("wall_s", pa.float64()),
    ("gpu_hours", pa.float64()),
    ("status", pa.string()),
    ("run_dir", pa.string()),  # relative to the sweep directory: the trainer's out_dir (final/ weights)
])
COLUMNS = SCHEMA.names
LOCK_STALE_S = 120.0


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def result_row(sweep: Sweep, run_id: str, status: str, result: dict[str, Any] | None,
               gpus: int) -> dict[str, Any]:
    """The index row of a finished run: its grid row plus what the trainer reported.

    Steps, tokens and FLOPs come from the trainer's result when it has them (a diverged run
    stops early), else from the grid. gpu_hours = wall time x GPUs used (0 on the CPU).
    """
    record = sweep.record(run_id)
    result = result or {}
    row = {key: record.row.get(key) for key in COLUMNS if key in record.row}
    for key in ("steps", "tokens", "flops_train", "flops_marin"):
        if result.get(key) is not None:
            row[key] = result[key]
    wall_s = _float(result.get("wall_s"))
    row.update(
        run_id=run_id,
        final_train_loss=_float(result.get("final_train_loss")),
        final_val_loss=_float(result.get("final_val_loss")),
        wall_s=wall_s,
        gpu_hours=0.0 if math.isnan(wall_s) else wall_s * gpus / 3600.0,
        status=status,
        run_dir=os.path.join(RUNS_DIR, record.folder),
    )
    return row


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    columns = {name: [row.get(name) for row in rows] for name in COLUMNS}
    for name in ("steps", "tokens", "hidden", "layers", "heads", "batch", "params", "non_embedding_params"):
        columns[name] = [None if v is None else int(v) for v in columns[name]]
    return pa.table(columns, schema=SCHEMA)


class CorruptIndex(Exception):
    """results.parquet exists but cannot be read as the index (truncated, foreign, other schema)."""


def _read_index_file(path: Path) -> pa.Table:
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError, ValueError) as err:
        raise CorruptIndex(f"{path}: unreadable results index ({type(err).__name__}: {err})") from err
    missing = [name for name in COLUMNS if name not in table.column_names]
    if missing:
        raise CorruptIndex(f"{path}: not a results index (no column {missing[0]!r})")
    try:
        return table.select(COLUMNS).cast(SCHEMA)
    except (pa.ArrowException, ValueError) as err:
        raise CorruptIndex(f"{path}: results index with other column types ({err})") from err


def read_index(sweep_dir: str | Path) -> pa.Table:
    """The results index of a sweep directory (an empty table when there is none yet).

    Returns a table with :data:`SCHEMA`. results.parquet is a cache of the marks: when it is
    unreadable it is rebuilt from them, with a warning, instead of failing every reader (workers,
    fit, eval). Raises DataError naming the file when it is unreadable and the folder has no
    marks/ to rebuild it from (the file is then left as it is)."""
    path = Path(sweep_dir) / INDEX_FILE
    if not path.exists():
        return SCHEMA.empty_table()
    try:
        return _read_index_file(path)
    except CorruptIndex as err:
        if not (Path(sweep_dir) / MARKS_DIR).is_dir():
            raise DataError(f"{err}; no {MARKS_DIR}/ next to it to rebuild it from") from None
        warnings.warn(f"{err}; rebuilding it from the run marks", stacklevel=2)
    sweep = Sweep(sweep_dir)
    if update_index(sweep, rebuild=True) is None:  # another worker is rebuilding it: use the marks
        return _table(_rows_from_marks(sweep))
    return _read_index_file(path)


def table_from_marks(sweep_dir: str | Path) -> pa.Table:
    """The results index assembled in memory from the terminal marks (nothing is written).

    Returns a table with :data:`SCHEMA`, sorted like results.parquet; empty without marks/."""
    table = _table(_rows_from_marks(Sweep(sweep_dir)))
    return table.sort_by([(key, "ascending") for key in ("dataset", "budget", "hidden")])


def _rows_from_marks(sweep: Sweep) -> list[dict[str, Any]]:
    rows = []
    for rid, kind in _finished_marks(sweep).items():
        payload = sweep.read_mark(rid, kind) or {}
        rows.append(payload.get("row") or result_row(sweep, rid, kind, None, 0))
    return rows


def _finished_marks(sweep: Sweep) -> dict[str, str]:
    finished: dict[str, str] = {}
    for name in _listdir(sweep.marks):
        parsed = parse_mark_name(name)
        if parsed is None:
            continue
        run_id, kind = parsed
        if kind in TERMINAL and (kind != "failed" or run_id not in finished):
            finished[run_id] = kind
    return finished


def update_index(sweep: Sweep, *, rebuild: bool = False, max_rounds: int = 10) -> int | None:
    """Bring results.parquet up to date with the marks; returns its row count (None: busy).

    Only new or changed marks are read; the file is replaced atomically under an exclusive
    ``results.lock`` (a lock older than LOCK_STALE_S seconds is taken over). ``rebuild``: start
    from an empty table instead of the existing file. Never loses a row: the marks stay the truth."""
    lock = sweep.root / "results.lock"
    if not create_exclusive(lock, json.dumps({"pid": os.getpid(), "time": time.time()})):
        try:
            if time.time() - lock.stat().st_mtime < LOCK_STALE_S:
                return None
            grave = sweep.root / f".results.lock.stale-{uuid.uuid4().hex[:8]}"
            os.rename(lock, grave)  # of several takers of a dead worker's lock, one wins
        except FileNotFoundError:
            return None
        _unlink(grave)
        if not create_exclusive(lock, json.dumps({"pid": os.getpid(), "time": time.time()})):
            return None
    try:
        path = sweep.root / INDEX_FILE
        for _ in range(max_rounds):
            try:
                table = SCHEMA.empty_table() if rebuild else (
                    _read_index_file(path) if path.exists() else SCHEMA.empty_table())
            except CorruptIndex as err:
                warnings.warn(f"{err}; rebuilding it from the run marks", stacklevel=2)
                table = SCHEMA.empty_table()
            rebuild = False
            ids = table.column("run_id").to_pylist()
            indexed = dict(zip(ids, table.column("status").to_pylist()))
            finished = _finished_marks(sweep)
            # New rows, and rows whose state changed (a failed run later finished by a retry).
            new_ids = [rid for rid, kind in finished.items() if indexed.get(rid) != kind]
            if not new_ids:
                return table.num_rows
            rows = []
            for rid in new_ids:
                payload = sweep.read_mark(rid, finished[rid]) or {}
                row = payload.get("row") or result_row(sweep, rid, finished[rid], None, 0)
                rows.append(row)
            replaced = set(new_ids)
            keep = [i for i, rid in enumerate(ids) if rid not in replaced]
            merged = pa.concat_tables([table.take(pa.array(keep, type=pa.int64())), _table(rows)])
            merged = merged.sort_by([(key, "ascending") for key in ("dataset", "budget", "hidden")])
            atomic_write(path, lambda tmp, table=merged: pq.write_table(table, tmp))
        return merged.num_rows
    finally:
        _unlink(lock)
