"""The rule on one tensor, in JAX: pure functions, jit/vmap friendly, each formulation picked here.

:func:`tensor_step` picks, per tensor and at trace time, the formulation that
runs it: the CPU kernels' custom call (:mod:`celo2.optax._cpu_kernels`, when
asked for, on CPU, for float32 vectors, matrices and conv kernels on one
device) or XLA's fused formulation (:mod:`celo2.optax._xla`, everywhere else
and on other platforms: ``jax.lax.platform_dependent`` keeps both where the
kernels are asked for). Both give the numbers of
:func:`~celo2.optax._reference.reference_tensor_step`, the spec spelled out.
:func:`guarded_tensor_step` is the same under the non-finite policy
``"skip"``. With bfloat16 accumulators (``rounding=``, :mod:`celo2.optax.rounding`)
every formulation reads them as float32 and stores its new float32 values
rounded stochastically in XLA: the kernels' custom call stays float32, and the
bits stored are those a rounding inside the kernels would store, since the
rounding is a function of the float32 value and the counter alone.
A rule variant other than the published one (``variant=``) runs on XLA's
formulation only: the CPU kernels run the published rule.

The names a caller of one tensor's step needs are here too:
:class:`~celo2.optax.state.TensorState`, :func:`init_tensor_state`,
:func:`theta_to_jax`, :func:`newton_schulz`, :func:`pack_theta`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from celo2.optax._cpu_kernels import cpu_step, kernel_kind
from celo2.optax._reference import reference_tensor_step
from celo2.optax._xla import xla_tensor_step
from celo2.optax.cpu_ffi import pack_theta
from celo2.optax.nonfinite import finite, keep_if
from celo2.optax.ns import newton_schulz
from celo2.optax.rounding import StateRounding, load_state, store_state
from celo2.optax.state import (TensorState, ThetaTree, init_tensor_state, may_be_split, state_specs, theta_from_jax,
                               theta_to_jax)
from celo2.rule.variant import PUBLISHED, RuleVariant, require_published

__all__ = [
    "tensor_step", "guarded_tensor_step", "reference_tensor_step", "TensorState", "init_tensor_state",
    "state_specs", "theta_to_jax", "theta_from_jax", "newton_schulz", "pack_theta", "may_be_split",
    "StateRounding",
]


def tensor_step(
    theta: ThetaTree, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool,
    cpu_kernels: bool = False, ns_dtype: "jnp.dtype" = jnp.float32, *, net: Optional[jax.Array] = None,
    rounding: Optional[StateRounding] = None, variant: RuleVariant = PUBLISHED,
) -> tuple[jax.Array, TensorState]:
    """One step of the rule on one tensor: ``(direction, new_state)``.

    The direction has unit RMS over the last two axes and the parameter's
    shape; the caller applies learning rate and weight decay. Same numbers as
    :func:`reference_tensor_step`, without full-size channel tensors. A
    zero-size tensor gets a zero-size direction and its (zero-size) state back.

    Args:
        theta: The rule's weights (:func:`theta_to_jax`; may be traced).
        state: The tensor's accumulators.
        grad: Its gradient.
        param: The parameter.
        orthogonalize: Newton-Schulz on matrix directions.
        cpu_kernels: When compiled for CPU, the step of a float32 vector,
            matrix or conv kernel is one custom call into the Numba kernels
            (:mod:`celo2.optax.cpu_ffi`; not differentiable); other tensors,
            other platforms and tensors that may be split across devices
            (:func:`may_be_split`) take XLA's formulation.
        ns_dtype: The dtype of Newton-Schulz's matrix products (default float32).
        net: ``theta`` packed for the kernels (:func:`pack_theta`), when the
            caller packed it once for many tensors; default: packed here.
        rounding: With bfloat16 accumulators, the counter of their stochastic
            rounding (:class:`StateRounding`); ``None`` (default) for float32 ones.
        variant: The rule variant ``theta`` belongs to (static; default the published rule).

    Returns:
        The direction (the parameter's shape and dtype) and the new state (in ``state``'s dtype).

    Raises:
        TypeError: When differentiated through the CPU kernels (pass ``cpu_kernels=False``).
        ValueError: bfloat16 accumulators without ``rounding``, or ``rounding`` with float32 ones.
        celo2.rule.variant.VariantNotSupportedError: ``cpu_kernels=True`` with a variant other than
            the published one.
    """
    _check_rounding(state, rounding)
    _check_variant(variant, cpu_kernels)
    if 0 in tuple(param.shape):
        return jnp.zeros(param.shape, param.dtype), state
    kind = kernel_kind(param, grad, state, cpu_kernels)

    def elsewhere(theta, net, state, grad, param):  # noqa: ANN001, ANN202, ARG001
        d, new = xla_tensor_step(theta, load_state(state), grad, param, orthogonalize, ns_dtype, variant)
        return d, _stored(new, rounding)

    if kind is None:
        return elsewhere(theta, None, state, grad, param)
    net = pack_theta(theta) if net is None else net

    def on_cpu(theta, net, state, grad, param):  # noqa: ANN001, ANN202
        d, new, _ = cpu_step(net, load_state(state), grad, param, orthogonalize, kind, False, ns_dtype)
        return d, _stored(new, rounding)

    return jax.lax.platform_dependent(theta, net, state, grad, param, cpu=on_cpu, default=elsewhere)


def _check_variant(variant: RuleVariant, cpu_kernels: bool) -> None:
    """The CPU kernels run the published rule only: refuse them a variant, naming both."""
    if cpu_kernels:
        require_published(variant, "cpu_kernels=True (the fused Numba CPU kernels)")


def _check_rounding(state: TensorState, rounding: Optional[StateRounding]) -> None:
    """bfloat16 accumulators need a rounding counter, float32 ones take none (checked at trace time)."""
    dtypes = {jnp.dtype(x.dtype).name for x in state}
    low = "bfloat16" in dtypes
    if low != (rounding is not None) or not dtypes <= {"float32", "bfloat16"}:
        have = "/".join(sorted(dtypes))
        raise ValueError(f"the rule's accumulators are {have} and rounding is "
                         f"{'given' if rounding is not None else 'None'}: float32 state takes rounding=None, "
                         "bfloat16 state a StateRounding (celo2.optax.rounding)")


def _stored(new: TensorState, rounding: Optional[StateRounding]) -> TensorState:
    """The new float32 accumulators in the state dtype: as they are, or rounded to bfloat16."""
    return new if rounding is None else store_state(new, rounding)


def guarded_tensor_step(
    theta: ThetaTree, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool,
    cpu_kernels: bool = False, ns_dtype: "jnp.dtype" = jnp.float32, *, net: Optional[jax.Array] = None,
    rounding: Optional[StateRounding] = None, variant: RuleVariant = PUBLISHED,
) -> tuple[jax.Array, TensorState, jax.Array]:
    """:func:`tensor_step` under the non-finite policy ``"skip"``
    (:data:`celo2.rule.spec.NONFINITE_POLICIES`): ``(direction, new_state, ok)``.

    ``ok`` (a bool scalar) is false when ``grad`` holds a NaN or +-inf; the
    direction is then zero and the state comes back bitwise as it was. With
    ``ok`` true the results are :func:`tensor_step`'s, bitwise. The XLA
    formulation selects with ``jnp.where``; the CPU kernels check inside the
    custom call, so that a donated state is still updated in place and the
    direction still takes the gradient's buffer.

    Args:
        theta: The rule's weights (:func:`theta_to_jax`).
        state: The tensor's accumulators.
        grad: Its gradient.
        param: The parameter.
        orthogonalize: Newton-Schulz on matrix directions.
        cpu_kernels: As in :func:`tensor_step`.
        ns_dtype: As in :func:`tensor_step`.
        net: As in :func:`tensor_step`.
        rounding: As in :func:`tensor_step`; a skipped tensor keeps its bfloat16 accumulators bitwise.
        variant: As in :func:`tensor_step`.

    Returns:
        The direction (parameter's shape and dtype), the new state and ``ok``.

    Raises:
        TypeError: When differentiated through the CPU kernels (pass ``cpu_kernels=False``).
        ValueError: As in :func:`tensor_step`.
        celo2.rule.variant.VariantNotSupportedError: As in :func:`tensor_step`.
    """
    _check_rounding(state, rounding)
    _check_variant(variant, cpu_kernels)
    if 0 in tuple(param.shape):
        return jnp.zeros(param.shape, param.dtype), state, jnp.asarray(True)

    def elsewhere(theta, net, state, grad, param):  # noqa: ANN001, ANN202, ARG001
        ok = finite(grad)
        d, new = xla_tensor_step(theta, load_state(state), grad, param, orthogonalize, ns_dtype, variant)
        new = keep_if(ok, _stored(new, rounding), state)
        return jnp.where(ok, d, jnp.zeros_like(d)), new, ok

    kind = kernel_kind(param, grad, state, cpu_kernels)
    if kind is None:
        return elsewhere(theta, None, state, grad, param)
    net = pack_theta(theta) if net is None else net

    def on_cpu(theta, net, state, grad, param):  # noqa: ANN001, ANN202, ARG001
        d, new, ok = cpu_step(net, load_state(state), grad, param, orthogonalize, kind, True, ns_dtype)
        if rounding is not None:  # the kernels gave back the float32 state as it was: keep the stored bits
            new = keep_if(ok, store_state(new, rounding), state)
        return d, new, ok

    return jax.lax.platform_dependent(theta, net, state, grad, param, cpu=on_cpu, default=elsewhere)
