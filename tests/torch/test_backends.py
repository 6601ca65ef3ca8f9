"""backend= and ns_dtype= of the PyTorch optimizers: every backend steps a model to the same numbers,
Newton-Schulz batched across tensors equals one tensor at a time, the options are validated, and the
deprecated CELO2_CPU_KERNELS variable still works with a warning."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from celo2.kernels import cpu as cpu_kernels
from celo2.torch import Celo2, Celo2Base, functional, rule
from celo2.torch.backends import triton as triton_backend

SHAPES = [(24, 16), (16, 24), (24, 16), (16,), (), (6, 4, 3, 3), (3, 5, 4)]
BACKENDS = ["torch", "reference"] + (["numba"] if cpu_kernels.AVAILABLE else [])


def _params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g) * 0.5) for s in SHAPES]


def _run(cls, backend: str, random_theta, steps: int = 3, **kw) -> list[torch.Tensor]:  # noqa: ANN001
    params = _params()
    opt = cls([{"params": params, **({"branch": "celo2"} if cls is Celo2 else {})}], lr=1e-2, weight_decay=0.1,
              theta=random_theta, backend=backend, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("cls", [Celo2, Celo2Base], ids=lambda c: c.__name__)
def test_backends_agree(cls, random_theta):
    """float32 Newton-Schulz: every backend (and the batched Newton-Schulz of the shared-shape
    matrices) gives the reference formula's parameters."""
    expected = _run(cls, "reference", random_theta, ns_dtype=torch.float32) if cls is Celo2 else \
        _run(cls, "reference", random_theta)
    for backend in BACKENDS:
        kw = {"ns_dtype": torch.float32} if cls is Celo2 else {}
        for got, want in zip(_run(cls, backend, random_theta, **kw), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5, msg=backend)


def test_batched_newton_schulz_in_the_step_equals_one_tensor_at_a_time(random_theta):
    """functional.celo2 over the list equals tensor_step on each tensor (float32 Newton-Schulz)."""
    theta = rule.TorchTheta.from_theta(random_theta)
    params, ref = _params(), _params()
    states = [rule.init_tensor_state(p) for p in params]
    ref_states = [rule.init_tensor_state(p) for p in ref]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]
    with torch.no_grad():
        functional.celo2(params, grads, states, theta=theta, lr=1e-2, weight_decay=0.0, orthogonalize=True,
                         ns_dtype=torch.float32, nonfinite="propagate")
        for p, g, s in zip(ref, grads, ref_states):
            p.sub_(1e-2 * rule.tensor_step(theta, s, g, p, True))
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bfloat16_newton_schulz_is_close_to_float32(random_theta):
    f32 = _run(Celo2, "auto", random_theta, ns_dtype=torch.float32)
    bf16 = _run(Celo2, "auto", random_theta, ns_dtype="bfloat16")
    start = _params()
    for a, b, s in zip(f32, bf16, start):
        moved = (a - s).norm()
        assert (a - b).norm() <= 0.05 * moved + 1e-7, (a - b).norm() / moved


def test_options_are_validated():
    p = [nn.Parameter(torch.zeros(3, 3))]
    with pytest.raises(ValueError, match="invalid backend='cuda'"):
        Celo2(p, backend="cuda")
    with pytest.raises(ValueError, match="ns_dtype='float16'"):
        Celo2(p, ns_dtype="float16")
    with pytest.raises(ValueError, match="invalid backend"):
        Celo2Base([{"params": p, "backend": "fast"}])
    if not triton_backend.available():
        with pytest.raises(ValueError, match=r"backend='triton' needs Triton \(pip install 'celo2\[cuda\]'\)"):
            Celo2(p, backend="triton")


def test_backend_and_ns_dtype_stay_this_machines_when_a_state_loads(random_theta):
    params = _params()
    a = Celo2(params, theta=random_theta, backend="torch", ns_dtype="bfloat16")
    for p in params:
        p.grad = torch.ones_like(p)
    a.step()
    b = Celo2(params, theta=random_theta)
    b.load_state_dict(a.state_dict())
    assert all(g["backend"] == "auto" and g["ns_dtype"] == "auto" for g in b.param_groups)


def test_resolve_picks_the_documented_backend():
    p = torch.zeros(8, 4)
    s = rule.init_tensor_state(p)
    g = torch.zeros(8, 4)
    assert functional.resolve("torch", s, g, p) == "torch"
    assert functional.resolve("reference", s, g, p) == "reference"
    assert functional.resolve("auto", s, g.double(), p) == "torch"  # the kernels take float32 only
    if cpu_kernels.AVAILABLE:
        assert functional.resolve("auto", s, g, p) == ("numba" if functional.USE_CPU_KERNELS else "torch")
        assert functional.resolve("numba", s, g, p) == "numba"
    if not triton_backend.supports(p):
        assert functional.resolve("triton", s, g, p) != "triton"  # falls back


def test_the_deprecated_variable_still_turns_the_kernels_off():
    root = Path(__file__).resolve().parents[2]
    code = ("import warnings; warnings.simplefilter('always')\n"
            "import celo2.torch.functional as f; print('flag', f.USE_CPU_KERNELS)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(root / "src"), CELO2_CPU_KERNELS="0"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert "flag False" in res.stdout
    assert "CELO2_CPU_KERNELS is deprecated" in res.stderr and "backend='torch'" in res.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unknown_ns_dtype_is_refused_before_anything_is_written(random_theta, backend):
    """The vector (not held for Newton-Schulz) must not step before the matrix's ns_dtype is checked."""
    theta = rule.TorchTheta.from_theta(random_theta)
    params = [torch.randn(16), torch.randn(24, 16)]
    grads = [torch.randn_like(p) for p in params]
    states = [rule.init_tensor_state(p) for p in params]
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match="ns_dtype='float16'"):
        functional.celo2(params, grads, states, theta=theta, lr=1e-2, weight_decay=0.1, orthogonalize=True,
                         backend=backend, ns_dtype="float16", nonfinite="propagate")
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(not t.any() for st in states for t in st.values())
    state = rule.init_tensor_state(params[1])
    with pytest.raises(ValueError, match="ns_dtype='float16'"):
        rule.tensor_step(theta, state, grads[1], params[1], True, backend=backend, ns_dtype="float16")
    assert all(not t.any() for t in state.values())


def test_each_backend_is_an_object_named_as_its_module():
    from celo2.torch.backends import numba, reference, torch as chunked, triton

    for module in (numba, reference, chunked, triton):
        assert module.BACKEND.name == module.__name__.rsplit(".", 1)[-1]
        assert module.BACKEND.name in functional.BACKENDS


def test_a_backend_gets_the_list_of_tensors_it_steps_in_one_call(random_theta, monkeypatch):
    """The seam multi-tensor kernels plug into: one call per backend and device, not one per tensor."""
    from celo2.torch.backends import torch as chunked

    calls = []
    real = chunked.BACKEND.apply

    def apply(theta, params, *args, **kw):  # noqa: ANN001
        calls.append(len(params))
        return real(theta, params, *args, **kw)

    monkeypatch.setattr(chunked.BACKEND, "apply", apply)
    params = [torch.randn(s) for s in [(5,), (3, 4), (2, 3, 4), ()]]
    states = [rule.init_tensor_state(p) for p in params]
    functional.celo2(params, [torch.randn_like(p) for p in params], states,
                     theta=rule.TorchTheta.from_theta(random_theta), lr=1e-2, weight_decay=0.0,
                     orthogonalize=False, backend="torch", nonfinite="propagate")
    assert calls == [4]
