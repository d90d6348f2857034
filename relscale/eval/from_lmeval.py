"""``relscale eval --from-lm-eval DIR``: lm-evaluation-harness ``--log_samples`` output -> dumps.

lm-eval (0.4) writes, per run, ``<output_path>/<model>/results_<time>.json`` and one
``samples_<task>_<time>.jsonl`` per task (with ``--log_samples``). Each run folder becomes one
model's dumps, one per task *group* (the top group of ``group_subtasks``, e.g. ``mmlu``; an
ungrouped task is its own): ``<out>/lmeval-<group>/<model_id>.parquet``, rows as
:mod:`relscale.eval.writer` documents them, so ``relscale fit --grouping subject`` works on them.

Groups of each example: ``subject`` (the task's alias, else its name: ``anatomy`` for lm-eval's
``mmlu_anatomy``), ``task`` (the task's name) and, for a task two levels below its top group,
``category`` (the group in between: ``mmlu_stem``).

Metrics, from the logged responses (any model lm-eval ran):
* ``multiple_choice``: each choice's log-likelihood; ``acc``/``acc_norm`` as lm-eval logged them
  (else computed its way), byte-normalised ones over the choice texts (target delimiter removed),
  ``nll``/``n_bytes``/``bpb`` of the right answer with the bytes of its continuation string
  (trailing whitespace of the prompt included, as lm-eval scores it). Token counts are unknown
  (null): lm-eval does not log them.
* ``loglikelihood_rolling``: ``nll`` = -log-likelihood, ``n_bytes`` as lm-eval counted them.
* ``loglikelihood``: one choice per example, ``acc`` = lm-eval's is_greedy.
* ``generate_until`` tasks carry no log-likelihoods: skipped with a message.

Model columns come from ``pretrained`` in the run's model_args when it is a model relscale can
read (parameters, tokens, FLOPs from its meta), then ``--meta KEY=VALUE`` overrides; lm-eval's
``model_num_parameters`` fills ``params`` otherwise. The model id: ``--model-id``, else the
run's model (``<run>`` for ``<run>/final``, else the folder name of ``pretrained``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relscale.errors import DataError
from relscale.eval.formats import BadRow, EvalSet, check_bad_rows
from relscale.eval.writer import dump_path, is_finished_dump, write_dump

RESULTS_RE = re.compile(r"^results_(?P<time>.+)\.json$")
LN2 = math.log(2.0)
GENERATIVE = "generate_until"


@dataclass
class Converted:
    """One written (or kept) dump."""

    model_id: str
    dataset: str
    path: Path
    status: str  # "written" | "exists"
    examples: int


def find_runs(root: Path) -> list[Path]:
    """The newest ``results_*.json`` of every folder under ``root`` (one lm-eval run each)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"--from-lm-eval {root}: no such folder")
    files = [root] if root.is_file() else sorted(root.rglob("results_*.json"))
    newest: dict[Path, Path] = {}
    for file in files:
        if RESULTS_RE.match(file.name):
            current = newest.get(file.parent)
            if current is None or file.name > current.name:  # ISO timestamps sort by time
                newest[file.parent] = file
    if not newest:
        raise DataError(
            f"--from-lm-eval {root}: no lm-eval results_*.json found (run lm_eval with --output_path)"
        )
    return [newest[folder] for folder in sorted(newest)]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable lm-eval results file ({err})") from err
    if not isinstance(value, dict) or "configs" not in value:
        raise DataError(f"{path}: not an lm-eval results file (no 'configs')")
    return value


def _samples_file(results_file: Path, task: str) -> Path | None:
    stamp = RESULTS_RE.match(results_file.name).group("time")
    path = results_file.parent / f"samples_{task}_{stamp}.jsonl"
    return path if path.is_file() else None


def _read_samples(path: Path) -> list[dict]:
    out, seen = [], set()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid JSON ({err.msg})") from err
        doc_id = sample.get("doc_id")
        if doc_id in seen:  # one line per filter: keep the first
            continue
        seen.add(doc_id)
        out.append(sample)
    return out


