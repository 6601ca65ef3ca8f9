"""Atomic file writes, shared by theta files, meta-training checkpoints and bench reports.

A reader (or a resumed run) sees either the old file or the complete new one,
never a partial write: data go to a temporary file in the same folder, are
flushed to disk, then renamed over the target.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: "str | os.PathLike[str]", text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
