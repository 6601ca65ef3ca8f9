"""bfloat16 optimizer state in the PyTorch front end (issue 28): the torch rounding against the NumPy
reference bit for bit, no stall of the slowest momentum, the same bits from every backend, checkpoints
(conversions, errors) and the backends' checks. The tests that are one idea for every low-precision state
format (bfloat16 and 8-bit, ``state_dtype="int8"``) are here too, parametrised over it: the bytes of state
per parameter, resume, a changed setting under a state, the settings per group, skipped steps. The 8-bit
format's own tests are in test_state_int8.py."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from celo2.eval.models import GPT
from celo2.kernels import cpu as cpu_kernels
from celo2.rule import rounding as R
from celo2.rule.state import STATE_KEYS
from celo2.torch import Celo2, Celo2Base, _blockwise8, _rounding
from celo2.torch import functional as F
from celo2.torch._state import TorchTheta, init_tensor_state
from celo2.torch.backends.base import StateRounding
from celo2.torch.backends.reference import reference_tensor_step, update_accumulators
from celo2.torch.backends import triton as triton_backend

import checkpoint_runs as runs

ROOT = Path(__file__).resolve().parents[2]
BF16 = torch.bfloat16


def bits(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor's bit patterns as uint16."""
    return t.detach().contiguous().view(torch.int16).numpy().view(np.uint16)


def stored_dtype(state_format: str, key: str) -> torch.dtype:
    """The dtype accumulator ``key`` is stored in under ``state_format`` ("bfloat16" or "int8": its codes')."""
    return BF16 if state_format == "bfloat16" else _blockwise8.code_dtype(key)


# -- the hash and the rounding, against celo2.rule.rounding ---------------------------------------
def test_torch_hash_gives_the_pinned_answers():
    assert _rounding.mix32(torch.arange(4)).tolist() == [0, 2261973619, 229111015, 3983417082]
    assert _rounding.stream_keys(0, torch.tensor(1), 0, [1]).tolist() == [2196780706]
    assert _rounding.stream_keys(7, torch.tensor(3), 2, [4]).tolist() == [1714008317]
    key = _rounding.stream_keys(0, torch.tensor(1), 0, [1])[0]
    assert _rounding.random_bits(key, torch.arange(6)).tolist() == [33593, 61936, 20718, 62055, 56476, 5043]
    sample = torch.arange(1 << 16, dtype=torch.int64) * 40503
    np.testing.assert_array_equal(_rounding.mix32(sample).numpy(), R.mix32(sample.numpy()).astype(np.int64))


def test_keys_take_the_step_modulo_2_32_and_every_slot_at_once():
    step = torch.tensor(2**32 + 5, dtype=torch.int64)
    slots = list(R.SLOTS.values())
    got = _rounding.stream_keys(2**32 - 1, step, 9, slots).tolist()
    assert got == [R.stream_key(2**32 - 1, 5, 9, s) for s in slots]
    assert _rounding.stream_keys(1, step, 2, [4, 1]).tolist() == [R.stream_key(1, 5, 2, s) for s in (4, 1)]


def _awkward_values(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-30, 30, n))).astype(np.float32)
    special = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0xFF800001, 0x7F800000, 0xFF800000,
                        0x00000001, 0x80000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x3F80FFFF], dtype=np.uint32)
    x[: len(special)] = special.view(np.float32)
    return x


def test_store_equals_the_numpy_reference_bit_for_bit():
    x = _awkward_values(3 * 37 * 53, 0).reshape(3, 37, 53)
    want = R.stochastic_round(x, seed=11, step=6, tensor=4, slot="m")
    key = _rounding.TensorRounding(11, torch.tensor(6), 4).keys(["m"])["m"]
    for chunk in (1 << 20, 500, 7):  # whole, row blocks, blocks inside one row
        out = torch.empty(x.shape, dtype=BF16)
        _rounding.store(out, torch.from_numpy(x), key, chunk_elements=chunk)
        np.testing.assert_array_equal(bits(out), want, err_msg=f"chunk {chunk}")


