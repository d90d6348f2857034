"""Model discovery: which models a path holds, and what is known about each before loading it.

What can be evaluated (:func:`discover_models`):
* a model folder written by :mod:`relscale.model_io` (``<run>/final``);
* a Hugging Face Llama/Qwen3 folder (:mod:`relscale.eval.hf`);
* a run folder (the trainer's ``out_dir``): its final weights, and with ``checkpoints`` also its
  resumable checkpoints (model id ``<run>@step_<step>``);
* a sweep folder: every finished run (model id = the run id, budget from the results index);
* a Hugging Face cache repository ``models--ORG--NAME`` (model id NAME), and a folder holding
  any of these (e.g. downloaded released checkpoints), each under its folder name.

Run and sweep folders are read only through their owners' torch-free contracts,
:mod:`relscale.train.run_dir` and :mod:`relscale.sweep.layout`; this module knows none of their
file names. A folder named ``isoflop-<budget>-d<d>-L<L>-B<B>-<sweep>`` (the released IsoFLOP
suite's names) gives the budget, and for final weights without recorded tokens the training
tokens and FLOPs (:func:`relscale.eval.hf.meta_from_name`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relscale.atomic import read_json_object
from relscale.config import ModelConfig, from_dict, model_config_from_dict
from relscale.errors import DataError
from relscale.eval import hf
from relscale.eval.options import RunOptions
from relscale.sweep import layout as sweep_layout
from relscale.train import run_dir as run_folder

KINDS = ("relscale", "hf", "dcp", "live")


@dataclass
class ModelEntry:
    """One model to evaluate.

    ``kind``: "relscale" (a model folder), "hf" (a Hugging Face folder), "dcp" (a run's
    resumable checkpoint folder) or "live" (the model in memory during training); ``path``: its
    folder; ``model_id``: the dumps' model id (file name); ``step``: optimizer steps of a
    checkpoint (None for final weights); ``run_dir``: the run folder it belongs to, if any;
    ``extra``: columns known from a sweep's results index (``budget`` in FLOPs)."""

    kind: str
    path: Path
    model_id: str
    step: int | None = None
    run_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def is_relscale_model(path: Path) -> bool:
    """Whether ``path`` is a model folder written by :mod:`relscale.model_io`.

    A folder with weights whose config.json cannot be read raises DataError naming the file (a
    damaged model, not "no model")."""
    path = Path(path)
    if (path / hf.INDEX_FILE).is_file() and (path / run_folder.MODEL_CONFIG).is_file():
        try:  # sharded weights: the contract only knows model.safetensors, so check the JSON here
            json.loads((path / run_folder.MODEL_CONFIG).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path / run_folder.MODEL_CONFIG}: unreadable model config ({err})") from err
    return run_folder.is_model_folder(path)


def checkpoint_entries(run_dir: Path, run_id: str, extra: dict | None = None) -> list[ModelEntry]:
    """The complete resumable checkpoints of run folder ``run_dir`` as "dcp" entries, by step,
    with model ids ``<run_id>@step_<step, 7 digits>``."""
    return [
        ModelEntry("dcp", info.path, f"{run_id}@step_{info.step:07d}", info.step, run_dir, dict(extra or {}))
        for info in run_folder.list_checkpoints(run_dir)
    ]


def run_entries(run_dir: Path, run_id: str, checkpoints: bool, extra: dict | None = None) -> list[ModelEntry]:
    """The models of one run folder: its checkpoints (when ``checkpoints``), then its final weights."""
    entries = checkpoint_entries(run_dir, run_id, extra) if checkpoints else []
    final = run_folder.final_dir(run_dir)
    if is_relscale_model(final):
        entries.append(ModelEntry("relscale", final, run_id, None, run_dir, dict(extra or {})))
    return entries


def sweep_runs(sweep_dir: Path) -> list[tuple[str, Path, dict]]:
    """(run id, run folder, results-index row) of the finished runs of a sweep, in index order,
    then runs marked finished that the index does not list yet (:func:`relscale.sweep.layout.
    finished_runs`; a damaged index is rebuilt from the run marks with a warning)."""
    return [(run.run_id, run.run_dir, run.row) for run in sweep_layout.finished_runs(sweep_dir)]


