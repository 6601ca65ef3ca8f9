"""The launch budget of a Celo2 / Celo2Base step, counted on the CPU: operations and kernel launches per tensor.

    TRITON_INTERPRET=1 python benchmarks/launch_budget.py --widths 32,64 --backends triton,torch

Builds the benchmark's GPT-shaped parameter set (:func:`step_time.model_shapes` of a
``GPT_SIZES``-like model at each width: token and position embeddings, per layer a fused qkv
matrix, the attention projection, the MLP pair, biases and norms), routes every tensor to the
learned rule (``branch="celo2"``, so vectors count too), takes one warm-up step, then counts one
step: the ATen operations the step dispatches (a ``TorchDispatchMode``), those of them that launch
a device kernel (not views, aliases or allocations: :func:`launches_kernel`), and the Triton
launches (the launch of every kernel wrapped). ATen operations issued by Triton's launcher itself
(under the interpreter, the copies to and from the host) are not counted. *Launches* are the
Triton launches plus the compute operations: with ``--tensors 5,20`` (transformer-shaped tensors,
:func:`block_shapes`) they must not grow with the number of tensors or their width (tests/torch/
test_host_syncs.py holds them to their budget).

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


NO_KERNEL_OPS = frozenset({
    "detach", "alias", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
    "_record_function_enter_new", "_record_function_exit", "set_", "_local_scalar_dense", "is_nonzero",
    "item", "to", "copy_.no_kernel", "resize_", "_reshape_alias"})
"""ATen operations that launch no device kernel: allocations, aliases and the profiler's markers (views are
recognised by their schema, ``OpOverload.is_view``). A host read (``_local_scalar_dense``) is a
synchronisation, counted by tests/torch/test_host_syncs.py, not a launch."""


def launches_kernel(func) -> bool:  # noqa: ANN001
    """Whether an ATen operation would launch a device kernel (not a view, alias or allocation)."""
    return not func.is_view and func.overloadpacket.__name__ not in NO_KERNEL_OPS


class _Count(TorchDispatchMode):
    """Counts ATen operations by name, except while a Triton launch runs, and those that launch a kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.compute: collections.Counter[str] = collections.Counter()
        self.paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        if not self.paused:
            name = str(func.overloadpacket.__name__)
            self.ops[name] += 1
            if launches_kernel(func):
                self.compute[name] += 1
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


@contextlib.contextmanager
def _interpreted_kernels_skipped() -> Iterator[None]:
    """Under Triton's interpreter, return from every kernel launch without running the kernel.

    What a step launches does not depend on what its kernels compute (no step reads a tensor on the host:
    tests/torch/test_host_syncs.py), so the launches are counted the same; the interpreter's work, which
    grows with the tensors' sizes, is skipped. The tensors the kernels would write keep their old values.

    Raises:
        RuntimeError: The kernels are not interpreted (``TRITON_INTERPRET=1`` was not set when they were
            first imported).
    """
    from celo2.kernels import triton as kernels

    if not kernels.INTERPRETED:
        raise RuntimeError("run_kernels=False skips interpreted kernels only: set TRITON_INTERPRET=1 before "
                           "celo2 is first imported")
    import triton.runtime.interpreter as interp

    real = interp.InterpretedFunction.run
    interp.InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        interp.InterpretedFunction.run = real