def test_a_block_uses_its_elements_indices_in_the_whole_accumulator():
    x = _awkward_values(3 * 20 * 9, 1).reshape(3, 20, 9)
    want = R.stochastic_round(x, seed=3, step=2, tensor=1, slot="fac_r")
    key = _rounding.TensorRounding(3, torch.tensor(2), 1).keys(["fac_r"])["fac_r"]
    whole = torch.zeros(x.shape, dtype=BF16)
    block = whole[:, 7:15]  # a shard along axis 1: not contiguous in the whole tensor
    _rounding.store(block, torch.from_numpy(x[:, 7:15]), key, whole=x.shape, starts=(0, 7, 0), chunk_elements=10)
    np.testing.assert_array_equal(bits(whole[:, 7:15]), want[:, 7:15])
    assert not bits(whole[:, :7]).any() and not bits(whole[:, 15:]).any()


# -- no stall -----------------------------------------------------------------------------------
def _constant_gradient_run(store, steps: int = 3000) -> torch.Tensor:
    """The rule's accumulator update (the reference formula's) under a constant gradient, the accumulators
    stored by ``store(state, work, step)`` after every step (``None``: float32 state); returns the momentum
    of decay 0.999 (m[2]) as float32."""
    g = torch.Generator().manual_seed(0)
    grad = torch.rand((8, 16), generator=g) + 0.5
    state = init_tensor_state(grad, BF16 if store else torch.float32)
    for step in range(1, steps + 1):
        work = _rounding.working_copy(state, STATE_KEYS) if store else state
        update_accumulators(work, grad)
        if store:
            store(state, work, step)
    return state["m"][2].to(torch.float32)


def test_bfloat16_momentum_does_not_stall_where_round_to_nearest_does():
    """Constant gradient, 3,000 steps: the mean beta-0.999 momentum of stochastically rounded bfloat16
    state is within 2% of float32 state's; rounded to nearest it stalls far below (outside 2%)."""
    def stochastic(state, work, step):
        _rounding.store_state(state, work, _rounding.TensorRounding(0, torch.tensor(step), 0), STATE_KEYS)

    def nearest(state, work, step):
        for k in STATE_KEYS:
            state[k].copy_(work[k].to(BF16))

    want = _constant_gradient_run(None).mean()
    sr = _constant_gradient_run(stochastic).mean()
    rtn = _constant_gradient_run(nearest).mean()
    assert abs(sr / want - 1) < 0.02, (float(sr), float(want))
    assert abs(rtn / want - 1) > 0.02, (float(rtn), float(want))


# -- every backend stores the same bits ----------------------------------------------------------
SHAPES = [(12, 20), (20, 12), (33,), (6, 5, 3, 3), (3, 4, 10)]
STEPS = 6
SEED = 1234


