"""The prepared-data folder contract: file names, the manifest, the tokenizer path, splits and
group labels. Written by ``relscale prepare`` (relscale.data.prepare); every other part that needs
to find a prepared folder's files goes through the functions here.

Torch-free: this module uses only the standard library (importing it through the relscale.data
package also loads numpy, pandas and tokenizers, the package's eager exports, but never torch), so
the sweep, the evaluator and the fits can read a prepared folder's metadata without torch.

Layout of a prepared folder ``DATA_DIR`` (format_version 1)::

    DATA_DIR/manifest.json          what is in the folder: options, tokenizer, vocab_size, eos_id,
                                    token dtype, group fields and their label counts, per split the
                                    shard and index records (file name, bytes, sha256)
    DATA_DIR/tokenizer.json         the ``tokenizers`` BPE used for every shard
    DATA_DIR/<split>/shard_00000.bin, shard_00001.bin, ...
                                    the split's token stream cut into fixed-size pieces (flat
                                    uint16 or uint32 ids; each document followed by EOS)
    DATA_DIR/<split>/index.parquet  one row per document: doc_id, shard, offset, length, n_bytes,
                                    start, then the group and extra label columns

The splits are ``train`` and ``val``. The manifest is written last (through a staging folder that
is renamed into place), so a folder with a readable manifest is complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from relscale.atomic import atomic_write_text, read_json_object
from relscale.errors import DataError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
INDEX_FILE = "index.parquet"
SPLITS = ("train", "val")
SHARD_PATTERN = "shard_{:05d}.bin"


def shard_file_name(number: int) -> str:
    """The file name of shard ``number`` (0-based) inside a split folder: ``shard_00000.bin``."""
    return SHARD_PATTERN.format(number)


def manifest_path(data_dir: str | Path) -> Path:
    """``DATA_DIR/manifest.json`` (it need not exist)."""
    return Path(data_dir) / MANIFEST


def is_prepared(data_dir: str | Path) -> bool:
    """Whether ``data_dir`` holds a manifest, i.e. is (or claims to be) a prepared folder.

    Only the file's presence is checked; :func:`read_manifest` checks that it is readable."""
    return manifest_path(data_dir).is_file()


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The parsed ``manifest.json`` of a prepared folder.

    Raises DataError naming the folder or file when there is no manifest, when it is not valid
    JSON (or not a JSON object), or when its ``format_version`` is not :data:`FORMAT_VERSION`.
    """
    path = manifest_path(data_dir)
    manifest = read_json_object(path, "manifest")
    if manifest is None:
        raise DataError(f"{data_dir}: not a prepared data folder (no {MANIFEST}); run `relscale prepare`")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path}: format_version {version!r}, this relscale reads {FORMAT_VERSION}; "
            "re-run `relscale prepare --force`"
        )
    return manifest


def write_manifest(data_dir: str | Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` as ``DATA_DIR/manifest.json`` atomically (indented JSON); returns its path.

    The writer (relscale.data.prepare) calls this last, so a manifest implies complete shards."""
    path = manifest_path(data_dir)
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def _get(manifest: dict[str, Any], key: str, data_dir: str | Path) -> Any:
    try:
        return manifest[key]
    except (KeyError, TypeError):
        raise DataError(f"{manifest_path(data_dir)}: missing key {key!r}") from None


def tokenizer_path(data_dir: str | Path, manifest: dict[str, Any] | None = None) -> Path:
    """The tokenizer.json of a prepared folder, as its manifest names it.

    ``manifest``: an already read manifest (else it is read). Raises DataError if the manifest is
    unreadable or has no tokenizer record; the file itself is not opened."""
    manifest = read_manifest(data_dir) if manifest is None else manifest
    record = _get(manifest, "tokenizer", data_dir)
    try:
        return Path(data_dir) / record["file"]
    except (KeyError, TypeError):
        raise DataError(f"{manifest_path(data_dir)}: tokenizer record without a 'file'") from None


def eos_id(manifest: dict[str, Any], data_dir: str | Path = "") -> int:
    """The end-of-document token id recorded in the manifest (DataError if absent)."""
    return int(_get(manifest, "eos_id", data_dir))


def vocab_size(manifest: dict[str, Any], data_dir: str | Path = "") -> int:
    """The tokenizer's vocabulary size recorded in the manifest (DataError if absent)."""
    return int(_get(manifest, "vocab_size", data_dir))


def split_names(manifest: dict[str, Any], data_dir: str | Path = "") -> list[str]:
    """The splits the folder holds, in manifest order (``["train", "val"]`` for prepare's output)."""
    return list(_get(manifest, "splits", data_dir))


def split_record(manifest: dict[str, Any], split: str, data_dir: str | Path = "") -> dict[str, Any]:
    """The manifest's record of one split: n_docs, n_tokens, n_bytes, shards, index, groups.

    Raises DataError naming the folder and the known splits when ``split`` is not one of them."""
    splits = _get(manifest, "splits", data_dir)
    if split not in splits:
        raise DataError(f"{data_dir}: no split {split!r}; splits: {', '.join(splits)}")
    return splits[split]


def split_dir(data_dir: str | Path, split: str) -> Path:
    """``DATA_DIR/<split>``, the folder holding a split's shards and index."""
    return Path(data_dir) / split


def index_path(data_dir: str | Path, split: str, manifest: dict[str, Any] | None = None) -> Path:
    """The split's document index (Parquet, one row per document), as the manifest names it."""
    manifest = read_manifest(data_dir) if manifest is None else manifest
    record = split_record(manifest, split, data_dir)
    return split_dir(data_dir, split) / record["index"]["file"]


def shard_paths(data_dir: str | Path, split: str, manifest: dict[str, Any] | None = None) -> list[Path]:
    """The split's shard files in stream order, as the manifest lists them."""
    manifest = read_manifest(data_dir) if manifest is None else manifest
    record = split_record(manifest, split, data_dir)
    return [split_dir(data_dir, split) / shard["file"] for shard in record["shards"]]


def group_fields(manifest: dict[str, Any], data_dir: str | Path = "") -> list[str]:
    """The index columns holding group labels (e.g. ``["president", "decade"]``): per-group
    losses are reported over them."""
    return list(_get(manifest, "group_fields", data_dir))


def group_labels(manifest: dict[str, Any], data_dir: str | Path = "") -> dict[str, dict[str, int]]:
    """Per group field, each label's document count over all splits (``{field: {label: n_docs}}``)."""
    return {field: dict(counts) for field, counts in _get(manifest, "groups", data_dir).items()}
