"""Eval sets: what gets scored, read from files into two kinds of examples.

* :class:`TextExample` -- a document, scored token by token (NLL, bits per byte).
* :class:`MCExample` -- a prompt and its candidate continuations (multiple choice).

Both carry ``groups``: a mapping grouping field -> label (``{"century": "19th", "sotu_type":
"spoken"}``); the writer emits one row per example *per grouping field*, see
:mod:`relscale.eval.dump`.

Text layouts read here
----------------------
* JSONL / JSON-array / Parquet rows with a text field (``text``), an optional id field (``id`` or
  ``doc_id``, else the row number) and group fields (``--group-by``; default ``group`` when rows
  have it).
* A folder of text files per group (ICE corpora): each first-level subfolder is a group
  (``grouping = "group"``), each ``.txt`` file below it a document; files directly in the folder
  belong to a group named after the folder.
* ``default``: the held-out split (``val``) of a directory written by ``relscale prepare`` (the
  embedded corpus), grouped by the data's group fields (for sotu: sotu_type, century, party).

Turning a spec (``[name=][kind:]path`` or ``default``) into an eval set is
:mod:`relscale.eval.sets`; this module holds the example types and the generic readers.

Multiple-choice layouts (generic here, public ones in :mod:`relscale.eval.adapters`): rows with
``question``, ``choices`` (list of strings), ``answer`` (index, or the text of the right choice)
and optional ``group``; prompts are built by :class:`PromptFormat`.

Malformed rows are never dropped silently: each becomes a :class:`BadRow` naming file and row;
:func:`check_bad_rows` raises a DataError listing them, or, with ``skip_bad``, writes them to a
report file and says how many were skipped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relscale.errors import DataError
from relscale.eval.dump import NO_GROUP  # noqa: F401 -- the dump contract's "no group" label, re-exported

TEXT_DIR_GROUPING = "group"
MAX_LISTED_BAD_ROWS = 10


@dataclass(frozen=True)
class BadRow:
    """A malformed row of an eval file: ``file``, ``row`` (1-based line number or a path inside
    the file) and the ``reason`` in words."""

    file: str
    row: int | str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}, row {self.row}: {self.reason}"


@dataclass
class TextExample:
    """A document scored token by token: id, text and group labels ({grouping field: label})."""

    example_id: str
    text: str
    groups: dict[str, str] = field(default_factory=dict)


@dataclass
class MCExample:
    """``context`` is the whole prompt (few-shot examples included); ``continuations`` are the
    strings scored after it (separator included, e.g. ``" Paris"``); ``answer`` indexes them.
    ``choice_texts``: the choices without the separator (``"Paris"``; empty: the continuations),
    whose length normalises ``acc_norm`` as lm-evaluation-harness does."""

    example_id: str
    context: str
    continuations: list[str]
    answer: int
    groups: dict[str, str] = field(default_factory=dict)
    choice_texts: list[str] = field(default_factory=list)


@dataclass
class EvalSet:
    """A loaded eval set: ``name`` (the dumps' ``dataset`` column and folder), ``kind`` ("text"
    | "mc"), its examples, the malformed rows found, its ``source`` (file or folder) and the
    ``settings`` it was built with (prompt format, shots, ...; stored in the dumps)."""

    name: str  # the `dataset` column and the output file's folder
    kind: str  # "text" | "mc"
    examples: list[TextExample] | list[MCExample]
    bad_rows: list[BadRow] = field(default_factory=list)
    source: str = ""
    settings: dict[str, Any] = field(default_factory=dict)  # how prompts were built (provenance)


@dataclass(frozen=True)
class PromptFormat:
    """How a multiple-choice prompt is written.

    ``template`` formats one question (fields: ``question``, ``subject``/``group``, and ``A``,
    ``B``, ... for the choices); each choice is scored as ``choice_sep + text``. ``shots``
    solved examples (template + choice_sep + right answer) precede the question, joined by
    ``shot_sep``.
    """

    template: str = "Question: {question}\nAnswer:"
    choice_sep: str = " "
    shot_sep: str = "\n\n"
    shots: int = 0
    seed: int = 0
    header: str = ""  # written once before the shots (MMLU: "The following are ... about {subject}.")


# ------------------------------------------------------------------------------------ row reading
def read_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(row number, row) of a JSONL, JSON-array or Parquet file. JSON lines are numbered from 1
    (line numbers, so an editor finds them); array and Parquet rows from 0. A line that does not
    parse is yielded as a :class:`BadRow` instead of a row."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # pyarrow raises several types for a corrupt file
            raise DataError(f"{path}: not a readable Parquet file ({err})") from err
        yield from enumerate(table.to_pylist())
        return
    if suffix not in (".jsonl", ".json", ".ndjson"):
        raise DataError(f"{path}: unsupported file type {suffix!r} (expected .jsonl, .json or .parquet)")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from err
        yield from enumerate(rows)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # a blank line is not a row
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, BadRow(str(path), number, f"not valid JSON ({err.msg})")


def first_good_row(path: Path) -> dict | None:
    """The first row of ``path`` (see :func:`read_rows`) that is a JSON object, or None."""
    for _, row in read_rows(path):
        if isinstance(row, dict):
            return row
    return None


def check_bad_rows(eval_set: EvalSet, skip_bad: bool, report_path: Path | None = None) -> None:
    """Raise a DataError naming the malformed rows, or (``skip_bad``) write them to
    ``report_path`` and print how many were skipped."""
    bad = eval_set.bad_rows
    if not bad:
        return
    if not skip_bad:
        listed = "\n  ".join(str(b) for b in bad[:MAX_LISTED_BAD_ROWS])
        more = f"\n  ... and {len(bad) - MAX_LISTED_BAD_ROWS} more" if len(bad) > MAX_LISTED_BAD_ROWS else ""
        raise DataError(
            f"eval set {eval_set.name!r}: {len(bad)} malformed row(s) (fix them, or pass --skip-bad "
            f"to skip them with a report):\n  {listed}{more}"
        )
    where = ""
    if report_path is not None:
        from relscale.atomic import atomic_write_text

        lines = "".join(json.dumps({"file": b.file, "row": b.row, "reason": b.reason}) + "\n" for b in bad)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(report_path, lines)
        where = f"; report: {report_path}"
    print(f"eval set {eval_set.name!r}: skipped {len(bad)} malformed row(s){where}")


# ------------------------------------------------------------------------------------- text sets
def _label(value: Any) -> str:
    return str(value)


def text_set_from_rows(
    name: str,
    path: Path,
    rows: Iterator[tuple[int, Any]],
    *,
    text_field: str = "text",
    id_field: str | None = None,
    group_by: list[str] | None = None,
) -> EvalSet:
    """A text set from ``rows`` of ``path`` (:func:`read_rows`): each row's ``text_field`` is a
    document, ``id_field`` (else ``id`` / ``doc_id``, else the row number) its id, the
    ``group_by`` fields (default ``group`` when present) its groups. Rows without text, with a
    duplicate id or non-string groups become BadRows."""
    examples: list[TextExample] = []
    bad: list[BadRow] = []
    seen_ids: set[str] = set()
    for number, row in rows:
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        if not isinstance(row, Mapping):
            bad.append(BadRow(str(path), number, f"expected an object, got {type(row).__name__}"))
            continue
        text = row.get(text_field)
        if not isinstance(text, str):
            bad.append(BadRow(str(path), number, f"field {text_field!r} missing or not a string"))
            continue
        if not text:
            bad.append(BadRow(str(path), number, f"field {text_field!r} is empty (nothing to score)"))
            continue
        fields = group_by if group_by is not None else (["group"] if "group" in row else [])
        missing = [f for f in fields if row.get(f) is None]
        if missing:
            bad.append(BadRow(str(path), number, f"group field(s) {missing} missing"))
            continue
        key = id_field or next((k for k in ("id", "doc_id") if k in row), None)
        example_id = _label(row[key]) if key and row.get(key) is not None else str(number)
        if example_id in seen_ids:
            bad.append(BadRow(str(path), number, f"duplicate example id {example_id!r}"))
            continue
        seen_ids.add(example_id)
        examples.append(TextExample(example_id, text, {f: _label(row[f]) for f in fields}))
    return EvalSet(
        name,
        "text",
        examples,
        bad,
        source=str(path),
        settings={"text_field": text_field, "group_by": group_by},
    )


def text_set_from_dir(name: str, root: Path) -> EvalSet:
    """ICE layout: one subfolder per group (region), each .txt file below it one document."""
    examples: list[TextExample] = []
    bad: list[BadRow] = []
    files = sorted(p for p in root.rglob("*.txt") if p.is_file())
    if not files:
        raise DataError(f"{root}: no .txt files found (expected one folder per group of text files)")
    for path in files:
        relative = path.relative_to(root)
        group = relative.parts[0] if len(relative.parts) > 1 else root.name
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            bad.append(BadRow(str(path), 0, f"not UTF-8 text ({err.reason} at byte {err.start})"))
            continue
        if not text:
            bad.append(BadRow(str(path), 0, "empty file (nothing to score)"))
            continue
        examples.append(TextExample(relative.as_posix(), text, {TEXT_DIR_GROUPING: group}))
    return EvalSet(name, "text", examples, bad, source=str(root))


def truncate_text(example: TextExample, max_chars: int) -> TextExample:
    """The document's first ``max_chars`` characters, cut back to the last whitespace so no word
    is split (bytes and bits-per-byte are then counted on the text actually scored)."""
    if max_chars <= 0:
        raise DataError(f"max_chars must be positive, got {max_chars}")
    text = example.text
    if len(text) > max_chars:
        cut = text[:max_chars]
        space = max(cut.rfind(" "), cut.rfind("\n"))
        text = cut[:space] if space > 0 else cut
    return TextExample(example.example_id, text, dict(example.groups))


def text_set_from_prepared(data_dir: Path, split: str = "val", group_by: list[str] | None = None) -> EvalSet:
    """The held-out documents of a prepared data directory (``relscale prepare``), decoded back
    to text so any tokenizer can score them, grouped by the data's group fields."""
    from relscale.data import PreparedData

    data = PreparedData(data_dir)
    index = data.documents(split)
    columns = list(index.columns) if hasattr(index, "columns") else list(index.column_names)
    if group_by is None:
        declared = data.group_fields
        group_by = [f for f in declared if f in columns] if declared is not None else []
    missing = [f for f in group_by if f not in columns]
    if missing:
        raise DataError(f"{data_dir}: split {split!r} has no group column(s) {missing} (has {columns})")
    records = index.to_pandas() if hasattr(index, "to_pandas") else index
    examples = []
    for row, record in enumerate(records.itertuples(index=False)):
        values = record._asdict()
        groups = {f: _label(values[f]) for f in group_by}
        examples.append(TextExample(_label(values["doc_id"]), data.decode_document(split, row), groups))
    name = f"{data_dir.name}-{split}"
    settings = {"split": split, "group_by": group_by}
    return EvalSet(name, "text", examples, source=str(data_dir), settings=settings)


