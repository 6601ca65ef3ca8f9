"""8-bit blockwise optimizer state in PyTorch: :mod:`celo2.rule.blockwise8` on tensors.

A parameter whose param group has ``state_dtype="int8"`` keeps each
accumulator ``key`` as codes (``state[key]``: ``int8``, or ``uint8`` for
second moments, shaped like the float32 accumulator) and scales
(``state[key + "_scale"]``: float32, one per block of 256 elements). The
optimizer steps such a parameter alone: :func:`decoded` makes float32
copies of its accumulators, any backend's float32 step runs on them, and
:func:`encode_` stores them back with the stochastic rounding of
:mod:`celo2.rule.blockwise8` (the hash of :mod:`celo2.torch._rounding`,
so that the codes are bit for bit the NumPy reference's). The transient
float32 memory is one parameter's state, never the model's; the encoding
works through :data:`ENCODE_CHUNK_ELEMENTS` elements at a time.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from celo2.rule import blockwise8 as spec8
from celo2.torch import _rounding

ENCODE_CHUNK_ELEMENTS: int = 1 << 16
"""Elements encoded at once (a whole number of blocks): the int64 hash scratch stays a few hundred KiB."""

CODE_DTYPES: dict[bool, torch.dtype] = {True: torch.uint8, False: torch.int8}
"""Codes' dtype by whether the accumulator is a second moment (square-root codes)."""


def state_format(name: object) -> torch.dtype | str:
    """A ``state_dtype=`` value as the optimizer keeps it in a param group.

    Args:
        name: ``torch.float32``, ``torch.bfloat16``, ``"int8"`` (also ``torch.int8``), or their names.

    Returns:
        The torch dtype for float32 and bfloat16 state, :data:`celo2.rule.blockwise8.STATE_FORMAT` for 8-bit
        blockwise state.

    Raises:
        ValueError: Any other value, naming the formats (:func:`celo2.rule.blockwise8.check_state_format`).
    """
    short = spec8.check_state_format(name)
    return spec8.STATE_FORMAT if short == spec8.STATE_FORMAT else _rounding.state_dtype(short)


def is_blockwise8(state_dtype: object) -> bool:
    """Whether a param group's (normalised) ``state_dtype`` is 8-bit blockwise state."""
    return isinstance(state_dtype, str) and spec8.is_blockwise8(state_dtype)


def scale_key(key: str) -> str:
    """The state entry holding accumulator ``key``'s scales."""
    return key + spec8.SCALE_SUFFIX


def code_dtype(key: str) -> torch.dtype:
    """The dtype of accumulator ``key``'s codes."""
    return CODE_DTYPES[spec8.is_second_moment(key)]


