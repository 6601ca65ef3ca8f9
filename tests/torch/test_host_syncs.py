"""Whole optimizer steps with ``backend="triton"`` neither synchronise with the host nor launch more as tensors
are added or widened.

On a GPU a step that reads a tensor value on the host (``item``, ``_local_scalar_dense``, ``nonzero``,
``is_nonzero``, ``equal``, a copy to the CPU) waits for the device and cannot be captured in a CUDA
graph. CI has no GPU: the kernels run under Triton's interpreter on CPU tensors (in a child process,
as ``TRITON_INTERPRET`` is read when the kernels' module is first imported), where a copy to the CPU
cannot happen but a host read still shows as the same ATen operation; the interpreter's own copies
inside a launch are not counted (a launch pauses the counter).

Launches are counted as ``benchmarks/launch_budget.py`` counts them: Triton launches plus the ATen
operations that launch a device kernel (not views, aliases or allocations). What a step launches does not
depend on what its kernels compute (no host reads, the first test), so the budget's counts launch the
interpreted kernels without running them (``run_kernels=False``); one count per optimizer with the kernels
run checks that the two agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from marks import NEEDS_TRITON_KERNELS

ROOT = Path(__file__).resolve().parents[2]

pytestmark = NEEDS_TRITON_KERNELS

SYNCS = r'''
import contextlib, json, sys, torch, torch.nn as nn
sys.path.insert(0, BENCHMARKS)
import launch_budget
from celo2.rule.theta import Theta
from celo2.torch import Celo2, Celo2Base

class HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Operations that make the host wait for a device: a value read, ``nonzero``, a copy to the CPU."""
    READS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero")

    def __init__(self):
        super().__init__()
        self.seen, self.paused, self.cpu_only = [], 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not self.paused:
            if name in self.READS:
                if not (args and isinstance(args[0], torch.Tensor) and args[0].data_ptr() in self.cpu_only):
                    self.seen.append(name)
            elif name in ("_to_copy", "copy_") and args and isinstance(args[0], torch.Tensor):
                src = args[1] if name == "copy_" else args[0]
                dst = args[0].device if name == "copy_" else torch.device(kwargs.get("device") or src.device)
                if dst.type == "cpu" and src.device.type != "cpu":
                    self.seen.append(name + " to cpu")
        return func(*args, **kwargs)

with HostReads() as witness:  # the counter sees a host read
    torch.tensor(1.0).item()
assert witness.seen == ["_local_scalar_dense"], witness.seen
theta = Theta.init(seed=0)
results = []
for cls in (Celo2, Celo2Base):
    for tensor_lr in (False, True):
        for nonfinite in ("skip", "propagate"):
            torch.manual_seed(0)
            shapes = [(12, 8), (40, 30), (30,), (), (3, 2, 3, 3)]
            params = [nn.Parameter(torch.randn(s)) for s in shapes]
            lr, wd = (torch.tensor(1e-2), torch.tensor(0.1)) if tensor_lr else (1e-2, 0.1)
            if cls is Celo2:  # both branches: the learned rule and AdamW
                groups = [{"params": params[:2], "branch": "celo2"}, {"params": params[2:3], "branch": "adam"},
                          {"params": params[3:], "branch": "celo2"}]
            else:
                groups = params
            opt = cls(groups, lr=lr, weight_decay=wd, theta=theta, backend="triton", nonfinite=nonfinite)
            counter = HostReads()
            seen = []
            for step in range(4):
                for p in params:
                    p.grad = torch.randn_like(p)
                if step == 2 and nonfinite == "skip":
                    params[1].grad[3, 4] = float("nan")
                    params[2].grad[1] = float("inf")
                if cls is Celo2 and not tensor_lr and step:
                    # The AdamW branch steps CPU parameters with torch.optim.adam's non-capturable path, which
                    # reads its step count (a CPU tensor) on the host; CUDA parameters take the capturable
                    # path (celo2.torch._adamw), which keeps the count on the device and reads nothing.
                    counter.cpu_only = {opt.state[params[2]]["step"].data_ptr()}
                with launch_budget._count_launches(counter), counter:
                    opt.step()
                if step:
                    seen += counter.seen
                counter.seen = []
            results.append({"optimizer": cls.__name__, "tensor_lr": tensor_lr, "nonfinite": nonfinite, "seen": seen,
                            "skipped": [int(opt.state[p]["nonfinite_steps"]) for p in params[1:3]]})
