"""Shared test fixtures: the reference data in ``../shared`` (skipped where absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CELO2_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"
DATASETS = SHARED / "datasets"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared reference folder beside the repo); absent here")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _require(REFERENCE)


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return _require(DATASETS)


@pytest.fixture(scope="session")
def published_theta_path(reference_dir: Path) -> Path:
    return _require(reference_dir / "celo2_official_theta.state")


@pytest.fixture(scope="session")
def published_theta(published_theta_path: Path):
    import celo2

    return celo2.load_theta(published_theta_path)


@pytest.fixture(scope="session")
def random_theta():
    """A theta that needs no shared files, for tests of mechanics rather than values."""
    import celo2

    return celo2.Theta.init(seed=123)
