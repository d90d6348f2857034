"""Writing per-example dumps: one Parquet file per (model, eval set), written atomically, never
replaced unless asked (``force``), plus the per-group summary printed after scoring.

The file layout, columns and settings metadata are the dump contract,
:mod:`relscale.eval.dump` (torch-free; what :mod:`relscale.fit` reads). The contract's names are
re-exported here for existing callers.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from relscale.atomic import atomic_write as atomic_write_with
from relscale.errors import DataError
from relscale.eval.dump import (  # noqa: F401 -- the contract's names, re-exported
    EXAMPLE_FIELDS,
    MC_FIELDS,
    MODEL_FIELDS,
    NO_GROUP,
    SETTINGS_KEY,
    TEXT_FIELDS,
    dump_path,
    is_finished_dump,
    read_settings,
    safe_name,
    schema,
    settings_metadata,
)


def expand_groups(example_rows: list[dict]) -> list[dict]:
    """One row per example per grouping field: each row's ``groups`` dict ({grouping: group}; empty
    or None -> {NO_GROUP: NO_GROUP}) becomes ``grouping`` and ``group`` columns (see
    :mod:`relscale.eval.dump`)."""
    out = []
    for row in example_rows:
        row = dict(row)
        groups = row.pop("groups") or {NO_GROUP: NO_GROUP}
        for grouping, group in groups.items():
            out.append({"grouping": grouping, "group": group, **row})
    return out


def write_dump(
    path: Path,
    kind: str,
    model_columns: dict[str, Any],
    dataset: str,
    example_rows: list[dict],
    settings: dict[str, Any],
    *,
    force: bool = False,
) -> bool:
    """Write the dump of one model on one eval set to ``path`` atomically; True when written.

    ``kind``: "text" | "mc" (the schema, :func:`relscale.eval.dump.schema`); ``model_columns``:
    the model columns of every row; ``example_rows``: one dict of metric columns per example
    with its ``groups``; ``settings``: stored as the file's settings metadata. Returns False (and
    writes nothing) when a finished dump is already there and not ``force``; a file there that
    is not a finished dump is replaced. Raises DataError naming the path for a set with no
    examples (an empty dump would later read as done) or rows that do not fit the schema."""
    if not example_rows:
        raise DataError(f"{path}: eval set {dataset!r} has 0 examples to write; no dump written")
    if force or not is_finished_dump(path):
        force = True  # a file there that is not a readable dump is not a finished result
    rows = [{**model_columns, "dataset": dataset, **row} for row in expand_groups(example_rows)]
    file_schema = schema(kind).with_metadata(settings_metadata(settings))
    try:
        table = pa.Table.from_pylist(rows, schema=file_schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"{path}: cannot build the dump table ({err})") from err
    return atomic_write_with(path, lambda tmp: pq.write_table(table, tmp), overwrite=force)


# -------------------------------------------------------------------------------------- summary
def summarize(kind: str, example_rows: list[dict]) -> list[dict]:
    """Per (grouping, group): example count and pooled metrics (token-weighted NLL, bpb over
    bytes; mean accuracy and probability of the right answer)."""
    table: dict[tuple[str, str], dict[str, float]] = {}
    for row in example_rows:
        for grouping, group in (row["groups"] or {NO_GROUP: NO_GROUP}).items():
            acc = table.setdefault((grouping, group), {"examples": 0})
            acc["examples"] += 1
            if kind == "text":
                for key in ("nll", "n_tokens", "n_bytes"):
                    acc[key] = acc.get(key, 0) + row[key]
            else:
                for key in ("acc", "prob_correct", "logprob_correct"):
                    acc[key] = acc.get(key, 0) + row[key]
    out = []
    for (grouping, group), acc in sorted(table.items()):
        n = acc["examples"]
        if kind == "text":
            stats = {
                "tokens": int(acc["n_tokens"]),
                "nll_per_token": acc["nll"] / max(acc["n_tokens"], 1),
                "bpb": acc["nll"] / (math.log(2) * max(acc["n_bytes"], 1)),
            }
        else:
            stats = {
                "acc": acc["acc"] / n,
                "prob_correct": acc["prob_correct"] / n,
                "logprob_correct": acc["logprob_correct"] / n,
            }
        out.append({"grouping": grouping, "group": group, "examples": n, **stats})
    return out


def format_summary(title: str, summary: list[dict]) -> str:
    """``title`` and the rows of :func:`summarize` as an aligned plain-text table (floats to 4
    decimals)."""
    if not summary:
        return f"{title}: no examples"
    columns = list(summary[0])
    cells = [[_cell(row[c]) for c in columns] for row in summary]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
