"""Typed, validated configs: model, data, optimiser, training run.

Configs are TOML files whose tables mirror the dataclasses below (the shipped ones live in the
package, ``relscale/configs/*.toml``, and are named without a path: ``tiny``), plus
``key=value`` overrides on the command line (``model.hidden=128``). Unknown keys, wrong types and
impossible shapes are rejected with a :class:`ConfigError` that names the key, so a typo never
silently trains the wrong model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from relscale.errors import ConfigError

BACKENDS = ("auto", "torch", "triton", "cuda")
"""Kernel backends an op can be routed to; which op supports which is decided in relscale.ops."""


def _choice(default: str, choices: Sequence[str]) -> Any:
    return field(default=default, metadata={"choices": tuple(choices)})


@dataclass
class KernelConfig:
    """Backend per op: ``torch`` (reference), ``triton`` (kernels/), ``cuda`` (csrc/), ``auto``."""

    rms_norm: str = _choice("auto", BACKENDS)
    rope: str = _choice("auto", BACKENDS)
    swiglu: str = _choice("auto", BACKENDS)
    attention: str = _choice("auto", BACKENDS)
    cross_entropy: str = _choice("auto", BACKENDS)


ROPE_SCALING_TYPES = ("none", "llama3")
"""RoPE frequency scalings relscale implements (``none``: plain RoPE, Su et al. 2021)."""


@dataclass
class RopeScalingConfig:
    """How the rotary frequencies are rescaled for long context (Hugging Face ``rope_scaling``).

    ``type = "llama3"`` is Llama 3.1's piecewise rule (Meta, "The Llama 3 Herd of Models", 2024):
    frequencies whose wavelength exceeds ``original_max_position_embeddings / low_freq_factor``
    are divided by ``factor``, those below ``original_max_position_embeddings /
    high_freq_factor`` are kept, and the band in between is interpolated smoothly. The formula
    lives in one place, :func:`relscale.ops.rope_inv_freq`. Further types (``linear``, ``yarn``)
    add a name to :data:`ROPE_SCALING_TYPES` and, where needed, their own fields here.
    """

    type: str = _choice("none", ROPE_SCALING_TYPES)
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self, where: str = "model.rope_scaling") -> None:
        """ConfigError naming ``<where>.<key>`` for an impossible value (factors, context)."""
        if self.type == "none":
            return
        _require(self.factor >= 1, f"{where}.factor", f"must be >= 1, got {self.factor}")
        _require(self.low_freq_factor > 0, f"{where}.low_freq_factor", "must be positive")
        _require(
            self.high_freq_factor > self.low_freq_factor,
            f"{where}.high_freq_factor",
            f"must exceed low_freq_factor={self.low_freq_factor}, got {self.high_freq_factor}",
        )
        _require(
            self.original_max_position_embeddings > 0,
            f"{where}.original_max_position_embeddings",
            "must be positive",
        )


@dataclass
class ModelConfig:
    """A Qwen3/Llama-style pre-norm decoder. ``None`` sizes are derived (see the properties)."""

    vocab_size: int = 4096
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int | None = None  # None: no grouped-query attention (kv_heads = heads)
    head_dim: int | None = None  # None: hidden // heads
    mlp_hidden: int | None = None  # None: 4 * hidden (the SwiGLU inner size)
    max_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-6
    qk_norm: bool = True
    tie_embeddings: bool = False
    init_std: float = 0.02
    fused_loss: bool = True  # output projection + cross-entropy through ops.linear_cross_entropy
    z_loss: float = 0.0
    kernels: KernelConfig = field(default_factory=KernelConfig)

    @property
    def n_kv_heads(self) -> int:
        """Key/value heads in use: ``kv_heads``, or ``heads`` when unset (no grouped-query attention)."""
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def d_head(self) -> int:
        """Per-head dimension in use: ``head_dim``, or ``hidden // heads`` when unset."""
        return self.hidden // self.heads if self.head_dim is None else self.head_dim

    @property
    def d_ff(self) -> int:
        """SwiGLU hidden width in use: ``mlp_hidden``, or ``4 * hidden`` when unset."""
        return 4 * self.hidden if self.mlp_hidden is None else self.mlp_hidden

    def validate(self, where: str = "model") -> None:
        """ConfigError naming ``<where>.<key>`` for a non-positive size, a hidden size not divisible
        by the heads (without head_dim), an odd head dimension (RoPE rotates pairs), heads not a
        multiple of kv_heads, or a negative z_loss."""
        for name in ("vocab_size", "hidden", "layers", "heads", "max_seq_len"):
            _require(getattr(self, name) > 0, f"{where}.{name}", "must be positive")
        for name in ("kv_heads", "head_dim", "mlp_hidden"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"{where}.{name}", "must be positive")
        if self.head_dim is None:
            _require(
                self.hidden % self.heads == 0,
                f"{where}.heads",
                f"hidden={self.hidden} is not divisible by heads={self.heads} (or set head_dim)",
            )
        _require(self.d_head % 2 == 0, f"{where}.head_dim", f"{self.d_head} must be even for RoPE")
        _require(
            self.heads % self.n_kv_heads == 0,
            f"{where}.kv_heads",
            f"heads={self.heads} is not a multiple of kv_heads={self.n_kv_heads}",
        )
        _require(self.rope_theta > 0, f"{where}.rope_theta", "must be positive")
        self.rope_scaling.validate(f"{where}.rope_scaling")
        _require(self.norm_eps > 0, f"{where}.norm_eps", "must be positive")
        _require(self.init_std > 0, f"{where}.init_std", "must be positive")
        _require(self.z_loss >= 0, f"{where}.z_loss", "must be >= 0")


