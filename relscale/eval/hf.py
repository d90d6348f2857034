"""Hugging Face Llama / Qwen3 checkpoints <-> our Transformer, without needing ``transformers``.

Import reads a local directory (``config.json`` + ``model.safetensors`` or sharded safetensors
with ``model.safetensors.index.json``) of a ``LlamaForCausalLM`` or ``Qwen3ForCausalLM`` into a
:class:`relscale.model.Transformer` (fp32 weights), so the released IsoFLOP checkpoints of
"Relative Scaling Laws for LLMs" (Qwen3-style: untied, QK-norm) are scored by the same code as
ours, with their own ``tokenizer.json``. Both families use the rotate-half RoPE layout we use,
so weights map one to one:

=========================================  ===============================
Hugging Face                               relscale
=========================================  ===============================
model.embed_tokens.weight                  embed.weight
model.layers.N.self_attn.{q,k,v,o}_proj    blocks.N.attn.w{q,k,v,o}
model.layers.N.self_attn.{q,k}_norm        blocks.N.attn.{q,k}_norm (Qwen3)
model.layers.N.mlp.{gate,up,down}_proj     blocks.N.mlp.w_{gate,up,down}
model.layers.N.input_layernorm             blocks.N.attn_norm
model.layers.N.post_attention_layernorm    blocks.N.mlp_norm
model.norm.weight                          norm.weight
lm_head.weight                             output.weight (absent when tied)
=========================================  ===============================

RoPE: plain (``default``) and Llama 3.1's ``llama3`` frequency scaling are read from either
spelling transformers writes -- ``rope_theta`` + ``rope_scaling`` (transformers 4, and Levanter's
exports of the released checkpoints) or ``rope_parameters`` (transformers 5) -- into
``ModelConfig.rope_theta`` / ``rope_scaling``; export writes both spellings. Features the decoder
does not have are rejected with an error naming the config key: other RoPE types (linear, yarn,
...), ``partial_rotary_factor`` != 1, attention or MLP biases, sliding-window attention,
activations other than SiLU. Shard files named by ``model.safetensors.index.json`` must lie in
the model folder (a name like ``../../x.safetensors``, an absolute path or a symlink out of it is
refused; the Hugging Face cache's own ``snapshots/<rev>/ -> ../../blobs/`` links are allowed).
Export writes our checkpoints in the same format (a Qwen3 config when the model has QK-norm,
else Llama), plus the tokenizer and ``relscale_meta.json`` (training tokens, FLOPs) so a round
trip keeps what the eval dumps need.

Hub layout (last section): a checkpoint named ``isoflop-<budget>-d<d>-L<L>-B<B>-<sweep>`` (the
released suite's names) gives its budget, training tokens and FLOPs (:func:`meta_from_name`),
and a hub-cache repository ``models--ORG--NAME`` is read through its snapshot.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from relscale.atomic import atomic_write as atomic_write_with
from relscale.atomic import atomic_write_text
from relscale.config import ModelConfig, RopeScalingConfig
from relscale.counting import flops_per_token_marin
from relscale.errors import ConfigError, DataError
from relscale.model import Transformer

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen3ForCausalLM": "qwen3"}
META_FILE = "relscale_meta.json"
# Buffers some exporters write that carry no weights (recomputed from rope_theta).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def is_hf_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a Hugging Face model config (``config.json`` with a ``model_type`` or
    ``architectures``); a relscale model folder's config has neither."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError:
        return False
    return "model_type" in data or "architectures" in data


def read_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face model folder; DataError naming the file when
    it is missing or not JSON."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise DataError(f"{path}: no config.json (expected a Hugging Face model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err


def _family(hf: dict[str, Any], where: str) -> str:
    architectures = hf.get("architectures") or []
    for name in architectures:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    if not architectures and hf.get("model_type") in ARCHITECTURES.values():
        return hf["model_type"]
    raise DataError(
        f"{where}: architectures={architectures} model_type={hf.get('model_type')!r} is not "
        f"supported (supported: {', '.join(ARCHITECTURES)})"
    )


LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_table(hf: dict[str, Any], key: str, where: str) -> dict[str, Any] | None:
    """The flat RoPE table under ``key`` (``rope_scaling`` or ``rope_parameters``), or None.

    transformers 5 may nest ``rope_parameters`` by layer type; only ``full_attention`` exists
    in the decoder (other layer types are refused by the ``layer_types`` check)."""
    table = hf.get(key)
    if table is None:
        return None
    if not isinstance(table, dict):
        raise DataError(f"{where}: {key}={table!r} is not supported (expected a table)")
    if isinstance(table.get("full_attention"), dict):
        others = sorted(k for k in table if k != "full_attention")
        if others:
            raise DataError(f"{where}: {key} has RoPE tables for {others}; only full_attention is supported")
        return table["full_attention"]
    return table


def _rope_of_table(
    table: dict[str, Any], key: str, hf: dict[str, Any], where: str
) -> tuple[float | None, RopeScalingConfig]:
    """(rope_theta if the table states one, scaling) of one RoPE table; refuses unknown types."""
    rope_type = table.get("rope_type", table.get("type", "default"))
    theta = table.get("rope_theta")
    if theta is not None and (not isinstance(theta, int | float) or isinstance(theta, bool)):
        raise DataError(f"{where}: {key}.rope_theta={theta!r} is not a number")
    partial = table.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise DataError(
            f"{where}: {key}.partial_rotary_factor={partial!r} is not supported (RoPE on the whole head)"
        )
    if rope_type in (None, "default"):
        return theta, RopeScalingConfig()
    if rope_type != "llama3":
        raise DataError(
            f"{where}: {key}.rope_type={rope_type!r} is not supported (supported: default, llama3)"
        )
    values: dict[str, Any] = {}
    for name in LLAMA3_KEYS:
        value = table.get(name)
        if value is None and name == "original_max_position_embeddings":
            value = hf.get("max_position_embeddings")  # transformers' fallback for llama3
        if value is None:
            raise DataError(f"{where}: {key}.{name} missing (required for rope_type 'llama3')")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise DataError(f"{where}: {key}.{name}={value!r} is not a number")
        values[name] = value
    if float(values["original_max_position_embeddings"]) != int(values["original_max_position_embeddings"]):
        raise DataError(
            f"{where}: {key}.original_max_position_embeddings="
            f"{values['original_max_position_embeddings']!r} is not an integer"
        )
    scaling = RopeScalingConfig(
        type="llama3",
        factor=float(values["factor"]),
        low_freq_factor=float(values["low_freq_factor"]),
        high_freq_factor=float(values["high_freq_factor"]),
        original_max_position_embeddings=int(values["original_max_position_embeddings"]),
    )
    try:
        scaling.validate(key)
    except ConfigError as err:
        raise DataError(f"{where}: {err}") from err
    return theta, scaling


def read_rope(hf: dict[str, Any], where: str = "config.json") -> tuple[float, RopeScalingConfig]:
    """``(rope_theta, rope_scaling)`` of a Hugging Face config, in either spelling.

    transformers 4 (and Levanter's exports) write ``rope_theta`` and ``rope_scaling``
    (``{"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192}``; older files say ``type``); transformers 5 writes
    ``rope_parameters`` holding the type, its parameters and ``rope_theta``. When a file has both
    they must agree (transformers 4 reads only the first, 5 prefers ``rope_scaling``), else the
    checkpoint means different models to different readers and is refused. Defaults follow
    transformers: theta 10000, ``original_max_position_embeddings`` = ``max_position_embeddings``.

    Raises DataError naming the key for an unknown ``rope_type`` (linear, yarn, dynamic, ...),
    a missing llama3 parameter, ``partial_rotary_factor`` != 1, or disagreeing spellings.
    """
    found: dict[str, tuple[float | None, RopeScalingConfig]] = {}
    for key in ("rope_scaling", "rope_parameters"):
        table = _rope_table(hf, key, where)
        if table is not None:
            found[key] = _rope_of_table(table, key, hf, where)
    top_theta = hf.get("rope_theta")
    if top_theta is not None and (not isinstance(top_theta, int | float) or isinstance(top_theta, bool)):
        raise DataError(f"{where}: rope_theta={top_theta!r} is not a number")
    thetas = {k: float(v[0]) for k, v in found.items() if v[0] is not None}
    if top_theta is not None:
        thetas["rope_theta"] = float(top_theta)
    if len(set(thetas.values())) > 1:
        raise DataError(f"{where}: the RoPE base disagrees between keys: {thetas}")
    scalings = {k: v[1] for k, v in found.items()}
    if len(scalings) == 2 and scalings["rope_scaling"] != scalings["rope_parameters"]:
        raise DataError(
            f"{where}: rope_scaling and rope_parameters disagree ({scalings['rope_scaling']} vs "
            f"{scalings['rope_parameters']}); transformers 4 and 5 would build different models"
        )
    theta = next(iter(thetas.values()), 10000.0)
    scaling = next(iter(scalings.values()), RopeScalingConfig())
    return theta, scaling


def rope_config_of(cfg: ModelConfig) -> dict[str, Any]:
    """The RoPE keys of a Hugging Face config for ``cfg``, in both spellings (transformers 4 reads
    ``rope_theta`` + ``rope_scaling``, 5 reads ``rope_parameters``; both say the same)."""
    scaling = cfg.rope_scaling
    if scaling.type == "none":
        return {
            "rope_theta": cfg.rope_theta,
            "rope_scaling": None,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        }
    if scaling.type != "llama3":  # a new RopeScalingConfig type needs its HF spelling here
        raise DataError(f"model.rope_scaling.type={scaling.type!r} has no Hugging Face export")
    table = {"rope_type": "llama3", **{name: getattr(scaling, name) for name in LLAMA3_KEYS}}
    return {
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(table),
        "rope_parameters": {**table, "rope_theta": cfg.rope_theta},
    }


def hf_to_model_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Llama/Qwen3 config; unsupported features raise naming the key."""
    family = _family(hf, where)
    if hf.get("hidden_act", "silu") != "silu":
        raise DataError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (only silu / SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise DataError(f"{where}: {key}=true is not supported (the decoder has no biases)")
    if hf.get("use_sliding_window"):
        raise DataError(f"{where}: use_sliding_window=true is not supported (full causal attention only)")
    if family == "llama" and hf.get("sliding_window") is not None:
        raise DataError(f"{where}: sliding_window={hf['sliding_window']} is not supported")
    layer_types = hf.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise DataError(
            f"{where}: layer_types={sorted(set(layer_types))} is not supported (full_attention only)"
        )
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(hf.get(key), int):
            raise DataError(f"{where}: {key} missing or not an integer")
    heads = hf["num_attention_heads"]
    rope_theta, rope_scaling = read_rope(hf, where)
    try:
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"],
            hidden=hf["hidden_size"],
            layers=hf["num_hidden_layers"],
            heads=heads,
            kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            mlp_hidden=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings") or 4096,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            qk_norm=family == "qwen3",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            init_std=float(hf.get("initializer_range", 0.02)),
        )
        cfg.validate()
    except Exception as err:  # ConfigError names our key; say which file it came from
        raise DataError(f"{where}: {err}") from err
    return cfg


def _name_pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(Hugging Face name, our name) of every weight."""
    pairs = [("model.embed_tokens.weight", "embed.weight"), ("model.norm.weight", "norm.weight")]
    for n in range(cfg.layers):
        hf, ours = f"model.layers.{n}.", f"blocks.{n}."
        pairs += [(f"{hf}self_attn.{p}_proj.weight", f"{ours}attn.w{p}.weight") for p in "qkvo"]
        pairs += [(f"{hf}mlp.{p}_proj.weight", f"{ours}mlp.w_{p}.weight") for p in ("gate", "up", "down")]
        pairs += [
            (f"{hf}input_layernorm.weight", f"{ours}attn_norm.weight"),
            (f"{hf}post_attention_layernorm.weight", f"{ours}mlp_norm.weight"),
        ]
        if cfg.qk_norm:
            pairs += [(f"{hf}self_attn.{p}_norm.weight", f"{ours}attn.{p}_norm.weight") for p in "qk"]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "output.weight"))
    return pairs


INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"


def _allowed_roots(model_dir: Path) -> list[Path]:
    """Folders a weight file of ``model_dir`` may resolve into: the folder itself and, for a
    Hugging Face cache snapshot (``models--ORG--NAME/snapshots/REV``), that repository's
    ``blobs/`` folder, where the snapshot's files are symlinks to."""
    resolved = model_dir.resolve()
    roots = [resolved]
    if model_dir.parent.name == "snapshots" and (model_dir.parent.parent / "blobs").is_dir():
        roots.append((model_dir.parent.parent / "blobs").resolve())
    return roots


def weight_file(model_dir: Path, name: Any, where: str) -> Path:
    """``model_dir / name`` for a weight file name from the checkpoint, refused (DataError naming
    ``where`` and the name) unless it is a relative path that stays in the model folder after
    following symlinks: an index entry ``../../x.safetensors``, an absolute path or a symlink
    out of the folder could make us read any file on the machine."""
    if not isinstance(name, str) or not name or "\x00" in name:
        raise DataError(f"{where}: shard name {name!r} is not a file name")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise DataError(f"{where}: shard path {name!r} is outside the model folder {model_dir}")
    path = model_dir / name
    target = path.resolve()
    if not any(target.is_relative_to(root) for root in _allowed_roots(model_dir)):
        raise DataError(
            f"{where}: shard path {name!r} leads outside the model folder {model_dir} (to {target})"
        )
    if not target.is_file():
        raise DataError(f"{where}: shard {name!r} missing ({path})")
    return path


def shard_names(model_dir: Path) -> list[str]:
    """The distinct shard file names of a sharded checkpoint's index, in sorted order.

    Raises DataError naming the index file when it is not JSON or has no ``weight_map`` table."""
    index = model_dir / INDEX_FILE
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise DataError(f"{index}: not a valid safetensors index ({err})") from err
    if not isinstance(weight_map, dict) or not weight_map:
        raise DataError(f"{index}: no weight_map table")
    names = set(weight_map.values())
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        raise DataError(f"{index}: shard name {bad[0]!r} is not a file name")
    return sorted(names)


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file on the CPU; DataError naming that file when it is
    empty, truncated or not safetensors."""
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError (and OSError)
        raise DataError(f"{path}: unreadable safetensors weights ({type(err).__name__}: {err})") from None


def _load_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (single file, or the shards of the index), on the CPU."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for shard in shard_names(model_dir):
            state.update(_load_weights_file(weight_file(model_dir, shard, str(index))))
        return state
    single = model_dir / WEIGHTS_FILE
    if single.is_file() or single.is_symlink():
        return _load_weights_file(weight_file(model_dir, WEIGHTS_FILE, str(model_dir)))
    if any(model_dir.glob("*.bin")):
        raise DataError(
            f"{model_dir}: only safetensors weights are read (found .bin files; convert them "
            "with transformers' save_pretrained(safe_serialization=True))"
        )
    raise DataError(f"{model_dir}: no {WEIGHTS_FILE} or {INDEX_FILE}")


def load_hf_model(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """A Transformer with the weights of a local Llama/Qwen3 checkpoint (fp32), and its meta
    (``relscale_meta.json`` when the folder has one, else ``{}``).

    Raises DataError naming the file or key for an unsupported config, a missing or extra
    weight, or a shard outside the folder (:func:`weight_file`)."""
    model_dir = Path(model_dir)
    cfg = hf_to_model_config(read_hf_config(model_dir), str(model_dir / "config.json"))
    hf_state = _load_safetensors(model_dir)
    ours: dict[str, torch.Tensor] = {}
    for hf_name, our_name in _name_pairs(cfg):
        if hf_name not in hf_state:
            raise DataError(f"{model_dir}: weight {hf_name} missing")
        ours[our_name] = hf_state.pop(hf_name).float()
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # some exporters store the tied copy
        ours["output.weight"] = ours["embed.weight"]
    leftover = [k for k in hf_state if not k.endswith(IGNORED_SUFFIXES)]
    if leftover:
        raise DataError(
            f"{model_dir}: weights the decoder has no place for (unsupported feature?): "
            f"{sorted(leftover)[:8]}"
        )
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(ours, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.embed.weight
    meta_path = model_dir / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return model.to(device), meta


def load_hf_tokenizer(model_dir: str | Path):
    """The ``tokenizers.Tokenizer`` of the folder's ``tokenizer.json``; DataError if there is none."""
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"{model_dir}: no tokenizer.json (pass --tokenizer)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for any unreadable file
        raise DataError(f"{path}: unreadable tokenizer ({err})") from None


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer_config files
        value = value.get("content")
    return value if isinstance(value, str) else None


def beginning_token(model_dir: str | Path, tokenizer) -> int:
    """The token a document's first token is predicted from: the tokenizer's BOS when one is
    configured (tokenizer_config.json ``bos_token``, else config.json ``bos_token_id``), else the
    EOS (``eos_token`` / ``eos_token_id``), matching how our own data separates documents."""
    model_dir = Path(model_dir)
    tok_config_path = model_dir / "tokenizer_config.json"
    tok_config = json.loads(tok_config_path.read_text()) if tok_config_path.is_file() else {}
    hf = read_hf_config(model_dir)
    for token_key, id_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id")):
        content = _token_content(tok_config.get(token_key))
        if content is not None and tokenizer.token_to_id(content) is not None:
            return tokenizer.token_to_id(content)
        token_id = hf.get(id_key)
        if isinstance(token_id, list) and token_id:
            token_id = token_id[0]
        if isinstance(token_id, int):
            return token_id
    raise DataError(
        f"{model_dir}: neither a BOS nor an EOS token is configured (tokenizer_config.json, "
        "config.json); pass --start-token"
    )


# ---------------------------------------------------------------------------------------- export
def hf_config_of(cfg: ModelConfig, eos_id: int | None = None) -> dict[str, Any]:
    """The Hugging Face ``config.json`` of ``cfg``: Qwen3 with QK-norm, else Llama; RoPE in both
    transformers spellings (:func:`rope_config_of`); ``eos_id`` as BOS and EOS token id."""
    family = "qwen3" if cfg.qk_norm else "llama"
    config: dict[str, Any] = {
        "architectures": ["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"],
        "model_type": family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        **rope_config_of(cfg),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "use_cache": True,
        # Documents follow an EOS in our data, so the EOS is also the beginning token.
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
    }
    if family == "qwen3":
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.layers)
    else:
        config.update(mlp_bias=False, pretraining_tp=1)
    return config


def export_hf(
    model: Transformer,
    out_dir: str | Path,
    *,
    tokenizer_path: str | Path | None = None,
    eos_token: str | None = None,
    meta: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory (files replaced atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    state = model.state_dict()
    tensors = {hf: state[ours].detach().to("cpu", dtype).contiguous() for hf, ours in _name_pairs(cfg)}
    atomic_write_with(
        out / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    eos_id = None
    if tokenizer_path is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        atomic_write_with(out / "tokenizer.json", lambda tmp: shutil.copyfile(tokenizer_path, tmp))
        tok_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": eos_token,
            "bos_token": eos_token,
            "model_max_length": cfg.max_seq_len,
        }
        atomic_write_text(out / "tokenizer_config.json", json.dumps(tok_config, indent=2))
    atomic_write_text(out / "config.json", json.dumps(hf_config_of(cfg, eos_id), indent=2))
    atomic_write_text(out / META_FILE, json.dumps(meta or {}, indent=2, default=str))
    return out

# ------------------------------------------------------------------------ hub names and layout
# Released checkpoints as they are laid out on the Hugging Face hub: what their names say, and
# where their files are in a download folder or the hub cache.
#
# The IsoFLOP checkpoints of "Relative Scaling Laws for LLMs" (Held et al. 2025; Marin's IsoFLOP
# suite, marin-community/marin ``experiments/isoflop_sweep.py``) are named
# ``isoflop-<budget>-d<hidden>-L<layers>-B<batch>-<sweep>``: ``<budget>`` is
# ``f"{budget:.0e}"`` (``1e+18``; ``1ep18`` where ``+`` cannot appear, as in relscale's own grid
# names), in Marin's forward-only FLOP convention (``relscale.counting.flops_per_token_marin``),
# and ``<batch>`` the global batch in sequences. The run trained ``steps = round(budget / (F * B *
# seq_len))`` steps (``relscale.sweep.grid``), so the name and the model config give the training
# tokens and FLOPs that ``relscale fit`` needs: a folder of downloaded checkpoints is a sweep.
# ``seq_len`` is the checkpoint's ``max_position_embeddings`` (Levanter's HF export writes its
# training ``seq_len`` there) unless ``relscale_meta.json`` or ``--meta seq_len=`` says otherwise.

FLOP_TOLERANCE = 0.01
"""How far the FLOPs of ``steps`` whole steps may miss the named budget (Marin's sweep: 1%)."""

_NAME = re.compile(
    r"isoflop-(?P<mantissa>\d+(?:\.\d+)?)e(?P<sign>[-+pm]?)(?P<exponent>\d+)"
    r"-d(?P<hidden>\d+)-L(?P<layers>\d+)-B(?P<batch>\d+)(?:-(?P<sweep>.+))?"
)
HUB_PREFIX = "models--"


@dataclass(frozen=True)
class CheckpointName:
    """What an ``isoflop-<budget>-d<hidden>-L<layers>-B<batch>-<sweep>`` name states."""

    budget: float  # FLOPs, Marin's forward-only convention
    hidden: int
    layers: int
    batch: int  # global batch, sequences per optimizer step
    sweep: str | None  # the rest of the name (the training corpus / experiment), if any


def parse_checkpoint_name(name: str) -> CheckpointName | None:
    """The fields of an IsoFLOP checkpoint name (the whole name must match), else None.

    >>> parse_checkpoint_name("isoflop-1e+19-d2048-L21-B128-nemo").budget
    1e+19
    """
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    sign = {"p": "+", "m": "-"}.get(match["sign"], match["sign"])
    budget = float(f"{match['mantissa']}e{sign}{match['exponent']}")
    hidden, layers, batch = int(match["hidden"]), int(match["layers"]), int(match["batch"])
    return CheckpointName(budget, hidden, layers, batch, match["sweep"])


def meta_from_name(
    name: str, cfg: ModelConfig, meta: dict[str, Any], where: str, *, tokens: bool = True
) -> dict[str, Any]:
    """``meta`` completed from an IsoFLOP checkpoint name: ``budget``, and (with ``tokens``, for
    the run's final weights) when ``tokens`` is not known, ``tokens = steps * batch * seq_len``
    with the steps of the sweep rule (see the section comment), ``seq_len``, ``steps`` and
    ``global_batch``. Keys already in ``meta`` (from ``relscale_meta.json`` or ``--meta``) win.
    A name that does not match is ignored, unless it starts with ``isoflop-`` (a typo there would
    silently drop the model from the fits) and no budget is given.

    Raises DataError naming ``where`` when the name's width or depth contradicts the config, or
    when no whole number of steps reaches the named budget within 1% (the seq_len is then not
    the training one: pass ``--meta seq_len=N`` or ``--meta tokens=N``).
    """
    parsed = parse_checkpoint_name(name)
    if parsed is None:
        if name.startswith("isoflop-") and "budget" not in meta:
            # meant as a checkpoint name, but it does not parse: scoring it would give NaN budgets
            # that silently drop the model out of every fit
            raise DataError(
                f"{where}: folder name {name!r} starts like an IsoFLOP checkpoint name but is not "
                "isoflop-<budget>-d<width>-L<layers>-B<batch>-<sweep>; rename it or pass --meta budget=..."
            )
        return meta
    if (parsed.hidden, parsed.layers) != (cfg.hidden, cfg.layers):
        raise DataError(
            f"{where}: the name {name!r} says d={parsed.hidden}, L={parsed.layers} but config.json has "
            f"hidden_size={cfg.hidden}, num_hidden_layers={cfg.layers}"
        )
    out = dict(meta)
    out.setdefault("budget", parsed.budget)
    if out.get("tokens") is not None or not tokens:
        return out
    budget = float(out["budget"])
    seq_len = int(out.get("seq_len") or cfg.max_seq_len)
    per_step = float(flops_per_token_marin(cfg, seq_len)) * seq_len * parsed.batch
    steps = round(budget / per_step)
    achieved = steps * per_step
    if steps < 1 or not math.isclose(achieved, budget, rel_tol=FLOP_TOLERANCE):
        raise DataError(
            f"{where}: the name's budget {budget:.3g} FLOPs is not a whole number of steps of batch "
            f"{parsed.batch} x seq_len {seq_len} ({budget / per_step:.3f} steps of {per_step:.4g} FLOPs); "
            "pass the training length with --meta seq_len=N or the tokens with --meta tokens=N"
        )
    out.update(tokens=steps * parsed.batch * seq_len, seq_len=seq_len, steps=steps, global_batch=parsed.batch)
    return out


def is_hub_repo(path: Path) -> bool:
    """Whether ``path`` is a repository folder of the Hugging Face cache (``models--ORG--NAME``)."""
    return path.name.startswith(HUB_PREFIX) and (path / "snapshots").is_dir()


def hub_snapshot(repo: Path) -> Path:
    """The snapshot folder of a hub-cache repository: the revision ``refs/main`` points at, else
    the only snapshot. Raises DataError naming the folder when that is ambiguous or missing."""
    ref = repo / "refs" / "main"
    if ref.is_file():
        snapshot = repo / "snapshots" / ref.read_text().strip()
        if snapshot.is_dir():
            return snapshot
    snapshots = sorted(p for p in (repo / "snapshots").iterdir() if p.is_dir())
    if len(snapshots) != 1:
        found = [p.name for p in snapshots] or "none"
        raise DataError(
            f"{repo}: {len(snapshots)} snapshots ({found}) and no refs/main; pass the snapshot folder itself"
        )
    return snapshots[0]


def model_name(path: Path) -> str:
    """The name a checkpoint folder is known by: its own name, or for a hub-cache snapshot
    (``models--ORG--NAME/snapshots/REV``) or repository the repository's NAME."""
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith(HUB_PREFIX):
        path = path.parent.parent
    if path.name.startswith(HUB_PREFIX):
        return path.name.split("--")[-1]
    return path.name
