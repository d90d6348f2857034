"""Evaluate models on eval sets and write the per-example dumps: the orchestration.

:func:`evaluate` discovers the models under some paths (:mod:`relscale.eval.discover`), loads
each model's eval sets (:mod:`relscale.eval.sets`), tokenises and scores them
(:mod:`relscale.eval.scoring`) and writes one dump per (model, eval set)
(:mod:`relscale.eval.writer`, format :mod:`relscale.eval.dump`). Weights, tokenizers and the
dumps' model columns come from :mod:`relscale.eval.models`; the training-time hook is
:mod:`relscale.eval.hook`.

Dumps that are already finished are skipped before any weights are loaded (``force`` rewrites
them). Tokenised eval sets are cached per tokenizer, so a sweep whose runs share a tokenizer
tokenises each set once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from relscale.errors import DataError
from relscale.eval.discover import (  # noqa: F401 -- re-exported for existing callers
    ModelEntry,
    ModelInfo,
    checkpoint_entries,
    discover_models,
    own_tokenizer,
    read_info,
)
from relscale.eval.discover import sweep_runs as _sweep_runs  # noqa: F401 -- older name
from relscale.eval.dump import dump_path, is_finished_dump, safe_name
from relscale.eval.formats import EvalSet, check_bad_rows
from relscale.eval.models import (  # noqa: F401 -- re-exported for existing callers
    DEFAULT_MAX_CONTEXT,
    TokenizerInfo,
    default_context,
    load_dcp_model,
    load_tokenizer_for,
    load_weights,
    model_columns,
    resolve_device,
)
from relscale.eval.options import RunOptions, score_settings
from relscale.eval.scoring import Encoded, ScoreSettings, encode_set, metrics, model_device, score_requests
from relscale.eval.sets import check_unique_names, load_eval_set, parse_spec
from relscale.eval.writer import format_summary, summarize, write_dump


@dataclass
class Outcome:
    """What happened to one (model, eval set): ``status`` "written", "exists" (a finished dump
    was kept) or "empty" (no examples, nothing written); ``examples``, ``tokens_scored`` and
    ``seconds`` (wall-clock of scoring) for a written dump."""

    model_id: str
    dataset: str
    path: Path
    status: str
    examples: int = 0
    tokens_scored: int = 0
    seconds: float = 0.0


class Evaluator:
    """Evaluates models on eval specs, caching loaded and tokenised sets across models.

    ``specs``: eval-set specs (:func:`relscale.eval.sets.parse_spec`); raises DataError when
    there is none."""

    def __init__(self, specs: list[str], opts: RunOptions):
        if not specs:
            raise DataError("no eval set given (use --eval default, or a file / folder)")
        self.specs, self.opts = specs, opts
        self._sets: dict[tuple[str, str], EvalSet] = {}
        self._encoded: dict[tuple[int, str, int, int], Encoded] = {}
        self._checked: set[tuple[int, str]] = set()

    def eval_set(self, spec: str, data_dir: Path | None) -> EvalSet:
        """The eval set of ``spec`` (``default``: the held-out split of ``data_dir``), loaded once."""
        is_default = parse_spec(spec)[1] == "default"
        key = (spec, str(data_dir) if is_default else "")
        if key not in self._sets:
            sets = self.opts.sets
            options = replace(sets, data_dir=data_dir) if is_default else sets
            self._sets[key] = load_eval_set(spec, options)
        return self._sets[key]

    def encoded(self, eval_set: EvalSet, tok: TokenizerInfo) -> Encoded:
        """``eval_set`` tokenised with ``tok`` (cached per tokenizer, start tokens and prefix)."""
        key = (id(eval_set), tok.key, tok.start, self.opts.prefix_tokens)
        if key not in self._encoded:
            self._encoded[key] = encode_set(eval_set, tok.tokenizer, tok.start, self.opts.prefix_tokens)
        return self._encoded[key]

    def check(self, eval_set: EvalSet, encoded: Encoded, tok_key: str) -> None:
        """Refuse (DataError listing them) or, with ``skip_bad``, report the set's malformed rows
        into ``<out>/<dataset>/bad_rows.jsonl``; once per set and tokenizer."""
        if (id(eval_set), tok_key) in self._checked:
            return
        bad = EvalSet(eval_set.name, eval_set.kind, [], eval_set.bad_rows + encoded.bad_rows, eval_set.source)
        report = self.opts.out_dir / safe_name(eval_set.name) / "bad_rows.jsonl"
        check_bad_rows(bad, self.opts.skip_bad, report)
        self._checked.add((id(eval_set), tok_key))

    def device(self) -> torch.device:
        """The device models are scored on (``opts.device``; "auto": CUDA when available)."""
        return resolve_device(self.opts.device)

    def run(self, entries: list[ModelEntry]) -> list[Outcome]:
        """Every entry on every spec, in order (see :meth:`run_one`)."""
        outcomes = []
        for entry in entries:
            outcomes += self.run_one(entry)
        return outcomes

    def run_one(self, entry: ModelEntry) -> list[Outcome]:
        """One model on every spec: finished dumps are skipped before any weights load; the rest
        are scored and written. Raises DataError for two sets with one name or a context longer
        than the model's max_seq_len."""
        opts = self.opts
        info = read_info(entry, opts)
        sets = [self.eval_set(spec, info.data_dir) for spec in self.specs]
        check_unique_names(sets)  # their dumps would share one file
        todo, outcomes = [], []
        for eval_set in sets:
            path = dump_path(opts.out_dir, eval_set.name, entry.model_id)
            if is_finished_dump(path) and not opts.force:  # garbage at the path is not done
                outcomes.append(Outcome(entry.model_id, eval_set.name, path, "exists"))
                self._say(f"{entry.model_id} / {eval_set.name}: {path} exists, skipped (--force rewrites)")
            else:
                todo.append((eval_set, path))
        if not todo:
            return outcomes
        tok = load_tokenizer_for(entry, info, opts)
        prepared = []
        for eval_set, path in todo:
            encoded = self.encoded(eval_set, tok)
            self.check(eval_set, encoded, tok.key)
            prepared.append((eval_set, path, encoded))
        context = opts.context or default_context(info)
        if context > info.cfg.max_seq_len:  # refuse before allocating
            raise DataError(
                f"--context {context} exceeds the model's max_seq_len {info.cfg.max_seq_len} ({entry.path})"
            )
        device = self.device()
        model = load_weights(entry, info.cfg, device)
        columns = model_columns(entry, info)
        settings = score_settings(opts, context)
        for eval_set, path, encoded in prepared:
            outcomes.append(
                self.score_and_write(model, entry, columns, eval_set, encoded, path, settings, tok)
            )
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return outcomes

    def score_and_write(
        self,
        model: torch.nn.Module,
        entry: ModelEntry,
        columns: dict,
        eval_set: EvalSet,
        encoded: Encoded,
        path: Path,
        settings: ScoreSettings,
        tok: TokenizerInfo,
    ) -> Outcome:
        """Score ``encoded`` with ``model`` and write the dump at ``path`` with the model
        ``columns`` and the settings as provenance; prints a per-group summary unless quiet."""
        if not encoded.requests:  # an empty dump would read as done
            self._say(f"{entry.model_id} / {eval_set.name}: 0 examples to score; no dump written")
            return Outcome(entry.model_id, eval_set.name, path, "empty")
        result = score_requests(model, encoded.requests, settings)
        rows = metrics(eval_set, encoded, result.nll)
        stride, pack_len, _ = settings.resolved()
        provenance = {
            "dataset": eval_set.name,
            "kind": eval_set.kind,
            "source": eval_set.source,
            "set_settings": eval_set.settings,
            "context": settings.context,
            "stride": stride,
            "pack_len": pack_len,
            "prefix_tokens": self.opts.prefix_tokens,
            "start_id": tok.start_id,
            "start_tokens": tok.start.describe(),
            "tokenizer_sha256_16": tok.key,
            "dtype": settings.dtype,
            "device": str(model_device(model)),
            "torch": torch.__version__,
            "skipped_bad_rows": len(eval_set.bad_rows) + len(encoded.bad_rows),
        }
        written = write_dump(
            path, eval_set.kind, columns, eval_set.name, rows, provenance, force=self.opts.force
        )
        seconds = max(result.seconds, 1e-9)
        title = (
            f"{entry.model_id} / {eval_set.name}: {len(rows)} examples, {result.tokens_scored} tokens "
            f"scored in {result.seconds:.1f}s ({len(rows) / seconds:.1f} examples/s, "
            f"{result.tokens_scored / seconds:.0f} tokens/s) -> {path}"
        ) + ("" if written else " (exists, kept)")
        self._say(format_summary(title, summarize(eval_set.kind, rows)))
        return Outcome(
            entry.model_id,
            eval_set.name,
            path,
            "written" if written else "exists",
            len(rows),
            result.tokens_scored,
            result.seconds,
        )

    def _say(self, text: str) -> None:
        if not self.opts.quiet:
            print(text, flush=True)


