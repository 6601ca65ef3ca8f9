"""Fixtures of the reliability tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def zero_gradient_thetas(request) -> dict:
    """The thetas the zero-gradient behaviour is measured with: the shipped one
    (``None``) always, the published one where the shared folder is present."""
    thetas = {"shipped": None}
    try:
        thetas["published"] = request.getfixturevalue("published_theta")
    except pytest.skip.Exception:
        pass
    return thetas
