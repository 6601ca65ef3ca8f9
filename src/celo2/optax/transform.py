"""Celo2 as optax transformations, built from optax's own combinators."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import optax

from celo2.hardware import ns_dtype_name, resolve_ns_dtype_name
from celo2.rule import routing, spec
from celo2.rule.theta import Theta
from celo2.optax.rule import (TensorState, finite, guarded_tensor_step, init_tensor_state, keep_if, tensor_step,
                              theta_to_jax)

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
ThetaLike = Union[Theta, Mapping[str, Any], str, None]


class ScaleByCelo2State(NamedTuple):
    """State of :func:`scale_by_celo2`.

    Attributes:
        count: Updates done (int32 scalar).
        tensors: Per-parameter accumulators (a pytree shaped like the params).
        nonfinite_steps: Per-parameter int32 counts of steps skipped for a non-finite
            gradient (see :func:`nonfinite_steps`); ``None`` in a state made without them.
    """

    count: jax.Array
    tensors: Any
    nonfinite_steps: Any = None


class PerTensorSkipState(NamedTuple):
    """State of :func:`skip_nonfinite_per_tensor`.

    Attributes:
        inner: The inner transformation's state per tensor (a pytree shaped like the params,
            one inner state at each leaf).
        nonfinite_steps: Per-tensor int32 counts of skipped steps.
    """

    inner: Any
    nonfinite_steps: Any


def _counters(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda _: jnp.zeros([], jnp.int32), params)


def zero_skipped_updates(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner``, with the whole update of every tensor that ``inner`` skipped
    for a non-finite gradient set to zero (weight decay and learning rate
    included), so that ``optax.apply_updates`` leaves that parameter as it was.

    A tensor counts as skipped when its counter in the first
    :class:`ScaleByCelo2State` or :class:`PerTensorSkipState` of ``inner``'s
    state went up in this update (so the gradient is not read again: on the
    CPU kernels a second reader would make XLA copy it).

    Args:
        inner: A transformation whose state holds such counters (a chain
            starting with ``scale_by_celo2(nonfinite="skip")`` or
            :func:`skip_nonfinite_per_tensor`, say).

    Returns:
        A transformation with ``inner``'s state.

    Raises:
        ValueError: At the first update, if ``inner``'s state holds no counters.
    """

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        out, new_state = inner.update(updates, state, params)
        before, after = _first_counters(state), _first_counters(new_state)
        if after is None:
            raise ValueError("zero_skipped_updates: the inner transformation keeps no non-finite counters")
        if before is None:  # a state made before the counters existed
            before = jax.tree_util.tree_map(jnp.zeros_like, after)
        out = jax.tree_util.tree_map(lambda u, a, b: jnp.where(a == b, u, jnp.zeros_like(u)), out, after, before)
        return out, new_state

    return optax.GradientTransformation(inner.init, update_fn)


def _counting_nodes(state: Any) -> list:
    """The :class:`ScaleByCelo2State` / :class:`PerTensorSkipState` nodes of a state, in tree order."""
    counting = (ScaleByCelo2State, PerTensorSkipState)
    nodes = jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, counting))
    return [n for n in nodes if isinstance(n, counting) and n.nonfinite_steps is not None]


def _first_counters(state: Any) -> Any:
    nodes = _counting_nodes(state)
    return nodes[0].nonfinite_steps if nodes else None


