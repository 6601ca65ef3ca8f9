"""8-bit blockwise optimizer state: the quantiser every front end stores ``state_dtype="int8"`` with.

With ``state_dtype="int8"`` each accumulator is stored as one 8-bit code per
element plus one float32 scale per block of :data:`BLOCK_ELEMENTS`
consecutive elements (flat C-order of the accumulator, decay axis included;
the last block may be short). The step itself runs on float32 values
decoded from the codes, and its new values are encoded again:

* Signed accumulators (the momenta ``m``, AdamW's ``exp_avg``): ``int8``
  codes ``-127..127``, ``scale = absmax * float32(1 / 127)`` over the block,
  value ``code * scale``.
* Second moments (:data:`SECOND_MOMENT_KEYS`: ``v``, ``fac_r``, ``fac_c``,
  AdamW's ``exp_avg_sq``): ``uint8`` codes of the square root,
  ``scale = max(sqrt(x)) * float32(1 / 255)`` over the block, value
  ``(code * scale)**2``.
  A positive value never gets code 0: it keeps code 1 (the block's smallest
  non-zero magnitude). Linear codes, and square-root codes without that
  floor, divide a non-zero momentum by ``eps`` where a small positive second
  moment rounds to 0, and diverge (``benchmarks/results/state-dtype``).
  Negative values (none arise from the rule) are encoded as 0.

Stochastic rounding: ``code = floor(y + f)`` clamped to the code range,
where ``y = x / scale`` (or ``sqrt(x) / scale``) and ``f = bits * 2**-16``
with ``bits`` the 16 random bits of :func:`celo2.rule.rounding.random_bits`
for the element (the same counter as bfloat16 state: seed, step, tensor,
slot, flat index). Every operation is one IEEE float32 operation
(multiplication, division by the scale, square root, addition,
``bits * 2**-16`` exact), so every implementation gets the same codes. The
scale multiplies by the float32 reciprocal of the code range rather than
dividing by it: compilers (XLA) turn a division by a constant into that
multiplication, so a division could not be bit for bit the same everywhere. ``f`` takes 2**16 values, so the
rounding is unbiased to within ``2**-16`` of a code step. With
:data:`NEAREST_BITS` for every element (``f = 0.5``) the same formula
rounds to the nearest code (ties up): a deterministic one-time encoding,
used when a float32 or bfloat16 state is loaded into 8-bit state.

Non-finite values: a block holding a NaN or +-inf stores the scale NaN and
codes 0, so the whole block decodes to NaN (an infinity becomes NaN); no
non-finite value ever decodes to a number. A block of zeros stores the
scale 0 and decodes to zeros.

The functions below are the NumPy reference every front end is tested against.
"""

from __future__ import annotations

import math

import numpy as np

from celo2.rule import rounding

STATE_FORMAT: str = "int8"
"""The ``state_dtype=`` value that selects 8-bit blockwise state."""

STATE_FORMATS: tuple[str, ...] = (*rounding.STATE_DTYPES, STATE_FORMAT)
"""Every ``state_dtype=`` value the optimizers take."""

BLOCK_ELEMENTS: int = 256
"""Elements per block sharing one float32 scale."""

SIGNED_LEVELS: int = 127
"""Largest code magnitude of a signed accumulator (``int8`` codes ``-127..127``)."""

UNSIGNED_LEVELS: int = 255
"""Largest code of a second moment's square root (``uint8`` codes ``0..255``)."""

SECOND_MOMENT_KEYS: tuple[str, ...] = ("v", "fac_r", "fac_c", "exp_avg_sq")
"""Accumulators of squares, coded by their square roots."""

SCALE_SUFFIX: str = "_scale"
"""A stored accumulator ``key`` keeps its codes under ``key`` and its scales under ``key + SCALE_SUFFIX``."""

NEAREST_BITS: int = 1 << 15
"""The ``bits`` that make :func:`quantise` round to the nearest code (``f = 0.5``)."""

FRACTION: float = 2.0 ** -16
"""The weight of one random bit pattern step: ``f = bits * FRACTION``."""


def reciprocal(levels: int) -> np.float32:
    """The float32 ``1 / levels`` a block's largest magnitude is multiplied by to give its scale."""
    return np.float32(1.0 / levels)


def is_blockwise8(name: object) -> bool:
    """Whether a ``state_dtype=`` value selects 8-bit blockwise state (``"int8"``, or a framework's
    ``int8`` dtype whose ``str`` ends in ``int8``)."""
    return str(name).rsplit(".", 1)[-1] == STATE_FORMAT


