"""bfloat16 optimizer state at the level of whole transformations: the AdamW branch's moments, and
converting a state between float32 and bfloat16.

:func:`celo2.optax.celo2` with ``state_dtype=jnp.bfloat16`` keeps the rule's
accumulators (:class:`~celo2.optax.ScaleByCelo2State`) and the AdamW branch's
moments in bfloat16. The AdamW branch is optax's own ``scale_by_adam`` (its
arithmetic, in float32) inside :func:`rounded_adam_moments`, which hands it the
moments as float32 and stores what it returns with the stochastic rounding of
:mod:`celo2.optax.rounding` (slots ``exp_avg`` and ``exp_avg_sq``, step = the
moments' own ``count`` after the update).

A bfloat16 state has the float32 state's structure, with
:class:`RoundedAdamState` around the AdamW branch's moments and the rounding
seed in :class:`~celo2.optax.ScaleByCelo2State`; :func:`convert_state_dtype`
turns one into the other.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from celo2.optax.blockwise8 import (Blockwise8, decode, encode, is_blockwise8,
                                    stochastic_encode)
from celo2.optax.nonfinite import PerTensorSkipState
from celo2.optax.rounding import (StateRounding, check_rounding_seed, resolve_state_dtype, stochastic_round,
                                  tensor_indices)
from celo2.optax.state import ScaleByCelo2State, TensorState
from celo2.rule import routing

__all__ = ["RoundedAdamState", "rounded_adam_moments", "blockwise8_adam_moments", "convert_state_dtype"]

ADAM_SLOTS = {"mu": "exp_avg", "nu": "exp_avg_sq"}
"""``optax.ScaleByAdamState``'s moments -> their slot in :data:`celo2.rule.rounding.SLOTS`."""


class RoundedAdamState(NamedTuple):
    """State of :func:`rounded_adam_moments` and :func:`blockwise8_adam_moments`.

    Attributes:
        inner: The inner transformation's state, its moments in bfloat16 (or as
            :class:`~celo2.optax.blockwise8.Blockwise8` codes and scales): an
            ``optax.ScaleByAdamState`` (one count for all tensors), or a
            :class:`~celo2.optax.PerTensorSkipState` holding one per tensor.
        rounding_seed: The seed of the stochastic rounding (``uint32`` scalar).
    """

    inner: Any
    rounding_seed: jax.Array


def _adam_nodes(state: Any) -> list:
    """The ``optax.ScaleByAdamState`` nodes of ``state`` (at any depth)."""
    nodes = jax.tree_util.tree_leaves(state, is_leaf=_is_adam)
    return [n for n in nodes if isinstance(n, optax.ScaleByAdamState)]


def rounded_adam_moments(inner: optax.GradientTransformation, rounding_seed: int = 0,
                         ) -> optax.GradientTransformationExtraArgs:
    """``inner`` with its Adam moments stored as bfloat16, rounded stochastically.

    Each update reads the moments as float32 (exact), runs ``inner`` on them,
    and stores the new ones with :func:`celo2.optax.rounding.stochastic_round`:
    seed from the state, step = the moments' ``count`` after the update,
    tensor = the leaf's number (:func:`celo2.optax.rounding.tensor_indices`),
    slot ``exp_avg`` (``mu``) or ``exp_avg_sq`` (``nu``). A tensor whose count
    did not advance (skipped by :func:`celo2.optax.skip_nonfinite_per_tensor`)
    keeps its stored moments bitwise.

    Args:
        inner: ``optax.scale_by_adam(...)``, or :func:`celo2.optax.skip_nonfinite_per_tensor` of it.
        rounding_seed: The seed, kept in the state (``0 <= seed < 2**32``).

    Returns:
        A transformation with :class:`RoundedAdamState`.

    Raises:
        ValueError: A bad ``rounding_seed``; at ``init``, an ``inner`` whose state holds no Adam moments.
    """
    return _stored_adam_moments("rounded_adam_moments", inner, rounding_seed,
                                store=lambda slot, x: x.astype(jnp.bfloat16),
                                load=lambda slot, x: x.astype(jnp.float32), write=_write_bfloat16)


