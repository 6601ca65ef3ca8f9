"""celo2.torch.Celo2 / Celo2Base follow PyTorch's optimizer conventions."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from celo2.torch import Celo2, Celo2Base


class Net(nn.Module):
    """Embedding, conv kernel (4-D), hidden matrix, head, biases, a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(6 + 4 * 4 * 4, 16)
        self.head = nn.Linear(16, 3)
        self.temperature = nn.Parameter(torch.tensor(1.0))

    def forward(self, tokens, images):
        a = self.embed(tokens).mean(1)
        b = torch.relu(self.conv(images)).flatten(1)
        h = torch.relu(self.fc(torch.cat([a, b], 1)))
        return self.head(h) * self.temperature


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, 11, (32, 5), generator=g),
        torch.randn(32, 1, 4, 4, generator=g),
        torch.randint(0, 3, (32,), generator=g),
    )


def loss_of(model, seed=0):
    tokens, images, labels = batch(seed)
    return nn.functional.cross_entropy(model(tokens, images), labels)


def train(model, opt, steps, start=0, scheduler=None):
    losses = []
    for i in range(start, start + steps):
        opt.zero_grad()
        loss = loss_of(model, i % 4)
        loss.backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def model():
    torch.manual_seed(0)
    return Net()


def test_routing_by_shape_and_name(model, random_theta):
    opt = Celo2(model.named_parameters(), theta=random_theta)
    branch = {name: b for b, name, _ in opt.routing()}
    assert branch["conv.weight"] == "celo2" and branch["fc.weight"] == "celo2"
    assert branch["embed.weight"] == "adam" and branch["head.weight"] == "adam"
    assert branch["fc.bias"] == "adam" and branch["temperature"] == "adam"
    table = opt.routing_table()
    assert "conv.weight" in table and "4x1x3x3" in table
    # Without names, only shapes decide.
    opt = Celo2(model.parameters(), theta=random_theta)
    assert [b for b, _, _ in opt.routing()].count("celo2") == 4


def test_param_group_can_force_its_branch(model, random_theta):
    opt = Celo2(
        [
            {"params": [model.fc.weight], "branch": "adam"},
            {"params": [model.fc.bias], "branch": "celo2"},
        ],
        theta=random_theta,
    )
    assert [b for b, _, _ in opt.routing()] == ["adam", "celo2"]
    with pytest.raises(ValueError, match="branch='sideways'"):
        Celo2([{"params": [model.fc.weight], "branch": "sideways"}], theta=random_theta)


