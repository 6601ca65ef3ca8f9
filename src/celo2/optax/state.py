"""The rule's weights and state as the JAX front end keeps them, and where they lie.

Accumulators are float32 (or bfloat16, with the stochastic rounding of
:mod:`celo2.optax.rounding`) whatever the parameter dtype, one
:class:`TensorState` per tensor, shaped by :func:`celo2.rule.state.state_shapes`
(the decay index is the leading axis of every accumulator, so each decay's
slice is contiguous). A tensor split over devices has its accumulators split
like it (:func:`state_specs`). The weights are a plain dict of float32 arrays
(:func:`theta_to_jax`), a pytree that PES can perturb.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from celo2.rule.state import STATE_KEYS, factoring, state_shapes, work_shape
from celo2.rule.theta import Theta, ThetaError
from celo2.rule.variant import PUBLISHED, RuleVariant
from celo2.theta_files import load_theta

ThetaTree = Mapping[str, jax.Array]
"""Theta key -> float32 array (concrete or traced)."""


class TensorState(NamedTuple):
    """Accumulators of one tensor (shapes for a parameter of shape ``S``).

    ``m``: ``(3, *S)`` momenta; ``v``: ``S`` second moment; for factored
    tensors ``fac_r``/``fac_c`` are the row and column statistics (``S``
    without the ``d0`` resp. ``d1`` axis, with a leading decay axis); for
    vectors ``fac_r`` is the full ``(3, *S)`` second moment and ``fac_c`` is
    empty. The fields are :data:`celo2.rule.state.STATE_KEYS`, in order.
    """

    m: jax.Array
    v: jax.Array
    fac_r: jax.Array
    fac_c: jax.Array



class ScaleByCelo2State(NamedTuple):
    """State of :func:`celo2.optax.scale_by_celo2`.

    Attributes:
        count: Updates done (int32 scalar).
        tensors: Per-parameter accumulators (a pytree shaped like the params).
        nonfinite_steps: Per-parameter int32 counts of steps skipped for a non-finite
            gradient (see :func:`celo2.optax.nonfinite_steps`); ``None`` in a state made without them.
        rounding_seed: With bfloat16 accumulators, the seed of their stochastic rounding (a
            ``uint32`` scalar, so that a checkpoint of the state carries it); ``None`` with float32 ones.
    """

    count: jax.Array
    tensors: Any
    nonfinite_steps: Any = None
    rounding_seed: Any = None


def theta_to_jax(theta: "Theta | Mapping[str, Any] | str | None" = None,
                 variant: RuleVariant = PUBLISHED) -> dict[str, jax.Array]:
    """A theta as a plain dict of float32 ``jax.Array`` (a pytree PES can perturb).

    Args:
        theta: A :class:`~celo2.Theta` (of any rule variant), a mapping keyed like
            ``variant.theta_shapes()``, a path or ``hf://`` source, or ``None`` for the shipped
            theta (see :func:`celo2.load_theta`).
        variant: The rule variant of a mapping (default the published rule); a
            :class:`~celo2.Theta` or a file carries its own.

    Returns:
        Theta key -> float32 array, the keys of the theta's rule variant.

    Raises:
        celo2.ThetaError: ``theta`` is malformed or cannot be read.
        KeyError: A mapping lacks one of ``variant``'s keys.
        celo2.ThetaError: A mapping's array has another shape than ``variant`` says.
    """
    if isinstance(theta, Mapping) and not isinstance(theta, Theta):
        for key, shape in variant.theta_shapes().items():
            if key in theta and tuple(jnp.shape(theta[key])) != shape:
                where = "" if variant.is_published else f" of rule variant {variant.label}"
                raise ThetaError(f"theta: {key!r} has shape {tuple(jnp.shape(theta[key]))}, expected {shape}{where} "
                                 "(pass variant= for a theta of another rule variant)")
        return {k: jnp.asarray(theta[k], jnp.float32) for k in variant.theta_keys}
    theta = load_theta(theta)
    return {k: jnp.asarray(theta.arrays[k]) for k in theta.variant.theta_keys}


def theta_from_jax(tree: ThetaTree, variant: RuleVariant = PUBLISHED) -> Theta:
    """Back to a framework-neutral :class:`~celo2.Theta`.

    Args:
        tree: Theta key -> array (concrete).
        variant: The rule variant ``tree`` belongs to (default the published rule).

    Returns:
        The :class:`~celo2.Theta`.
    """
    return Theta({k: np.asarray(tree[k], np.float32) for k in variant.theta_keys}, variant=variant)


def init_tensor_state(param: jax.Array, dtype: "jnp.dtype" = jnp.float32) -> TensorState:
    """Zero accumulators for ``param`` (shapes as in :class:`TensorState`).

    Where ``param``'s sharding is known (a concrete array with a
    ``NamedSharding``, or a traced one split over explicit mesh axes) each
    accumulator is split like it: the axes it shares with the parameter on the
    same mesh axes, the decay axis whole (:func:`state_specs`).

    Args:
        param: The parameter (any shape; 0-D counts as ``(1,)``).
        dtype: The accumulators' dtype: float32 (default) or bfloat16 (see :mod:`celo2.optax.rounding`).

    Returns:
        Its :class:`TensorState` of zeros.
    """
    shape = work_shape(param.shape)
    shapes = state_shapes(shape)
    place = _placements(param, shape)
    return TensorState(*(jnp.zeros(shapes[key], dtype, **kw) for key, kw in zip(STATE_KEYS, place)))


def state_specs(param_spec: "jax.sharding.PartitionSpec", shape: tuple[int, ...]) -> TensorState:
    """The ``PartitionSpec`` of each accumulator of a parameter of ``shape``
    split by ``param_spec``: its own axes keep the parameter's mesh axes, the
    decay axis and a factored statistic's reduced axis are whole.

    Args:
        param_spec: The parameter's ``PartitionSpec`` (shorter than its rank: the rest whole).
        shape: The parameter's shape (0-D counts as ``(1,)``).

    Returns:
        A :class:`TensorState` of ``PartitionSpec``.
    """
    P = jax.sharding.PartitionSpec
    shape = work_shape(shape)
    axes = tuple(param_spec) + (None,) * (len(shape) - len(tuple(param_spec)))
    f = factoring(shape)
    if f is None:
        return TensorState(P(None, *axes), P(*axes), P(None, *axes), P(None, None))
    return TensorState(P(None, *axes), P(*axes), P(None, *f.row_shape(axes)), P(None, *f.col_shape(axes)))


def _placements(param: jax.Array, shape: tuple[int, ...]) -> list[dict]:
    """``jnp.zeros`` keywords that split each accumulator like ``param``, where its sharding is known."""
    none = [{}] * len(STATE_KEYS)
    if isinstance(param, jax.Array) and not isinstance(param, jax.core.Tracer):
        sharding = getattr(param, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and len(param.shape) == len(shape):
            return [{"device": jax.sharding.NamedSharding(sharding.mesh, s)}
                    for s in state_specs(sharding.spec, shape)]
        return none
    if explicit_split_axes(param) and len(param.shape) == len(shape):
        return [{"out_sharding": s} for s in state_specs(jax.typeof(param).sharding.spec, shape)]
    return none


def _spec_axis_names(spec_: "jax.sharding.PartitionSpec") -> set[str]:
    names: set[str] = set()
    for entry in spec_:
        if entry is None or entry is jax.sharding.PartitionSpec.UNCONSTRAINED:
            continue
        names.update((entry,) if isinstance(entry, str) else entry)
    return names


def explicit_split_axes(x: jax.Array) -> set[str]:
    """The explicit mesh axes longer than 1 that split ``x``, as its type says.

    Args:
        x: An array or tracer.

    Returns:
        The axis names (empty when none).
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or not mesh.shape:
        return set()
    return {a for a in _spec_axis_names(sharding.spec) if a in mesh.explicit_axes and mesh.shape[a] > 1}


def may_be_split(*arrays: jax.Array) -> bool:
    """Whether any of ``arrays`` may lie in pieces on several devices, as far
    as its type tells at trace time (no host synchronisation).

    An array on one device, or replicated over explicit mesh axes, is not
    split; one split by an explicit mesh axis is; one whose mesh has an
    ``Auto`` axis longer than 1 may be (the partitioner places it after
    tracing, so it counts as split). Manual axes (inside ``shard_map``) hold
    the local block: they do not split it.

    Args:
        arrays: Arrays or tracers.

    Returns:
        ``True`` when some array may be split across devices.
    """
    for x in arrays:
        sharding = getattr(jax.typeof(x), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or not mesh.shape:
            continue
        if any(mesh.shape[a] > 1 for a in mesh.auto_axes) or explicit_split_axes(x):
            return True
    return False