def _tensors() -> tuple[list[nn.Parameter], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(5)
    params = [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
    grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(STEPS)]
    return params, grads


def bfloat16_states(backend: str, device: str = "cpu") -> list[dict[str, np.ndarray]]:
    """Celo2Base with bfloat16 state on ``backend``, six steps of fixed gradients (the state depends on
    them only): every accumulator's bits."""
    import celo2

    params, grads = _tensors()
    params = [nn.Parameter(p.detach().to(device)) for p in params]
    opt = Celo2Base(params, lr=1e-2, theta=celo2.Theta.init(seed=0), backend=backend, state_dtype="bfloat16",
                    rounding_seed=SEED)
    for step in range(STEPS):
        for p, g in zip(params, grads[step]):
            p.grad = g.to(device)
        opt.step()
    return [{k: bits(opt.state[p][k].cpu()) for k in STATE_KEYS} for p in params]


def _expected_states() -> list[dict[str, np.ndarray]]:
    """The same six steps spelled out: the reference formula on float32 copies, then the NumPy reference
    rounding."""
    import celo2

    theta = TorchTheta.from_theta(celo2.Theta.init(seed=0))
    params, grads = _tensors()
    states = [init_tensor_state(p, torch.float32) for p in params]
    for step in range(STEPS):
        for i, (p, st) in enumerate(zip(params, states)):
            reference_tensor_step(theta, st, grads[step][i], p.detach(), False)
            for k in STATE_KEYS:
                stored = R.stochastic_round(st[k].numpy(), seed=SEED, step=step + 1, tensor=i, slot=k)
                st[k] = torch.from_numpy(R.bfloat16_to_float32(stored))
    return [{k: bits(st[k].to(BF16)) for k in STATE_KEYS} for st in states]


TRITON_CHILD = r'''
import os, sys, torch
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]  # this module's folder, and tests/ for its helpers
import test_state_dtype as T
torch.save(T.bfloat16_states("triton", "cuda" if torch.cuda.is_available() else "cpu"), sys.argv[2])
'''

@pytest.mark.parametrize("backend", ["reference", "torch", "numba", "triton"])
def test_every_backend_stores_the_same_bits_over_six_steps(backend, tmp_path):
    if backend == "numba" and not cpu_kernels.AVAILABLE:
        pytest.skip("Numba is not installed")
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            pytest.skip("Triton is not installed")
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_INTERPRET="1")
        out = tmp_path / "states.pt"
        res = subprocess.run([sys.executable, "-c", TRITON_CHILD, str(Path(__file__).parent), str(out)],
                             capture_output=True, text=True, timeout=600, env=env)
        assert res.returncode == 0, res.stderr[-4000:]
        got = torch.load(out, weights_only=False)
    else:
        got = bfloat16_states(backend)
    for shape, g, w in zip(SHAPES, got, _expected_states()):
        for k in STATE_KEYS:
            np.testing.assert_array_equal(g[k], w[k], err_msg=f"{backend}: {k} of {shape}")


@pytest.mark.parametrize("shape", [(12, 20), (33,), (3, 4, 10), (2, 3, 5, 4)])
def test_one_tensor_steps_store_the_same_bits_in_small_chunks(shape, random_theta):
    """functional.tensor_step with tiny chunks (leading slices, and slices recursed into) stores the
    reference backend's bits; its direction is float32 state's."""
    theta = TorchTheta.from_theta(random_theta)
    g = torch.Generator().manual_seed(7)
    param = torch.randn(shape, generator=g)
    states = {b: init_tensor_state(param, BF16) for b in ("reference", "torch")}
    for step in range(1, 4):
        grad = torch.randn(shape, generator=g)
        before = {k: v.float() for k, v in states["reference"].items()}  # what both read, as float32
        rounding = StateRounding(3, [torch.tensor(step)], [2])
        dirs = {b: F.tensor_step(theta, st, grad, param, True, chunk_elements=16, backend=b, rounding=rounding)
                for b, st in states.items()}
        for k in STATE_KEYS:
            np.testing.assert_array_equal(bits(states["torch"][k]), bits(states["reference"][k]), err_msg=k)
    want = F.tensor_step(theta, before, grad, param, True, backend="reference")
    torch.testing.assert_close(dirs["reference"], want, rtol=0, atol=0)
    torch.testing.assert_close(dirs["torch"], want, rtol=0, atol=2e-5)


# -- bytes of state per parameter -----------------------------------------------------------------
def _bench_gpt(device: str = "cpu") -> GPT:
    torch.manual_seed(0)
    with torch.device(device):
        return GPT(256, 64, 64, 2, 4)  # the bench's GPT (celo2.eval.tasks SUITES["full"]["gpt"])


@pytest.mark.parametrize("fmt,bound,fraction", [("bfloat16", 8.5, 1 / 2), ("int8", 4.25, 1 / 4)],
                         ids=["bfloat16", "int8"])