def _code_moments(state: Any, code: Any) -> Any:
    """``state`` with every moment leaf ``x`` of every ``optax.ScaleByAdamState`` in it replaced by
    ``code(slot, x)`` (a leaf: an array or a :class:`~celo2.optax.blockwise8.Blockwise8`)."""
    def one(node: Any) -> Any:
        if not isinstance(node, optax.ScaleByAdamState):
            return node
        return node._replace(**{k: jax.tree_util.tree_map(lambda x, slot=slot: code(slot, x), getattr(node, k),
                                                          is_leaf=_is_stored)
                                for k, slot in ADAM_SLOTS.items()})

    return jax.tree_util.tree_map(one, state, is_leaf=_is_adam)


def _is_stored(x: Any) -> bool:
    return isinstance(x, Blockwise8)


def _write_blockwise8(x: jax.Array, kept: Blockwise8, moved: jax.Array, rounding: StateRounding,
                      slot: str) -> Blockwise8:
    """A moment's new float32 values as 8-bit codes and scales (stochastic rounding), or ``kept`` bitwise where
    the tensor did not move."""
    new = stochastic_encode(x.astype(jnp.float32), slot, rounding.seed, rounding.step, rounding.tensor)
    return Blockwise8(jnp.where(moved, new.codes, kept.codes), jnp.where(moved, new.scales, kept.scales))


def _write_bfloat16(x: jax.Array, kept: jax.Array, moved: jax.Array, rounding: StateRounding,
                    slot: str) -> jax.Array:
    """A moment's new float32 values as bfloat16 (stochastic rounding), or ``kept`` bitwise where the tensor did
    not move."""
    return jnp.where(moved, stochastic_round(x.astype(jnp.float32), rounding, slot), kept)


def blockwise8_adam_moments(inner: optax.GradientTransformation, rounding_seed: int = 0,
                            ) -> optax.GradientTransformationExtraArgs:
    """``inner`` with its Adam moments stored as 8-bit blockwise codes and scales (:mod:`celo2.optax.blockwise8`).

    As :func:`rounded_adam_moments`, with :func:`celo2.optax.blockwise8.stochastic_encode` in place of the
    bfloat16 rounding (same seed, step, tensor and slots).

    Args:
        inner: ``optax.scale_by_adam(...)``, or :func:`celo2.optax.skip_nonfinite_per_tensor` of it.
        rounding_seed: The seed, kept in the state (``0 <= seed < 2**32``).

    Returns:
        A transformation with :class:`RoundedAdamState` whose moments are
        :class:`~celo2.optax.blockwise8.Blockwise8` leaves.

    Raises:
        ValueError: A bad ``rounding_seed``; at ``init``, an ``inner`` whose state holds no Adam moments.
    """
    return _stored_adam_moments("blockwise8_adam_moments", inner, rounding_seed,
                                store=lambda slot, x: encode(x, slot),
                                load=lambda slot, x: decode(x, slot) if _is_stored(x) else x,
                                write=_write_blockwise8)


def _stored_adam_moments(name: str, inner: optax.GradientTransformation, rounding_seed: int, store: Any,
                         load: Any, write: Any) -> optax.GradientTransformationExtraArgs:
    """``inner`` with its Adam moments kept as ``store(slot, x)`` makes them: read back as float32 by ``load``
    before each update, written by ``write`` after it (stochastic rounding; a skipped tensor keeps its stored
    moments bitwise). ``name`` is the public transformation's, for errors."""
    seed = check_rounding_seed(rounding_seed)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> RoundedAdamState:
        state = inner.init(params)
        if not _adam_nodes(state):
            raise ValueError(f"{name}: the inner transformation keeps no optax.ScaleByAdamState")
        return RoundedAdamState(_code_moments(state, store), jnp.asarray(seed, jnp.uint32))

    def update_fn(updates: Any, state: RoundedAdamState, params: Any = None, **extra_args: Any,
                  ) -> tuple[Any, RoundedAdamState]:
        indices = dict(zip(_leaf_paths(updates), tensor_indices(updates, extra_args)))
        out, new = inner.update(updates, _code_moments(state.inner, load), params, **extra_args)
        return out, RoundedAdamState(_round_moments(new, state.inner, indices, state.rounding_seed, write),
                                     state.rounding_seed)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _leaf_paths(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(tree)]


