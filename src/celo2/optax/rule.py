"""The Celo2 rule on one tensor, in JAX: pure functions, jit/vmap/grad friendly.

Every constant and the feature order come from :mod:`celo2.rule.spec`. State
per tensor is a :class:`TensorState`; the decay index is the leading axis of
every accumulator, so each decay's slice is contiguous.

:func:`reference_tensor_step` spells the rule out with all 30 channels at full
size. :func:`tensor_step` computes the same numbers the way XLA runs fast:

* the 12 row/column channels are rank-1 broadcasts, so their share of the
  first layer is an ``(8, rows)`` plus an ``(8, cols)`` term computed on the
  factored statistics;
* the per-channel RMS normalisation is a scale on the first-layer weights;
* the remaining 18 per-element channels and the whole MLP (only output 0 of
  the last layer) are written as element-wise arithmetic, which XLA fuses
  into one loop; no small-K matrix product is issued (XLA:CPU runs
  ``(n, 18) @ (18, 8)`` an order of magnitude slower than the fused loop);
* the 18 sums of squares are one variadic reduction.

XLA still stores the few channels that both the reduction and the MLP loop
read (about 8 tensor-sized buffers on CPU, against about 75 for the
reference). With XLA:CPU's default concurrency-optimised scheduler those
buffers are not reused across tensors; ``XLA_FLAGS=
--xla_cpu_enable_concurrency_optimized_scheduler=false`` makes the scratch
that of the largest tensor alone.

On CPU, ``tensor_step(..., cpu_kernels=True)`` replaces that loop for float32
vectors, matrices and conv kernels by one custom call into the Numba kernels
(:mod:`celo2.optax.cpu_ffi`).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from celo2.rule import layout, spec
from celo2.rule.theta import Theta, load_theta

ThetaTree = Mapping[str, jax.Array]


def finite(g: jax.Array) -> jax.Array:
    """The non-finite policy's flag: ``g`` holds no NaN or +-inf (a traced bool scalar)."""
    return jnp.all(jnp.isfinite(g))


def keep_if(ok: jax.Array, new, old):  # noqa: ANN001, ANN201 - pytrees
    """``new`` where ``ok``, else ``old``, leaf by leaf (bitwise either way)."""
    return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


class TensorState(NamedTuple):
    """Accumulators of one tensor (shapes for a parameter of shape ``S``).

    ``m``: ``(3, *S)`` momenta; ``v``: ``S`` second moment; for factored
    tensors ``fac_r``/``fac_c`` are the row and column statistics (``S``
    without the ``d0`` resp. ``d1`` axis, with a leading decay axis); for
    vectors ``fac_r`` is the full ``(3, *S)`` second moment and ``fac_c`` is
    empty.
    """

    m: jax.Array
    v: jax.Array
    fac_r: jax.Array
    fac_c: jax.Array


def theta_to_jax(theta: "Theta | str | None" = None) -> dict[str, jax.Array]:
    """A theta as a plain dict of float32 ``jax.Array`` (a pytree PES can perturb)."""
    if isinstance(theta, Mapping) and not isinstance(theta, Theta):
        return {k: jnp.asarray(theta[k], jnp.float32) for k in spec.THETA_KEYS}
    theta = load_theta(theta)
    return {k: jnp.asarray(theta[k]) for k in spec.THETA_KEYS}


def theta_from_jax(tree: ThetaTree) -> Theta:
    """Back to a framework-neutral :class:`~celo2.Theta`."""
    return Theta({k: np.asarray(tree[k], np.float32) for k in spec.THETA_KEYS})


def _work_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """0-D tensors are treated as shape ``(1,)``."""
    return shape if len(shape) else (1,)


