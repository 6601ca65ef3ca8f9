"""What the CPU kernels take: which tensors, the shape of every operand, and the row blocks.

The one description of the kernels' operands, read by both front ends' host
wrappers before any kernel runs: the kernels index raw memory, so an operand
of any other shape would make them read or write out of bounds.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from celo2.rule.state import factoring, state_shapes

KINDS: tuple[str, ...] = ("vector", "matrix", "conv")
"""The kernel kinds: 0-D and 1-D tensors, matrices, conv kernels."""


def kernel_kind(shape: tuple[int, ...]) -> Optional[str]:
    """Which kernels cover a tensor of this shape, in either front end.

    Args:
        shape: The parameter's shape.

    Returns:
        ``"vector"`` (0-D or 1-D), ``"matrix"`` (2-D), ``"conv"`` (4-D,
        factored over its two leading axes, both longer than 1), else ``None``.
    """
    shape = tuple(shape)
    if len(shape) < 2:
        return "vector"
    if len(shape) == 2:
        return "matrix"
    if len(shape) == 4 and shape[0] > 1 and shape[1] > 1:
        f = factoring(shape)
        if {f.d0, f.d1} == {0, 1}:
            return "conv"
    return None


def rows_first(shape: tuple[int, ...]) -> bool:
    """Whether the row statistic (``fac_r``) of a matrix or conv kernel varies
    along its first axis (a matrix's rows, a conv kernel's output channels).

    ``fac_r`` keeps the axis ``d1`` and drops ``d0``
    (:class:`celo2.rule.state.Factoring`), so it varies along the first axis
    when ``d1`` comes before ``d0``; for a matrix this is
    :attr:`~celo2.rule.state.Factoring.rows_first`. The pass sequences take
    this flag.

    Args:
        shape: A matrix's or conv kernel's shape.

    Returns:
        The flag.

    Raises:
        ValueError: If ``shape`` is not factored (fewer than two dimensions).
    """
    f = factoring(shape)
    if f is None:
        raise ValueError(f"celo2 CPU kernels: a tensor of shape {tuple(shape)} has no factored statistics")
    return f.d1 < f.d0


def operand_shapes(kind: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The shape each operand of a kernel kind must have, for a tensor of ``shape``.

    Args:
        kind: ``"vector"``, ``"matrix"`` or ``"conv"`` (see :func:`kernel_kind`).
        shape: The parameter's shape.

    Returns:
        Operand name -> shape: ``grad`` and ``param`` (the kernel's view of the
        tensor: a vector flat, a matrix as is, a conv kernel ``(O, I, kh,
        kw)``) and the state ``m``, ``v``, ``fac_r`` (and ``fac_c`` unless a
        vector), as :func:`celo2.rule.state.state_shapes` sizes them.

    Raises:
        ValueError: If ``kind`` does not cover ``shape``.
    """
    if kernel_kind(tuple(shape)) != kind:
        raise ValueError(f"celo2 CPU kernels: a tensor of shape {tuple(shape)} is not a {kind!r} kernel's")
    state = state_shapes(shape)
    if kind == "vector":
        n = int(np.prod(shape, dtype=np.int64))
        return {"grad": (n,), "param": (n,), "m": (state["m"][0], n), "v": (n,), "fac_r": (state["fac_r"][0], n)}
    return {"grad": tuple(shape), "param": tuple(shape), **state}


STATE_OPERANDS: tuple[str, ...] = ("m", "v", "fac_r", "fac_c")
"""The operands that hold the rule's state: float32, or all of them bfloat16 bit patterns (``uint16``)."""


def check_operands(kind: str, shape: tuple[int, ...], arrays: "dict[str, object]", *, contiguous: bool = True) -> None:
    """Refuse operands the kernels cannot take safely, before any kernel runs.

    ``grad`` and ``param`` are float32; the state operands
    (:data:`STATE_OPERANDS`) are float32, or ``uint16`` bfloat16 bit
    patterns, all of one dtype.

    Args:
        kind: The kernel kind (see :func:`operand_shapes`).
        shape: The parameter's shape.
        arrays: Operand name (a key of :func:`operand_shapes`) -> array (NumPy,
            or anything with ``shape`` and ``dtype``, a JAX tracer say).
        contiguous: Also require C-contiguous NumPy arrays (default ``True``;
            ``False`` where the caller's layout is fixed by XLA).

    Raises:
        ValueError: Naming the first operand whose shape, dtype or layout is
            not what the kernel kind takes.
    """
    expected = operand_shapes(kind, shape)
    state_dtype = None
    for name, x in arrays.items():
        got = tuple(x.shape)
        dtype = np.dtype(x.dtype)
        if got != expected[name] or dtype not in ((np.float32, np.uint16) if name in STATE_OPERANDS
                                                  else (np.float32,)):
            storage = "float32 or uint16 (bfloat16 bit patterns)" if name in STATE_OPERANDS else "float32"
            raise ValueError(f"celo2 CPU kernels: {name} has shape {got} and dtype {x.dtype}, expected "
                             f"{expected[name]} {storage} for a tensor of shape {tuple(shape)} (is the "
                             f"optimizer state from another model, or the parameter resized?)")
        if name in STATE_OPERANDS:
            if state_dtype is not None and dtype != state_dtype:
                raise ValueError(f"celo2 CPU kernels: {name} is {dtype} but the state before it is {state_dtype}: "
                                 f"a tensor's state operands share one dtype")
            state_dtype = dtype
        if contiguous and isinstance(x, np.ndarray) and not x.flags.c_contiguous:
            raise ValueError(f"celo2 CPU kernels: {name} (shape {got}) is not C-contiguous")


def blocks(rows: int) -> tuple[int, int]:
    """How a tensor's rows are split into blocks, each with its own partial sums.

    Args:
        rows: The rows (a matrix's ``R``, a conv kernel's ``O``).

    Returns:
        ``(rows per block, number of blocks)``: at least 16 rows and at most
        64 blocks, so per-block column partials stay under 1/16 of the matrix.
    """
    per = max(16, -(-rows // 64))
    return per, -(-rows // per)
