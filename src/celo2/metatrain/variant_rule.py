"""Any rule variant as an optax transformation, for meta-training and scoring.

The optimizers' front ends (:mod:`celo2.optax`, :mod:`celo2.torch`) and the
fast kernels run the published rule only. Meta-training and scoring a rule
variant (:class:`celo2.rule.variant.RuleVariant`) need its update inside PES's
vectorised inner runs, so this module states the rule once more with every
variant field honoured: the spec's arithmetic at full size (every channel a
tensor, as :func:`celo2.optax.functional.reference_tensor_step` computes the
published rule), jit-, vmap- and grad-friendly, with theta traced. For the
published variant it gives the numbers of :func:`celo2.optax.celo2` with
``cpu_kernels=False`` (tests/metatrain/test_variant_rule.py checks it); PES
keeps using the front end for the published rule.

Per tensor (work shape ``S``; 0-D as ``(1,)``), with the variant's decays:

1. ``g`` clipped to ``[-GRAD_CLIP, GRAD_CLIP]``; ``m_k = b_k m_k + (1 - b_k) g``,
   ``v = b v + (1 - b) g^2``, factored statistics of ``g^2 + FACTORED_EPS``;
2. the variant's feature groups (spec order; the first nine's for a vector),
   each channel normalised to unit RMS over the last two axes;
3. the MLP (``hidden_layers`` ReLU layers of ``hidden_width``, then 3 outputs);
4. output 0 is the direction: Newton-Schulz on matrices when orthogonalising,
   then unit RMS over the last two axes when ``output_norm == "rms"``;
5. ``direction+magnitude``: times ``exp(MAGNITUDE_EXP_MULT * output 1)``.

The harness around it is Celo2's: the rule with decoupled weight decay at
``lr`` for the parameters the labels send to it, AdamW (betas 0.9/0.95) at
``adam_lr_mult * lr`` for the rest; a tensor whose gradient holds a NaN or
inf keeps its parameter and state for that step (the front ends' default
non-finite policy ``"skip"``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from celo2.optax import skip_nonfinite_per_tensor, zero_skipped_updates
from celo2.optax.ns import newton_schulz, rms_normalise
from celo2.rule import routing, spec
from celo2.rule.state import factoring, state_shapes, work_shape
from celo2.rule.variant import MAGNITUDE_EXP_MULT, MAGNITUDE_OUTPUT, RuleVariant

ThetaTree = Mapping[str, jax.Array]


class VariantTensorState(NamedTuple):
    """One tensor's accumulators (shapes of :func:`celo2.rule.state.state_shapes`, float32)."""

    m: jax.Array
    v: jax.Array
    fac_r: jax.Array
    fac_c: jax.Array


class VariantRuleState(NamedTuple):
    """The state of :func:`scale_by_variant`: one :class:`VariantTensorState` per parameter."""

    tensors: Any


def init_variant_state(param: jax.Array) -> VariantTensorState:
    """Zero accumulators for ``param``.

    Args:
        param: The parameter (any shape; 0-D counts as ``(1,)``).

    Returns:
        Its :class:`VariantTensorState`.
    """
    shapes = state_shapes(jnp.shape(param))
    return VariantTensorState(*(jnp.zeros(shapes[k], jnp.float32) for k in VariantTensorState._fields))


def _column(values: tuple[float, ...], ndim: int) -> jax.Array:
    return jnp.asarray(values, jnp.float32).reshape((-1,) + (1,) * ndim)


