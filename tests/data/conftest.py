"""Fixtures for the celo2.data tests; the dataset makers live in celo2_data_makers.py beside this file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# Make the makers importable whatever pytest's import mode is.
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"


@pytest.fixture(autouse=True)
def _isolated_data_env(monkeypatch):
    """No test sees the user's $CELO2_DATA_DIR or a cache filled by another test."""
    monkeypatch.delenv("CELO2_DATA_DIR", raising=False)
    from celo2.data import clear_cache

    clear_cache()
    yield
    clear_cache()


@pytest.fixture
def shared_datasets() -> Path:
    folder = SHARED / "datasets"
    if not (folder / "mnist").is_dir():
        pytest.skip(f"shared datasets folder {folder} is absent (only present in the project's workspace)")
    return folder
