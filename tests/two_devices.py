"""Checks that need two JAX devices, run in a child process with two forced host devices.

JAX fixes its device count when it starts, so a test module that needs two devices runs itself as a
script (``python this_file.py``) under ``XLA_FLAGS=--xla_force_host_platform_device_count=2``: its
``main`` prints one ``RESULT`` line of JSON per case (:func:`print_results`), and its module fixture
reads them back (:func:`run_script`). :func:`mesh` is the one-axis mesh the cases split over.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable

_PREFIX = "RESULT"


def run_script(path: str | Path, timeout: int) -> list[dict]:
    """Run the test module at ``path`` as a script on two forced host CPU devices.

    Args:
        path: The module's file (its ``__main__`` calls :func:`print_results`).
        timeout: Seconds before the child is killed.

    Returns:
        The cases' results, in the order printed.

    Raises:
        AssertionError: The child failed (with the end of its stderr).
    """
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([tests, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line[len(_PREFIX):]) for line in proc.stdout.splitlines() if line.startswith(_PREFIX)]


def print_results(cases: Iterable[Callable[[], Any]]) -> None:
    """In the child: check that JAX sees the two devices, then run each case and print its result.

    Args:
        cases: Functions of no arguments, each returning a JSON-serialisable result.
    """
    import jax

    assert len(jax.devices()) == 2, jax.devices()
    for case in cases:
        print(_PREFIX + json.dumps(case()), flush=True)


def mesh(mode: str) -> "tuple[Any, Callable[[], ContextManager]]":
    """A 2-device mesh with the one axis ``"x"`` of type ``mode``, and how to enter it.

    Args:
        mode: ``"auto"`` or ``"explicit"`` (JAX's ``AxisType``).

    Returns:
        ``(mesh, context)``: ``context()`` is a fresh ``jax.set_mesh`` context under ``"explicit"``
        (the mesh must be set for explicitly sharded code), a no-op under ``"auto"``.
    """
    import jax
    from jax.sharding import AxisType

    explicit = mode == "explicit"
    made = jax.make_mesh((2,), ("x",), axis_types=(AxisType.Explicit if explicit else AxisType.Auto,))
    return made, (lambda: jax.set_mesh(made)) if explicit else contextlib.nullcontext
