"""Newton-Schulz orthogonalisation, batched over the matrices that share a shape.

Celo2 orthogonalises every hidden matrix's direction with
:data:`celo2.rule.spec.NS_STEPS` quintic Newton-Schulz iterations. Done one
matrix at a time that is three matrix products per iteration per tensor; the
matrices of a transformer come in a few shapes, so :func:`newton_schulz_many`
stacks those that share a shape (a tall matrix joins the wide ones of the
transposed shape) and runs one chain of batched products per batch.

The products run in ``dtype``: float32, or bfloat16 where the hardware
multiplies it natively (:func:`resolve_ns_dtype`). The Frobenius
pre-scaling is always computed in float32 from the float32 input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from celo2.hardware import ns_dtype_name, resolve_ns_dtype_name
from celo2.rule import spec

NS_INPLACE_MIN: int = 1 << 16
"""Above this many elements per batch, the iteration's update runs by column
blocks on the CPU (see :func:`newton_schulz`)."""

NS_BATCH_ELEMENTS: int = 1 << 24
"""Most elements stacked into one batch (64 MiB in float32, 32 MiB in bfloat16):
stacking saves launches and Python overhead on small matrices but holds the
whole batch, so large groups are cut into several batches. A matrix larger
than this is a batch of its own."""

CPU_BATCH_MEMBER_ELEMENTS: int = 1 << 15
"""On the CPU, only matrices up to this many elements are stacked: batched products pay there for
small matrices (per-call overhead), while larger ones run faster as one ``mm`` per matrix than as
a ``bmm`` on a batch (see docs/performance.md)."""

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def batch_member_limit(device: torch.device | str) -> Optional[int]:
    """The largest matrix (elements) stacked into a batch on ``device`` (``None``: no limit).

    Args:
        device: Where the matrices live.

    Returns:
        :data:`CPU_BATCH_MEMBER_ELEMENTS` on the CPU, ``None`` elsewhere (on a GPU
        every launch saved counts).
    """
    return CPU_BATCH_MEMBER_ELEMENTS if torch.device(device).type == "cpu" else None


def resolve_ns_dtype(ns_dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype Newton-Schulz multiplies in on ``device``.

    ``"auto"`` is bfloat16 where the hardware multiplies it natively (CUDA
    devices of compute capability 8.0 and later; CPUs with AMX-BF16 or
    AVX512-BF16, see :func:`celo2.hardware.cpu_multiplies_bf16`) and float32
    elsewhere. ``torch.float32`` / ``torch.bfloat16`` (or their names) force
    a dtype.

    Args:
        ns_dtype: ``"auto"``, ``"float32"``, ``"bfloat16"``, ``torch.float32``
            or ``torch.bfloat16``.
        device: the device the matrices live on.

    Returns:
        ``torch.float32`` or ``torch.bfloat16``.

    Raises:
        ValueError: ``ns_dtype`` is none of those.
    """
    device = torch.device(device)
    name = ns_dtype_name(ns_dtype)
    if name != "auto":
        return _DTYPES[name]
    return _DTYPES[_auto_name(device.type, device.index if device.type == "cuda" else None)]


@torch.compiler.assume_constant_result
def _auto_name(device_type: str, index: Optional[int]) -> str:
    """What ``"auto"`` means on a device (read from the hardware once per process; a constant
    under ``torch.compile``)."""
    if device_type == "cuda" and torch.cuda.get_device_capability(index)[0] < 8:
        return "float32"  # bfloat16 is emulated before Ampere
    return resolve_ns_dtype_name("auto", device_type)