def _hub_entry(repo: Path, required: bool = False) -> ModelEntry | None:
    """The checkpoint of a hub-cache repository ``models--ORG--NAME``, model id NAME; None (or,
    when ``required``, a DataError) if its snapshot is not a Hugging Face model."""
    snapshot = hf.hub_snapshot(repo)
    if not hf.is_hf_dir(snapshot):
        if required:
            raise DataError(f"{snapshot}: not a Hugging Face model (no config.json with a model_type)")
        return None
    return ModelEntry("hf", snapshot, hf.model_name(repo))


def _folder_entries(folder: Path, checkpoints: bool) -> list[ModelEntry]:
    """The models directly inside a folder of checkpoints -- Hugging Face folders, hub-cache
    repositories, relscale model folders and runs -- in name order, each under its folder name;
    anything else in the folder is ignored."""
    entries: list[ModelEntry] = []
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if is_relscale_model(child):
            entries.append(ModelEntry("relscale", child, child.name))
        elif hf.is_hf_dir(child):
            entries.append(ModelEntry("hf", child, hf.model_name(child)))
        elif hf.is_hub_repo(child):
            entry = _hub_entry(child)
            entries += [entry] if entry is not None else []
        elif is_relscale_model(run_folder.final_dir(child)):
            entries += run_entries(child, child.name, checkpoints)
    return entries


