"""Atomic file writes, used by every room: a reader sees the old file or the new one, never half,
and a crash (or a full disk) mid-write leaves no partial file behind. Pure standard library, so
``relscale.fit`` can use it without importing torch."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(
    path: str | Path, write: Callable[[str], Any], *, overwrite: bool = True, fsync: bool = False
) -> bool:
    """``write(tmp)`` into a temporary file next to ``path``, then move it into place.

    With ``overwrite=False`` an existing ``path`` is kept (a finished result is never replaced)
    and False is returned; the move is then a hard link, which fails atomically if the target
    exists, also on NFS. ``fsync`` flushes the data to disk before the move (for files that
    other machines read on a shared file system)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = True, fsync: bool = False) -> bool:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
                        overwrite=overwrite, fsync=fsync)
