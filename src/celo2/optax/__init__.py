"""Celo2 for JAX: optax gradient transformations.

``celo2`` (the harness: learned rule + Newton-Schulz for matrices, AdamW for
the rest), ``celo2_base`` (the learned rule on every tensor) and
``scale_by_celo2`` (the raw rule, to compose yourself), with the non-finite
gradient policy's pieces and the routing helpers.

Modules, one job each: :mod:`~celo2.optax.transform` (the transformations),
:mod:`~celo2.optax.nonfinite` (the non-finite policy's combinators),
:mod:`~celo2.optax.functional` (the rule on one tensor: ``tensor_step``,
``guarded_tensor_step``, ``reference_tensor_step``, ``theta_to_jax``, ...),
:mod:`~celo2.optax.state` (``TensorState``, its shapes and shardings),
:mod:`~celo2.optax.ns` (Newton-Schulz), :mod:`~celo2.optax.cpu_ffi` (the CPU
kernels as XLA custom calls), :mod:`~celo2.optax.rounding` (bfloat16 state's
stochastic rounding in JAX), :mod:`~celo2.optax.state_dtype` (AdamW's bfloat16
moments, :func:`convert_state_dtype`); privately ``_reference`` (the spec spelled
out), ``_xla`` (XLA's fused formulation) and ``_cpu_kernels`` (the step
through the custom calls).
"""

from celo2.optax.state_dtype import convert_state_dtype
from celo2.optax.transform import (
    PerTensorSkipState,
    ScaleByCelo2State,
    celo2,
    celo2_base,
    default_param_labels,
    nonfinite_steps,
    routing_table,
    scale_by_celo2,
    skip_nonfinite_per_tensor,
    zero_skipped_updates,
)

__all__ = [
    "celo2",
    "celo2_base",
    "scale_by_celo2",
    "ScaleByCelo2State",
    "PerTensorSkipState",
    "nonfinite_steps",
    "skip_nonfinite_per_tensor",
    "zero_skipped_updates",
    "default_param_labels",
    "routing_table",
    "convert_state_dtype",
]
