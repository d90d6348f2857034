"""Per-example dumps: one Parquet file per (model, eval set), written atomically, never replaced.

Layout: ``<out>/<dataset>/<model_id>.parquet``, so all models' dumps of one eval set are one
folder (``pandas.read_parquet(out / dataset)`` reads them as one table).

Rows: one per example *per grouping field*. ``grouping`` names the field (``century``,
``sotu_type``, ``subject``, ...), ``group`` its value for the example; an example with no group
labels gets ``grouping = group = "all"``. An example with two group fields therefore appears
twice with the same metrics: select one grouping before aggregating
(``df[df.grouping == "century"].groupby("group")``).

Columns (types are fixed, so files of different models concatenate):
    model columns  model_id, step (null for final weights), params, non_embedding_params,
                   tokens (training tokens), flops_train, flops_marin, budget (flops_marin
                   convention; null when unknown), hidden, layers, source (checkpoint path)
    example        dataset, grouping, group, example_id
    text sets      nll (nats, summed over scored tokens), n_tokens, n_bytes (of the scored tokens), bpb
    multiple choice prompt (the rendered context), choices (the scored continuations),
                   choice_logprobs, choice_logprobs_norm (per UTF-8 byte of the choice text),
                   choice_n_tokens, choice_n_bytes (bytes of each choice's scored tokens), answer,
                   choice_logprob (= logprob_correct), choice_logprob_norm, choice_prob_norm,
                   prob_correct (softmax over the choices' raw / byte-normalised log-probs, at the
                   answer), acc, acc_norm (per character, as lm-eval), acc_bytes (per byte), and
                   the right answer's nll, n_tokens, n_bytes, bpb (so fit's nll/bpb metrics apply)
    (see :func:`relscale.eval.scoring.mc_metrics` for the definitions, which follow lm-eval).
The eval settings (context, stride, prompt format, beginning token, ...) are stored as JSON in the
file's schema metadata under ``relscale_eval``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from relscale.errors import DataError
from relscale.eval.formats import NO_GROUP

MODEL_FIELDS = [
    ("model_id", pa.string()),
    ("step", pa.int64()),
    ("params", pa.int64()),
    ("non_embedding_params", pa.int64()),
    ("tokens", pa.int64()),
    ("flops_train", pa.float64()),
    ("flops_marin", pa.float64()),
    ("budget", pa.float64()),
    ("hidden", pa.int64()),
    ("layers", pa.int64()),
    ("source", pa.string()),
]
EXAMPLE_FIELDS = [
    ("dataset", pa.string()),
    ("grouping", pa.string()),
    ("group", pa.string()),
    ("example_id", pa.string()),
]
TEXT_FIELDS = [
    ("nll", pa.float64()),
    ("n_tokens", pa.int64()),
    ("n_bytes", pa.int64()),
    ("bpb", pa.float64()),
]
MC_FIELDS = [
    ("prompt", pa.string()),
    ("choices", pa.list_(pa.string())),
    ("choice_logprobs", pa.list_(pa.float64())),
    ("choice_logprobs_norm", pa.list_(pa.float64())),
    ("choice_n_tokens", pa.list_(pa.int64())),
    ("choice_n_bytes", pa.list_(pa.int64())),
    ("answer", pa.int64()),
    ("choice_logprob", pa.float64()),
    ("choice_logprob_norm", pa.float64()),
    ("choice_prob_norm", pa.float64()),
    ("logprob_correct", pa.float64()),
    ("prob_correct", pa.float64()),
    ("acc", pa.float64()),
    ("acc_norm", pa.float64()),
    ("acc_bytes", pa.float64()),
    ("nll", pa.float64()),
    ("n_tokens", pa.int64()),
    ("n_bytes", pa.int64()),
    ("bpb", pa.float64()),
]
SETTINGS_KEY = b"relscale_eval"


def schema(kind: str) -> pa.Schema:
    metrics = TEXT_FIELDS if kind == "text" else MC_FIELDS
    return pa.schema([pa.field(n, t) for n, t in MODEL_FIELDS + EXAMPLE_FIELDS + metrics])


# ------------------------------------------------------------------------------- atomic writing
from relscale.atomic import atomic_write as atomic_write_with  # noqa: E402 -- the shared helper
from relscale.atomic import atomic_write_text  # noqa: E402,F401


# ---------------------------------------------------------------------------------------- dumps
def safe_name(name: str) -> str:
    """A file-name-safe version of a model id or dataset name."""
    return re.sub(r"[^A-Za-z0-9_.@+=-]+", "_", name).strip("._") or "unnamed"


def dump_path(out_dir: Path, dataset: str, model_id: str) -> Path:
    return Path(out_dir) / safe_name(dataset) / f"{safe_name(model_id)}.parquet"


def expand_groups(example_rows: list[dict]) -> list[dict]:
    """One row per example per grouping field (see the module docstring)."""
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
    """Write the dump; False (and nothing written) when a finished file exists and not ``force``.
    A set with no examples writes nothing: DataError (an empty dump would later read as done)."""
    if not example_rows:
        raise DataError(f"{path}: eval set {dataset!r} has 0 examples to write; no dump written")
    if force or not is_finished_dump(path):
        force = True  # a file there that is not a readable dump is not a finished result
    rows = [{**model_columns, "dataset": dataset, **row} for row in expand_groups(example_rows)]
    file_schema = schema(kind).with_metadata({SETTINGS_KEY: json.dumps(settings, default=str)})
    try:
        table = pa.Table.from_pylist(rows, schema=file_schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        raise DataError(f"{path}: cannot build the dump table ({err})") from err
    return atomic_write_with(path, lambda tmp: pq.write_table(table, tmp), overwrite=force)


def is_finished_dump(path: Path) -> bool:
    """Whether ``path`` holds a readable dump (a Parquet file with our settings metadata and at
    least one row): only such a file counts as done; garbage at the path is rewritten."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        meta = pq.read_metadata(path)
    except Exception:  # pyarrow raises several types for a file that is not Parquet
        return False
    schema_meta = meta.schema.to_arrow_schema().metadata or {}
    return meta.num_rows > 0 and SETTINGS_KEY in schema_meta


def read_settings(path: Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(SETTINGS_KEY, b"{}"))


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