def expected_entries(shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The stored entries of accumulators of ``shapes`` (key -> shape): codes and scales, each with its shape
    and dtype."""
    out = {}
    for key, shape in shapes.items():
        numel = 1
        for s in shape:
            numel *= int(s)
        out[key] = (tuple(shape), code_dtype(key))
        out[scale_key(key)] = ((spec8.scale_count(numel),), torch.float32)
    return out


def init_state(shapes: Mapping[str, Sequence[int]], device: torch.device) -> dict[str, torch.Tensor]:
    """Zero accumulators of ``shapes`` as codes and scales (all zero: they decode to zeros)."""
    return {key: torch.zeros(shape, dtype=dtype, device=device)
            for key, (shape, dtype) in expected_entries(shapes).items()}


def dequantise(codes: torch.Tensor, scales: torch.Tensor, key: str) -> torch.Tensor:
    """Decode an accumulator (:func:`celo2.rule.blockwise8.dequantise`): a new float32 tensor shaped like
    ``codes``."""
    n = codes.numel()
    out = codes.to(torch.float32).reshape(-1)
    full = n // spec8.BLOCK_ELEMENTS
    if full:
        out[:full * spec8.BLOCK_ELEMENTS].view(full, spec8.BLOCK_ELEMENTS).mul_(scales[:full, None])
    if n % spec8.BLOCK_ELEMENTS:
        out[full * spec8.BLOCK_ELEMENTS:].mul_(scales[full])
    if spec8.is_second_moment(key):
        out.mul_(out)
    return out.reshape(codes.shape)


def quantise_into(codes: torch.Tensor, scales: torch.Tensor, x: torch.Tensor, key: str,
                  stream: Optional[torch.Tensor], chunk_elements: int = ENCODE_CHUNK_ELEMENTS) -> None:
    """Encode float32 ``x`` into ``codes`` and ``scales`` in place (:func:`celo2.rule.blockwise8.quantise`).

    Args:
        codes: The stored codes (shaped like ``x``), written.
        scales: The stored scales, written.
        x: The new float32 values.
        key: The accumulator's name.
        stream: Its 0-d int64 key for this step (:func:`celo2.torch._rounding.stream_keys`), or ``None`` to
            round to the nearest code (:data:`celo2.rule.blockwise8.NEAREST_BITS`).
        chunk_elements: Elements encoded at once (rounded down to whole blocks, at least one).
    """
    n = x.numel()
    block = spec8.BLOCK_ELEMENTS
    step = max(block, chunk_elements // block * block)
    flat_x, flat_codes = x.reshape(-1), codes.view(-1)
    sqrt = spec8.is_second_moment(key)
    levels = spec8.UNSIGNED_LEVELS if sqrt else spec8.SIGNED_LEVELS
    low = 0 if sqrt else -levels
    reciprocal = float(spec8.reciprocal(levels))  # a float32 value: exact as a Python float
    for a in range(0, n, step):
        b = min(n, a + step)
        blocks = -(-(b - a) // block)
        part = torch.zeros(blocks * block, dtype=torch.float32, device=x.device)
        part[:b - a] = flat_x[a:b]
        part = part.view(blocks, block)
        if stream is None:
            f = torch.full((blocks, block), spec8.NEAREST_BITS * spec8.FRACTION, dtype=torch.float32, device=x.device)
        else:
            index = torch.arange(a, a + blocks * block, dtype=torch.int64, device=x.device)
            f = _rounding.random_bits(stream, index).to(torch.float32).mul_(spec8.FRACTION).view(blocks, block)
        finite = torch.isfinite(part)
        mag = torch.where(finite, part, torch.zeros((), device=x.device))
        if sqrt:
            mag = mag.clamp_(min=0).sqrt_()
        largest = mag.abs().amax(dim=1, keepdim=True)
        scale = largest * reciprocal
        block_finite = finite.all(dim=1, keepdim=True)
        usable = block_finite & (scale > 0)
        y = mag / torch.where(usable, scale, torch.ones((), device=x.device))
        q = y.add_(f).floor_().clamp_(low, levels)
        if sqrt:
            q = torch.where(usable & (mag > 0) & (q == 0), torch.ones((), device=x.device), q)
        q = torch.where(usable, q, torch.zeros((), device=x.device))
        flat_codes[a:b].copy_(q.reshape(-1)[:b - a].to(codes.dtype))
        first = a // block
        scales[first:first + blocks].copy_(
            torch.where(block_finite, scale, torch.full((), float("nan"), device=x.device)).view(-1))


def decoded(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """float32 accumulators decoded from ``state``'s codes and scales, for a float32 step; the other entries
    (counters, AdamW's step count) are shared as they are, so the step updates them in place."""
    skip = {scale_key(k) for k in keys}
    work = {k: t for k, t in state.items() if k not in skip}
    for k in keys:
        work[k] = dequantise(state[k], state[scale_key(k)], k)
    return work


def encode_(state: dict[str, torch.Tensor], work: Mapping[str, torch.Tensor], rounding: _rounding.TensorRounding,
            keys: Sequence[str], kept: Optional[torch.Tensor] = None) -> None:
    """Store the stepped float32 accumulators ``work`` into ``state``'s codes and scales, rounded stochastically.

    Args:
        state: The stored state, written in place.
        work: The new float32 values (from :func:`decoded`, stepped).
        rounding: The tensor's seed, step and index (the hash's counter).
        keys: The accumulators.
        kept: A 0-d bool tensor on the device, true where the step skipped the tensor: its codes and scales are
            kept bitwise (no host synchronisation); ``None``: always stored.
    """
    streams = rounding.keys(list(keys))
    for k in keys:
        codes, scales = state[k], state[scale_key(k)]
        if kept is None:
            quantise_into(codes, scales, work[k], k, streams[k])
            continue
        new_codes, new_scales = torch.empty_like(codes), torch.empty_like(scales)
        quantise_into(new_codes, new_scales, work[k], k, streams[k])
        codes.copy_(torch.where(kept, codes, new_codes))
        scales.copy_(torch.where(kept, scales, new_scales))


def encoded_nearest(x: torch.Tensor, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """An accumulator's values (any floating dtype) as new codes and scales rounded to the nearest code: the
    one deterministic encoding of a float32 or bfloat16 state loaded into 8-bit state.

    Args:
        x: The values.
        key: The accumulator's name.

    Returns:
        ``(codes, scales)`` on ``x``'s device.
    """
    codes = torch.empty(x.shape, dtype=code_dtype(key), device=x.device)
    scales = torch.empty(spec8.scale_count(x.numel()), dtype=torch.float32, device=x.device)
    quantise_into(codes, scales, x.to(torch.float32), key, None)
    return codes, scales
