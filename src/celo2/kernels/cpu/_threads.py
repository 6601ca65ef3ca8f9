"""The CPU kernels' threads: one small shared pool, whole tensors or row blocks per thread.

The kernels release the GIL, so plain Python threads run them in parallel.
Numba's own threading layers are not used: its OpenMP layer leaves workers
spinning, which stalls the next operations of a framework sharing the cores,
and its workqueue layer costs a good share of a small kernel per launch.

The thread count is the caller's (``threads=``): a front end passes its own
setting (the PyTorch front end, ``torch.get_num_threads()``); without one,
:func:`default_threads` reads the process's CPUs. Partial sums are per block,
never per thread, so results do not depend on the count.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from celo2.kernels.cpu import _compiler

PARALLEL_MIN_ELEMENTS = 1 << 16
"""Smaller tensors run on the calling thread (a pool hand-off costs tens of microseconds)."""

THREADS_ENV = "CELO2_NUM_THREADS"
"""Environment variable that sets :func:`default_threads` (else ``OMP_NUM_THREADS``, else the CPUs)."""


def default_threads() -> int:
    """The thread count when a caller gives none.

    Returns:
        ``CELO2_NUM_THREADS`` or ``OMP_NUM_THREADS`` when set to a positive
        integer, else the number of CPUs this process may run on.
    """
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return os.cpu_count() or 1


_POOL: "ThreadPoolExecutor | None" = None
_POOL_WORKERS = 0
_POOL_PID = 0  # a forked child (a DataLoader worker, say) has none of the parent's threads
_POOL_LOCK = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    """The shared pool, with at least ``threads - 1`` workers (the caller is the other)."""
    global _POOL, _POOL_WORKERS, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_WORKERS < threads - 1 or _POOL_PID != os.getpid():
            _POOL = ThreadPoolExecutor(threads - 1, thread_name_prefix="celo2-cpu")
            _POOL_WORKERS, _POOL_PID = threads - 1, os.getpid()
        return _POOL


_LOCAL = threading.local()
"""``serial``: set while a thread runs its share of :func:`run_tensors` (no nested hand-offs)."""


def run_blocks(kernel: Any, nblk: int, elements: int, *args: Any, threads: Optional[int] = None) -> None:
    """``kernel(lo, hi, *args)`` over blocks ``0:nblk``, split evenly over threads.

    Inside :func:`run_tensors`, and for tensors under
    :data:`PARALLEL_MIN_ELEMENTS`, the whole call runs on the calling thread.

    Args:
        kernel: A loop of :mod:`celo2.kernels.cpu` taking ``(lo, hi, *args)``.
        nblk: The number of blocks.
        elements: The tensor's size (small ones stay on this thread).
        args: The loop's other arguments.
        threads: At most this many threads (default :func:`default_threads`).
    """
    _compiler.ensure_compiled(kernel, (0, nblk, *args))
    threads = min(default_threads() if threads is None else threads, nblk)
    if threads <= 1 or elements < PARALLEL_MIN_ELEMENTS or getattr(_LOCAL, "serial", False):
        kernel(0, nblk, *args)
        return
    pool = _pool(threads)
    bounds = [nblk * i // threads for i in range(threads + 1)]
    futures = [pool.submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(1, threads)]
    kernel(bounds[0], bounds[1], *args)
    for f in futures:
        f.result()


def run_tensors(tasks: "list[tuple[int, Callable[[], None]]]", threads: Optional[int] = None) -> None:
    """Run ``(cost, task)`` pairs, each a whole tensor's step, spread over threads.

    One hand-off per thread and step instead of one per kernel call (a
    worker's wake-up on a virtual machine costs a good share of a small
    kernel), and one tensor's Python glue overlaps another's kernels.
    Tensors go to the least loaded thread, largest first; each tensor's
    arithmetic is the same on any thread, so results do not depend on the
    split. An exception reaches the caller once every thread has stopped (a
    share stops at its failing tensor, as the plain loop would), so no
    thread is still writing when it does.

    Args:
        tasks: ``(cost, task)``: the cost (its elements, say) orders and balances the shares.
        threads: At most this many threads (default :func:`default_threads`).

    Raises:
        BaseException: The first error a task raised, after every share has stopped.
    """
    threads = min(default_threads() if threads is None else threads, len(tasks))
    if threads <= 1 or getattr(_LOCAL, "serial", False):
        for _, task in tasks:
            task()
        return
    shares: list[list[Callable[[], None]]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for cost, task in sorted(tasks, key=lambda t: -t[0]):
        i = loads.index(min(loads))
        shares[i].append(task)
        loads[i] += cost

    def run_share(share: "list[Callable[[], None]]") -> None:
        _LOCAL.serial = True
        try:
            for task in share:
                task()
        finally:
            _LOCAL.serial = False

    pool = _pool(threads)
    futures = [pool.submit(run_share, share) for share in shares[1:]]
    error = None
    try:
        run_share(shares[0])
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the workers
        error = exc
    for f in futures:
        try:
            f.result()
        except BaseException as exc:  # noqa: BLE001
            error = error or exc
    if error is not None:
        raise error
