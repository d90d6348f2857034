"""Final weights on disk: one safetensors file plus the model config (JSON), loadable without
torch.distributed, and readable by anything that reads safetensors.

Layout of a model directory::

    model.safetensors   state dict of relscale.model.Transformer (tied weights stored once)
    config.json         {"format": "relscale-model", "model": {...ModelConfig...}, "meta": {...}}

``meta`` carries what evaluation and fitting need to know about the run: training tokens,
FLOPs in both conventions, sequence length, the prepared-data directory (for the tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from relscale.atomic import atomic_write, atomic_write_text
from relscale.config import ModelConfig, model_config_from_dict, to_dict
from relscale.errors import DataError
from relscale.model import Transformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "relscale-model"


def save_model(model: Transformer, out_dir: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s full (unsharded) weights and config to ``out_dir`` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:
        state.pop("output.weight", None)  # the same storage as embed.weight
    atomic_write(out / WEIGHTS, lambda tmp: save_file(state, tmp))
    config = {"format": FORMAT, "model": to_dict(model.cfg), "meta": meta or {}}
    atomic_write_text(out / CONFIG, json.dumps(config, indent=2))
    return out


def read_model_config(model_dir: str | Path) -> tuple[ModelConfig, dict[str, Any]]:
    path = Path(model_dir) / CONFIG
    if not path.is_file():
        raise DataError(f"{path}: no model config (expected a directory written by relscale train)")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise DataError(f"{path}: not a relscale model config (format={config.get('format')!r})")
    return model_config_from_dict(config["model"]), config.get("meta", {})


def load_model(
    model_dir: str | Path, device: str | torch.device = "cpu", kernels: dict[str, str] | None = None
) -> tuple[Transformer, dict[str, Any]]:
    """The model saved in ``model_dir`` and its ``meta``; ``kernels`` overrides backends."""
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
