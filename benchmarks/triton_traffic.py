"""Bytes the Triton kernels read and write per element per step, counted from their loads and stores.

For the issue's floor argument: a fused optimizer step is bound by memory
traffic, and fused AdamW moves 28 bytes per float32 element (reads p, g, m, v;
writes p, m, v). This script runs steps of :mod:`celo2.kernels.triton` under
Triton's interpreter (CPU tensors) with the interpreter's load and store entry
points wrapped, sums the bytes of the unmasked lanes of every access and
divides by the tensor's element count. Nothing is estimated by hand: the
figures are whatever the kernels' loads and stores touch.

Accesses are split by address into two kinds:

* **operands**: the full-size tensors a step must stream from device memory
  (gradient, parameter, ``m``, ``v``, a vector's full-size statistic, and
  the direction a step writes and reads back: Celo2's held direction, and
  Celo2-base's before it is applied with its output RMS);
* **scratch**: the small per-tensor buffers (factored statistics, factors, the
  rank-1 first-layer terms, per-block partial sums, the flag). Per-element
  gathers from them count every lane, though on a GPU they are mostly cache
  hits: read them as an upper bound, not as DRAM traffic.

The atomic on the non-finite flag (one per program) and the packed weights'
loads are not full-size and land in ``scratch``; Newton-Schulz (Celo2, run by
the front end between ``direction`` and ``apply_held``) is not counted.

With ``--by-pass`` it also prints, per kernel launch (pass) in launch order,
the bytes per element each operand contributes (``m`` counts its three
momenta), which is the accounting in docs/performance.md.

Usage::

    python benchmarks/triton_traffic.py                 # the default shapes
    python benchmarks/triton_traffic.py --shapes 64x48 --json out.json
    python benchmarks/triton_traffic.py --shapes 64x96 --variants celo2-base --by-pass
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before they are imported

import argparse
import collections
import contextlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch

ADAMW_BYTES = 28
"""Fused AdamW per float32 element: reads p, g, m, v (16 bytes), writes p, m, v (12)."""

DEFAULT_SHAPES = ("4096", "256x384", "64x32x3x3")
VARIANTS = ("celo2-base", "celo2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Traffic:
    """Bytes per element of one step."""

    variant: str
    dtype: str
    shape: tuple[int, ...]
    state_dtype: str
    operand_read: float
    operand_write: float
    scratch_read: float
    scratch_write: float
    passes: list[dict] = field(default_factory=list)
    """Per launch, in launch order: ``{"pass": the kernel's name ("name #2" for its second launch), "read":
    {operand: bytes}, "write": {operand: bytes}}``, bytes per element of the full-size operands (``g``, ``p``,
    ``m``, ``v``, a vector's ``fac``, the direction ``d``)."""

    @property
    def operand_total(self) -> float:
        return self.operand_read + self.operand_write


class _Counter:
    """Sums the bytes of unmasked lanes per kind, and per launched kernel and operand, while installed on the
    interpreter's builder and launcher."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.starts = np.zeros(0, np.uint64)
        self.stops = np.zeros(0, np.uint64)
        self.names: list[str] = []
        self.bytes = {"operand_read": 0, "operand_write": 0, "scratch_read": 0, "scratch_write": 0}
        self.kernel = "?"
        self.per_pass: dict[tuple[str, str, str], int] = {}  # (launch, "read" or "write", operand) -> bytes
        self.launches: list[str] = []
        self.kernels: collections.Counter = collections.Counter()  # launches per kernel

    def track(self, tensors: dict[str, torch.Tensor]) -> None:
        """Count from zero, with these named tensors as the operands (everything else counts as scratch)."""
        self.tensors = dict(tensors)
        self._ranges()
        for key in self.bytes:
            self.bytes[key] = 0
        self.per_pass.clear()
        self.launches.clear()
        self.kernels.clear()

    def _ranges(self) -> None:
        ranges = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name)
                        for name, t in self.tensors.items() if t.numel())
        self.starts = np.array([a for a, _, _ in ranges], np.uint64)
        self.stops = np.array([b for _, b, _ in ranges], np.uint64)
        self.names = [name for _, _, name in ranges]

    @contextlib.contextmanager
    def full_size_allocations(self, numel: int) -> Iterator[None]:
        """Count every tensor of ``numel`` elements (up to 15 more: the kernels pad buffers to 16) allocated
        inside as an operand too: the buffer of the direction a step writes and reads back."""
        empty = torch.empty

        def watched(*size, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t = empty(*size, **kwargs)
            if numel <= t.numel() < numel + 16:
                self.tensors["d" if "d" not in self.tensors else f"d{len(self.tensors)}"] = t
                self._ranges()
            return t

        torch.empty = watched
        try:
            yield
        finally:
            torch.empty = empty

    def add(self, ptrs: np.ndarray, mask: np.ndarray, itemsize: int, direction: str) -> None:
        addr = np.asarray(ptrs, np.uint64)[np.broadcast_to(np.asarray(mask, bool), np.shape(ptrs))]
        if addr.size == 0:
            return
        idx = np.searchsorted(self.starts, addr, side="right") - 1
        inside = (idx >= 0) & (addr < self.stops[np.maximum(idx, 0)])
        operand = int(inside.sum())
        self.bytes[f"operand_{direction}"] += operand * itemsize
        self.bytes[f"scratch_{direction}"] += (addr.size - operand) * itemsize
        for k, hits in zip(*np.unique(idx[inside], return_counts=True)):
            key = (self.kernel, direction, self.names[k])
            self.per_pass[key] = self.per_pass.get(key, 0) + int(hits) * itemsize

    @contextlib.contextmanager
    def installed(self) -> Iterator["_Counter"]:
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        load, store = builder.create_masked_load, builder.create_masked_store
        counter = self

        def counted_load(self, ptrs, mask, other, cache_policy, is_volatile):  # noqa: ANN001, ANN202
            out = load(self, ptrs, mask, other, cache_policy, is_volatile)
            counter.add(ptrs.data, mask.data, out.data.dtype.itemsize, "read")
            return out

        def counted_store(self, ptrs, value, mask, cache_policy):  # noqa: ANN001, ANN202
            counter.add(ptrs.data, mask.data, value.data.dtype.itemsize, "write")
            return store(self, ptrs, value, mask, cache_policy)

        def named_run(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            name = self.fn.__name__.lstrip("_")  # a launch (helpers are called, not run)
            counter.kernels[name] += 1
            counter.kernel = name if counter.kernels[name] == 1 else f"{name} #{counter.kernels[name]}"
            counter.launches.append(counter.kernel)
            return run(self, *args, **kwargs)

        function = interpreter.InterpretedFunction
        run = function.run
        builder.create_masked_load, builder.create_masked_store = counted_load, counted_store
        function.run = named_run
        try:
            yield self
        finally:
            builder.create_masked_load, builder.create_masked_store = load, store
            function.run = run


@dataclass
class _Rounding:
    """What the kernels read of ``celo2.torch.backends.base.StateRounding``."""

    seed: int
    steps: list
    tensors: list


def measure(variant: str, dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0,
            state_dtype: torch.dtype = torch.float32) -> Traffic:
    """Bytes per element of the second step of ``variant`` on a tensor of ``shape``.

    Args:
        variant: ``"celo2-base"`` (:func:`~celo2.kernels.triton.apply_step`) or ``"celo2"``
            (:func:`~celo2.kernels.triton.direction`, then
            :func:`~celo2.kernels.triton.apply_held` on the direction; Newton-Schulz not counted).
        dtype: parameter and gradient dtype (state is float32).
        shape: the tensor's shape.
        seed: for the random parameter, gradients and theta.
        state_dtype: ``torch.float32``, or ``torch.bfloat16`` (stored with stochastic rounding).

    Returns:
        The :class:`Traffic` of one step (the first step runs uncounted, so both see the same code).

    Raises:
        ValueError: an unknown variant.
        RuntimeError: the kernels are not interpreted (``celo2.kernels.triton`` was imported before this
            module set ``TRITON_INTERPRET``).
    """
    import celo2
    from celo2.kernels import triton as tk
    from celo2.torch import rule

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {VARIANTS}")
    if not tk.INTERPRETED:
        raise RuntimeError("celo2.kernels.triton was imported without TRITON_INTERPRET=1; run this as a script")
    gen = torch.Generator().manual_seed(seed)
    net = tk.pack_net(celo2.Theta.init(seed=seed), "cpu")
    param = (torch.randn(shape, generator=gen) * 0.5).to(dtype)
    state = {k: v.to(state_dtype) for k, v in rule.init_tensor_state(param).items()}
    rounding = _Rounding(seed, [torch.tensor(1)], [0]) if state_dtype == torch.bfloat16 else None
    counter = _Counter()

    def step(grad: torch.Tensor) -> None:
        if variant == "celo2-base":
            tk.apply_step(net, state, grad, param, 0.01, 0.1, rounding=rounding)
        else:
            d, ok = tk.direction(net, state, grad, param, rounding=rounding)
            tk.apply_held(param, d, ok, 0.01, 0.1)

    step(torch.randn(shape, generator=gen).to(dtype))
    grad = torch.randn(shape, generator=gen).to(dtype)
    counter.track(dict(g=grad, p=param, m=state["m"], v=state["v"], **({"fac": state["fac_r"]} if param.dim() < 2
                                                                       else {})))
    with counter.installed(), counter.full_size_allocations(math.prod(shape) if shape else 1):
        step(grad)
    totals = dict(counter.bytes)
    n = math.prod(shape) if shape else 1
    passes = []
    for name in counter.launches:
        entry = {"pass": name, "read": {}, "write": {}}
        for (kernel, direction, operand), nbytes in counter.per_pass.items():
            if kernel == name:
                entry[direction][operand] = nbytes / n
        passes.append(entry)
    return Traffic(variant, str(dtype).removeprefix("torch."), tuple(shape), str(state_dtype).removeprefix("torch."),
                   *(totals[k] / n for k in ("operand_read", "operand_write", "scratch_read", "scratch_write")),
                   passes=passes)


def _streams(bytes_by_operand: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in bytes_by_operand.items()) or "-"


def _parse_shape(text: str) -> tuple[int, ...]:
    if text in ("", "scalar"):
        return ()
    try:
        return tuple(int(x) for x in text.split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected sizes joined by 'x', e.g. 256x384") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="+", type=_parse_shape, default=[_parse_shape(s) for s in DEFAULT_SHAPES],
                        help=f"tensor shapes, sizes joined by 'x' (default: {' '.join(DEFAULT_SHAPES)})")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=list(DTYPES),
                        help="parameter and gradient dtypes (default: all)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--state-dtypes", nargs="+", choices=sorted(DTYPES), default=["float32"],
                        help="state dtypes (default: float32; bfloat16 is stored with stochastic rounding)")
    parser.add_argument("--by-pass", action="store_true",
                        help="also print each pass's full-size reads and writes per element, by operand")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = []
    for variant in args.variants:
        print(f"\n{variant}: bytes per element per step (fused AdamW, float32: {ADAMW_BYTES})")
        print(f"{'dtype':<9} {'state':<9} {'shape':<12} {'read':>7} {'write':>7} {'total':>7} {'xAdamW':>7}   "
              f"{'scratch read':>12} {'scratch write':>13}")
        for state_dtype in args.state_dtypes:
            for dtype in args.dtypes:
                for shape in args.shapes:
                    t = measure(variant, DTYPES[dtype], shape, state_dtype=DTYPES[state_dtype])
                    rows.append(t)
                    print(f"{t.dtype:<9} {t.state_dtype:<9} {'x'.join(map(str, shape)) or 'scalar':<12} "
                          f"{t.operand_read:7.1f} "
                          f"{t.operand_write:7.1f} {t.operand_total:7.1f} {t.operand_total / ADAMW_BYTES:7.2f}   "
                          f"{t.scratch_read:12.1f} {t.scratch_write:13.1f}", flush=True)
                    if args.by_pass:
                        for entry in t.passes:
                            r, w = sum(entry["read"].values()), sum(entry["write"].values())
                            print(f"    {entry['pass']:<17} read {r:5.1f} ({_streams(entry['read'])}); "
                                  f"write {w:5.1f} ({_streams(entry['write'])})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"adamw_bytes": ADAMW_BYTES,
                       "rows": [{**asdict(t), "operand_total": t.operand_total} for t in rows]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
