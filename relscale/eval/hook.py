"""The training-time dump hook: an ``on_step(step, model)`` callback that writes per-example dumps
of the model being trained at chosen steps.

The trainer never imports :mod:`relscale.eval`; its callers (``relscale train``, the sweep
executors) build this hook and pass it to the trainer's ``on_step``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from relscale.eval.discover import ModelEntry, ModelInfo
from relscale.eval.dump import dump_path, is_finished_dump
from relscale.eval.models import load_tokenizer_for, model_columns
from relscale.eval.options import RunOptions, score_settings
from relscale.eval.runner import Evaluator
from relscale.eval.scoring import score_requests


def make_dump_hook(
    eval_spec: str | list[str],
    out_dir: str | Path,
    steps: list[int],
    *,
    data_path: str | Path | None = None,
    run_id: str = "run",
    seq_len: int | None = None,
    tokens_per_step: int | None = None,
    opts: RunOptions | None = None,
):
    """An ``on_step(step, model)`` hook for the trainer that writes the dumps of ``eval_spec``
    (``"default"``: the held-out split of ``data_path``) into ``out_dir`` at the given optimizer
    ``steps``, under model id ``<run_id>@step_<step, 7 digits>``.

    Every rank scores (an FSDP forward is collective), rank 0 writes; a finished dump (as rank 0
    sees it) is skipped by all ranks. ``tokens_per_step`` (tokens per optimizer step) and
    ``seq_len`` (tokens) give the tokens and FLOPs columns at each step; windows are ``seq_len``
    tokens unless ``opts.context`` says otherwise. Errors of eval-set loading (DataError naming
    the file) surface at the first wanted step."""
    opts = RunOptions(quiet=True) if opts is None else replace(opts)
    opts.out_dir = Path(out_dir)
    if data_path is not None:
        opts.sets = replace(opts.sets, data_dir=Path(data_path))
    specs = [eval_spec] if isinstance(eval_spec, str) else list(eval_spec)
    wanted = set(steps)
    evaluator = Evaluator(specs, opts)
    state: dict[str, Any] = {}

    def hook(step: int, model: torch.nn.Module) -> None:
        if step not in wanted:
            return
        cfg = getattr(model, "_orig_mod", model).cfg
        meta: dict[str, Any] = {"seq_len": seq_len, "data_path": str(data_path) if data_path else None}
        if tokens_per_step is not None:
            meta["tokens"] = step * tokens_per_step
        # source column: the run, as seen during training (there is no checkpoint path)
        entry = ModelEntry("live", Path(f"{run_id}@training"), f"{run_id}@step_{step:07d}", step)
        info = ModelInfo(cfg, {**meta, **opts.meta}, opts.sets.data_dir)
        if "tok" not in state:  # no model folder to read a tokenizer from: the data's (or --tokenizer)
            state["tok"] = load_tokenizer_for(ModelEntry("live", Path("."), run_id), info, opts)
        tok = state["tok"]
        is_main = (
            not (torch.distributed.is_available() and torch.distributed.is_initialized())
            or torch.distributed.get_rank() == 0
        )
        columns = model_columns(entry, info)
        settings = score_settings(opts, opts.context or int(seq_len or cfg.max_seq_len), progress=False)
        for spec in specs:
            eval_set = evaluator.eval_set(spec, opts.sets.data_dir)
            path = dump_path(opts.out_dir, eval_set.name, entry.model_id)
            if _agreed_exists(path) and not opts.force:
                continue
            encoded = evaluator.encoded(eval_set, tok)
            evaluator.check(eval_set, encoded, tok.key)
            if is_main:
                evaluator.score_and_write(model, entry, columns, eval_set, encoded, path, settings, tok)
            else:  # score too (collective forward), write nothing
                score_requests(model, encoded.requests, settings)

    return hook


def _agreed_exists(path: Path) -> bool:
    """Whether the dump is finished, as rank 0 sees it (so all ranks skip or score together)."""
    exists = is_finished_dump(path)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        flag = [exists]
        torch.distributed.broadcast_object_list(flag, src=0)
        exists = bool(flag[0])
    return exists
