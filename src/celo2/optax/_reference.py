"""The rule on one tensor exactly as the spec states it, in JAX (every channel at full size).

The fast formulations (:mod:`celo2.optax._xla`, :mod:`celo2.optax._cpu_kernels`)
are tested against :func:`reference_tensor_step`; they share its first step,
:func:`update_accumulators`, the Adafactor factors and the tail
:func:`finish_variant_direction`. Every constant and the feature order come
from :mod:`celo2.rule.spec`; the MLP's size, the decays, the feature groups
read and the output handling from the rule variant
(:class:`celo2.rule.variant.RuleVariant`, default the published rule).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from celo2.optax.ns import finish_direction, newton_schulz, rms_normalise
from celo2.optax.rounding import StateRounding, load_state, store_state
from celo2.optax.state import TensorState, ThetaTree
from celo2.rule import spec
from celo2.rule.state import Factoring, factoring, work_shape
from celo2.rule.variant import MAGNITUDE_EXP_MULT, MAGNITUDE_OUTPUT, PUBLISHED, RuleVariant


def decays(values: tuple[float, ...], ndim: int) -> jax.Array:
    """``values`` as a float32 column broadcastable against ``(len(values), *S)`` with ``S`` of rank ``ndim``."""
    return jnp.asarray(values, jnp.float32).reshape((-1,) + (1,) * ndim)


def safe_rsqrt(x: jax.Array) -> jax.Array:
    """``rsqrt(max(x, SAFE_RSQRT_FLOOR))``: finite for a zero statistic."""
    return jax.lax.rsqrt(jnp.maximum(x, spec.SAFE_RSQRT_FLOOR))


def update_accumulators(state: TensorState, g: jax.Array,
                        variant: RuleVariant = PUBLISHED) -> tuple[TensorState, jax.Array]:
    """Step 1 of the rule: fold ``g`` (clipped, work shape) into every accumulator.

    Args:
        state: The tensor's accumulators.
        g: The clipped float32 gradient in its work shape.
        variant: Whose decays to use (default the published rule's).

    Returns:
        The new state and the Adafactor-normalised gradient ``(3, *S)``.
    """
    nd = g.ndim
    bm = decays(variant.momentum_decays, nd)
    bf = decays(variant.factored_decays, nd)
    m = bm * state.m + (1.0 - bm) * g[None]
    v = variant.rms_decay * state.v + (1.0 - variant.rms_decay) * jnp.square(g)
    gsq = jnp.square(g) + spec.FACTORED_EPS
    f = factoring(g.shape)
    if f is None:
        fac_r = bf * state.fac_r + (1.0 - bf) * gsq[None]
        fac_g = g[None] * safe_rsqrt(fac_r + spec.VECTOR_FACTOR_EPS)
        return TensorState(m, v, fac_r, state.fac_c), fac_g
    bf_r = decays(variant.factored_decays, nd - 1)
    fac_r = bf_r * state.fac_r + (1.0 - bf_r) * jnp.mean(gsq, axis=f.d0)[None]
    fac_c = bf_r * state.fac_c + (1.0 - bf_r) * jnp.mean(gsq, axis=f.d1)[None]
    row_factor, col_factor = adafactor_factors(fac_r, fac_c, f)
    fac_g = g[None] * row_factor * col_factor
    return TensorState(m, v, fac_r, fac_c), fac_g


def adafactor_factors(fac_r: jax.Array, fac_c: jax.Array, f: Factoring) -> tuple[jax.Array, jax.Array]:
    """The row and column factors, broadcastable against ``(3, *S)``.

    Args:
        fac_r: The row statistic ``(3, *S less d0)``.
        fac_c: The column statistic ``(3, *S less d1)``.
        f: The tensor's :class:`~celo2.rule.state.Factoring`.

    Returns:
        ``safe_rsqrt(fac_r / mean of fac_r over d1)`` with a size-1 axis at
        ``d0``, and ``safe_rsqrt(fac_c)`` with a size-1 axis at ``d1``.
    """
    reduced_d1 = f.d1 - 1 if f.d1 > f.d0 else f.d1
    row_mean = jnp.mean(fac_r, axis=1 + reduced_d1, keepdims=True)
    row_factor = safe_rsqrt(fac_r / (row_mean + spec.ROW_MEAN_EPS))
    col_factor = safe_rsqrt(fac_c)
    return jnp.expand_dims(row_factor, 1 + f.d0), jnp.expand_dims(col_factor, 1 + f.d1)


def features(state: TensorState, g: jax.Array, p: jax.Array, fac_g: jax.Array) -> list[jax.Array]:
    """Step 2: the input channels, one ``(width, *S)`` array per feature group, in spec order.

    Args:
        state: The accumulators after step 1.
        g: The clipped gradient (work shape).
        p: The parameter (float32, work shape).
        fac_g: The Adafactor-normalised gradient of step 1.

    Returns:
        The groups of :data:`celo2.rule.spec.FEATURE_GROUPS` (the first nine for a vector).
    """
    rsqrt_v = jax.lax.rsqrt(state.v + spec.RSQRT_EPS)
    groups = [
        g[None],
        jnp.clip(g, -spec.FEATURE_CLIP, spec.FEATURE_CLIP)[None],
        p[None],
        state.m,
        state.v[None],
        state.m * rsqrt_v[None],
        rsqrt_v[None],
        fac_g,
        (g * rsqrt_v)[None],
    ]
    f = factoring(g.shape)
    if f is None:
        return groups
    full = (state.m.shape[0],) + g.shape
    row = jnp.broadcast_to(jnp.expand_dims(state.fac_r, 1 + f.d0), full)
    col = jnp.broadcast_to(jnp.expand_dims(state.fac_c, 1 + f.d1), full)
    row_factor, col_factor = adafactor_factors(state.fac_r, state.fac_c, f)
    groups += [
        row,
        col,
        jax.lax.rsqrt(row + spec.RSQRT_EPS),
        jax.lax.rsqrt(col + spec.RSQRT_EPS),
        state.m * row_factor * col_factor,
    ]
    return groups


def finish_variant_direction(d: jax.Array, magnitude: "jax.Array | None", variant: RuleVariant,
                             orthogonalize: bool, ns_dtype: "jnp.dtype | None" = None) -> jax.Array:
    """The tail of every JAX formulation: Newton-Schulz, the variant's output normalisation, its magnitude.

    Args:
        d: The raw direction (MLP output 0, work shape).
        magnitude: MLP output :data:`~celo2.rule.variant.MAGNITUDE_OUTPUT` (work shape) for a
            ``"direction+magnitude"`` variant, else ``None``.
        variant: The rule variant.
        orthogonalize: Newton-Schulz on directions of two or more dimensions.
        ns_dtype: The dtype of Newton-Schulz's products (default ``d``'s).

    Returns:
        ``d`` orthogonalised (when asked), with unit RMS over its last two axes when
        ``variant.output_norm == "rms"``, then times ``exp(MAGNITUDE_EXP_MULT * magnitude)``
        when there is a magnitude (after the normalisation, which would otherwise remove it).
    """
    if variant.output_norm == "rms":
        d = finish_direction(d, orthogonalize, ns_dtype)
    elif orthogonalize and d.ndim >= 2:
        d = newton_schulz(d, ns_dtype)
    if magnitude is not None:
        d = d * jnp.exp(MAGNITUDE_EXP_MULT * magnitude)
    return d


def reference_tensor_step(
    theta: ThetaTree, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool,
    *, rounding: "StateRounding | None" = None, variant: RuleVariant = PUBLISHED,
) -> tuple[jax.Array, TensorState]:
    """The rule exactly as the spec states it (every channel of the variant's groups at full size).

    Args:
        theta: The rule's weights (:func:`celo2.optax.state.theta_to_jax`), keyed like
            ``variant.theta_shapes()``.
        state: The tensor's accumulators.
        grad: Its gradient.
        param: The parameter.
        orthogonalize: Newton-Schulz on matrix directions.
        rounding: With bfloat16 accumulators, their rounding counter
            (:class:`celo2.optax.rounding.StateRounding`): read as float32,
            stored rounded stochastically; ``None`` (default) for float32 ones.
        variant: The rule variant ``theta`` belongs to (static; default the published rule).

    Returns:
        The direction (the parameter's shape and dtype; unit RMS over the last
        two axes unless the variant says otherwise) and the new state (in ``state``'s dtype).
    """
    shape = tuple(param.shape)
    work = work_shape(shape)
    g = jnp.clip(grad.astype(jnp.float32).reshape(work), -spec.GRAD_CLIP, spec.GRAD_CLIP)
    p = param.astype(jnp.float32).reshape(work)
    state, fac_g = update_accumulators(load_state(state), g, variant)
    groups = features(state, g, p, fac_g)
    used = variant.groups if len(groups) > spec.VECTOR_GROUPS else variant.vector_groups
    axes = tuple(range(max(1, g.ndim - 1), g.ndim + 1))  # last two axes of (width, *S)
    hidden = theta["b0"]
    for group in used:
        x = rms_normalise(groups[group.index], spec.INPUT_NORM_EPS, axes)
        hidden = hidden + jnp.einsum("c...,ch->...h", x, theta[f"w0__{group.index}"])
    hidden = jax.nn.relu(hidden)
    for k in range(1, variant.hidden_layers):
        hidden = jax.nn.relu(hidden @ theta[f"w{k}"] + theta[f"b{k}"])
    w_out, b_out = theta[variant.output_key], theta[f"b{variant.hidden_layers}"]
    direction = hidden @ w_out[:, spec.DIRECTION_OUTPUT] + b_out[spec.DIRECTION_OUTPUT]
    magnitude = None
    if variant.outputs == "direction+magnitude":
        magnitude = hidden @ w_out[:, MAGNITUDE_OUTPUT] + b_out[MAGNITUDE_OUTPUT]
    direction = finish_variant_direction(direction, magnitude, variant, orthogonalize)
    return direction.reshape(shape).astype(param.dtype), state if rounding is None else store_state(state, rounding)
