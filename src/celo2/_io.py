"""Atomic file writes, shared by theta files, meta-training checkpoints and bench reports.

A reader (or a resumed run) sees either the old file or the complete new one,
never a partial write: data go to a temporary file ``.NAME.XXXXXXXX.tmp`` in the
same folder, are flushed to disk, then renamed over the target. A writer killed
in between leaves that temporary file behind; :func:`remove_stale_temps` removes
such files when a run folder is next opened under its lock.

Only a regular file (or nothing) is replaced: a FIFO, a device node, a socket,
a folder or a symbolic link at the target is refused, since a rename would put
a regular file in its place (as root, ``/dev/null`` itself).

The new file gets the permissions ``open()`` would give it (``0666 & ~umask``),
or the permissions of the file it replaces. A read-only target is refused: the
read-only bit says its owner wants it kept, and a rename would silently
override that.

Every ``OSError`` raised here names the file it was about (``exc.filename``):
a full disk while the temporary file is written reads ``PATH: No space left on
device``, and the target is left as it was.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable

#: The name of a temporary file of :func:`atomic_write_bytes` (``tempfile.mkstemp``'s 8 random characters).
_TEMP_NAME = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")

#: What :func:`check_replaceable` calls each kind of file that is not a regular one.
_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _named(exc: OSError, path: Path) -> OSError:
    """``exc`` with ``path`` as its filename when it names none (``os.write`` on a full disk names nothing)."""
    if exc.filename is not None:
        return exc
    named = type(exc)(exc.errno, exc.strerror or str(exc), str(path))
    named.__cause__ = exc
    return named


def check_replaceable(path: "str | os.PathLike[str]") -> int:
    """The mode a new file at ``path`` gets; refuses a target that must not be replaced.

    Args:
        path: the file about to be written.

    Returns:
        The permission bits for the new file: those of the regular file it replaces, or
        ``0666 & ~umask`` when ``path`` does not exist.

    Raises:
        FileExistsError: ``path`` is not a regular file (a symbolic link, FIFO, device node,
            socket or folder); ``exc.filename`` is ``path`` and ``exc.strerror`` says what it is.
        PermissionError: ``path`` is a read-only file (no write permission bit set).
    """
    path = Path(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0o666 & ~_umask()
    for test, kind in _KINDS:
        if test(st.st_mode):
            raise FileExistsError(errno.EEXIST, f"refusing to replace {kind} with a regular file", str(path))
    mode = stat.S_IMODE(st.st_mode)
    # Checked on the mode bits, not os.access alone: root may write anything, but
    # a file its owner made read-only is still meant to stay as it is.
    if not mode & 0o222 or not os.access(path, os.W_OK):
        raise PermissionError(errno.EACCES, "refusing to replace a read-only file", str(path))
    return mode


def write_temp(path: "str | os.PathLike[str]", data: bytes) -> Path:
    """Write ``data`` to a new temporary file beside ``path``, flushed to disk, ready to be renamed over it.

    Args:
        path: the file the temporary one will replace (checked with :func:`check_replaceable`);
            its folder is created if missing.
        data: the complete new content.

    Returns:
        The temporary file (removed again if writing it fails).

    Raises:
        OSError: as :func:`check_replaceable`, or the folder cannot be created or written (a full
            disk, no permission); ``exc.filename`` names ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = check_replaceable(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _named(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _named(exc, path) from None
        raise
    return Path(tmp)


def atomic_write_group(items: "Iterable[tuple[str | os.PathLike[str], bytes]]",
                       before_commit: "Callable[[], None] | None" = None) -> None:
    """Write several files as one unit: every one staged first, then all renamed into place in order.

    A failure while staging (a full disk, a target that must not be replaced) leaves every
    target as it was. Once all are staged only renames remain, which need no space.

    Args:
        items: ``(path, data)`` pairs; the renames happen in this order.
        before_commit: called once everything is staged, before the first rename (e.g. to keep
            a copy of a file about to be replaced); an error there also leaves every target as it was.

    Raises:
        OSError: as :func:`write_temp`; ``exc.filename`` names the file concerned.
    """
    staged: list[tuple[Path, Path]] = []
    try:
        for path, data in items:
            staged.append((write_temp(path, data), Path(path)))
        if before_commit is not None:
            before_commit()
        while staged:
            tmp, path = staged[0]
            try:
                os.replace(tmp, path)
            except OSError as exc:
                raise _named(exc, path) from None
            staged.pop(0)
    finally:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (readers see the old or the new file, never a part).

    Args:
        path: the file to write; its folder is created if missing.
        data: the complete new content.

    Raises:
        FileExistsError: ``path`` exists and is not a regular file (symbolic link, FIFO, device, ...).
        PermissionError: ``path`` exists and is read-only (no write permission bit set).
        OSError: the folder cannot be created or written (e.g. a full disk); ``exc.filename`` is ``path``.
    """
    atomic_write_group([(path, data)])


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
        if p.is_file() and not p.is_symlink() and is_temp_file(p):
            p.unlink()
            removed.append(p)
    return removed
