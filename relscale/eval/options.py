"""Options of an evaluation (the flags of ``relscale eval``) and the scoring settings built from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relscale.eval.scoring import ScoreSettings
from relscale.eval.sets import SetOptions


@dataclass
class RunOptions:
    """How models are evaluated and where the dumps go.

    ``out_dir``: dumps root (``<out_dir>/<dataset>/<model_id>.parquet``); ``sets``: how specs
    become eval sets; ``context``: window length in tokens (None: the training sequence length,
    see :func:`relscale.eval.models.default_context`); ``stride``, ``pack_len``,
    ``batch_tokens``: window stride, packed row length and tokens per forward batch
    (:class:`relscale.eval.scoring.ScoreSettings`); ``prefix_tokens``: tokens of a document's
    beginning scored only as context; ``device``: "auto" | "cpu" | "cuda[:N]"; ``dtype``: "auto"
    | "fp32" | "bf16"; ``tokenizer``: a tokenizer.json overriding the model's;
    ``start_token``: None (auto) | "bos" | "eos" | "none" | a token string or id
    (:func:`relscale.eval.scoring.resolve_start`); ``meta``: column overrides (tokens, budget,
    ...); ``skip_bad``: skip malformed rows (reported) instead of failing; ``force``: rewrite
    finished dumps; ``threads``: torch.set_num_threads (None: torch's default)."""

    out_dir: Path = Path("evals")
    sets: SetOptions = field(default_factory=SetOptions)
    context: int | None = None
    stride: int | None = None
    pack_len: int | None = None
    batch_tokens: int = 16384
    prefix_tokens: int = 0
    device: str = "auto"
    dtype: str = "auto"
    tokenizer: Path | None = None
    start_token: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    skip_bad: bool = False
    force: bool = False
    progress: bool = False
    quiet: bool = False
    threads: int | None = None


def score_settings(opts: RunOptions, context: int, *, progress: bool | None = None) -> ScoreSettings:
    """The :class:`~relscale.eval.scoring.ScoreSettings` of ``opts`` for windows of ``context``
    tokens (``progress``: show a progress bar; default ``opts.progress``). The one place scoring
    settings are built from options, for ``relscale eval``, the training hook and lm-eval."""
    return ScoreSettings(
        context=context,
        stride=opts.stride,
        pack_len=opts.pack_len,
        batch_tokens=opts.batch_tokens,
        dtype=opts.dtype,
        progress=opts.progress if progress is None else progress,
    )