def _safe_rsqrt(x: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(jnp.maximum(x, spec.SAFE_RSQRT_FLOOR))


def variant_tensor_step(variant: RuleVariant, theta: ThetaTree, state: VariantTensorState, grad: jax.Array,
                        param: jax.Array, orthogonalize: bool) -> tuple[jax.Array, VariantTensorState]:
    """One step of ``variant``'s rule on one tensor: ``(update direction, new state)``.

    Args:
        variant: The rule variant.
        theta: Its weights, keyed like ``variant.theta_shapes()`` (may be traced).
        state: The tensor's accumulators.
        grad: Its gradient.
        param: The parameter.
        orthogonalize: Newton-Schulz on directions of two or more dimensions.

    Returns:
        The update direction (the parameter's shape and dtype; the caller applies
        ``-lr`` and weight decay) and the new state.
    """
    shape = tuple(param.shape)
    work = work_shape(shape)
    g = jnp.clip(grad.astype(jnp.float32).reshape(work), -spec.GRAD_CLIP, spec.GRAD_CLIP)
    p = param.astype(jnp.float32).reshape(work)
    nd = g.ndim
    bm = _column(variant.momentum_decays, nd)
    m = bm * state.m + (1.0 - bm) * g[None]
    v = variant.rms_decay * state.v + (1.0 - variant.rms_decay) * jnp.square(g)
    gsq = jnp.square(g) + spec.FACTORED_EPS
    f = factoring(work)
    if f is None:
        fac_r = _column(variant.factored_decays, nd) * state.fac_r + (
            1.0 - _column(variant.factored_decays, nd)) * gsq[None]
        fac_c = state.fac_c
        fac_g = g[None] * _safe_rsqrt(fac_r + spec.VECTOR_FACTOR_EPS)
    else:
        bf = _column(variant.factored_decays, nd - 1)
        fac_r = bf * state.fac_r + (1.0 - bf) * jnp.mean(gsq, axis=f.d0)[None]
        fac_c = bf * state.fac_c + (1.0 - bf) * jnp.mean(gsq, axis=f.d1)[None]
        reduced_d1 = f.d1 - 1 if f.d1 > f.d0 else f.d1
        row_mean = jnp.mean(fac_r, axis=1 + reduced_d1, keepdims=True)
        row_factor = jnp.expand_dims(_safe_rsqrt(fac_r / (row_mean + spec.ROW_MEAN_EPS)), 1 + f.d0)
        col_factor = jnp.expand_dims(_safe_rsqrt(fac_c), 1 + f.d1)
        fac_g = g[None] * row_factor * col_factor
    rsqrt_v = jax.lax.rsqrt(v + spec.RSQRT_EPS)
    channels: dict[str, Callable[[], jax.Array]] = {
        "g": lambda: g[None],
        "clip_g": lambda: jnp.clip(g, -spec.FEATURE_CLIP, spec.FEATURE_CLIP)[None],
        "p": lambda: p[None],
        "m": lambda: m,
        "v": lambda: v[None],
        "m_rsqrt_v": lambda: m * rsqrt_v[None],
        "rsqrt_v": lambda: rsqrt_v[None],
        "fac_g": lambda: fac_g,
        "g_rsqrt_v": lambda: (g * rsqrt_v)[None],
    }
    if f is not None:
        full = (fac_r.shape[0],) + work
        row = jnp.broadcast_to(jnp.expand_dims(fac_r, 1 + f.d0), full)
        col = jnp.broadcast_to(jnp.expand_dims(fac_c, 1 + f.d1), full)
        channels.update({
            "row": lambda: row,
            "col": lambda: col,
            "rsqrt_row": lambda: jax.lax.rsqrt(row + spec.RSQRT_EPS),
            "rsqrt_col": lambda: jax.lax.rsqrt(col + spec.RSQRT_EPS),
            "fac_m": lambda: m * row_factor * col_factor,
        })
    groups = variant.groups if f is not None else variant.vector_groups
    axes = tuple(range(max(1, nd - 1), nd + 1))  # the last two axes of (width, *S)
    hidden = theta["b0"]
    for group in groups:
        x = rms_normalise(channels[group.name](), spec.INPUT_NORM_EPS, axes)
        hidden = hidden + jnp.einsum("c...,ch->...h", x, theta[f"w0__{group.index}"])
    hidden = jax.nn.relu(hidden)
    for k in range(1, variant.hidden_layers):
        hidden = jax.nn.relu(hidden @ theta[f"w{k}"] + theta[f"b{k}"])
    out = hidden @ theta[variant.output_key] + theta[f"b{variant.hidden_layers}"]
    direction = out[..., spec.DIRECTION_OUTPUT]
    if orthogonalize and nd >= 2:
        direction = newton_schulz(direction)
    if variant.output_norm == "rms":
        direction = rms_normalise(direction, spec.OUTPUT_NORM_EPS, tuple(range(max(0, nd - 2), nd)))
    if variant.outputs == "direction+magnitude":
        direction = direction * jnp.exp(MAGNITUDE_EXP_MULT * out[..., MAGNITUDE_OUTPUT])
    return direction.reshape(shape).astype(param.dtype), VariantTensorState(m, v, fac_r, fac_c)


def _finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def scale_by_variant(variant: RuleVariant, theta: ThetaTree, learning_rate: float, weight_decay: float = 0.0,
                     orthogonalize: bool = True) -> optax.GradientTransformation:
    """``variant``'s rule as updates ``-lr * (direction + weight_decay * p)``.

    A tensor whose gradient holds a NaN or inf gets a zero update and keeps its state.

    Args:
        variant: The rule variant.
        theta: Its weights (may be traced).
        learning_rate: The step size.
        weight_decay: Decoupled weight decay (default 0).
        orthogonalize: Newton-Schulz on matrix directions (default ``True``: Celo2; ``False``: Celo2-base).

    Returns:
        An ``optax.GradientTransformation`` (``update`` needs ``params``).
    """

    def init_fn(params: Any) -> VariantRuleState:
        return VariantRuleState(jax.tree_util.tree_map(init_variant_state, params))

    def update_fn(updates: Any, state: VariantRuleState, params: Any = None) -> tuple[Any, VariantRuleState]:
        if params is None:
            raise ValueError("scale_by_variant needs the parameters: call update(grads, state, params)")
        flat_g, treedef = jax.tree_util.tree_flatten(updates)
        flat_p = treedef.flatten_up_to(params)
        flat_s = treedef.flatten_up_to(state.tensors)
        outs, states = [], []
        for g, p, s in zip(flat_g, flat_p, flat_s):
            direction, new = variant_tensor_step(variant, theta, s, g, p, orthogonalize)
            ok = _finite(g)
            step = -learning_rate * (direction + weight_decay * p)
            outs.append(jnp.where(ok, step, jnp.zeros_like(step)))
            states.append(jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, s))
        new_state = VariantRuleState(jax.tree_util.tree_unflatten(treedef, states))
        return jax.tree_util.tree_unflatten(treedef, outs), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def variant_celo2(variant: RuleVariant, theta: ThetaTree, learning_rate: float, weight_decay: float = 0.0,
                  adam_lr_mult: float = spec.ADAM_LR_MULT, param_labels: Any = None,
                  orthogonalize: bool = True) -> optax.GradientTransformation:
    """The Celo2 harness around ``variant``'s rule: the rule for labelled matrices, AdamW for the rest.

    Args:
        variant: The rule variant.
        theta: Its weights (may be traced).
        learning_rate: The rule's step size; AdamW gets ``adam_lr_mult`` times it.
        weight_decay: Decoupled weight decay of both branches (default 0).
        adam_lr_mult: The AdamW branch's multiplier (default 20).
        param_labels: A pytree or function of params giving ``"celo2"`` or ``"adam"`` per leaf
            (default: :func:`celo2.optax.default_param_labels`).
        orthogonalize: Newton-Schulz on the rule's matrix directions (default ``True``).

    Returns:
        An ``optax.GradientTransformation`` (``update`` needs ``params``).
    """
    if param_labels is None:
        from celo2.optax import default_param_labels

        param_labels = default_param_labels()
    adam = zero_skipped_updates(optax.chain(
        skip_nonfinite_per_tensor(optax.scale_by_adam(b1=spec.ADAM_BETAS[0], b2=spec.ADAM_BETAS[1],
                                                      eps=spec.ADAM_EPS)),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(adam_lr_mult * learning_rate),
    ))
    rule = scale_by_variant(variant, theta, learning_rate, weight_decay, orthogonalize)
    return optax.partition({routing.LEARNED: rule, routing.ADAM: adam}, param_labels)


__all__ = [
    "VariantRuleState", "VariantTensorState", "init_variant_state", "scale_by_variant", "variant_celo2",
    "variant_tensor_step",
]