@dataclass
class DataConfig:
    """Which prepared data a run trains on and how it is cut: ``seq_len`` tokens per training
    sequence; ``doc_masking``: attention stays within a document (EOS-separated)."""

    path: str = "relscale_data/sotu"  # a directory written by `relscale prepare`
    seq_len: int = 128
    doc_masking: bool = True  # attention does not cross document (EOS) boundaries

    def validate(self, where: str = "data") -> None:
        """ConfigError naming ``<where>.seq_len`` when it is below 2 (no next token to predict)."""
        _require(self.seq_len > 1, f"{where}.seq_len", "must be > 1")


OPTIMIZERS = ("adamw", "c_adamc")
"""``adamw``: torch's AdamW (Loshchilov & Hutter 2019). ``c_adamc``: Cautious AdamW (Liang et al.
2024, arXiv 2411.16085) with AdamC corrected weight decay (Defazio et al. 2025, arXiv 2506.02285),
as Levanter's ``CautiousConfig(adamc_weight_decay=True)``; see relscale.train.optim."""

SCHEDULES = ("wsd", "wsd_levanter", "cosine", "constant")
"""Learning-rate schedules (relscale.train.optim.lr_at): ``wsd_levanter`` is Levanter's "linear"
warmup-stable-decay as Marin's sweeps ran it, ``wsd`` the same shape one step later."""

MARIN_OPTIM = {"name": "c_adamc", "beta1": 0.95, "eps": 1e-15, "weight_decay": 0.1, "grad_clip": 1.0}
"""What ``optim.preset = "marin"`` sets (Marin's C-AdamC recipe); beta2 follows the global batch."""


def marin_beta2(global_batch: int) -> float:
    """Marin's batch-size-dependent beta2, 0.98^(B/128) for a global batch of B sequences: the
    averaging horizon of the second moment, measured in sequences, stays the same as B changes."""
    return 0.98 ** (global_batch / 128)


