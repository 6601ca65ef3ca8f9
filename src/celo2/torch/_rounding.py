"""bfloat16 optimizer state in PyTorch: :mod:`celo2.rule.rounding`'s stochastic rounding on tensors.

The hash and the rounding are int64 tensor arithmetic: every value is kept
in ``[0, 2**32)`` and every multiplication modulo 2**32 is split into a
16-bit high and low part of the constant, so that no product exceeds
2**49 and nothing overflows (``torch.uint32`` lacks multiplication and
shifts on some devices). The results are bit for bit those of the NumPy
reference, on every device, and the whole computation stays on the device:
the step count is a 0-d tensor there, and no tensor is copied from the host
(the slots are made with ``arange``), so nothing is read on the host and a
step can be captured in a CUDA graph.

A step that stores bfloat16 state computes on a float32 copy of the
tensor's accumulators (:func:`working_copy`), so that its arithmetic and
its direction are those of float32 state, and then stores every
accumulator rounded (:func:`store_state`), in blocks of at most
:data:`ROUND_CHUNK_ELEMENTS` elements, each with its elements' flat indices
in the whole accumulator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Sequence

import torch

from celo2.rule import rounding as rule_rounding

MASK32: int = 0xFFFFFFFF
"""The low 32 bits."""

ROUND_CHUNK_ELEMENTS: int = 1 << 16
"""Elements rounded at once: the int64 scratch of :func:`store` (a few blocks of 512 KiB) stays in cache."""

ROUNDED_KEYS: tuple[str, ...] = tuple(rule_rounding.SLOTS)
"""The accumulators stored in the state dtype: the rule's and the AdamW branch's moments."""

Layout = Callable[[str, torch.Tensor], tuple[tuple[int, ...], tuple[int, ...]]]
"""Where a block of an accumulator lies: ``(key, block) -> (whole accumulator's shape, the block's start on
each axis)`` (a shard of a sharded tensor; by default the block is the whole accumulator)."""


def _mul32_(x: torch.Tensor, multiplier: int) -> torch.Tensor:
    """``x * multiplier`` modulo 2**32 in place, for int64 ``x`` in ``[0, 2**32)``: the constant split in
    16-bit halves, so that no product exceeds 2**48."""
    hi, lo = multiplier >> 16, multiplier & 0xFFFF
    high = (x * hi).bitwise_and_(0xFFFF).bitwise_left_shift_(16)
    return x.mul_(lo).add_(high).bitwise_and_(MASK32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` in place on int64 values already in ``[0, 2**32)``."""
    a, b = rule_rounding.MIX_MULTIPLIERS
    s0, s1, s2 = rule_rounding.MIX_SHIFTS
    x.bitwise_xor_(x >> s0)
    _mul32_(x, a)
    x.bitwise_xor_(x >> s1)
    _mul32_(x, b)
    return x.bitwise_xor_(x >> s2)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """:func:`celo2.rule.rounding.mix32` on an int64 tensor of values in ``[0, 2**32)``.

    Args:
        x: int64 values (taken modulo 2**32).

    Returns:
        A new int64 tensor, values in ``[0, 2**32)``.
    """
    return _mix32_(x.to(torch.int64).bitwise_and(MASK32))


def stream_keys(seed: int, step: torch.Tensor, tensor: int, slots: Sequence[int]) -> torch.Tensor:
    """The keys of :func:`celo2.rule.rounding.stream_key` for several slots, computed on ``step``'s device.

    Args:
        seed: The rounding seed.
        step: A 0-d integer tensor: the tensor's step count after this step.
        tensor: The parameter's index in the optimizer's order.
        slots: The accumulators' :data:`celo2.rule.rounding.SLOTS` values.

    Returns:
        int64 keys, one per slot, on ``step``'s device.
    """
    k = _mix32_(step.to(torch.int64).bitwise_and(MASK32).bitwise_xor_(int(rule_rounding.mix32(int(seed) & MASK32))))
    k = _mix32_(k.bitwise_xor_(int(tensor) & MASK32))
    slots = [int(s) & MASK32 for s in slots]
    if slots == list(range(slots[0], slots[0] + len(slots))):  # a run: made on the device, no copy from the host
        slot = torch.arange(slots[0], slots[0] + len(slots), dtype=torch.int64, device=step.device)
    else:
        slot = torch.stack([torch.full((), s, dtype=torch.int64, device=step.device) for s in slots])
    return _mix32_(slot.bitwise_xor_(k))


