"""Byte-level BPE tokenizers: train one on the training split, or load a tokenizer.json.

Byte-level BPE maps every UTF-8 byte to a token first, so any text round-trips exactly through
encode -> decode; that property is what lets the tests check shards against the input documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from relscale.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# 256 byte tokens + the EOS token: the smallest vocabulary a byte-level BPE can have.
MIN_VOCAB_SIZE = 257


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, length: int | None = None, eos_token: str = EOS_TOKEN
) -> Tokenizer:
    """Train a byte-level BPE with `eos_token` as id 0.

    Deterministic: merge counts do not depend on iteration order and the trainer breaks ties by
    the pair itself, so the same texts give a byte-identical tokenizer.json (tested).
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + EOS)"
        )
    tokenizer = Tokenizer(models.BPE())
    # No prefix space: decode(encode(text)) must give back `text` byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[eos_token],
        # Every byte is in the vocabulary even if the training split never uses it, so the
        # validation split (and any later text) always encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A ``tokenizers`` tokenizer.json; DataError naming the file if it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer file not found: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a bare Exception with the parse error
        raise DataError(f"{path}: not a valid tokenizers tokenizer.json ({error})") from error


def eos_id_of(tokenizer: Tokenizer, eos_token: str = EOS_TOKEN, *, where: str = "tokenizer") -> int:
    """The id of ``eos_token``; DataError naming ``where`` when the vocabulary lacks it."""
    eos_id = tokenizer.token_to_id(eos_token)
    if eos_id is None:
        raise DataError(
            f"{where} has no EOS token {eos_token!r} in its vocabulary "
            f"(vocab size {tokenizer.get_vocab_size()}); pass --eos-token"
        )
    return eos_id


def tokenizer_json(tokenizer: Tokenizer) -> str:
    """The canonical serialisation written to tokenizer.json (hashes are taken over it)."""
    return tokenizer.to_str(pretty=True)


def sha256_text(text: str) -> str:
    """Hex sha256 of ``text`` encoded as UTF-8."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 holds ids 0..65535, so it serves any vocabulary of up to 65536 tokens."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class BatchEncoder:
    """A picklable `datasets.map` function: text batch -> token ids and UTF-8 byte counts.

    It carries the tokenizer as its JSON string and builds the Rust object lazily, once per worker
    process, because worker processes of `map(num_proc=N)` each need their own copy.
    """

    def __init__(self, tokenizer_json_text: str, text_column: str = "text"):
        self.tokenizer_json_text = tokenizer_json_text
        self.text_column = text_column
        self._tokenizer: Tokenizer | None = None

    def __getstate__(self) -> dict:
        return {
            "tokenizer_json_text": self.tokenizer_json_text,
            "text_column": self.text_column,
            "_tokenizer": None,
        }

    def __call__(self, batch: dict) -> dict:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer.from_str(self.tokenizer_json_text)
        texts = batch[self.text_column]
        # encode_batch_fast skips character offsets we never use (tokenizers >= 0.20).
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        encodings = encode(texts, add_special_tokens=False)
        return {
            "ids": [encoding.ids for encoding in encodings],
            "n_bytes": [len(text.encode("utf-8")) for text in texts],
        }
