"""backend="triton" in the optimizers: the same numbers as the Numba and PyTorch backends, a skipped
non-finite step, and a launch count per tensor that does not grow with its size. On a CUDA GPU the
kernels run compiled; without one, on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``,
read when the kernels' module is first imported, hence a child process)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from marks import NEEDS_TRITON_KERNELS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = NEEDS_TRITON_KERNELS

CHILD = r'''
import copy, torch, torch.nn as nn
from celo2.rule.theta import Theta
from celo2.torch import Celo2, Celo2Base
from celo2.torch.backends import triton as triton_backend
device = "cuda" if torch.cuda.is_available() else "cpu"
assert triton_backend.available()
theta = Theta.init(seed=0)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 6)).to(device)
x, y = torch.randn(16, 12, device=device), torch.randn(16, 6, device=device)
others = ["torch"] + (["numba"] if device == "cpu" else [])
for cls in (Celo2, Celo2Base):
    res = {}
    for be in ["triton"] + others:
        m = copy.deepcopy(model)
        groups = [{"params": list(m.parameters()), "branch": "celo2"}] if cls is Celo2 else m.parameters()
        kw = dict(ns_dtype=torch.float32) if cls is Celo2 else {}
        opt = cls(groups, lr=1e-2, weight_decay=0.1, theta=theta, backend=be, **kw)
        for step in range(2):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            if step == 1:
                m[0].weight.grad[0, 0] = float("nan")  # this tensor skips its second step
                before = m[0].weight.detach().clone()
            opt.step()
        assert torch.equal(m[0].weight.detach(), before), (cls.__name__, be)
        assert int(opt.state[m[0].weight]["nonfinite_steps"]) == 1, (cls.__name__, be)
        res[be] = [p.detach().clone() for p in m.parameters()]
    for be in others:
        err = max((a - b).abs().max().item() for a, b in zip(res["triton"], res[be]))
        assert err < 2e-5, (cls.__name__, be, err)
        print(cls.__name__, be, "max difference", err)

# Launches per tensor: the same for a small and a larger matrix (fixed count whatever the size).
import triton.runtime.interpreter as interp, triton.runtime.jit as jit
counts = [0]
for cls_ in (interp.InterpretedFunction, jit.JITFunction):
    real = cls_.run
    def run(self, *a, _real=real, **k):
        counts[-1] += 1
        return _real(self, *a, **k)
    cls_.run = run
per = {}
for shape in [(48, 64), (96, 160)]:  # both past one tile (a tensor within one tile takes a fused pass)
    for cls in (Celo2, Celo2Base):
        p = nn.Parameter(torch.randn(shape, device=device))
        p.grad = torch.randn_like(p)
        opt = cls([{"params": [p], "branch": "celo2"}] if cls is Celo2 else [p], theta=theta, backend="triton")
        opt.step()
        counts.append(0)
        opt.step()
        per.setdefault(cls.__name__, []).append(counts[-1])
print("launches", per)
assert all(len(set(v)) == 1 and v[0] > 0 for v in per.values()), per
print("ok")
'''


def test_triton_backend_agrees_skips_and_launches_a_fixed_number():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.strip().endswith("ok")


def test_lr_on_another_device_is_refused_before_a_launch():
    """The backend checks ``lr`` and weight decay against every parameter's device before its first
    launch, naming both devices."""
    from celo2.torch.backends import triton as triton_backend

    if not triton_backend.available():
        pytest.skip("the Triton kernels do not import")
    import torch

    params = [torch.zeros(3), torch.zeros(2, 2)]
    triton_backend.check_apply(params, (0.1, torch.tensor(0.0)))
    with pytest.raises(ValueError, match="lr is a tensor on meta but the parameter is on cpu"):
        triton_backend.check_apply(params, (torch.tensor(0.1, device="meta"), 0.0))
    with pytest.raises(ValueError, match="weight_decay is a tensor on meta"):
        triton_backend.BACKEND.apply_held(params, [torch.zeros(3), torch.zeros(2, 2)], [None, None],
                                          (0.1, torch.tensor(0.0, device="meta")))


ROUNDING_CHILD = r'''
import torch
from celo2.rule.theta import Theta
from celo2.torch import rule
from celo2.torch.backends import triton as triton_backend
from celo2.torch.backends.base import Options, StateRounding
from celo2.torch._state import TorchTheta
theta = TorchTheta.from_theta(Theta.init(seed=0))
kernels = triton_backend.kernels()
gen = torch.Generator().manual_seed(0)
shapes = [(24, 7), (37,), (40, 30)]
params = [torch.randn(s, generator=gen) for s in shapes]
grads = [torch.randn(s, generator=gen) for s in shapes]
mine = [{k: v.to(torch.bfloat16) for k, v in rule.init_tensor_state(p).items()} for p in params]
theirs = [{k: v.clone() for k, v in st.items()} for st in mine]
steps = [torch.tensor(3), torch.tensor(4), torch.tensor(5)]
oks = triton_backend.BACKEND.apply(theta, params, grads, mine, orthogonalize=False, apply=(0.01, 0.1), skip=True,
                                   options=Options(), rounding=StateRounding(11, steps, [0, 1, 2]))
assert [float(ok) for ok in oks] == [1.0, 1.0, 1.0]
kernels.apply_step_many(theta.net, theirs, grads, [p.clone() for p in params], 0.01, 0.1,
                        rounding=StateRounding(11, steps, [0, 1, 2]))
assert all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for a, b in zip(mine, theirs) for k in a)
raws = triton_backend.BACKEND.raw(theta, params, grads, mine, skip=True, options=Options(),
                                  rounding=StateRounding(11, steps, [0, 1, 2]))
assert all(d.shape == p.shape and d.dtype == torch.float32 for (d, _), p in zip(raws, params))
assert triton_backend.BACKEND.state_dtypes == (torch.float32, torch.bfloat16)
print("ok")
'''


def test_bfloat16_state_goes_through_the_backend():
    """``rounding=`` reaches the kernels unchanged: the backend's states equal the kernels' own, bitwise."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", ROUNDING_CHILD], capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    assert res.stdout.strip().endswith("ok")
