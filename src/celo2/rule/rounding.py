"""Low-precision optimizer state: which dtypes, and the stochastic rounding every backend writes it with.

With ``state_dtype=bfloat16`` each accumulator is computed in float32 and
rounded to bfloat16 *stochastically* when it is stored: up with probability
equal to the fraction of a bfloat16 unit it lies above the value below, so
the rounding is unbiased on average. Round-to-nearest would freeze an
exponential moving average whose decay is near 1: with ``beta = 0.999`` an
increment ``(1 - beta)(g - m)`` below half a bfloat16 unit of ``m`` is lost at
every step.

The random bits are not drawn from a generator: they are a hash of a
counter, so every backend (NumPy here, PyTorch, Numba, Triton, JAX) produces
the same bits, a run repeats bitwise, and a resumed run continues bitwise.
For one stored element the counter is

* ``seed``: the optimizer's rounding seed (32-bit, part of its state);
* ``step``: the tensor's step count after the step that writes (1 at the
  first write), modulo 2**32;
* ``tensor``: the parameter's index in the optimizer's order (PyTorch: the
  param groups' parameters in order; optax: the leaves in tree order);
* ``slot``: which accumulator (:data:`SLOTS`);
* ``index``: the element's flat C-order index in the whole (unsharded)
  accumulator, decay axis included, modulo 2**32: a shard of a sharded
  tensor uses the indices of its elements in the full tensor, so sharded
  and unsharded runs agree.

From them, with :func:`mix32` a 32-bit integer finaliser (a bijection with
good avalanche):

* ``key = mix32(mix32(mix32(mix32(seed) ^ step) ^ tensor) ^ slot)`` (one per
  accumulator and step, so a kernel derives it from scalars);
* ``bits = mix32(key ^ mix32(index)) >> 16`` (16 uniform bits per element);
* the stored bfloat16 is the top half of ``u + bits``, where ``u`` is the
  float32's bit pattern (``u + bits < 2**32`` for every finite or infinite
  ``u``, so no wrap); a NaN stays a NaN: its top half with the quiet bit set.

Every multiplication is modulo 2**32 (``uint32`` arithmetic, or a 64-bit
integer split so that no product overflows where no unsigned type exists).
The functions below are the reference the backends are tested against.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

STATE_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
"""The dtypes optimizer state can be stored in (arithmetic is always float32)."""

MIX_MULTIPLIERS: tuple[int, int] = (0x21F0AAAD, 0x735A2D97)
"""The two odd multipliers of :func:`mix32`."""

MIX_SHIFTS: tuple[int, int, int] = (16, 15, 15)
"""The three xor-shifts of :func:`mix32`."""

SLOTS: Mapping[str, int] = {
    "m": 1,
    "v": 2,
    "fac_r": 3,
    "fac_c": 4,
    "exp_avg": 5,
    "exp_avg_sq": 6,
}
"""The ``slot`` of each accumulator in the counter: the rule's (:data:`celo2.rule.state.STATE_KEYS`) and the
AdamW branch's two moments."""

BFLOAT16_QUIET_BIT: int = 0x0040
"""Set in a NaN's stored top half, so that no NaN becomes an infinity."""

_MASK32 = 0xFFFFFFFF


def dtype_name_among(name: object, allowed: tuple[str, ...]) -> str:
    """The short name of a dtype (``"torch.bfloat16"`` -> ``"bfloat16"``), checked against ``allowed``.

    Args:
        name: A dtype's name, or a framework dtype (its ``str``).
        allowed: The accepted short names.

    Returns:
        The short name.

    Raises:
        ValueError: A name not in ``allowed``, with the accepted ones listed.
    """
    short = str(name).rsplit(".", 1)[-1]
    if short not in allowed:
        raise ValueError(f"state_dtype must be one of {', '.join(allowed)}; got {name!r}")
    return short


def check_state_dtype(name: str) -> str:
    """The canonical name of a state dtype.

    Args:
        name: ``"float32"`` or ``"bfloat16"`` (a framework's dtype's ``str``, such as
            ``"torch.bfloat16"``, is accepted too).

    Returns:
        The name as in :data:`STATE_DTYPES`.

    Raises:
        ValueError: any other dtype, named.
    """
    return dtype_name_among(name, STATE_DTYPES)