@pytest.mark.parametrize("cls", [Celo2, Celo2Base], ids=lambda c: c.__name__)
def test_state_costs_its_formats_bytes_per_parameter(cls, fmt, bound, fraction):
    """After a step on the bench's GPT, every accumulator is stored in the format, the state's bytes are what
    state_bytes() counts (with a step, and without one on meta tensors), at most ``bound`` per parameter and
    about ``fraction`` of float32 state's (the counters aside)."""
    model = _bench_gpt()
    n = sum(p.numel() for p in model.parameters())
    opt = cls(model.named_parameters(), state_dtype=fmt)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    counted = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values())
    assert all(t.dtype == stored_dtype(fmt, k) for st in opt.state.values() for k, t in st.items() if k in R.SLOTS)
    assert counted == sum(opt.state_bytes().values())
    assert counted / n <= bound, counted / n
    # Counted without a step (meta tensors: the state a first step creates): the same.
    per = {d: sum(cls(_bench_gpt("meta").named_parameters(), state_dtype=d).state_bytes().values()) / n
           for d in ("float32", fmt)}
    assert per[fmt] == counted / n and per["float32"] > 13.5, per
    assert counted <= per["float32"] * n * fraction * 1.05 + 1e4, per


def test_step_memory_prints_the_state_table(tmp_path):
    out = tmp_path / "state.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_memory.py"), "--state", "--out", str(out)],
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {(r["model"], r["optimizer"], r["state_dtype"]): r for r in json.loads(out.read_text())}
    assert rows[("GPT-2 124M", "AdamW", "float32")]["parameters"] == 124_439_808
    for model in ("bench GPT", "GPT-2 124M"):
        assert abs(rows[(model, "AdamW", "float32")]["bytes_per_parameter"] - 8.0) < 0.01
        for cls in ("Celo2", "Celo2Base"):
            assert rows[(model, cls, "bfloat16")]["bytes_per_parameter"] <= 8.5
            half, whole = rows[(model, cls, "bfloat16")]["state_bytes"], rows[(model, cls, "float32")]["state_bytes"]
            assert 2 * half <= whole + 1e5  # the counters aside, half the bytes


# -- checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize("given,kept", [(torch.bfloat16, torch.bfloat16), ("int8", "int8")],
                         ids=["bfloat16", "int8"])
@pytest.mark.parametrize("cls", [Celo2, Celo2Base], ids=lambda c: c.__name__)
def test_resume_from_a_checkpoint_is_bitwise_an_uninterrupted_run(cls, given, kept, random_theta):
    """Three steps, a checkpoint, three more in a new optimizer: bitwise the six-step run; the seed and the
    format come from the checkpoint, and a deep copy steps on bitwise like the original."""
    kw = dict(lr=1e-2, theta=random_theta, state_dtype=given, rounding_seed=99)
    whole = runs.model()
    opt = cls(whole.named_parameters(), **kw)
    runs.train(whole, opt, range(6))

    first = runs.model()
    opt1 = cls(first.named_parameters(), **kw)
    runs.train(first, opt1, range(3))
    saved, weights = runs.saved(opt1), copy.deepcopy(first.state_dict())
    second = runs.model()
    second.load_state_dict(weights)
    opt2 = cls(second.named_parameters(), **dict(kw, rounding_seed=0))  # the seed comes from the checkpoint
    opt2.load_state_dict(saved)
    assert opt2.param_groups[0]["rounding_seed"] == 99 and opt2.param_groups[0]["state_dtype"] == kept
    runs.train(second, opt2, range(3, 6))
    assert runs.bitwise_equal(runs.snapshot(second, opt2), runs.snapshot(whole, opt))
    assert all(int(opt.state[p]["rounding_step"]) == 6 for p in whole.parameters())
    clone = copy.deepcopy((whole, opt))
    runs.train(*clone, range(6, 8))
    runs.train(whole, opt, range(6, 8))
    assert runs.bitwise_equal(runs.snapshot(*clone), runs.snapshot(whole, opt))


