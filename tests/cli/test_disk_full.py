"""A full disk says "no space left on device: PATH" (one line, exit 2), never a riddle such as
"unexpected pos 704 vs 598", and leaves neither a partial file nor a changed old one behind.
The full device is the kernel's own /dev/full (every write fails with ENOSPC)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from relscale import atomic

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")


def full_disk_temp(path: Path) -> str:
    """atomic.make_temp on a full disk: the temporary file is /dev/full itself."""
    tmp = path.parent / f".{path.name}.full.tmp"
    os.symlink("/dev/full", tmp)
    return str(tmp)


def test_atomic_write_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "results.csv"
    target.write_text("old, finished\n")
    monkeypatch.setattr(atomic, "make_temp", full_disk_temp)
    with pytest.raises(OSError) as caught:
        atomic.atomic_write_text(target, "new" * 100_000)
    assert caught.value.errno == errno.ENOSPC
    assert f"no space left on device: {target}" in str(caught.value)
    assert target.read_text() == "old, finished\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv"]  # no temp file left


def test_the_cli_reports_a_full_disk_in_one_line(tmp_path, monkeypatch, cli):
    rows = ["N,D,loss"] + [f"{n},{20 * n},{2 + 400 / n ** 0.3 + 900 / (20 * n) ** 0.3:.5f}"
                           for n in (1e6, 2e6, 4e6, 8e6, 1.6e7, 3.2e7, 6.4e7)]
    table = tmp_path / "table.csv"
    table.write_text("\n".join(rows) + "\n")
    monkeypatch.setattr(atomic, "make_temp", full_disk_temp)
    code, _, err = cli("fit", table, "--params-col", "N", "--tokens-col", "D", "--loss-col", "loss",
                       "--what", "parametric", "--parametric-boot", "2", "--no-plots",
                       "--out", tmp_path / "fit")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert f"no space left on device: {tmp_path / 'fit'}" in lines[0]
    leftovers = [p for p in (tmp_path / "fit").rglob("*") if p.is_file() or p.is_symlink()] \
        if (tmp_path / "fit").exists() else []
    assert leftovers == []


def test_a_checkpoint_write_on_a_full_disk_says_so():
    """torch.save on a full disk raises "unexpected pos 704 vs 598"; the checkpoint writer names
    the file and the cause instead."""
    import torch

    from relscale.train.checkpoint import save_torch

    with pytest.raises(RuntimeError, match="unexpected pos"):  # the riddle, as torch says it
        torch.save({"x": torch.zeros(100_000)}, "/dev/full")
    with pytest.raises(OSError, match="no space left on device: /dev/full") as caught:
        save_torch({"x": torch.zeros(100_000)}, Path("/dev/full"))
    assert caught.value.errno == errno.ENOSPC
