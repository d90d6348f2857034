"""Resumable checkpoints with torch.distributed.checkpoint (DCP).

Layout (named in :mod:`relscale.train.run_dir`, the torch-free contract readers use):
``out_dir/checkpoints/step_0000100/`` holds the DCP files of the model and optimizer
(sharded: every rank writes its own shards; a plain single process writes them all), plus
``trainer_rank<r>.pt`` per rank (step, data-loader position, RNG states) and ``checkpoint.json``
(step, config fingerprint, and the size and sha256 of every other file of the folder). A
checkpoint is written under a temporary name and renamed by rank 0 after every rank has finished,
so a ``step_*`` folder is always complete; older ones are removed only after the new one is in place.

Reading is safe against a planted checkpoint: torch's DCP reader unpickles ``.metadata`` with plain
``pickle.load`` (which runs any code a crafted file names) and un-pickles non-tensor values with
``torch.load(weights_only=False)``. Every DCP read in relscale goes through :func:`load_dcp_state`
(and :func:`read_checkpoint_metadata`), which verify the checksums, admit only DCP's own metadata
classes in ``.metadata`` and load non-tensor values with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from relscale.atomic import sha256_file
from relscale.errors import ConfigError, DataError
from relscale.train import run_dir
from relscale.train.parallel import DistEnv, barrier
from relscale.train.run_dir import CHECKPOINT_META as META
from relscale.train.run_dir import STEP_DIR
from relscale.train.run_dir import read_checkpoint_meta as read_meta

# --------------------------------------------------------------------------- safe reading of DCP files

# The only globals a DCP ``.metadata`` pickle of torch 2.x names (checked on torch 2.13): DCP's own
# metadata dataclasses, torch.Size, dtypes and layouts, and the checkpoint path. Nothing callable
# beyond these constructors and lookups, so a crafted file cannot run code.
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class UnsafeCheckpointError(DataError):
    """A checkpoint file names a Python object outside the checkpoint format (a planted payload)."""


class _MetadataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the DCP metadata classes (and torch dtypes)."""

    def __init__(self, file: io.BufferedIOBase, path: Path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.path}: refusing to load the checkpoint: it names {module}.{name}, which is not part "
            "of the checkpoint format (a planted or foreign file; only load checkpoints you trust)"
        )


