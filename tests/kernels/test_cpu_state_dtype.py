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
from celo2.rule import layout, rounding
from celo2.rule.state import STATE_KEYS, state_shapes

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")

SEED, STEP, TENSOR = 1234, 7, 3
KEYS = tuple(rounding.stream_key(SEED, STEP, TENSOR, rounding.SLOTS[k]) for k in STATE_KEYS)

# (3, 5)-like shapes are rows-first, (5, 3)-like columns-first; 40 and 70 rows make 3 and 5 row blocks.
MATRICES = [(40, 37), (37, 40), (70, 9), (1, 33), (2, cpu_kernels.COLUMN_CHUNK + 77)]
VECTORS = [(1,), (333,), (cpu_kernels.COLUMN_CHUNK + 5,)]
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


def _check_one_step(kind, shape, random_theta, mode, nan_at=None):  # noqa: ANN001, ANN202
    net = layout.pack_theta(random_theta)
    grad, param, state = _case(shape)
    if nan_at is not None:
        grad.reshape(-1)[nan_at] = np.nan
    if kind == "vector":
        state = {k: state[k] for k in ("m", "v", "fac_r")}
    d32, p32, s32, sq32 = _step(kind, shape, net, grad, param, state, mode, None)
    patterns = {k: rounding.round_to_bfloat16(v, 0) for k, v in state.items()}
    d16, p16, s16, sq16 = _step(kind, shape, net, grad, param, patterns, mode, KEYS)
    for key in s32:
        want = rounding.stochastic_round(s32[key], seed=SEED, step=STEP, tensor=TENSOR, slot=key)
        np.testing.assert_array_equal(s16[key], want, err_msg=key)
    np.testing.assert_array_equal(_bits(p16), _bits(p32))
    if nan_at is not None:
        assert np.isnan(rounding.bfloat16_to_float32(s16["v"]).reshape(-1)[nan_at])
    if d32 is not None:
        np.testing.assert_array_equal(_bits(d16), _bits(d32))
    np.testing.assert_array_equal(sq16, sq32)  # NaN where the gradient has one


@pytest.mark.parametrize("mode", ["write", "apply", "over_grad"])
@pytest.mark.parametrize("shape", MATRICES, ids=lambda s: "x".join(map(str, s)))
def test_matrix_step_stores_the_rounded_float32_step(random_theta, shape, mode):
    code = {"write": cpu_kernels.WRITE, "apply": cpu_kernels.APPLY, "over_grad": cpu_kernels.OVER_GRAD}[mode]
    if shape[1] > cpu_kernels.COLUMN_CHUNK and mode == "over_grad":
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


@pytest.mark.parametrize("kind,shape", [("matrix", (40, 37)), ("vector", (333,)), ("conv", (8, 4, 3, 3))])
def test_a_nan_gradient_stores_nan_state_as_the_reference_rounds_it(random_theta, kind, shape):
    """NaN stays NaN (quiet, never an infinity) in the stored bfloat16, element for element as the reference."""
    _check_one_step(kind, shape, random_theta, cpu_kernels.WRITE, nan_at=5)


# --- through the PyTorch backend ------------------------------------------------------------------------------

SHAPES = [(24, 40), (40, 24), (50,), (8, 4, 3, 3), (3, 70, 1, 1)]


def _backend_case(seed=0):  # noqa: ANN001, ANN202
    from celo2.torch.rule import init_tensor_state

    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) * 0.5 for s in SHAPES]
    grads = [[torch.randn(s, generator=gen) * 10.0 ** (t % 3 - 1) for s in SHAPES] for t in range(6)]
    states = [{k: v.to(torch.bfloat16) for k, v in init_tensor_state(p).items()} for p in params]
    return params, grads, states


def _rounding(step: int, count: int = len(SHAPES)):  # noqa: ANN202
    """The rounding of the first ``count`` tensors (indices 10, 11, ...) at ``step``."""
    from celo2.torch.backends.base import StateRounding

    return StateRounding(seed=SEED, steps=[torch.tensor(step, dtype=torch.int64) for _ in range(count)],
                         tensors=[10 + j for j in range(count)])