def test_the_seed_changes_the_bits_and_copies_step_alike(random_theta):
    states = {}
    for seed in (0, 1):
        model = runs.model()
        opt = Celo2Base(model.parameters(), lr=1e-2, theta=random_theta, state_dtype="bfloat16", rounding_seed=seed)
        runs.train(model, opt, range(2))
        states[seed] = (model, opt)
    (m0, o0), (m1, o1) = states[0], states[1]
    assert not torch.equal(o0.state[m0[0].weight]["m"], o1.state[m1[0].weight]["m"])
    clones = [copy.deepcopy((m0, o0)), pickle.loads(pickle.dumps((m0, o0)))]
    for clone in clones:
        runs.train(*clone, range(2, 4))
    runs.train(m0, o0, range(2, 4))
    for clone in clones:
        assert runs.bitwise_equal(runs.snapshot(*clone), runs.snapshot(m0, o0))


@pytest.mark.parametrize("cls", [Celo2, Celo2Base], ids=lambda c: c.__name__)
def test_float32_state_loads_into_bfloat16_rounded_to_nearest_and_back_exactly(cls, random_theta):
    model = runs.model()
    opt32 = cls(model.named_parameters(), lr=1e-2, theta=random_theta)
    runs.train(model, opt32, range(2))
    saved32 = runs.saved(opt32)
    opt16 = cls(model.named_parameters(), lr=1e-2, theta=random_theta, state_dtype="bfloat16")
    opt16.load_state_dict(saved32)
    assert opt16.param_groups[0]["state_dtype"] == BF16
    for p in model.parameters():
        for k, t in opt32.state[p].items():
            if t.is_floating_point() and k != "step":
                assert opt16.state[p][k].dtype == BF16
                assert torch.equal(opt16.state[p][k], t.to(BF16)), k
        assert "rounding_step" not in opt16.state[p]
    runs.train(model, opt16, range(2, 3))  # the counter starts where the state was converted
    assert all(int(opt16.state[p]["rounding_step"]) == 1 for p in model.parameters())

    saved16 = runs.saved(opt16)
    back = cls(model.named_parameters(), lr=1e-2, theta=random_theta)
    back.load_state_dict(saved16)
    for p in model.parameters():
        for k, t in opt16.state[p].items():
            if t.dtype == BF16:
                assert back.state[p][k].dtype == torch.float32 and torch.equal(back.state[p][k], t.float()), k
        assert "rounding_step" not in back.state[p]
    runs.train(model, back, range(3, 4))


def test_a_value_beyond_bfloat16_is_refused_naming_tensor_and_key_with_nothing_loaded(random_theta):
    model = runs.model()
    opt32 = Celo2Base(model.named_parameters(), lr=1e-2, theta=random_theta)
    runs.train(model, opt32, range(1))
    saved = runs.saved(opt32)
    saved["state"][2]["v"][0, 0] = 3.3999e38  # finite in float32, beyond bfloat16's largest finite value
    opt16 = Celo2Base(model.named_parameters(), lr=1e-2, theta=random_theta, state_dtype="bfloat16")
    runs.train(model, opt16, range(1))
    before = runs.snapshot(model, opt16)
    with pytest.raises(ValueError, match=r"state 'v' of 2\.weight holds 3\.3999e\+38, beyond the range of "
                                         r"torch\.bfloat16.*nothing was loaded"):
        opt16.load_state_dict(saved)
    assert runs.bitwise_equal(runs.snapshot(model, opt16), before)


def test_a_state_saved_before_the_settings_existed_keeps_this_optimizers_seed(random_theta):
    model = runs.model()
    opt = Celo2Base(model.parameters(), lr=1e-2, theta=random_theta)
    runs.train(model, opt, range(1))
    saved = runs.saved(opt)
    for g in saved["param_groups"]:
        del g["state_dtype"], g["rounding_seed"]
    other = Celo2Base(model.parameters(), lr=1e-2, theta=random_theta, state_dtype="bfloat16", rounding_seed=5)
    other.load_state_dict(saved)
    assert other.param_groups[0]["rounding_seed"] == 5 and other.param_groups[0]["state_dtype"] == BF16


