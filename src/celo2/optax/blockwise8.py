"""8-bit blockwise optimizer state in JAX (``state_dtype="int8"``): :mod:`celo2.rule.blockwise8` in ``jnp``.

Each accumulator is a :class:`Blockwise8` leaf pair, codes shaped like the
float32 accumulator and one float32 scale per 256 elements. The rule's state
(:class:`~celo2.optax.ScaleByCelo2State`) keeps its structure, with a
:class:`Blockwise8` in place of every accumulator array of each
:class:`~celo2.optax.state.TensorState`, and the rounding seed.
:func:`blockwise8_rule` wraps the float32 rule: each update decodes the
accumulators, runs the float32 step, and encodes the new ones with the
stochastic rounding of :mod:`celo2.rule.blockwise8` (the random bits of
:mod:`celo2.optax.rounding`: seed, the tensor's step after the update as
bfloat16 state counts it, the tensor's number, the slot, the flat index), so
the codes are bit for bit the NumPy reference's. A tensor skipped for a
non-finite gradient keeps its codes and scales bitwise.

Inside one jitted update the decoded float32 accumulators are XLA
temporaries; XLA schedules them, so the transient is not bounded per tensor
as in the PyTorch front end.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from celo2.optax.rounding import check_rounding_seed, flat_index, mix32, random_bits, stream_key, tensor_indices
from celo2.optax.state import ScaleByCelo2State, TensorState
from celo2.rule import blockwise8 as spec8
from celo2.rule import rounding as spec_rounding

__all__ = ["Blockwise8", "is_blockwise8", "encode", "decode", "blockwise8_rule", "encode_tree", "decode_tree"]


class Blockwise8(NamedTuple):
    """One accumulator stored as 8-bit codes with per-block scales.

    Attributes:
        codes: ``int8`` (``uint8`` for second moments), shaped like the accumulator.
        scales: float32, one per block of 256 elements of the flat accumulator.
    """

    codes: jax.Array
    scales: jax.Array


def is_blockwise8(state_dtype: Any) -> bool:
    """Whether a ``state_dtype=`` value selects 8-bit blockwise state (``"int8"`` or ``jnp.int8``)."""
    try:
        name = jnp.dtype(state_dtype).name
    except TypeError:
        name = str(state_dtype)
    return spec8.is_blockwise8(name)


def encode(x: jax.Array, key: str, bits: Optional[jax.Array] = None) -> Blockwise8:
    """Encode an accumulator (:func:`celo2.rule.blockwise8.quantise`).

    Args:
        x: Its float32 values.
        key: Its name (signed or square-root codes).
        bits: 16 random bits per element (``uint32``, shaped like ``x``), or ``None`` to round to the nearest code.

    Returns:
        The codes and scales.
    """
    n = x.size
    blocks = spec8.scale_count(n)
    pad = blocks * spec8.BLOCK_ELEMENTS - n
    flat = jnp.pad(x.astype(jnp.float32).reshape(-1), (0, pad)).reshape(blocks, spec8.BLOCK_ELEMENTS)
    if bits is None:
        f = jnp.full(flat.shape, spec8.NEAREST_BITS * spec8.FRACTION, jnp.float32)
    else:
        f = jnp.pad(bits.reshape(-1).astype(jnp.float32), (0, pad)).reshape(flat.shape) * jnp.float32(spec8.FRACTION)
    sqrt = spec8.is_second_moment(key)
    levels = spec8.UNSIGNED_LEVELS if sqrt else spec8.SIGNED_LEVELS
    finite = jnp.isfinite(flat)
    block_finite = finite.all(axis=1, keepdims=True)
    mag = jnp.where(finite, flat, jnp.float32(0))
    if sqrt:
        mag = jnp.sqrt(jnp.maximum(mag, jnp.float32(0)))
    largest = jnp.abs(mag).max(axis=1, keepdims=True)
    scale = largest * jnp.float32(spec8.reciprocal(levels))
    usable = block_finite & (scale > 0)
    y = mag / jnp.where(usable, scale, jnp.float32(1))
    q = jnp.clip(jnp.floor(y + f), 0 if sqrt else -levels, levels)
    if sqrt:
        q = jnp.where(usable & (mag > 0) & (q == 0), jnp.float32(1), q)
    q = jnp.where(usable, q, jnp.float32(0))
    codes = q.reshape(-1)[:n].astype(jnp.uint8 if sqrt else jnp.int8).reshape(x.shape)
    scales = jnp.where(block_finite, scale, jnp.float32(jnp.nan)).reshape(-1)
    return Blockwise8(codes, scales)


def decode(stored: Blockwise8, key: str) -> jax.Array:
    """Decode an accumulator (:func:`celo2.rule.blockwise8.dequantise`): float32, shaped like the codes."""
    codes = stored.codes
    n = codes.size
    blocks = spec8.scale_count(n)
    pad = blocks * spec8.BLOCK_ELEMENTS - n
    flat = jnp.pad(codes.reshape(-1).astype(jnp.float32), (0, pad)).reshape(blocks, spec8.BLOCK_ELEMENTS)
    value = (flat * stored.scales[:, None]).reshape(-1)[:n].reshape(codes.shape)
    return value * value if spec8.is_second_moment(key) else value


def stochastic_encode(x: jax.Array, key: str, seed: Any, step: Any, tensor: Any) -> Blockwise8:
    """Encode with the stochastic rounding of the shared counter (seed, step, tensor, ``key``'s slot, index)."""
    stream = stream_key(seed, step, tensor, spec_rounding.SLOTS[key])
    return encode(x, key, random_bits(stream, mix32(flat_index(x))))


def _is_stored(x: Any) -> bool:
    return isinstance(x, Blockwise8)


def _is_tensor_state(x: Any) -> bool:
    return isinstance(x, TensorState)


def encode_tree(tensors: Any) -> Any:
    """Every :class:`~celo2.optax.state.TensorState` of ``tensors`` with its accumulators encoded to the nearest
    code (a new or converted state)."""
    def one(node: Any) -> Any:
        if not isinstance(node, TensorState):
            return node
        return TensorState(*(x if _is_stored(x) else encode(x, k, None) for k, x in zip(TensorState._fields, node)))

    return jax.tree_util.tree_map(one, tensors, is_leaf=_is_tensor_state)


def decode_tree(tensors: Any) -> Any:
    """Every :class:`~celo2.optax.state.TensorState` of ``tensors`` with its accumulators decoded to float32."""
    def one(node: Any) -> Any:
        if not isinstance(node, TensorState):
            return node
        return TensorState(*(decode(x, k) if _is_stored(x) else x for k, x in zip(TensorState._fields, node)))

    return jax.tree_util.tree_map(one, tensors, is_leaf=_is_tensor_state)


def blockwise8_rule(inner: optax.GradientTransformation, rounding_seed: int = 0,
                    ) -> optax.GradientTransformationExtraArgs:
    """The rule ``inner`` (:func:`celo2.optax.scale_by_celo2` with float32 state) with 8-bit blockwise state.

    Args:
        inner: The float32 rule; its state is a :class:`~celo2.optax.ScaleByCelo2State`.
        rounding_seed: The seed, kept in the state (``0 <= seed < 2**32``).

    Returns:
        A transformation whose :class:`~celo2.optax.ScaleByCelo2State` holds :class:`Blockwise8` accumulators
        and the seed.

    Raises:
        ValueError: A bad ``rounding_seed``; at update, a state whose accumulators are not 8-bit (convert it
            with :func:`celo2.optax.convert_state_dtype`).
    """
    seed = check_rounding_seed(rounding_seed)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> ScaleByCelo2State:
        state = inner.init(params)
        return state._replace(tensors=encode_tree(state.tensors), rounding_seed=jnp.asarray(seed, jnp.uint32))

    def update_fn(updates: Any, state: ScaleByCelo2State, params: Any = None, **extra_args: Any,
                  ) -> tuple[Any, ScaleByCelo2State]:
        leaves = jax.tree_util.tree_leaves(state.tensors, is_leaf=_is_stored)
        if state.rounding_seed is None or any(not _is_stored(x) for x in leaves):
            raise ValueError("scale_by_celo2: this optimizer keeps 8-bit blockwise (int8) state, but the state holds "
                             "float accumulators; convert it with celo2.optax.convert_state_dtype(state, 'int8')")
        plain = state._replace(tensors=decode_tree(state.tensors), rounding_seed=None)
        out, new = inner.update(updates, plain, params, **extra_args)
        number = dict(zip((jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(updates)),
                          tensor_indices(updates, extra_args)))
        before = {jax.tree_util.keystr(p): n for p, n in jax.tree_util.tree_leaves_with_path(state.nonfinite_steps)}
        after = {jax.tree_util.keystr(p): n for p, n in jax.tree_util.tree_leaves_with_path(new.nonfinite_steps)}

        def store(path: tuple, node: Any, old: Any) -> Any:
            if not isinstance(node, TensorState):
                return old
            where = jax.tree_util.keystr(path)
            if where not in number:  # no gradient for this tensor: nothing stepped
                return old
            n_before = before.get(where, jnp.zeros((), jnp.int32))
            n_after = after.get(where, n_before)
            step = new.count - n_before  # as bfloat16 state counts: updates taken, skipped ones before this aside
            kept = n_after != n_before
            fields = []
            for k, x, o in zip(TensorState._fields, node, old):
                enc = stochastic_encode(x, k, state.rounding_seed, step, number[where])
                fields.append(Blockwise8(jnp.where(kept, o.codes, enc.codes), jnp.where(kept, o.scales, enc.scales)))
            return TensorState(*fields)

        old_nodes = jax.tree_util.tree_leaves(state.tensors, is_leaf=_is_tensor_state)
        new_flat = jax.tree_util.tree_leaves_with_path(new.tensors, is_leaf=_is_tensor_state)
        treedef = jax.tree_util.tree_structure(state.tensors, is_leaf=_is_tensor_state)
        stored = [store(p, node, old) for (p, node), old in zip(new_flat, old_nodes)]
        return out, new._replace(tensors=jax.tree_util.tree_unflatten(treedef, stored),
                                 rounding_seed=state.rounding_seed)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
