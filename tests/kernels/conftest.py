"""The Triton kernels under Triton's interpreter, on CPU tensors (CI has no GPU).

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so the tests load
their own copy of :mod:`celo2.kernels.triton` with the variable set for the
import only: the copy runs interpreted whatever other tests imported before,
and the process's own ``celo2.kernels.triton`` (if any) is left as it was.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest


def load_interpreted() -> ModuleType:
    """A private copy of ``celo2.kernels.triton`` whose kernels run under the interpreter."""
    name = "celo2_kernels_triton_interpreted"
    if name in sys.modules:
        return sys.modules[name]
    import celo2.kernels

    path = os.path.join(os.path.dirname(celo2.kernels.__file__), "triton.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        sys.modules[name] = module  # dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module


@pytest.fixture(scope="session")
def tk() -> ModuleType:
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")
    module = load_interpreted()
    assert module.AVAILABLE and module.INTERPRETED
    return module
