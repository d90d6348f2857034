"""Final weights on disk: one safetensors file plus the model config (JSON), loadable without
torch.distributed, and readable by anything that reads safetensors.

Layout of a model directory (``<run>/final``; the names are part of the run-folder contract,
:mod:`relscale.train.run_dir`, which also reads config.json and the tokenizer without torch),
every path in it relative to the folder so the folder (or the run folder around it) can be moved
or copied and still evaluates::

    model.safetensors   state dict of relscale.model.Transformer (tied weights stored once)
    tokenizer.json      the tokenizer the model was trained with (a copy of the prepared data's)
    config.json         {"format": "relscale-model", "model": {...ModelConfig...}, "meta": {...},
                         "tokenizer": {"file": "tokenizer.json", "eos_id": 0}}

``meta`` carries what evaluation and fitting need to know about the run: training tokens,
FLOPs in both conventions, sequence length, and ``data_path``: where the prepared data was when
the model was trained, a hint for finding its held-out split. Loading the weights or the
tokenizer never needs it. ``tokenizer`` is absent for folders written before the tokenizer was
stored, or without one; readers then fall back to the prepared data named by ``data_path``.
``config.json`` is written last: a folder with a config is complete.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from relscale.atomic import atomic_write, atomic_write_text
from relscale.config import ModelConfig, model_config_from_dict, to_dict
from relscale.errors import DataError
from relscale.model import Transformer
from relscale.train import run_dir

WEIGHTS = run_dir.WEIGHTS
CONFIG = run_dir.MODEL_CONFIG
TOKENIZER = run_dir.TOKENIZER
FORMAT = run_dir.MODEL_FORMAT


def _data_tokenizer(data_path: str | Path) -> tuple[Path, int | None]:
    """(tokenizer.json, EOS id) of a prepared-data folder, read through the data's contract
    (relscale.data.layout: the manifest names both; no shard is opened). DataError naming
    manifest.json when it is missing or lacks either."""
    from relscale.data import layout

    manifest = layout.read_manifest(data_path)
    return layout.tokenizer_path(data_path, manifest), layout.eos_id(manifest, data_path)


def save_model(
    model: Transformer,
    out_dir: str | Path,
    meta: dict[str, Any] | None = None,
    *,
    tokenizer: str | Path | None = None,
    eos_id: int | None = None,
) -> Path:
    """Write ``model``'s full (unsharded) weights, its tokenizer and config to ``out_dir`` atomically.

    ``tokenizer``: a ``tokenizers`` JSON file copied to ``out_dir/tokenizer.json``, with
    ``eos_id`` the token that separates documents (the beginning token when scoring). Without
    it, the tokenizer of the prepared data at ``meta["data_path"]`` (and its EOS) is copied when
    that folder can be read; otherwise (with a warning) none is stored and readers fall back to
    ``data_path``. Returns ``out_dir``. Raises OSError as the file system does.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    if tokenizer is None and meta.get("data_path"):
        try:
            tokenizer, data_eos = _data_tokenizer(meta["data_path"])
        except (DataError, OSError, KeyError) as err:
            warnings.warn(f"{out}: no tokenizer stored with the weights ({err})", stacklevel=2)
        else:
            eos_id = data_eos if eos_id is None else eos_id
    tokenizer_entry = None
    if tokenizer is not None:
        source = Path(tokenizer)
        if not source.is_file():
            raise DataError(f"{source}: tokenizer file not found")
        if not (out / TOKENIZER).exists() or not (out / TOKENIZER).samefile(source):
            atomic_write(out / TOKENIZER, lambda tmp: shutil.copyfile(source, tmp))
        tokenizer_entry = {"file": TOKENIZER, "eos_id": eos_id}
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("output.weight", None)  # the same storage as embed.weight
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp))
    config: dict[str, Any] = {"format": FORMAT, "model": to_dict(model.cfg), "meta": meta}
    if tokenizer_entry is not None:
        config["tokenizer"] = tokenizer_entry
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2))
    return out


def _read_config(model_dir: str | Path) -> dict[str, Any]:
    return run_dir.read_model_folder_config(model_dir)


def read_model_config(model_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(ModelConfig, meta) of a model directory written by :func:`save_model`.

    Raises DataError naming ``config.json`` when it is missing, not JSON or not ours."""
    config = _read_config(model_dir)
    return model_config_from_dict(config["model"]), config.get("meta", {})


def read_model_tokenizer(model_dir: str | Path) -> tuple[Path, int | None] | None:
    """(path of the tokenizer.json stored with the weights, EOS id), or None when the folder
    stores none (written before tokenizers were stored, or without one).

    The path in config.json is relative to ``model_dir`` and must stay inside it; raises
    DataError naming the file when config.json names a tokenizer that is missing or outside.
    Same as the torch-free :func:`relscale.train.run_dir.model_tokenizer`."""
    return run_dir.model_tokenizer(model_dir)


def tokenizer_key(path: str | Path) -> str:
    """First 16 hex digits of the sha256 of a tokenizer file: equal keys tokenise identically."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", kernels: dict[str, str] | None = None
) -> tuple[Transformer, dict[str, Any]]:
    """The model saved in ``model_dir`` and its ``meta``; ``kernels`` overrides backends.

    Raises DataError naming the file when the config or weights are missing or do not match."""
    cfg, meta = read_model_config(model_dir)
    for op, backend in (kernels or {}).items():
        setattr(cfg.kernels, op, backend)
    weights = Path(model_dir) / WEIGHTS
    if not weights.is_file():
        raise DataError(f"{weights}: weights file missing")
    model = Transformer(cfg)
    state = load_file(str(weights), device="cpu")
    if cfg.tie_embeddings:
        state["output.weight"] = state["embed.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{weights}: weights do not match the config: missing {missing}, extra {unexpected}")
    return model.to(device), meta