def _column_blocks(x: torch.Tensor) -> int:
    """Columns per block of the in-place update, or 0 for one product: float32 on the CPU only
    (in bfloat16 the chain runs on a copy anyway, and the blocks cost time there)."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or x.numel() <= NS_INPLACE_MIN
            or torch.compiler.is_compiling()):
        return 0
    return -(-x.shape[-1] // 4)


def _chain_(x: torch.Tensor) -> torch.Tensor:
    """The iterations on a pre-scaled wide ``x`` (rows <= cols; 2-D, or 3-D as
    a batch) whose storage may be overwritten; returns the result.

    Each iteration is a Gram product and two fused multiply-adds, so the peak
    is ``x``, two Gram-sized matrices and one more ``x``. On the CPU a large
    ``x`` is updated a quarter of its columns at a time instead (column ``j``
    of ``poly @ x`` depends on column ``j`` of ``x`` only), which drops the
    last term to a quarter of ``x`` (smaller blocks trade time for little memory).
    """
    a, b, c = spec.NS_COEFFS
    batched = x.ndim == 3
    mm, addmm = (torch.bmm, torch.baddbmm) if batched else (torch.mm, torch.addmm)
    step = _column_blocks(x)
    cols = x.shape[-1]
    lead = x.shape[:-1]
    scratch = torch.empty(math.prod(lead) * step, dtype=x.dtype, device=x.device) if step else None
    for _ in range(spec.NS_STEPS):
        gram = mm(x, x.mT)
        poly = addmm(gram, gram, gram, beta=b, alpha=c)
        if not step:
            x = addmm(x, poly, x, beta=a)
            continue
        for j in range(0, cols, step):
            part = x[..., j : j + step]
            out = scratch[: math.prod(lead) * part.shape[-1]].view(*lead, part.shape[-1])
            part.copy_(addmm(part, poly, part, beta=a, out=out))
    return x


def _inverse_norm(x: torch.Tensor) -> torch.Tensor:
    """``1 / (||x||_F + eps)`` over the last two axes, in float32, kept as ``(..., 1, 1)``."""
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True, dtype=torch.float32)
    return norm.add_(spec.NS_EPS).reciprocal_()


def newton_schulz(x: torch.Tensor, *, dtype: Optional[torch.dtype] = None, inplace: bool = False) -> torch.Tensor:
    """Approximately orthogonalise the last two axes of ``x`` (batched over the leading axes).

    Args:
        x: a ``(..., R, C)`` floating tensor; tall matrices (``R > C``) are
            iterated transposed.
        dtype: the dtype of the products (default ``x.dtype``); the
            pre-scaling is computed in float32 from ``x`` either way.
        inplace: whether ``x``'s storage may be overwritten (then, in
            ``x``'s dtype, no copy of ``x`` is made).

    Returns:
        A tensor of ``x``'s shape in ``dtype`` (``x`` itself, overwritten, when
        ``inplace`` and ``dtype`` is ``x.dtype``).

    Raises:
        ValueError: ``x`` has fewer than two dimensions.
    """
    if x.ndim < 2:
        raise ValueError(f"newton_schulz needs a (..., rows, cols) tensor, got shape {tuple(x.shape)}")
    dtype = dtype or x.dtype
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = x.mT
    lead, (rows, cols) = x.shape[:-2], x.shape[-2:]
    scale = _inverse_norm(x)
    if inplace and dtype == x.dtype:
        x = x.mul_(scale)
    else:
        x = torch.mul(x, scale, out=torch.empty(x.shape, dtype=dtype, device=x.device))
    if x.ndim > 3:
        x = x.reshape(-1, rows, cols)
    x = _chain_(x).reshape(*lead, rows, cols)
    return x.mT if transpose else x


@dataclass(frozen=True)
class Batch:
    """Matrices orthogonalised together by :func:`newton_schulz_many`.

    Attributes:
        shape: the wide shape ``(rows, cols)``, ``rows <= cols``, every member
            is iterated in.
        members: indices of the members in the sequence planned.
        transposed: per member, whether its last two axes are ``(cols, rows)``.
        counts: per member, how many matrices it holds (the product of its
            leading axes; 1 for a plain matrix).
    """

    shape: tuple[int, int]
    members: tuple[int, ...]
    transposed: tuple[bool, ...]
    counts: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Elements of the stacked batch."""
        return sum(self.counts) * self.shape[0] * self.shape[1]