def skip_nonfinite_per_tensor(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` run on each tensor alone, with its own state, skipped on
    tensors whose gradient holds a NaN or +-inf (policy ``"skip"``,
    :data:`celo2.rule.spec.NONFINITE_POLICIES`): their update is zero and
    their whole inner state (step count included) stays bitwise as it was.

    Args:
        inner: An elementwise transformation such as ``optax.scale_by_adam``
            (each tensor gets its own state, so its step count advances only
            on the steps it takes, as in PyTorch's AdamW).

    Returns:
        A transformation with :class:`PerTensorSkipState`.
    """

    def init_fn(params: Any) -> PerTensorSkipState:
        return PerTensorSkipState(jax.tree_util.tree_map(inner.init, params), _counters(params))

    def update_fn(updates: Any, state: PerTensorSkipState, params: Any = None) -> tuple[Any, PerTensorSkipState]:
        flat_g, treedef = jax.tree_util.tree_flatten(updates)
        flat_s = treedef.flatten_up_to(state.inner)
        flat_n = treedef.flatten_up_to(state.nonfinite_steps)
        flat_p = treedef.flatten_up_to(params) if params is not None else [None] * len(flat_g)
        outs, states, counts = [], [], []
        for g, s, n, p in zip(flat_g, flat_s, flat_n, flat_p):
            ok = finite(g)
            u, new = inner.update(g, s, p)
            outs.append(jnp.where(ok, u, jnp.zeros_like(u)))
            states.append(keep_if(ok, new, s))
            counts.append(n + jnp.logical_not(ok).astype(jnp.int32))
        unflat = lambda xs: jax.tree_util.tree_unflatten(treedef, xs)  # noqa: E731
        return unflat(outs), PerTensorSkipState(unflat(states), unflat(counts))

    return optax.GradientTransformation(init_fn, update_fn)


def nonfinite_steps(state: Any) -> dict[str, int]:
    """Steps skipped for a non-finite gradient, per tensor, read from any
    optimizer state built here (:func:`celo2`, :func:`celo2_base`,
    :func:`scale_by_celo2`, nested in chains or partitions).

    Reads the counters to the host (it synchronises): call it for logging.

    Args:
        state: The optimizer state (``opt.init(params)``, then updated).

    Returns:
        Tensor path (``jax.tree_util.keystr`` of its place in the params) ->
        count, summed over the transformations that count it; always 0 under
        ``nonfinite="propagate"``.
    """
    counts: dict[str, int] = {}
    for node in _counting_nodes(state):
        for path, n in jax.tree_util.tree_leaves_with_path(node.nonfinite_steps):
            key = _path_name(path)
            counts[key] = counts.get(key, 0) + int(n)
    return counts


def _is_tensor_state(x: Any) -> bool:
    return isinstance(x, TensorState)


def scale_by_celo2(
    theta: ThetaLike = None, orthogonalize: bool = True, cpu_kernels: bool | None = None,
    nonfinite: str = spec.NONFINITE_DEFAULT, ns_dtype: Any = "auto",
) -> optax.GradientTransformation:
    """The raw Celo2 rule: turns gradients into unit-RMS update directions.

    ``update`` needs ``params``. Like ``optax.scale_by_adam``, the output is a
    descent direction to be scaled by ``-learning_rate``.

    Args:
        theta: The rule's weights: a :class:`~celo2.Theta`, a path or ``hf://`` source (see
            :func:`celo2.load_theta`), a dict of arrays keyed like :data:`celo2.rule.spec.THETA_KEYS`
            (may be traced, e.g. inside a meta-gradient), or ``None`` (default) for the shipped theta.
        orthogonalize: Newton-Schulz on the directions of matrices (default ``True``: Celo2;
            ``False``: Celo2-base).
        cpu_kernels: On CPU, run float32 vectors, matrices and conv kernels through the fused
            Numba kernels (an XLA custom call, :mod:`celo2.optax.cpu_ffi`) instead of XLA's own
            loop; same numbers to float32 rounding, about 3x faster, but not differentiable.
            ``None`` (default): on when Numba is installed and theta is not traced; ``False``: XLA
            everywhere (needed to differentiate through the update); ``True``: on, and an error if
            Numba is missing. Other platforms always compile the XLA formulation, and so do
            tensors that may be split across devices (``NamedSharding`` over several devices:
            :func:`celo2.optax.rule.may_be_split`), whose directions come back split like them.
        nonfinite: ``"skip"`` (default) gives a tensor whose gradient holds a NaN or +-inf a zero
            direction, keeps its accumulators bitwise, and counts it in ``state.nonfinite_steps``
            (int32 per tensor; read with :func:`nonfinite_steps`); decided inside the jitted update
            with ``jnp.where``, no host synchronisation. Composed by hand, the later transformations
            (weight decay) still act on a skipped tensor unless the chain is wrapped in
            :func:`zero_skipped_updates`, as :func:`celo2` and :func:`celo2_base` do.
            ``"propagate"``: no check, a NaN flows through (and the rule's normalisations spread it
            over the tensor).
        ns_dtype: The dtype of Newton-Schulz's matrix products. ``"auto"`` (default): bfloat16
            where the default backend multiplies it natively (GPU, CPUs with AMX or AVX512-BF16, see
            :func:`celo2.hardware.resolve_ns_dtype_name`), float32 elsewhere and whenever theta is
            traced (a meta-gradient through the update keeps float32); ``"float32"`` / ``"bfloat16"``
            (or ``jnp.float32`` / ``jnp.bfloat16``) force it.

    Returns:
        An ``optax.GradientTransformation`` with :class:`ScaleByCelo2State`.

    Raises:
        ValueError: An unknown ``nonfinite`` or ``ns_dtype``, ``cpu_kernels=True`` without Numba,
            or (at ``update``) no ``params``.
        celo2.ThetaError: ``theta`` is malformed.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> from celo2.optax import scale_by_celo2
        >>> opt = optax.chain(scale_by_celo2(), optax.scale_by_learning_rate(1e-3))
        >>> params = {"w": jnp.ones((4, 3))}
        >>> state = opt.init(params)
        >>> updates, state = opt.update({"w": jnp.full((4, 3), 0.5)}, state, params)
        >>> updates["w"].shape
        (4, 3)

    Zero gradients still give unit-RMS directions (published theta too), so
    a parameter with exactly zero gradients moves by about the learning rate
    per step. Zero-size tensors get zero-size updates. Accumulators are
    float32; the direction is returned in the parameter's dtype, so a float64
    parameter (``jax_enable_x64``) is updated in float64.

    """
    skip = spec.check_nonfinite_policy(nonfinite) == "skip"
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
            nonfinite_steps=_counters(params),
        )

    def update_fn(updates: Any, state: ScaleByCelo2State, params: Any = None) -> tuple[Any, ScaleByCelo2State]:
        if params is None:
            raise ValueError("scale_by_celo2 needs the parameters: call update(grads, state, params)")
        flat_g, treedef = jax.tree_util.tree_flatten(updates)
        flat_p = treedef.flatten_up_to(params)
        flat_s = treedef.flatten_up_to(state.tensors)
        counters = state.nonfinite_steps if state.nonfinite_steps is not None else _counters(updates)
        flat_n = treedef.flatten_up_to(counters)
        outs, new_states, counts = [], [], []
        for g, p, s, n in zip(flat_g, flat_p, flat_s, flat_n):
            if g is None:
                outs.append(None)
                new_states.append(s)
                counts.append(n)
                continue
            if skip:
                direction, new, ok = guarded_tensor_step(theta_tree, s, g, p, orthogonalize, use_kernels, ns)
                n = n + jnp.logical_not(ok).astype(jnp.int32)
            else:
                direction, new = tensor_step(theta_tree, s, g, p, orthogonalize, use_kernels, ns)
            outs.append(direction)
            new_states.append(new)
            counts.append(n)
        return (
            jax.tree_util.tree_unflatten(treedef, outs),
            ScaleByCelo2State(
                count=optax.safe_increment(state.count),
                tensors=jax.tree_util.tree_unflatten(treedef, new_states),
                nonfinite_steps=jax.tree_util.tree_unflatten(treedef, counts),
            ),
        )

    return optax.GradientTransformation(init_fn, update_fn)


def _resolve_cpu_kernels(cpu_kernels: bool | None, traced_theta: bool) -> bool:
    from celo2.optax import cpu_ffi

    if cpu_kernels is None:
        if not traced_theta:
            cpu_ffi.warn_unsupported_once()
        return cpu_ffi.AVAILABLE and not traced_theta
    if cpu_kernels and not cpu_ffi.AVAILABLE:
        raise ValueError(f"cpu_kernels=True {cpu_ffi.unavailable_reason()}; pass cpu_kernels=None to fall back to XLA")
    return bool(cpu_kernels)


def _is_traced_mapping(theta: ThetaLike) -> bool:
    return isinstance(theta, Mapping) and not isinstance(theta, Theta) and any(
        isinstance(v, jax.core.Tracer) for v in theta.values()
    )


def _path_name(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path)


def default_param_labels(adam_name_pattern: str | None = routing.ADAM_NAME_PATTERN) -> Callable[[Any], Any]:
    """The default routing of :func:`celo2`, as a label function for ``optax.partition``.

    Args:
        adam_name_pattern: Regular expression searched in each leaf's path
            (``jax.tree_util.keystr``); a match sends a matrix to AdamW (default
            :data:`celo2.rule.routing.ADAM_NAME_PATTERN`; ``None``: shapes only).

    Returns:
        A function of ``params`` returning a pytree like it of ``"adam"`` (0-D and 1-D
        leaves, and matrices whose path matches) and ``"celo2"`` (the rest).

    Example:
        >>> import jax.numpy as jnp
        >>> from celo2.optax import default_param_labels
        >>> default_param_labels()({"embed": jnp.ones((10, 4)), "w": jnp.ones((4, 4)), "b": jnp.ones(4)})
        {'b': 'adam', 'embed': 'adam', 'w': 'celo2'}
    """

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
    nonfinite: str = spec.NONFINITE_DEFAULT,
    ns_dtype: Any = "auto",
) -> optax.GradientTransformation:
    """The Celo2 harness: the learned rule for matrices, AdamW for the rest.

    Matrices get ``p <- p - lr * (direction + weight_decay * p)``; vectors,
    scalars, and (by name) embeddings and output heads get
    ``optax.adamw(adam_lr_mult * lr, adam_b1, adam_b2, adam_eps, weight_decay)``.

    Args:
        learning_rate: The rule's learning rate or schedule; AdamW gets ``adam_lr_mult`` times it.
        weight_decay: Decoupled weight decay of both branches (default 0).
        adam_lr_mult: Learning-rate multiplier of the AdamW branch (default 20).
        adam_b1: AdamW's beta1 (default 0.9).
        adam_b2: AdamW's beta2 (default 0.95).
        adam_eps: AdamW's epsilon (default 1e-8).
        theta: The rule's weights (see :func:`scale_by_celo2`; ``None``: shipped theta).
        orthogonalize: Newton-Schulz on the rule's matrix directions (default ``True``).
        param_labels: A pytree or function of params giving ``"celo2"`` or
            ``"adam"`` per leaf; overrides the default routing (default ``None``).
        adam_name_pattern: Regex of paths routed to AdamW by the default routing.
        cpu_kernels: See :func:`scale_by_celo2` (default ``None``: on where available).
        nonfinite: ``"skip"`` (default) or ``"propagate"``
            (:data:`celo2.rule.spec.NONFINITE_POLICIES`). Under ``"skip"`` a
            tensor whose gradient holds a NaN or +-inf gets a zero update (no
            weight decay either) and keeps all of its state bitwise, AdamW's
            moments and its own step count included (the AdamW branch keeps
            one optax ``scale_by_adam`` state per tensor for that); other
            tensors step as under ``"propagate"``; the skips are counted per
            tensor (int32, read them with :func:`nonfinite_steps`). Decided
            inside the jitted update, no host synchronisation. Learning-rate
            schedules count steps for all tensors alike.
        ns_dtype: Newton-Schulz's dtype, see :func:`scale_by_celo2` (default
            ``"auto"``: bfloat16 where the hardware multiplies it natively).

    Returns:
        An ``optax.GradientTransformation`` (``update`` needs ``params``).

    Zero gradients still give unit-RMS directions (published theta too), so
    a rule-routed parameter with exactly zero gradients moves by about the
    learning rate per step. Zero-size tensors get zero-size updates; a float64
    parameter (``jax_enable_x64``) is updated in float64.
    """
    labels = param_labels if param_labels is not None else default_param_labels(adam_name_pattern)
    adam_lr = _scaled(learning_rate, adam_lr_mult)
    if spec.check_nonfinite_policy(nonfinite) == "skip":
        adam = zero_skipped_updates(optax.chain(
            skip_nonfinite_per_tensor(optax.scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps)),
            optax.add_decayed_weights(weight_decay),
            optax.scale_by_learning_rate(adam_lr),
        ))
    else:
        adam = optax.adamw(adam_lr, b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=weight_decay)
    return optax.partition(
        {
            routing.LEARNED: _learned(
                scale_by_celo2(theta, orthogonalize=orthogonalize, cpu_kernels=cpu_kernels, nonfinite=nonfinite,
                               ns_dtype=ns_dtype),
                weight_decay, learning_rate, nonfinite),
            routing.ADAM: adam,
        },
        labels,
    )


def _learned(rule: optax.GradientTransformation, weight_decay: float, learning_rate: ScalarOrSchedule,
             nonfinite: str) -> optax.GradientTransformation:
    """The rule, then decoupled weight decay and the learning rate; under
    ``"skip"`` a skipped tensor's whole update is zero."""
    chain = optax.chain(rule, optax.add_decayed_weights(weight_decay), optax.scale_by_learning_rate(learning_rate))
    return zero_skipped_updates(chain) if nonfinite == "skip" else chain


def celo2_base(
    learning_rate: ScalarOrSchedule,
    weight_decay: float = 0.0,
    theta: ThetaLike = None,
    cpu_kernels: bool | None = None,
    nonfinite: str = spec.NONFINITE_DEFAULT,
) -> optax.GradientTransformation:
    """Celo2-base: the learned rule without orthogonalisation on every tensor,
    ``p <- p - lr * (direction + weight_decay * p)``.

    Args:
        learning_rate: Learning rate or schedule.
        weight_decay: Decoupled weight decay (default 0).
        theta: The rule's weights (see :func:`scale_by_celo2`; ``None``: shipped theta).
        cpu_kernels: See :func:`scale_by_celo2` (default ``None``: on where available).
        nonfinite: ``"skip"`` (default) or ``"propagate"``, as in :func:`celo2`:
            a tensor with a NaN or +-inf gradient gets a zero update and keeps
            its state bitwise, counted per tensor (:func:`nonfinite_steps`).

    Returns:
        An ``optax.GradientTransformation`` (``update`` needs ``params``).

    Zero gradients still give unit-RMS directions (published theta too), so a
    parameter with exactly zero gradients moves by about the learning rate per
    step. Zero-size tensors get zero-size updates; a float64 parameter
    (``jax_enable_x64``) is updated in float64.
    """
    rule = scale_by_celo2(theta, orthogonalize=False, cpu_kernels=cpu_kernels, nonfinite=nonfinite)
    return _learned(rule, weight_decay, learning_rate, nonfinite)


def routing_table(params: Any, param_labels: Any = None, adam_name_pattern: str | None = routing.ADAM_NAME_PATTERN) -> str:
    """The routing of ``params`` under :func:`celo2` as a printable table.

    Args:
        params: The parameter pytree (arrays, or anything with a shape).
        param_labels: The labels given to :func:`celo2`, a pytree or a function of ``params``
            (default ``None``: :func:`default_param_labels`).
        adam_name_pattern: The pattern given to :func:`celo2` (default
            :data:`celo2.rule.routing.ADAM_NAME_PATTERN`); unused with ``param_labels``.

    Returns:
        One line per leaf (branch, path, shape, elements), then the totals per branch.

    Example:
        >>> import jax.numpy as jnp
        >>> from celo2.optax import routing_table
        >>> print(routing_table({"w": jnp.ones((4, 3)), "b": jnp.ones(3)}))
        branch  parameter  shape  elements
        ------  ---------  -----  --------
        adam    ['b']      3             3
        celo2   ['w']      4x3          12
        ------  ---------  -----  --------
        adam: 1 tensors, 3 elements
        celo2: 1 tensors, 12 elements
    """
    labels = param_labels if param_labels is not None else default_param_labels(adam_name_pattern)
    if callable(labels):
        labels = labels(params)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    flat_labels = jax.tree_util.tree_leaves(labels)
    rows = [(lab, _path_name(path), tuple(jnp.shape(x))) for (path, x), lab in zip(leaves, flat_labels)]
    return routing.format_routing_table(rows)