def mix32(x: np.ndarray | int) -> np.ndarray:
    """The 32-bit finaliser: xor-shift, multiply, xor-shift, multiply, xor-shift (all modulo 2**32).

    Args:
        x: Unsigned 32-bit values (an int or an array of any integer dtype; taken modulo 2**32).

    Returns:
        ``uint32`` array (0-d for an int).
    """
    a, b = MIX_MULTIPLIERS
    s0, s1, s2 = MIX_SHIFTS
    x = np.asarray(x).astype(np.uint64) & np.uint64(_MASK32)
    x ^= x >> np.uint64(s0)
    x = (x * np.uint64(a)) & np.uint64(_MASK32)
    x ^= x >> np.uint64(s1)
    x = (x * np.uint64(b)) & np.uint64(_MASK32)
    x ^= x >> np.uint64(s2)
    return x.astype(np.uint32)


def stream_key(seed: int, step: int, tensor: int, slot: int) -> int:
    """The per-accumulator key of one step: ``mix32(mix32(mix32(mix32(seed) ^ step) ^ tensor) ^ slot)``.

    Args:
        seed: The rounding seed (modulo 2**32).
        step: The tensor's step count after this step (modulo 2**32).
        tensor: The parameter's index in the optimizer's order.
        slot: The accumulator's :data:`SLOTS` value.

    Returns:
        The key, an int in ``[0, 2**32)``.
    """
    k = mix32(int(seed) & _MASK32)
    k = mix32(int(k) ^ (int(step) & _MASK32))
    k = mix32(int(k) ^ (int(tensor) & _MASK32))
    return int(mix32(int(k) ^ (int(slot) & _MASK32)))


def random_bits(key: int, index: np.ndarray) -> np.ndarray:
    """The 16 random bits of each element: ``mix32(key ^ mix32(index)) >> 16``.

    Args:
        key: From :func:`stream_key`.
        index: Flat element indices in the whole accumulator (any integer dtype; modulo 2**32).

    Returns:
        ``uint32`` values in ``[0, 2**16)``, shaped like ``index``.
    """
    return mix32(np.uint32(key) ^ mix32(index)) >> np.uint32(16)


def round_to_bfloat16(x: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Stochastically round float32 values to bfloat16 bit patterns.

    Args:
        x: float32 values.
        bits: Per element, 16 random bits (:func:`random_bits`), broadcastable to ``x``.

    Returns:
        ``uint16`` bfloat16 bit patterns shaped like ``x``: the top half of
        ``bits(x) + bits``; a NaN keeps its sign and top half with
        :data:`BFLOAT16_QUIET_BIT` set.
    """
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    rounded = ((u + np.asarray(bits).astype(np.uint64)) >> np.uint64(16)).astype(np.uint32)
    nan = (u >> np.uint64(16)).astype(np.uint32) | np.uint32(BFLOAT16_QUIET_BIT)
    return np.where(np.isnan(x), nan, rounded).astype(np.uint16)


def bfloat16_to_float32(patterns: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (``uint16``) as float32 values (exact)."""
    return (np.asarray(patterns).astype(np.uint32) << np.uint32(16)).view(np.float32)


def stochastic_round(x: np.ndarray, *, seed: int, step: int, tensor: int, slot: str,
                     offset: int = 0) -> np.ndarray:
    """The reference: one accumulator's new float32 values, stored as bfloat16 bit patterns.

    Args:
        x: The accumulator's float32 values (any shape), or a contiguous run of them.
        seed: The rounding seed.
        step: The tensor's step count after this step.
        tensor: The parameter's index in the optimizer's order.
        slot: The accumulator's name in :data:`SLOTS`.
        offset: The flat index of ``x``'s first element in the whole accumulator (for a shard or a chunk).

    Returns:
        ``uint16`` bfloat16 bit patterns shaped like ``x``.

    Raises:
        KeyError: an unknown ``slot``.
    """
    x = np.asarray(x, dtype=np.float32)
    key = stream_key(seed, step, tensor, SLOTS[slot])
    index = (np.arange(x.size, dtype=np.uint64) + np.uint64(offset)).reshape(x.shape)
    return round_to_bfloat16(x, random_bits(key, index))