def plan_batches(shapes: Sequence[Sequence[int]], max_elements: int = NS_BATCH_ELEMENTS,
                 max_member: Optional[int] = None) -> list[Batch]:
    """Group matrices by their wide shape and cut each group into batches.

    Members keep their order of first appearance; a group is cut into
    consecutive batches of at most ``max_elements`` elements (a member larger
    than that is a batch alone). Decided by the shapes only, so the plan is
    the same every step.

    Args:
        shapes: the shapes, each ``(..., R, C)``; leading axes are a batch of
            ``(R, C)`` matrices (conv kernels orthogonalise their windows).
        max_elements: the most elements per batch (default
            :data:`NS_BATCH_ELEMENTS`).
        max_member: matrices with more elements than this are batches of
            their own (default ``None``: no limit; see :func:`batch_member_limit`).

    Returns:
        The batches, groups in order of first appearance.

    Raises:
        ValueError: a shape has fewer than two dimensions or ``max_elements < 1``.
    """
    if max_elements < 1:
        raise ValueError(f"max_elements={max_elements}: must be >= 1")
    groups: dict[tuple[int, int], list[tuple[int, bool, int]]] = {}
    for i, shape in enumerate(shapes):
        if len(shape) < 2:
            raise ValueError(f"newton_schulz_many: tensor {i} has shape {tuple(shape)}, needs two or more dims")
        r, c = int(shape[-2]), int(shape[-1])
        groups.setdefault((min(r, c), max(r, c)), []).append((i, r > c, math.prod(shape[:-2])))
    batches = []
    for (r, c), items in groups.items():
        cur: list[tuple[int, bool, int]] = []
        for item in items:
            if max_member is not None and item[2] * r * c > max_member:
                batches.append(Batch((r, c), (item[0],), (item[1],), (item[2],)))
                continue
            if cur and (sum(n for *_, n in cur) + item[2]) * r * c > max_elements:
                batches.append(Batch((r, c), *map(tuple, zip(*cur))))
                cur = []
            cur.append(item)
        if cur:
            batches.append(Batch((r, c), *map(tuple, zip(*cur))))
    return batches


def newton_schulz_many(mats: Sequence[torch.Tensor], *, dtype: Optional[torch.dtype] = None, inplace: bool = False,
                       max_elements: int = NS_BATCH_ELEMENTS, max_member: Optional[int] = None) -> list[torch.Tensor]:
    """:func:`newton_schulz` on every tensor of ``mats``, one chain per batch of
    :func:`plan_batches`.

    A batch of several members is stacked into one buffer in ``dtype`` (the
    copy casts and transposes); a batch of one runs on the tensor itself.

    Args:
        mats: ``(..., R, C)`` floating tensors on one device.
        dtype: the dtype of the products (default: that of ``mats[0]``).
        inplace: whether the tensors' storage may be overwritten (used only by
            batches of one member, in its own dtype).
        max_elements: the most elements per batch (default
            :data:`NS_BATCH_ELEMENTS`).
        max_member: see :func:`plan_batches`.

    Returns:
        Per tensor, in order, the result in its shape and ``dtype`` (views of
        a batch's buffer for stacked members).

    Raises:
        ValueError: a tensor has fewer than two dimensions, or the tensors
            lie on different devices.
    """
    if not mats:
        return []
    devices = {m.device for m in mats}
    if len(devices) > 1:
        raise ValueError(f"newton_schulz_many: tensors lie on several devices {sorted(map(str, devices))}")
    dtype = dtype or mats[0].dtype
    out: list[Optional[torch.Tensor]] = [None] * len(mats)
    for batch in plan_batches([tuple(m.shape) for m in mats], max_elements, max_member):
        if len(batch.members) == 1:
            i = batch.members[0]
            out[i] = newton_schulz(mats[i], dtype=dtype, inplace=inplace)
            continue
        r, c = batch.shape
        buf = torch.empty((sum(batch.counts), r, c), dtype=dtype, device=mats[0].device)
        starts = [0]
        for i, t, n in zip(batch.members, batch.transposed, batch.counts):
            m = mats[i].reshape(n, *mats[i].shape[-2:])
            buf[starts[-1] : starts[-1] + n].copy_(m.mT if t else m)
            starts.append(starts[-1] + n)
        buf.mul_(_inverse_norm(buf))
        res = _chain_(buf)
        for i, t, a, b in zip(batch.members, batch.transposed, starts, starts[1:]):
            part = res[a:b].mT if t else res[a:b]
            out[i] = part.reshape(mats[i].shape)
    return out  # type: ignore[return-value]


def waves(items: Sequence[Any], limit: int, numel: Callable[[Any], int] = lambda batch: batch.numel) -> list[list]:
    """Consecutive items gathered into waves of at most ``limit`` elements, so that a wave's raw directions
    are held together and no more.

    Args:
        items: The items in order (by default :class:`Batch` es of :func:`plan_batches`).
        limit: The most elements per wave; an item larger than this is a wave alone.
        numel: The elements of an item (default its ``numel``).

    Returns:
        The waves, each a list of consecutive items, in order.
    """
    out, cur, size = [], [], 0
    for item in items:
        if cur and size + numel(item) > limit:
            out.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += numel(item)
    return out + ([cur] if cur else [])
