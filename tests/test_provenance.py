"""The commit recorded beside results names the checkout the package runs from."""

import re
import subprocess
from pathlib import Path

import pytest

import celo2
from celo2._provenance import git_commit


def test_git_commit_is_the_checkouts_head_with_a_dirty_marker():
    here = Path(celo2.__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the package does not run from a git checkout here")
    got = git_commit()
    assert re.fullmatch(r"[0-9a-f]{40}(\+uncommitted-changes)?", got), got
    assert got.split("+")[0] == head
