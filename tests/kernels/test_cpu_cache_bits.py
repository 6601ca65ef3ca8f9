"""The CPU kernels compute the same bits in the process that compiles them and in a later one that
loads them from Numba's disk cache.

A pass sequence runs the loops it calls from its own compiled object (see
:func:`celo2.kernels.cpu._compiler._bind_linked_code_locally`); were the calls bound to whichever copy
of a loop a process loaded first, the compiling process (the loop's own code loaded first) and a
process loading from the cache (only the sequence's copy) would run different code, and their
fast-math reductions give different bits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from celo2.kernels import cpu as cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")

SRC = Path(__file__).resolve().parents[2] / "src"

#: One vector's step (write mode: the raw direction; apply mode: the updated parameter), as hex digests of
#: the bits. A vector is the cheapest sequence to compile that takes the direction loop.
CHILD = """
import hashlib
import numpy as np
import celo2
from celo2.kernels import cpu as k
from celo2.rule import layout

rng = np.random.default_rng(0)
n = 37
net = layout.pack_theta(celo2.Theta.init(seed=123))
digests = []
for mode, decay, lr in ((k.WRITE, 1.0, 0.0), (k.APPLY, 0.99, 0.01)):
    g = rng.standard_normal(n).astype(np.float32)
    p = rng.standard_normal(n).astype(np.float32)
    m = (rng.standard_normal((3, n)) * 0.1).astype(np.float32)
    v = (rng.random(n) * 0.1).astype(np.float32)
    fac = (rng.random((3, n)) * 0.1).astype(np.float32)
    out = np.empty((1, n) if mode == k.WRITE else (1, 1), np.float32)
    args = (g, p, m, v, fac, net, mode, decay, lr, out, k.NO_KEYS)
    k.ensure_compiled(k.vector_step, args)
    sq = k.vector_step(*args)
    arrays = (out, p, m, v, fac, np.float32(sq)) if mode == k.WRITE else (p, m, v, fac, np.float32(sq))
    digests.append(hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest())
print(" ".join(digests))
"""


def _run_child(cache_dir: Path) -> str:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_a_step_loaded_from_the_disk_cache_computes_the_bits_of_the_process_that_compiled_it(tmp_path):
    cache_dir = tmp_path / "numba-cache"
    compiled = _run_child(cache_dir)
    assert any(cache_dir.rglob("*.nbc")), "the first process wrote no Numba cache entries"
    loaded = _run_child(cache_dir)
    assert loaded == compiled, "the kernels' bits differ between the compiling process and a cache-loading one"
