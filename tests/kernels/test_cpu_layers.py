"""The CPU kernels need no framework: importing them, and running a thread pool, leave torch unimported."""

from __future__ import annotations

import subprocess
import sys

import pytest

from celo2.kernels import cpu as cpu_kernels


def test_the_kernels_import_no_framework():
    code = ("import sys, celo2.kernels.cpu as k\n"
            "k.run_tensors([(1, lambda: None), (2, lambda: None)], threads=2)\n"
            "assert 'torch' not in sys.modules and 'jax' not in sys.modules, sorted(m for m in sys.modules"
            " if m.split('.')[0] in ('torch', 'jax'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_run_tensors_takes_the_callers_thread_count():
    """One thread runs the tasks in order on the calling thread; several spread them, largest first."""
    import threading

    seen = []
    tasks = [(cost, (lambda c=cost: seen.append((c, threading.current_thread().name)))) for cost in (1, 5, 3)]
    cpu_kernels.run_tensors(tasks, threads=1)
    assert [c for c, _ in seen] == [1, 5, 3]
    assert {name for _, name in seen} == {threading.current_thread().name}
    seen.clear()
    cpu_kernels.run_tensors(tasks, threads=2)
    assert sorted(c for c, _ in seen) == [1, 3, 5]
    assert len({name for _, name in seen}) == 2


@pytest.mark.parametrize("value,expected", [("3", 3), ("0", None), ("x", None)])
def test_default_threads_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv(cpu_kernels.THREADS_ENV, value)
    got = cpu_kernels.default_threads()
    assert got == expected if expected is not None else got >= 1
