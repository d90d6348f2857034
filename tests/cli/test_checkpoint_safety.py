"""Checkpoints from someone else's hands: a planted pickle payload in DCP's ``.metadata`` is refused
(no code runs) on ``train --resume`` and ``eval --checkpoints``, and a checkpoint whose files
changed on disk (corrupted weights) is refused by checksum, naming the file, instead of resuming."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import pytest

from relscale.errors import DataError
from relscale.train import checkpoint as ckpt
from tests.cli.conftest import copy_run


class Payload:
    """Unpickling this runs ``exec``: it creates ``marker`` (a stand-in for any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def plant_payload(step_dir: Path, marker: Path) -> None:
    """Rewrite ``.metadata`` as a valid DCP Metadata that carries the payload, and update the
    checksums in checkpoint.json as an attacker with write access would."""
    metadata = ckpt.read_checkpoint_metadata(step_dir)
    metadata.storage_meta.modules = [Payload(marker)]  # any field: the payload runs at load time
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    meta = json.loads((step_dir / ckpt.META).read_text())
    meta["files"] = ckpt.checksum_files(step_dir)
    (step_dir / ckpt.META).write_text(json.dumps(meta))


def latest_step(run: Path) -> Path:
    step = ckpt.latest_checkpoint(run)
    assert step is not None
    return step


def test_the_payload_is_live_under_torchs_plain_reader(tmp_path, tiny_run):
    """The reference: torch's own FileSystemReader runs the planted code (so the refusals below
    are the restricted unpickler's doing, not a harmless payload)."""
    from torch.distributed.checkpoint import FileSystemReader

    run = copy_run(tiny_run, tmp_path / "run")
    marker = tmp_path / "marker"
    plant_payload(latest_step(run), marker)
    FileSystemReader(str(latest_step(run))).read_metadata()
    assert marker.exists()


def test_resume_refuses_a_planted_payload(tmp_path, tiny_run, cli):
    run = copy_run(tiny_run, tmp_path / "run")
    marker = tmp_path / "marker"
    plant_payload(latest_step(run), marker)
    with pytest.raises(ckpt.UnsafeCheckpointError, match=r"builtins\.exec"):
        ckpt.read_checkpoint_metadata(latest_step(run))
    code, _, err = cli("train", tiny_run.parent / "train.toml", f"out_dir={run}", "--resume")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ".metadata" in err and "refusing to load" in err and "builtins.exec" in err
    assert not marker.exists()


def test_non_tensor_values_load_with_weights_only(tmp_path, tiny_run):
    """A payload in a non-tensor value (DCP stores those as pickled bytes, and its default
    planner unpickles them with weights_only=False) is refused too."""
    import io

    import torch
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    marker = tmp_path / "marker"
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)
    buffer.seek(0)
    planner = ckpt.SafeLoadPlanner()
    planner.set_up_planner({"x": 1.0}, None, True)
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("x"), torch.Size([0]), MetadataIndex("x"),
                    torch.Size([0]), torch.Size([0]))
    with pytest.raises(ckpt.UnsafeCheckpointError, match="'x'"):
        planner.load_bytes(item, buffer)
    assert not marker.exists()


def test_eval_refuses_planted_metadata(tmp_path, tiny_run, cli):
    run = copy_run(tiny_run, tmp_path / "run", keep_result=True)
    marker = tmp_path / "marker"
    plant_payload(latest_step(run), marker)
    code, _, err = cli("eval", run, "--checkpoints", "--eval", "default", "--out", tmp_path / "evals")
    assert not marker.exists()
    assert code == 2 and "refusing to load" in err


def test_checksums_recorded_and_corrupted_weights_refused(tmp_path, tiny_run, cli):
    """Non-finite weights written over a checkpoint (same size) are refused, naming the file."""
    run = copy_run(tiny_run, tmp_path / "run")
    step = latest_step(run)
    files = json.loads((step / ckpt.META).read_text())["files"]
    assert {".metadata", "__0_0.distcp", "trainer_rank0.pt"} <= set(files)
    assert ckpt.verify_checkpoint(step) == len(files)
    shard = step / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = struct.pack("<4f", *[float("nan")] * 4)
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"__0_0\.distcp: corrupted"):
        ckpt.verify_checkpoint(step)
    code, out, err = cli("train", tiny_run.parent / "train.toml", f"out_dir={run}", "--resume")
    assert code == 2 and "__0_0.distcp: corrupted" in err and len(err.strip().splitlines()) == 1
    assert not (run / "result.json").exists()  # not "done"


def test_truncated_checkpoint_is_a_data_error_naming_the_folder(tmp_path, tiny_run):
    """Without recorded checksums (an older checkpoint), a truncated shard still ends in a
    DataError naming the checkpoint, not torch's CheckpointException (a BaseException)."""
    from relscale.config import load_train_config
    from relscale.model import Transformer

    run = copy_run(tiny_run, tmp_path / "run")
    step = latest_step(run)
    meta = json.loads((step / ckpt.META).read_text())
    del meta["files"]
    (step / ckpt.META).write_text(json.dumps(meta))
    shard = step / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    model = Transformer(load_train_config(tiny_run.parent / "train.toml").model)
    with pytest.raises(DataError, match=str(step)):
        ckpt.load_dcp_state(step, {"model": model.state_dict()})