def read_checkpoint_metadata(path: str | Path, rank: int | None = None) -> Metadata:
    """The DCP ``Metadata`` of checkpoint folder ``path`` (``.metadata``, or ``__<rank>.metadata``),
    unpickled with only DCP's metadata classes admitted.

    Raises DataError naming the file when it is missing or unreadable, UnsafeCheckpointError (a
    DataError) when it names any other Python object."""
    name = ".metadata" if rank is None else f"__{rank}.metadata"
    file = Path(path) / name
    try:
        with open(file, "rb") as stream:
            metadata = _MetadataUnpickler(stream, file).load()
    except UnsafeCheckpointError:
        raise
    except FileNotFoundError as err:
        raise DataError(f"{file}: missing; {path} is not a complete checkpoint") from err
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError,
            IndexError, KeyError) as err:
        raise DataError(f"{file}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from err
    if not isinstance(metadata, Metadata):
        raise DataError(f"{file}: not DCP checkpoint metadata (holds a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch's ``FileSystemReader`` with ``.metadata`` read by :func:`read_checkpoint_metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's DCP Metadata via :func:`read_checkpoint_metadata` (DataError naming it)."""
        metadata = read_checkpoint_metadata(Path(self.path), kwargs.get("rank"))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor values (optimizer hyperparameters, counters) are
    un-pickled with ``torch.load(weights_only=True)`` instead of ``weights_only=False``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        """Un-pickle one non-tensor value with ``weights_only=True``; UnsafeCheckpointError otherwise."""
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint value {read_item.dest_index.fqn!r}: {str(err).splitlines()[0]}"
            ) from err
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def checksum_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size (bytes) and sha256 of every file in a checkpoint folder except checkpoint.json."""
    return {
        entry.name: {"bytes": entry.stat().st_size, "sha256": sha256_file(entry)}
        for entry in sorted(folder.iterdir(), key=lambda e: e.name)
        if entry.is_file() and entry.name != META
    }


def verify_checkpoint(path: str | Path) -> int:
    """Check every file of a checkpoint folder against the sizes and sha256 in its checkpoint.json.

    Returns the number of files checked (0 for a checkpoint written before checksums were
    recorded). Raises DataError naming the first missing, truncated or corrupted file."""
    path = Path(path)
    files = read_meta(path).get("files")
    if not isinstance(files, dict):
        return 0
    for name, record in files.items():
        file = path / name
        try:
            size = file.stat().st_size
        except FileNotFoundError:
            raise DataError(f"{file}: missing (listed in {path / META}); "
                            "the checkpoint is incomplete") from None
        if size != record.get("bytes"):
            raise DataError(f"{file}: {size} bytes, the checkpoint recorded {record.get('bytes')} "
                            "(truncated or replaced); delete the checkpoint folder to start over")
        if sha256_file(file) != record.get("sha256"):
            raise DataError(f"{file}: corrupted (sha256 differs from {path / META}); delete the "
                            "checkpoint folder to start over")
    return len(files)


def _checkpoint_error(path: Path, err: CheckpointException) -> DataError:
    """A DCP CheckpointException (a BaseException) as a one-line DataError naming the folder."""
    causes = [exc for exc, _ in err.failures.values()] if isinstance(err.failures, dict) else []
    reason = "; ".join(f"{type(c).__name__}: {str(c).splitlines()[0] if str(c) else ''}" for c in causes[:2])
    for cause in causes:
        if isinstance(cause, DataError):
            return cause
    return DataError(f"{path}: unreadable checkpoint ({reason or 'DCP load failed'})")


def load_dcp_state(path: str | Path, state: dict[str, Any], *, verify: bool = True) -> None:
    """Load DCP checkpoint folder ``path`` into ``state`` in place (any sharding), safely.

    The one DCP read of relscale (train --resume, sweep take-over, eval --checkpoints): checks the
    checksums of checkpoint.json when present (``verify``), reads ``.metadata`` with the restricted
    unpickler and non-tensor values with ``weights_only=True``. Raises DataError (naming the file)
    for a missing, truncated, corrupted or unsafe checkpoint, never torch's CheckpointException."""
    path = Path(path)
    if verify and (path / META).is_file():
        verify_checkpoint(path)
    read_checkpoint_metadata(path)  # a missing, unreadable or unsafe .metadata, named on its own
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
    except CheckpointException as err:
        raise _checkpoint_error(path, err) from None


def checkpoint_root(out_dir: Path) -> Path:
    """``out_dir/checkpoints`` (see :func:`relscale.train.run_dir.checkpoints_dir`)."""
    return run_dir.checkpoints_dir(out_dir)


def step_dir(out_dir: Path, step: int) -> Path:
    """``out_dir/checkpoints/step_XXXXXXX`` (see :func:`relscale.train.run_dir.step_dir`)."""
    return run_dir.step_dir(out_dir, step)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The folder of the complete checkpoint of the highest step, or None (see
    :func:`relscale.train.run_dir.latest_checkpoint`, which also gives the step)."""
    info = run_dir.latest_checkpoint(out_dir)
    return None if info is None else info.path


@contextlib.contextmanager
def _quiet_single_process(env: DistEnv):
    """DCP warns that it assumes a single process when there is no process group: intended here."""
    with warnings.catch_warnings():
        if not env.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states: ``{"cpu": ByteTensor}`` plus ``"cuda"`` on a CUDA device."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore RNG states saved by :func:`rng_state` (the CUDA one only on a CUDA device)."""
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
    try:
        with _quiet_single_process(env):
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    except CheckpointException as err:
        raise _save_error(tmp, err) from None
    save_torch({**trainer_state, "rng": rng_state(env.device)}, tmp / f"trainer_rank{env.rank}.pt")
    barrier(env)  # every rank has written its part
    if env.is_main:
        # Checksums of every file: a checkpoint damaged on disk is refused at load, naming the file,
        # instead of resuming from corrupted (e.g. non-finite) weights.
        record = {**meta, "step": step, "world_size": env.world_size, "files": checksum_files(tmp)}
        (tmp / META).write_text(json.dumps(record, indent=2))
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


def _is_disk_full(err: BaseException) -> bool:
    """ENOSPC/EDQUOT, or torch's zip writer's way of saying it ("unexpected pos 704 vs 598")."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, RuntimeError) and "unexpected pos" in str(err)


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``; a full disk raises ``OSError(ENOSPC, "no space left on device:
    PATH")`` instead of torch's "unexpected pos" RuntimeError."""
    try:
        torch.save(obj, path)
    except (OSError, RuntimeError) as err:
        if _is_disk_full(err):
            raise OSError(errno.ENOSPC, f"no space left on device: {path}") from err
        raise


def _save_error(folder: Path, err: CheckpointException) -> BaseException:
    """A failed DCP save as an ordinary exception: a full disk names the folder."""
    causes = [exc for exc, _ in err.failures.values()] if isinstance(err.failures, dict) else []
    if any(_is_disk_full(cause) for cause in causes):
        return OSError(errno.ENOSPC, f"no space left on device: {folder}")
    first = causes[0] if causes else err
    return RuntimeError(f"{folder}: writing the checkpoint failed ({type(first).__name__}: {first})")


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv
) -> dict[str, Any]:
    """Restore model and optimizer in place (any sharding); returns this rank's trainer state."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    load_dcp_state(path, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    # A different world size at resume: every rank takes rank 0's trainer state (the loader
    # position is the same on every rank; only the RNG streams are per rank).
    own = path / f"trainer_rank{env.rank}.pt"
    trainer_file = own if own.is_file() else path / "trainer_rank0.pt"
    if not trainer_file.is_file():
        raise DataError(f"{path}: no trainer state ({trainer_file.name}); the checkpoint is incomplete")
    try:
        trainer_state = torch.load(trainer_file, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        reason = (
            "not a trainer state relscale wrote, or one holding objects other than tensors"
            if isinstance(err, pickle.UnpicklingError) else str(err).splitlines()[0][:200]
        )
        raise DataError(f"{trainer_file}: unreadable trainer state ({type(err).__name__}: {reason})") from err
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