@pytest.mark.parametrize("built,changed,message", [
    ("float32", torch.bfloat16,
     r"state 'm' of 0\.weight is torch\.float32, but its param group's state_dtype is torch\.bfloat16"),
    ("int8", torch.float32,
     r"the state of 0\.weight is 8-bit blockwise, but its param group's state_dtype is torch\.float32"),
    ("float32", "int8", r"the state of 0\.weight is floating-point, but its param group's state_dtype is int8 "),
], ids=["float32-to-bfloat16", "int8-to-float32", "float32-to-int8"])
def test_changing_a_groups_state_dtype_under_its_state_is_refused_before_any_write(built, changed, message,
                                                                                   random_theta):
    model = runs.model()
    opt = Celo2(model.named_parameters(), lr=1e-2, theta=random_theta, state_dtype=built)
    runs.train(model, opt, range(1))
    before = runs.snapshot(model, opt)
    opt.param_groups[0]["state_dtype"] = changed
    with pytest.raises(RuntimeError, match=message):
        runs.train(model, opt, range(1, 2))
    assert runs.bitwise_equal(runs.snapshot(model, opt), before)


# -- settings, backends, non-finite gradients -------------------------------------------------------
@pytest.mark.parametrize("fmt,given,kept", [("bfloat16", "bfloat16", BF16), ("int8", torch.int8, "int8")],
                         ids=["bfloat16", "int8"])
@pytest.mark.parametrize("cls", [Celo2, Celo2Base], ids=lambda c: c.__name__)
def test_settings_are_checked_and_kept_per_group(cls, fmt, given, kept):
    model = runs.model()
    for bad, match in [(dict(state_dtype="float16"), "state_dtype must be one of float32, bfloat16, int8; got 'float16'"),
                       (dict(state_dtype="int4"), "state_dtype must be one of float32, bfloat16, int8; got 'int4'"),
                       (dict(state_dtype=torch.float64), "got torch.float64"),
                       (dict(rounding_seed=2**32), r"invalid rounding_seed=4294967296"),
                       (dict(rounding_seed=-1), r"invalid rounding_seed=-1"),
                       (dict(rounding_seed=1.5), r"invalid rounding_seed=1\.5"),
                       (dict(rounding_seed=True), r"invalid rounding_seed=True")]:
        with pytest.raises(ValueError, match=match):
            cls(model.parameters(), **bad)
    opt = cls([{"params": list(model[0].parameters())},
               {"params": list(model[2].parameters()), "state_dtype": given, "rounding_seed": 3}])
    assert opt.param_groups[0]["state_dtype"] == torch.float32 and opt.param_groups[1]["state_dtype"] == kept
    assert opt.state_dict()["param_groups"][1]["rounding_seed"] == 3
    with pytest.raises(ValueError, match="param group 2: state_dtype must be one of"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3, 3))], "state_dtype": "int4"})
    assert len(opt.param_groups) == 2
    runs.train(model, opt, range(1))
    assert opt.state[model[0].weight]["m"].dtype == torch.float32
    for p in model[2].parameters():  # the rule's weight and the bias's branch (AdamW's moments in Celo2)
        stored = [k for k in opt.state[p] if k in R.SLOTS]
        assert stored and all(opt.state[p][k].dtype == stored_dtype(fmt, k) for k in stored), stored
    assert all(k in opt.state[model[2].weight] for k in STATE_KEYS)
    if cls is Celo2:
        assert opt.state[model[2].bias]["exp_avg"].dtype == stored_dtype(fmt, "exp_avg")


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_a_named_backend_without_bfloat16_state_is_refused_by_name(backend, monkeypatch):
    from celo2.torch.backends import numba as numba_backend

    if (backend == "numba" and not cpu_kernels.AVAILABLE) or (backend == "triton" and not triton_backend.available()):
        pytest.skip(f"{backend} is not installed")
    named = {"numba": numba_backend.BACKEND, "triton": triton_backend.BACKEND}[backend]
    assert BF16 in named.state_dtypes  # every shipped backend stores it: check the refusal on one that does not
    monkeypatch.setattr(type(named), "state_dtypes", (torch.float32,))
    with pytest.raises(ValueError, match=f"backend='{backend}' does not support state_dtype=bfloat16"):
        Celo2(runs.model().parameters(), state_dtype="bfloat16", backend=backend)


