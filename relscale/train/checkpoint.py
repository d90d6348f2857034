"""Resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout: ``out_dir/checkpoints/step_0000100/`` holds the DCP files of the model and optimizer
(sharded: every rank writes its own shards; a plain single process writes them all), plus
``trainer_rank<r>.pt`` per rank (step, data-loader position, RNG states) and ``checkpoint.json``
(step, config fingerprint). A checkpoint is written under a temporary name and renamed by rank 0
after every rank has finished, so a ``step_*`` folder is always complete; older ones are removed
only after the new one is in place.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from relscale.errors import ConfigError, DataError
from relscale.train.parallel import DistEnv, barrier

STEP_DIR = re.compile(r"^step_(\d{7,})$")
META = "checkpoint.json"


def checkpoint_root(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir: Path, step: int) -> Path:
    return checkpoint_root(out_dir) / f"step_{step:07d}"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The complete checkpoint of the highest step, or None."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    found = [(step, p) for step, p in found if (p / META).is_file()]
    return max(found)[1] if found else None


@contextlib.contextmanager
def _quiet_single_process(env: DistEnv):
    """DCP warns that it assumes a single process when there is no process group: intended here."""
    with warnings.catch_warnings():
        if not env.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    meta: dict[str, Any],
    env: DistEnv,
) -> Path:
    """Write the checkpoint after optimizer step ``step`` (a count: steps done so far)."""
    final = step_dir(out_dir, step)
    tmp = final.with_name(f".tmp_{final.name}")
    if env.is_main:
        if tmp.exists():  # left by a run that died while writing
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(env)
    model_state, optim_state = get_state_dict(model, optimizer)
    with _quiet_single_process(env):
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    torch.save({**trainer_state, "rng": rng_state(env.device)}, tmp / f"trainer_rank{env.rank}.pt")
    barrier(env)  # every rank has written its part
    if env.is_main:
        (tmp / META).write_text(json.dumps({**meta, "step": step, "world_size": env.world_size}, indent=2))
        replaced = final.with_name(f".old_{final.name}")
        if final.exists():  # the same step written again: swap, so a complete one always exists
            final.rename(replaced)
        tmp.rename(final)
        shutil.rmtree(replaced, ignore_errors=True)
        for old in checkpoint_root(out_dir).iterdir():
            match = STEP_DIR.match(old.name)
            if match and int(match.group(1)) < step:
                shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def read_meta(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path / META}: unreadable checkpoint metadata ({err})") from err


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv
) -> dict[str, Any]:
    """Restore model and optimizer in place (any sharding); returns this rank's trainer state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    with _quiet_single_process(env):
        dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    # A different world size at resume: every rank takes rank 0's trainer state (the loader
    # position is the same on every rank; only the RNG streams are per rank).
    own = path / f"trainer_rank{env.rank}.pt"
    trainer_file = own if own.is_file() else path / "trainer_rank0.pt"
    if not trainer_file.is_file():
        raise DataError(f"{path}: no trainer state ({trainer_file.name}); the checkpoint is incomplete")
    trainer_state = torch.load(trainer_file, weights_only=True)
    set_rng_state(trainer_state.pop("rng"), env.device)
    return trainer_state


def check_compatible(path: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint of a different run (naming the keys that differ)."""
    saved = read_meta(path).get("fingerprint", {})
    differ = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differ:
        details = "; ".join(
            f"{k}: checkpoint {saved.get(k)!r}, config {fingerprint.get(k)!r}" for k in differ
        )
        raise ConfigError(
            f"{path}: the checkpoint belongs to a different run ({details}); use another out_dir"
        )
