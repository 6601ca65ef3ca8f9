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
    _assert_steps_bitwise_alike(opt, ours, adamw, ref)


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


# --- every API path checks what the constructor checks ------------------------------
def _assert_steps_bitwise_alike(opt, ours, reference, ref, steps: int = 10) -> None:
    """Step ``opt`` (on ``ours``) and ``reference`` (on ``ref``) with the same random gradients; the
    parameters must end bitwise equal."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, q in zip(ours, ref):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def _snapshot(opt):
    params = [p for g in opt.param_groups for p in g["params"]]
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items()} if p in opt.state else {} for p in params])


def _assert_unchanged(opt, snapshot):
    before_params, before_state = snapshot
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(before_params), "a parameter joined or left"
    for p, b, s in zip(params, before_params, before_state):
        assert torch.equal(p.detach(), b), "a parameter moved"
        now = opt.state[p] if p in opt.state else {}
        assert now.keys() == s.keys() and all(torch.equal(now[k], s[k]) for k in s), "a state changed"


BAD_GROUPS = {
    "complex": ({"params": [nn.Parameter(torch.randn(3, 3, dtype=torch.complex64))]}, "complex"),
    "integer": ({"params": [torch.zeros(3, dtype=torch.int64)]}, "floating-point"),
    "sgd": ({"branch": "sgd"}, "branch='sgd'"),
    "nonfinite=zero": ({"nonfinite": "zero"}, "nonfinite='zero'"),
    "backend": ({"backend": "cuda-graphs"}, "backend='cuda-graphs'"),
    "ns_dtype": ({"ns_dtype": torch.float16}, "ns_dtype"),
    "lr<0": ({"lr": -1.0}, "lr=-1.0"),
    "lr=inf": ({"lr": float("inf")}, "lr=inf"),
    "lr=nan": ({"lr": float("nan")}, "lr=nan"),
    "weight_decay": ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    "adam_lr_mult": ({"adam_lr_mult": float("nan")}, "adam_lr_mult=nan"),
    "adam_eps": ({"adam_eps": -1e-8}, "adam_eps"),
    "adam_betas": ({"adam_betas": (0.9, 1.0)}, "adam_betas"),
    "adam_betas-3": ({"adam_betas": (0.9, 0.95, 0.99)}, "adam_betas"),
    "maximize": ({"maximize": True}, "maximize=True"),
    "amsgrad": ({"amsgrad": True}, "amsgrad=True"),
    "betas": ({"betas": (0.9, 0.999)}, "adam_betas"),
    "momentum": ({"momentum": 0.9}, "momentum=0.9"),
    "nesterov": ({"nesterov": True}, "nesterov=True"),
    "decoupled_weight_decay": ({"decoupled_weight_decay": False}, "decoupled_weight_decay=False"),
}


def _group(settings):
    return {"params": [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(3))], **settings}


@pytest.mark.parametrize("case", list(BAD_GROUPS))
def test_add_param_group_refuses_what_the_constructor_refuses(case, random_theta):
    settings, needle = BAD_GROUPS[case]
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        Celo2([_group(settings)], theta=random_theta)
    torch.manual_seed(0)
    first = [nn.Parameter(torch.randn(5, 4)), nn.Parameter(torch.randn(4))]
    opt = Celo2(first, lr=1e-2, theta=random_theta)
    for p in first:
        p.grad = torch.randn_like(p)
    opt.step()
    snapshot = _snapshot(opt)
    group = _group(settings)
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        opt.add_param_group(group)
    _assert_unchanged(opt, snapshot)
    assert len(opt.param_groups) == 1
    # The optimizer goes on as before, without the refused tensors.
    for p in group["params"]:
        if p.is_floating_point():
            p.grad = torch.zeros_like(p)
    opt.step()
    assert not any(p in opt.state for p in group["params"])


def test_add_param_group_accepts_neutral_foreign_keys_and_metadata(random_theta):
    opt = Celo2([nn.Parameter(torch.randn(5, 4))], theta=random_theta)
    opt.add_param_group(_group({"maximize": False, "amsgrad": False, "name": "head", "lr_scale": 0.5}))
    assert opt.param_groups[1]["name"] == "head" and [b for b, _, _ in opt.routing()] == ["celo2", "celo2", "adam"]
    for p in opt.param_groups[1]["params"]:
        p.grad = torch.randn_like(p)
    opt.step()


def test_add_param_group_checks_the_celo2_base_groups_too(random_theta):
    opt = Celo2Base([nn.Parameter(torch.randn(5, 4))], theta=random_theta)
    with pytest.raises(ValueError, match="maximize=True"):
        opt.add_param_group(_group({"maximize": True}))
    with pytest.raises(ValueError, match="complex"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2, dtype=torch.complex64))]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("edit", [{"nonfinite": "zero"}, {"branch": "sgd"}, {"backend": "fast"},
                                  {"maximize": True}])
def test_a_group_edited_in_place_stops_the_step_before_any_write(edit, random_theta):
    """Settings edited after construction (``param_groups[i][key] = ...``) are
    checked before the first tensor moves, not after group 0 has stepped."""
    torch.manual_seed(0)
    groups = [_group({}), _group({})]
    opt = Celo2(groups, lr=1e-2, theta=random_theta)
    for g in groups:
        for p in g["params"]:
            p.grad = torch.randn_like(p)
    opt.step()
    opt.param_groups[1].update(edit)
    snapshot = _snapshot(opt)
    key = next(iter(edit))
    with pytest.raises(ValueError, match=f"param group 1: .*{key}"):
        opt.step()
    _assert_unchanged(opt, snapshot)


def test_parameters_on_the_meta_device_are_refused_by_name(random_theta):
    torch.manual_seed(0)
    real = nn.Parameter(torch.randn(4, 3))
    with torch.device("meta"):
        model = nn.Linear(3, 4)
    opt = Celo2([("real", real), *model.named_parameters()], lr=1e-2, theta=random_theta)
    for p in [real, *model.parameters()]:
        p.grad = torch.ones_like(p)
    before = real.detach().clone()
    with pytest.raises(RuntimeError, match="(weight|bias) is on the meta device.*to_empty"):
        opt.step()
    assert torch.equal(real.detach(), before) and not opt.state[real]
    # Materialised, the model has new parameters; an optimizer built from them steps.
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
            p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="meta device"):
        opt.step()
    opt = Celo2(model.named_parameters(), lr=1e-2, theta=random_theta)
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("cls", [Celo2, Celo2Base])
def test_a_gradient_of_another_shape_is_named_before_any_write(cls, random_theta):
    torch.manual_seed(0)
    named = [("w", nn.Parameter(torch.randn(6, 4))), ("b", nn.Parameter(torch.randn(4))),
             ("v", nn.Parameter(torch.randn(8)))]
    opt = cls(named, lr=1e-2, theta=random_theta)
    for _, p in named:
        p.grad = torch.randn_like(p)
    opt.step()
    snapshot = _snapshot(opt)
    for name, shape in (("v", (2, 4)), ("w", (24,)), ("b", (1, 4))):
        p = dict(named)[name]
        for _, q in named:
            q.grad = torch.randn_like(q)
        p.grad.data = torch.randn(shape)
        with pytest.raises(RuntimeError, match=rf"gradient of {name} has shape {tuple(shape)}".replace("(", r"\(")
                           .replace(")", r"\)")):
            opt.step()
        _assert_unchanged(opt, snapshot)


# --- the AdamW branch with tensor lr / weight decay -------------------------------------
class _HostSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the operations that make the host wait for a device: reading a
    value (``item``, ``_local_scalar_dense``, ``is_nonzero``, ``equal``),
    ``nonzero`` (its output size), and copies to the CPU."""

    READS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in self.READS:
            self.seen.append(name)
        elif name in ("_to_copy", "copy_") and args and isinstance(args[0], torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            dst_device = args[0].device if name == "copy_" else torch.device(kwargs.get("device") or src.device)
            if dst_device.type == "cpu" and src.device.type != "cpu":
                self.seen.append(f"{name} to cpu")
        return func(*args, **kwargs)


@pytest.mark.parametrize("nonfinite,backend", [("propagate", "auto"), ("skip", "torch")])
def test_adam_branch_with_tensor_lr_and_weight_decay_never_syncs(nonfinite, backend, random_theta):
    """Steps 2-4 of the AdamW branch, every dtype, 0-d tensor lr and weight
    decay: no value read on the host. On CPU tensors the count of reads is a
    faithful witness of what a device would sync on (``backend="torch"``
    gates non-finite gradients on the device, as accelerators do)."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(s)) for s in [(), (5,), (7, 3), (4, 1, 3, 3)]]
    params += [nn.Parameter(torch.randn(6, dtype=dt)) for dt in (torch.bfloat16, torch.float16, torch.float64)]
    opt = Celo2([{"params": params, "branch": "adam"}], lr=torch.tensor(1e-3), weight_decay=torch.tensor(0.1),
                nonfinite=nonfinite, backend=backend, theta=random_theta)
    for step in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
        mode = _HostSyncs()
        with mode:
            opt.step()
        if step > 0:
            assert mode.seen == [], f"step {step + 1}: {mode.seen}"
    assert all(torch.isfinite(p).all() for p in params)


def test_the_host_sync_counter_sees_a_sync():
    with _HostSyncs() as mode:
        torch.tensor(1.0).item()
        torch.randn(3).nonzero()
    assert mode.seen == ["_local_scalar_dense", "nonzero"]


def test_adam_branch_with_tensor_lr_is_torch_capturable_adamw(random_theta, monkeypatch):
    """With a 0-d tensor lr and weight decay the branch computes what
    ``torch.optim.AdamW(capturable=True, foreach=True)`` computes, bitwise
    (torch allows that path on accelerators only; the test lets it run on the
    CPU)."""
    import torch.optim.adam as torch_adam

    torch.manual_seed(0)
    shapes = [(), (5,), (7, 3), (2, 3, 4), (4, 1, 3, 3)]
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [nn.Parameter(p.detach().clone()) for p in ours]
    lr, mult, wd = torch.tensor(1e-3), 20.0, torch.tensor(0.1)
    opt = Celo2([{"params": ours, "branch": "adam"}], lr=lr, weight_decay=wd, adam_lr_mult=mult,
                nonfinite="propagate", theta=random_theta)
    monkeypatch.setattr(torch_adam, "_get_capturable_supported_devices", lambda supports_xla=True: ["cpu"])
    adamw = torch.optim.AdamW(ref, lr=lr * mult, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, capturable=True,
                              foreach=True)
    _assert_steps_bitwise_alike(opt, ours, adamw, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_adam_branch_tensor_and_float_hyperparameters_agree(dtype, random_theta):
    """The two arithmetics (float: torch.optim.adam; tensor: the capturable
    formula) agree to float32 rounding on every dtype, and a float64
    parameter with a zero tensor lr stays exactly where it is."""
    torch.manual_seed(0)
    base = [torch.randn(s, dtype=dtype) for s in [(5,), (7, 3)]]
    runs = {}
    for kind in ("float", "tensor"):
        params = [nn.Parameter(b.clone()) for b in base]
        lr, wd = (1e-3, 0.1) if kind == "float" else (torch.tensor(1e-3), torch.tensor(0.1))
        opt = Celo2([{"params": params, "branch": "adam"}], lr=lr, weight_decay=wd, theta=random_theta)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
            opt.step()
        runs[kind] = params
    tol = {torch.float32: 1e-6, torch.float64: 1e-6, torch.bfloat16: 1e-2}[dtype]
    for p, q in zip(runs["float"], runs["tensor"]):
        torch.testing.assert_close(p, q, rtol=tol, atol=tol)
    if dtype == torch.float64:
        params = [nn.Parameter(b.clone()) for b in base]
        opt = Celo2([{"params": params, "branch": "adam"}], lr=torch.tensor(0.0), weight_decay=torch.tensor(0.1),
                    theta=random_theta)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        for p, b in zip(params, base):
            assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_adam_branch_with_tensor_lr_skips_a_non_finite_gradient(backend, random_theta):
    """``nonfinite="skip"`` under the tensor arithmetic: checked on the host
    (``"auto"`` on the CPU) or gated on the device (``"torch"``), the bad
    tensor and its state stay bitwise, the others step."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(6, dtype=torch.bfloat16)),
              nn.Parameter(torch.randn(4, dtype=torch.float64))]
    opt = Celo2([{"params": params, "branch": "adam"}], lr=torch.tensor(1e-2), weight_decay=torch.tensor(0.1),
                backend=backend, theta=random_theta)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    before = [(p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}) for p in params]
    for p in params:
        p.grad = torch.randn_like(p)
    params[1].grad[0] = float("nan")
    opt.step()
    assert torch.equal(params[1].detach(), before[1][0])
    assert all(torch.equal(opt.state[params[1]][k], v) for k, v in before[1][1].items() if k != "nonfinite_steps")
    assert opt.nonfinite_steps() == {"group0.param0": 0, "group0.param1": 1, "group0.param2": 0}
    assert not torch.equal(params[0].detach(), before[0][0]) and not torch.equal(params[2].detach(), before[2][0])
