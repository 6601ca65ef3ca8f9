"""Copies of the PyTorch optimizers: ``copy.deepcopy``, ``pickle`` and
``torch.save``/``torch.load`` give an optimizer that keeps its theta, its
routing and its state and steps bitwise like the original.

``torch.optim.Optimizer`` pickles its defaults, state and param groups only;
the optimizers add what their step needs (the theta and the name rule) and
rebuild their caches.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

from celo2.torch import Celo2, Celo2Base

CLASSES = {"Celo2": Celo2, "Celo2Base": Celo2Base}


class Net(nn.Module):
    """An embedding (AdamW by name in Celo2), a matrix, a conv kernel, a bias, a bfloat16 vector."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 5)
        self.fc = nn.Linear(5, 6)
        self.conv = nn.Parameter(torch.randn(3, 2, 3, 3))
        self.scale = nn.Parameter(torch.randn(6, dtype=torch.bfloat16))


def _copy(how: str, obj):
    if how == "deepcopy":
        return copy.deepcopy(obj)
    if how == "pickle":
        return pickle.loads(pickle.dumps(obj))
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def _params(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _step(opt, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in _params(opt):
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    opt.step()


def _assert_same(a, b) -> None:
    """Parameters and every state tensor bitwise equal, in parameter order."""
    for p, q in zip(_params(a), _params(b), strict=True):
        assert p is not q
        assert p.dtype == q.dtype and torch.equal(p.detach(), q.detach())
        sa, sb = a.state[p], b.state[q]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("cls_name", list(CLASSES))
@pytest.mark.parametrize("after_steps", [0, 2])
def test_a_copy_steps_exactly_like_the_original(cls_name, how, after_steps, random_theta):
    torch.manual_seed(0)
    opt = CLASSES[cls_name](Net().named_parameters(), lr=1e-2, weight_decay=0.1, theta=random_theta)
    for i in range(after_steps):
        _step(opt, i)
    twin = _copy(how, opt)
    assert type(twin) is type(opt)
    assert twin.routing() == opt.routing()
    assert twin.defaults == opt.defaults
    assert [{k: v for k, v in g.items() if k != "params"} for g in twin.param_groups] == \
           [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    _assert_same(opt, twin)
    for i in range(after_steps, after_steps + 3):
        _step(opt, i)
        _step(twin, i)
        _assert_same(opt, twin)
    assert twin.nonfinite_steps() == opt.nonfinite_steps()


def test_a_copy_of_model_and_optimizer_together_steps_the_copied_model(random_theta):
    """``copy.deepcopy((model, opt))``: the copy's optimizer holds the copy's parameters."""
    torch.manual_seed(0)
    model = Net()
    opt = Celo2(model.named_parameters(), lr=1e-2, theta=random_theta)
    _step(opt, 0)
    model2, opt2 = copy.deepcopy((model, opt))
    assert {id(p) for p in _params(opt2)} == {id(p) for p in model2.parameters()}
    before = [p.detach().clone() for p in model.parameters()]
    _step(opt2, 1)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.detach(), b), "stepping the copy moved the original"
    _step(opt, 1)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p.detach(), q.detach())


def test_a_copy_keeps_its_own_theta_not_the_shipped_one(random_theta):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(8, 6))
    opt = Celo2Base([p], lr=1e-2, theta=random_theta)
    twin = _copy("pickle", opt)
    assert twin.theta.arrays.keys() == random_theta.arrays.keys()
    for key, value in random_theta.arrays.items():
        assert (twin.theta.arrays[key] == value).all(), key
    assert twin.theta.metadata == random_theta.metadata
    shipped = Celo2Base([nn.Parameter(p.detach().clone())], lr=1e-2)
    for o in (opt, twin, shipped):
        _step(o, 0)
    assert torch.equal(_params(twin)[0], p)
    assert not torch.equal(_params(shipped)[0], p), "the shipped theta steps like the random one: no witness"


def test_a_copy_pickled_without_theta_is_refused_by_name(random_theta):
    """A state such as a release whose optimizers lost their theta pickled: unpickling says what to do."""
    opt = Celo2([nn.Parameter(torch.randn(4, 3))], theta=random_theta)
    state = opt.__getstate__()
    del state["theta"], state["adam_name_pattern"]
    blank = Celo2.__new__(Celo2)
    with pytest.raises(ValueError, match="pickled without its theta.*state_dict"):
        blank.__setstate__(state)
