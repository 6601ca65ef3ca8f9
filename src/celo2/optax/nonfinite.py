"""The non-finite gradient policy ``"skip"`` as optax combinators, apart from the rule.

Like ``optax.apply_if_finite`` sits apart from ``optax.scale_by_adam``: the
rule itself (:func:`celo2.optax.scale_by_celo2`) skips a tensor inside its
step (on the CPU kernels, inside the custom call) and counts it;
:func:`skip_nonfinite_per_tensor` gives any elementwise transformation the
same policy; :func:`zero_skipped_updates` zeroes the rest of a chain's update
(weight decay, learning rate) for the tensors skipped; :func:`nonfinite_steps`
reads the counts. All of it is decided inside the jitted update with
``jnp.where``, without a host synchronisation.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from celo2.optax.state import ScaleByCelo2State


def finite(g: jax.Array) -> jax.Array:
    """The policy's flag: ``g`` holds no NaN or +-inf (a traced bool scalar).

    Args:
        g: A gradient.

    Returns:
        A bool scalar.
    """
    return jnp.all(jnp.isfinite(g))


def keep_if(ok: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where ``ok``, else ``old``, leaf by leaf (bitwise either way).

    Args:
        ok: A bool scalar.
        new: A pytree.
        old: A pytree of the same structure.

    Returns:
        The selected pytree.
    """
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


class PerTensorSkipState(NamedTuple):
    """State of :func:`skip_nonfinite_per_tensor`.

    Attributes:
        inner: The inner transformation's state per tensor (a pytree shaped like the params,
            one inner state at each leaf).
        nonfinite_steps: Per-tensor int32 counts of skipped steps.
    """

    inner: Any
    nonfinite_steps: Any


COUNTING_STATES = (ScaleByCelo2State, PerTensorSkipState)
"""The state types that count skipped steps per tensor (in a field ``nonfinite_steps``)."""


def counters(params: Any) -> Any:
    """Zero int32 counters, one per leaf of ``params``.

    Args:
        params: A pytree.

    Returns:
        A pytree like it of int32 zeros.
    """
    return jax.tree_util.tree_map(lambda _: jnp.zeros([], jnp.int32), params)


def zero_skipped_updates(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, with the whole update of every tensor that ``inner`` skipped
    for a non-finite gradient set to zero (weight decay and learning rate
    included), so that ``optax.apply_updates`` leaves that parameter as it was.

    A tensor counts as skipped when its counter in the first
    :class:`~celo2.optax.ScaleByCelo2State` or :class:`PerTensorSkipState` of
    ``inner``'s state went up in this update (so the gradient is not read
    again: on the CPU kernels a second reader would make XLA copy it).

    Args:
        inner: A transformation whose state holds such counters (a chain
            starting with ``scale_by_celo2(nonfinite="skip")`` or
            :func:`skip_nonfinite_per_tensor`, say).

    Returns:
        A transformation with ``inner``'s state (extra ``update`` arguments are handed to ``inner``).

    Raises:
        ValueError: At the first update, if ``inner``'s state holds no counters.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        out, new_state = inner.update(updates, state, params, **extra_args)
        before, after = _first_counters(state), _first_counters(new_state)
        if after is None:
            raise ValueError("zero_skipped_updates: the inner transformation keeps no non-finite counters")
        if before is None:  # a state made before the counters existed
            before = jax.tree_util.tree_map(jnp.zeros_like, after)
        out = jax.tree_util.tree_map(lambda u, a, b: jnp.where(a == b, u, jnp.zeros_like(u)), out, after, before)
        return out, new_state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _counting_nodes(state: Any) -> list:
    """The counting states (:data:`COUNTING_STATES`) inside a state, in tree order."""
    nodes = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, COUNTING_STATES))
    return [n for n in nodes if isinstance(n, COUNTING_STATES) and n.nonfinite_steps is not None]


def _first_counters(state: Any) -> Any:
    nodes = _counting_nodes(state)
    return nodes[0].nonfinite_steps if nodes else None


def skip_nonfinite_per_tensor(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` run on each tensor alone, with its own state, skipped on
    tensors whose gradient holds a NaN or +-inf (policy ``"skip"``,
    :data:`celo2.rule.spec.NONFINITE_POLICIES`): their update is zero and
    their whole inner state (step count included) stays bitwise as it was.

    Args:
        inner: An elementwise transformation such as ``optax.scale_by_adam``
            (each tensor gets its own state, so its step count advances only
            on the steps it takes, as in PyTorch's AdamW).

    Returns:
        A transformation with :class:`PerTensorSkipState`.
    """

    def init_fn(params: Any) -> PerTensorSkipState:
        return PerTensorSkipState(jax.tree_util.tree_map(inner.init, params), counters(params))

    def update_fn(updates: Any, state: PerTensorSkipState, params: Any = None) -> tuple[Any, PerTensorSkipState]:
        flat_g, treedef = jax.tree_util.tree_flatten(updates)
        flat_s = treedef.flatten_up_to(state.inner)
        flat_n = treedef.flatten_up_to(state.nonfinite_steps)
        flat_p = treedef.flatten_up_to(params) if params is not None else [None] * len(flat_g)
        outs, states, counts = [], [], []
        for g, s, n, p in zip(flat_g, flat_s, flat_n, flat_p):
            ok = finite(g)
            u, new = inner.update(g, s, p)
            outs.append(jnp.where(ok, u, jnp.zeros_like(u)))
            states.append(keep_if(ok, new, s))
            counts.append(n + jnp.logical_not(ok).astype(jnp.int32))
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return unflat(outs), PerTensorSkipState(unflat(states), unflat(counts))

    return optax.GradientTransformation(init_fn, update_fn)


def nonfinite_steps(state: Any) -> dict[str, int]:
    """Steps skipped for a non-finite gradient, per tensor, read from any
    optimizer state built here (:func:`celo2.optax.celo2`,
    :func:`~celo2.optax.celo2_base`, :func:`~celo2.optax.scale_by_celo2`,
    :func:`skip_nonfinite_per_tensor`, nested in chains or partitions).

    Reads the counters to the host (it synchronises): call it for logging.

    Args:
        state: The optimizer state (``opt.init(params)``, then updated).

    Returns:
        Tensor path (``jax.tree_util.keystr`` of its place in the params) ->
        count, summed over the transformations that count it; always 0 under
        ``nonfinite="propagate"``.
    """
    counts: dict[str, int] = {}
    for node in _counting_nodes(state):
        for path, n in jax.tree_util.tree_leaves_with_path(node.nonfinite_steps):
            key = jax.tree_util.keystr(path)
            counts[key] = counts.get(key, 0) + int(n)
    return counts