def _round_moments(new: Any, old: Any, indices: dict[str, int], seed: jax.Array, write: Any,
                   ) -> Any:
    """``new`` (float32 moments) stored by ``write``; ``old`` is the state before the
    update (as stored)."""
    if isinstance(new, PerTensorSkipState):  # one Adam state per tensor, at the tensor's place
        pairs = zip(jax.tree_util.tree_leaves_with_path(new.inner, is_leaf=_is_adam),
                    jax.tree_util.tree_leaves(old.inner, is_leaf=_is_adam))
        flat = [_store(node, before, seed, lambda _, t=indices[jax.tree_util.keystr(path)]: t, write)
                for (path, node), before in pairs]
        treedef = jax.tree_util.tree_structure(new.inner, is_leaf=_is_adam)
        return new._replace(inner=jax.tree_util.tree_unflatten(treedef, flat))
    if _is_adam(new):  # one count for all tensors: the moments are trees like the parameters
        return _store(new, old, seed, lambda path: indices[jax.tree_util.keystr(path)], write)
    raise ValueError(f"rounded_adam_moments: cannot store the moments of a {type(new).__name__} state; the inner "
                     "transformation must be optax.scale_by_adam or skip_nonfinite_per_tensor of it")


def _store(node: optax.ScaleByAdamState, before: optax.ScaleByAdamState, seed: jax.Array,
           tensor_of: Any, write: Any) -> optax.ScaleByAdamState:
    """``node``'s float32 moments stored by ``write`` (``tensor_of(path)``: a moment leaf's tensor number);
    where the count did not advance (a skipped tensor) the stored ``before`` moments are kept bitwise."""
    moved = node.count != before.count
    fields = {}
    for key, slot in ADAM_SLOTS.items():
        def one(path: tuple, x: jax.Array, kept: Any, slot: str = slot) -> Any:
            return write(x, kept, moved, StateRounding(seed, node.count, tensor_of(path)), slot)

        fields[key] = jax.tree_util.tree_map_with_path(one, getattr(node, key), getattr(before, key))
    return node._replace(**fields)


