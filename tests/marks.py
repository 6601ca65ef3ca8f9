"""Skip marks that several test modules share (``pytestmark = marks.NEEDS_TRITON_KERNELS``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NEEDS_TRITON_KERNELS = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(not (ROOT / "src" / "celo2" / "kernels" / "triton.py").exists(),
                       reason="celo2.kernels.triton (the Triton kernels) is not in this checkout"),
]
"""Triton importable and the Triton kernels' module in this checkout: the tests that run whole optimizer
steps with ``backend="triton"`` (in a child process, under Triton's interpreter without a GPU)."""
