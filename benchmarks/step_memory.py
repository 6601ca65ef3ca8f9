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

With ``--state`` it prints instead the bytes of optimizer state per
parameter (the state, not the step's transients) of AdamW, Muon (with AdamW
on the tensors Celo2 routes to AdamW), Celo2 and Celo2-base at each state
dtype (float32, bfloat16, and ``int8``: 8-bit blockwise codes with a float32 scale per 256 elements), on the bench's GPT and on GPT-2 124M's shapes, counted from the
state tensors each optimizer keeps after a step on ``meta`` tensors (Celo2's
:meth:`~celo2.torch.Celo2.state_bytes`: the state its first step creates).

Usage::

    python benchmarks/step_memory.py            # 2^24-element vector, (1, 2^24), 4096x4096
    python benchmarks/step_memory.py --full     # also the 2^26 sizes
    python benchmarks/step_memory.py --quick    # 2^20 elements: a smoke test
    python benchmarks/step_memory.py --state    # bytes of state per parameter
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


def _measure(optimizer: str, backend: str, shape: tuple[int, ...], state_dtype: str = "float32") -> dict:
    """One case, in this process: the step's transient bytes and seconds."""
    import torch

    import celo2.torch as ct

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(*shape) * 0.02)
    opt = getattr(ct, optimizer)([p], lr=1e-3, backend=backend, state_dtype=state_dtype)
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
    return {"optimizer": optimizer, "backend": backend, "shape": list(shape), "state_dtype": state_dtype,
            "tensor_bytes": tensor_bytes, "transient_bytes": max(0, peak - before) * 1024, "seconds": seconds,
            "method": method}


def _bench_gpt():  # noqa: ANN202
    """The bench's GPT (``celo2.eval.tasks.SUITES["full"]["gpt"]``) on the meta device."""
    from celo2.eval import tasks
    from celo2.eval.models import GPT

    cfg = tasks.SUITES["full"]["gpt"]
    return GPT(256, cfg["context"], cfg["dim"], cfg["layers"], cfg["heads"])


def _gpt2_124m():  # noqa: ANN202
    """GPT-2 124M's parameters under its own names (tied head: the token embedding is the output layer)."""
    import torch
    from torch import nn

    dim, layers, vocab, context = 768, 12, 50257, 1024

    def block() -> nn.Module:
        b = nn.Module()
        b.ln_1, b.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        b.attn, b.mlp = nn.Module(), nn.Module()
        b.attn.c_attn, b.attn.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        b.mlp.c_fc, b.mlp.c_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        return b

    model = nn.Module()
    model.wte, model.wpe = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(context, dim))
    model.h = nn.ModuleList(block() for _ in range(layers))
    model.ln_f = nn.LayerNorm(dim)
    return model


STATE_MODELS = {"bench GPT": _bench_gpt, "GPT-2 124M": _gpt2_124m}
"""The models of ``--state``, built on the meta device."""


def _state_bytes(model, optimizer: str, state_dtype: str) -> int:  # noqa: ANN001
    """Bytes of state ``optimizer`` keeps for ``model``'s parameters (meta tensors), from its state tensors."""
    import torch

    import celo2.torch as ct

    named = list(model.named_parameters())
    for _, p in named:
        p.grad = torch.zeros_like(p)
    if optimizer in ("Celo2", "Celo2Base"):
        return sum(getattr(ct, optimizer)(named, state_dtype=state_dtype).state_bytes().values())
    if optimizer == "AdamW":
        opts = [torch.optim.AdamW([p for _, p in named])]
    else:  # Muon on the matrices Celo2 gives its rule, AdamW on the rest
        learned = {name for branch, name, _ in ct.Celo2(named).routing() if branch == "celo2"}
        opts = [torch.optim.Muon([p for n, p in named if n in learned]),
                torch.optim.AdamW([p for n, p in named if n not in learned])]
    total = 0
    for opt in opts:
        opt.step()
        total += sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                     if isinstance(t, torch.Tensor))
    return total


def state_rows() -> list[dict]:
    """Every (model, optimizer, state dtype) of ``--state``: parameters, state bytes, bytes per parameter."""
    import torch

    cases = [("AdamW", "float32"), ("Muon", "float32")] + [(o, d) for o in OPTIMIZERS for d in ("float32", "bfloat16", "int8")]
    rows = []
    for model_name, build in STATE_MODELS.items():
        for optimizer, dtype in cases:
            with torch.device("meta"):
                model = build()
            n = sum(p.numel() for p in model.parameters())
            state = _state_bytes(model, optimizer, dtype)
            rows.append({"model": model_name, "optimizer": optimizer, "state_dtype": dtype, "parameters": n,
                         "state_bytes": state, "bytes_per_parameter": state / n})
    return rows


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
    ap.add_argument("--state-dtypes", default="float32", help="state dtypes of the step cases (comma-separated)")
    ap.add_argument("--state", action="store_true", help="bytes of optimizer state per parameter instead")
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # a child's one case, as JSON
    args = ap.parse_args(argv)
    if args.state:
        rows = state_rows()
        print(f"{'model':<11} {'optimizer':<10} {'state':<9} {'parameters':>11} {'state MB':>9} {'bytes/param':>11}")
        for r in rows:
            print(f"{r['model']:<11} {r['optimizer']:<10} {r['state_dtype']:<9} {r['parameters']:>11,} "
                  f"{r['state_bytes'] / 1e6:>9.2f} {r['bytes_per_parameter']:>11.3f}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)
        return 0
    if args.case:
        case = json.loads(args.case)
        print(json.dumps(_measure(case["optimizer"], case["backend"], tuple(case["shape"]), case["state_dtype"])))
        return 0
    rows, failed = [], False
    print(f"{'optimizer':<10} {'backend':<7} {'state':<9} {'shape':<16} {'transient x tensor':>18} {'step s':>8}"
          f"  method")
    cases = [(o, b, d) for o in args.optimizers.split(",") for b in args.backends.split(",")
             for d in args.state_dtypes.split(",")]
    for shape in _shapes(args.quick, args.full):
        for optimizer, backend, dtype in cases:
            case = json.dumps({"optimizer": optimizer, "backend": backend, "shape": list(shape),
                               "state_dtype": dtype})
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", case],
                                 capture_output=True, text=True, env=env)
            if res.returncode != 0:
                failed = True
                print(f"{optimizer:<10} {backend:<7} {dtype:<9} {str(shape):<16} failed: "
                      f"{res.stderr.strip()[-500:]}")
                continue
            row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            ratio = row["transient_bytes"] / row["tensor_bytes"]
            print(f"{optimizer:<10} {backend:<7} {dtype:<9} {str(tuple(shape)):<16} {ratio:>18.2f} "
                  f"{row['seconds']:>8.3f}  {row['method']}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