def _round_like_the_reference(states32, step):  # noqa: ANN001, ANN202
    """bfloat16 states: each float32 accumulator rounded by celo2.rule.rounding."""
    out = []
    for j, st in enumerate(states32):
        out.append({k: torch.from_numpy(rounding.stochastic_round(v.numpy(), seed=SEED, step=step, tensor=10 + j,
                                                                  slot=k).view(np.int16)).view(torch.bfloat16)
                    for k, v in st.items()})
    return out


def _assert_bitwise(a, b, what):  # noqa: ANN001, ANN202
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.dtype == torch.bfloat16:
        a, b = a.view(torch.int16), b.view(torch.int16)
    else:
        a, b = a.view(torch.int32), b.view(torch.int32)
    assert torch.equal(a, b), what


@pytest.mark.parametrize("orthogonalize", [False, True], ids=["celo2_base", "celo2"])
def test_six_bfloat16_steps_are_the_float32_kernel_steps_rounded_by_the_reference(random_theta, orthogonalize):
    from celo2.torch._state import TorchTheta
    from celo2.torch.backends.base import Options
    from celo2.torch.backends.numba import BACKEND

    theta = TorchTheta.from_theta(random_theta)
    params, grads, states = _backend_case()
    ours = [p.clone() for p in params]
    theirs = [p.clone() for p in params]
    held = [{k: v.clone() for k, v in st.items()} for st in states]
    for t in range(6):
        assert all(BACKEND.takes(st, g, p) for st, g, p in zip(states, grads[t], ours))
        BACKEND.apply(theta, ours, grads[t], states, orthogonalize=orthogonalize, apply=(1e-2, 0.1), skip=False,
                      options=Options(), rounding=_rounding(t + 1))
        wide = [{k: v.to(torch.float32) for k, v in st.items()} for st in held]
        BACKEND.apply(theta, theirs, grads[t], wide, orthogonalize=orthogonalize, apply=(1e-2, 0.1), skip=False,
                      options=Options())
        held = _round_like_the_reference(wide, t + 1)
        for j in range(len(SHAPES)):
            _assert_bitwise(ours[j], theirs[j], f"step {t + 1}, param {SHAPES[j]}")
            for key in STATE_KEYS:
                _assert_bitwise(states[j][key], held[j][key], f"step {t + 1}, {key} of {SHAPES[j]}")


def test_directions_and_raw_with_bfloat16_state(random_theta):
    """directions() and raw() store the same rounded state and return the float32-state outputs."""
    from celo2.torch._state import TorchTheta
    from celo2.torch.backends.base import Options
    from celo2.torch.backends.numba import BACKEND

    theta = TorchTheta.from_theta(random_theta)
    params, grads, states = _backend_case(1)
    for method in ("directions", "raw"):
        ours = [{k: v.clone() for k, v in st.items()} for st in states]
        wide = [{k: v.to(torch.float32) for k, v in st.items()} for st in states]
        if method == "directions":
            got = BACKEND.directions(theta, params, grads[0], ours, orthogonalize=True, options=Options(),
                                     rounding=_rounding(1))
            want = BACKEND.directions(theta, params, grads[0], wide, orthogonalize=True, options=Options())
        else:
            got = [d for d, _ in BACKEND.raw(theta, params[:2], grads[0][:2], ours[:2], skip=False, options=Options(),
                                             rounding=_rounding(1, 2))]
            want = [d for d, _ in BACKEND.raw(theta, params[:2], grads[0][:2], wide[:2], skip=False,
                                              options=Options())]
            ours, wide = ours[:2], wide[:2]
        for a, b in zip(got, want):
            _assert_bitwise(a, b, method)
        for a, b in zip(ours, _round_like_the_reference(wide, 1)):
            for key in STATE_KEYS:
                _assert_bitwise(a[key], b[key], f"{method}: {key}")