def gpt_shapes(width: int, layers: int = 2, vocab: int = 64, context: int = 16) -> list[tuple[str, tuple[int, ...]]]:
    """Named parameter shapes of a small tied GPT (:func:`step_time.gpt_model`'s layout) at ``width``."""
    step_time.GPT_SIZES[f"budget-{width}"] = (vocab, context, width, layers, max(1, width // 16))
    return step_time.model_shapes(f"budget-{width}")


def block_shapes(width: int, tensors: int) -> list[tuple[str, tuple[int, ...]]]:
    """``tensors`` transformer-shaped parameters at ``width``: the fused qkv, attention projection and MLP
    matrices and a norm's vector, repeated in that order (so 20 tensors are four times the shapes of 5)."""
    kinds = [("qkv", (3 * width, width)), ("proj", (width, width)), ("fc", (4 * width, width)),
             ("fc2", (width, 4 * width)), ("norm", (width,))]
    return [(f"{kinds[i % 5][0]}{i // 5}", kinds[i % 5][1]) for i in range(tensors)]


def count(cls_name: str, backend: str, width: int, tensors: int | None = None, tensor_lr: bool = False,
          nonfinite: str = "skip", run_kernels: bool = True) -> dict[str, Any]:
    """Operations and launches of one step of ``cls_name`` with ``backend`` at ``width``.

    Args:
        cls_name: ``"Celo2"`` or ``"Celo2Base"``.
        backend: the ``backend=`` value.
        width: the model width.
        tensors: None for the small GPT's parameters (:func:`gpt_shapes`); else that many transformer-shaped
            parameters (:func:`block_shapes`).
        tensor_lr: ``lr`` and weight decay as 0-d tensors instead of floats.
        nonfinite: the optimizer's ``nonfinite`` policy.
        run_kernels: False: under Triton's interpreter, launch the kernels without running them (the same
            counts, without the interpreter's work; what the kernels would write is left as it was).

    Returns:
        The counts: ``aten_ops`` every ATen operation, ``compute_ops`` those that launch a kernel,
        ``triton_launches``, and ``launches`` (Triton launches plus compute operations: what the budget counts).

    Raises:
        RuntimeError: ``run_kernels`` is False and the kernels are not interpreted.
    """
    from celo2.rule.theta import Theta
    from celo2.torch import Celo2, Celo2Base

    torch.manual_seed(0)
    shapes = gpt_shapes(width) if tensors is None else block_shapes(width, tensors)
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for _, s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    theta = Theta.init(seed=0)
    lr, wd = (torch.tensor(1e-3), torch.tensor(0.01)) if tensor_lr else (1e-3, 0.01)
    if cls_name == "Celo2":
        opt = Celo2([{"params": params, "branch": "celo2"}], lr=lr, weight_decay=wd, theta=theta, backend=backend,
                    nonfinite=nonfinite)
    else:
        opt = Celo2Base(params, lr=lr, weight_decay=wd, theta=theta, backend=backend, nonfinite=nonfinite)
    kernels = contextlib.nullcontext() if run_kernels else _interpreted_kernels_skipped()
    with kernels:
        opt.step()  # state, theta upload, compilation
        counter = _Count()
        with _count_launches(counter) as launches, counter:
            opt.step()
    ops, kernel_launches = sum(counter.ops.values()), sum(launches.values())
    compute = sum(counter.compute.values())
    n = len(params)
    return {"optimizer": cls_name, "backend": backend, "width": width, "tensors": n,
            "elements": sum(p.numel() for p in params), "aten_ops": ops, "compute_ops": compute,
            "triton_launches": kernel_launches, "launches": compute + kernel_launches,
            "per_tensor": (compute + kernel_launches) / n, "aten_ops_per_tensor": ops / n,
            "launches_per_tensor": kernel_launches / n, "top_ops": counter.ops.most_common(8),
            "compute_by_op": dict(counter.compute), "launches_by_kernel": dict(launches)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", default="32,64")
    ap.add_argument("--backends", default="triton,torch")
    ap.add_argument("--optimizers", default="Celo2,Celo2Base")
    ap.add_argument("--tensors", default=None,
                    help="comma-separated counts of transformer-shaped tensors (block_shapes), e.g. 5,20; "
                         "default: the small GPT's parameters")
    ap.add_argument("--tensor-lr", action="store_true", help="lr and weight decay as 0-d tensors")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    counts = [None] if args.tensors is None else [int(t) for t in args.tensors.split(",")]
    rows = [count(o, b, int(w), t, args.tensor_lr) for o in args.optimizers.split(",")
            for b in args.backends.split(",") for w in args.widths.split(",") for t in counts]
    print(f"{'optimizer':10s} {'backend':8s} {'width':>5s} {'tensors':>7s} {'elements':>9s} {'aten ops':>9s} "
          f"{'compute':>8s} {'triton':>7s} {'launches':>8s} {'per tensor':>10s}")
    for r in rows:
        print(f"{r['optimizer']:10s} {r['backend']:8s} {r['width']:5d} {r['tensors']:7d} {r['elements']:9d} "
              f"{r['aten_ops']:9d} {r['compute_ops']:8d} {r['triton_launches']:7d} {r['launches']:8d} "
              f"{r['per_tensor']:10.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
