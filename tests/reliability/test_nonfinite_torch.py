"""The non-finite gradient policy of the PyTorch optimizers (``nonfinite``).

Both variants, on the CPU kernels (host check) and on the PyTorch path
(``USE_CPU_KERNELS`` off: the device-side gate accelerators run), for NaN and
+-inf in a matrix, a vector (AdamW in Celo2) and a conv kernel: the bad
tensor and its state stay bitwise, the others equal a run without the bad
tensor, the counter counts, and clean steps after it stay finite.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from celo2.torch import Celo2, Celo2Base, functional, rule

SHAPES = {"matrix": (12, 8), "vector": (8,), "conv": (6, 4, 3, 3), "nd": (3, 5, 4)}
CLASSES = {"Celo2": Celo2, "Celo2Base": Celo2Base}


def _grads(step: int, dtypes: dict | None = None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return {n: torch.randn(s, generator=gen).to((dtypes or {}).get(n, torch.float32)) for n, s in SHAPES.items()}


def _setup(cls, nonfinite="skip", dtypes=None):
    gen = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(s, generator=gen).to((dtypes or {}).get(n, torch.float32)))
              for n, s in SHAPES.items()}
    opt = cls(list(params.items()), lr=1e-2, weight_decay=0.1, nonfinite=nonfinite)
    return params, opt


def _step(params, opt, grads, drop=()):
    for n, p in params.items():
        p.grad = None if n in drop else grads[n].clone()
    opt.step()


def _snapshot(params, opt, name):
    state = {k: v.clone() for k, v in opt.state[params[name]].items() if k != "nonfinite_steps"}
    return params[name].detach().clone(), state


@pytest.fixture(params=["kernels", "torch-path"])
def path(request, monkeypatch):
    if request.param == "kernels" and not functional.USE_CPU_KERNELS:
        pytest.skip("the CPU kernels are off here (numba missing or CELO2_CPU_KERNELS=0)")
    monkeypatch.setattr(functional, "USE_CPU_KERNELS", request.param == "kernels")
    return request.param


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("bad", ["matrix", "vector", "conv"])
@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_a_bad_gradient_skips_its_tensor_only(cls_name, bad, value, path):
    cls = CLASSES[cls_name]
    runs = []
    for poison in (True, False):
        params, opt = _setup(cls)
        for step in range(2):
            _step(params, opt, _grads(step))
        before = _snapshot(params, opt, bad)
        grads = _grads(2)
        if poison:
            grads[bad].view(-1)[5] = value
            _step(params, opt, grads)
        else:
            _step(params, opt, grads, drop=(bad,))  # the reference: the bad tensor not stepped at all
        runs.append((params, opt, before))
    (params, opt, before), (ref_params, ref_opt, _) = runs
    p_now, state_now = _snapshot(params, opt, bad)
    assert torch.equal(p_now, before[0]), "the parameter moved"
    assert state_now.keys() == before[1].keys()
    for key in state_now:
        assert torch.equal(state_now[key], before[1][key]), f"state {key} changed"
    for n in SHAPES:
        if n == bad:
            continue
        assert torch.equal(params[n], ref_params[n]), f"{n} differs from the run without {bad}"
        for key, v in opt.state[params[n]].items():
            assert torch.equal(v, ref_opt.state[ref_params[n]][key]), f"state {key} of {n} differs"
    counts = opt.nonfinite_steps()
    assert counts == {n: int(n == bad) for n in SHAPES}, counts
    assert opt.state[params[bad]]["nonfinite_steps"].shape == ()
    for step in range(3, 5):
        _step(params, opt, _grads(step))
    for n, p in params.items():
        assert torch.isfinite(p).all(), n
        for key, v in opt.state[p].items():
            assert torch.isfinite(v).all(), (n, key)


@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_low_and_double_precision_tensors_follow_the_policy(cls_name, path):
    dtypes = {"matrix": torch.bfloat16, "vector": torch.float64, "conv": torch.float64}
    params, opt = _setup(CLASSES[cls_name], dtypes=dtypes)
    _step(params, opt, _grads(0, dtypes))
    before = {n: _snapshot(params, opt, n) for n in dtypes}
    grads = _grads(1, dtypes)
    for n in dtypes:
        grads[n].view(-1)[0] = float("nan")
    _step(params, opt, grads)
    for n in dtypes:
        p_now, state_now = _snapshot(params, opt, n)
        assert torch.equal(p_now, before[n][0]), n
        assert all(torch.equal(state_now[k], before[n][1][k]) for k in state_now), n
    assert opt.nonfinite_steps() == {"matrix": 1, "vector": 1, "conv": 1, "nd": 0}


@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_propagate_is_the_unguarded_step(cls_name, path):
    """Clean gradients: skip and propagate give the same bits. A NaN under
    propagate flows as before the guard existed: the rule's tensors go NaN
    whole, AdamW loses the element, and nothing is counted."""
    cls = CLASSES[cls_name]
    (p_skip, o_skip), (p_prop, o_prop) = _setup(cls), _setup(cls, "propagate")
    for step in range(3):
        _step(p_skip, o_skip, _grads(step))
        _step(p_prop, o_prop, _grads(step))
    for n in SHAPES:
        assert torch.equal(p_skip[n], p_prop[n]), n
    grads = _grads(3)
    for n in ("matrix", "vector"):
        grads[n].view(-1)[2] = float("nan")
    _step(p_prop, o_prop, grads)
    assert torch.isnan(p_prop["matrix"]).all()
    vector_nans = int(torch.isnan(p_prop["vector"]).sum())
    assert vector_nans == (1 if cls is Celo2 else SHAPES["vector"][0])
    assert torch.isfinite(p_prop["conv"]).all()
    assert set(o_prop.nonfinite_steps().values()) == {0}


def _no_host_sync_mode():
    """The mode of tests/torch/test_fast_path.py that fails on any tensor -> Python conversion."""
    path = Path(__file__).resolve().parents[1] / "torch" / "test_fast_path.py"
    spec = importlib.util.spec_from_file_location("_celo2_test_fast_path", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._NoHostSync


@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_the_device_side_gate_never_reads_a_value_on_the_host(cls_name, monkeypatch):
    """The gate's decisions stay on the device. The one read allowed is
    PyTorch's own of AdamW's step count, a CPU tensor by design off
    accelerators (on them the gate keeps it on the device: capturable)."""
    monkeypatch.setattr(functional, "USE_CPU_KERNELS", False)
    params, opt = _setup(CLASSES[cls_name])
    base = _no_host_sync_mode()

    class NoHostSyncButAdamSteps(base):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            steps = [s["step"] for s in opt.state.values() if "step" in s]
            if func is torch.Tensor.item and any(args[0] is t for t in steps):
                return func(*args, **(kwargs or {}))
            return super().__torch_function__(func, types, args, kwargs)

    for step in range(3):
        grads = _grads(step)
        grads["matrix"].view(-1)[step] = float("nan")
        grads["vector"].view(-1)[step] = float("inf")
        with NoHostSyncButAdamSteps():
            _step(params, opt, grads)
    assert opt.nonfinite_steps() == {"matrix": 3, "vector": 3, "conv": 0, "nd": 0}


def test_an_unknown_policy_is_refused():
    p = torch.nn.Parameter(torch.zeros(3))
    for cls in CLASSES.values():
        with pytest.raises(ValueError, match="nonfinite"):
            cls([p], nonfinite="ignore")
    with pytest.raises(ValueError, match="nonfinite"):
        Celo2([{"params": [p], "nonfinite": "zero"}])
