"""Sweep rules -> the list of runs of an IsoFLOP grid (one grid per dataset).

For every budget C and every width d of the width rule:
  layers from the depth rule, heads = d / head_dim, d_ff = mlp_ratio * d;
  F = FLOPs per token in the sweep's convention (relscale.counting);
  batch B: the smallest power of two with C / (F * B * seq_len) <= target_steps, halved while the
    LR rule's LR exceeds lr.max; dropped when B < batch.min;
  steps = round(C / (F * B * seq_len)); dropped when F * B * steps * seq_len misses C by more than
    flop_tolerance;  lr = constant * sqrt(B) / d;  beta2 = base ** (B / divisor).

This is the rule of Marin's IsoFLOP sweeps (marin-community/marin, experiments/isoflop_sweep.py,
``candidate_configs``, 2025): budgets 1e18..1e20 measured with Levanter's forward-only
``lm_flops_per_token`` (= relscale.counting.flops_per_token_marin, no 3x for the backward), widths
2^9..2^12 in steps of 128 up to 9e18 and 256 above, the depth formula, LR 0.33*sqrt(B)/d capped at
0.01, B >= 8, a 1% FLOP tolerance and beta2 = 0.98^(B/128). It gives 85 configurations per
dataset (5, 10, 15, 10, 15, 15, 15 for the seven budgets); the 255 released checkpoints of
"Relative Scaling Laws for LLMs" (Held et al. 2025) are 3 corpora x 85. Later versions of that
file multiply the forward FLOPs by 3 and use 3x budgets ("LEGACY_BUDGETS" 3e18..3e20), which is
the same set of runs except that the step-size threshold then falls between 3x3e18 and 3x6e18.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

from relscale.config import ModelConfig, TrainConfig, config_hash, to_dict
from relscale.counting import flops_per_token_marin, flops_per_token_train, param_counts
from relscale.errors import DataError
from relscale.sweep.spec import SweepConfig

COLUMNS = [
    "name", "dataset", "budget", "hidden", "layers", "heads", "batch", "steps", "tokens", "params",
    "non_embedding_params", "lr", "beta2", "flops_train", "flops_marin", "run_id",
]


def budget_tag(budget: float) -> str:
    """``1e18 -> '1ep18'`` (the released checkpoints' spelling of ``f'{1e18:.0e}'`` without '+')."""
    for digits in range(0, 16):
        text = f"{budget:.{digits}e}"
        if float(text) == budget:
            break
    mantissa, exponent = text.split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{exponent}".replace("+", "p").replace("-", "m")


def run_name(budget: float, hidden: int, layers: int, batch: int) -> str:
    """The run name of Marin's IsoFLOP checkpoints: ``isoflop-<budget>-d<hidden>-L<layers>-B<batch>``."""
    return f"isoflop-{budget_tag(budget)}-d{hidden}-L{layers}-B{batch}"


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: its shape, schedule, counts, and the full TrainConfig it trains."""

    name: str
    dataset: str
    budget: float
    hidden: int
    layers: int
    heads: int
    batch: int
    steps: int
    tokens: int
    params: int
    non_embedding_params: int
    lr: float
    beta2: float
    flops_train: float
    flops_marin: float
    run_id: str
    train: TrainConfig

    @property
    def folder(self) -> str:
        """The run's folder in a sweep directory: readable, and unique through the config hash."""
        return f"{self.name}-{self.dataset}-{self.run_id[:8]}"

    def row(self) -> dict[str, Any]:
        return {column: getattr(self, column) for column in COLUMNS}


@dataclass(frozen=True)
class Candidate:
    """A (budget, width) point of the rule, kept or dropped (``dropped`` says why)."""

    budget: float
    hidden: int
    layers: int
    batch: int
    steps: int
    lr: float
    achieved: float
    dropped: str | None


def _flops_per_token(cfg: SweepConfig, model: ModelConfig) -> int:
    if cfg.flop_convention == "marin":
        return flops_per_token_marin(model, cfg.seq_len)
    return flops_per_token_train(model, cfg.seq_len)


def _model(cfg: SweepConfig, hidden: int, vocab_size: int) -> ModelConfig:
    return replace(
        copy.deepcopy(cfg.train.model),
        vocab_size=vocab_size,
        hidden=hidden,
        layers=cfg.depth.layers_for(hidden),
        heads=hidden // cfg.head_dim,
        kv_heads=cfg.kv_heads,
        head_dim=None,  # hidden // heads == head_dim: widths are multiples of it (validated)
        mlp_hidden=cfg.mlp_ratio * hidden,
        max_seq_len=cfg.seq_len,
    )


def _lr(cfg: SweepConfig, batch: int, hidden: int) -> float:
    return cfg.lr.constant * math.sqrt(batch) / hidden if cfg.lr.rule == "marin" else cfg.lr.value


def candidates(cfg: SweepConfig, budget: float, vocab_size: int) -> Iterator[Candidate]:
    """Every width of the rule at one budget, with the batch and steps the rule gives it."""
    for hidden in cfg.width.widths(budget):
        model = _model(cfg, hidden, vocab_size)
        per_token = _flops_per_token(cfg, model)
        per_sequence = per_token * cfg.seq_len
        dropped = None
        if cfg.batch.rule == "marin":
            batch_exact = budget / (per_sequence * cfg.target_steps)
            batch = 1 if batch_exact <= 1 else 2 ** math.ceil(math.log2(batch_exact))
            while batch >= 1 and _lr(cfg, batch, hidden) > cfg.lr.max:
                batch //= 2
            if batch < cfg.batch.min:
                dropped = f"batch {batch} < batch.min={cfg.batch.min}"
        else:
            batch = cfg.batch.size
        steps = round(budget / (per_sequence * batch)) if batch > 0 else 0
        achieved = float(per_sequence) * batch * steps
        if dropped is None and steps < 1:
            dropped = "less than one step"
        elif dropped is None and abs(achieved - budget) > cfg.flop_tolerance * budget:
            dropped = f"achieved FLOPs {achieved:.4g} miss the budget by more than {cfg.flop_tolerance:.0%}"
        yield Candidate(budget, hidden, model.layers, batch, steps, _lr(cfg, max(batch, 1), hidden), achieved,
                        dropped)


def _micro_batch(cfg: SweepConfig, batch: int) -> tuple[int, int] | None:
    """(micro_batch, grad_accum) per device for a global batch, or None if it does not split."""
    gpus = cfg.batch.gpus_per_run
    if batch % gpus:
        return None
    per_device = batch // gpus
    cap = cfg.batch.max_micro_batch or per_device
    micro = max(m for m in range(1, min(cap, per_device) + 1) if per_device % m == 0)
    return micro, per_device // micro


def train_config_for(cfg: SweepConfig, dataset_path: str, c: Candidate, vocab_size: int) -> TrainConfig:
    """The TrainConfig of one grid candidate: model shape from the width/depth rules, data path and
    seq_len, lr and beta2 from their rules, steps, and the batch split over ``batch.gpus_per_run``
    (DataError when the batch does not split)."""
    split = _micro_batch(cfg, c.batch)
    if split is None:
        raise DataError(f"batch {c.batch} does not split over batch.gpus_per_run={cfg.batch.gpus_per_run}")
    train = copy.deepcopy(cfg.train)
    train.model = _model(cfg, c.hidden, vocab_size)
    train.data = replace(train.data, path=dataset_path, seq_len=cfg.seq_len)
    beta2 = train.optim.beta2
    if cfg.beta2.rule == "marin":
        beta2 = cfg.beta2.base ** (c.batch / cfg.beta2.divisor)
    train.optim = replace(train.optim, lr=c.lr, beta2=beta2)
    train.steps = c.steps
    train.micro_batch, train.grad_accum = split
    # The run id must not depend on where a sweep directory lives; the executor sets out_dir.
    train.out_dir = ""
    train.validate()
    return train


def resolve_vocab_sizes(cfg: SweepConfig) -> dict[str, int]:
    """Vocabulary per dataset: the config's ``vocab_size``, else the prepared data's."""
    if cfg.vocab_size is not None:
        return {ds.name: cfg.vocab_size for ds in cfg.datasets}
    from relscale.data import PreparedData

    sizes = {}
    for ds in cfg.datasets:
        try:
            sizes[ds.name] = PreparedData(ds.path).vocab_size
        except DataError as err:
            hint = (f"relscale prepare --out {ds.path}" if ds.name == "sotu"
                    else f"relscale prepare SOURCE --out {ds.path}")
            raise DataError(
                f"dataset {ds.name!r}: prepared data not found at {ds.path} ({err}); "
                f"prepare it with `{hint}`, or set vocab_size in the sweep config"
            ) from None
    return sizes


def build_grid(cfg: SweepConfig, vocab_sizes: dict[str, int] | None = None) -> list[RunSpec]:
    """All kept runs, ordered by dataset, budget, width (a deterministic order)."""
    vocab_sizes = resolve_vocab_sizes(cfg) if vocab_sizes is None else vocab_sizes
    runs: list[RunSpec] = []
    seen: dict[str, str] = {}
    for ds in cfg.datasets:
        vocab = vocab_sizes[ds.name]
        for budget in sorted(cfg.budgets):
            for c in candidates(cfg, budget, vocab):
                if c.dropped is not None or _micro_batch(cfg, c.batch) is None:
                    continue
                train = train_config_for(cfg, ds.path, c, vocab)
                counts = param_counts(train.model)
                tokens = c.batch * c.steps * cfg.seq_len
                run_id = config_hash(train, length=16)
                spec = RunSpec(
                    name=run_name(budget, c.hidden, c.layers, c.batch),
                    dataset=ds.name,
                    budget=float(budget),
                    hidden=c.hidden,
                    layers=c.layers,
                    heads=train.model.heads,
                    batch=c.batch,
                    steps=c.steps,
                    tokens=tokens,
                    params=counts.total,
                    non_embedding_params=counts.non_embedding,
                    lr=train.optim.lr,
                    beta2=train.optim.beta2,
                    flops_train=float(flops_per_token_train(train.model, cfg.seq_len)) * tokens,
                    flops_marin=float(flops_per_token_marin(train.model, cfg.seq_len)) * tokens,
                    run_id=run_id,
                    train=train,
                )
                if run_id in seen:  # two grid points with one config would share one run folder
                    raise DataError(f"runs {seen[run_id]} and {spec.name} of dataset {ds.name} "
                                    "have the same config")
                seen[run_id] = spec.name
                runs.append(spec)
    return runs


def grid_rows(runs: list[RunSpec]) -> list[dict[str, Any]]:
    """One table row (budget, shape, batch, steps, lr, ...) per run, for printing and CSV/JSON."""
    return [run.row() for run in runs]


def spec_to_json(run: RunSpec) -> dict[str, Any]:
    """A run as stored in the sweep listing: its row, folder and full TrainConfig dict."""
    return {**run.row(), "folder": run.folder, "train": to_dict(run.train)}


def chinchilla_optimal_params(budget: float, *, flop_convention: str = "marin",
                              tokens_per_param: float = 20.0) -> float:
    """Predicted loss-optimal parameter count N* at an IsoFLOP budget, from C_train = 6 N D with
    D = tokens_per_param * N (Hoffmann et al. 2022, "Training Compute-Optimal Large Language
    Models", Table 3: about 20 tokens per parameter). A budget in the ``marin`` (forward-only)
    convention is 3x fewer FLOPs than the training FLOPs it buys, hence N* = sqrt(3 C / (6 r)).
    Returns parameters (a float); raises DataError for a budget <= 0."""
    if not budget > 0:
        raise DataError(f"budget {budget} must be positive")
    train_flops = 3.0 * budget if flop_convention == "marin" else budget
    return math.sqrt(train_flops / (6.0 * tokens_per_param))


def widths_around(cfg: SweepConfig, budget: float, vocab_size: int, n_opt: float, *, n_widths: int = 5,
                  candidate_widths: list[int] | None = None) -> list[int]:
    """``n_widths`` consecutive widths of ``cfg``'s rule at ``budget`` whose total parameter counts
    surround the predicted optimum ``n_opt`` (the kept width nearest to it in log N sits in the
    middle, or as near the middle as the range allows), as Marin's widths bracket the optimum of
    each budget at scale. ``candidate_widths`` (default: head_dim, 2 head_dim, ... 32 head_dim)
    are filtered by the rule's batch / LR / FLOP-tolerance drops first. Returns sorted widths;
    raises DataError when fewer than 3 widths survive (no parabola could be fitted)."""
    widths = candidate_widths or [cfg.head_dim * k for k in range(1, 33)]
    probe = replace(copy.deepcopy(cfg), width=replace(cfg.width, min=min(widths), max=max(widths),
                                                      step=cfg.head_dim, by_budget=[]))
    kept = [c.hidden for c in candidates(probe, budget, vocab_size)
            if c.dropped is None and c.hidden in widths and _micro_batch(cfg, c.batch) is not None]
    if len(kept) < 3:
        raise DataError(f"budget {budget:.3g}: only widths {kept} survive the rule; need at least 3")
    params = [param_counts(_model(cfg, w, vocab_size)).total for w in kept]
    centre = min(range(len(kept)), key=lambda i: abs(math.log(params[i] / n_opt)))
    n = min(n_widths, len(kept))
    start = min(max(centre - n // 2, 0), len(kept) - n)
    return kept[start:start + n]