def test_thread_counts_give_the_same_bits(random_theta):
    from celo2.torch._state import TorchTheta
    from celo2.torch.backends.base import Options
    from celo2.torch.backends.numba import BACKEND

    theta = TorchTheta.from_theta(random_theta)
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params, grads, states = _backend_case(2)
            for t in range(2):
                BACKEND.apply(theta, params, grads[t], states, orthogonalize=False, apply=(1e-2, 0.0), skip=False,
                              options=Options(), rounding=_rounding(t + 1))
            results.append((params, states))
    finally:
        torch.set_num_threads(before)
    (p1, s1), (p2, s2) = results
    for j in range(len(SHAPES)):
        _assert_bitwise(p1[j], p2[j], "param")
        for key in STATE_KEYS:
            _assert_bitwise(s1[j][key], s2[j][key], key)


def test_state_dtype_and_rounding_must_agree(random_theta):
    """A bfloat16 state without rounding=, or rounding= with float32 state, is refused before any tensor changes."""
    from celo2.torch._state import TorchTheta
    from celo2.torch.backends.base import Options
    from celo2.torch.backends.numba import BACKEND

    theta = TorchTheta.from_theta(random_theta)
    params, grads, states = _backend_case(3)
    wide = [{k: v.to(torch.float32) for k, v in st.items()} for st in states]
    mixed = wide[:2] + states[2:]  # the bfloat16 tensors come last: nothing may run before the refusal
    before = [p.clone() for p in params]
    kept = [{k: v.clone() for k, v in st.items()} for st in mixed]
    with pytest.raises(ValueError, match="tensor 2 has torch.bfloat16 state, but no rounding= was given"):
        BACKEND.apply(theta, params, grads[0], mixed, orthogonalize=False, apply=(1e-2, 0.0), skip=False,
                      options=Options())
    with pytest.raises(ValueError, match="tensor 0 has torch.float32 state, but rounding= was given"):
        BACKEND.apply(theta, params, grads[0], mixed, orthogonalize=False, apply=(1e-2, 0.0), skip=False,
                      options=Options(), rounding=_rounding(1))
    for p, q in zip(params, before):
        _assert_bitwise(p, q, "param")
    for st, k in zip(mixed, kept):
        for key in STATE_KEYS:
            _assert_bitwise(st[key], k[key], key)
    assert BACKEND.state_dtypes == (torch.float32, torch.bfloat16)
    half = dict(states[0], v=states[0]["v"].to(torch.float32))  # one state tensor of another dtype
    assert not BACKEND.takes(half, grads[0][0], params[0])
    assert not BACKEND.takes({k: v.to(torch.float16) for k, v in states[0].items()}, grads[0][0], params[0])


def test_operand_check_names_the_state_dtype():
    shape = (8, 5)
    ok = {k: np.zeros(s, np.uint16) for k, s in state_shapes(shape).items()}
    cpu_kernels.check_operands("matrix", shape, ok)
    with pytest.raises(ValueError, match="fac_c is float32 but the state before it is uint16"):
        cpu_kernels.check_operands("matrix", shape, dict(ok, fac_c=np.zeros(ok["fac_c"].shape, np.float32)))
    with pytest.raises(ValueError, match=r"v has shape \(8, 5\) and dtype int16, expected \(8, 5\) float32 or uint16"):
        cpu_kernels.check_operands("matrix", shape, dict(ok, v=np.zeros((8, 5), np.int16)))
    with pytest.raises(ValueError, match=r"grad has shape \(8, 5\) and dtype uint16, expected \(8, 5\) float32 for"):
        cpu_kernels.check_operands("matrix", shape, {"grad": np.zeros((8, 5), np.uint16)})


def test_rounding_keys_are_the_stream_keys_of_each_tensor():
    from celo2.torch.backends.base import StateRounding
    from celo2.torch.backends.numba import rounding_keys

    states = [{k: torch.zeros(2, dtype=torch.bfloat16) for k in STATE_KEYS} for _ in range(3)]
    steps = [1, 2**32 + 5, 77]
    got = rounding_keys(states, StateRounding(2**32 - 1, [torch.tensor(s) for s in steps], [0, 9, 2**31]))
    for row, step, tensor in zip(got, steps, [0, 9, 2**31]):
        assert row == tuple(rounding.stream_key(2**32 - 1, step, tensor, rounding.SLOTS[k]) for k in STATE_KEYS)
