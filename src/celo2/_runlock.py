"""One process per run folder: an ``fcntl.flock`` on ``RUN_DIR/.celo2.lock``.

``celo2 meta-train``, ``celo2 bench`` and ``celo2 demo`` open their output folder
through :class:`RunLock`. The kernel holds the lock for as long as the file
descriptor is open, and drops it when the process dies however it dies, so a
lock never outlives its process. The file also records its holder (pid, host,
command, start time): a second process is told who holds the folder, and a
process that finds the record of a holder that is gone (a killed run) says that
it takes the folder over. Under the lock, temporary files of interrupted atomic
writes are removed (:func:`celo2._io.remove_stale_temps`).

A command that names itself (``kind``) writes only into a folder it may call its
own: one that is missing or empty, one carrying its marker ``RUN_DIR/.celo2-run``
(written when the folder is first taken), or one its ``adopt`` test recognises as
its own work from before markers existed. Any other folder is refused before
anything in it is created or changed: a user's files of the same names are never
overwritten.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from celo2._io import atomic_write_text, remove_stale_temps

LOCK_NAME = ".celo2.lock"
#: The marker of a folder a celo2 command made its run folder: JSON ``{"command": KIND}``.
MARKER_NAME = ".celo2-run"


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: not creatable, not writable, a file, in use, ..."""


class RunFolderLockedError(RunFolderError):
    """Another live process holds the run folder's lock (the message names it)."""


def run_folder_kind(folder: "str | os.PathLike[str]") -> str | None:
    """The command whose marker ``folder`` carries (``"bench"``, ``"demo"``, ``"meta-train"``), or None.

    Args:
        folder: a folder (missing, or without a readable marker: None).

    Returns:
        The ``command`` recorded in ``folder/.celo2-run``, or None.
    """
    try:
        record = json.loads(Path(folder, MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    kind = record.get("command") if isinstance(record, dict) else None
    return kind if isinstance(kind, str) else None


def check_owner(folder: "str | os.PathLike[str]", kind: str, adopt: "Callable[[Path], bool] | None" = None,
                where: str | None = None) -> bool:
    """Whether ``kind`` may write into ``folder`` (see the module docstring); nothing is changed.

    Args:
        folder: the run folder asked for.
        kind: the command asking (``"bench"``, ``"demo"``, ``"meta-train"``).
        adopt: whether an unmarked, non-empty folder is ``kind``'s work from before markers existed.
        where: how messages name the folder (default: its path).

    Returns:
        True when the folder still needs ``kind``'s marker (missing, empty or adopted), False when it
        carries it already.

    Raises:
        RunFolderError: the folder is another command's run folder, or holds files ``kind`` did not write.
    """
    folder = Path(folder)
    where = where or str(folder)
    if not folder.is_dir():
        return True
    marked = run_folder_kind(folder)
    if marked == kind:
        return False
    if marked is not None:
        raise RunFolderError(f"{where}: is a celo2 {marked} run folder, not a {kind} one; choose another folder")
    others = sorted(p.name for p in folder.iterdir() if p.name not in (LOCK_NAME, MARKER_NAME))
    if not others or (adopt is not None and adopt(folder)):
        return True
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    raise RunFolderError(
        f"{where}: holds files that celo2 {kind} did not write ({shown}); nothing was changed: choose a new or "
        f"empty folder")


def _describe(holder: dict) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}: "
            f"{holder.get('command', '?')}")


class RunLock:
    """Exclusive use of a run folder by this process, until :meth:`release` (or the process ends).

    Args:
        folder: the run folder; created (with its parents) if missing.
        flag: how the user named the folder in messages, e.g. ``"--out"``.
        log: where to report a stale lock taken over and temporary files removed
            (default: standard error).
        kind: the command that takes the folder (e.g. ``"bench"``); with it, only a missing or
            empty folder, one with ``kind``'s marker, or one ``adopt`` accepts is used (see the
            module docstring), and the marker is written. None: any folder (the lock only).
        adopt: with ``kind``: whether an unmarked, non-empty folder is ``kind``'s own work from
            before markers existed (then it is marked and used).

    Raises:
        RunFolderLockedError: another process holds the folder (the message gives its pid, host,
            command and start time).
        RunFolderError: the folder cannot be created or written, a file is in its place, or
            (with ``kind``) it holds files ``kind`` did not write; nothing is created in it then.
    """

    def __init__(self, folder: "str | os.PathLike[str]", *, flag: str = "--out",
                 log: Callable[[str], None] | None = None, kind: str | None = None,
                 adopt: Callable[[Path], bool] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        where = f"{flag} {self.folder}" if flag else str(self.folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise RunFolderError(f"{where}: is a file, not a folder")
        if kind is not None:  # before anything is created in the folder
            check_owner(self.folder, kind, adopt, where)
        self._created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            reason = "a parent is a file, not a folder" if exc.errno in (errno.ENOTDIR, errno.EEXIST) else (
                exc.strerror or str(exc))
            raise RunFolderError(f"{where}: cannot create or open the folder ({reason})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            raise RunFolderLockedError(
                f"{where}: in use by another process ({_describe(holder)}); wait for it to end or choose "
                f"another folder") from None
        except OSError as exc:
            os.close(fd)
            raise RunFolderError(f"{where}: cannot lock {self.path} ({exc.strerror or exc})") from None
        self._fd: int | None = fd
        stale = self._read(fd)
        if stale:
            log(f"note: {where}: taking over from a process that is gone ({_describe(stale)})")
        self.holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(self.holder) + "\n").encode(), 0)
        if kind is not None:
            try:
                # Checked again under the lock: another process may have filled the folder meanwhile.
                if check_owner(self.folder, kind, adopt, where):
                    atomic_write_text(self.folder / MARKER_NAME, json.dumps({"command": kind}) + "\n")
            except BaseException:
                self.release()
                raise
        for p in remove_stale_temps(self.folder):
            log(f"note: removed {p}, left by an interrupted write")

    @staticmethod
    def _read(fd: int) -> dict:
        """The holder recorded in the lock file ({} when empty or unreadable)."""
        raw = os.pread(fd, 4096, 0)
        if not raw.strip():
            return {}
        try:
            holder = json.loads(raw.decode("utf-8", "replace"))
        except json.JSONDecodeError:
            return {"command": "(unreadable lock record)"}
        return holder if isinstance(holder, dict) else {}

    @property
    def held(self) -> bool:
        """Whether this object still holds the lock."""
        return self._fd is not None

    def release(self) -> None:
        """Clear the holder record and drop the lock (a no-op when already released).

        A folder this lock created and nothing else was written to (the command
        failed on bad input) is removed again.
        """
        if self._fd is None:
            return
        try:
            left = set(os.listdir(self.folder))
            if self._created and left <= {LOCK_NAME, MARKER_NAME}:
                for name in left:
                    os.unlink(self.folder / name)
                os.rmdir(self.folder)
            else:
                os.ftruncate(self._fd, 0)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - safety net; callers release explicitly
        if getattr(self, "_fd", None) is not None:
            self.release()


__all__ = ["LOCK_NAME", "MARKER_NAME", "RunFolderError", "RunFolderLockedError", "RunLock", "check_owner",
           "run_folder_kind"]