print("RESULT " + json.dumps(results))
'''

LAUNCHES = r'''
import json, sys
sys.path.insert(0, BENCHMARKS)
import launch_budget
KEYS = ("optimizer", "width", "tensors", "launches", "triton_launches", "compute_by_op")
rows, with_kernels_run = [], []
for name in ("Celo2Base", "Celo2"):
    for width in (WIDTH, 4 * WIDTH):
        for tensors in (5, 20):
            r = launch_budget.count(name, "triton", width, tensors, run_kernels=False)
            rows.append({k: r[k] for k in KEYS})
    r = launch_budget.count(name, "triton", WIDTH, 5)
    with_kernels_run.append({k: r[k] for k in KEYS})
print("RESULT " + json.dumps({"rows": rows, "with_kernels_run": with_kernels_run}))
'''


def _child(code: str, **values) -> object:
    for key, value in values.items():
        code = code.replace(key, repr(value))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code.replace("BENCHMARKS", repr(str(ROOT / "benchmarks")))],
                         capture_output=True, text=True, timeout=1200, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_whole_steps_never_read_a_tensor_on_the_host():
    """Steps 2-4 of Celo2 (learned rule and AdamW branch) and Celo2Base, float and 0-d tensor ``lr`` and
    weight decay, ``nonfinite`` skip (a NaN and an inf gradient at step 3) and propagate: no host read."""
    results = _child(SYNCS)
    assert len(results) == 8
    for r in results:
        assert r["seen"] == [], r
        if r["nonfinite"] == "skip":
            assert r["skipped"] == [1, 1], r  # the skip happened, counted on the device


@pytest.fixture(scope="module")
def counted() -> dict:
    """The launches of one step per optimizer, width and tensor count, counted with the interpreted kernels
    launched but not run (their work grows with the tensors' sizes, the launches do not), and for the
    narrowest five tensors also with the kernels run."""
    return _child(LAUNCHES, WIDTH=16)


@pytest.fixture(scope="module")
def launches(counted) -> list[dict]:
    return counted["rows"]


def test_launches_are_counted_the_same_whether_the_kernels_run(counted):
    """The counts taken without running the kernels are those of a real step."""
    assert len(counted["with_kernels_run"]) == 2
    for real in counted["with_kernels_run"]:
        skipped = [r for r in counted["rows"] if all(r[k] == real[k] for k in ("optimizer", "width", "tensors"))]
        assert skipped == [real], (real, skipped)


def test_launches_do_not_grow_with_the_number_or_width_of_tensors(launches):
    """20 tensors at most 1.25x the launches of 5 of the same shapes; 4x wider tensors at most 1.25x."""
    by = {(r["optimizer"], r["width"], r["tensors"]): r["launches"] for r in launches}
    for name in ("Celo2Base", "Celo2"):
        for width in (16, 64):
            assert by[(name, width, 20)] <= 1.25 * by[(name, width, 5)], (name, width, by)
        for tensors in (5, 20):
            assert by[(name, 64, tensors)] <= 1.25 * by[(name, 16, tensors)], (name, tensors, by)


def test_launch_budget_for_twenty_transformer_tensors(launches):
    """At most 60 launches per Celo2Base step and 150 per Celo2 step for 20 transformer-shaped tensors."""
    for r in launches:
        if r["tensors"] == 20:
            budget = 60 if r["optimizer"] == "Celo2Base" else 150
            assert r["launches"] <= budget, r
