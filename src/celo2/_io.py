"""Atomic file writes, shared by theta files, meta-training checkpoints and bench reports.

A reader (or a resumed run) sees either the old file or the complete new one,
never a partial write: data go to a temporary file ``.NAME.XXXXXXXX.tmp`` in the
same folder, are flushed to disk, then renamed over the target. A writer killed
in between leaves that temporary file behind; :func:`remove_stale_temps` removes
such files when a run folder is next opened under its lock.

The new file gets the permissions ``open()`` would give it (``0666 & ~umask``),
or the permissions of the file it replaces. A read-only target is refused: the
read-only bit says its owner wants it kept, and a rename would silently
override that.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

#: The name of a temporary file of :func:`atomic_write_bytes` (``tempfile.mkstemp``'s 8 random characters).
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (readers see the old or the new file, never a part).

    Args:
        path: the file to write; its folder is created if missing.
        data: the complete new content.

    Raises:
        PermissionError: ``path`` exists and is read-only (no write permission bit set).
        OSError: the folder cannot be created or written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    else:
        # Checked on the mode bits, not os.access: root may write anything, but
        # a file its owner made read-only is still meant to stay as it is.
        if not mode & 0o222 or not os.access(path, os.W_OK):
            raise PermissionError(13, "refusing to replace a read-only file", str(path))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: "str | os.PathLike[str]", text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8 (same arguments and errors)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def is_temp_file(path: "str | os.PathLike[str]") -> bool:
    """Whether ``path``'s name is that of a temporary file of :func:`atomic_write_bytes`."""
    return bool(_TEMP_NAME.match(Path(path).name))


def remove_stale_temps(folder: "str | os.PathLike[str]") -> list[Path]:
    """Remove the temporary files of :func:`atomic_write_bytes` under ``folder`` (recursively).

    Only safe while no writer is at work in ``folder``: call it holding the
    folder's lock (:class:`celo2._runlock.RunLock` does).

    Args:
        folder: the folder to clean; a missing folder has nothing to clean.

    Returns:
        The paths removed.
    """
    removed = []
    for p in sorted(Path(folder).rglob(".*.tmp")):
        if p.is_file() and is_temp_file(p):
            p.unlink()
            removed.append(p)
    return removed
