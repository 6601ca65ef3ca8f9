"""Which code produced a result: recorded in bench reports and meta-training metadata."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """The commit of the checkout the package runs from, with ``+uncommitted-changes``
    when the package's files differ from it (untracked new modules count); ``None``
    for an installed package or without git. Call it when the work starts: a
    long job's checkout can move before it ends."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
        return sha + ("+uncommitted-changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None