def test_adam_branch_equals_torch_adamw(random_theta):
    torch.manual_seed(0)
    shapes = [(), (5,), (7, 3), (2, 3, 4), (4, 1, 3, 3)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    lr, mult, wd = 1e-3, 20.0, 0.1
    opt = Celo2([{"params": ours, "branch": "adam"}], lr=lr, weight_decay=wd, adam_lr_mult=mult, theta=random_theta)
    adamw = torch.optim.AdamW(ref, lr=lr * mult, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        for p, q in zip(ours, ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        adamw.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_learned_branch_applies_decoupled_weight_decay(random_theta):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 4))
    w2 = nn.Parameter(w.detach().clone())
    lr, wd = 0.01, 0.5
    a = Celo2([w], lr=lr, weight_decay=wd, theta=random_theta)
    b = Celo2([w2], lr=lr, weight_decay=0.0, theta=random_theta)
    w.grad = torch.randn(6, 4)
    w2.grad = w.grad.clone()
    before = w.detach().clone()
    a.step()
    b.step()
    direction = (before - w2.detach()) / lr  # the rule's direction, from the wd=0 run
    torch.testing.assert_close(w.detach(), before - lr * (direction + wd * before), rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_continues_bit_identically(model, random_theta):
    opt = Celo2(model.named_parameters(), lr=1e-3, weight_decay=0.01, theta=random_theta)
    train(model, opt, 5)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    expected = train(model, opt, 5, start=5)
    final = copy.deepcopy(model.state_dict())

    torch.manual_seed(99)
    fresh = Net()
    fresh.load_state_dict(saved_model)
    opt2 = Celo2(fresh.named_parameters(), lr=1e-3, weight_decay=0.01, theta=random_theta)
    opt2.load_state_dict(saved_opt)
    assert train(fresh, opt2, 5, start=5) == expected
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, final[key]), key


def test_lr_scheduler_drives_lr(model, random_theta):
    opt = Celo2(model.named_parameters(), lr=1e-2, theta=random_theta)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
    train(model, opt, 3, scheduler=sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    # lr = 0 leaves every parameter where it is (no weight decay either).
    opt = Celo2(model.named_parameters(), lr=0.0, weight_decay=0.1, theta=random_theta)
    before = copy.deepcopy(model.state_dict())
    train(model, opt, 2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_step_with_closure(model, random_theta):
    opt = Celo2(model.named_parameters(), lr=1e-2, theta=random_theta)

    def closure():
        opt.zero_grad()
        loss = loss_of(model)
        loss.backward()
        return loss

    first = opt.step(closure)
    assert isinstance(first, torch.Tensor)
    for _ in range(20):
        last = opt.step(closure)
    assert last.item() < first.item()


def test_bf16_parameters_keep_float32_state(random_theta):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(torch.bfloat16)
    opt = Celo2(model.named_parameters(), lr=1e-3, theta=random_theta)
    x = torch.randn(16, 8, dtype=torch.bfloat16)
    for _ in range(3):
        opt.zero_grad()
        model(x).float().pow(2).mean().backward()
        opt.step()
    for p in model.parameters():
        assert p.dtype == torch.bfloat16
        for key, value in opt.state[p].items():
            if key not in ("step", "nonfinite_steps"):  # counters: int32
                assert value.dtype == torch.float32, key
    opt2 = Celo2(model.named_parameters(), lr=1e-3, theta=random_theta)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in model.parameters():
        for key, value in opt2.state[p].items():
            if key not in ("step", "nonfinite_steps"):  # counters: int32
                assert value.dtype == torch.float32, key
                assert torch.equal(value, opt.state[p][key])


def test_sparse_gradients_raise_a_clear_error(random_theta):
    embed = nn.Embedding(10, 4, sparse=True)
    opt = Celo2(embed.named_parameters(), theta=random_theta)
    embed(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients.*embed|sparse gradients"):
        opt.step()


def test_complex_parameters_raise_a_clear_error(random_theta):
    p = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))
    with pytest.raises(ValueError, match="complex"):
        Celo2([p], theta=random_theta)


def test_params_without_grads_are_skipped(model, random_theta):
    opt = Celo2(model.named_parameters(), lr=1e-2, theta=random_theta)
    frozen = model.head.weight.detach().clone()
    model.head.weight.requires_grad_(False)
    train(model, opt, 2)
    assert torch.equal(model.head.weight, frozen)
    assert len(opt.state[model.head.weight]) == 0


def test_invalid_hyperparameters_are_named(model, random_theta):
    with pytest.raises(ValueError, match="lr=-1"):
        Celo2(model.parameters(), lr=-1, theta=random_theta)
    with pytest.raises(ValueError, match="adam_betas"):
        Celo2(model.parameters(), adam_betas=(0.9, 1.5), theta=random_theta)


def test_celo2_base_uses_the_rule_everywhere(model, random_theta):
    opt = Celo2Base(model.named_parameters(), theta=random_theta)
    assert {b for b, _, _ in opt.routing()} == {"celo2"}
    train(model, opt, 2)
    assert set(opt.state[model.fc.bias]) == {"m", "v", "fac_r", "fac_c", "nonfinite_steps"}


@pytest.mark.parametrize("cls", [Celo2, Celo2Base])
def test_small_model_trains_with_the_published_theta(published_theta, cls):
    torch.manual_seed(0)
    x = torch.randn(512, 10)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = cls(model.named_parameters(), lr=3e-3, theta=published_theta)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.3 * first, (first, loss.item())