# ----------------------------------------------------------------------------- multiple choice
def letter(i: int) -> str:
    """The choice letter of index ``i``: 0 -> "A", 1 -> "B", ..."""
    return chr(ord("A") + i)


def parse_answer(answer: Any, choices: list[str]) -> int:
    """An answer given as an index, a letter (``"B"``) or the text of the right choice."""
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is a boolean")
    if isinstance(answer, int):
        index = answer
    elif isinstance(answer, str) and answer in choices:
        index = choices.index(answer)
    elif isinstance(answer, str) and len(answer) == 1 and answer.isalpha():
        index = ord(answer.upper()) - ord("A")
    elif isinstance(answer, str) and answer.strip().isdigit():
        index = int(answer)
    else:
        raise ValueError(f"answer {answer!r} is neither an index, a letter nor one of the choices")
    if not 0 <= index < len(choices):
        raise ValueError(f"answer {answer!r} out of range for {len(choices)} choices")
    return index


def check_choices(choices: Any) -> None:
    """ValueError unless ``choices`` is a list or tuple of at least two strings."""
    if not isinstance(choices, list | tuple) or len(choices) < 2:
        raise ValueError("field 'choices' must be a list of at least 2 strings")
    if not all(isinstance(c, str) for c in choices):
        raise ValueError("field 'choices' must hold strings only")


