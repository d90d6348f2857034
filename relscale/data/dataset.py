"""Read access to a folder written by `relscale prepare`.

The folder's layout and manifest are defined in relscale.data.layout (the torch-free contract);
this module adds the heavy readers: memory-mapped shards, the document index, the tokenizer.
A split's token stream is its shards concatenated; shards are plain fixed-size cuts of that
stream, so a document may continue from one shard into the next.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from tokenizers import Tokenizer

from relscale.atomic import sha256_file
from relscale.data import layout
from relscale.data.layout import (  # noqa: F401 (re-exported: older callers import them from here)
    FORMAT_VERSION,
    INDEX_FILE,
    MANIFEST,
    SPLITS,
    TOKENIZER_FILE,
    read_manifest,
)
from relscale.data.tokenizer import load_tokenizer
from relscale.errors import DataError


class TokenStream:
    """A split's shards seen as one flat token sequence; slices are read without loading shards."""

    def __init__(self, shards: list[np.ndarray], dtype: np.dtype, names: list[str] | None = None):
        self.shards = shards
        self.dtype = dtype
        self.bounds = np.cumsum([0, *(len(shard) for shard in shards)])
        self.names = names if names is not None else [f"shard {i}" for i in range(len(shards))]

    def shard_name(self, position: int) -> str:
        """The file (or label) of the shard holding stream position ``position``."""
        shard = int(np.searchsorted(self.bounds, position, side="right")) - 1
        return self.names[min(max(shard, 0), len(self.names) - 1)]

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream as one array (a copy); IndexError outside it."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"token range [{start}, {stop}) outside a stream of {len(self)} tokens")
        parts = []
        shard = int(np.searchsorted(self.bounds, start, side="right")) - 1
        position = start
        while position < stop:
            shard_start = int(self.bounds[shard])
            end = min(stop, int(self.bounds[shard + 1]))
            parts.append(self.shards[shard][position - shard_start : end - shard_start])
            position = end
            shard += 1
        if len(parts) == 1:
            return np.array(parts[0])
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("TokenStream supports contiguous slices only")
        start, stop, _ = key.indices(len(self))
        return self.read(start, max(start, stop))