@dataclass
class OptimConfig:
    """The optimizer and its learning-rate schedule.

    ``preset = "marin"`` is resolved when the config is built (see :meth:`TrainConfig.__post_init__`):
    it sets name c_adamc, beta1 0.95, eps 1e-15, weight decay 0.1, clip 1.0 and beta2 =
    0.98^(B/128) (B: the global batch in sequences), then reads ``"none"``, so the stored config
    holds the values the run uses. A key given with a value other than its default and other
    than the preset's is refused, naming it.
    """

    preset: str = _choice("none", ("none", "marin"))
    name: str = _choice("adamw", OPTIMIZERS)
    lr: float = 3e-3  # the peak learning rate (AdamC scales weight decay by lr_t / lr)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    schedule: str = _choice("wsd", SCHEDULES)
    warmup: float = 0.05  # fraction of the steps
    decay: float = 0.2  # WSD: fraction of the steps, at the end, with linear decay
    min_lr_ratio: float = 0.0

    def validate(self, where: str = "optim") -> None:
        """ConfigError naming ``<where>.<key>`` for a non-positive lr, betas outside [0, 1),
        fractions outside [0, 1] or warm-up plus decay above 1."""
        _require(self.lr > 0, f"{where}.lr", "must be positive")
        for name in ("beta1", "beta2"):
            _require(0 <= getattr(self, name) < 1, f"{where}.{name}", "must be in [0, 1)")
        for name in ("warmup", "decay", "min_lr_ratio"):
            _require(0 <= getattr(self, name) <= 1, f"{where}.{name}", "must be in [0, 1]")
        _require(self.warmup + (self.decay if self.schedule.startswith("wsd") else 0) <= 1, f"{where}.warmup",
                 "warmup + decay must not exceed 1")
        _require(self.eps > 0, f"{where}.eps", "must be positive")
        _require(self.weight_decay >= 0, f"{where}.weight_decay", "must be >= 0")
        _require(self.grad_clip >= 0, f"{where}.grad_clip", "must be >= 0")

    def resolve_preset(self, global_batch: int, where: str = "optim") -> OptimConfig:
        """This config with ``preset`` applied (a copy reading ``preset = "none"``); itself when
        there is none. ``global_batch``: sequences per optimizer step, for Marin's beta2.

        Raises ConfigError naming a key whose value differs from both its default and the
        preset's (two truths for one knob).
        """
        if self.preset == "none":
            return self
        values = {**MARIN_OPTIM, "beta2": marin_beta2(global_batch)}
        defaults = OptimConfig()
        for key, value in values.items():
            given = getattr(self, key)
            if given != getattr(defaults, key) and not _same(given, value):
                raise ConfigError(
                    f"{where}.{key}: {given!r} conflicts with {where}.preset={self.preset!r}, which sets "
                    f"{value!r}; remove one of them"
                )
        return dataclasses.replace(self, preset="none", **values)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b))
    return a == b


@dataclass
class TrainConfig:
    """One training run. Global batch (sequences) = micro_batch * grad_accum * world size.

    Resolved on construction (so a stored config, its hash and a results row hold the values a
    run uses): ``optim.preset`` (see :meth:`OptimConfig.resolve_preset`; the world size is the
    launch's ``WORLD_SIZE``, 1 outside torchrun) and the legacy ``eval_batches`` (turned into
    ``eval_tokens = eval_batches * micro_batch * data.seq_len``, the text it measured in one
    process).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 200
    micro_batch: int = 8
    grad_accum: int = 1
    seed: int = 0
    out_dir: str = "runs/tiny"
    device: str = _choice("auto", ("auto", "cpu", "cuda"))
    dtype: str = _choice("auto", ("auto", "fp32", "bf16"))  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False
    # Recompute each block in the backward (torch.utils.checkpoint): saved activations drop to the
    # block inputs, for ~1/3 more compute; what lets d >= 1536 fit at seq 4096 (relscale.model).
    activation_checkpointing: bool = False
    ckpt_interval: int = 0  # steps between checkpoints; 0: only at the end
    eval_interval: int = 0  # steps between validation passes; 0: only at the end
    # Validation measures the first ceil(eval_tokens / data.seq_len) windows of the held-out split
    # (all, if fewer), whatever micro_batch, grad_accum or world size; 0: no validation.
    eval_tokens: int | None = None  # None: DEFAULT_EVAL_TOKENS
    eval_batches: int | None = None  # legacy; resolved into eval_tokens, then None
    log_interval: int = 10
    progress: bool = True  # tqdm progress bar
    dump_steps: list[int] = field(default_factory=list)  # steps at which to write per-example dumps
    dump_eval: str = "default"  # eval set for those dumps ("default": the data's held-out split)

    def __post_init__(self) -> None:
        if self.eval_batches is not None:
            _require(self.eval_tokens is None, "eval_batches",
                     "give eval_tokens or the legacy eval_batches, not both")
            _require(self.eval_batches >= 0, "eval_batches", "must be >= 0")
            self.eval_tokens = self.eval_batches * self.micro_batch * self.data.seq_len
            self.eval_batches = None
        elif self.eval_tokens is None:
            self.eval_tokens = DEFAULT_EVAL_TOKENS
        if isinstance(self.optim, OptimConfig) and self.optim.preset != "none":
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            self.optim = self.optim.resolve_preset(self.micro_batch * self.grad_accum * world_size)

    @property
    def eval_windows(self) -> int:
        """Held-out windows of ``data.seq_len`` tokens each validation pass measures (at most)."""
        return -(-(self.eval_tokens or 0) // self.data.seq_len)

    def validate(self) -> None:
        """Validate every section and the run's keys; ConfigError naming the dotted key."""
        self.model.validate("model")
        self.data.validate("data")
        self.optim.validate("optim")
        for name in ("steps", "micro_batch", "grad_accum"):
            _require(getattr(self, name) > 0, name, "must be positive")
        for name in ("ckpt_interval", "eval_interval", "eval_tokens"):
            _require(getattr(self, name) >= 0, name, "must be >= 0")
        _require(self.log_interval > 0, "log_interval", "must be positive")
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            f"{self.data.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}",
        )