def validate_mc_row(row: Any, question_field: str = "question") -> tuple[str, list[str], int]:
    """(question, choices, answer index) of a generic MC row; ValueError says what is wrong."""
    if not isinstance(row, Mapping):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    question, choices = row.get(question_field), row.get("choices")
    if not isinstance(question, str):
        raise ValueError(f"field {question_field!r} missing or not a string")
    check_choices(choices)
    if "answer" not in row:
        raise ValueError("field 'answer' missing")
    return question, list(choices), parse_answer(row["answer"], list(choices))


def render_question(fmt: PromptFormat, question: str, choices: list[str], extra: Mapping[str, str]) -> str:
    """``fmt.template`` filled with ``question``, the choices under their letters (``{A}``,
    ``{B}``, ...) and ``extra`` fields. Raises DataError naming an unknown template field."""
    fields = {"question": question, **{letter(i): c for i, c in enumerate(choices)}, **extra}
    try:
        return fmt.template.format(**fields)
    except (KeyError, IndexError) as err:
        raise DataError(
            f"prompt template {fmt.template!r} names an unknown field {err} (available: {', '.join(fields)})"
        ) from err


def build_mc_examples(
    items: list[tuple[str, str, list[str], int, dict[str, str], dict[str, str]]],
    fmt: PromptFormat,
    *,
    shot_pool: list[tuple[str, list[str], int, dict[str, str]]] | None = None,
    shot_key: str | None = None,
    continuation=None,
    choice_text=None,
) -> list[MCExample]:
    """Turn (id, question, choices, answer, groups, template extras) items into prompts.

    Few-shot examples come from ``shot_pool`` (restricted to the same value of ``shot_key`` in
    the extras, e.g. MMLU's subject, when given), in pool order; without a pool they are drawn,
    seeded per example, from the other items. ``continuation(i, choice)`` gives what is scored
    for choice ``i`` (default: ``choice_sep + choice``), ``choice_text(i, choice)`` the choice's
    text for length normalisation (default: the choice).
    """
    continuation = continuation or (lambda i, choice: fmt.choice_sep + choice)
    out = []
    choice_text = choice_text or (lambda i, choice: choice)
    for number, (example_id, question, choices, answer, groups, extra) in enumerate(items):
        shots: list[tuple[str, list[str], int, dict[str, str]]] = []
        if fmt.shots:
            if shot_pool is not None:
                pool = [s for s in shot_pool if shot_key is None or s[3].get(shot_key) == extra.get(shot_key)]
                shots = pool[: fmt.shots]
            else:
                others = [i for i in range(len(items)) if i != number]
                picked = random.Random(f"{fmt.seed}:{example_id}").sample(others, min(fmt.shots, len(others)))
                shots = [(items[i][1], items[i][2], items[i][3], items[i][5]) for i in picked]
        parts = [render_question(fmt, q, c, e) + continuation(a, c[a]) for q, c, a, e in shots]
        parts.append(render_question(fmt, question, choices, extra))
        header = fmt.header.format(**extra) if fmt.header else ""
        context = header + fmt.shot_sep.join(parts)
        conts = [continuation(i, c) for i, c in enumerate(choices)]
        texts = [choice_text(i, c) for i, c in enumerate(choices)]
        out.append(MCExample(example_id, context, conts, answer, groups, texts))
    return out