def convert_state_dtype(state: Any, dtype: Any, *, rounding_seed: int = 0) -> Any:
    """A Celo2 optimizer state with its accumulators in ``dtype``: float32, bfloat16 or 8-bit blockwise.

    Converts the states of :func:`celo2.optax.celo2`, :func:`~celo2.optax.celo2_base`
    and :func:`~celo2.optax.scale_by_celo2` (also inside chains, ``optax.inject_hyperparams``
    and the like) into the state the same optimizer built with ``state_dtype=dtype``
    keeps: the rule's accumulators and the AdamW branch's moments (the
    ``routing.ADAM`` group of :func:`~celo2.optax.celo2`'s partition). float32 ->
    bfloat16 rounds to nearest-even, and a float32 or bfloat16 value -> 8-bit codes
    (``"int8"``, :class:`~celo2.optax.blockwise8.Blockwise8`) rounds to the nearest code
    (one rounding, so no drift can build up), and either sets the rounding seed where
    the state has none; bfloat16 -> float32 is exact, 8-bit codes decode to their
    float32 values (:func:`celo2.optax.blockwise8.decode`, then cast), and float32 state
    drops the seed. Counts and non-finite counters are kept. A state already in
    ``dtype`` comes back equal.

    Args:
        state: The optimizer state.
        dtype: ``jnp.float32``, ``jnp.bfloat16`` or ``"int8"`` (or their names).
        rounding_seed: The seed a float32 state gets when converted to bfloat16 or 8-bit state.

    Returns:
        The converted state (a new pytree; ``state`` is not changed).

    Raises:
        ValueError: An unknown ``dtype`` or bad seed; an accumulator or moment that is
            neither float32 nor bfloat16 nor 8-bit codes (named by its path in ``state``); no Celo2 state in
            ``state``.
    """
    eight = is_blockwise8(dtype)
    target = None if eight else resolve_state_dtype(dtype)
    name = "int8" if eight else target.name
    seed = check_rounding_seed(rounding_seed)
    seeded = eight or target == jnp.bfloat16
    found = []

    def check(path: Any, x: Any, slot: str) -> Any:
        """One accumulator converted: decoded when stored as codes, checked, then cast or encoded."""
        if _is_stored(x):
            if eight:
                return x
            x = decode(x, slot)
        elif jnp.dtype(x.dtype).name not in ("float32", "bfloat16"):
            raise ValueError(f"convert_state_dtype: the state leaf {jax.tree_util.keystr(path)} is "
                             f"{jnp.dtype(x.dtype).name}, neither float32 nor bfloat16; it cannot convert to {name}")
        return encode(x, slot) if eight else x.astype(target)

    def rule_state(path: tuple, node: ScaleByCelo2State) -> ScaleByCelo2State:
        where = path + (jax.tree_util.GetAttrKey("tensors"),)

        def tensor(p: tuple, ts: Any) -> Any:
            if not isinstance(ts, TensorState):
                return ts
            return TensorState(*(check(where + p + (jax.tree_util.GetAttrKey(k),), x, k)
                                 for k, x in zip(TensorState._fields, ts)))

        tensors = jax.tree_util.tree_map_with_path(tensor, node.tensors, is_leaf=lambda x: isinstance(x, TensorState))
        old_seed = node.rounding_seed
        new_seed = (old_seed if old_seed is not None else jnp.asarray(seed, jnp.uint32)) if seeded else None
        return node._replace(tensors=tensors, rounding_seed=new_seed)

    def adam_state(path: tuple, node: Any) -> Any:
        inner = node.inner if isinstance(node, RoundedAdamState) else node

        def convert(adam: Any) -> Any:
            if not _is_adam(adam):
                return adam
            return adam._replace(**{k: jax.tree_util.tree_map_with_path(
                lambda q, x, slot=slot, k=k: check(path + (jax.tree_util.GetAttrKey(k),) + q, x, slot),
                getattr(adam, k), is_leaf=_is_stored) for k, slot in ADAM_SLOTS.items()})

        cast = jax.tree_util.tree_map(convert, inner, is_leaf=_is_adam)
        if not seeded:
            return cast
        own_seed = node.rounding_seed if isinstance(node, RoundedAdamState) else jnp.asarray(seed, jnp.uint32)
        return RoundedAdamState(cast, own_seed)

    def walk(path: tuple, tree: Any) -> Any:
        def visit(p: tuple, node: Any) -> Any:
            if isinstance(node, ScaleByCelo2State):
                found.append(path + p)
                return rule_state(path + p, node)
            if isinstance(node, optax.PartitionState):
                where = path + p + (jax.tree_util.GetAttrKey("inner_states"),)
                return optax.PartitionState({
                    k: _walk_adam(where + (jax.tree_util.DictKey(k),), v, adam_state) if k == routing.ADAM
                    else walk(where + (jax.tree_util.DictKey(k),), v) for k, v in node.inner_states.items()})
            return node

        return jax.tree_util.tree_map_with_path(
            visit, tree, is_leaf=lambda x: isinstance(x, (ScaleByCelo2State, optax.PartitionState)))

    out = walk((), state)
    if not found:
        raise ValueError("convert_state_dtype: no Celo2 state (ScaleByCelo2State) in the given state: it converts "
                         "the states of celo2, celo2_base and scale_by_celo2")
    return out


def _walk_adam(path: tuple, node: Any, convert: Any) -> Any:
    """Apply ``convert`` to the outermost Adam-moment holders in the AdamW branch's state."""
    holders = (RoundedAdamState, PerTensorSkipState, optax.ScaleByAdamState)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: convert(path + p, x) if isinstance(x, holders) else x, node,
        is_leaf=lambda x: isinstance(x, holders))


def _is_adam(x: Any) -> bool:
    """Whether ``x`` is an ``optax.ScaleByAdamState`` (the holder of a pair of Adam moments)."""
    return isinstance(x, optax.ScaleByAdamState)
