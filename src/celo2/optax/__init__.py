"""Celo2 for JAX: optax gradient transformations.

``celo2`` (the harness: learned rule + Newton-Schulz for matrices, AdamW for
the rest), ``celo2_base`` (the learned rule on every tensor) and
``scale_by_celo2`` (the raw rule, to compose yourself), with the non-finite
gradient policy's pieces and the routing helpers. The rule's per-tensor
functions (``tensor_step``, ``newton_schulz``, ``theta_to_jax``, ...) are in
:mod:`celo2.optax.rule`.
"""

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
]
