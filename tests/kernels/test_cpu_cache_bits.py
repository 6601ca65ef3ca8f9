"""The CPU kernels compute the same bits in the process that compiles them and in a later one that
loads them from Numba's disk cache.

A pass sequence runs the loops it calls from its own compiled object (see
:func:`celo2.kernels.cpu._compiler._bind_linked_code_locally`); were the calls bound to whichever copy
of a loop a process loaded first, the compiling process (the loop's own code loaded first) and a
process loading from the cache (only the sequence's copy) would run different code, and their
fast-math reductions give different bits.

A cache entry is loaded only by the kernel sources and compile recipe that made it
(:data:`celo2.kernels.cpu._compiler.RECIPE`): an entry of another recipe is compiled again, never run.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from celo2.kernels import cpu as cpu_kernels
from celo2.kernels.cpu import _compiler

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
stats = k.vector_step.stats
print(" ".join(digests), f"hits={sum(stats.cache_hits.values())} misses={sum(stats.cache_misses.values())}")
"""


def _run_child(cache_dir: Path) -> tuple[str, str]:
    """The bits' digests and the step's cache hits and misses in a fresh process."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "PYTHONPATH": os.pathsep.join(
        [str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *digests, hits, misses = proc.stdout.split()
    return " ".join(digests), f"{hits} {misses}"


def _restamp(cache_dir: Path, recipe: str) -> int:
    """Rewrite every celo2 index in ``cache_dir`` as if another recipe had made its entries (Numba's
    index file: a pickled version, then a pickled ``(source stamp, overloads)``); how many were."""
    count = 0
    for index in cache_dir.rglob("*.nbi"):
        with open(index, "rb") as f:
            version = pickle.load(f)
            stamp, overloads = pickle.loads(f.read())
        assert isinstance(stamp, tuple) and stamp[1] == _compiler.RECIPE, (index.name, stamp)
        with open(index, "wb") as f:
            pickle.dump(version, f, protocol=-1)
            f.write(pickle.dumps(((stamp[0], recipe), overloads), protocol=-1))
        count += 1
    return count


def test_a_step_loaded_from_the_disk_cache_computes_the_bits_of_the_process_that_compiled_it(tmp_path):
    cache_dir = tmp_path / "numba-cache"
    compiled, counts = _run_child(cache_dir)
    assert counts.startswith("hits=0 ") and counts != "hits=0 misses=0", counts
    assert any(cache_dir.rglob("*.nbc")), "the first process wrote no Numba cache entries"
    loaded, counts = _run_child(cache_dir)
    assert counts.endswith(" misses=0") and counts != "hits=0 misses=0", counts  # loaded, not compiled
    assert loaded == compiled, "the kernels' bits differ between the compiling process and a cache-loading one"

    # Entries another recipe made (other kernel sources or compiler options, same file stamps) are
    # compiled again: a process never runs a caller of one recipe bound to callees of another.
    assert _restamp(cache_dir, "another recipe") > 0
    again, counts = _run_child(cache_dir)
    assert counts.startswith("hits=0 ") and counts != "hits=0 misses=0", counts
    assert again == compiled


def test_only_celo2_functions_take_the_recipe_stamp(tmp_path):
    from numba.core.caching import FunctionCache

    from celo2.kernels.cpu import _loops

    ours = FunctionCache(_loops.vector_factors.py_func)
    assert isinstance(ours._impl.locator, _compiler._RecipeStampedLocator)
    assert ours._cache_file._source_stamp == (ours._impl.locator._inner.get_source_stamp(), _compiler.RECIPE)
    module = tmp_path / "someone_elses.py"
    module.write_text("def f(x):\n    return x + 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import someone_elses
        theirs = FunctionCache(someone_elses.f)
    finally:
        sys.path.remove(str(tmp_path))
    # Numba's own locator and stamp for anyone else's function
    assert theirs._cache_file._source_stamp == theirs._impl.locator.get_source_stamp()
    assert not isinstance(theirs._impl.locator, _compiler._RecipeStampedLocator)
