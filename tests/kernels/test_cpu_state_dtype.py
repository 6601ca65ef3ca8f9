"""Bfloat16 state in the CPU kernels: float32 arithmetic, every store rounded as celo2.rule.rounding says.

One step with bfloat16 state (``uint16`` bit patterns) must store exactly
:func:`celo2.rule.rounding.stochastic_round` of the float32 state the same
kernels compute from the same values with float32 state, and give the same
direction, bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from celo2.kernels import cpu as cpu_kernels
from celo2.kernels.cpu import _passes
from celo2.rule import layout, rounding
from celo2.rule.state import STATE_KEYS, state_shapes

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")

SEED, STEP, TENSOR = 1234, 7, 3
KEYS = tuple(rounding.stream_key(SEED, STEP, TENSOR, rounding.SLOTS[k]) for k in STATE_KEYS)

# (3, 5)-like shapes are rows-first, (5, 3)-like columns-first; 40 and 70 rows make 3 and 5 row blocks.
MATRICES = [(40, 37), (37, 40), (70, 9), (1, 33), (2, _passes.COLUMN_CHUNK + 77)]
VECTORS = [(1,), (333,), (_passes.COLUMN_CHUNK + 5,)]
CONVS = [(8, 4, 3, 3), (4, 8, 3, 3), (40, 3, 2, 2), (5, 7, 1, 1)]


def _representable(x: np.ndarray) -> np.ndarray:
    """``x`` truncated to bfloat16 values (float32)."""
    return rounding.bfloat16_to_float32(rounding.round_to_bfloat16(x, 0))


def _case(shape, seed=0):  # noqa: ANN001, ANN202
    """A gradient, a parameter and a non-zero state (bfloat16-representable float32), as the kernels view them."""
    rng = np.random.default_rng(seed + sum(shape))
    state = {}
    for key, s in state_shapes(shape).items():
        x = rng.standard_normal(s).astype(np.float32)
        state[key] = _representable(x * np.float32(0.1) if key == "m" else np.abs(x) * np.float32(1e-3))
    grad = rng.standard_normal(shape).astype(np.float32)
    param = (rng.standard_normal(shape) * 0.5).astype(np.float32)
    return grad, param, state


def _views(kind, shape, grad, param, state):  # noqa: ANN001, ANN202
    """The kernel's positional operands (before ``net``), viewing the given arrays."""
    if kind == "vector":
        n = grad.size
        return (grad.reshape(n), param.reshape(n), state["m"].reshape(3, n), state["v"].reshape(n),
                state["fac_r"].reshape(3, n))
    if kind == "matrix":
        return (grad, param, state["m"], state["v"], state["fac_r"], state["fac_c"], cpu_kernels.rows_first(shape))
    O, I, kh, kw = shape  # noqa: E741
    G = kh * kw
    return (grad.reshape(O, I, G), param.reshape(O, I, G), state["m"].reshape(3, O, I, G), state["v"].reshape(O, I, G),
            state["fac_r"].reshape(3, -1, G), state["fac_c"].reshape(3, -1, G), cpu_kernels.rows_first(shape))


STEPS = {"vector": "vector_step", "matrix": "matrix_step", "conv": "conv_step"}


def _step(kind, shape, net, grad, param, state, mode, keys):  # noqa: ANN001, ANN202
    """One kernel step on copies; returns (direction or None, param, state)."""
    grad, param = grad.copy(), param.copy()
    state = {k: v.copy() for k, v in state.items()}
    out_shape = (1, grad.size) if kind == "vector" else grad.shape
    if kind == "conv":
        out_shape = (shape[0], shape[1], shape[2] * shape[3])
    out = np.full(out_shape, np.nan, np.float32)
    decay, lr = (0.99, 0.01) if mode == cpu_kernels.APPLY else (1.0, 0.0)
    args = (*_views(kind, shape, grad, param, state), net, mode, decay, lr,
            out if mode == cpu_kernels.WRITE else np.empty((1,) * len(out_shape), np.float32))
    step = getattr(cpu_kernels, STEPS[kind])
    full = args + (cpu_kernels.NO_KEYS if keys is None else keys,)
    cpu_kernels.ensure_compiled(step, full)
    sq = step(*full)
    direction = {cpu_kernels.WRITE: out, cpu_kernels.OVER_GRAD: grad}.get(mode)
    return direction, param, state, sq


def _bits(x):  # noqa: ANN001, ANN202
    return np.asarray(x, np.float32).view(np.uint32)


def _check_one_step(kind, shape, random_theta, mode):  # noqa: ANN001, ANN202
    net = layout.pack_theta(random_theta)
    grad, param, state = _case(shape)
    if kind == "vector":
        state = {k: state[k] for k in ("m", "v", "fac_r")}
    d32, p32, s32, sq32 = _step(kind, shape, net, grad, param, state, mode, None)
    patterns = {k: rounding.round_to_bfloat16(v, 0) for k, v in state.items()}
    d16, p16, s16, sq16 = _step(kind, shape, net, grad, param, patterns, mode, KEYS)
    for key in s32:
        want = rounding.stochastic_round(s32[key], seed=SEED, step=STEP, tensor=TENSOR, slot=key)
        np.testing.assert_array_equal(s16[key], want, err_msg=key)
    np.testing.assert_array_equal(_bits(p16), _bits(p32))
    if d32 is not None:
        np.testing.assert_array_equal(_bits(d16), _bits(d32))
    assert sq16 == sq32


MODES = {"write": 0, "apply": 1, "over_grad": 2}


@pytest.mark.parametrize("mode", ["write", "apply", "over_grad"])
@pytest.mark.parametrize("shape", MATRICES, ids=lambda s: "x".join(map(str, s)))
def test_matrix_step_stores_the_rounded_float32_step(random_theta, shape, mode):
    code = {"write": cpu_kernels.WRITE, "apply": cpu_kernels.APPLY, "over_grad": cpu_kernels.OVER_GRAD}[mode]
    if shape[1] > _passes.COLUMN_CHUNK and mode == "over_grad":
        pytest.skip("the wide matrix runs in two modes")
    _check_one_step("matrix", shape, random_theta, code)


@pytest.mark.parametrize("mode", ["write", "apply"])
@pytest.mark.parametrize("shape", VECTORS, ids=lambda s: "x".join(map(str, s)))
def test_vector_step_stores_the_rounded_float32_step(random_theta, shape, mode):
    code = {"write": cpu_kernels.WRITE, "apply": cpu_kernels.APPLY}[mode]
    _check_one_step("vector", shape, random_theta, code)


@pytest.mark.parametrize("mode", ["write", "apply", "over_grad"])
@pytest.mark.parametrize("shape", CONVS, ids=lambda s: "x".join(map(str, s)))
def test_conv_step_stores_the_rounded_float32_step(random_theta, shape, mode):
    code = {"write": cpu_kernels.WRITE, "apply": cpu_kernels.APPLY, "over_grad": cpu_kernels.OVER_GRAD}[mode]
    _check_one_step("conv", shape, random_theta, code)
