"""The launch budget of a Celo2 / Celo2Base step, counted on the CPU: operations and kernel launches per tensor.

    TRITON_INTERPRET=1 python benchmarks/launch_budget.py --widths 32,64 --backends triton,torch

Builds the benchmark's GPT-shaped parameter set (:func:`step_time.model_shapes` of a
``GPT_SIZES``-like model at each width: token and position embeddings, per layer a fused qkv
matrix, the attention projection, the MLP pair, biases and norms), routes every tensor to the
learned rule (``branch="celo2"``, so vectors count too), takes one warm-up step, then counts one
step: the ATen operations the step dispatches (a ``TorchDispatchMode``), and the Triton launches
(the launch of every kernel wrapped). ATen operations issued by Triton's launcher itself (under
the interpreter, the copies to and from the host) are not counted. The count per tensor must not
grow with the width: every tensor takes a fixed number of launches whatever its size.

``--backends torch`` counts the chunked PyTorch path for comparison (its count grows with size:
one set of operations per chunk). Under ``TRITON_INTERPRET=1`` the Triton kernels run on CPU
tensors through Triton's interpreter (slowly: keep the widths small).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time  # noqa: E402  (the benchmark's parameter shapes)


class _Count(TorchDispatchMode):
    """Counts ATen operations by name, except while a Triton launch runs."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if not self.paused:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _count_launches(counter: _Count) -> Iterator[collections.Counter[str]]:
    """Wrap Triton's launch (compiled and interpreted kernels) to count launches per kernel."""
    launches: collections.Counter[str] = collections.Counter()
    patched = []
    try:
        import triton.runtime.interpreter as interp
        import triton.runtime.jit as jit

        for cls in (interp.InterpretedFunction, jit.JITFunction):
            real = cls.run

            def run(self, *args, _real=real, **kwargs):  # noqa: ANN001, ANN202
                launches[getattr(self, "__name__", None) or getattr(self.fn, "__name__", "?")] += 1
                counter.paused += 1
                try:
                    return _real(self, *args, **kwargs)
                finally:
                    counter.paused -= 1

            cls.run = run
            patched.append((cls, real))
    except ImportError:
        pass
    try:
        yield launches
    finally:
        for cls, real in patched:
            cls.run = real


def gpt_shapes(width: int, layers: int = 2, vocab: int = 64, context: int = 16) -> list[tuple[str, tuple[int, ...]]]:
    """Named parameter shapes of a small tied GPT (:func:`step_time.gpt_model`'s layout) at ``width``."""
    step_time.GPT_SIZES[f"budget-{width}"] = (vocab, context, width, layers, max(1, width // 16))
    return step_time.model_shapes(f"budget-{width}")


def count(cls_name: str, backend: str, width: int) -> dict[str, Any]:
    """Operations and launches of one step of ``cls_name`` with ``backend`` at ``width``."""
    from celo2.rule.theta import Theta
    from celo2.torch import Celo2, Celo2Base

    torch.manual_seed(0)
    shapes = gpt_shapes(width)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for _, s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    theta = Theta.init(seed=0)
    if cls_name == "Celo2":
        opt = Celo2([{"params": params, "branch": "celo2"}], lr=1e-3, theta=theta, backend=backend)
    else:
        opt = Celo2Base(params, lr=1e-3, theta=theta, backend=backend)
    opt.step()  # state, theta upload, compilation
    counter = _Count()
    with _count_launches(counter) as launches, counter:
        opt.step()
    ops, kernel_launches = sum(counter.ops.values()), sum(launches.values())
    n = len(params)
    return {"optimizer": cls_name, "backend": backend, "width": width, "tensors": n,
            "elements": sum(p.numel() for p in params), "aten_ops": ops, "triton_launches": kernel_launches,
            "per_tensor": (ops + kernel_launches) / n, "aten_ops_per_tensor": ops / n,
            "launches_per_tensor": kernel_launches / n, "top_ops": counter.ops.most_common(8),
            "launches_by_kernel": dict(launches)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="32,64")
    ap.add_argument("--backends", default="triton,torch")
    ap.add_argument("--optimizers", default="Celo2,Celo2Base")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    rows = [count(o, b, int(w)) for o in args.optimizers.split(",") for b in args.backends.split(",")
            for w in args.widths.split(",")]
    print(f"{'optimizer':10s} {'backend':8s} {'width':>5s} {'tensors':>7s} {'elements':>9s} {'aten ops':>9s} "
          f"{'launches':>8s} {'per tensor':>10s}")
    for r in rows:
        print(f"{r['optimizer']:10s} {r['backend']:8s} {r['width']:5d} {r['tensors']:7d} {r['elements']:9d} "
              f"{r['aten_ops']:9d} {r['triton_launches']:8d} {r['per_tensor']:10.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