def _parents(group_subtasks: dict[str, list[str]]) -> dict[str, str]:
    parent = {}
    for group, subtasks in group_subtasks.items():
        for task in subtasks or []:
            parent[task] = group
    return parent


def _chain(task: str, parent: dict[str, str]) -> list[str]:
    chain = [task]
    while chain[-1] in parent and parent[chain[-1]] not in chain:
        chain.append(parent[chain[-1]])
    return chain[::-1]  # top group first


def _pairs(sample: dict) -> list[tuple[str, str | None]]:
    args = sample.get("arguments")
    if isinstance(args, dict):
        return [(a.get("arg_0"), a.get("arg_1")) for a in args.values()]
    if isinstance(args, list):
        return [(a[0], a[1] if len(a) > 1 else None) for a in args]
    raise ValueError("no 'arguments'")


def _float(value: Any) -> float:
    if isinstance(value, list | tuple):
        value = value[0]
    return float(value)


def _greedy(value: Any) -> bool:
    flag = value[1] if isinstance(value, list | tuple) and len(value) > 1 else False
    return flag is True or str(flag) == "True"


def _answer(target: Any, choice_texts: list[str]) -> int:
    if isinstance(target, bool):
        raise ValueError(f"target {target!r} is a boolean")
    if isinstance(target, int):
        index = target
    elif isinstance(target, str) and target.strip().lstrip("-").isdigit():
        index = int(target)
    elif isinstance(target, str) and target in choice_texts:
        index = choice_texts.index(target)
    else:
        raise ValueError(f"target {target!r} is neither a choice index nor a choice")
    if not 0 <= index < len(choice_texts):
        raise ValueError(f"target {target!r} out of range for {len(choice_texts)} choices")
    return index


def _softmax_at(values: list[float], index: int) -> float:
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    return weights[index] / sum(weights)


def mc_row(sample: dict, delimiter: str) -> dict:
    """Per-example metrics of a logged multiple_choice sample (see the module docstring)."""
    pairs = _pairs(sample)
    context = pairs[0][0]
    continuations = [c for _, c in pairs]
    if any(c is None for c in continuations):
        raise ValueError("a request without a continuation")
    texts = [c[len(delimiter) :] if delimiter and c.startswith(delimiter) else c for c in continuations]
    resps = sample.get("filtered_resps") or []
    if len(resps) != len(pairs):
        raise ValueError(f"{len(resps)} responses for {len(pairs)} choices")
    logprobs = [_float(r) for r in resps]
    answer = _answer(sample.get("target"), texts)
    chars = [max(len(t), 1) for t in texts]
    text_bytes = [max(len(t.encode("utf-8")), 1) for t in texts]
    per_byte = [lp / b for lp, b in zip(logprobs, text_bytes, strict=True)]
    per_char = [lp / c for lp, c in zip(logprobs, chars, strict=True)]
    trailing = context[len(context.rstrip()) :]  # lm-eval scores it with the continuation
    cont_bytes = [len((trailing + c).encode("utf-8")) for c in continuations]
    nll = -logprobs[answer]
    acc = sample.get("acc")
    acc_norm = sample.get("acc_norm")
    return {
        "prompt": context,
        "choices": continuations,
        "choice_logprobs": logprobs,
        "choice_logprobs_norm": per_byte,
        "choice_n_tokens": None,
        "choice_n_bytes": cont_bytes,
        "answer": answer,
        "choice_logprob": logprobs[answer],
        "choice_logprob_norm": per_byte[answer],
        "choice_prob_norm": _softmax_at(per_byte, answer),
        "logprob_correct": logprobs[answer],
        "prob_correct": _softmax_at(logprobs, answer),
        "acc": float(acc) if isinstance(acc, int | float) else float(_argmax(logprobs) == answer),
        "acc_norm": float(acc_norm)
        if isinstance(acc_norm, int | float)
        else float(_argmax(per_char) == answer),
        "acc_bytes": float(_argmax(per_byte) == answer),
        "nll": nll,
        "n_tokens": None,
        "n_bytes": cont_bytes[answer],
        "bpb": nll / (LN2 * cont_bytes[answer]) if cont_bytes[answer] else None,
    }


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))


