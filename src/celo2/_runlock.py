"""One process per run folder: an ``fcntl.flock`` on ``RUN_DIR/.celo2.lock``.

``celo2 meta-train``, ``celo2 bench`` and ``celo2 demo`` open their output folder
through :class:`RunLock`. The kernel holds the lock for as long as the file
descriptor is open, and drops it when the process dies however it dies, so a
lock never outlives its process. The file also records its holder (pid, host,
command, start time): a second process is told who holds the folder, and a
process that finds the record of a holder that is gone (a killed run) says that
it takes the folder over. Under the lock, temporary files of interrupted atomic
writes are removed (:func:`celo2._io.remove_stale_temps`).
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

from celo2._io import remove_stale_temps

LOCK_NAME = ".celo2.lock"


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: not creatable, not writable, a file, in use, ..."""


class RunFolderLockedError(RunFolderError):
    """Another live process holds the run folder's lock (the message names it)."""


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

    Raises:
        RunFolderLockedError: another process holds the folder (the message gives its pid, host,
            command and start time).
        RunFolderError: the folder cannot be created or written, or a file is in its place.
    """

    def __init__(self, folder: "str | os.PathLike[str]", *, flag: str = "--out",
                 log: Callable[[str], None] | None = None):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        where = f"{flag} {self.folder}" if flag else str(self.folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise RunFolderError(f"{where}: is a file, not a folder")
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
            if self._created and os.listdir(self.folder) == [LOCK_NAME]:
                os.unlink(self.path)
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


__all__ = ["LOCK_NAME", "RunFolderError", "RunFolderLockedError", "RunLock"]