def test_auto_picks_a_backend_that_stores_the_state_dtype():
    p, g = torch.zeros(8, 8), torch.zeros(8, 8)
    for dtype in (torch.float32, BF16):
        for backend in ("auto", "torch", "reference"):
            assert dtype in F.pick(backend, init_tensor_state(p, dtype), g, p).state_dtypes, (dtype, backend)
    if cpu_kernels.AVAILABLE and F.USE_CPU_KERNELS:
        assert F.resolve("auto", init_tensor_state(p), g, p) == "numba"


def test_functional_step_refuses_rounding_that_does_not_fit_the_state(random_theta):
    theta = TorchTheta.from_theta(random_theta)
    p, g = torch.zeros(4, 4), torch.ones(4, 4)
    state = init_tensor_state(p, BF16)
    before = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError, match="bfloat16 accumulators need rounding="):
        F.celo2([p], [g], [state], theta=theta, lr=0.1, weight_decay=0.0, orthogonalize=False,
                nonfinite="propagate")
    assert all(torch.equal(state[k], before[k]) for k in state) and not p.any()
    rounding = StateRounding(0, [torch.ones((), dtype=torch.int64)], [0])
    with pytest.raises(ValueError, match="float32 ones take none"):
        F.celo2([p], [g], [init_tensor_state(p)], theta=theta, lr=0.1, weight_decay=0.0, orthogonalize=False,
                nonfinite="propagate", rounding=rounding)
    F.celo2([p], [g], [state], theta=theta, lr=0.1, weight_decay=0.0, orthogonalize=False,
            nonfinite="propagate", rounding=rounding)
    assert state["m"].dtype == BF16 and state["m"].any() and p.any()


@pytest.mark.parametrize("fmt", ["bfloat16", "int8"])
@pytest.mark.parametrize("cls", [Celo2, Celo2Base], ids=lambda c: c.__name__)
def test_a_skipped_step_leaves_the_state_bitwise_unchanged(cls, fmt, random_theta):
    """A non-finite gradient skips its tensors: weights and stored accumulators stay bitwise, the counters
    count the step; the other tensors step."""
    model = runs.model()
    opt = cls(model.named_parameters(), lr=1e-2, theta=random_theta, state_dtype=fmt)
    runs.train(model, opt, range(2))
    x, y = runs.data(2)
    opt.zero_grad()
    ((model(x) - y) ** 2).mean().backward()
    for p in (model[0].weight, model[0].bias):
        p.grad[0] = float("nan")
    counters = ("nonfinite_steps", "rounding_step")
    keep = {p: [p.detach().clone()] + [t.clone() for k, t in sorted(opt.state[p].items()) if k not in counters]
            for p in (model[0].weight, model[0].bias)}
    moved = model[2].weight.detach().clone()
    opt.step()
    for p, old in keep.items():
        now = [p.detach()] + [t for k, t in sorted(opt.state[p].items()) if k not in counters]
        assert runs.bitwise_equal(now, old)
        assert int(opt.state[p]["nonfinite_steps"]) == 1 and int(opt.state[p]["rounding_step"]) == 3
    assert not torch.equal(model[2].weight.detach(), moved)