def mc_set_from_rows(
    name: str,
    path: Path,
    rows: Iterator[tuple[int, Any]],
    fmt: PromptFormat,
    *,
    group_field: str = "group",
    id_field: str = "id",
) -> EvalSet:
    """A multiple-choice set from ``rows`` of ``path``: ``question``, ``choices`` (at least two
    strings), ``answer`` (index or the right choice's text), optional ``group_field`` and
    ``id_field``; prompts built by ``fmt`` (:func:`build_mc_examples`). Malformed rows become
    BadRows."""
    items, bad = [], []
    for number, row in rows:
        if isinstance(row, BadRow):
            bad.append(row)
            continue
        try:
            question, choices, answer = validate_mc_row(row)
        except ValueError as err:
            bad.append(BadRow(str(path), number, str(err)))
            continue
        group = row.get(group_field)
        groups = {group_field: _label(group)} if group is not None else {}
        example_id = _label(row[id_field]) if row.get(id_field) is not None else str(number)
        items.append((example_id, question, choices, answer, groups, dict(groups)))
    examples = build_mc_examples(items, fmt)
    return EvalSet(name, "mc", examples, bad, source=str(path), settings=_fmt_settings(fmt))


def _fmt_settings(fmt: PromptFormat) -> dict[str, Any]:
    return {
        "template": fmt.template,
        "choice_sep": fmt.choice_sep,
        "shot_sep": fmt.shot_sep,
        "shots": fmt.shots,
        "seed": fmt.seed,
        "header": fmt.header,
    }