def loglikelihood_row(sample: dict) -> dict:
    """A single-continuation ``loglikelihood`` sample: one choice, acc = is_greedy."""
    (context, continuation), resp = _pairs(sample)[0], sample["filtered_resps"][0]
    logprob = _float(resp)
    trailing = context[len(context.rstrip()) :]
    n_bytes = len((trailing + continuation).encode("utf-8"))
    return {
        "prompt": context,
        "choices": [continuation],
        "choice_logprobs": [logprob],
        "choice_logprobs_norm": [logprob / max(len(continuation.encode("utf-8")), 1)],
        "choice_n_bytes": [n_bytes],
        "answer": 0,
        "choice_logprob": logprob,
        "logprob_correct": logprob,
        "prob_correct": 1.0,
        "acc": float(_greedy(resp)),
        "nll": -logprob,
        "n_bytes": n_bytes,
        "bpb": -logprob / (LN2 * n_bytes) if n_bytes else None,
    }


def rolling_row(sample: dict) -> dict:
    """A ``loglikelihood_rolling`` sample: the document's NLL and bytes (lm-eval's count)."""
    text = _pairs(sample)[0][0]
    nll = -_float(sample["filtered_resps"][0])
    logged = sample.get("bits_per_byte") or sample.get("byte_perplexity")
    n_bytes = int(logged[1]) if isinstance(logged, list) and len(logged) == 2 else len(text.encode("utf-8"))
    return {
        "nll": nll,
        "n_tokens": None,
        "n_bytes": n_bytes,
        "bpb": nll / (LN2 * n_bytes) if n_bytes else None,
    }


def _model_args(config: dict) -> dict:
    args = config.get("model_args") or {}
    if isinstance(args, str):  # "pretrained=PATH,dtype=float32"
        args = dict(part.split("=", 1) for part in args.split(",") if "=" in part)
    return args if isinstance(args, dict) else {}


def model_columns_of(results: dict, meta: dict, model_id: str | None) -> dict[str, Any]:
    """The dump's model columns for an lm-eval run (see the module docstring)."""
    config = results.get("config") or {}
    pretrained = _model_args(config).get("pretrained")
    columns: dict[str, Any] = {
        "model_id": None,
        "step": None,
        "params": config.get("model_num_parameters"),
        "non_embedding_params": None,
        "tokens": None,
        "flops_train": None,
        "flops_marin": None,
        "budget": None,
        "hidden": None,
        "layers": None,
        "source": str(pretrained or results.get("model_name") or ""),
    }
    if isinstance(pretrained, str) and Path(pretrained).exists():
        from relscale.eval.discover import discover_models, read_info
        from relscale.eval.models import model_columns as runner_columns
        from relscale.eval.options import RunOptions

        try:
            entries = discover_models([pretrained])
        except DataError:
            entries = []
        if len(entries) == 1:
            columns.update(runner_columns(entries[0], read_info(entries[0], RunOptions(meta=dict(meta)))))
    for key, value in meta.items():
        if key in columns:
            columns[key] = value
    if model_id:
        columns["model_id"] = model_id
    elif not columns["model_id"]:
        name = Path(str(pretrained)).name if pretrained else str(results.get("model_name") or "lm-eval")
        if name == "final" and pretrained:
            name = Path(str(pretrained)).parent.name
        columns["model_id"] = name
    for key in ("params", "non_embedding_params", "tokens", "hidden", "layers", "step"):
        if columns[key] is not None:
            columns[key] = int(float(columns[key]))
    for key in ("flops_train", "flops_marin", "budget"):
        if columns[key] is not None:
            columns[key] = float(columns[key])
    return columns