class PreparedData:
    """A prepared data folder (layout: relscale.data.layout), read-only.

    Opening reads the manifest and checks every file's size against it, and the sha256 of any file
    modified after the manifest was written; ``verify=True`` checks every sha256. Raises DataError
    naming the file (missing, truncated, corrupted) or the manifest key. Shards are memory-mapped
    on demand; nothing is loaded eagerly."""

    def __init__(self, data_dir: str | Path, verify: bool = False):
        self.data_dir = Path(data_dir)
        self.manifest = read_manifest(self.data_dir)
        try:
            self.dtype = np.dtype(self.manifest["dtype"])
            self.eos_id = layout.eos_id(self.manifest, self.data_dir)
            self.vocab_size = layout.vocab_size(self.manifest, self.data_dir)
            self.group_fields = layout.group_fields(self.manifest, self.data_dir)
            self.extra_fields = list(self.manifest["extra_fields"])
            self._splits = self.manifest["splits"]
        except KeyError as error:
            raise DataError(f"{layout.manifest_path(self.data_dir)}: missing key {error}") from error
        try:
            self._check_sizes()
        except (KeyError, TypeError) as error:  # a manifest edited by hand or cut short
            raise DataError(f"{layout.manifest_path(self.data_dir)}: malformed split or file record "
                            f"({type(error).__name__}: {error})") from error
        if verify:
            self.verify()

    # -- integrity --------------------------------------------------------------------------

    def _files(self) -> list[tuple[Path, dict]]:
        """Every file the manifest describes, with its record (bytes, sha256)."""
        files = [(layout.tokenizer_path(self.data_dir, self.manifest), self.manifest["tokenizer"])]
        for split, record in self._splits.items():
            files.append((layout.index_path(self.data_dir, split, self.manifest), record["index"]))
            files += list(zip(layout.shard_paths(self.data_dir, split, self.manifest), record["shards"]))
        return files

    def _check_sizes(self) -> None:
        for split, record in self._splits.items():
            for shard in record["shards"]:
                expected = shard["n_tokens"] * self.dtype.itemsize
                if shard["bytes"] != expected:
                    raise DataError(
                        f"{layout.manifest_path(self.data_dir)}: shard {split}/{shard['file']} records "
                        f"{shard['bytes']} bytes for {shard['n_tokens']} {self.dtype} tokens"
                    )
        # prepare writes the manifest last: a file modified after it was changed in place (same
        # size or not), so its checksum is verified on every open; untouched files cost one stat
        manifest_mtime = layout.manifest_path(self.data_dir).stat().st_mtime
        for path, record in self._files():
            if not path.is_file():
                raise DataError(
                    f"missing file {path} (listed in {MANIFEST}); re-run `relscale prepare --force`"
                )
            stat = path.stat()
            if stat.st_size != record["bytes"]:
                state = "truncated" if stat.st_size < record["bytes"] else "too large"
                raise DataError(
                    f"{path} is {state}: {stat.st_size} bytes on disk, the manifest records "
                    f"{record['bytes']}; re-run `relscale prepare --force`"
                )
            if stat.st_mtime > manifest_mtime:
                self._verify_file(path, record)

    def verify(self) -> int:
        """Check the sha256 of every file against the manifest; returns the number of files checked."""
        files = self._files()
        for path, record in files:
            self._verify_file(path, record)
        return len(files)

    @staticmethod
    def _verify_file(path: Path, record: dict) -> None:
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise DataError(
                f"{path} is corrupted: sha256 {digest[:16]}... differs from the manifest's "
                f"{record['sha256'][:16]}...; re-run `relscale prepare --force`"
            )

    # -- tokenizer ----------------------------------------------------------------------------

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The folder's ``tokenizers.Tokenizer`` (loaded once); DataError if the file is not one."""
        return load_tokenizer(self.tokenizer_path)

    @property
    def tokenizer_path(self) -> Path:
        """The folder's tokenizer.json (see :func:`relscale.data.layout.tokenizer_path`)."""
        return layout.tokenizer_path(self.data_dir, self.manifest)

    # -- tokens and documents -----------------------------------------------------------------

    @property
    def splits(self) -> list[str]:
        """The split names, in manifest order (``["train", "val"]``)."""
        return list(self._splits)

    def split_info(self, split: str) -> dict:
        """The manifest's record of ``split`` (DataError naming the known splits if absent)."""
        return layout.split_record(self.manifest, split, self.data_dir)

    def n_tokens(self, split: str) -> int:
        """Tokens in the split's stream, one EOS per document included."""
        return int(self.split_info(split)["n_tokens"])

    def shards(self, split: str) -> list[np.ndarray]:
        """The split's shards, memory-mapped read-only, in stream order."""
        records = self.split_info(split)["shards"]
        paths = layout.shard_paths(self.data_dir, split, self.manifest)
        return [
            np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["n_tokens"],))
            for path, shard in zip(paths, records)
        ]

    def stream(self, split: str) -> TokenStream:
        """The split's shards as one flat, sliceable stream (memory maps opened once per split)."""
        cache = self.__dict__.setdefault("_stream_cache", {})
        if split not in cache:
            names = [str(path) for path in layout.shard_paths(self.data_dir, split, self.manifest)]
            cache[split] = TokenStream(self.shards(split), self.dtype, names)
        return cache[split]

    def tokens(self, split: str) -> np.ndarray:
        """The split's whole token stream: a memory map for one shard, a copy in RAM for several."""
        shards = self.shards(split)
        if len(shards) == 1:
            return shards[0]
        return np.concatenate(shards) if shards else np.empty(0, self.dtype)

    def documents(self, split: str) -> pd.DataFrame:
        """A copy of the split's document index: one row per document (doc_id, shard, offset,
        length in tokens without EOS, n_bytes, start in the stream, group and extra labels)."""
        return self._documents(split).copy()

    def _documents(self, split: str) -> pd.DataFrame:
        cache = self.__dict__.setdefault("_index_cache", {})
        if split not in cache:
            cache[split] = pd.read_parquet(layout.index_path(self.data_dir, split, self.manifest))
        return cache[split]

    def doc_tokens(self, split: str, row: int) -> np.ndarray:
        """Tokens of the document in row `row` of the split's index, without its trailing EOS."""
        index = self._documents(split)
        if not 0 <= row < len(index):
            raise IndexError(f"row {row} outside the {split} index of {len(index)} documents")
        start, length = int(index["start"].iat[row]), int(index["length"].iat[row])
        return self.stream(split).read(start, start + length)

    def decode_document(self, split: str, row: int) -> str:
        """The text of the document in row ``row`` of the split's index (decoded from its tokens)."""
        return self.tokenizer.decode(self.doc_tokens(split, row).tolist(), skip_special_tokens=False)

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy (nats/token) of the split's unigram token distribution, EOS included.

        A model that learned nothing but token frequencies reaches this loss, so a trained model
        should get below it.
        """
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for shard in self.shards(split):
            shard_counts = np.bincount(shard, minlength=self.vocab_size)
            if len(shard_counts) > self.vocab_size:
                raise DataError(
                    f"{self.data_dir}/{split}: token id {len(shard_counts) - 1} is outside the "
                    f"vocabulary of {self.vocab_size}"
                )
            counts += shard_counts
        total = counts.sum()
        if total == 0:
            raise DataError(f"{self.data_dir}: split {split!r} has no tokens")
        probs = counts[counts > 0] / total
        return float(-(probs * np.log(probs)).sum())

    def __repr__(self) -> str:
        sizes = ", ".join(f"{split}={record['n_tokens']:,} tokens" for split, record in self._splits.items())
        return f"PreparedData({str(self.data_dir)!r}, vocab_size={self.vocab_size}, {sizes})"
