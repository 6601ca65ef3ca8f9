"""Peak transient memory and time of one PyTorch optimizer step on one large tensor.

Each case (optimizer, backend, shape) runs in a child process of its own: a
parameter with a random gradient, two warm-up steps (compiles, state), then
one measured step. Memory is the process's resident set, read by the kernel,
so it counts every allocation (NumPy's, Numba's and torch's C allocations
included, which ``tracemalloc`` does not see): the child resets its peak
(``VmHWM``, by writing ``5`` to ``/proc/self/clear_refs``), takes the step,
and reports ``VmHWM - VmRSS`` before the step, the most the step added above
the steady state (parameter, gradient and optimizer state). The child runs
with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so every
large block is returned to the system when freed: with glibc's default
(a threshold that rises to the largest block freed) the heap keeps freed
blocks resident and a step that reuses them would read as free. Where the peak
cannot be reset, a thread samples the resident set every millisecond instead
(the table says which). Figures are multiples of the tensor's bytes.

Usage::

    python benchmarks/step_memory.py            # 2^24-element vector, (1, 2^24), 4096x4096
    python benchmarks/step_memory.py --full     # also the 2^26 sizes
    python benchmarks/step_memory.py --quick    # 2^20 elements: a smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

OPTIMIZERS = ("Celo2", "Celo2Base")
BACKENDS = ("auto", "torch")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"step_memory: /proc/self/status has no {field}")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _rss_kib("VmHWM") <= _rss_kib("VmRSS") + 64


def _measure(optimizer: str, backend: str, shape: tuple[int, ...]) -> dict:
    """One case, in this process: the step's transient bytes and seconds."""
    import torch

    import celo2.torch as ct

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape) * 0.02)
    opt = getattr(ct, optimizer)([p], lr=1e-3, backend=backend)
    grads = [torch.randn(*shape) for _ in range(3)]
    for g in grads[:2]:
        p.grad = g
        opt.step()
    p.grad = grads[2]
    before = _rss_kib("VmRSS")
    method = "VmHWM"
    if _reset_peak():
        t0 = time.perf_counter()
        opt.step()
        seconds = time.perf_counter() - t0
        peak = _rss_kib("VmHWM")
    else:
        method = "sampled"
        peak, done = before, threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, _rss_kib("VmRSS"))
                time.sleep(0.001)

        thread = threading.Thread(target=sample)
        thread.start()
        t0 = time.perf_counter()
        opt.step()
        seconds = time.perf_counter() - t0
        done.set()
        thread.join()
    tensor_bytes = p.numel() * p.element_size()
    return {"optimizer": optimizer, "backend": backend, "shape": list(shape), "tensor_bytes": tensor_bytes,
            "transient_bytes": max(0, peak - before) * 1024, "seconds": seconds, "method": method}


def _shapes(quick: bool, full: bool) -> list[tuple[int, ...]]:
    if quick:
        return [(1 << 20,), (1, 1 << 20), (1024, 1024)]
    shapes = [(1 << 24,), (1, 1 << 24), (4096, 4096)]
    if full:
        shapes += [(1 << 26,), (1, 1 << 26), (8192, 8192)]
    return shapes


def main(argv: "list[str] | None" = None) -> int:
    """Run every case in a child process and print the table.

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).

    Returns:
        0, or 1 if a case failed.
    """
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2^20 elements only (a smoke test)")
    ap.add_argument("--full", action="store_true", help="also 2^26-element tensors")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # a child's one case, as JSON
    args = ap.parse_args(argv)
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(_measure(case["optimizer"], case["backend"], tuple(case["shape"]))))
        return 0
    rows, failed = [], False
    print(f"{'optimizer':<10} {'backend':<7} {'shape':<16} {'transient x tensor':>18} {'step s':>8}  method")
    for shape in _shapes(args.quick, args.full):
        for optimizer in args.optimizers.split(","):
            for backend in args.backends.split(","):
                case = json.dumps({"optimizer": optimizer, "backend": backend, "shape": list(shape)})
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
                res = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case],
                                     capture_output=True, text=True, env=env)
                if res.returncode != 0:
                    failed = True
                    print(f"{optimizer:<10} {backend:<7} {str(shape):<16} failed: {res.stderr.strip()[-500:]}")
                    continue
                row = json.loads(res.stdout.strip().splitlines()[-1])
                rows.append(row)
                ratio = row["transient_bytes"] / row["tensor_bytes"]
                print(f"{optimizer:<10} {backend:<7} {str(tuple(shape)):<16} {ratio:>18.2f} {row['seconds']:>8.3f}"
                      f"  {row['method']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
