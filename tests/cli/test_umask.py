"""Every output honours the umask: a file relscale writes gets 0o666 & ~umask, as ``open(path, "w")``
would give it (not mkstemp's private 0600), so teammates on a shared file system can read results."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from relscale.atomic import atomic_write, atomic_write_text, current_umask
from relscale.sweep.registry import create_exclusive
from relscale.sweep.results import INDEX_FILE, update_index
from tests.sweep.test_registry import finish, synthetic_sweep


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask{m:03o}")
def umask(request):
    before = os.umask(request.param)
    yield request.param
    os.umask(before)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_and_sweep_files_follow_the_umask(tmp_path, umask):
    expected = 0o666 & ~umask
    assert current_umask() == umask
    reference = tmp_path / "plain.txt"
    reference.write_text("x")  # what a plain open() gives: the independent reference
    assert mode(reference) == expected

    atomic_write_text(tmp_path / "a.txt", "hello")
    assert atomic_write(tmp_path / "b.bin", lambda tmp: Path(tmp).write_bytes(b"1"), overwrite=False)
    assert create_exclusive(tmp_path / "c.json", "{}")
    sweep = synthetic_sweep(tmp_path / "s", 2)
    claim = sweep.claim("w")
    finish(sweep, claim)
    update_index(sweep)
    written = [tmp_path / "a.txt", tmp_path / "b.bin", tmp_path / "c.json", sweep.root / "sweep.json",
               sweep.root / "runs.json", sweep.root / INDEX_FILE, *sweep.marks.iterdir()]
    second = sweep.claim("w")
    written.append(sweep.leases / second.record.run_id)
    for path in written:
        assert mode(path) == expected, (path, oct(mode(path)))


def test_model_weights_and_exports_follow_the_umask(tmp_path, umask):
    # safetensors replaces the temporary file it is given: the weights used to end up 0600.
    import torch

    from relscale.config import ModelConfig
    from relscale.model import Transformer
    from relscale.model_io import save_model

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden=16, layers=1, heads=2, max_seq_len=16))
    out = tmp_path / "final"
    save_model(model, out, {"tokens": 0})
    files = sorted(p for p in out.iterdir() if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    for path in files:
        assert mode(path) == 0o666 & ~umask, (path, oct(mode(path)))