def check_state_format(name: object) -> str:
    """The canonical name of a ``state_dtype=`` value.

    Args:
        name: ``"float32"``, ``"bfloat16"`` or ``"int8"`` (a framework dtype's ``str`` is accepted too).

    Returns:
        The name as in :data:`STATE_FORMATS`.

    Raises:
        ValueError: Any other value, named.
    """
    return rounding.dtype_name_among(name, STATE_FORMATS)


def is_second_moment(key: str) -> bool:
    """Whether accumulator ``key`` is coded by its square root (:data:`SECOND_MOMENT_KEYS`)."""
    return key in SECOND_MOMENT_KEYS


def code_dtype(key: str) -> np.dtype:
    """The NumPy dtype of accumulator ``key``'s codes: ``uint8`` for second moments, else ``int8``."""
    return np.dtype(np.uint8 if is_second_moment(key) else np.int8)


def scale_count(numel: int) -> int:
    """The number of blocks (scales) of an accumulator of ``numel`` elements."""
    return math.ceil(numel / BLOCK_ELEMENTS)


def quantise(x: np.ndarray, bits: np.ndarray | int, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Encode an accumulator as 8-bit codes and per-block scales.

    Args:
        x: The accumulator's float32 values (any shape; blocks run over its flat C-order).
        bits: Per element 16 random bits (:func:`celo2.rule.rounding.random_bits`, shaped like ``x``), or one
            int for every element (:data:`NEAREST_BITS`: round to nearest).
        key: The accumulator's name (picks signed or square-root codes).

    Returns:
        ``(codes, scales)``: codes shaped like ``x`` (:func:`code_dtype`), float32 scales of shape
        ``(scale_count(x.size),)``.
    """
    x = np.asarray(x, dtype=np.float32)
    n = x.size
    pad = scale_count(n) * BLOCK_ELEMENTS - n
    flat = np.concatenate([x.reshape(-1), np.zeros(pad, np.float32)]).reshape(-1, BLOCK_ELEMENTS)
    b = np.broadcast_to(np.asarray(bits), x.shape).reshape(-1)
    f = np.concatenate([b.astype(np.float32), np.zeros(pad, np.float32)]).reshape(flat.shape) * np.float32(FRACTION)
    finite = np.isfinite(flat).all(axis=1, keepdims=True)
    sqrt = is_second_moment(key)
    with np.errstate(invalid="ignore", divide="ignore"):
        if sqrt:
            mag = np.sqrt(np.maximum(np.where(np.isfinite(flat), flat, 0), np.float32(0)))
            levels, low = UNSIGNED_LEVELS, 0
        else:
            mag = np.where(np.isfinite(flat), flat, 0)
            levels, low = SIGNED_LEVELS, -SIGNED_LEVELS
        scale = np.abs(mag).max(axis=1, keepdims=True) * reciprocal(levels)
        usable = finite & (scale > 0)
        y = np.where(usable, mag / np.where(usable, scale, np.float32(1)), np.float32(0)).astype(np.float32)
        codes = np.clip(np.floor(y + f), low, levels)
        if sqrt:
            codes = np.where(usable & (mag > 0) & (codes == 0), 1, codes)
        codes = np.where(usable, codes, 0)
    scale = np.where(finite, scale, np.float32(np.nan)).astype(np.float32)
    return codes.reshape(-1)[:n].astype(code_dtype(key)).reshape(x.shape), scale.reshape(-1)


def dequantise(codes: np.ndarray, scales: np.ndarray, key: str) -> np.ndarray:
    """Decode :func:`quantise`'s output: ``code * scale`` (squared for second moments), float32.

    Args:
        codes: The codes (any shape; blocks over its flat C-order).
        scales: One float32 scale per block.
        key: The accumulator's name.

    Returns:
        float32 values shaped like ``codes``.
    """
    codes = np.asarray(codes)
    per = np.repeat(np.asarray(scales, np.float32), BLOCK_ELEMENTS)[:codes.size].reshape(codes.shape)
    value = codes.astype(np.float32) * per
    return value * value if is_second_moment(key) else value


def stochastic_quantise(x: np.ndarray, *, seed: int, step: int, tensor: int, key: str,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """The reference: one accumulator's new float32 values stored as codes and scales with stochastic rounding.

    Args:
        x: The whole accumulator's float32 values.
        seed: The rounding seed.
        step: The tensor's step count after this step.
        tensor: The parameter's index in the optimizer's order.
        key: The accumulator's name in :data:`celo2.rule.rounding.SLOTS`.

    Returns:
        ``(codes, scales)`` as from :func:`quantise`.

    Raises:
        KeyError: An unknown ``key``.
    """
    x = np.asarray(x, dtype=np.float32)
    stream = rounding.stream_key(seed, step, tensor, rounding.SLOTS[key])
    index = np.arange(x.size, dtype=np.uint64).reshape(x.shape)
    return quantise(x, rounding.random_bits(stream, index), key)
