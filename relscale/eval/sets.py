"""Eval-set specs and loading: ``[name=][kind:]path`` or ``default`` -> an :class:`EvalSet`.

A spec names a file or folder and optionally its layout (``KIND``, one of :data:`KINDS`) and the
set's name; without a kind the layout is guessed from the contents (:func:`detect_kind`).
``default`` is the held-out split of a prepared data directory. The example types and generic
readers are :mod:`relscale.eval.formats`; the public benchmark layouts (MMLU, Anthropic evals,
BIG-bench) are :mod:`relscale.eval.adapters`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from relscale.data import layout as data_layout  # torch-free prepared-data contract
from relscale.errors import DataError
from relscale.eval import adapters
from relscale.eval.adapters import SAVED_DATASET_MARKERS, is_mmlu_csv_layout
from relscale.eval.formats import (
    EvalSet,
    PromptFormat,
    first_good_row,
    mc_set_from_rows,
    read_rows,
    text_set_from_dir,
    text_set_from_prepared,
    text_set_from_rows,
    truncate_text,
)

KINDS = ("default", "text", "textdir", "mc", "mmlu", "anthropic", "bigbench")


@dataclass
class SetOptions:
    """How files become eval sets (command-line flags of ``relscale eval``)."""

    data_dir: Path | None = None  # for "default": a prepared data directory
    split: str = "val"
    text_field: str = "text"
    id_field: str | None = None
    group_by: list[str] | None = None
    template: str | None = None  # None: the layout's default prompt
    choice_sep: str = " "
    shot_sep: str = "\n\n"
    shots: int = 0
    seed: int = 0
    mmlu_style: str = "letters"
    fewshot_pool: Path | None = None
    limit: int | None = None  # score only the first N examples (quick looks)
    max_chars: int | None = None  # text sets: score only each document's first N characters


def parse_spec(spec: str) -> tuple[str | None, str | None, str]:
    """``[name=][kind:]path`` or ``default`` -> (name, kind, path)."""
    name, sep, rest = spec.partition("=")
    if not sep or "/" in name or not name:
        name, rest = None, spec
    kind, sep, path = rest.partition(":")
    if not sep or kind not in KINDS:
        kind, path = None, rest
    if rest == "default":
        kind, path = "default", ""
    return name, kind, path


def detect_kind(path: Path, text_field: str = "text") -> str:
    """Guess the layout of an eval file or folder from what it contains."""
    if not path.exists():
        raise DataError(f"eval set {path}: no such file or folder")
    if is_mmlu_csv_layout(path) or (path.is_file() and path.suffix.lower() == ".csv"):
        return "mmlu"  # the original release's <subject>_<split>.csv files
    if path.is_dir():
        split_files = [p for p in path.rglob("test-*") if p.suffix in (".parquet", ".jsonl", ".json")]
        if any((path / m).exists() for m in SAVED_DATASET_MARKERS) or split_files:
            return "mmlu"
        if any(path.rglob("task.json")):
            return "bigbench"
        jsonl = sorted(path.rglob("*.jsonl"))
        if jsonl and (first_good_row(jsonl[0]) or {}).get("answer_matching_behavior") is not None:
            return "anthropic"
        return "textdir"
    if path.suffix.lower() == ".json" and not path.read_text(encoding="utf-8").lstrip().startswith("["):
        try:
            if isinstance(json.loads(path.read_text(encoding="utf-8")).get("examples"), list):
                return "bigbench"
        except (json.JSONDecodeError, AttributeError):
            pass  # JSON lines saved under .json
    row = first_good_row(path)
    if row is None:
        raise DataError(f"eval set {path}: no readable rows")
    if "answer_matching_behavior" in row:
        return "anthropic"
    if "choices" in row and "answer" in row:
        return "mmlu" if "subject" in row else "mc"
    if text_field in row:
        return "text"
    raise DataError(
        f"eval set {path}: cannot tell its layout from the fields {sorted(row)}; "
        "name it as KIND:PATH with KIND one of " + ", ".join(KINDS)
    )


def load_eval_set(spec: str, opts: SetOptions) -> EvalSet:
    """The eval set of ``spec`` (``[name=][kind:]path`` or ``default``) read as ``opts`` says,
    cut to ``opts.limit`` examples and ``opts.max_chars`` characters per document.

    Raises DataError for ``default`` without a data directory, an unknown layout, or a set with
    no examples and no malformed rows."""
    name, kind, raw_path = parse_spec(spec)
    if kind == "default":
        if opts.data_dir is None:
            raise DataError(
                "eval set 'default' needs a prepared data directory (--data, or data_path in "
                "the model's meta)"
            )
        if not data_layout.is_prepared(opts.data_dir):  # e.g. a run folder moved without its data
            raise DataError(
                f"eval set 'default': {opts.data_dir} is not a prepared data folder (no "
                f"{data_layout.MANIFEST}); pass --data DIR with the model's prepared data, or evaluate "
                "another set (--eval SPEC)"
            )
        eval_set = text_set_from_prepared(Path(opts.data_dir), opts.split, opts.group_by)
    else:
        path = Path(raw_path).expanduser()
        kind = kind or detect_kind(path, opts.text_field)
        stem = path.stem if path.is_file() else path.name
        if kind == "text":
            eval_set = text_set_from_rows(
                name or stem,
                path,
                read_rows(path),
                text_field=opts.text_field,
                id_field=opts.id_field,
                group_by=opts.group_by,
            )
        elif kind == "textdir":
            eval_set = text_set_from_dir(name or stem, path)
        elif kind == "mc":
            fmt = PromptFormat(
                template=opts.template or PromptFormat.template,
                choice_sep=opts.choice_sep,
                shot_sep=opts.shot_sep,
                shots=opts.shots,
                seed=opts.seed,
            )
            eval_set = mc_set_from_rows(name or stem, path, read_rows(path), fmt)
        elif kind == "mmlu":
            eval_set = adapters.load_mmlu(
                path,
                shots=opts.shots,
                style=opts.mmlu_style,
                template=opts.template,
                fewshot_pool=opts.fewshot_pool,
                name=name,
            )
        elif kind == "anthropic":
            eval_set = adapters.load_anthropic(
                path, shots=opts.shots, template=opts.template, name=name, seed=opts.seed
            )
        else:
            eval_set = adapters.load_bigbench(path, shots=opts.shots, name=name, seed=opts.seed)
    if name:
        eval_set.name = name
    if opts.limit is not None:
        eval_set.examples = eval_set.examples[: opts.limit]
    if opts.max_chars is not None and eval_set.kind == "text":
        eval_set.examples = [truncate_text(e, opts.max_chars) for e in eval_set.examples]
        eval_set.settings = {**eval_set.settings, "max_chars": opts.max_chars}
    if not eval_set.examples and not eval_set.bad_rows:
        raise DataError(f"eval set {eval_set.name!r} ({eval_set.source}): no examples")
    return eval_set


def check_unique_names(sets: list[EvalSet]) -> None:
    """Refuse two eval sets with one name (their dumps would share one file): DataError naming
    both sources."""
    seen: dict[str, EvalSet] = {}
    for eval_set in sets:
        other = seen.setdefault(eval_set.name, eval_set)
        if other is not eval_set:
            raise DataError(
                f"eval sets {other.source} and {eval_set.source} are both named {eval_set.name!r}; "
                "name one with NAME=KIND:PATH"
            )
