"""Fixtures of the bench tests: no data folder from the environment, tiny configs."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    """Image tasks must not pick up a developer's $CELO2_DATA_DIR (tests use built-in data)."""
    monkeypatch.delenv("CELO2_DATA_DIR", raising=False)


@pytest.fixture
def theta_files(tmp_path, random_theta):
    """Two different theta files (no shared folder needed): label -> path."""
    import celo2

    a = tmp_path / "a.npz"
    b = tmp_path / "b.npz"
    celo2.save_theta(random_theta, a)
    celo2.save_theta(celo2.Theta.init(seed=7), b)
    return {"a": a, "b": b}
