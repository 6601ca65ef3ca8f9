"""8-bit blockwise optimizer state in the PyTorch front end (issue 28, ``state_dtype="int8"``): the torch
quantiser against the NumPy reference bit for bit, the same codes from every backend over six steps, no stall
of the slowest momentum, checkpoints (conversions, errors), a NaN under ``nonfinite="propagate"``, and the
refusal of DTensor parameters. What is one idea for bfloat16 and 8-bit state (the bytes per parameter,
resume, a changed setting under a state, the settings per group, skipped steps) is tested once for both
formats in test_state_dtype.py."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from celo2.kernels import cpu as cpu_kernels
from celo2.rule import blockwise8 as B
from celo2.rule.state import STATE_KEYS
from celo2.torch import Celo2, Celo2Base, _blockwise8, _rounding
from celo2.torch._state import TorchTheta, init_tensor_state
from celo2.torch.backends.reference import reference_tensor_step, update_accumulators

import checkpoint_runs as runs

SHAPES = [(12, 20), (20, 12), (33,), (6, 5, 3, 3), (3, 4, 100)]
STEPS = 6
SEED = 1234


def _values(n: int, seed: int, key: str) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-8, 8, n))).astype(np.float32)
    x[: 2 * B.BLOCK_ELEMENTS: 97] = 0.0
    x[B.BLOCK_ELEMENTS + 5] = np.nan
    x[3 * B.BLOCK_ELEMENTS + 1] = -np.inf
    return np.abs(x) if B.is_second_moment(key) else x


@pytest.mark.parametrize("key", ["m", "v", "exp_avg", "fac_r"])
@pytest.mark.parametrize("chunk", [1 << 16, 512, 1])
def test_torch_quantiser_equals_the_numpy_reference_bit_for_bit(key, chunk):
    x = _values(3 * 7 * 61, 0, key).reshape(3, 7, 61)
    want_codes, want_scales = B.stochastic_quantise(x, seed=11, step=6, tensor=4, key=key)
    stream = _rounding.TensorRounding(11, torch.tensor(6), 4).keys([key])[key]
    codes = torch.empty(x.shape, dtype=_blockwise8.code_dtype(key))
    scales = torch.empty(B.scale_count(x.size))
    _blockwise8.quantise_into(codes, scales, torch.from_numpy(x), key, stream, chunk_elements=chunk)
    np.testing.assert_array_equal(codes.numpy(), want_codes)
    np.testing.assert_array_equal(scales.numpy().view(np.uint32), want_scales.view(np.uint32))
    np.testing.assert_array_equal(_blockwise8.dequantise(codes, scales, key).numpy(),
                                  B.dequantise(want_codes, want_scales, key))
    near_codes, near_scales = _blockwise8.encoded_nearest(torch.from_numpy(x), key)
    ref_codes, ref_scales = B.quantise(x, B.NEAREST_BITS, key)
    np.testing.assert_array_equal(near_codes.numpy(), ref_codes)
    np.testing.assert_array_equal(near_scales.numpy().view(np.uint32), ref_scales.view(np.uint32))


# -- every backend stores the same codes ------------------------------------------------------------
def tensors_and_gradients() -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(5)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def int8_states(backend: str) -> list[dict[str, np.ndarray]]:
    """Celo2Base with 8-bit state on ``backend``, six steps of fixed gradients: every code and scale."""
    import celo2

    params, grads = tensors_and_gradients()
    opt = Celo2Base(params, lr=1e-2, theta=celo2.Theta.init(seed=0), backend=backend, state_dtype="int8",
                    rounding_seed=SEED)
    for step in range(STEPS):
        for p, g in zip(params, grads[step]):
            p.grad = g
        opt.step()
    return [{k: opt.state[p][k].numpy().copy() for k in opt.state[p] if k not in ("nonfinite_steps",
                                                                                  "rounding_step")}
            for p in params]


def _expected_states() -> list[dict[str, np.ndarray]]:
    """The same six steps spelled out: the reference formula on the decoded float32 state, then the NumPy
    reference quantiser."""
    import celo2

    theta = TorchTheta.from_theta(celo2.Theta.init(seed=0))
    params, grads = tensors_and_gradients()
    stored = [{k: B.quantise(np.zeros(t.shape, np.float32), 0, k) for k, t in init_tensor_state(p).items()
               if k in STATE_KEYS} for p in params]
    for step in range(STEPS):
        for i, p in enumerate(params):
            st = {k: torch.from_numpy(B.dequantise(c, s, k)) for k, (c, s) in stored[i].items()}
            reference_tensor_step(theta, st, grads[step][i], p.detach(), False)
            stored[i] = {k: B.stochastic_quantise(st[k].numpy(), seed=SEED, step=step + 1, tensor=i, key=k)
                         for k in STATE_KEYS}
    out = []
    for st in stored:
        entry = {}
        for k, (c, s) in st.items():
            entry[k], entry[k + B.SCALE_SUFFIX] = c, s
        out.append(entry)
    return out


@pytest.mark.parametrize("backend", ["reference", "torch", "numba"])
def test_every_backend_stores_the_same_codes_over_six_steps(backend):
    """Bitwise for the reference backend (the formula the expectation spells out). The chunked PyTorch path
    and the Numba kernels reduce the factored statistics in another order, so their float32 accumulators may
    differ from the formula's in the last bit; the quantiser is the same bit-for-bit code for every backend
    (tested above), so such a difference moves a scale by an ulp and a code by at most one step: checked to
    that tolerance."""
    if backend == "numba" and not cpu_kernels.AVAILABLE:
        pytest.skip("Numba is not installed")
    got = int8_states(backend)
    for shape, g, w in zip(SHAPES, got, _expected_states()):
        assert set(g) == set(w)
        for k in w:
            if backend != "reference":
                assert g[k].dtype == w[k].dtype
                np.testing.assert_allclose(g[k].astype(np.float64), w[k].astype(np.float64), rtol=1e-6, atol=1.0,
                                           err_msg=f"{backend}: {k} of {shape}")
            else:
                np.testing.assert_array_equal(g[k], w[k], err_msg=f"{backend}: {k} of {shape}")


# -- no stall -----------------------------------------------------------------------------------------
def _constant_gradient_run(stored: bool, steps: int = 3000) -> torch.Tensor:
    """The rule's accumulator update under a constant gradient; with ``stored`` the accumulators are stored as
    8-bit codes after every step (stochastic rounding), else float32 state. Returns the decay-0.999 momentum
    (m[2])."""
    g = torch.Generator().manual_seed(0)
    grad = torch.rand((8, 16), generator=g) + 0.5
    shapes = {k: tuple(t.shape) for k, t in init_tensor_state(grad).items() if k in STATE_KEYS}
    state = _blockwise8.init_state(shapes, grad.device) if stored else init_tensor_state(grad)
    for step in range(1, steps + 1):
        work = _blockwise8.decoded(state, STATE_KEYS) if stored else state
        update_accumulators(work, grad)
        if stored:
            _blockwise8.encode_(state, work, _rounding.TensorRounding(0, torch.tensor(step), 0), STATE_KEYS)
    return (_blockwise8.decoded(state, STATE_KEYS) if stored else state)["m"][2]


def test_int8_momentum_does_not_stall():
    """Constant gradient, 3,000 steps: the mean beta-0.999 momentum of 8-bit state is within 2% of float32
    state's. (Rounding to the nearest code does not stall here either: each block's scale is re-derived from
    its largest value at every write, so a block whose elements grow together keeps pace.)"""
    want = _constant_gradient_run(False).mean()
    got = _constant_gradient_run(True).mean()
    assert abs(got / want - 1) < 0.02, (float(got), float(want))


# -- checkpoints ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["float32", "bfloat16"])
@pytest.mark.parametrize("cls", [Celo2, Celo2Base], ids=lambda c: c.__name__)
def test_a_float_state_loads_into_int8_rounded_to_nearest_and_back_exactly(cls, source, random_theta):
    model = runs.model()
    opt = cls(model.named_parameters(), lr=1e-2, theta=random_theta, state_dtype=source)
    runs.train(model, opt, range(2))
    opt8 = cls(model.named_parameters(), lr=1e-2, theta=random_theta, state_dtype="int8")
    opt8.load_state_dict(runs.saved(opt))
    for p in model.parameters():
        for k, t in opt.state[p].items():
            if k in _blockwise8.CODE_DTYPES or not t.is_floating_point() or k == "step":
                continue
            codes, scales = B.quantise(t.float().numpy(), B.NEAREST_BITS, k)
            np.testing.assert_array_equal(opt8.state[p][k].numpy(), codes, err_msg=k)
            np.testing.assert_array_equal(opt8.state[p][_blockwise8.scale_key(k)].numpy(), scales, err_msg=k)
    runs.train(model, opt8, range(2, 3))  # the counter continues a bfloat16 state's, starts at a float32 state's
    assert all(int(opt8.state[p]["rounding_step"]) == (3 if source == "bfloat16" else 1) for p in model.parameters())

    back = cls(model.named_parameters(), lr=1e-2, theta=random_theta, state_dtype=source)
    back.load_state_dict(runs.saved(opt8))
    for p in model.parameters():
        assert not any(k.endswith(B.SCALE_SUFFIX) for k in back.state[p])
        for k in (*STATE_KEYS, "exp_avg", "exp_avg_sq"):
            if k in opt8.state[p]:
                want = _blockwise8.dequantise(opt8.state[p][k], opt8.state[p][_blockwise8.scale_key(k)], k)
                assert torch.equal(back.state[p][k], want.to(back.state[p][k].dtype)), k
    runs.train(model, back, range(3, 4))


def test_a_bad_saved_code_tensor_is_refused_by_name_with_nothing_loaded(random_theta):
    model = runs.model()
    opt = Celo2Base(model.named_parameters(), lr=1e-2, theta=random_theta, state_dtype="int8")
    runs.train(model, opt, range(1))
    saved = runs.saved(opt)
    saved["state"][2]["v"] = saved["state"][2]["v"].to(torch.int8)
    before = runs.snapshot(model, opt)
    with pytest.raises(ValueError, match=r"state 'v' of 2\.weight is torch\.int8 \(4, 50\), expected torch\.uint8"):
        opt.load_state_dict(saved)
    assert runs.bitwise_equal(runs.snapshot(model, opt), before)
    del saved["state"][2]["v_scale"]
    with pytest.raises(ValueError, match=r"the state of 2\.weight has .*8-bit blockwise state keeps"):
        opt.load_state_dict(saved)


def test_a_saved_adamw_step_that_is_not_floating_point_is_refused_by_name_with_nothing_loaded(random_theta):
    """Beside the codes and scales, 8-bit state keeps AdamW's step count as a floating-point tensor: a saved
    one of another dtype is refused naming the tensor and the key."""
    model = runs.model()
    opt = Celo2(model.named_parameters(), lr=1e-2, theta=random_theta, state_dtype="int8")
    runs.train(model, opt, range(1))
    saved = runs.saved(opt)
    assert saved["state"][1]["step"].is_floating_point()  # 0.bias: the AdamW branch
    saved["state"][1]["step"] = saved["state"][1]["step"].to(torch.int64)
    before = runs.snapshot(model, opt)
    with pytest.raises(ValueError, match=r"state 'step' of 0\.bias is Tensor, expected a floating-point tensor; "
                                         r"nothing was changed"):
        opt.load_state_dict(saved)
    assert runs.bitwise_equal(runs.snapshot(model, opt), before)


# -- DTensor parameters ---------------------------------------------------------------------------------
@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone (world size 1), torn down after the test: enough to build
    DTensors on a one-device CPU mesh."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with the gloo backend")
    if dist.is_initialized():
        pytest.skip("a default process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("cls", [Celo2, Celo2Base], ids=lambda c: c.__name__)
def test_int8_state_for_a_dtensor_parameter_is_refused_by_name_before_any_state(cls, one_process_group):
    """8-bit state steps plain tensors only: a DTensor parameter in a group with ``state_dtype="int8"`` is
    refused when the group joins (in the constructor or ``add_param_group``), naming the parameter and its
    placements, with nothing added; bfloat16 state takes the same parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    shard = nn.Parameter(distribute_tensor(torch.ones(6, 4), mesh, [Shard(0)]))
    message = (r"is a DTensor \(\(Shard\(dim=0\),\)\), and state_dtype='int8' \(8-bit blockwise state\) steps "
               r"plain tensors only; use float32 or bfloat16 state for sharded parameters")
    for state_dtype in ("int8", torch.int8):
        with pytest.raises(ValueError, match=f"{cls.__name__}: model.shard " + message):
            cls([("model.shard", shard)], state_dtype=state_dtype)
    plain = runs.model()
    opt = cls(plain.parameters(), state_dtype="int8")
    with pytest.raises(ValueError, match=f"{cls.__name__}: group1\\.param0 " + message):
        opt.add_param_group({"params": [shard], "state_dtype": "int8"})
    assert len(opt.param_groups) == 1 and not opt.state
    cls([("model.shard", shard)], state_dtype="bfloat16")


# -- non-finite gradients -------------------------------------------------------------------------------
def test_a_nan_under_propagate_stays_nan_in_the_state(random_theta):
    model = runs.model()
    opt = Celo2Base(model.named_parameters(), lr=1e-2, theta=random_theta, state_dtype="int8", nonfinite="propagate")
    runs.train(model, opt, range(1))
    x, y = runs.data(1)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    st = opt.state[model[0].weight]
    assert torch.isnan(st["m_scale"]).any()
    assert torch.isnan(_blockwise8.dequantise(st["m"], st["m_scale"], "m")).any()
