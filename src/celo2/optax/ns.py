"""Newton-Schulz orthogonalisation in JAX, for the directions of matrices and conv windows."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from celo2.optax.state import explicit_split_axes
from celo2.rule import spec


def newton_schulz(x: jax.Array, dtype: "jnp.dtype | None" = None) -> jax.Array:
    """Approximately orthogonalise the last two axes (batched over leading axes).

    Args:
        x: A ``(..., R, C)`` array; tall matrices are iterated transposed.
        dtype: The dtype of the matrix products (default ``x.dtype``); the
            Frobenius pre-scaling is computed in ``x``'s dtype first.

    Returns:
        The result in ``x``'s dtype. An ``x`` split over explicit mesh axes
        is orthogonalised in ``jax.sharding.auto_axes`` (XLA's partitioner
        inserts the collectives) and comes back split like ``x``.
    """
    if explicit_split_axes(x):  # explicit sharding: XLA's partitioner places the products, out split like x
        out = jax.typeof(x).sharding.spec
        return jax.sharding.auto_axes(lambda y: _newton_schulz(y, dtype), out_sharding=out)(x)
    return _newton_schulz(x, dtype)


def _newton_schulz(x: jax.Array, dtype: "jnp.dtype | None") -> jax.Array:
    a, b, c = spec.NS_COEFFS
    out_dtype = x.dtype
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
    x = (x / (norm + spec.NS_EPS)).astype(dtype or out_dtype)
    for _ in range(spec.NS_STEPS):
        gram = x @ jnp.swapaxes(x, -1, -2)
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if transpose:
        x = jnp.swapaxes(x, -1, -2)
    return x.astype(out_dtype)


def rms_normalise(x: jax.Array, eps: float, axes: tuple[int, ...]) -> jax.Array:
    """``x`` scaled to unit RMS over ``axes``: ``x / sqrt(mean(x^2) + eps)``.

    Args:
        x: The array.
        eps: Added to the mean square.
        axes: The axes of each normalisation group.

    Returns:
        The normalised array.
    """
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + eps)


def finish_direction(d: jax.Array, orthogonalize: bool, ns_dtype: "jnp.dtype | None" = None) -> jax.Array:
    """The tail of every formulation: Newton-Schulz on a raw direction of two
    or more dimensions (when asked), then unit RMS over its last two axes.

    Args:
        d: The raw direction (work shape).
        orthogonalize: Newton-Schulz on its last two axes (ignored below two dimensions).
        ns_dtype: The dtype of Newton-Schulz's products (default ``d``'s).

    Returns:
        The direction with unit RMS per normalisation group.
    """
    if orthogonalize and d.ndim >= 2:
        d = newton_schulz(d, ns_dtype)
    return rms_normalise(d, spec.OUTPUT_NORM_EPS, tuple(range(max(0, d.ndim - 2), d.ndim)))
