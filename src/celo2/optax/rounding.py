"""bfloat16 optimizer state in JAX: :mod:`celo2.rule.rounding`'s stochastic rounding, in ``jnp.uint32``.

With ``state_dtype=jnp.bfloat16`` the accumulators are stored as bfloat16,
read as float32 (exactly), updated in float32 and written back with the
counter-based stochastic rounding of :mod:`celo2.rule.rounding`, bit for bit:
every hash is ``jnp.uint32`` arithmetic (multiplication wraps modulo 2**32),
and the element index is the flat C-order index in the whole accumulator,
decay axis included. It is built from ``broadcasted_iota``, which XLA's
partitioner gives each shard of a split accumulator with its global values, so
a sharded step stores the same bits as an unsharded one.

The counter's ``tensor`` is a leaf's index in tree-flatten order of the
parameters. A transformation sees only the leaves routed to it (``optax.partition``
masks the others), so :func:`celo2.optax.celo2` and
:func:`celo2.optax.celo2_base` number the whole tree once and hand the numbers
down as the extra argument :data:`TENSOR_INDICES` (keyed by
``jax.tree_util.keystr`` of each leaf's path, which masking leaves unchanged);
a transformation called without it numbers the leaves it is given.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from celo2.optax.state import TensorState, explicit_split_axes
from celo2.rule import blockwise8 as spec_blockwise8
from celo2.rule import rounding as spec_rounding
from celo2.rule.state import STATE_KEYS

__all__ = [
    "StateRounding", "TENSOR_INDICES", "resolve_state_dtype", "check_rounding_seed", "mix32", "stream_key",
    "flat_index", "random_bits", "round_to_bfloat16", "stochastic_round", "load_state", "store_state",
    "number_tensors", "tensor_indices",
]

TENSOR_INDICES = "celo2_tensor_indices"
"""The extra ``update`` argument (``optax.GradientTransformationExtraArgs``) carrying the
counter's tensor numbers: ``keystr(path) -> index`` over the whole parameter tree."""

Scalar = Union[int, jax.Array]


class StateRounding(NamedTuple):
    """How one tensor's step stores its bfloat16 accumulators (``None`` in its place: float32 state).

    Attributes:
        seed: The rounding seed (a ``uint32`` scalar, traced or concrete, or an int).
        step: The tensor's step count after this step (1 at the first), modulo 2**32.
        tensor: The tensor's index in tree-flatten order of the parameters.
    """

    seed: Scalar
    step: Scalar
    tensor: Scalar


def resolve_state_dtype(state_dtype: Any) -> jnp.dtype:
    """The state dtype asked for, as a JAX dtype.

    Args:
        state_dtype: ``jnp.float32`` / ``jnp.bfloat16``, a NumPy dtype, ``"float32"`` / ``"bfloat16"``,
            or an array of that dtype (``optax.inject_hyperparams`` calls a dtype class like a
            schedule and hands over the array it makes).

    Returns:
        ``jnp.dtype("float32")`` or ``jnp.dtype("bfloat16")``.

    Raises:
        ValueError: Any other dtype, named (:func:`celo2.rule.rounding.check_state_dtype`).
    """
    if isinstance(state_dtype, (jax.Array, np.ndarray, np.generic)):
        state_dtype = state_dtype.dtype
    try:
        name = jnp.dtype(state_dtype).name
    except TypeError:
        name = str(state_dtype)
    spec_blockwise8.check_state_format(name)  # an unknown name is told every format, 8-bit included
    return jnp.dtype(spec_rounding.check_state_dtype(name))


def check_rounding_seed(seed: Any) -> "int | jax.Array":
    """The rounding seed, checked.

    Args:
        seed: An integer in ``[0, 2**32)``, or a 0-d integer array (``optax.inject_hyperparams``
            hands numeric arguments over as arrays; a traced one is taken modulo 2**32 unchecked).

    Returns:
        The seed as an int, or the traced array.

    Raises:
        ValueError: Not an integer, or outside ``[0, 2**32)``.
    """
    if isinstance(seed, (jax.Array, np.ndarray, np.generic)) and seed.ndim == 0 and \
            jnp.issubdtype(seed.dtype, jnp.integer):
        if isinstance(seed, jax.core.Tracer):
            return seed
        seed = int(seed)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**32:
        raise ValueError(f"rounding_seed must be an integer in [0, 2**32); got {seed!r}")
    return int(seed)


