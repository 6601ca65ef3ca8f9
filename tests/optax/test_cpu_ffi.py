"""The JAX CPU fast path (an XLA custom call into the Numba kernels) computes
what XLA's own formulation computes, in place of it only where it should."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from celo2.optax import celo2, celo2_base, cpu_ffi
from celo2.optax import functional as rule
from celo2.optax.functional import theta_to_jax

pytestmark = pytest.mark.skipif(not cpu_ffi.AVAILABLE, reason="numba is not installed: no CPU kernels for JAX")

# Vectors and scalars, matrices (size-1 sides included: which side is the row statistic is decided
# by the axes, not by the sizes) and conv kernels factored over (O, I).
CASES = [((), False), ((37,), False), ((1,), True), ((24, 7), False), ((7, 24), True), ((1, 7), False), ((7, 1), True), ((48, 300), False),
         ((6, 5, 3, 3), False), ((5, 6, 3, 3), True), ((16, 8, 1, 1), False)]


def _ids(case):
    return "x".join(map(str, case)) if isinstance(case, tuple) else str(case)


@functools.partial(jax.jit, static_argnums=5)
def _both(theta, s_kernels, s_xla, grad, param, orthogonalize):
    got, s_kernels = rule.tensor_step(theta, s_kernels, grad, param, orthogonalize, cpu_kernels=True)
    expected, s_xla = rule.tensor_step(theta, s_xla, grad, param, orthogonalize, cpu_kernels=False)
    return got, expected, s_kernels, s_xla


@pytest.mark.parametrize("shape,orthogonalize", CASES, ids=_ids)
def test_kernels_match_the_xla_formulation(random_theta, shape, orthogonalize):
    assert cpu_ffi.kind(shape, jnp.float32) in ("vector", "matrix", "conv")
    theta = theta_to_jax(random_theta)
    rng = np.random.default_rng(sum(shape))
    param = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.5)
    s_kernels = s_xla = rule.init_tensor_state(param)
    for t in range(3):
        grad = rng.standard_normal(shape).astype(np.float32) * 10.0 ** (t - 2)
        grad = np.asarray(grad, np.float32)
        if t == 1:
            grad.reshape(-1)[0] = 5000.0  # clipped to 1000 by both
        got, expected, s_kernels, s_xla = _both(theta, s_kernels, s_xla, jnp.asarray(grad), param, orthogonalize)
        # Float32 sums in another order: relative error ~3e-5 on a clipped outlier's direction.
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=5e-5)
        for a, b in zip(s_kernels, s_xla):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        param = param - 0.01 * expected


def test_only_float32_vectors_matrices_and_conv_kernels_take_the_custom_call():
    f32 = jnp.float32
    assert cpu_ffi.kind((), f32, f32) == "vector"
    assert cpu_ffi.kind((7,), f32, f32) == "vector"
    assert cpu_ffi.kind((3, 4), f32, f32) == "matrix"
    assert cpu_ffi.kind((8, 4, 3, 3), f32, f32) == "conv"
    assert cpu_ffi.kind((3, 4), jnp.bfloat16, f32) is None
    assert cpu_ffi.kind((7,), f32, jnp.float16) is None
    assert cpu_ffi.kind((2, 3, 4), f32) is None
    assert cpu_ffi.kind((3, 3, 8, 4), f32) is None  # factored over the trailing axes: XLA
    assert cpu_ffi.kind((1, 4, 3, 3), f32) is None


def _model():
    rng = np.random.default_rng(0)
    shapes = {"w1": (32, 16), "w2": (16, 4), "b": (16,), "conv": (8, 4, 3, 3), "scale": ()}
    params = {k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.3) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.1) for k, s in shapes.items()}
             for _ in range(4)]
    return params, grads


@pytest.mark.parametrize("make", [celo2_base, celo2], ids=["celo2_base", "celo2"])
def test_transform_gives_the_same_training_with_and_without_kernels(random_theta, make):
    """Four donated steps of a small model through the optax transform: the
    kernels update the state in place and end where XLA's formulation ends."""
    params0, grads = _model()
    finals = {}
    for on in (True, False):
        opt = make(1e-2, weight_decay=0.1, theta=random_theta, cpu_kernels=on)
        step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)),
                       donate_argnums=(0, 1))
        p = jax.tree_util.tree_map(jnp.copy, params0)
        s = opt.init(p)
        for g in grads:
            p, s = step(p, s, g)
        finals[on] = (p, s)
    for a, b in zip(jax.tree_util.tree_leaves(finals[True]), jax.tree_util.tree_leaves(finals[False])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("shape", [(32, 16, 3, 3), (64, 48)], ids=_ids)
def test_a_donated_state_is_updated_in_place(shape):
    """No copy of the state in or out of the custom call: the compiled step's
    scratch (the raw direction, factors and rank-1 terms) stays below the
    size of the momenta ``m`` (3 tensors), which a copy would take. Reshaped
    conv operands once made XLA copy ``m`` and ``v`` around every call."""
    params = {"w": jnp.ones(shape, jnp.float32)}
    grads = {"w": jnp.full(shape, 0.01, jnp.float32)}
    opt = celo2_base(1e-2, cpu_kernels=True)
    state = opt.init(params)
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)),
                   donate_argnums=(0, 1))
    compiled = step.lower(params, state, grads).compile()
    assert cpu_ffi.CONV_TARGET in compiled.as_text() or cpu_ffi.TARGET in compiled.as_text()
    momenta_bytes = 3 * int(np.prod(shape)) * 4
    assert compiled.memory_analysis().temp_size_in_bytes < momenta_bytes


