"""Sweep configs: the rules that turn compute budgets into an IsoFLOP grid of training runs.

A sweep config is a TOML file (``configs/sweeps/*.toml``) whose tables mirror the dataclasses
below; it is validated with :func:`relscale.config.from_dict`, so an unknown key, a wrong type or
an impossible value fails with a :class:`ConfigError` naming the key (``width.step: ...``).
The ``[train]`` table is an ordinary :class:`TrainConfig` holding what every run shares (optimizer,
seed, eval settings); the grid fills in the model shape, batch, steps, LR, beta2 (rule ``marin``),
sequence length and data path. Each of those has one source, the sweep's own key (see
:data:`GRID_OWNED`): a ``[train]`` value for it is refused, naming the key, instead of being
silently replaced per run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relscale.config import TrainConfig, from_dict, read_toml, resolve_config, to_dict
from relscale.errors import ConfigError

RULES = ("marin", "fixed")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


@dataclass
class WidthStep:
    """Use ``step`` for every budget up to and including ``max_budget``."""

    max_budget: float = math.inf
    step: int = 128


@dataclass
class WidthRule:
    """Widths ``min, min+step, ..., <= max``; ``by_budget`` overrides the step per budget range
    (the first entry whose ``max_budget`` is >= the budget wins; ``step`` otherwise)."""

    min: int = 512
    max: int = 4096
    step: int = 128
    by_budget: list[WidthStep] = field(default_factory=list)

    def step_for(self, budget: float) -> int:
        """The width step at ``budget`` (FLOPs): the first by_budget entry covering it, else step."""
        for entry in sorted(self.by_budget, key=lambda e: e.max_budget):
            if budget <= entry.max_budget:
                return entry.step
        return self.step

    def widths(self, budget: float) -> list[int]:
        """The candidate widths (hidden sizes) at ``budget``, ascending."""
        return list(range(self.min, self.max + 1, self.step_for(budget)))


@dataclass
class DepthRule:
    """``marin``: layers = round(d / (base + scale*log2(d) - offset)) (at least ``min_layers``);
    ``fixed``: ``layers`` for every width."""

    rule: str = _choice("marin", RULES)
    base: float = 64.0
    scale: float = 4.0
    offset: float = 9.0
    min_layers: int = 1
    layers: int = 2

    def layers_for(self, hidden: int) -> int:
        """The number of layers for width ``hidden`` under this rule."""
        if self.rule == "fixed":
            return self.layers
        denominator = self.base + self.scale * math.log2(hidden) - self.offset
        return max(self.min_layers, round(hidden / denominator))


@dataclass
class BatchRule:
    """Global batch in sequences. ``marin``: the smallest power of two for which
    ``tokens / (B * seq_len) <= target_steps``, halved while the LR rule's LR exceeds ``lr.max``;
    configs with ``B < min`` are dropped. ``fixed``: ``size``.

    ``max_micro_batch`` caps the sequences per device per micro-step (0: no cap); the rest is
    gradient accumulation. ``gpus_per_run`` > 1 runs each run data-parallel under torchrun.
    """

    rule: str = _choice("marin", RULES)
    size: int = 8
    min: int = 8
    max_micro_batch: int = 0
    gpus_per_run: int = 1


@dataclass
class LRRule:
    """``marin``: lr = constant * sqrt(B) / d, at most ``max`` (the batch is halved to get there);
    ``fixed``: ``value``."""

    rule: str = _choice("marin", RULES)
    constant: float = 0.33
    max: float = 0.01
    value: float = 3e-3


@dataclass
class Beta2Rule:
    """``marin``: beta2 = base ** (B / divisor); ``fixed``: the ``[train.optim]`` beta2."""

    rule: str = _choice("marin", RULES)
    base: float = 0.98
    divisor: float = 128.0


@dataclass
class DatasetSpec:
    """One prepared data folder; the sweep holds one full grid per dataset."""

    name: str = "sotu"
    path: str = "relscale_data/sotu"


@dataclass
class SweepConfig:
    """An IsoFLOP sweep: compute budgets, the rules that give each budget its runs, the datasets
    (one full grid each) and the TrainConfig every run shares.

    ``budgets``: FLOPs per run, in ``flop_convention`` (``marin``: forward-only 2N per token plus
    attention, as Marin's sweeps; ``train``: forward+backward); a grid point is kept when its
    achieved FLOPs are within ``flop_tolerance`` (a fraction) of the budget. ``seq_len``: tokens
    per training sequence. ``vocab_size``: None reads each dataset's prepared vocabulary. Widths
    (``width``) are multiples of ``head_dim``; heads = hidden / head_dim; the SwiGLU inner size is
    ``mlp_ratio`` x hidden. ``target_steps`` bounds the steps the batch rule aims at. Rules follow
    Marin's IsoFLOP sweeps (marin-community/marin, experiments/isoflop_sweep.py; see
    relscale.sweep.grid). :meth:`validate` raises
    ConfigError naming the key.
    """

    name: str = "sweep"
    budgets: list[float] = field(default_factory=list)
    flop_convention: str = _choice("marin", ("marin", "train"))  # the convention budgets are in
    flop_tolerance: float = 0.01  # keep configs whose achieved FLOPs are within this of the budget
    seq_len: int = 4096
    vocab_size: int | None = None  # None: read each dataset's prepared vocabulary
    head_dim: int = 128
    mlp_ratio: int = 4
    kv_heads: int | None = None  # None: no grouped-query attention
    target_steps: int = 2**16  # the batch rule aims at no more than this many steps
    width: WidthRule = field(default_factory=WidthRule)
    depth: DepthRule = field(default_factory=DepthRule)
    batch: BatchRule = field(default_factory=BatchRule)
    lr: LRRule = field(default_factory=LRRule)
    beta2: Beta2Rule = field(default_factory=Beta2Rule)
    datasets: list[DatasetSpec] = field(default_factory=lambda: [DatasetSpec()])
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, check_grid_keys: bool = True) -> None:
        """Check every rule; ConfigError naming the first bad key (``width.step: ...``).

        ``check_grid_keys``: also refuse ``train`` values the grid would replace (see
        :func:`grid_owned_conflicts`; off when reading back a stored sweep.json)."""
        _require(bool(NAME_RE.fullmatch(self.name)), "name",
                 f"{self.name!r}: use letters, digits, '_', '.', '-'")
        _require(len(self.budgets) > 0, "budgets", "give at least one compute budget")
        for i, budget in enumerate(self.budgets):
            _require(math.isfinite(budget) and budget > 0, f"budgets[{i}]", f"{budget} must be positive")
        _require(len(set(self.budgets)) == len(self.budgets), "budgets", "contains duplicates")
        _require(0 <= self.flop_tolerance < 1, "flop_tolerance", "must be in [0, 1)")
        _require(self.seq_len > 1, "seq_len", "must be > 1")
        _require(self.vocab_size is None or self.vocab_size > 0, "vocab_size", "must be positive")
        _require(self.head_dim > 0 and self.head_dim % 2 == 0, "head_dim", "must be positive and even (RoPE)")
        _require(self.mlp_ratio > 0, "mlp_ratio", "must be positive")
        _require(self.target_steps > 0, "target_steps", "must be positive")
        w = self.width
        _require(w.min > 0, "width.min", "must be positive")
        _require(w.max >= w.min, "width.max", f"{w.max} is below width.min={w.min}")
        for key, step in [("width.step", w.step)] + [(f"width.by_budget[{i}].step", e.step)
                                                      for i, e in enumerate(w.by_budget)]:
            _require(step > 0, key, "must be positive")
            _require(step % self.head_dim == 0, key, f"{step} is not a multiple of head_dim={self.head_dim}")
        _require(w.min % self.head_dim == 0, "width.min",
                 f"{w.min} is not a multiple of head_dim={self.head_dim}")
        for i, entry in enumerate(w.by_budget):
            _require(entry.max_budget > 0, f"width.by_budget[{i}].max_budget", "must be positive")
        if self.kv_heads is not None:
            _require(self.kv_heads > 0, "kv_heads", "must be positive")
            for d in range(w.min, w.max + 1, self.head_dim):
                heads = d // self.head_dim
                _require(heads % self.kv_heads == 0, "kv_heads",
                         f"heads={heads} (width {d}) is not a multiple of kv_heads={self.kv_heads}")
        dr = self.depth
        _require(dr.min_layers > 0, "depth.min_layers", "must be positive")
        _require(dr.layers > 0, "depth.layers", "must be positive")
        if dr.rule == "marin":
            for d in (w.min, w.max):
                _require(dr.base + dr.scale * math.log2(d) - dr.offset > 0, "depth.base",
                         f"the depth formula's denominator is not positive at width {d}")
        b = self.batch
        _require(b.size > 0, "batch.size", "must be positive")
        _require(b.min > 0, "batch.min", "must be positive")
        _require(b.max_micro_batch >= 0, "batch.max_micro_batch", "must be >= 0")
        _require(b.gpus_per_run > 0, "batch.gpus_per_run", "must be positive")
        _require(self.lr.constant > 0, "lr.constant", "must be positive")
        _require(self.lr.max > 0, "lr.max", "must be positive")
        _require(self.lr.value > 0, "lr.value", "must be positive")
        _require(0 < self.beta2.base < 1, "beta2.base", "must be in (0, 1)")
        _require(self.beta2.divisor > 0, "beta2.divisor", "must be positive")
        _require(len(self.datasets) > 0, "datasets", "give at least one dataset")
        names = [d.name for d in self.datasets]
        for i, ds in enumerate(self.datasets):
            _require(bool(NAME_RE.fullmatch(ds.name)), f"datasets[{i}].name",
                     f"{ds.name!r}: use letters, digits, '_', '.', '-'")
            _require(bool(ds.path), f"datasets[{i}].path", "must not be empty")
        _require(len(set(names)) == len(names), "datasets", f"duplicate names in {names}")
        try:
            self.train.validate()
        except ConfigError as err:
            raise ConfigError(f"train.{err}") from None
        if check_grid_keys:
            conflicts = grid_owned_conflicts(self)
            if conflicts:
                raise ConfigError(conflicts[0])


# The TrainConfig keys the grid sets for every run (relscale.sweep.grid.train_config_for, _model)
# or the executor sets (out_dir), each with the sweep key that is their one source.
GRID_OWNED: dict[str, str] = {
    "model.vocab_size": "vocab_size (or the prepared data's vocabulary)",
    "model.hidden": "[width]",
    "model.layers": "[depth]",
    "model.heads": "head_dim (heads = hidden / head_dim)",
    "model.kv_heads": "kv_heads",
    "model.head_dim": "head_dim",
    "model.mlp_hidden": "mlp_ratio",
    "model.max_seq_len": "seq_len",
    "data.path": "[[datasets]] path",
    "data.seq_len": "seq_len",
    "optim.lr": "[lr]",
    "optim.beta2": "[beta2] (rule \"marin\"; rule \"fixed\" takes [train.optim] beta2)",
    "optim.preset": "[beta2]",
    "steps": "budgets (steps = budget / FLOPs per step)",
    "micro_batch": "[batch] (max_micro_batch, gpus_per_run)",
    "grad_accum": "[batch] (max_micro_batch, gpus_per_run)",
    "out_dir": "the sweep directory (each run trains in SWEEP_DIR/runs/<folder>)",
}


def _grid_value(cfg: SweepConfig, key: str) -> tuple[bool, Any]:
    """(True, value) when the grid gives ``key`` one value for every run of ``cfg``; else (False, None)."""
    constant = {
        "model.max_seq_len": cfg.seq_len,
        "data.seq_len": cfg.seq_len,
        "model.head_dim": cfg.head_dim,
        "model.kv_heads": cfg.kv_heads,
    }
    if key in constant:
        return True, constant[key]
    if key == "model.vocab_size" and cfg.vocab_size is not None:
        return True, cfg.vocab_size
    if key == "data.path" and len(cfg.datasets) == 1:
        return True, cfg.datasets[0].path
    return False, None


def _lookup(data: Any, dotted: str) -> tuple[bool, Any]:
    for part in dotted.split("."):
        if isinstance(data, dict):
            if part not in data:
                return False, None
            data = data[part]
        else:
            if not hasattr(data, part):
                return False, None
            data = getattr(data, part)
    return True, data


def grid_owned_conflicts(cfg: SweepConfig, given_train: dict[str, Any] | None = None) -> list[str]:
    """The ``train`` keys of a sweep config that the grid would silently replace, as error lines
    ``train.<key>: ...`` naming the key, its value and the sweep key that sets it.

    A grid-owned key (:data:`GRID_OWNED`) conflicts when its value differs from TrainConfig's
    default and, where the grid gives one value to every run (seq_len, head_dim, kv_heads,
    vocab_size when set, the data path of a one-dataset sweep), from that value too.
    ``optim.beta2`` only counts under ``beta2.rule = "marin"`` (rule "fixed" reads it).
    A value equal to the default is accepted because it cannot be told from an unset key in a
    full dump (sweep_config_to_dict written as TOML lists every key). ``given_train``: the raw
    ``[train]`` table of a TOML file, needed for keys resolved when the TrainConfig is built
    (``optim.preset = "marin"``); default: the values of ``cfg.train``.
    """
    defaults = TrainConfig()
    source = cfg.train if given_train is None else given_train
    lines = []
    for key, owner in GRID_OWNED.items():
        present, value = _lookup(source, key)
        if not present:
            continue
        if key == "optim.beta2" and cfg.beta2.rule != "marin":
            continue
        if key == "optim.preset" and value == "none":
            continue
        constant, grid_value = _grid_value(cfg, key)
        if (constant and value == grid_value) or value == _lookup(defaults, key)[1]:
            continue
        if key == "optim.preset":
            lines.append(f"train.optim.preset: {value!r} is refused in a sweep config: it derives beta2 from "
                         "[train] micro_batch, but the grid sets the batch and beta2 ([beta2]); give the "
                         "optimizer's keys in [train.optim] instead")
            continue
        shown = f"{grid_value!r}" if constant else "per run"
        lines.append(f"train.{key}: {value!r} is set by the grid from {owner} (grid value: {shown}); "
                     f"remove it from [train.{key.rpartition('.')[0]}]".replace("[train.]", "[train]"))
    return lines


def sweep_config_from_dict(data: dict[str, Any], where: str = "", *,
                           check_grid_keys: bool = True) -> SweepConfig:
    """Build and validate a SweepConfig from nested dicts (a parsed TOML file).

    Errors are ConfigError naming the key, prefixed by ``where`` (e.g. the file):
    unknown keys, wrong types, impossible values, and (``check_grid_keys``) a ``[train]`` key the
    grid owns (see :func:`grid_owned_conflicts`; e.g. ``[train.data] seq_len = 64`` in a sweep
    with ``seq_len = 128`` is refused rather than silently becoming 128)."""
    try:
        cfg = from_dict(SweepConfig, data)
        cfg.validate(check_grid_keys=False)
        if check_grid_keys:
            train = data.get("train") if isinstance(data, dict) else None
            conflicts = grid_owned_conflicts(cfg, train if isinstance(train, dict) else {})
            if conflicts:
                raise ConfigError(conflicts[0])
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None
    return cfg


def load_sweep_config(path: str | Path) -> SweepConfig:
    """The validated SweepConfig of a TOML file, or of a shipped sweep config by name (``tiny``,
    ``marin``); ConfigError naming the file and the key."""
    path = resolve_config(path, "sweep")
    return sweep_config_from_dict(read_toml(path), where=str(path))


def sweep_config_to_dict(cfg: SweepConfig) -> dict[str, Any]:
    """JSON-safe dict (infinite ``max_budget`` becomes None, restored by :func:`sweep_config_from_json`)."""
    data = to_dict(cfg)
    for entry in data["width"]["by_budget"]:
        if entry["max_budget"] == math.inf:
            entry["max_budget"] = None
    return data


def sweep_config_from_json(data: dict[str, Any], where: str = "") -> SweepConfig:
    """The SweepConfig stored in a sweep.json (inverse of :func:`sweep_config_to_dict`).

    The stored ``train`` table holds every key, so the grid-owned check is not repeated here (it
    ran when the sweep was created). ConfigError naming the key for a malformed config."""
    data = dict(data)
    width = dict(data.get("width", {}))
    if "by_budget" in width:
        width["by_budget"] = [
            {**e, "max_budget": math.inf} if isinstance(e, dict) and e.get("max_budget") is None else e
            for e in width["by_budget"]
        ]
        data["width"] = width
    return sweep_config_from_dict(data, where, check_grid_keys=False)


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Keys whose values differ between two nested dicts, as ``key: old -> new`` lines."""
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                lines.append(f"{path}: (absent) -> {new[key]!r}")
            elif key not in new:
                lines.append(f"{path}: {old[key]!r} -> (absent)")
            else:
                lines.extend(config_differences(old[key], new[key], path))
        return lines
    return [] if old == new else [f"{prefix or '(config)'}: {old!r} -> {new!r}"]