def random_bits(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """16 random bits per element: ``mix32(key ^ mix32(index)) >> 16``.

    Args:
        key: A 0-d int64 key (:func:`stream_keys`).
        index: int64 flat indices in the whole accumulator (taken modulo 2**32).

    Returns:
        int64 values in ``[0, 2**16)``, shaped like ``index``.
    """
    return _mix32_(mix32(index).bitwise_xor_(key)).bitwise_right_shift_(16)


def round_to_bfloat16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Stochastically round float32 values to bfloat16 (:func:`celo2.rule.rounding.round_to_bfloat16`).

    Args:
        x: float32 values.
        bits: 16 random bits per element (int64, broadcastable to ``x``).

    Returns:
        A ``torch.bfloat16`` tensor shaped like ``x``: the top half of ``bits(x) + bits``; a NaN keeps its sign
        and top half with the quiet bit set.
    """
    u = x.contiguous().view(torch.int32).to(torch.int64).bitwise_and_(MASK32)
    top = torch.where(torch.isnan(x), (u >> 16).bitwise_or_(rule_rounding.BFLOAT16_QUIET_BIT),
                      u.add_(bits).bitwise_right_shift_(16))
    top = torch.where(top >= 0x8000, top - 0x10000, top)  # the int16 with the same 16 bits
    return top.to(torch.int16).view(torch.bfloat16)


def block_indices(whole: Sequence[int], starts: Sequence[int], shape: Sequence[int],
                  device: torch.device) -> torch.Tensor:
    """The flat C-order index in a tensor of shape ``whole`` of every element of a block of it.

    Args:
        whole: The whole tensor's shape.
        starts: The block's first index on each axis.
        shape: The block's shape.
        device: Where the indices are made.

    Returns:
        int64 indices shaped ``shape``.
    """
    index = torch.zeros((), dtype=torch.int64, device=device)
    for size, start, n in zip(whole, starts, shape):
        axis = torch.arange(start, start + n, dtype=torch.int64, device=device)
        index = index.unsqueeze(-1) * size + axis
    return index


def _sub_blocks(starts: tuple[int, ...], shape: tuple[int, ...], limit: int,
                axis: int = 0) -> Iterator[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Blocks of at most ``limit`` elements (one element per axis at least) covering the block
    ``(starts, shape)``, split along its leading axes."""
    if axis >= len(shape) or math.prod(shape) <= limit:
        yield starts, shape
        return
    inner = math.prod(shape[axis + 1:])
    rows = max(1, limit // max(inner, 1))
    for a in range(0, shape[axis], rows):
        n = min(rows, shape[axis] - a)
        sub_starts = starts[:axis] + (starts[axis] + a,) + starts[axis + 1:]
        sub_shape = shape[:axis] + (n,) + shape[axis + 1:]
        if rows == 1 and inner > limit:
            yield from _sub_blocks(sub_starts, sub_shape, limit, axis + 1)
        else:
            yield sub_starts, sub_shape


def store(dst: torch.Tensor, src: torch.Tensor, key: torch.Tensor, *, whole: Optional[Sequence[int]] = None,
          starts: Optional[Sequence[int]] = None, chunk_elements: int = ROUND_CHUNK_ELEMENTS) -> None:
    """Write ``src`` (float32) into ``dst`` (bfloat16, the same shape), stochastically rounded, a block at a time.

    Args:
        dst: The stored accumulator, or a block of it.
        src: Its new float32 values.
        key: The accumulator's key for this step (:func:`stream_keys`).
        whole: The whole accumulator's shape (default ``dst``'s).
        starts: ``dst``'s first index on each axis of the whole accumulator (default zeros).
        chunk_elements: Elements rounded at once.
    """
    if dst.numel() == 0:
        return
    shape = tuple(dst.shape)
    whole = shape if whole is None else tuple(whole)
    origin = (0,) * len(shape) if starts is None else tuple(starts)
    for sub_starts, sub_shape in _sub_blocks(origin, shape, chunk_elements):
        here = tuple(slice(s - o, s - o + n) for s, o, n in zip(sub_starts, origin, sub_shape))
        bits = random_bits(key, block_indices(whole, sub_starts, sub_shape, dst.device))
        dst[here].copy_(round_to_bfloat16(src[here].to(torch.float32), bits))


@dataclass(frozen=True)
class TensorRounding:
    """How one tensor's step stores bfloat16 state (one entry of a
    :class:`celo2.torch.backends.base.StateRounding`).

    Attributes:
        seed: The rounding seed.
        step: 0-d integer tensor on the parameter's device: the tensor's step count after this step.
        tensor: The parameter's index in the optimizer's order.
    """

    seed: int
    step: torch.Tensor
    tensor: int

    def keys(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The key of each named accumulator (:data:`celo2.rule.rounding.SLOTS`) for this step."""
        keys = stream_keys(self.seed, self.step, self.tensor, [rule_rounding.SLOTS[n] for n in names])
        return dict(zip(names, keys.unbind()))


def working_copy(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> dict[str, torch.Tensor]:
    """float32 copies of the named accumulators, for the step's arithmetic (other entries shared as they are)."""
    return {k: (t.to(torch.float32, copy=True) if k in names else t) for k, t in state.items()}


def store_state(state: dict[str, torch.Tensor], work: Mapping[str, torch.Tensor], rounding: TensorRounding,
                names: Sequence[str], layout: Optional[Layout] = None) -> None:
    """Store the float32 accumulators ``work[name]`` into the bfloat16 tensors ``state[name]``, rounded.

    Args:
        state: The stored state (bfloat16 accumulators), written in place.
        work: The new float32 values (:func:`working_copy`, stepped).
        rounding: The tensor's seed, step and index.
        names: The accumulators to store.
        layout: Where ``state``'s blocks lie in the whole accumulators (a shard's block; default: whole).
    """
    keys = rounding.keys(list(names))
    for name in names:
        dst = state[name]
        whole, starts = layout(name, dst) if layout is not None else (None, None)
        store(dst, work[name], keys[name], whole=whole, starts=starts)


def check_seed(seed: object) -> int:
    """A rounding seed as an int, or a ValueError naming it.

    Args:
        seed: An integer with ``0 <= seed < 2**32``.

    Returns:
        ``seed`` as an int.

    Raises:
        ValueError: Not an integer (a bool included) or out of range.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) and not (
            isinstance(seed, torch.Tensor) and seed.ndim == 0 and not seed.is_floating_point()):
        raise ValueError(f"invalid rounding_seed={seed!r}: expected an integer in [0, 2**32)")
    value = int(seed)
    if not 0 <= value <= MASK32:
        raise ValueError(f"invalid rounding_seed={seed!r}: expected an integer in [0, 2**32)")
    return value


def state_dtype(name: object) -> torch.dtype:
    """The torch dtype of a ``state_dtype=`` value (:func:`celo2.rule.rounding.check_state_dtype`).

    Args:
        name: ``torch.float32``, ``torch.bfloat16``, ``"float32"`` or ``"bfloat16"``.

    Returns:
        ``torch.float32`` or ``torch.bfloat16``.

    Raises:
        ValueError: Any other value, named.
    """
    return getattr(torch, rule_rounding.check_state_dtype(name))