def _train_step_scratch(opt, shape) -> int:
    """Scratch of a compiled training step on one tensor whose gradient comes
    out of backpropagation inside the step (through a matrix product, a
    convolution, or as a bias)."""
    rng = np.random.default_rng(0)
    if len(shape) == 2:
        data = (rng.standard_normal((8, shape[0])), rng.standard_normal((8, shape[1])))
        loss = lambda w, a, b: jnp.sum((a @ w) * b)  # noqa: E731
    elif len(shape) == 4:
        data = (rng.standard_normal((2, shape[1], 12, 12)), rng.standard_normal((2, shape[0], 12, 12)))
        loss = lambda w, a, b: jnp.sum(jax.lax.conv(a, w, (1, 1), "SAME") * b)  # noqa: E731
    else:  # a bias: its gradient sums the batch
        data = (rng.standard_normal((8,) + shape), rng.standard_normal((8,) + shape))
        loss = lambda w, a, b: jnp.sum(jnp.tanh(a + w) * b)  # noqa: E731
    data = tuple(jnp.asarray(x, jnp.float32) for x in data)
    params = {"w": jnp.ones(shape, jnp.float32)}

    def train_step(params, state, data):  # noqa: ANN001, ANN202
        grads = jax.grad(lambda p: loss(p["w"], *data))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1))
    return step.lower(params, opt.init(params), data).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("shape", [(256, 256), (64, 32, 3, 3), (16384,)], ids=_ids)
def test_in_a_training_step_the_direction_takes_the_gradients_buffer(shape):
    """The custom calls write the raw direction over the gradient (an
    intermediate of the step), so Celo2-base needs at most a quarter of the
    tensor's size of scratch beyond what plain SGD needs; a direction in a
    buffer of its own would take the whole tensor."""
    extra = _train_step_scratch(celo2_base(1e-2, cpu_kernels=True), shape) - _train_step_scratch(optax.sgd(1e-2), shape)
    assert extra <= 0.25 * int(np.prod(shape)) * 4, extra


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_the_callers_gradients_are_left_intact(random_theta, jit):
    """Gradients the caller still holds (eager calls, or jitted ones without
    donation) are copied before a custom call writes over them."""
    params, grads = _model()
    opt = celo2(1e-2, theta=random_theta, param_labels=lambda p: {k: "celo2" for k in p}, cpu_kernels=True)
    update = jax.jit(opt.update) if jit else opt.update
    before = {k: np.array(v) for k, v in grads[0].items()}
    updates, _ = update(grads[0], opt.init(params), params)
    for k, v in grads[0].items():
        np.testing.assert_array_equal(np.asarray(v), before[k], err_msg=k)
        assert not np.array_equal(np.asarray(updates[k]), before[k]), k


