"""The run folder: what :func:`relscale.train.train` writes into ``out_dir``, named and read here.

This module is the one contract between the trainer (the writer) and everything that reads a run
folder (evaluation, sweeps, fitting). It imports no torch, so readers can list and inspect runs
cheaply. Layout::

    <run>/train_config.json     the TrainConfig the run trained with (relscale.config.to_dict),
                                written when the run starts
    <run>/metrics.jsonl         one JSON record per line, appended as training goes
                                ({"step", "loss", "lr", ...} and {"step", "val_loss"})
    <run>/checkpoints/step_0000100/
                                a resumable checkpoint after 100 optimizer steps (DCP shards,
                                trainer_rank<r>.pt, checkpoint.json = step, world_size,
                                fingerprint and the size and sha256 of every other file); a
                                folder without checkpoint.json is incomplete and never listed
    <run>/final/                the trained model (relscale.model_io): model.safetensors,
                                config.json, tokenizer.json; every path in config.json is
                                relative to final/, so the run folder can be moved
    <run>/result.json           the outcome (status "done" | "diverged", losses, tokens, FLOPs)
    <run>/evals/                per-example dumps written during training (dump_steps)
    <run>/.lock                 held (fcntl.flock) by the trainer while it runs

``final/config.json``'s ``meta["data_path"]`` records where the training data was; it is a
hint for finding the held-out split, never needed to load the weights or the tokenizer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relscale.atomic import read_json_object
from relscale.errors import DataError

TRAIN_CONFIG = "train_config.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
FINAL = "final"
CHECKPOINTS = "checkpoints"
EVALS = "evals"
LOCK = ".lock"

CHECKPOINT_META = "checkpoint.json"
STEP_DIR = re.compile(r"^step_(\d{7,})$")
"""Name of a checkpoint folder: ``step_`` and the optimizer steps done, zero-padded to 7 digits."""

# Files of a model folder (final/), written by relscale.model_io.save_model.
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
MODEL_FORMAT = "relscale-model"


# ------------------------------------------------------------------------------------------ paths
def train_config_path(run_dir: str | Path) -> Path:
    """``<run>/train_config.json``."""
    return Path(run_dir) / TRAIN_CONFIG


def metrics_path(run_dir: str | Path) -> Path:
    """``<run>/metrics.jsonl``."""
    return Path(run_dir) / METRICS


def result_path(run_dir: str | Path) -> Path:
    """``<run>/result.json``."""
    return Path(run_dir) / RESULT


def final_dir(run_dir: str | Path) -> Path:
    """``<run>/final``: the model folder of a finished run."""
    return Path(run_dir) / FINAL


def checkpoints_dir(run_dir: str | Path) -> Path:
    """``<run>/checkpoints``."""
    return Path(run_dir) / CHECKPOINTS


def step_dir(run_dir: str | Path, step: int) -> Path:
    """``<run>/checkpoints/step_XXXXXXX``: the checkpoint after ``step`` optimizer steps."""
    return checkpoints_dir(run_dir) / f"step_{step:07d}"


def evals_dir(run_dir: str | Path) -> Path:
    """``<run>/evals``: per-example dumps written during training."""
    return Path(run_dir) / EVALS


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` looks like a run folder: it has ``final/``, ``checkpoints/`` or
    ``result.json``."""
    path = Path(path)
    return final_dir(path).is_dir() or checkpoints_dir(path).is_dir() or result_path(path).is_file()


# ------------------------------------------------------------------------------------ checkpoints
def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """``checkpoint.json`` of checkpoint folder ``path`` as a dict (keys ``step``, ``world_size``,
    ``fingerprint``: the run's dotted config keys, ``files``: name -> {bytes, sha256}).

    Raises DataError naming the file when it is missing, unreadable or not a JSON object."""
    file = Path(path) / CHECKPOINT_META
    try:
        meta = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{file}: unreadable checkpoint metadata ({err})") from err
    if not isinstance(meta, dict):
        raise DataError(f"{file}: unreadable checkpoint metadata (not a JSON object)")
    return meta


@dataclass(frozen=True)
class CheckpointInfo:
    """One complete checkpoint of a run: ``step`` optimizer steps done, folder ``path``."""

    step: int
    path: Path

    def meta(self) -> dict[str, Any]:
        """Its checkpoint.json (see :func:`read_checkpoint_meta`; DataError when unreadable)."""
        return read_checkpoint_meta(self.path)

    def fingerprint(self) -> dict[str, Any]:
        """The run's dotted config keys the checkpoint was saved with (``model.hidden``,
        ``data.seq_len``, ``global_batch``, ...); empty when checkpoint.json records none."""
        value = self.meta().get("fingerprint")
        return value if isinstance(value, dict) else {}


