"""Celo2 as optax transformations, built from optax's own combinators.

:func:`scale_by_celo2` is the rule (like ``optax.scale_by_adam``);
:func:`celo2` partitions the parameters between the rule and AdamW (like
``optax.contrib.muon``), :func:`celo2_base` runs the rule on every tensor.
The per-tensor step is :mod:`celo2.optax.functional`; the non-finite policy's
combinators are :mod:`celo2.optax.nonfinite`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import optax

from celo2.hardware import ns_dtype_name, resolve_ns_dtype_name
from celo2.optax import cpu_ffi
from celo2.optax.functional import guarded_tensor_step, tensor_step
from celo2.optax.nonfinite import (PerTensorSkipState, counters, nonfinite_steps, skip_nonfinite_per_tensor,
                                   zero_skipped_updates)
from celo2.optax.rounding import (TENSOR_INDICES, StateRounding, check_rounding_seed, number_tensors,
                                  resolve_state_dtype, tensor_indices)
from celo2.optax.state import ScaleByCelo2State, init_tensor_state, theta_to_jax
from celo2.optax.blockwise8 import blockwise8_rule, is_blockwise8
from celo2.optax.state_dtype import blockwise8_adam_moments, rounded_adam_moments
from celo2.rule import routing, spec
from celo2.rule.theta import Theta
from celo2.rule.variant import PUBLISHED, RuleVariant, VariantError, note_general_path, require_published
from celo2.theta_files import load_theta

__all__ = [
    "scale_by_celo2", "celo2", "celo2_base", "ScaleByCelo2State", "PerTensorSkipState", "nonfinite_steps",
    "skip_nonfinite_per_tensor", "zero_skipped_updates", "default_param_labels", "routing_table",
]

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]
ThetaLike = Union[Theta, Mapping[str, Any], str, None]


def scale_by_celo2(
    theta: ThetaLike = None, orthogonalize: bool = True, cpu_kernels: bool | None = None,
    nonfinite: str = spec.NONFINITE_DEFAULT, ns_dtype: Any = "auto", *, state_dtype: Any = jnp.float32,
    rounding_seed: int = 0, variant: RuleVariant | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The raw Celo2 rule: turns gradients into unit-RMS update directions.

    ``update`` needs ``params``. Like ``optax.scale_by_adam``, the output is a
    descent direction to be scaled by ``-learning_rate``.

    Args:
        theta: The rule's weights: a :class:`~celo2.Theta`, a path or ``hf://`` source (see
            :func:`celo2.load_theta`), a dict of arrays keyed like ``variant.theta_shapes()``
            (:data:`celo2.rule.spec.THETA_KEYS` for the published rule; may be traced, e.g. inside a
            meta-gradient), or ``None`` (default) for the shipped theta. A theta of any rule variant
            runs: a :class:`~celo2.Theta` and a theta file carry their variant.
        orthogonalize: Newton-Schulz on the directions of matrices (default ``True``: Celo2;
            ``False``: Celo2-base).
        cpu_kernels: On CPU, run float32 vectors, matrices and conv kernels through the fused
            Numba kernels (an XLA custom call, :mod:`celo2.optax.cpu_ffi`) instead of XLA's own
            loop (compiled without FMAs and at 256 bits); same numbers to float32 rounding,
            faster, but not differentiable.
            ``None`` (default): on when Numba is installed, theta is not traced and it is of the
            published rule (a rule variant's theta runs on XLA, with one
            :class:`~celo2.rule.variant.VariantPathWarning`); ``False``: XLA
            everywhere (needed to differentiate through the update); ``True``: on, and an error if
            Numba is missing or theta is a rule variant's. Other platforms always compile the XLA formulation, and so do
            tensors that may be split across devices (``NamedSharding`` over several devices:
            :func:`celo2.optax.state.may_be_split`), whose directions come back split like them.
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
        state_dtype: The accumulators' dtype: ``jnp.float32`` (default) or ``jnp.bfloat16`` (or their
            names), half the bytes; or ``"int8"``, 8-bit blockwise codes and scales
            (:mod:`celo2.optax.blockwise8`), about a quarter. Arithmetic stays float32; each accumulator is stored with the
            counter-based stochastic rounding of :mod:`celo2.optax.rounding` (seed, step, tensor, slot,
            element index), so a run repeats and resumes bitwise and every path (XLA, the CPU kernels,
            sharded or not) stores the same bits. The step of a tensor counts the updates it took:
            a step skipped for a non-finite gradient does not count (and keeps the stored bits).
            The tensor is the leaf's index in tree-flatten order of the parameters given to
            ``update`` (:func:`celo2` and :func:`celo2_base` number their whole tree).
        rounding_seed: The rounding's seed (``0 <= seed < 2**32``, default 0), kept in the state
            (``ScaleByCelo2State.rounding_seed``), which ``update`` reads it from.
        variant: The rule variant of a dict ``theta`` (default ``None``: the published rule); a
            :class:`~celo2.Theta` or a theta file carries its own, which ``variant`` must then equal.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` with :class:`ScaleByCelo2State` (the extra
        argument :data:`celo2.optax.rounding.TENSOR_INDICES`, where given, numbers the tensors).

    Raises:
        ValueError: An unknown ``nonfinite``, ``ns_dtype`` or ``state_dtype``, a bad ``rounding_seed``,
            ``cpu_kernels=True`` without Numba, or (at ``update``) no ``params`` or a state whose
            accumulators are not in ``state_dtype`` (convert it with :func:`celo2.optax.convert_state_dtype`).
        celo2.ThetaError: ``theta`` is malformed.
        celo2.rule.variant.VariantNotSupportedError: ``cpu_kernels=True`` with a rule variant's theta.
        celo2.rule.variant.VariantError: ``variant`` differs from the one ``theta`` carries.

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
    ``state_dtype`` whatever the parameter dtype; the direction is returned in
    the parameter's dtype, so a float64 parameter (``jax_enable_x64``) is
    updated in float64.

    """
    if is_blockwise8(state_dtype):  # the float32 rule inside celo2.optax.blockwise8's decode / encode
        return blockwise8_rule(scale_by_celo2(theta, orthogonalize, cpu_kernels, nonfinite, ns_dtype,
                                              rounding_seed=rounding_seed), rounding_seed)
    skip = spec.check_nonfinite_policy(nonfinite) == "skip"
    dtype = resolve_state_dtype(state_dtype)
    seed = check_rounding_seed(rounding_seed)
    low = dtype == jnp.bfloat16
    traced = _is_traced_mapping(theta)
    if not isinstance(theta, Mapping) or isinstance(theta, Theta):
        theta = load_theta(theta)  # read once: its variant and its arrays
    variant = _theta_variant(theta, variant)
    theta_tree = theta_to_jax(theta, variant) if not traced else dict(theta)
    use_kernels = _resolve_cpu_kernels(cpu_kernels, traced, variant)
    # Packed once for every tensor and update (a traced theta is packed in its own trace, at construction).
    net = cpu_ffi.pack_theta(theta_tree) if use_kernels else None
    ns_name = ns_dtype_name(ns_dtype)
    if ns_name == "auto":
        ns_name = "float32" if traced else resolve_ns_dtype_name("auto", jax.default_backend())
    ns = jnp.dtype(ns_name)

    def init_fn(params: Any) -> ScaleByCelo2State:
        return ScaleByCelo2State(
            count=jnp.zeros([], jnp.int32),
            tensors=jax.tree_util.tree_map(lambda p: init_tensor_state(p, dtype), params),
            nonfinite_steps=counters(params),
            rounding_seed=jnp.asarray(seed, jnp.uint32) if low else None,
        )

    def update_fn(updates: Any, state: ScaleByCelo2State, params: Any = None, **extra_args: Any,
                  ) -> tuple[Any, ScaleByCelo2State]:
        if params is None:
            raise ValueError("scale_by_celo2 needs the parameters: call update(grads, state, params)")
        _refuse_float0("scale_by_celo2", updates)
        _check_state_dtype(state, dtype)
        flat_g, treedef = jax.tree_util.tree_flatten(updates)
        flat_p = treedef.flatten_up_to(params)
        flat_s = treedef.flatten_up_to(state.tensors)
        counts_before = state.nonfinite_steps if state.nonfinite_steps is not None else counters(updates)
        flat_n = treedef.flatten_up_to(counts_before)
        count = optax.safe_increment(state.count)
        indices = tensor_indices(updates, extra_args) if low else [None] * len(flat_g)
        outs, new_states, counts = [], [], []
        for g, p, s, n, index in zip(flat_g, flat_p, flat_s, flat_n, indices):
            if g is None:
                outs.append(None)
                new_states.append(s)
                counts.append(n)
                continue
            # The tensor's step: the updates it took, this one included (the rounded state of a skipped
            # step is not stored).
            rounding = StateRounding(state.rounding_seed, count - n, index) if low else None
            if skip:
                direction, new, ok = guarded_tensor_step(theta_tree, s, g, p, orthogonalize, use_kernels, ns, net=net,
                                                         rounding=rounding, variant=variant)
                n = n + jnp.logical_not(ok).astype(jnp.int32)
            else:
                direction, new = tensor_step(theta_tree, s, g, p, orthogonalize, use_kernels, ns, net=net,
                                             rounding=rounding, variant=variant)
            outs.append(direction)
            new_states.append(new)
            counts.append(n)
        return (
            jax.tree_util.tree_unflatten(treedef, outs),
            ScaleByCelo2State(
                count=count,
                tensors=jax.tree_util.tree_unflatten(treedef, new_states),
                nonfinite_steps=jax.tree_util.tree_unflatten(treedef, counts),
                rounding_seed=state.rounding_seed,
            ),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_state_dtype(state: ScaleByCelo2State, dtype: "jnp.dtype") -> None:
    """Refuse, naming the first leaf, a state whose accumulators are not in ``dtype`` (at trace time)."""
    for path, x in jax.tree_util.tree_leaves_with_path(state.tensors):
        if x.size and jnp.dtype(x.dtype) != dtype:
            raise ValueError(
                f"scale_by_celo2: the accumulator {_path_name(path)} is {jnp.dtype(x.dtype).name}, but this optimizer "
                f"keeps {dtype.name} state; convert the state with celo2.optax.convert_state_dtype(state, "
                f"jnp.{dtype.name})")
    if dtype == jnp.bfloat16 and state.rounding_seed is None:
        raise ValueError("scale_by_celo2: a bfloat16 state needs its rounding_seed (ScaleByCelo2State.rounding_seed "
                         "is None); convert a float32 state with celo2.optax.convert_state_dtype")


def _theta_variant(theta: "Theta | Mapping[str, Any]", variant: RuleVariant | None) -> RuleVariant:
    """The rule variant ``theta`` belongs to: a :class:`Theta`'s own, else ``variant`` or the published."""
    if not isinstance(theta, Theta):
        return PUBLISHED if variant is None else variant
    own = theta.variant
    if variant is not None and variant != own:
        raise VariantError(f"scale_by_celo2: variant= is {variant.label} but the theta belongs to the rule variant "
                           f"{own.label}; leave variant= out for a Theta or a theta file")
    return own


def _resolve_cpu_kernels(cpu_kernels: bool | None, traced_theta: bool, variant: RuleVariant = PUBLISHED) -> bool:
    if not variant.is_published:
        if cpu_kernels:
            require_published(variant, "cpu_kernels=True (the fused Numba CPU kernels)")
        if cpu_kernels is None and not traced_theta:
            note_general_path(variant, "celo2.optax", "XLA's formulation")
        return False
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
    *,
    state_dtype: Any = jnp.float32,
    rounding_seed: int = 0,
    variant: RuleVariant | None = None,
) -> optax.GradientTransformationExtraArgs:
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
        state_dtype: ``jnp.float32`` (default), ``jnp.bfloat16`` or ``"int8"``: the dtype of the rule's
            accumulators and of AdamW's two moments (see :func:`scale_by_celo2`; AdamW's arithmetic
            is ``optax.scale_by_adam``'s in float32, its moments stored by
            :func:`celo2.optax.state_dtype.rounded_adam_moments` with step = AdamW's count after
            the update). The tensors are numbered in tree-flatten order of the whole parameter
            tree, whichever branch they take.
        rounding_seed: The stochastic rounding's seed (default 0), kept in both branches' states.
        variant: The rule variant of a dict ``theta``, see :func:`scale_by_celo2`.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` (``update`` needs ``params``).

    Raises:
        ValueError: An unknown ``nonfinite``, ``ns_dtype`` or ``state_dtype``, or a bad ``rounding_seed``.

    Zero gradients still give unit-RMS directions (published theta too), so
    a rule-routed parameter with exactly zero gradients moves by about the
    learning rate per step. Zero-size tensors get zero-size updates; a float64
    parameter (``jax_enable_x64``) is updated in float64.
    """
    labels = param_labels if param_labels is not None else default_param_labels(adam_name_pattern)
    adam_lr = _scaled(learning_rate, adam_lr_mult)
    eight = is_blockwise8(state_dtype)
    low = not eight and resolve_state_dtype(state_dtype) == jnp.bfloat16
    skip = spec.check_nonfinite_policy(nonfinite) == "skip"
    moments = optax.scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps)
    if skip:
        moments = skip_nonfinite_per_tensor(moments)
    if low or skip or eight:
        stored = (rounded_adam_moments(moments, rounding_seed) if low
                  else blockwise8_adam_moments(moments, rounding_seed) if eight else moments)
        adam = optax.chain(
            stored,
            optax.add_decayed_weights(weight_decay),
            optax.scale_by_learning_rate(adam_lr),
        )
        adam = zero_skipped_updates(adam) if skip else adam
    else:
        adam = optax.adamw(adam_lr, b1=adam_b1, b2=adam_b2, eps=adam_eps, weight_decay=weight_decay)
    return _numbered("celo2", optax.partition(
        {
            routing.LEARNED: _learned(
                scale_by_celo2(theta, orthogonalize=orthogonalize, cpu_kernels=cpu_kernels, nonfinite=nonfinite,
                               ns_dtype=ns_dtype, state_dtype=state_dtype, rounding_seed=rounding_seed,
                               variant=variant),
                weight_decay, learning_rate, nonfinite),
            routing.ADAM: in_float32(adam),
        },
        labels,
    ))


def _learned(rule: optax.GradientTransformation, weight_decay: float, learning_rate: ScalarOrSchedule,
             nonfinite: str) -> optax.GradientTransformationExtraArgs:
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
    *,
    state_dtype: Any = jnp.float32,
    rounding_seed: int = 0,
    variant: RuleVariant | None = None,
) -> optax.GradientTransformationExtraArgs:
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
        state_dtype: ``jnp.float32`` (default), ``jnp.bfloat16`` or ``"int8"``, see :func:`scale_by_celo2`
            (tensors numbered in tree-flatten order of the parameters).
        rounding_seed: The stochastic rounding's seed (default 0), kept in the state.
        variant: The rule variant of a dict ``theta``, see :func:`scale_by_celo2`.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` (``update`` needs ``params``).

    Raises:
        ValueError: An unknown ``nonfinite`` or ``state_dtype``, or a bad ``rounding_seed``.
        celo2.rule.variant.VariantError: As in :func:`scale_by_celo2`.

    Zero gradients still give unit-RMS directions (published theta too), so a
    parameter with exactly zero gradients moves by about the learning rate per
    step. Zero-size tensors get zero-size updates; a float64 parameter
    (``jax_enable_x64``) is updated in float64.
    """
    rule = scale_by_celo2(theta, orthogonalize=False, cpu_kernels=cpu_kernels, nonfinite=nonfinite,
                          state_dtype=state_dtype, rounding_seed=rounding_seed, variant=variant)
    return _numbered("celo2_base", _learned(rule, weight_decay, learning_rate, nonfinite))


def _half(x: Any) -> bool:
    """Whether ``x`` is a floating-point array narrower than float32 (float16, bfloat16)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def in_float32(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` on float32 copies of the half-precision (float16, bfloat16)
    leaves: its state is made from, and its arithmetic done on, float32
    parameters and gradients, and its updates come back in each gradient's
    own dtype. Other leaves pass as they are.

    AdamW's second moment of a half-precision parameter would underflow in
    its dtype (a gradient of 1e-5 squares to zero in float16, and the bias
    correction then divides by it); the PyTorch front end keeps float32
    moments too.

    Args:
        inner: An elementwise transformation (the AdamW branch of :func:`celo2`).

    Returns:
        A transformation with ``inner``'s state type (extra ``update`` arguments are handed to ``inner``).
    """
    up = lambda x: x.astype(jnp.float32) if _half(x) else x  # noqa: E731
    inner = optax.with_extra_args_support(inner)

    def init_fn(params: Any) -> Any:
        return inner.init(jax.tree_util.tree_map(up, params))

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        wide_params = None if params is None else jax.tree_util.tree_map(up, params)
        out, state = inner.update(jax.tree_util.tree_map(up, updates), state, wide_params, **extra_args)
        out = jax.tree_util.tree_map(lambda u, g: u.astype(g.dtype) if _half(g) else u, out, updates)
        return out, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _refuse_float0(name: str, updates: Any) -> None:
    """Raise, naming the leaf, when a gradient is ``float0`` (an integer or boolean parameter's)."""
    for path, g in jax.tree_util.tree_leaves_with_path(updates):
        if getattr(g, "dtype", None) == jax.dtypes.float0:
            raise TypeError(
                f"{name}: the gradient of {_path_name(path)} is float0, the gradient JAX gives an integer or boolean "
                "parameter (jax.grad(..., allow_int=True)); celo2 updates floating-point parameters only. Leave "
                "that leaf out of the parameters given to the optimizer, or route it to optax.set_to_zero() with "
                "optax.partition.")


def _numbered(name: str, inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner``, refusing ``float0`` gradients at ``update`` before anything is computed, and numbering
    the gradients' leaves for the state's rounding counter (:data:`celo2.optax.rounding.TENSOR_INDICES`,
    unless an enclosing transformation numbered them already)."""
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        _refuse_float0(name, updates)
        extra_args.setdefault(TENSOR_INDICES, number_tensors(updates))
        return inner.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


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
