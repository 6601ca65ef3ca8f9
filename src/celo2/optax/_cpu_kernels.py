"""A tensor's step through the CPU kernels (the optax side of :mod:`celo2.optax.cpu_ffi`).

The kernels' pass sequence gives the raw direction and the new state in one
custom call; the tail (the output RMS of the tensor, or Newton-Schulz and the
RMS of each normalisation group) is XLA's. The custom call is not
differentiable: :func:`cpu_step` says so, naming ``cpu_kernels=False``, when a
transformation is asked for derivatives through it.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from celo2.optax import cpu_ffi
from celo2.optax.ns import finish_direction
from celo2.optax.state import TensorState, may_be_split
from celo2.rule import spec
from celo2.rule.state import work_shape

_STEPS = {"vector": cpu_ffi.vector_step, "matrix": cpu_ffi.matrix_step, "conv": cpu_ffi.conv_step}

NOT_DIFFERENTIABLE = (
    "celo2.optax: the CPU kernels' step (an XLA custom call) has no derivative, and a derivative through the "
    "update was asked for (jax.grad, jax.jvp or jax.linearize over the parameters, gradients or state); build the "
    "transformation with cpu_kernels=False to differentiate through it (XLA's formulation: the same numbers)")
"""The error raised when a derivative through the CPU kernels' step is asked for."""


def kernel_kind(param: jax.Array, grad: jax.Array, state: TensorState, cpu_kernels: bool) -> Optional[str]:
    """The CPU kernels' kind for this tensor when they are asked for, else ``None``.

    A tensor that may be split across devices
    (:func:`celo2.optax.state.may_be_split`) takes XLA's formulation, which
    the partitioner splits like the operands: the custom call needs each
    tensor whole on one device.

    Args:
        param: The parameter.
        grad: Its gradient.
        state: Its accumulators.
        cpu_kernels: Whether the kernels are asked for.

    Returns:
        ``"vector"``, ``"matrix"``, ``"conv"`` or ``None``.
    """
    if not cpu_kernels:
        return None
    kind = cpu_ffi.kind(tuple(param.shape), grad.dtype, param.dtype)
    if kind is not None and may_be_split(param, grad, *state):
        return None
    return kind


def cpu_step(net: jax.Array, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool, kind: str,
             skip: bool, ns_dtype: "jnp.dtype" = jnp.float32,
             ) -> tuple[jax.Array, TensorState, Optional[jax.Array]]:
    """A tensor's step through the CPU kernels.

    Args:
        net: The packed weights (:func:`celo2.optax.cpu_ffi.pack_theta`, packed once per update).
        state: The tensor's accumulators.
        grad: Its gradient (float32).
        param: The parameter (float32, non-empty).
        orthogonalize: Newton-Schulz on matrices and conv windows.
        kind: The tensor's :func:`kernel_kind`.
        skip: Policy ``"skip"``: a non-finite gradient gives a zero direction
            and the state as it was, checked inside the custom call.
        ns_dtype: The dtype of Newton-Schulz's products.

    Returns:
        ``(direction, new state, ok)``; ``ok`` (a bool scalar) is ``None`` unless ``skip``.

    Raises:
        TypeError: At trace time, when differentiated (:data:`NOT_DIFFERENTIABLE`).
    """
    return _guarded(orthogonalize, kind, skip, jnp.dtype(ns_dtype).name)(net, state, grad, param)


def _guarded(orthogonalize: bool, kind: str, skip: bool, ns_name: str):  # noqa: ANN202
    """:func:`_step` behind a ``custom_jvp`` whose rule refuses, naming ``cpu_kernels=False``."""

    @jax.custom_jvp
    def step(net, state, grad, param):  # noqa: ANN001, ANN202
        return _step(net, state, grad, param, orthogonalize, kind, skip, jnp.dtype(ns_name))

    @step.defjvp
    def refuse(primals, tangents):  # noqa: ANN001, ANN202, ARG001
        raise TypeError(NOT_DIFFERENTIABLE)

    return step


def _step(net: jax.Array, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool, kind: str,
          skip: bool, ns_dtype: "jnp.dtype") -> tuple[jax.Array, TensorState, Optional[jax.Array]]:
    shape = tuple(param.shape)
    work = work_shape(shape)
    d, sq, new_state = _STEPS[kind](net, state, grad.reshape(work), param.reshape(work), skip)
    ok = None
    if skip:  # a skipped tensor: zero direction, -1 in place of the sum of squares
        ok, sq = sq >= 0, jnp.maximum(sq, 0.0)
    if kind == "conv" or orthogonalize and kind == "matrix":
        d = finish_direction(d, orthogonalize, ns_dtype)
    else:  # the kernels summed the direction's squares: the output RMS of the whole tensor
        d = d * jax.lax.rsqrt(sq * (1.0 / d.size) + spec.OUTPUT_NORM_EPS)
    return d.reshape(shape), new_state, ok