def list_checkpoints(run_dir: str | Path) -> list[CheckpointInfo]:
    """The complete checkpoints of a run (a ``step_*`` folder holding checkpoint.json), by step.

    A run without a ``checkpoints/`` folder has none (empty list); nothing is read but names."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        CheckpointInfo(int(match.group(1)), path)
        for path in root.iterdir()
        if (match := STEP_DIR.match(path.name)) and path.is_dir() and (path / CHECKPOINT_META).is_file()
    ]
    return sorted(found, key=lambda info: info.step)


def latest_checkpoint(run_dir: str | Path) -> CheckpointInfo | None:
    """The complete checkpoint of the highest step, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# -------------------------------------------------------------------------------- config, result
def read_train_config(run_dir: str | Path) -> dict[str, Any] | None:
    """The TrainConfig dict a run trained with (``relscale.config.train_config_from_dict`` turns it
    back into a TrainConfig), or None for a run folder written before it was stored.

    Raises DataError naming the file when it exists but is unreadable."""
    return read_json_object(train_config_path(run_dir), "run config")


def read_result(run_dir: str | Path) -> dict[str, Any] | None:
    """``result.json`` of a run (``status``, ``steps``, ``tokens``, ``final_val_loss``, ...;
    relscale.train.TrainResult's fields plus ``fingerprint``), or None while the run is unfinished.

    Raises DataError naming the file when it is unreadable or has no ``status``."""
    path = result_path(run_dir)
    stored = read_json_object(path, "run result", hint="; move it away to train this run again")
    if stored is not None and "status" not in stored:
        raise DataError(f"{path}: not a run result (no status); move it away to train this run again")
    return stored


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl`` in order (empty when there is none). A last line cut
    short by a crash is skipped; any other unreadable line raises DataError naming file and line."""
    path = metrics_path(run_dir)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break  # written while the process died
            raise DataError(f"{path}:{number}: unreadable metrics record ({err})") from err
    return records


# ------------------------------------------------------------------------------------ model folder
def read_model_folder_config(model_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a model folder written by relscale.model_io.save_model: ``format``,
    ``model`` (ModelConfig dict), ``meta`` (tokens, FLOPs, seq_len, data_path, ...) and, when the
    tokenizer is stored, ``tokenizer`` = {"file": name relative to the folder, "eos_id": int}.

    Raises DataError naming config.json when it is missing, not JSON or not a relscale model."""
    path = Path(model_dir) / MODEL_CONFIG
    config = read_json_object(path, "model config")
    if config is None:
        raise DataError(f"{path}: no model config (expected a directory written by relscale train)")
    if config.get("format") != MODEL_FORMAT:
        raise DataError(f"{path}: not a relscale model config (format={config.get('format')!r})")
    return config


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a relscale model (config.json of format ``relscale-model``).

    A folder with weights whose config.json cannot be read raises DataError naming the file
    (it is a damaged model, not "no model")."""
    path = Path(path)
    config = path / MODEL_CONFIG
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if (path / WEIGHTS).is_file():
            raise DataError(f"{config}: unreadable model config ({err})") from err
        return False
    return isinstance(data, dict) and data.get("format") == MODEL_FORMAT


def model_tokenizer(model_dir: str | Path) -> tuple[Path, int | None] | None:
    """(path of the tokenizer.json stored next to the weights, EOS id), or None when the folder
    stores none (written before tokenizers were stored, or without one).

    The name in config.json is relative to ``model_dir`` and must stay inside it; raises
    DataError naming the file when config.json names a tokenizer that is missing or outside."""
    model_dir = Path(model_dir)
    entry = read_model_folder_config(model_dir).get("tokenizer")
    if entry is None:
        return None
    where = model_dir / MODEL_CONFIG
    name = entry.get("file") if isinstance(entry, dict) else None
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise DataError(f"{where}: tokenizer.file={name!r} must be a file name inside {model_dir}")
    path = model_dir / name
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file named by {where} is missing")
    eos_id = entry.get("eos_id")
    if eos_id is not None and (not isinstance(eos_id, int) or isinstance(eos_id, bool)):
        raise DataError(f"{where}: tokenizer.eos_id={eos_id!r} is not a token id")
    return path, eos_id
