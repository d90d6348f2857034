"""Prepared data: `relscale prepare` (documents -> token shards + index + manifest) and the
deterministic, resumable sequence loader that feeds the trainer.

    from relscale.data import prepare_default, PreparedData, SequenceLoader
    result = prepare_default("relscale_data/sotu")          # or prepare([...paths], out_dir, ...)
    data = PreparedData(result.out_dir)
    loader = SequenceLoader(data, "train", seq_len=256, micro_batch=8, seed=0)
    batch = loader.next_batch()        # tokens, targets, positions, cu_seqlens, max_seqlen

The folder layout (manifest, tokenizer, splits, group labels) is the torch-free contract in
`relscale.data.layout`; other parts find a prepared folder's files through it.

Note `relscale.data.prepare` is the function; the module is `sys.modules["relscale.data.prepare"]`.
The loader's names are imported on first use, so `relscale prepare` does not pay for importing torch.
"""

import importlib

from relscale.data.dataset import PreparedData, TokenStream
from relscale.data.prepare import PrepareResult, assign_validation, prepare, prepare_default
from relscale.data.tokenizer import EOS_TOKEN, dtype_for_vocab, train_bpe

_LOADER_EXPORTS = ("Batch", "SequenceLoader", "document_segments", "validation_batches")

__all__ = [
    "EOS_TOKEN",
    "PrepareResult",
    "PreparedData",
    "TokenStream",
    "assign_validation",
    "dtype_for_vocab",
    "prepare",
    "prepare_default",
    "train_bpe",
    *_LOADER_EXPORTS,
]


def __getattr__(name: str):
    if name in _LOADER_EXPORTS:
        return getattr(importlib.import_module("relscale.data.loader"), name)
    raise AttributeError(f"module 'relscale.data' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LOADER_EXPORTS])
