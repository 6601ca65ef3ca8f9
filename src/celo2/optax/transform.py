"""Celo2 as optax transformations, built from optax's own combinators."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from celo2.hardware import ns_dtype_name, resolve_ns_dtype_name
from celo2.rule import routing, spec
from celo2.rule.theta import Theta
from celo2.optax.rule import TensorState, init_tensor_state, tensor_step, theta_to_jax

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
ThetaLike = Union[Theta, Mapping[str, Any], str, None]


class ScaleByCelo2State(NamedTuple):
    """Per-parameter accumulators (a pytree shaped like the params) and a step count."""

    count: jax.Array
    tensors: Any


def _is_tensor_state(x: Any) -> bool:
    return isinstance(x, TensorState)


def scale_by_celo2(
    theta: ThetaLike = None, orthogonalize: bool = True, cpu_kernels: bool | None = None, ns_dtype: Any = "auto",
) -> optax.GradientTransformation:
    """The raw Celo2 rule: turns gradients into unit-RMS update directions.

    ``theta`` is a :class:`~celo2.Theta`, a path (see :func:`celo2.load_theta`),
    a dict of arrays keyed like :data:`celo2.rule.spec.THETA_KEYS` (may be
    traced, e.g. inside a meta-gradient), or ``None`` for the shipped theta.
    ``update`` needs ``params``. Like ``optax.scale_by_adam``, the output is a
    descent direction to be scaled by ``-learning_rate``.

    ``cpu_kernels``: on CPU, run float32 vectors, matrices and conv kernels
    through the fused Numba kernels (an XLA custom call,
    :mod:`celo2.optax.cpu_ffi`) instead of XLA's own loop; same numbers to
    float32 rounding, about 3x faster, but not differentiable. ``None`` (default): on when Numba is installed and theta
    is not traced; ``False``: XLA everywhere (needed to differentiate through
    the update); ``True``: on, and an error if Numba is missing. Other
    platforms always compile the XLA formulation.

    ``ns_dtype``: the dtype of Newton-Schulz's matrix products. ``"auto"``
    (default): bfloat16 where the default backend multiplies it natively (GPU,
    CPUs with AMX or AVX512-BF16, see :func:`celo2.hardware.resolve_ns_dtype_name`),
    float32 elsewhere and whenever theta is traced (a meta-gradient through
    the update keeps float32); ``"float32"`` / ``"bfloat16"`` (or
    ``jnp.float32`` / ``jnp.bfloat16``) force it.

    Raises:
        ValueError: an unknown ``ns_dtype``, or ``cpu_kernels=True`` without Numba.
    """
    traced = _is_traced_mapping(theta)
    theta_tree = theta_to_jax(theta) if not traced else dict(theta)
    use_kernels = _resolve_cpu_kernels(cpu_kernels, traced)
    ns_name = ns_dtype_name(ns_dtype)
    if ns_name == "auto":
        ns_name = "float32" if traced else resolve_ns_dtype_name("auto", jax.default_backend())
    ns = jnp.dtype(ns_name)

    def init_fn(params: Any) -> ScaleByCelo2State:
        return ScaleByCelo2State(
            count=jnp.zeros([], jnp.int32),
            tensors=jax.tree_util.tree_map(init_tensor_state, params),
        )

    def update_fn(updates: Any, state: ScaleByCelo2State, params: Any = None) -> tuple[Any, ScaleByCelo2State]:
        if params is None:
            raise ValueError("scale_by_celo2 needs the parameters: call update(grads, state, params)")
        flat_g, treedef = jax.tree_util.tree_flatten(updates)
        flat_p = treedef.flatten_up_to(params)
        flat_s = treedef.flatten_up_to(state.tensors)
        outs, new_states = [], []
        for g, p, s in zip(flat_g, flat_p, flat_s):
            if g is None:
                outs.append(None)
                new_states.append(s)
                continue
            direction, s = tensor_step(theta_tree, s, g, p, orthogonalize, use_kernels, ns)
            outs.append(direction)
            new_states.append(s)
        return (
            jax.tree_util.tree_unflatten(treedef, outs),
            ScaleByCelo2State(
                count=optax.safe_increment(state.count),
                tensors=jax.tree_util.tree_unflatten(treedef, new_states),
            ),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _resolve_cpu_kernels(cpu_kernels: bool | None, traced_theta: bool) -> bool:
    from celo2.optax import cpu_ffi

    if cpu_kernels is None:
        return cpu_ffi.AVAILABLE and not traced_theta
    if cpu_kernels and not cpu_ffi.AVAILABLE:
        raise ValueError("cpu_kernels=True needs Numba (pip install numba, or celo2[jax]) and a JAX with jax.ffi; "
                         "pass cpu_kernels=None to fall back to XLA")
    return bool(cpu_kernels)


def _is_traced_mapping(theta: ThetaLike) -> bool:
    return isinstance(theta, Mapping) and not isinstance(theta, Theta) and any(
        isinstance(v, jax.core.Tracer) for v in theta.values()
    )


def _path_name(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path)


def default_param_labels(adam_name_pattern: str | None = routing.ADAM_NAME_PATTERN) -> Callable[[Any], Any]:
    """Label function for :func:`optax.partition`: ``"adam"`` for vectors and
    for matrices whose path matches ``adam_name_pattern``, else ``"celo2"``."""

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda path, x: routing.route(_path_name(path), jnp.shape(x), adam_name_pattern), params
        )

    return labels


def _scaled(learning_rate: ScalarOrSchedule, mult: float) -> ScalarOrSchedule:
    if callable(learning_rate):
        return lambda count: mult * learning_rate(count)
    return mult * learning_rate


def celo2(
    learning_rate: ScalarOrSchedule,
    weight_decay: float = 0.0,
    adam_lr_mult: float = spec.ADAM_LR_MULT,
    adam_b1: float = spec.ADAM_BETAS[0],
    adam_b2: float = spec.ADAM_BETAS[1],
    adam_eps: float = spec.ADAM_EPS,
    theta: ThetaLike = None,
    orthogonalize: bool = True,
    param_labels: Any = None,
    adam_name_pattern: str | None = routing.ADAM_NAME_PATTERN,
    cpu_kernels: bool | None = None,
    ns_dtype: Any = "auto",
) -> optax.GradientTransformation:
    """The Celo2 harness: the learned rule for matrices, AdamW for the rest.

    Matrices get ``p <- p - lr * (direction + weight_decay * p)``; vectors,
    scalars, and (by name) embeddings and output heads get
    ``optax.adamw(adam_lr_mult * lr, adam_b1, adam_b2, adam_eps, weight_decay)``.
    ``param_labels`` (a pytree or function of params giving ``"celo2"`` or
    ``"adam"`` per leaf) overrides the default routing. ``cpu_kernels`` and
    ``ns_dtype`` (Newton-Schulz's dtype, default ``"auto"``): see
    :func:`scale_by_celo2`.
    """
    labels = param_labels if param_labels is not None else default_param_labels(adam_name_pattern)
    return optax.partition(
        {
            routing.LEARNED: optax.chain(
                scale_by_celo2(theta, orthogonalize=orthogonalize, cpu_kernels=cpu_kernels, ns_dtype=ns_dtype),
                optax.add_decayed_weights(weight_decay),
                optax.scale_by_learning_rate(learning_rate),
            ),
            routing.ADAM: optax.adamw(
                _scaled(learning_rate, adam_lr_mult),
                b1=adam_b1,
                b2=adam_b2,
                eps=adam_eps,
                weight_decay=weight_decay,
            ),
        },
        labels,
    )


def celo2_base(
    learning_rate: ScalarOrSchedule,
    weight_decay: float = 0.0,
    theta: ThetaLike = None,
    cpu_kernels: bool | None = None,
) -> optax.GradientTransformation:
    """Celo2-base: the learned rule without orthogonalisation on every tensor
    (``cpu_kernels``: see :func:`scale_by_celo2`)."""
    return optax.chain(
        scale_by_celo2(theta, orthogonalize=False, cpu_kernels=cpu_kernels),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def routing_table(params: Any, param_labels: Any = None, adam_name_pattern: str | None = routing.ADAM_NAME_PATTERN) -> str:
    """The routing of ``params`` under :func:`celo2` as a printable table."""
    labels = param_labels if param_labels is not None else default_param_labels(adam_name_pattern)
    if callable(labels):
        labels = labels(params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    flat_labels = jax.tree_util.tree_leaves(labels)
    rows = [(lab, _path_name(path), tuple(jnp.shape(x))) for (path, x), lab in zip(leaves, flat_labels)]
    return routing.format_routing_table(rows)
