"""The rule on one tensor as XLA runs it fast: same numbers as the reference, without full-size channels.

* the 12 row/column channels are rank-1 broadcasts, so their share of the
  first layer is an ``(8, rows)`` plus an ``(8, cols)`` term computed on the
  factored statistics;
* the per-channel RMS normalisation is a scale on the first-layer weights;
* the remaining 18 per-element channels and the whole MLP (only output 0 of
  the last layer) are written as element-wise arithmetic, which XLA fuses
  into one loop; no small-K matrix product is issued (XLA:CPU runs
  ``(n, 18) @ (18, 8)`` far slower than the fused loop);
* the 18 sums of squares are one variadic reduction.

XLA still stores the few channels that both the reduction and the MLP loop
read (a handful of tensor-sized buffers on CPU). With XLA:CPU's default
concurrency-optimised scheduler those buffers are not reused across tensors;
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` makes the
scratch that of the largest tensor alone.

Every rule variant (:class:`celo2.rule.variant.RuleVariant`) runs here: the
channels of the groups it leaves out are dropped before the first layer, the
hidden layers are as wide and as many as it says, and its output handling is
:func:`celo2.optax._reference.finish_variant_direction`. The published rule
traces exactly the code it always did.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from celo2.optax._reference import adafactor_factors, finish_variant_direction, update_accumulators
from celo2.optax.ns import rms_normalise
from celo2.optax.state import TensorState, ThetaTree
from celo2.rule import layout, spec
from celo2.rule.state import Factoring, factoring, work_shape
from celo2.rule.variant import MAGNITUDE_OUTPUT, PUBLISHED, RuleVariant


def _theta_rows(rows: tuple[int, ...]) -> list[tuple[str, int]]:
    """(theta key, row) of rows of the concatenated ``(30, 8)`` first layer."""
    where = {r: (f"w0__{g.index}", i) for g in spec.FEATURE_GROUPS for i, r in enumerate(layout.GROUP_ROWS[g.name])}
    return [where[r] for r in rows]


# The channel order of the fused formulation and of the kernels (celo2.rule.layout):
# per-element channels, then the row- and column-statistic channels.
_EL_ROWS, _ROW_ROWS, _COL_ROWS = (_theta_rows(r) for r in (layout.ELEMENT_ROWS, layout.ROW_STAT_ROWS,
                                                             layout.COL_STAT_ROWS))
UNROLLED_WIDTH: int = 8
"""The widest hidden layers written out unit by unit as element-wise arithmetic (the published width);
wider ones are matrix products: XLA:CPU's compiler exhausts memory on the unrolled form of a 16-wide
MLP on a vector."""

_GROUP_OF_KEY = {f"w0__{g.index}": g.name for g in spec.FEATURE_GROUPS}


def _used(rows: list[tuple[str, int]], variant: RuleVariant) -> list[int]:
    """Positions in ``rows`` of the channels whose feature group ``variant`` reads."""
    names = set(variant.feature_groups)
    return [c for c, (key, _) in enumerate(rows) if _GROUP_OF_KEY[key] in names]


def _weights(theta: ThetaTree, rows: list[tuple[str, int]]) -> jax.Array:
    return jnp.stack([theta[key][r] for key, r in rows])  # (channels, 8)


def _rank1_terms(theta: ThetaTree, state: TensorState, f: Factoring, axes: tuple[int, ...],
                 variant: RuleVariant) -> list[jax.Array]:
    """The row / column channels' share of the first layer, ``(hidden, *S)`` with
    size 1 at ``d0`` (row statistics) resp. ``d1``: normalised and contracted
    on the statistics themselves (broadcasting along one axis leaves the RMS
    over ``axes`` unchanged). Only the channels of the groups ``variant`` reads."""
    terms = []
    for stat, axis, rows in ((state.fac_r, f.d0, _ROW_ROWS), (state.fac_c, f.d1, _COL_ROWS)):
        keep = _used(rows, variant)
        if not keep:
            continue
        x = jnp.concatenate([stat, jax.lax.rsqrt(stat + spec.RSQRT_EPS)])
        if len(keep) < len(rows):
            x, rows = x[jnp.asarray(keep)], [rows[c] for c in keep]
        x = rms_normalise(jnp.expand_dims(x, 1 + axis), spec.INPUT_NORM_EPS, tuple(1 + a for a in axes))
        terms.append(jnp.einsum("c...,ch->h...", x, _weights(theta, rows)))
    return terms


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _sums_of_squares(xs: list[jax.Array], axes: tuple[int, ...]) -> list[jax.Array]:
    """``sum(x^2)`` over ``axes`` (kept) for every channel, as one variadic reduction.

    Its derivative is stated (:func:`_sums_of_squares_jvp`): JAX's rule for a
    variadic reduction fails when some operands have no tangent (channels
    that do not depend on what is differentiated)."""
    squares = tuple(jnp.square(x) for x in xs)
    zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
    sums = jax.lax.reduce(squares, zeros, lambda a, b: tuple(ai + bi for ai, bi in zip(a, b)), axes)
    return [jnp.expand_dims(s, axes) for s in sums]


@_sums_of_squares.defjvp
def _sums_of_squares_jvp(axes: tuple[int, ...], primals: tuple, tangents: tuple) -> tuple[list, list]:
    (xs,), (dxs,) = primals, tangents
    return _sums_of_squares(xs, axes), [jnp.sum(2.0 * x * dx, axis=axes, keepdims=True) for x, dx in zip(xs, dxs)]


def xla_tensor_step(
    theta: ThetaTree, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool,
    ns_dtype: "jnp.dtype" = jnp.float32, variant: RuleVariant = PUBLISHED,
) -> tuple[jax.Array, TensorState]:
    """One step of the rule on one tensor as XLA code.

    Args:
        theta: The rule's weights (may be traced), keyed like ``variant.theta_shapes()``.
        state: The tensor's accumulators.
        grad: Its gradient.
        param: The parameter (non-empty).
        orthogonalize: Newton-Schulz on directions of two or more dimensions.
        ns_dtype: The dtype of Newton-Schulz's matrix products.
        variant: The rule variant ``theta`` belongs to (static; default the published rule).

    Returns:
        The direction (the parameter's shape and dtype) and the new state.
    """
    shape = tuple(param.shape)
    work = work_shape(shape)
    g = jnp.clip(grad.astype(jnp.float32).reshape(work), -spec.GRAD_CLIP, spec.GRAD_CLIP)
    p = param.astype(jnp.float32).reshape(work)
    state, fac_g = update_accumulators(state, g, variant)
    nd = g.ndim
    axes = tuple(range(max(0, nd - 2), nd))  # normalisation groups: the last two axes
    group = int(np.prod([work[a] for a in axes]))
    m, v = state.m, state.v
    rv = jax.lax.rsqrt(v + spec.RSQRT_EPS)
    xs = [g, jnp.clip(g, -spec.FEATURE_CLIP, spec.FEATURE_CLIP), p, m[0], m[1], m[2], v,
          m[0] * rv, m[1] * rv, m[2] * rv, rv, fac_g[0], fac_g[1], fac_g[2], g * rv]
    f = factoring(work)
    keep = _used(_EL_ROWS[: len(xs) if f is None else len(_EL_ROWS)], variant)
    w0 = _weights(theta, [_EL_ROWS[c] for c in keep])
    width = variant.hidden_width
    hidden = [theta["b0"][j] for j in range(width)]
    if f is not None:
        row_factor, col_factor = adafactor_factors(state.fac_r, state.fac_c, f)
        xs += [m[k] * row_factor[k] * col_factor[k] for k in range(3)]
        for term in _rank1_terms(theta, state, f, axes, variant):
            hidden = [h + term[j] for j, h in enumerate(hidden)]
    xs = [xs[c] for c in keep]
    sums = _sums_of_squares(xs, axes)
    xs = [x * jax.lax.rsqrt(s * (1.0 / group) + spec.INPUT_NORM_EPS) for x, s in zip(xs, sums)]
    for c, x in enumerate(xs):
        hidden = [h + w0[c, j] * x for j, h in enumerate(hidden)]
    hidden = [jax.nn.relu(h) for h in hidden]
    w_out, b_out = theta[variant.output_key], theta[f"b{variant.hidden_layers}"]
    magnitude = None
    if width <= UNROLLED_WIDTH:
        for layer in range(1, variant.hidden_layers):
            w, b = theta[f"w{layer}"], theta[f"b{layer}"]
            hidden = [jax.nn.relu(_dense(b[k], w[:, k], hidden)) for k in range(width)]
        direction = _dense(b_out[spec.DIRECTION_OUTPUT], w_out[:, spec.DIRECTION_OUTPUT], hidden)
        if variant.outputs == "direction+magnitude":
            magnitude = jnp.broadcast_to(_dense(b_out[MAGNITUDE_OUTPUT], w_out[:, MAGNITUDE_OUTPUT], hidden), work)
    else:
        h = jnp.stack([jnp.broadcast_to(x, work) for x in hidden], axis=-1)
        for layer in range(1, variant.hidden_layers):
            h = jax.nn.relu(h @ theta[f"w{layer}"] + theta[f"b{layer}"])
        out = h @ w_out + b_out
        direction = out[..., spec.DIRECTION_OUTPUT]
        if variant.outputs == "direction+magnitude":
            magnitude = out[..., MAGNITUDE_OUTPUT]
    direction = finish_variant_direction(jnp.broadcast_to(direction, work), magnitude, variant, orthogonalize,
                                         ns_dtype)
    return direction.reshape(shape).astype(param.dtype), state


def _dense(bias: jax.Array, weights: jax.Array, hidden: list[jax.Array]) -> jax.Array:
    """One unit of a dense layer as element-wise arithmetic: ``bias + sum_j weights[j] * hidden[j]``."""
    z = bias
    for j, h in enumerate(hidden):
        z = z + weights[j] * h
    return z
