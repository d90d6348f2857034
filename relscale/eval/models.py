"""What scoring a discovered model needs: its weights on a device, its tokenizer and start
tokens, its default context and the model columns of its dumps."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from relscale.config import ModelConfig
from relscale.counting import param_counts, run_flops
from relscale.errors import DataError
from relscale.eval import hf
from relscale.eval.discover import ModelEntry, ModelInfo, own_tokenizer
from relscale.eval.options import RunOptions
from relscale.eval.scoring import StartTokens, hf_special_tokens, resolve_start
from relscale.model_io import load_model, tokenizer_key

DEFAULT_MAX_CONTEXT = 4096


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU; any other name as ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------------------------------- weights
def load_weights(entry: ModelEntry, cfg: ModelConfig, device: torch.device) -> torch.nn.Module:
    """The model of ``entry`` on ``device`` (fp32 weights), built from ``cfg`` for a checkpoint.

    Raises DataError naming the file for missing, damaged or unsafe weights."""
    if entry.kind == "relscale":
        return load_model(entry.path, device)[0]
    if entry.kind == "hf":
        return hf.load_hf_model(entry.path, device)[0]
    return load_dcp_model(entry.path, cfg, device)


def load_dcp_model(path: Path, cfg: ModelConfig, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The model weights of a resumable trainer checkpoint folder (saved as ``{"model": ...,
    "optim": ...}``) in a fresh ``Transformer(cfg)`` on ``device``.

    Read through :func:`relscale.train.checkpoint.load_dcp_state`: checksums verified, pickles
    restricted. Raises DataError naming the folder when it lacks model weights, or the file when
    it is missing, corrupted or unsafe (issue 18)."""
    from relscale.model import Transformer
    from relscale.train.checkpoint import load_dcp_state, read_checkpoint_metadata

    model = Transformer(cfg)
    state = model.state_dict()
    saved = read_checkpoint_metadata(path).state_dict_metadata  # a planted pickle is refused
    wanted = {k: v for k, v in state.items() if f"model.{k}" in saved}
    tied = {"output.weight"} if cfg.tie_embeddings else set()
    missing = sorted(set(state) - set(wanted) - tied)
    if missing:
        raise DataError(f"{path}: checkpoint lacks model weights {missing[:6]}")
    load_dcp_state(path, {"model": wanted})  # in place, into the model's tensors
    return model.to(device)


# ------------------------------------------------------------------------------- model columns
def default_context(info: ModelInfo) -> int:
    """Window length in tokens: the training sequence length when the meta records it; else the
    model's maximum length, capped at DEFAULT_MAX_CONTEXT (released checkpoints often declare far
    more than they trained)."""
    if info.meta.get("seq_len"):
        return int(info.meta["seq_len"])
    return min(info.cfg.max_seq_len, DEFAULT_MAX_CONTEXT)


def model_columns(entry: ModelEntry, info: ModelInfo) -> dict[str, Any]:
    """The model columns of a dump (:data:`relscale.eval.dump.MODEL_FIELDS`): id, step,
    parameter counts, training tokens, training FLOPs in both conventions (computed from tokens
    and seq_len when the meta lacks them, :func:`relscale.counting.run_flops`), budget (FLOPs),
    hidden, layers and source."""
    cfg, meta = info.cfg, info.meta
    counts = param_counts(cfg)
    tokens = meta.get("tokens")
    flops_train, flops_marin = meta.get("flops_train"), meta.get("flops_marin")
    seq_len = meta.get("seq_len")
    if tokens is not None and seq_len and (flops_train is None or flops_marin is None):
        flops = run_flops(cfg, int(seq_len), int(tokens))
        flops_train = flops.flops_train if flops_train is None else flops_train
        flops_marin = flops.flops_marin if flops_marin is None else flops_marin
    budget = meta.get("budget", entry.extra.get("budget"))
    return {
        "model_id": entry.model_id,
        "step": entry.step,
        "params": counts.total,
        "non_embedding_params": counts.non_embedding,
        "tokens": None if tokens is None else int(tokens),
        "flops_train": None if flops_train is None else float(flops_train),
        "flops_marin": None if flops_marin is None else float(flops_marin),
        "budget": None if budget is None else float(budget),
        "hidden": cfg.hidden,
        "layers": cfg.layers,
        "source": str(entry.path),
    }


# ------------------------------------------------------------------------------------ tokenizers
@dataclass
class TokenizerInfo:
    """A model's tokenizer (``tokenizers.Tokenizer``), its resolved start-token policy and
    ``key`` (first 16 hex digits of sha256(tokenizer.json): equal keys tokenise identically)."""

    tokenizer: Any
    start: StartTokens
    key: str

    @property
    def start_id(self) -> int:
        """The token a document's first token is predicted from (lm-eval's prefix_token_id)."""
        return self.start.first


def load_tokenizer_for(entry: ModelEntry, info: ModelInfo, opts: RunOptions) -> TokenizerInfo:
    """The tokenizer of a model and its start tokens under ``opts.start_token`` (policies in
    :func:`relscale.eval.scoring.resolve_start`).

    Where from, first match: ``opts.tokenizer``; a Hugging Face folder's own; the tokenizer.json
    stored next to a relscale model's weights; the prepared data of ``info.data_dir``. Raises
    DataError when none is known (pass --data or --tokenizer) or a file is unreadable."""
    from tokenizers import Tokenizer

    from relscale.data.tokenizer import EOS_TOKEN

    if opts.tokenizer is not None:
        tokenizer = Tokenizer.from_file(str(opts.tokenizer))
        where, key = str(opts.tokenizer), tokenizer_key(opts.tokenizer)
        if entry.kind == "hf":
            bos_id, eos_id, add_bos = hf_special_tokens(entry.path, tokenizer)
        else:
            bos_id, eos_id, add_bos = None, tokenizer.token_to_id(EOS_TOKEN), None
    elif entry.kind == "hf":
        tokenizer = hf.load_hf_tokenizer(entry.path)
        where, key = str(entry.path), tokenizer_key(entry.path / "tokenizer.json")
        bos_id, eos_id, add_bos = hf_special_tokens(entry.path, tokenizer)
    elif (own := own_tokenizer(entry)) is not None:  # tokenizer.json saved with the weights
        tokenizer, where, key = Tokenizer.from_file(str(own[0])), str(own[0]), tokenizer_key(own[0])
        bos_id, eos_id, add_bos = None, own[1], None  # our data: an EOS between documents
    else:
        if info.data_dir is None:
            raise DataError(f"{entry.path}: the model's meta names no data_path; pass --data or --tokenizer")
        from relscale.data import PreparedData

        data = PreparedData(info.data_dir)
        tokenizer, where = data.tokenizer, str(info.data_dir)
        key = tokenizer_key(data.tokenizer_path)
        bos_id, eos_id, add_bos = None, data.eos_id, None  # our data: an EOS between documents
    start = resolve_start(
        tokenizer, opts.start_token, bos_id=bos_id, eos_id=eos_id, add_bos=add_bos, where=where
    )
    return TokenizerInfo(tokenizer, start, key)
