"""Adapters for published multiple-choice layouts; nothing is downloaded, files are read locally.

MMLU (Hendrycks et al. 2021; the hub's ``cais/mmlu``)
    rows ``question``, ``subject``, ``choices`` (4 strings), ``answer`` (index 0-3 or a letter).
    Accepted: the original release's CSVs (``dev/<subject>_dev.csv``, ``test/<subject>_test.csv``,
    no header: question, A, B, C, D, answer letter; or one such file), one Parquet/JSONL file
    (the test split), a folder of split files as on the hub (``test-*.parquet``,
    ``dev-*.parquet``; an ``all/`` subfolder is preferred over the per-subject ones), or a
    dataset saved with ``save_to_disk`` (splits ``test``, ``dev``). Few-shot examples are the
    first k ``dev`` rows of the same subject (MMLU's 5 per subject, lm-eval's ``first_n``).
    ``letters`` format (lm-eval's ``mmlu`` task): a header "The following are multiple choice
    questions (with answers) about <subject>.\\n\\n", then "<question, stripped>\\nA. ..\\nB.
    ..\\nAnswer:", each choice scored as " A", " B", ...; ``cloze`` format scores the choice
    texts after "Question: <question, stripped>\\nAnswer:", more informative for models too small
    to learn the letters. Group fields: ``subject`` and ``category`` (lm-eval's four: stem,
    humanities, social_sciences, other; ``unknown`` for a subject outside the 57).

Anthropic model-written evaluations (``anthropics/evals``)
    JSONL rows ``question``, ``answer_matching_behavior``, ``answer_not_matching_behavior`` (a
    string or a list of strings); the behaviour is the file's name. Choices are the matching
    answer then the non-matching one(s), so ``prob_correct`` is the probability of the
    behaviour-matching answer among them. Prompt: "Human: {question}\\n\\nAssistant:" (the
    dialogue format of the paper), answers scored as written (they carry their leading space).
    A file or a folder of files; group field: ``behavior``.

BIG-bench JSON tasks (``task.json``)
    ``examples`` with ``input`` and ``target_scores`` (choice -> score; the right answer is the
    highest score, the first one on ties); the task's own ``task_prefix``,
    ``example_input_prefix`` (default "\\nQ: "), ``example_output_prefix`` (default "\\nA: "),
    ``choice_prefix`` (default "\\n  choice: ") and ``append_choices_to_input`` (default true) build
    the prompt; shots are drawn (seeded) from the task's other examples. Examples without
    ``target_scores`` (generative) are reported as malformed. A task.json or a folder of them;
    group field: ``task``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from relscale.errors import DataError
from relscale.eval.formats import (
    BadRow,
    EvalSet,
    PromptFormat,
    _fmt_settings,
    build_mc_examples,
    check_choices,
    letter,
    parse_answer,
    read_rows,
)

MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject_text}.\n\n"
MMLU_LETTERS = "{question}\n{choice_lines}Answer:"
MMLU_CLOZE = "Question: {question}\nAnswer:"
ANTHROPIC_TEMPLATE = "Human: {question}\n\nAssistant:"
SAVED_DATASET_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
CSV_SPLITS = ("dev", "val", "test")  # <subject>_<split>.csv in the original release

# MMLU's 57 subjects in the four categories lm-evaluation-harness reports (its mmlu groups).
_MMLU_CATEGORY_SUBJECTS = {
    "stem": (
        "abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science "
        "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
        "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
        "high_school_mathematics high_school_physics high_school_statistics machine_learning"
    ),
    "humanities": (
        "formal_logic high_school_european_history high_school_us_history high_school_world_history "
        "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
        "prehistory professional_law world_religions"
    ),
    "social_sciences": (
        "econometrics high_school_geography high_school_government_and_politics "
        "high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality "
        "professional_psychology public_relations security_studies sociology us_foreign_policy"
    ),
    "other": (
        "business_ethics clinical_knowledge college_medicine global_facts human_aging management "
        "marketing medical_genetics miscellaneous nutrition professional_accounting "
        "professional_medicine virology"
    ),
}
MMLU_CATEGORIES = {
    subject: category for category, names in _MMLU_CATEGORY_SUBJECTS.items() for subject in names.split()
}
UNKNOWN_CATEGORY = "unknown"


# ------------------------------------------------------------------------------------------ MMLU
def _csv_subject_split(file: Path) -> tuple[str, str] | None:
    """(subject, split) of an original-release file name ``<subject>_<split>.csv``."""
    stem = file.stem
    for split in CSV_SPLITS:
        if stem.endswith("_" + split) and len(stem) > len(split) + 1:
            return stem[: -len(split) - 1], split
    return None


def _read_mmlu_csv(file: Path, subject: str) -> list[tuple[str, Any, Any]]:
    """Rows of an original-release CSV as hub-style dicts (row numbers from 1, as in an editor);
    a row that is not question, 4 choices and an answer letter becomes a BadRow."""
    out: list[tuple[str, Any, Any]] = []
    try:
        with file.open(newline="", encoding="utf-8") as handle:
            records = list(csv.reader(handle))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{file}: not a readable MMLU CSV ({err})") from err
    for number, record in enumerate(records, start=1):
        if len(record) != 6:
            out.append((str(file), number, BadRow(str(file), number, f"{len(record)} columns, expected 6")))
            continue
        question, *choices, answer = record
        letter_ = answer.strip().upper()
        if len(letter_) != 1 or letter_ not in "ABCD":  # a letter, never a choice's text
            reason = f"answer {answer!r} is not A, B, C or D"
            out.append((str(file), number, BadRow(str(file), number, reason)))
            continue
        row = {"question": question, "subject": subject, "choices": choices, "answer": "ABCD".index(letter_)}
        out.append((str(file), number, row))
    return out


def _mmlu_csv_splits(files: list[Path]) -> dict[str, list[tuple[str, Any, Any]]]:
    out: dict[str, list] = {}
    for file in sorted(files):
        named = _csv_subject_split(file)
        if named is None:
            raise DataError(f"{file}: an MMLU CSV must be named <subject>_dev.csv, _val.csv or _test.csv")
        subject, split = named
        out.setdefault(split, []).extend(_read_mmlu_csv(file, subject))
    return out


def is_mmlu_csv_layout(path: Path) -> bool:
    """Whether ``path`` is an original-release MMLU CSV file or a folder holding some."""
    if path.is_file():
        return path.suffix.lower() == ".csv" and _csv_subject_split(path) is not None
    return path.is_dir() and any(_csv_subject_split(f) for f in path.rglob("*.csv"))


def _mmlu_splits(path: Path) -> dict[str, list[tuple[str, Any, Any]]]:
    """split -> [(file label, row number, row)] for the accepted MMLU layouts."""
    if path.is_file() and path.suffix.lower() == ".csv":  # one file: the questions to score
        named = _csv_subject_split(path)
        return {"test": _read_mmlu_csv(path, named[0] if named else path.stem)}
    if path.is_file():
        return {"test": [(str(path), n, row) for n, row in read_rows(path)]}
    if is_mmlu_csv_layout(path):
        splits = _mmlu_csv_splits([f for f in path.rglob("*.csv") if _csv_subject_split(f)])
        if "test" not in splits:
            raise DataError(f"{path}: no MMLU test split (expected test/<subject>_test.csv files)")
        return splits
    if not path.is_dir():
        raise DataError(f"{path}: MMLU path not found")
    if any((path / marker).exists() for marker in SAVED_DATASET_MARKERS):
        import datasets

        saved = datasets.load_from_disk(str(path))
        splits = saved if isinstance(saved, datasets.DatasetDict) else {"test": saved}
        return {
            name: [(f"{path}[{name}]", n, row) for n, row in enumerate(split)]
            for name, split in splits.items()
        }
    root = path / "all" if (path / "all").is_dir() else path
    out: dict[str, list] = {}
    files = sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl", ".json") and p.is_file())
    for file in files:
        split = file.name.split("-")[0].split(".")[0]
        out.setdefault(split, []).extend((str(file), n, row) for n, row in read_rows(file))
    if "test" not in out:
        raise DataError(f"{path}: no MMLU test split (expected test-*.parquet files or a saved dataset)")
    return out


def _mmlu_row(row: Any) -> tuple[str, list[str], int, str]:
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    for key in ("question", "subject", "choices", "answer"):
        if key not in row:
            raise ValueError(f"field {key!r} missing")
    question, subject, choices = row["question"], row["subject"], row["choices"]
    if not isinstance(question, str) or not isinstance(subject, str):
        raise ValueError("fields 'question' and 'subject' must be strings")
    check_choices(choices)
    return question, list(choices), parse_answer(row["answer"], list(choices)), subject


def load_mmlu(
    path: Path,
    *,
    shots: int = 0,
    style: str = "letters",
    template: str | None = None,
    fewshot_pool: Path | None = None,
    name: str | None = None,
) -> EvalSet:
    """MMLU (Hendrycks et al. 2021) from a local copy (layouts in the module docstring) as a
    multiple-choice set of its test split, grouped by ``subject`` and ``category``.

    ``shots``: few-shot examples per question, the first dev rows of the same subject (or of
    ``fewshot_pool``); ``style``: "letters" (lm-eval's ``mmlu`` prompt, choices scored as " A",
    " B", ...) or "cloze" (the choice texts scored); ``template``: a prompt template replacing
    the style's. Raises DataError for an unknown style, no test split, or shots without a dev
    split; malformed rows become BadRows."""
    if style not in ("letters", "cloze"):
        raise DataError(f"MMLU format {style!r}: choose letters or cloze")
    splits = _mmlu_splits(path)
    bad: list[BadRow] = []

    def parse(entries):
        items = []
        for file, number, row in entries:
            if isinstance(row, BadRow):
                bad.append(row)
                continue
            try:
                question, choices, answer, subject = _mmlu_row(row)
            except ValueError as err:
                bad.append(BadRow(file, number, str(err)))
                continue
            lines = "".join(f"{letter(i)}. {c}\n" for i, c in enumerate(choices))
            extra = {"subject": subject, "subject_text": subject.replace("_", " "), "choice_lines": lines}
            groups = {"subject": subject, "category": MMLU_CATEGORIES.get(subject, UNKNOWN_CATEGORY)}
            # lm-eval's template strips the question (shots included).
            items.append((f"{subject}/{number}", question.strip(), choices, answer, groups, extra))
        return items

    items = parse(splits["test"])
    pool = None
    if shots:
        if fewshot_pool is not None:
            pool_entries = [(str(fewshot_pool), n, r) for n, r in read_rows(fewshot_pool)]
        elif "dev" in splits:
            pool_entries = splits["dev"]
        else:
            raise DataError(f"{path}: {shots}-shot MMLU needs a dev split (or pass a few-shot pool file)")
        pool = [(q, c, a, e) for _, q, c, a, _, e in parse(pool_entries)]
    fmt = PromptFormat(
        template=template or (MMLU_LETTERS if style == "letters" else MMLU_CLOZE),
        choice_sep=" ",
        shot_sep="\n\n",
        shots=shots,
        header=MMLU_HEADER if style == "letters" else "",
    )
    if style == "letters":
        examples = build_mc_examples(
            items,
            fmt,
            shot_pool=pool,
            shot_key="subject",
            continuation=lambda i, choice: " " + letter(i),
            choice_text=lambda i, choice: letter(i),
        )
    else:
        examples = build_mc_examples(items, fmt, shot_pool=pool, shot_key="subject")
    default_name = f"mmlu-{style}-{shots}shot"
    return EvalSet(
        name or default_name,
        "mc",
        examples,
        bad,
        source=str(path),
        settings={**_fmt_settings(fmt), "style": style},
    )


# ------------------------------------------------------------------------------------- Anthropic
def _as_answers(value: Any, key: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"field {key!r} must be a string or a non-empty list of strings")


def load_anthropic(
    path: Path,
    *,
    shots: int = 0,
    template: str | None = None,
    name: str | None = None,
    seed: int = 0,
) -> EvalSet:
    """Anthropic model-written evaluations (Perez et al. 2022, ``anthropics/evals``): a JSONL
    file or a folder of them as a multiple-choice set whose right answer is the
    behaviour-matching one, grouped by ``behavior`` (the file name).

    ``shots``: seeded few-shot examples from the same file; ``template``: replaces "Human:
    {question}\n\nAssistant:". Raises DataError when there is no .jsonl file; malformed rows
    become BadRows."""
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no .jsonl files of model-written evaluations found")
    fmt = PromptFormat(template=template or ANTHROPIC_TEMPLATE, choice_sep="", shots=shots, seed=seed)
    examples, bad = [], []
    for file in files:
        behavior = file.stem
        items = []
        for number, row in read_rows(file):
            if isinstance(row, BadRow):
                bad.append(row)
                continue
            try:
                if not isinstance(row, dict):
                    raise ValueError(f"expected an object, got {type(row).__name__}")
                if not isinstance(row.get("question"), str):
                    raise ValueError("field 'question' missing or not a string")
                matching = _as_answers(row.get("answer_matching_behavior"), "answer_matching_behavior")
                other = _as_answers(row.get("answer_not_matching_behavior"), "answer_not_matching_behavior")
                if len(matching) != 1:
                    raise ValueError(f"answer_matching_behavior has {len(matching)} answers; one expected")
            except ValueError as err:
                bad.append(BadRow(str(file), number, str(err)))
                continue
            groups = {"behavior": behavior}
            items.append((f"{behavior}/{number}", row["question"], matching + other, 0, groups, groups))
        # Shots come from the same behaviour: the file is the unit of meaning.
        examples += build_mc_examples(items, fmt, continuation=lambda i, choice: choice)
    default_name = "anthropic-" + path.stem if path.is_file() else "anthropic-" + path.name
    return EvalSet(name or default_name, "mc", examples, bad, source=str(path), settings=_fmt_settings(fmt))


# -------------------------------------------------------------------------------------- BIG-bench
def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def load_bigbench(path: Path, *, shots: int = 0, name: str | None = None, seed: int = 0) -> EvalSet:
    """BIG-bench JSON tasks (Srivastava et al. 2022; a task.json or a folder of them) as a
    multiple-choice set, the right answer being the highest ``target_scores`` entry, grouped by
    ``task``; prompts use each task's own prefixes. ``shots``: seeded few-shot examples from the
    task's other examples. Raises DataError naming the file for unreadable JSON or a task
    without ``examples``; generative examples become BadRows."""
    files = sorted(path.rglob("task.json")) if path.is_dir() else [path]
    if not files:
        raise DataError(f"{path}: no BIG-bench task.json files found")
    examples, bad = [], []
    settings: dict[str, Any] = {"shots": shots, "seed": seed}
    for file in files:
        try:
            task = json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{file}: not a valid BIG-bench JSON task ({err})") from err
        if not isinstance(task, dict) or not isinstance(task.get("examples"), list):
            raise DataError(f"{file}: a BIG-bench task needs an 'examples' list")
        task_name = str(task.get("name") or file.parent.name)
        input_prefix = task.get("example_input_prefix", "\nQ: ")
        output_prefix = task.get("example_output_prefix", "\nA: ")
        choice_prefix = task.get("choice_prefix", "\n  choice: ")
        append_choices = task.get("append_choices_to_input", True)
        fmt = PromptFormat(
            template=_escape(input_prefix) + "{question}" + _escape(output_prefix),
            choice_sep="",
            shot_sep=task.get("few_shot_example_separator", ""),
            shots=shots,
            seed=seed,
            header=_escape(task.get("task_prefix", "")),
        )
        items = []
        for number, example in enumerate(task["examples"]):
            try:
                if not isinstance(example, dict) or not isinstance(example.get("input"), str):
                    raise ValueError("field 'input' missing or not a string")
                scores = example.get("target_scores")
                if not isinstance(scores, dict) or len(scores) < 2:
                    raise ValueError(
                        "no 'target_scores' with at least 2 choices (generative examples are not supported)"
                    )
                if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in scores.values()):
                    raise ValueError("'target_scores' values must be numbers")
            except ValueError as err:
                bad.append(BadRow(str(file), f"examples[{number}]", str(err)))
                continue
            choices = list(scores)
            values = list(scores.values())
            answer = values.index(max(values))
            question = example["input"]
            if append_choices:
                question += "".join(choice_prefix + c for c in choices)
            groups = {"task": task_name}
            items.append((f"{task_name}/{number}", question, choices, answer, groups, {}))
        examples += build_mc_examples(items, fmt, continuation=lambda i, choice: choice)
        settings[task_name] = _fmt_settings(fmt)
    # A file's own name (not its folder's) unless it is a task.json, so two tasks in one folder
    # get two names; the runner refuses names that still clash.
    if path.is_dir():
        default_name = "bigbench-" + path.name
    else:
        default_name = "bigbench-" + (path.parent.name if path.name == "task.json" else path.stem)
    return EvalSet(name or default_name, "mc", examples, bad, source=str(path), settings=settings)
