"""Atomic file writes, used by every part: a reader sees the old file or the new one, never half,
and a crash (or a full disk) mid-write leaves no partial file behind; and the one reader of the
small JSON files those writes produce. Pure standard library, so ``relscale.fit`` and the on-disk
contracts can use it without importing torch.

Files get the mode a plain ``open(path, "w")`` would give them (``0o666 & ~umask``): the temporary
file that ``tempfile.mkstemp`` creates is private (0600), and results on a shared file system must
stay readable by the teammates the umask admits.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux >= 4.7).

    ``os.umask`` can only be read by setting it, which for a moment gives files created by other
    threads the wrong mode; /proc/self/status avoids that window. Returns e.g. 0o022."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 with the umask's bits removed."""
    return 0o666 & ~current_umask()


def no_space_message(err: OSError, path: str | Path) -> str | None:
    """"no space left on device: PATH" for a full disk (or quota), else None."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device: {path}"
    return None


def make_temp(path: Path) -> str:
    """A new, empty temporary file next to ``path`` (same file system, so a rename is atomic),
    with the umask's mode; returns its name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, default_file_mode())
    finally:
        os.close(fd)
    return tmp


def atomic_write(
    path: str | Path, write: Callable[[str], Any], *, overwrite: bool = True, fsync: bool = False
) -> bool:
    """``write(tmp)`` into a temporary file next to ``path``, then move it into place.

    With ``overwrite=False`` an existing ``path`` is kept (a finished result is never replaced)
    and False is returned; the move is then a hard link, which fails atomically if the target
    exists, also on NFS. ``fsync`` flushes the data to disk before the move (for files that
    other machines read on a shared file system). The file gets mode ``0o666 & ~umask``.

    Raises OSError as the file system does; a full disk (ENOSPC, EDQUOT) is re-raised as
    ``OSError(errno, "no space left on device: PATH")`` so that the one-line error names the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        tmp = make_temp(path)
        write(tmp)
        # again after writing: a writer may have replaced the temporary file (safetensors does),
        # which would leave mkstemp's private 0600 or the writer's own mode on the result
        os.chmod(tmp, default_file_mode())
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
    except OSError as err:
        message = no_space_message(err, path)
        if message is not None and message not in str(err):
            raise OSError(err.errno, message) from err
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = True, fsync: bool = False) -> bool:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
                        overwrite=overwrite, fsync=fsync)


def read_json_object(path: str | Path, what: str, hint: str = "") -> dict[str, Any] | None:
    """The JSON object stored in ``path``, or None when there is no such file.

    ``what`` names the file's role in errors ("run result", "manifest"); ``hint`` is appended to
    them (e.g. what to do about it). Raises relscale.errors.DataError naming the file when it is not
    valid UTF-8 JSON or holds something other than an object."""
    from relscale.errors import DataError

    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable {what} ({err}){hint}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: unreadable {what} (a JSON {type(data).__name__}, not an object){hint}")
    return data


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (the checksums of prepared data and of
    checkpoints). Raises OSError as the file system does."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()
