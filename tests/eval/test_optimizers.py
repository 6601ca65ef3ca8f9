"""The bench's optimizer registry: schedule, grids, routing, Muon on conv kernels."""

from __future__ import annotations


import pytest
import torch
from torch import nn

from celo2.eval import optimizers as O
from celo2.eval import tasks as T


def test_warmup_cosine_shape():
    f = O.warmup_cosine(100)  # warmup = 5 steps
    assert f(0) == pytest.approx(0.2)
    assert f(4) == pytest.approx(1.0)
    assert f(5) == pytest.approx(1.0)
    values = [f(t) for t in range(5, 100)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine part must not increase"
    assert 0 < f(99) < 0.01
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    assert O.warmup_cosine(1)(0) == 1.0
    with pytest.raises(ValueError, match="total_steps"):
        O.warmup_cosine(0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_schedulers_drive_every_sub_optimizer():
    model = T.CNN(2, 4, 8)
    opt = O.make_muon(model, lr=0.1, weight_decay=0.0)
    scheds = O.make_schedulers(opt, 20)
    assert len(scheds) == len(O.sub_optimizers(opt)) == 2
    assert {g["lr"] for g in opt.param_groups} == {0.1}  # 20 steps: warmup is 1 step, factor 1 at t=0
    for _ in range(10):
        for s in scheds:
            s.step()
    lrs = {round(g["lr"], 12) for g in opt.param_groups}
    assert len(lrs) == 1 and 0 < lrs.pop() < 0.1


def test_log_grid():
    g = O.log_grid(1e-5, 1e-3, 7)
    assert len(g) == 7 and g[0] == 1e-5 and g[-1] == 1e-3
    assert all(b / a == pytest.approx(10 ** (1 / 3), rel=1e-2) for a, b in zip(g, g[1:]))
    assert O.log_grid(1e-3, 1e-1, 1) == [0.01]
    with pytest.raises(ValueError):
        O.log_grid(0, 1, 3)
    with pytest.raises(ValueError):
        O.log_grid(1e-3, 1e-1, 0)


def test_routing_matches_celo2_conventions():
    gpt = T.GPT(256, 8, 16, 1, 2)
    matrices, others = O.split_params(gpt)
    mats = {n for n, _ in matrices}
    rest = {n for n, _ in others}
    assert {"tok_embed.weight", "pos_embed", "head.weight", "head.bias", "ln_f.weight"} <= rest
    assert {"blocks.0.qkv.weight", "blocks.0.proj.weight", "blocks.0.fc1.weight"} <= mats
    cnn = T.CNN(2, 4, 8)
    mats = {n for n, _ in O.split_params(cnn)[0]}
    assert mats == {"conv1.weight", "conv2.weight", "fc.weight"}


def test_muon_updates_conv_kernels_through_flat_views():
    torch.manual_seed(0)
    model = T.CNN(2, 4, 8)
    opt = O.make_muon(model, lr=0.05, weight_decay=0.0)
    before = model.conv1.weight.detach().clone()
    x = torch.rand(8, 28, 28)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.conv1.weight.detach()), "Muon must move the 4-D kernel"
    muon = O.sub_optimizers(opt)[0]
    assert isinstance(muon, torch.optim.Muon)
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd", "muon"])
def test_hand_designed_optimizers_reduce_a_loss(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = O.build_optimizer(name, model, 0.01 if name != "sgd" else 0.05, 0.0)
    first = None
    for _ in range(30):
        loss = ((model(x) - y) ** 2).mean()
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < first


def test_unknown_optimizer_is_named():
    with pytest.raises(KeyError, match="nope"):
        O.build_optimizer("nope", nn.Linear(2, 2), 0.1, 0.0)


def _one_step_of_each(names, theta):
    """Build each kind on a small MLP with ``theta`` and take one step; yields ``(name, optimizer, model)``."""
    torch.manual_seed(0)
    model = T.MLP([784, 16, 10])
    for name in names:
        opt = O.build_optimizer(name, model, 1e-3, 0.1, theta=theta)
        loss = model(torch.rand(4, 28, 28)).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        yield name, opt, model


def test_celo2_factories_take_a_theta(random_theta):
    pytest.importorskip("celo2.torch")
    for _, _, model in _one_step_of_each(("celo2", "celo2-base"), random_theta):
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_celo2_adam_lr_mult_reaches_the_adamw_branch(random_theta):
    pytest.importorskip("celo2.torch")
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    default = O.build_optimizer("celo2", model, 1e-3, 0.0, theta=random_theta)
    one = O.build_optimizer("celo2", model, 1e-3, 0.0, theta=random_theta, adam_lr_mult=1.0)
    assert {g["adam_lr_mult"] for g in default.param_groups} == {20.0}
    assert {g["adam_lr_mult"] for g in one.param_groups} == {1.0}
    with pytest.raises(TypeError):
        O.build_optimizer("adamw", model, 1e-3, 0.0, adam_lr_mult=1.0)  # only Celo2 has the option


def test_bfloat16_state_kinds_step_with_bfloat16_state_and_run_only_when_named(random_theta):
    pytest.importorskip("celo2.torch")
    assert "celo2-bf16" in O.OPTIMIZERS and "celo2-bf16" not in O.DEFAULT_SUITE_OPTIMIZERS
    assert "celo2-base-bf16" not in O.DEFAULT_SUITE_OPTIMIZERS and "celo2" in O.DEFAULT_SUITE_OPTIMIZERS
    for name, opt, _ in _one_step_of_each(("celo2-bf16", "celo2-base-bf16"), random_theta):
        dtypes = {t.dtype for s in opt.state.values() for k, t in s.items() if k in ("m", "v", "exp_avg")}
        assert dtypes == {torch.bfloat16}, (name, dtypes)