def _lowered(platform: str, cpu_kernels: bool) -> str:
    theta = theta_to_jax(None)
    param = jnp.ones((8, 6), jnp.float32)
    conv = jnp.ones((8, 6, 3, 3), jnp.float32)
    bias = jnp.ones((6,), jnp.float32)
    states = [rule.init_tensor_state(x) for x in (param, conv, bias)]

    def f(states, param, conv, bias):
        return (rule.tensor_step(theta, states[0], param, param, False, cpu_kernels),
                rule.tensor_step(theta, states[1], conv, conv, True, cpu_kernels),
                rule.tensor_step(theta, states[2], bias, bias, False, cpu_kernels))

    return jax.jit(f).trace(states, param, conv, bias).lower(lowering_platforms=(platform,)).as_text()


def test_custom_calls_are_compiled_for_cpu_only():
    on_cpu = _lowered("cpu", True)
    targets = (cpu_ffi.TARGET, cpu_ffi.CONV_TARGET, cpu_ffi.VECTOR_TARGET)
    assert all(t in on_cpu for t in targets)
    for text in (_lowered("cpu", False), _lowered("cuda", True)):
        assert not any(t in text for t in targets)


def test_default_uses_kernels_for_a_fixed_theta_and_xla_for_a_traced_one(random_theta):
    params = {"w": jnp.ones((6, 4)) * 0.1}
    grads = {"w": jnp.cos(jnp.arange(24.0)).reshape(6, 4)}

    def hlo(theta):
        opt = celo2_base(1e-2, theta=theta)
        return jax.jit(lambda p, g: opt.update(g, opt.init(p), p)).lower(params, grads).as_text()

    assert cpu_ffi.TARGET in hlo(random_theta)
    traced = jax.jit(lambda th: jax.jit(lambda p, g: celo2_base(1e-2, theta=th).update(
        g, celo2_base(1e-2, theta=th).init(p), p)[0])(params, grads))
    # A traced theta (meta-gradients, PES) keeps XLA's formulation, which is differentiable.
    assert cpu_ffi.TARGET not in traced.lower(theta_to_jax(random_theta)).as_text()


def test_kernels_under_vmap_match_one_by_one(random_theta):
    theta = theta_to_jax(random_theta)
    params = jnp.stack([jnp.full((5, 4), 0.1 * (k + 1)) for k in range(3)])
    grads = jnp.stack([jnp.sin(jnp.arange(20.0) * (k + 1)).reshape(5, 4) for k in range(3)])
    states = jax.vmap(rule.init_tensor_state)(params)

    def step(s, g, p):
        return rule.tensor_step(theta, s, g, p, False, cpu_kernels=True)[0]

    batched = jax.jit(jax.vmap(step))(states, grads, params)
    for k in range(3):
        one = jax.jit(step)(rule.init_tensor_state(params[k]), grads[k], params[k])
        np.testing.assert_allclose(np.asarray(batched[k]), np.asarray(one), rtol=0, atol=1e-6)


def test_asking_for_kernels_without_numba_names_the_problem(monkeypatch):
    monkeypatch.setattr(cpu_ffi, "AVAILABLE", False)
    with pytest.raises(ValueError, match="cpu_kernels=True needs Numba"):
        celo2_base(1e-3, cpu_kernels=True)
    celo2_base(1e-3)  # the default falls back to XLA


def test_a_state_of_the_wrong_shape_is_refused_before_any_kernel_runs(random_theta):
    theta = theta_to_jax(random_theta)
    param = jnp.ones((6, 4), jnp.float32)
    wrong = rule.init_tensor_state(jnp.ones((4, 6), jnp.float32))
    with pytest.raises(ValueError, match=r"m has shape \(3, 4, 6\).*expected \(3, 6, 4\)"):
        rule.tensor_step(theta, wrong, param, param, False, cpu_kernels=True)