def convert_run(
    results_file: Path,
    out_dir: Path,
    *,
    meta: dict | None = None,
    model_id: str | None = None,
    force: bool = False,
    say=print,
) -> list[Converted]:
    """Write the dumps of one lm-eval run (one results file and its samples files)."""
    results = _read_json(results_file)
    columns = model_columns_of(results, meta or {}, model_id)
    parent = _parents(results.get("group_subtasks") or {})
    by_dataset: dict[str, dict[str, Any]] = {}
    for task, config in sorted(results["configs"].items()):
        output_type = config.get("output_type")
        if output_type == GENERATIVE:
            say(f"lm-eval task {task}: generate_until has no log-likelihoods; skipped")
            continue
        samples_path = _samples_file(results_file, task)
        if samples_path is None:
            raise DataError(
                f"{results_file.parent}: no samples file for task {task!r} (run lm_eval with --log_samples)"
            )
        chain = _chain(task, parent)
        dataset = "lmeval-" + chain[0]
        groups = {"subject": str(config.get("task_alias") or task), "task": task}
        if len(chain) >= 3:
            groups["category"] = chain[-2]
        entry = by_dataset.setdefault(
            dataset,
            {
                "kind": "text" if output_type == "loglikelihood_rolling" else "mc",
                "rows": [],
                "bad": [],
                "tasks": {},
            },
        )
        kind = "text" if output_type == "loglikelihood_rolling" else "mc"
        if kind != entry["kind"]:
            raise DataError(f"{results_file}: group {chain[0]!r} mixes rolling and choice tasks ({task})")
        entry["tasks"][task] = {
            "output_type": output_type,
            "num_fewshot": config.get("num_fewshot"),
            "samples": samples_path.name,
        }
        delimiter = config.get("target_delimiter", " ")
        for sample in _read_samples(samples_path):
            try:
                if output_type == "multiple_choice":
                    row = mc_row(sample, delimiter)
                elif output_type == "loglikelihood":
                    row = loglikelihood_row(sample)
                elif output_type == "loglikelihood_rolling":
                    row = rolling_row(sample)
                else:
                    raise ValueError(f"output_type {output_type!r} is not supported")
            except (ValueError, TypeError, KeyError, IndexError) as err:
                entry["bad"].append(BadRow(str(samples_path), sample.get("doc_id"), str(err)))
                continue
            row["example_id"] = f"{task}/{sample.get('doc_id')}"
            row["groups"] = dict(groups)
            entry["rows"].append(row)
    out = []
    for dataset, entry in by_dataset.items():
        check_bad_rows(EvalSet(dataset, entry["kind"], [], entry["bad"], str(results_file)), skip_bad=False)
        path = dump_path(out_dir, dataset, columns["model_id"])
        if not entry["rows"]:
            say(f"{columns['model_id']} / {dataset}: 0 examples; no dump written")
            continue
        if is_finished_dump(path) and not force:
            say(f"{columns['model_id']} / {dataset}: {path} exists, kept (--force rewrites)")
            out.append(Converted(columns["model_id"], dataset, path, "exists", len(entry["rows"])))
            continue
        settings = {
            "dataset": dataset,
            "kind": entry["kind"],
            "source": "lm-evaluation-harness",
            "results_file": str(results_file),
            "lm_eval_version": results.get("lm_eval_version"),
            "model_args": (results.get("config") or {}).get("model_args"),
            "tasks": entry["tasks"],
        }
        written = write_dump(path, entry["kind"], columns, dataset, entry["rows"], settings, force=force)
        say(f"{columns['model_id']} / {dataset}: {len(entry['rows'])} examples -> {path}")
        out.append(
            Converted(
                columns["model_id"], dataset, path, "written" if written else "exists", len(entry["rows"])
            )
        )
    return out


def convert_lm_eval(
    source: Path,
    out_dir: Path,
    *,
    meta: dict | None = None,
    model_id: str | None = None,
    force: bool = False,
    quiet: bool = False,
) -> list[Converted]:
    """Convert every lm-eval run under ``source`` (its newest results per folder) into dumps
    under ``out_dir``. Raises DataError naming the file for unreadable or malformed output;
    ``model_id`` applies only when ``source`` holds one run."""
    runs = find_runs(Path(source))
    if model_id and len(runs) > 1:
        raise DataError(f"--model-id names one model but {source} holds {len(runs)} lm-eval runs")
    say = (lambda _: None) if quiet else (lambda text: print(text, flush=True))
    out: list[Converted] = []
    for results_file in runs:
        out += convert_run(results_file, Path(out_dir), meta=meta, model_id=model_id, force=force, say=say)
    return out