def init_tensor_state(param: jax.Array) -> TensorState:
    """Zero accumulators for ``param`` (float32, shapes as in :class:`TensorState`).

    Where ``param``'s sharding is known (a concrete array with a
    ``NamedSharding``, or a traced one split over explicit mesh axes) each
    accumulator is split like it: the axes it shares with the parameter on the
    same mesh axes, the decay axis whole (:func:`state_specs`).

    Args:
        param: The parameter (any shape; 0-D counts as ``(1,)``).

    Returns:
        Its :class:`TensorState` of zeros.
    """
    shape = _work_shape(tuple(param.shape))
    n = len(spec.MOMENTUM_DECAYS)
    k = len(spec.FACTORED_DECAYS)
    dims = spec.factored_dims(shape)
    if dims is None:
        shapes = [(n, *shape), shape, (k, *shape), (k, 0)]
    else:
        d1, d0 = dims
        shapes = [(n, *shape), shape, (k, *np.delete(shape, d0)), (k, *np.delete(shape, d1))]
    place = _placements(param, shape)
    return TensorState(*(jnp.zeros(s, jnp.float32, **kw) for s, kw in zip(shapes, place)))


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
    shape = _work_shape(tuple(shape))
    axes = tuple(param_spec) + (None,) * (len(shape) - len(tuple(param_spec)))
    dims = spec.factored_dims(shape)
    if dims is None:
        return TensorState(P(None, *axes), P(*axes), P(None, *axes), P(None, None))
    d1, d0 = dims
    drop = lambda a: tuple(x for i, x in enumerate(axes) if i != a)  # noqa: E731
    return TensorState(P(None, *axes), P(*axes), P(None, *drop(d0)), P(None, *drop(d1)))


def _placements(param: jax.Array, shape: tuple[int, ...]) -> list[dict]:
    """``jnp.zeros`` keywords that split each accumulator like ``param``, where its sharding is known."""
    none = [{}] * 4
    if isinstance(param, jax.Array) and not isinstance(param, jax.core.Tracer):
        sharding = getattr(param, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and len(param.shape) == len(shape):
            return [{"device": jax.sharding.NamedSharding(sharding.mesh, s)}
                    for s in state_specs(sharding.spec, shape)]
        return none
    if _explicit_split_axes(param) and len(param.shape) == len(shape):
        return [{"out_sharding": s} for s in state_specs(jax.typeof(param).sharding.spec, shape)]
    return none


def _spec_axis_names(spec_: "jax.sharding.PartitionSpec") -> set[str]:
    names: set[str] = set()
    for entry in spec_:
        if entry is None or entry is jax.sharding.PartitionSpec.UNCONSTRAINED:
            continue
        names.update((entry,) if isinstance(entry, str) else entry)
    return names


def _explicit_split_axes(x: jax.Array) -> set[str]:
    """The explicit mesh axes longer than 1 that split ``x``, as its type says (empty when none)."""
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
        if any(mesh.shape[a] > 1 for a in mesh.auto_axes) or _explicit_split_axes(x):
            return True
    return False


def _decays(values: tuple[float, ...], ndim: int) -> jax.Array:
    return jnp.asarray(values, jnp.float32).reshape((-1,) + (1,) * ndim)


def _safe_rsqrt(x: jax.Array) -> jax.Array:
    return jax.lax.rsqrt(jnp.maximum(x, spec.SAFE_RSQRT_FLOOR))


def _rms_normalise(x: jax.Array, eps: float, axes: tuple[int, ...]) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=axes, keepdims=True) + eps)


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
    if _explicit_split_axes(x):  # explicit sharding: XLA's partitioner places the products, out split like x
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


def update_accumulators(state: TensorState, g: jax.Array) -> tuple[TensorState, jax.Array]:
    """Step 1 of the rule: fold ``g`` into every accumulator; also return the
    Adafactor-normalised gradient ``(3, *S)``."""
    nd = g.ndim
    bm = _decays(spec.MOMENTUM_DECAYS, nd)
    bf = _decays(spec.FACTORED_DECAYS, nd)
    m = bm * state.m + (1.0 - bm) * g[None]
    v = spec.RMS_DECAY * state.v + (1.0 - spec.RMS_DECAY) * jnp.square(g)
    gsq = jnp.square(g) + spec.FACTORED_EPS
    dims = spec.factored_dims(g.shape)
    if dims is None:
        fac_r = bf * state.fac_r + (1.0 - bf) * gsq[None]
        fac_g = g[None] * _safe_rsqrt(fac_r + spec.VECTOR_FACTOR_EPS)
        return TensorState(m, v, fac_r, state.fac_c), fac_g
    d1, d0 = dims
    bf_r = _decays(spec.FACTORED_DECAYS, nd - 1)
    fac_r = bf_r * state.fac_r + (1.0 - bf_r) * jnp.mean(gsq, axis=d0)[None]
    fac_c = bf_r * state.fac_c + (1.0 - bf_r) * jnp.mean(gsq, axis=d1)[None]
    row_factor, col_factor = _adafactor_factors(fac_r, fac_c, dims)
    fac_g = g[None] * row_factor * col_factor
    return TensorState(m, v, fac_r, fac_c), fac_g