def evaluate(
    paths: list[str | Path],
    specs: list[str],
    opts: RunOptions,
    *,
    checkpoints: bool = False,
    steps: list[int] | None = None,
) -> list[Outcome]:
    """Discover the models under ``paths`` (:func:`relscale.eval.discover.discover_models`) and
    write their dumps on ``specs`` into ``opts.out_dir``; one :class:`Outcome` per (model, set).

    ``checkpoints``: include runs' resumable checkpoints; ``steps``: keep only checkpoints of
    these optimizer steps (final weights are always kept). Every model's config and name is
    read before any model is scored, so a bad one fails early (DataError naming it)."""
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    entries = discover_models(paths, checkpoints=checkpoints)
    if steps is not None:
        entries = [e for e in entries if e.step is None or e.step in set(steps)]
    for entry in entries:  # every config and name checked before any model is scored
        read_info(entry, opts)
    started = time.perf_counter()
    outcomes = Evaluator(specs, opts).run(entries)
    if not opts.quiet:
        written = sum(o.status == "written" for o in outcomes)
        kept = sum(o.status not in ("written", "empty") for o in outcomes)
        empty = len(outcomes) - written - kept
        print(
            f"relscale eval: {written} dump(s) written, {kept} already there"
            + (f", {empty} eval set(s) with no examples (no dump)" if empty else "")
            + f", {len(entries)} model(s), {time.perf_counter() - started:.1f}s"
        )
    return outcomes