def discover_models(paths: list[str | Path], *, checkpoints: bool = False) -> list[ModelEntry]:
    """The models under ``paths``, in argument order: relscale model folders, Hugging Face
    folders (or hub-cache repositories), run folders, sweep folders, or a folder holding any of
    the first four. ``checkpoints``: include runs' resumable checkpoints.

    Raises DataError naming a path that is none of these, a sweep with no finished runs, a run
    with no weights, or two models with one id."""
    entries: list[ModelEntry] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if is_relscale_model(path):
            in_run = path.name == run_folder.FINAL
            run_id = path.parent.name if in_run else path.name
            if checkpoints and in_run:
                entries += checkpoint_entries(path.parent, run_id)
            entries.append(ModelEntry("relscale", path, run_id, None, path.parent if in_run else None))
        elif hf.is_hf_dir(path):
            entries.append(ModelEntry("hf", path, hf.model_name(path)))
        elif hf.is_hub_repo(path):
            entries.append(_hub_entry(path, required=True))
        elif sweep_layout.is_sweep_dir(path):
            runs = sweep_runs(path)
            if not runs:
                raise DataError(f"{path}: sweep directory with no finished runs")
            for run_id, run_dir, row in runs:
                found = run_entries(run_dir, run_id, checkpoints, {"budget": row.get("budget")})
                if not found:
                    final = run_folder.final_dir(run_dir)
                    print(f"relscale eval: {run_id}: finished but no weights in {final}; skipped")
                entries += found
        elif run_folder.final_dir(path).is_dir() or run_folder.checkpoints_dir(path).is_dir():
            found = run_entries(path, path.name, checkpoints)
            if not found:
                raise DataError(
                    f"{path}: run has no final weights (pass --checkpoints for its DCP checkpoints)"
                )
            entries += found
        elif path.is_dir() and (found := _folder_entries(path, checkpoints)):
            entries += found
        elif path.exists():
            raise DataError(f"{path}: not a model, Hugging Face, run or sweep folder, nor a folder of them")
        else:
            raise DataError(f"{path}: no such model directory")
    ids = [e.model_id for e in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(
            f"two models share the id(s) {duplicates}; evaluate them in separate calls with --out"
        )
    return entries


# ------------------------------------------------------------------------- before loading weights
@dataclass
class ModelInfo:
    """What is known about a model before its weights are loaded: its ``cfg``, ``meta`` (training
    tokens, FLOPs, seq_len, budget, data_path, ... as saved, then overridden) and ``data_dir``
    (the prepared data its default eval set and tokenizer may come from; None when unknown)."""

    cfg: ModelConfig
    meta: dict[str, Any]
    data_dir: Path | None


def resolve_data_dir(explicit: Path | None, meta: dict[str, Any]) -> Path | None:
    """``explicit`` (``--data``) if given, else the meta's ``data_path``, else None."""
    if explicit is not None:
        return Path(explicit)
    raw = meta.get("data_path")
    return Path(raw) if raw else None


def read_info(entry: ModelEntry, opts: RunOptions) -> ModelInfo:
    """Config and meta of a model before its weights are loaded: the saved meta, then
    ``opts.meta`` (``--meta``), then what an IsoFLOP folder name adds; ``opts.sets.data_dir``
    (``--data``) overrides the saved data path.

    Raises DataError naming the file for an unreadable config or a name that contradicts it."""
    if entry.kind == "relscale":
        config = run_folder.read_model_folder_config(entry.path)
        cfg = model_config_from_dict(config["model"])
        meta = dict(config.get("meta") or {})
    elif entry.kind == "hf":
        cfg = hf.hf_to_model_config(hf.read_hf_config(entry.path), str(entry.path / "config.json"))
        meta = _read_hf_meta(entry.path / hf.META_FILE)
    else:
        cfg, meta = _checkpoint_info(entry)
    meta = {**meta, **opts.meta}
    # budget, tokens and FLOPs of an isoflop-<budget>-d<d>-L<L>-B<B>-<sweep> checkpoint; a run's
    # intermediate checkpoint did not train the whole budget: no tokens from the name
    meta = hf.meta_from_name(_entry_name(entry), cfg, meta, str(entry.path), tokens=entry.kind != "dcp")
    return ModelInfo(cfg, meta, resolve_data_dir(opts.sets.data_dir, meta))


def _read_hf_meta(path: Path) -> dict[str, Any]:
    """The relscale meta stored next to an exported Hugging Face checkpoint (empty when absent);
    DataError naming the file when it is not a JSON object."""
    return read_json_object(path, "model meta") or {}


def _entry_name(entry: ModelEntry) -> str:
    """The folder name that describes a model: its own (a hub snapshot: the repository name),
    or the run folder's for a run's final weights and checkpoints."""
    if entry.kind == "hf":
        return hf.model_name(entry.path)
    return (entry.run_dir or entry.path).name


def _checkpoint_info(entry: ModelEntry) -> tuple[ModelConfig, dict[str, Any]]:
    """Model config and meta of a resumable checkpoint, from the run fingerprint it was saved with."""
    fingerprint = run_folder.read_checkpoint_meta(entry.path).get("fingerprint") or {}
    model_keys = {k.split(".", 1)[1]: v for k, v in fingerprint.items() if k.startswith("model.")}
    if not model_keys:
        raise DataError(
            f"{entry.path / run_folder.CHECKPOINT_META}: no model fingerprint to rebuild the model from"
        )
    cfg = from_dict(ModelConfig, model_keys, "model")
    cfg.validate()
    seq_len = fingerprint.get("data.seq_len")
    meta: dict[str, Any] = {"seq_len": seq_len}
    final = run_folder.final_dir(entry.run_dir) if entry.run_dir else None
    if final is not None and is_relscale_model(final):
        meta["data_path"] = (run_folder.read_model_folder_config(final).get("meta") or {}).get("data_path")
    if seq_len and fingerprint.get("global_batch") and entry.step is not None:
        meta["tokens"] = entry.step * fingerprint["global_batch"] * seq_len
    return cfg, meta


def own_tokenizer(entry: ModelEntry) -> tuple[Path, int | None] | None:
    """(tokenizer.json, EOS id) stored next to a relscale model's weights (for a run's
    checkpoints: its final/ folder's), so a moved run folder needs no prepared data; None for
    other models or a folder that stores none. DataError as
    :func:`relscale.train.run_dir.model_tokenizer`."""
    if entry.kind == "relscale":
        folder = entry.path
    elif entry.kind == "dcp" and entry.run_dir is not None:
        folder = run_folder.final_dir(entry.run_dir)
    else:
        return None
    return run_folder.model_tokenizer(folder) if is_relscale_model(folder) else None
