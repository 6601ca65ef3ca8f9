"""The conv kernel's pass sequence (``celo2.kernels.cpu.conv_step``), written once for both front ends,
against the rule as the spec states it, in each of its modes."""

from __future__ import annotations

import numpy as np
import pytest

from celo2.kernels import cpu as cpu_kernels
from celo2.rule import layout, spec
from celo2.rule.state import state_shapes

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")

# Both orientations of the factored statistics (O > I, O < I, O == I), and 1x1 windows.
SHAPES = [(8, 4, 3, 3), (4, 8, 3, 3), (6, 6, 3, 3), (5, 7, 1, 1), (40, 3, 2, 2)]


def _reference(theta, shape, steps):  # noqa: ANN001, ANN202
    """Raw-to-finished directions and states of the JAX reference formula after each step."""
    import jax.numpy as jnp

    from celo2.optax import functional

    tree = functional.theta_to_jax(theta)
    state = functional.init_tensor_state(jnp.zeros(shape, jnp.float32))
    out = []
    for grad, param in steps:
        d, state = functional.reference_tensor_step(tree, state, jnp.asarray(grad), jnp.asarray(param), False)
        out.append((np.asarray(d), [np.asarray(x) for x in state]))
    return out


def _steps(shape, n=3):  # noqa: ANN001, ANN202
    rng = np.random.default_rng(sum(shape))
    param = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    return [((rng.standard_normal(shape) * 10.0 ** (t - 2)).astype(np.float32), param) for t in range(n)]


def _views(shape):  # noqa: ANN001, ANN202
    """Zero state, as the kernels view it: ``(3, O, I, G)``, ``(O, I, G)``, ``(3, L, G)``."""
    O, I, kh, kw = shape  # noqa: E741
    G = kh * kw
    s = {k: np.zeros(v, np.float32) for k, v in state_shapes(shape).items()}
    return s, (s["m"].reshape(3, O, I, G), s["v"].reshape(O, I, G), s["fac_r"].reshape(3, -1, G),
               s["fac_c"].reshape(3, -1, G))


def _window_rms(d):  # noqa: ANN001, ANN202
    return d / np.sqrt(np.mean(np.square(d), axis=(-2, -1), keepdims=True) + spec.OUTPUT_NORM_EPS)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_conv_step_writes_the_reference_direction(random_theta, shape):
    assert cpu_kernels.kernel_kind(shape) == "conv"
    O, I, kh, kw = shape  # noqa: E741
    net = layout.pack_theta(random_theta)
    steps = _steps(shape)
    state, (m, v, fac_r, fac_c) = _views(shape)
    for mode in ("write", "over_grad"):
        if mode == "over_grad":
            state, (m, v, fac_r, fac_c) = _views(shape)
        for (grad, param), (expected, expected_state) in zip(steps, _reference(random_theta, shape, steps)):
            g = grad.copy().reshape(O, I, kh * kw)
            out = np.empty_like(g)
            code = cpu_kernels.WRITE if mode == "write" else cpu_kernels.OVER_GRAD
            cpu_kernels.conv_step(g, param.reshape(O, I, kh * kw), m, v, fac_r, fac_c, cpu_kernels.rows_first(shape),
                                  net, code, 1.0, 0.0, out)
            raw = (out if mode == "write" else g).reshape(shape)
            np.testing.assert_allclose(_window_rms(raw), expected, rtol=1e-4, atol=5e-5)
            for key, want in zip(("m", "v", "fac_r", "fac_c"), expected_state):
                np.testing.assert_allclose(state[key], want, rtol=1e-5, atol=1e-7, err_msg=key)


@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
def test_conv_step_applies_the_window_normalised_direction(random_theta, shape):
    """Mode APPLY: ``p <- decay p - lr d / rms(d)`` per window, the direction never held."""
    O, I, kh, kw = shape  # noqa: E741
    net = layout.pack_theta(random_theta)
    (grad, param), = _steps(shape, 1)
    (expected, _), = _reference(random_theta, shape, [(grad, param)])
    _, views = _views(shape)
    p = param.copy().reshape(O, I, kh * kw)
    lr, wd = 1e-2, 0.1
    cpu_kernels.conv_step(grad.copy().reshape(O, I, kh * kw), p, *views, cpu_kernels.rows_first(shape), net,
                          cpu_kernels.APPLY, 1.0 - lr * wd, lr, np.empty((1, 1, 1), np.float32))
    np.testing.assert_allclose(p.reshape(shape), (1.0 - lr * wd) * param - lr * expected, rtol=1e-5, atol=1e-6)


def test_rows_first_follows_the_factoring():
    """The row statistic runs along the first axis when it averages over the second."""
    assert cpu_kernels.rows_first((3, 5)) and not cpu_kernels.rows_first((5, 3))
    assert cpu_kernels.rows_first((4, 8, 3, 3)) and not cpu_kernels.rows_first((8, 4, 3, 3))
    assert cpu_kernels.rows_first((6, 6))  # a tie: d0 is the later axis
    with pytest.raises(ValueError, match="no factored statistics"):
        cpu_kernels.rows_first((7,))