def _u32(x: Scalar) -> jax.Array:
    """``x`` modulo 2**32 as ``uint32`` (a Python int is reduced first; a signed array wraps)."""
    if isinstance(x, (int, np.integer)):
        return jnp.uint32(int(x) & 0xFFFFFFFF)
    return jnp.asarray(x).astype(jnp.uint32)


def mix32(x: jax.Array) -> jax.Array:
    """:func:`celo2.rule.rounding.mix32` in ``jnp.uint32``: xor-shift, multiply, xor-shift, multiply, xor-shift.

    Args:
        x: ``uint32`` values.

    Returns:
        ``uint32`` values shaped like ``x``.
    """
    a, b = spec_rounding.MIX_MULTIPLIERS
    s0, s1, s2 = spec_rounding.MIX_SHIFTS
    x = x ^ (x >> jnp.uint32(s0))
    x = x * jnp.uint32(a)
    x = x ^ (x >> jnp.uint32(s1))
    x = x * jnp.uint32(b)
    return x ^ (x >> jnp.uint32(s2))


def stream_key(seed: Scalar, step: Scalar, tensor: Scalar, slot: int) -> jax.Array:
    """:func:`celo2.rule.rounding.stream_key`: the key of one accumulator and step (a ``uint32`` scalar).

    Args:
        seed: The rounding seed.
        step: The tensor's step count after this step.
        tensor: The tensor's index.
        slot: The accumulator's :data:`celo2.rule.rounding.SLOTS` value.

    Returns:
        ``mix32(mix32(mix32(mix32(seed) ^ step) ^ tensor) ^ slot)``.
    """
    k = mix32(_u32(seed))
    k = mix32(k ^ _u32(step))
    k = mix32(k ^ _u32(tensor))
    return mix32(k ^ _u32(slot))


def flat_index(like: jax.Array) -> jax.Array:
    """The flat C-order index of every element of ``like``'s shape, modulo 2**32 (``uint32``).

    An array split over explicit mesh axes gets the index split like it; under
    XLA's partitioner each shard holds its elements' indices in the whole array.

    Args:
        like: The array whose shape (and explicit sharding) the index takes.

    Returns:
        ``uint32`` array of ``like``'s shape.
    """
    shape = tuple(like.shape)
    kw = {"out_sharding": jax.typeof(like).sharding} if explicit_split_axes(like) else {}
    index = jnp.zeros(shape, jnp.uint32, **kw)
    stride = 1
    for axis in reversed(range(len(shape))):
        iota = jax.lax.broadcasted_iota(jnp.uint32, shape, axis, **kw)
        index = index + iota * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= shape[axis]
    return index


def random_bits(key: jax.Array, mixed_index: jax.Array) -> jax.Array:
    """The 16 random bits of each element: ``mix32(key ^ mixed_index) >> 16``.

    Args:
        key: From :func:`stream_key`.
        mixed_index: ``mix32`` of the flat indices (:func:`flat_index`), which every key of a shape shares.

    Returns:
        ``uint32`` values in ``[0, 2**16)``.
    """
    return mix32(key ^ mixed_index) >> jnp.uint32(16)


def round_to_bfloat16(x: jax.Array, bits: jax.Array) -> jax.Array:
    """:func:`celo2.rule.rounding.round_to_bfloat16`: float32 values stochastically to bfloat16.

    Args:
        x: float32 values.
        bits: 16 random bits per element (``uint32``), broadcastable to ``x``.

    Returns:
        bfloat16 values: the top half of ``bits(x) + bits``; a NaN keeps its sign and top half
        with :data:`celo2.rule.rounding.BFLOAT16_QUIET_BIT` set.
    """
    u = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    top = u >> jnp.uint32(16)
    rounded = jnp.where(jnp.isnan(x), top | jnp.uint32(spec_rounding.BFLOAT16_QUIET_BIT), (u + bits) >> jnp.uint32(16))
    return jax.lax.bitcast_convert_type(rounded.astype(jnp.uint16), jnp.bfloat16)


