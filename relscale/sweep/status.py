"""Plain-text views of a sweep directory: state counts with a progress bar, the run list, and
the failed runs with their error lines (what ``relscale sweep status|list`` prints)."""

from __future__ import annotations

from collections import Counter

from relscale.sweep.layout import DEFAULT_LEASE_TIMEOUT_S, STATES, TERMINAL
from relscale.sweep.registry import Sweep


def _format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and abs(value) >= 10**6:
        return f"{value:.3g}"
    return str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Right-aligned text columns, a header line first; floats with 4 significant digits, integers
    of a million or more in 3-digit scientific notation, missing cells empty."""
    cells = [[_format_value(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def progress_bar(done: int, total: int, width: int = 40) -> str:
    """``[####....] done/total finished (pct%)``, ``width`` characters between the brackets."""
    filled = 0 if total == 0 else round(width * done / total)
    pct = 100.0 if total == 0 else 100.0 * done / total
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} finished ({pct:.0f}%)"


def status_text(sweep: Sweep, lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S) -> str:
    """Counts per state, per (dataset, budget) and in all, and a progress bar over the sweep.

    ``lease_timeout_s``: seconds without a heartbeat after which a held run counts as stale."""
    states = sweep.states(lease_timeout_s)
    by_group: dict[tuple[str, float], Counter] = {}
    totals: Counter = Counter()
    for record in sweep.records:
        state = states[record.run_id].state
        key = (str(record.row.get("dataset")), float(record.row.get("budget", 0.0)))
        by_group.setdefault(key, Counter())[state] += 1
        totals[state] += 1
    rows = [{"dataset": ds, "budget": b, **{s: counts.get(s, 0) for s in STATES},
             "total": sum(counts.values())} for (ds, b), counts in sorted(by_group.items())]
    rows.append({"dataset": "all", "budget": "", **{s: totals.get(s, 0) for s in STATES},
                 "total": sum(totals.values())})
    finished = sum(totals[s] for s in TERMINAL)
    return (f"sweep {sweep.root}\n" + format_table(rows, ["dataset", "budget", *STATES, "total"]) + "\n"
            + progress_bar(finished, len(sweep.records)))


def list_text(sweep: Sweep, lease_timeout_s: float = DEFAULT_LEASE_TIMEOUT_S) -> str:
    """One line per run in listing order: folder, state, failed and lost attempts, lease holder."""
    states = sweep.states(lease_timeout_s)
    rows = []
    for record in sweep.records:
        s = states[record.run_id]
        rows.append({"folder": record.folder, "state": s.state, "failures": s.failures, "lost": s.lost,
                     "worker": s.lease.worker if s.lease else ""})
    return format_table(rows, ["folder", "state", "failures", "lost", "worker"])


def failed_runs(sweep: Sweep) -> list[tuple[str, str | None]]:
    """(folder, error line) of every run marked failed, in listing order (None: no error recorded)."""
    states = sweep.states()
    out = []
    for record in sweep.records:
        if states[record.run_id].state == "failed":
            payload = sweep.read_mark(record.run_id, "failed") or {}
            error = payload.get("error") or payload.get("reason")
            if isinstance(error, str) and "\n" in error.strip():
                from relscale.sweep.executors import error_summary

                error = error_summary(error)
            out.append((record.folder, error))
    return out