def _adafactor_factors(fac_r: jax.Array, fac_c: jax.Array, dims: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    """Row and column factors broadcastable against ``(3, *S)``."""
    d1, d0 = dims
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_mean = jnp.mean(fac_r, axis=1 + reduced_d1, keepdims=True)
    row_factor = _safe_rsqrt(fac_r / (row_mean + spec.ROW_MEAN_EPS))
    col_factor = _safe_rsqrt(fac_c)
    return jnp.expand_dims(row_factor, 1 + d0), jnp.expand_dims(col_factor, 1 + d1)


def features(state: TensorState, g: jax.Array, p: jax.Array, fac_g: jax.Array) -> list[jax.Array]:
    """Step 2: the input channels, one ``(width, *S)`` array per feature group, in spec order."""
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
    dims = spec.factored_dims(g.shape)
    if dims is None:
        return groups
    d1, d0 = dims
    full = (state.m.shape[0],) + g.shape
    row = jnp.broadcast_to(jnp.expand_dims(state.fac_r, 1 + d0), full)
    col = jnp.broadcast_to(jnp.expand_dims(state.fac_c, 1 + d1), full)
    row_factor, col_factor = _adafactor_factors(state.fac_r, state.fac_c, dims)
    groups += [
        row,
        col,
        jax.lax.rsqrt(row + spec.RSQRT_EPS),
        jax.lax.rsqrt(col + spec.RSQRT_EPS),
        state.m * row_factor * col_factor,
    ]
    return groups


def reference_tensor_step(
    theta: ThetaTree, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool
) -> tuple[jax.Array, TensorState]:
    """The rule exactly as the spec states it (all 30 channels at full size);
    the fast :func:`tensor_step` is tested against this."""
    shape = tuple(param.shape)
    work = _work_shape(shape)
    g = jnp.clip(grad.astype(jnp.float32).reshape(work), -spec.GRAD_CLIP, spec.GRAD_CLIP)
    p = param.astype(jnp.float32).reshape(work)
    state, fac_g = update_accumulators(state, g)
    groups = features(state, g, p, fac_g)
    axes = tuple(range(max(1, g.ndim - 1), g.ndim + 1))  # last two axes of (width, *S)
    hidden = theta["b0"]
    for index, group in enumerate(groups):
        x = _rms_normalise(group, spec.INPUT_NORM_EPS, axes)
        hidden = hidden + jnp.einsum("c...,ch->...h", x, theta[f"w0__{index}"])
    hidden = jax.nn.relu(hidden)
    hidden = jax.nn.relu(hidden @ theta["w1"] + theta["b1"])
    direction = hidden @ theta["w2"][:, spec.DIRECTION_OUTPUT] + theta["b2"][spec.DIRECTION_OUTPUT]
    if orthogonalize and g.ndim >= 2:
        direction = newton_schulz(direction)
    out_axes = tuple(range(max(0, g.ndim - 2), g.ndim))
    direction = _rms_normalise(direction, spec.OUTPUT_NORM_EPS, out_axes)
    return direction.reshape(shape).astype(param.dtype), state


# =============================================================================
# The fast formulation
# =============================================================================
def _theta_rows(rows: tuple[int, ...]) -> list[tuple[str, int]]:
    """(theta key, row) of rows of the concatenated ``(30, 8)`` first layer."""
    where = {r: (f"w0__{g.index}", i) for g in spec.FEATURE_GROUPS for i, r in enumerate(layout.GROUP_ROWS[g.name])}
    return [where[r] for r in rows]


# The channel order of the fused formulation and of the kernels (celo2.rule.layout):
# per-element channels, then the row- and column-statistic channels.
_EL_ROWS, _ROW_ROWS, _COL_ROWS = (_theta_rows(r) for r in (layout.ELEMENT_ROWS, layout.ROW_STAT_ROWS,
                                                             layout.COL_STAT_ROWS))


def _weights(theta: ThetaTree, rows: list[tuple[str, int]]) -> jax.Array:
    return jnp.stack([theta[key][r] for key, r in rows])  # (channels, 8)


def _rank1_terms(theta: ThetaTree, state: TensorState, dims: tuple[int, int], axes: tuple[int, ...]) -> list[jax.Array]:
    """The 12 row / column channels' share of the first layer, ``(8, *S)`` with
    size 1 at ``d0`` (row statistics) resp. ``d1``: normalised and contracted
    on the statistics themselves (broadcasting along one axis leaves the RMS
    over ``axes`` unchanged)."""
    d1, d0 = dims
    terms = []
    for stat, axis, rows in ((state.fac_r, d0, _ROW_ROWS), (state.fac_c, d1, _COL_ROWS)):
        x = jnp.expand_dims(jnp.concatenate([stat, jax.lax.rsqrt(stat + spec.RSQRT_EPS)]), 1 + axis)
        x = _rms_normalise(x, spec.INPUT_NORM_EPS, tuple(1 + a for a in axes))
        terms.append(jnp.einsum("c...,ch->h...", x, _weights(theta, rows)))
    return terms


def _sums_of_squares(xs: list[jax.Array], axes: tuple[int, ...]) -> list[jax.Array]:
    """``sum(x^2)`` over ``axes`` (kept) for every channel, as one variadic reduction."""
    squares = tuple(jnp.square(x) for x in xs)
    zeros = tuple(jnp.zeros((), x.dtype) for x in xs)
    sums = jax.lax.reduce(squares, zeros, lambda a, b: tuple(ai + bi for ai, bi in zip(a, b)), axes)
    return [jnp.expand_dims(s, axes) for s in sums]


def tensor_step(
    theta: ThetaTree, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool,
    cpu_kernels: bool = False, ns_dtype: "jnp.dtype" = jnp.float32,
) -> tuple[jax.Array, TensorState]:
    """One step of the rule on one tensor: ``(direction, new_state)``.

    The direction has unit RMS over the last two axes and the parameter's
    shape; the caller applies learning rate and weight decay. Same numbers as
    :func:`reference_tensor_step`, without full-size channel tensors.

    ``cpu_kernels=True``: when compiled for CPU, the step of a float32 vector,
    matrix or conv kernel is one custom call into the fused Numba kernels
    (:mod:`celo2.optax.cpu_ffi`, about 3x faster than XLA's loop there; not
    differentiable); other tensors, and other platforms, take the XLA
    formulation, and so does a tensor that may be split across devices
    (:func:`may_be_split`: decided at trace time from its type), whose
    direction the partitioner then splits like the parameter. A zero-size
    tensor gets a zero-size direction and its (zero-size) state back.
    ``ns_dtype``: the dtype of Newton-Schulz's matrix products (default
    float32; see :func:`celo2.optax.scale_by_celo2`).
    """
    if 0 in tuple(param.shape):
        return jnp.zeros(param.shape, param.dtype), state
    kind = _kernel_kind(param, grad, state, cpu_kernels)
    if kind is not None:
        def on_cpu(theta, state, grad, param):  # noqa: ANN001, ANN202
            return _cpu_step(theta, state, grad, param, orthogonalize, kind, False, ns_dtype)[:2]

        def elsewhere(theta, state, grad, param):  # noqa: ANN001, ANN202
            return _xla_tensor_step(theta, state, grad, param, orthogonalize, ns_dtype)

        return jax.lax.platform_dependent(theta, state, grad, param, cpu=on_cpu, default=elsewhere)
    return _xla_tensor_step(theta, state, grad, param, orthogonalize, ns_dtype)


def guarded_tensor_step(
    theta: ThetaTree, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool,
    cpu_kernels: bool = False, ns_dtype: "jnp.dtype" = jnp.float32,
) -> tuple[jax.Array, TensorState, jax.Array]:
    """:func:`tensor_step` under the non-finite policy ``"skip"``
    (:data:`celo2.rule.spec.NONFINITE_POLICIES`): ``(direction, new_state, ok)``.

    ``ok`` (a bool scalar) is false when ``grad`` holds a NaN or +-inf; the
    direction is then zero and the state comes back bitwise as it was. With
    ``ok`` true the results are :func:`tensor_step`'s, bitwise. The XLA
    formulation selects with ``jnp.where``; the CPU kernels check inside the
    custom call (matrices, vectors) or take the flag as an operand (conv
    kernels), so that a donated state is still updated in place and the
    direction still takes the gradient's buffer.

    Args:
        theta: The rule's weights (:func:`theta_to_jax`).
        state: The tensor's accumulators.
        grad: Its gradient.
        param: The parameter.
        orthogonalize: Newton-Schulz on matrix directions.
        cpu_kernels: As in :func:`tensor_step`.
        ns_dtype: As in :func:`tensor_step`.

    Returns:
        The direction (parameter's shape and dtype), the new state and ``ok``.
    """
    if 0 in tuple(param.shape):
        return jnp.zeros(param.shape, param.dtype), state, jnp.asarray(True)

    def elsewhere(theta, state, grad, param):  # noqa: ANN001, ANN202
        ok = finite(grad)
        d, new = _xla_tensor_step(theta, state, grad, param, orthogonalize, ns_dtype)
        new = keep_if(ok, new, state)
        return jnp.where(ok, d, jnp.zeros_like(d)), new, ok

    kind = _kernel_kind(param, grad, state, cpu_kernels)
    if kind is not None:
        def on_cpu(theta, state, grad, param):  # noqa: ANN001, ANN202
            return _cpu_step(theta, state, grad, param, orthogonalize, kind, True, ns_dtype)

        return jax.lax.platform_dependent(theta, state, grad, param, cpu=on_cpu, default=elsewhere)
    return elsewhere(theta, state, grad, param)


def _kernel_kind(param: jax.Array, grad: jax.Array, state: TensorState, cpu_kernels: bool) -> "str | None":
    """The CPU kernels' kind for this tensor when they are asked for, else
    ``None``. A tensor that may be split across devices (:func:`may_be_split`)
    takes XLA's formulation, which the partitioner splits like the operands:
    the custom call would need each tensor whole on one device."""
    if not cpu_kernels:
        return None
    from celo2.optax import cpu_ffi

    kind = cpu_ffi.kind(tuple(param.shape), grad.dtype, param.dtype)
    if kind is not None and may_be_split(param, grad, *state):
        return None
    return kind


def _cpu_step(theta: ThetaTree, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool,
              kind: str, skip: bool, ns_dtype: "jnp.dtype" = jnp.float32,
              ) -> tuple[jax.Array, TensorState, "jax.Array | None"]:
    """A tensor's step through the CPU kernels: ``(direction, new state, ok)``;
    ``ok`` is ``None`` unless ``skip`` (see :func:`guarded_tensor_step`)."""
    from celo2.optax import cpu_ffi

    net = cpu_ffi.pack_theta(theta)
    ok = None
    if kind == "vector":
        work = _work_shape(tuple(param.shape))
        d, sq, new_state = cpu_ffi.vector_step(net, state, grad.reshape(work), param.reshape(work), skip)
        if skip:  # a skipped tensor: zero direction, sum of squares -1
            ok, sq = sq >= 0, jnp.maximum(sq, 0.0)
        d = d * jax.lax.rsqrt(sq * (1.0 / d.size) + spec.OUTPUT_NORM_EPS)
        return d.reshape(param.shape), new_state, ok
    if kind == "matrix":
        d, sq, new_state = cpu_ffi.matrix_step(net, state, grad, param, skip)
        if skip:
            ok, sq = sq >= 0, jnp.maximum(sq, 0.0)
        if not orthogonalize:
            return d * jax.lax.rsqrt(sq * (1.0 / d.size) + spec.OUTPUT_NORM_EPS), new_state, ok
    else:
        if skip:
            ok = finite(grad)
        d, new_state = _conv_step_cpu(theta, net, state, grad, param, ok)
    if orthogonalize:
        d = newton_schulz(d, ns_dtype)
    return _rms_normalise(d, spec.OUTPUT_NORM_EPS, (d.ndim - 2, d.ndim - 1)), new_state, ok


def _conv_step_cpu(theta: ThetaTree, net: jax.Array, state: TensorState, grad: jax.Array,
                   param: jax.Array, ok: "jax.Array | None" = None) -> tuple[jax.Array, TensorState]:
    """A conv kernel ``(O, I, kh, kw)`` factored over ``O`` and ``I``: the
    factored statistics, Adafactor factors and rank-1 terms here (small
    tensors), the per-element work in one custom call; returns the raw
    direction and the new state. ``ok`` false (a skipped tensor): a zero
    direction and the state as it was."""
    from celo2.optax import cpu_ffi

    shape = tuple(param.shape)
    O, I, G = shape[0], shape[1], shape[2] * shape[3]
    dims = spec.factored_dims(shape)
    d1, d0 = dims
    grad, sum_over_i, sum_over_o = cpu_ffi.conv_stats(grad)
    # Means of clip(g)^2 + eps over axis 1 (I) and axis 0 (O); the factored statistics average over d0 and d1.
    mean = {1: sum_over_i * (1.0 / I) + spec.FACTORED_EPS, 0: sum_over_o * (1.0 / O) + spec.FACTORED_EPS}
    bf = _decays(spec.FACTORED_DECAYS, grad.ndim - 1)
    fac_r = bf * state.fac_r + (1.0 - bf) * mean[d0][None]
    fac_c = bf * state.fac_c + (1.0 - bf) * mean[d1][None]
    if ok is not None:
        fac_r, fac_c = jnp.where(ok, fac_r, state.fac_r), jnp.where(ok, fac_c, state.fac_c)
    state = state._replace(fac_r=fac_r, fac_c=fac_c)
    row_factor, col_factor = _adafactor_factors(fac_r, fac_c, dims)
    term_r, term_c = _rank1_terms(theta, state, dims, (2, 3))
    term_r = term_r + theta["b0"].reshape(8, 1, 1, 1, 1)
    # (varying along O, varying along I): the row statistic runs along O when d0 is I.
    pairs = [(row_factor, col_factor), (term_r, term_c)]
    if d0 != 1:
        pairs = [(b, a) for a, b in pairs]
    (rf, cf), (tr, tc) = pairs
    d, m, v = cpu_ffi.conv_step(net, state.m, state.v, grad, param, rf.reshape(3, O, G), cf.reshape(3, I, G),
                                tr.reshape(8, O, G), tc.reshape(8, I, G), ok)
    return d, state._replace(m=m, v=v)


def _xla_tensor_step(
    theta: ThetaTree, state: TensorState, grad: jax.Array, param: jax.Array, orthogonalize: bool,
    ns_dtype: "jnp.dtype" = jnp.float32,
) -> tuple[jax.Array, TensorState]:
    """:func:`tensor_step` as XLA code: the 12 rank-1 channels on the
    statistics, the rest one fused elementwise loop."""
    shape = tuple(param.shape)
    work = _work_shape(shape)
    g = jnp.clip(grad.astype(jnp.float32).reshape(work), -spec.GRAD_CLIP, spec.GRAD_CLIP)
    p = param.astype(jnp.float32).reshape(work)
    state, fac_g = update_accumulators(state, g)
    nd = g.ndim
    axes = tuple(range(max(0, nd - 2), nd))  # normalisation groups: the last two axes
    group = int(np.prod([work[a] for a in axes]))
    m, v = state.m, state.v
    rv = jax.lax.rsqrt(v + spec.RSQRT_EPS)
    xs = [g, jnp.clip(g, -spec.FEATURE_CLIP, spec.FEATURE_CLIP), p, m[0], m[1], m[2], v,
          m[0] * rv, m[1] * rv, m[2] * rv, rv, fac_g[0], fac_g[1], fac_g[2], g * rv]
    dims = spec.factored_dims(work)
    w0 = _weights(theta, _EL_ROWS)
    hidden = [theta["b0"][j] for j in range(spec.HIDDEN_SIZE)]
    if dims is not None:
        d1, d0 = dims
        row_factor, col_factor = _adafactor_factors(state.fac_r, state.fac_c, dims)
        xs += [m[k] * row_factor[k] * col_factor[k] for k in range(3)]
        for term in _rank1_terms(theta, state, dims, axes):
            hidden = [h + term[j] for j, h in enumerate(hidden)]
    sums = _sums_of_squares(xs, axes)
    xs = [x * jax.lax.rsqrt(s * (1.0 / group) + spec.INPUT_NORM_EPS) for x, s in zip(xs, sums)]
    for c, x in enumerate(xs):
        hidden = [h + w0[c, j] * x for j, h in enumerate(hidden)]
    hidden = [jax.nn.relu(h) for h in hidden]
    w1, b1 = theta["w1"], theta["b1"]
    w2, b2 = theta["w2"][:, spec.DIRECTION_OUTPUT], theta["b2"][spec.DIRECTION_OUTPUT]
    direction = b2
    for k in range(spec.HIDDEN_SIZE):
        z = b1[k]
        for j, h in enumerate(hidden):
            z = z + w1[j, k] * h
        direction = direction + w2[k] * jax.nn.relu(z)
    direction = jnp.broadcast_to(direction, work)
    if orthogonalize and nd >= 2:
        direction = newton_schulz(direction, ns_dtype)
    direction = _rms_normalise(direction, spec.OUTPUT_NORM_EPS, axes)
    return direction.reshape(shape).astype(param.dtype), state