def stochastic_round(x: jax.Array, rounding: StateRounding, slot: str) -> jax.Array:
    """One accumulator's new float32 values, stored as bfloat16 as :func:`celo2.rule.rounding.stochastic_round` does.

    Args:
        x: The whole accumulator's float32 values (any shape; split or not).
        rounding: Seed, step and tensor.
        slot: The accumulator's name in :data:`celo2.rule.rounding.SLOTS`.

    Returns:
        bfloat16 array shaped like ``x``.

    Raises:
        KeyError: An unknown ``slot``.
    """
    return _round_slot(x, rounding, slot, mix32(flat_index(x)))


def _round_slot(x: jax.Array, rounding: StateRounding, slot: str, mixed_index: jax.Array) -> jax.Array:
    key = stream_key(rounding.seed, rounding.step, rounding.tensor, spec_rounding.SLOTS[slot])
    return round_to_bfloat16(x, random_bits(key, mixed_index))


def load_state(state: TensorState) -> TensorState:
    """A tensor's accumulators as float32 (exact for bfloat16; float32 ones pass as they are).

    Args:
        state: The accumulators.

    Returns:
        The float32 :class:`~celo2.optax.state.TensorState`.
    """
    return TensorState(*(x if x.dtype == jnp.float32 else x.astype(jnp.float32) for x in state))


def store_state(state: TensorState, rounding: StateRounding) -> TensorState:
    """A tensor's new float32 accumulators stored as bfloat16, each with its slot's key.

    ``v`` (shape ``S``) holds the indices of ``m``'s first decay slice and a
    vector's ``fac_r`` those of ``m``, so their hashed indices are ``m``'s.

    Args:
        state: The new accumulators (float32).
        rounding: Seed, step and tensor.

    Returns:
        The bfloat16 :class:`~celo2.optax.state.TensorState`.
    """
    mixed_m = mix32(flat_index(state.m))
    out = []
    for key, x in zip(STATE_KEYS, state):
        if x.size == 0:
            out.append(x.astype(jnp.bfloat16))
            continue
        if tuple(x.shape) == tuple(state.m.shape):
            mixed = mixed_m
        elif tuple(x.shape) == tuple(state.m.shape[1:]):
            mixed = mixed_m[0]
        else:
            mixed = mix32(flat_index(x))
        out.append(_round_slot(x, rounding, key, mixed))
    return TensorState(*out)


def number_tensors(tree: Any) -> dict[str, int]:
    """Each leaf's index in tree-flatten order, keyed by ``jax.tree_util.keystr`` of its path.

    Args:
        tree: The parameter (or gradient) pytree.

    Returns:
        ``keystr(path) -> index``.
    """
    return {jax.tree_util.keystr(path): i for i, (path, _) in enumerate(jax.tree_util.tree_leaves_with_path(tree))}


def tensor_indices(updates: Any, extra_args: Mapping[str, Any]) -> list[int]:
    """The counter's tensor index of each leaf of ``updates``, in its flatten order.

    Args:
        updates: The (possibly masked) gradient pytree a transformation got.
        extra_args: Its ``update``'s extra arguments; :data:`TENSOR_INDICES`, where present,
            numbers the whole tree (:func:`number_tensors`).

    Returns:
        One int per leaf.

    Raises:
        KeyError: A leaf missing from :data:`TENSOR_INDICES` (a tree other than the one numbered).
    """
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(updates)]
    numbers: Mapping[str, int] | None = extra_args.get(TENSOR_INDICES)
    if numbers is None:
        return list(range(len(paths)))
    missing = [p for p in paths if p not in numbers]
    if missing:
        raise KeyError(f"{TENSOR_INDICES} does not number the leaves {missing[:5]}: the gradients' tree differs "
                       "from the one numbered")
    return [numbers[p] for p in paths]