DEFAULT_EVAL_TOKENS = 2**16
"""Tokens of held-out text a validation pass measures unless ``eval_tokens`` says otherwise."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


T = TypeVar("T")


def from_dict(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys and wrong types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'config'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            raise ConfigError(f"{path}: unknown key (known keys: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(hints[key], value, path, known[key].metadata.get("choices"))
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str, choices: tuple[str, ...] | None) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    if typing.get_origin(hint) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r} ({type(value).__name__})")
        (item,) = args
        return [_coerce(item, v, f"{path}[{i}]", choices) for i, v in enumerate(value)]
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(hint)
    if ok is None:
        raise ConfigError(f"{path}: unsupported type {hint}")
    if not ok:
        raise ConfigError(f"{path}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    if choices is not None and value not in choices:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(choices)}")
    return float(value) if hint is float else value


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass as nested plain dicts (the TOML/JSON form; :func:`from_dict` inverts it)."""
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any, length: int = 12) -> str:
    """A stable hash of a config's full contents (key order independent)."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def parse_overrides(overrides: Sequence[str]) -> dict[str, Any]:
    """``["model.hidden=128", "optim.schedule=cosine"]`` -> a nested dict.

    Values are parsed as TOML values (numbers, booleans, quoted strings); anything that does not
    parse as one is taken as a bare string.
    """
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a table")
        node[parts[-1]] = value
    return nested


def merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"
"""The configs shipped with relscale: train configs here, sweep configs in ``sweeps/``."""


def packaged_configs(kind: str = "train") -> dict[str, Path]:
    """Name -> path of the configs shipped with relscale; ``kind`` is "train" or "sweep"."""
    if kind not in ("train", "sweep"):
        raise ValueError(f"kind: {kind!r} must be 'train' or 'sweep'")
    folder = PACKAGED_CONFIGS / "sweeps" if kind == "sweep" else PACKAGED_CONFIGS
    return {path.stem: path for path in sorted(folder.glob("*.toml"))}


def resolve_config(spec: str | Path, kind: str = "train") -> Path:
    """The TOML file a config argument names: an existing file as it is, else the shipped config
    of that name (``tiny`` -> ``relscale/configs/tiny.toml``; for ``kind="sweep"`` the folder
    ``relscale/configs/sweeps``), so ``relscale train tiny`` works in any directory.

    Raises ConfigError naming the argument and the shipped names when it is neither."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    known = packaged_configs(kind)
    if path.name == str(spec) and path.stem in known and path.suffix in ("", ".toml"):
        return known[path.stem]
    raise ConfigError(
        f"{spec}: config file not found (a TOML path, or a shipped {kind} config: {', '.join(known)})"
    )


def read_toml(path: str | Path) -> dict[str, Any]:
    """The tables of TOML file ``path``; ConfigError naming the file when missing or invalid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err


def load_train_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), base: Mapping[str, Any] | None = None
) -> TrainConfig:
    """Load a TrainConfig from a TOML file (or defaults) plus ``key=value`` overrides, validated.

    ``path``: a TOML file, or the name of a shipped config (:func:`resolve_config`); ``base``: a
    config dict the file and overrides are merged onto. Raises ConfigError naming the file and key."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        path = resolve_config(path, "train")
        data = merge(data, read_toml(path))
    data = merge(data, parse_overrides(overrides))
    where = str(path) if path is not None else "config"
    try:
        cfg = from_dict(TrainConfig, data)
        cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return cfg


def train_config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """The inverse of :func:`to_dict` for a TrainConfig (validated)."""
    cfg = from_dict(TrainConfig, data)
    cfg.validate()
    return cfg


def model_config_from_dict(data: Mapping[str, Any]) -> ModelConfig:
    """The validated ModelConfig of a ``model`` table (ConfigError naming ``model.<key>``)."""
    cfg = from_dict(ModelConfig, data, "model")
    cfg.validate()
    return cfg
