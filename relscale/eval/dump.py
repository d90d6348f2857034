"""The eval-dump contract: file layout, Parquet schema and metadata of a per-example dump.

Written by :mod:`relscale.eval.writer` (``relscale eval``, the training-time hook,
``relscale eval --from-lm-eval``); read by :mod:`relscale.fit` and by anyone with pandas. This
module imports only the standard library and pyarrow (no torch), so readers stay light.

Layout: ``<out>/<dataset>/<model_id>.parquet`` (names made file-safe by :func:`safe_name`), so
all models' dumps of one eval set are one folder (``pandas.read_parquet(out / dataset)`` reads
them as one table). A file is finished (:func:`is_finished_dump`) when it is readable Parquet
with at least one row and the settings metadata; anything else at the path is not a result.

Rows: one per example *per grouping field*. ``grouping`` names the field (``century``,
``sotu_type``, ``subject``, ...), ``group`` its value for the example; an example with no group
labels gets ``grouping = group =`` :data:`NO_GROUP`. An example with two group fields therefore
appears twice with the same metrics: select one grouping before aggregating
(``df[df.grouping == "century"].groupby("group")``).

Columns (:func:`schema`; types are fixed, so files of different models concatenate):
    model columns  model_id, step (optimizer steps; null for final weights), params,
                   non_embedding_params, tokens (training tokens), flops_train, flops_marin
                   (FLOPs), budget (FLOPs, flops_marin convention; null when unknown), hidden,
                   layers, source (where the weights came from)
    example        dataset, grouping, group, example_id
    text sets      nll (nats, summed over scored tokens), n_tokens, n_bytes (UTF-8 bytes of the
                   scored tokens), bpb (bits per byte)
    multiple choice prompt (the rendered context), choices (the scored continuations),
                   choice_logprobs (nats), choice_logprobs_norm (per UTF-8 byte of the choice
                   text), choice_n_tokens, choice_n_bytes, answer (index of the right choice),
                   choice_logprob, choice_logprob_norm, choice_prob_norm, logprob_correct,
                   prob_correct (softmax over the choices' raw / byte-normalised log-probs, at the
                   answer), acc, acc_norm (per character, as lm-evaluation-harness), acc_bytes
                   (per byte), and the right answer's nll, n_tokens, n_bytes, bpb (so the text
                   metrics apply to multiple-choice sets too)
    (definitions: :func:`relscale.eval.scoring.mc_metrics`, following lm-evaluation-harness).

Metadata: the file's Arrow schema metadata holds, under :data:`SETTINGS_KEY`, one JSON object
with the settings the dump was made with (:data:`SETTINGS_FIELDS` lists the keys ``relscale eval``
writes; converted lm-evaluation-harness output records its own subset).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from relscale.errors import DataError

FORMAT_VERSION = 1
SUFFIX = ".parquet"
NO_GROUP = "all"  # grouping and group of examples that carry no group label
SETTINGS_KEY = b"relscale_eval"
KINDS = ("text", "mc")  # kinds of dump: text (per-document NLL) and multiple choice

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

SETTINGS_FIELDS = (
    "dataset",  # eval-set name
    "kind",  # "text" | "mc"
    "source",  # where the eval set came from (file, folder, prepared split)
    "set_settings",  # how the set was built (prompt format, shots, seed, ...)
    "context",  # window length in tokens
    "stride",  # tokens between windows of a long document
    "pack_len",  # tokens per packed row
    "prefix_tokens",  # tokens of a document's beginning scored only as context
    "start_id",  # token id the first token is predicted from
    "start_tokens",  # the start-token policy in words
    "tokenizer_sha256_16",  # first 16 hex digits of sha256(tokenizer.json)
    "dtype",  # scoring precision
    "device",
    "torch",  # torch version
    "skipped_bad_rows",  # rows of the set left out (--skip-bad)
)


def schema(kind: str) -> pa.Schema:
    """The Arrow schema of a dump of ``kind`` ("text" or "mc"): model, example and metric columns.

    Raises DataError for another kind."""
    if kind not in KINDS:
        raise DataError(f"unknown dump kind {kind!r}; expected one of {KINDS}")
    metrics = TEXT_FIELDS if kind == "text" else MC_FIELDS
    return pa.schema([pa.field(n, t) for n, t in MODEL_FIELDS + EXAMPLE_FIELDS + metrics])


def safe_name(name: str) -> str:
    """A file-name-safe version of a model id or dataset name: letters and digits of any script
    are kept (``mïne`` and ``möne`` stay two files), runs of other characters become ``_``."""
    return re.sub(r"[^\w.@+=-]+", "_", name).strip("._") or "unnamed"


def dump_path(out_dir: str | Path, dataset: str, model_id: str) -> Path:
    """``<out_dir>/<dataset>/<model_id>.parquet`` with both names made file-safe."""
    return Path(out_dir) / safe_name(dataset) / f"{safe_name(model_id)}{SUFFIX}"


def dump_files(folder: str | Path) -> list[Path]:
    """The dump files of one eval set's folder (``<out>/<dataset>``), sorted by name."""
    return sorted(p for p in Path(folder).glob(f"*{SUFFIX}") if p.is_file())


def has_dump_columns(names: Iterable[str]) -> bool:
    """Whether a table with these column names is per-example dump data (it has ``model_id``
    and ``example_id``), as opposed to a per-model results table."""
    return {"model_id", "example_id"} <= set(names)


def is_finished_dump(path: str | Path) -> bool:
    """Whether ``path`` holds a readable dump: a Parquet file with the settings metadata and at
    least one row. Only such a file counts as done; garbage at the path is not a result."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        meta = pq.read_metadata(path)
    except Exception:  # pyarrow raises several types for a file that is not Parquet
        return False
    schema_meta = meta.schema.to_arrow_schema().metadata or {}
    return meta.num_rows > 0 and SETTINGS_KEY in schema_meta


def settings_metadata(settings: dict[str, Any]) -> dict[bytes, str]:
    """The schema metadata that stores ``settings`` (JSON; values JSON cannot hold become strings)."""
    return {SETTINGS_KEY: json.dumps(settings, default=str)}


def read_settings(path: str | Path) -> dict[str, Any]:
    """The settings a dump was written with (see :data:`SETTINGS_FIELDS`); empty when the file
    records none. Raises DataError naming the file when it is not readable Parquet or its
    settings are not a JSON object."""
    path = Path(path)
    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable eval dump ({err})") from err
    try:
        settings = json.loads(meta.get(SETTINGS_KEY, b"{}"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable eval settings metadata ({err})") from err
    if not isinstance(settings, dict):
        raise DataError(f"{path}: eval settings metadata is not a JSON object")
    return settings
