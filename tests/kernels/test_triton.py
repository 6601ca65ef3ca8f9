"""The Triton kernels (run by Triton's interpreter on CPU tensors) against the
published reference steps, the Numba kernels and the PyTorch path; the
non-finite skip, dtypes, strides, device-side scalars and launch counts."""

from __future__ import annotations

import collections
import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from celo2.rule import layout, spec
from celo2.torch import functional, rule
from celo2.torch.backends.base import finish

# 0-D; vectors, one longer than a block; a row and a column; matrices of both
# orientations, one whose groups span several blocks and one whose long
# statistic spans several reduction tiles; 3-D with the factored axes at the
# front, at the back and split; conv kernels, one with a single input channel; 5-D.
SHAPES = [(), (37,), (1500,), (1, 7), (7, 1), (24, 7), (37, 61), (300, 3), (3, 10, 9), (9, 10, 3), (5, 3, 4),
          (6, 5, 3, 3), (2, 1, 5, 3), (2, 3, 2, 4, 5)]


def _ids(shape):
    return "x".join(map(str, shape)) or "scalar"


def _finish(d: torch.Tensor, orthogonalize: bool) -> torch.Tensor:
    """The front end's finish of a raw direction: Newton-Schulz (float32) and the output RMS."""
    return finish(d.clone(), orthogonalize=orthogonalize)


@pytest.fixture(scope="module")
def theta(random_theta):
    return random_theta


@pytest.fixture(scope="module")
def net(tk, theta):
    return tk.pack_net(theta, "cpu")


def test_the_hi_statistic_fields_sit_one_stride_after_the_lo_fields(tk):
    """The table is laid out so that a pass reads either factored statistic from one column offset."""
    assert len(set(tk.FIELDS)) == len(tk.FIELDS)
    assert tk.STAT_STRIDE == len(tk.STAT_FIELDS)
    for name in tk.STAT_FIELDS:
        lo, hi = tk.FIELDS.index(f"{name}_lo"), tk.FIELDS.index(f"{name}_hi")
        assert hi - lo == tk.STAT_STRIDE, name
    lo0 = tk.FIELDS.index(f"{tk.STAT_FIELDS[0]}_lo")
    assert [tk.FIELDS.index(f"{name}_lo") - lo0 for name in tk.STAT_FIELDS] == list(range(tk.STAT_STRIDE))


def test_pack_net_is_the_layout_packing(tk, theta):
    packed = tk.pack_net(theta, "cpu")
    assert packed.dtype == torch.float32 and packed.shape == (layout.NET_SIZE,)
    assert np.array_equal(packed.numpy(), layout.pack_theta(theta))


@pytest.mark.parametrize("variant", ["base", "orth"])
def test_reference_steps(tk, reference_dir, published_theta, variant):
    """Every published reference step to 1e-4: the raw direction (finished as the front
    end does), apply_held on it, and (Celo2-base) apply_step, parameters moving by
    ``-0.01 * step`` (lr 0.01, no weight decay)."""
    data = np.load(reference_dir / f"celo2_{variant}_shared.npz")
    orth = variant == "orth"
    assert bool(data["orthogonalize"]) == orth
    net = tk.pack_net(published_theta, "cpu")
    shapes = [tuple(int(x) for x in s.strip("()").split(",") if x.strip()) for s in data["shapes"]]
    assert len(shapes) == 4
    worst = 0.0
    for k, shape in enumerate(shapes):
        held = torch.from_numpy(data[f"p{k}/param0"]).clone()
        stepped = held.clone()
        held_state, step_state = rule.init_tensor_state(held), rule.init_tensor_state(held)
        for t in range(int(data["nsteps"])):
            grad = torch.from_numpy(data[f"p{k}/grad{t}"])
            expected = torch.from_numpy(data[f"p{k}/step{t}"])
            d, ok = tk.direction(net, held_state, grad, held)
            assert ok.item() == 1.0 and d.dtype == torch.float32 and d.shape == shape
            err = float((_finish(d, orth) - expected).abs().max())
            assert err <= 1e-4, f"p{k} {shape} step {t}: direction off by {err:.2e}"
            worst = max(worst, err)
            before = held.clone()
            tk.apply_held(held, rule.newton_schulz(d.clone(), inplace=True) if orth else d, ok, 0.01, 0.0)
            torch.testing.assert_close(held - before, -0.01 * expected, rtol=0, atol=1.5e-6,
                                       msg=lambda m: f"p{k} step {t} apply_held: {m}")
            if not orth:
                before = stepped.clone()
                ok = tk.apply_step(net, step_state, grad, stepped, 0.01, 0.0)
                assert ok.item() == 1.0
                torch.testing.assert_close(stepped - before, -0.01 * expected, rtol=0, atol=1.5e-6,
                                           msg=lambda m: f"p{k} step {t} apply_step: {m}")
    print(f"\n[triton/{variant}] largest deviation from the reference steps: {worst:.2e}")


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_direction_matches_numba_and_torch(tk, theta, net, shape, monkeypatch):
    """The raw direction, finished, and the state after each of three steps equal those
    of the Numba kernels and of the PyTorch path."""
    th = rule.TorchTheta.from_theta(theta)
    gen = torch.Generator().manual_seed(len(shape) * 100 + sum(shape))
    param = torch.randn(shape, generator=gen) * 0.5
    ours = rule.init_tensor_state(param)
    others = {path: rule.init_tensor_state(param) for path in (True, False)}  # USE_CPU_KERNELS
    for t in range(3):
        grad = torch.randn(shape, generator=gen) * 10.0 ** (t - 1)
        if t == 1:
            grad.view(-1)[0] = 5000.0  # clipped to GRAD_CLIP
        d, ok = tk.direction(net, ours, grad, param)
        got = _finish(d, False).reshape(shape)
        for use_cpu, state in others.items():
            monkeypatch.setattr(functional, "USE_CPU_KERNELS", use_cpu)
            expected = rule.tensor_step(th, state, grad, param, False)
            torch.testing.assert_close(got, expected, rtol=0, atol=5e-5, msg=lambda m: f"step {t} cpu={use_cpu}: {m}")
            for key in ours:
                torch.testing.assert_close(ours[key], state[key], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"state[{key}] step {t}: {m}")
        param = param - 0.01 * got


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the last place of ``b``'s dtype at ``b``."""
    ulp = (torch.nextafter(b, torch.full_like(b, float("inf"))) - b).to(torch.float64)
    return (a.to(torch.float64) - b.to(torch.float64)).abs() / ulp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(37,), (24, 7), (6, 5, 3, 3)], ids=_ids)
def test_apply_step_matches_torch(tk, theta, net, shape, dtype):
    """Celo2-base steps with weight decay on parameters (and gradients) of each dtype, state carried."""
    th = rule.TorchTheta.from_theta(theta)
    gen = torch.Generator().manual_seed(7)
    param = (torch.randn(shape, generator=gen) * 0.5).to(dtype)
    ours, ref = param.clone(), param.clone()
    s_ours, s_ref = rule.init_tensor_state(param), rule.init_tensor_state(param)
    grad_dtype = torch.float32 if dtype == torch.float64 else dtype
    for t in range(3):
        grad = torch.randn(shape, generator=gen).to(grad_dtype)
        ok = tk.apply_step(net, s_ours, grad, ours, 0.05, 0.1)
        rule.apply_step(th, s_ref, grad, ref, False, 0.05, 0.1)
        assert ok.item() == 1.0 and ours.dtype == dtype
        for key in s_ours:
            torch.testing.assert_close(s_ours[key], s_ref[key], rtol=1e-5, atol=1e-6)
        if dtype in (torch.float32, torch.float64):
            torch.testing.assert_close(ours, ref, rtol=0, atol=2e-6, msg=lambda m: f"step {t}: {m}")
        else:  # both combine in float32 and round once: at most one rounding apart
            apart = _ulps_apart(ours, ref)
            assert apart.max() <= 1 and (apart == 0).float().mean() > 0.95, f"step {t}: {apart.max()} ulps"


def _snapshot(state, param):
    return {k: v.clone() for k, v in state.items()}, param.clone()


def _assert_bitwise(state, param, snap):
    for key, value in snap[0].items():
        assert torch.equal(state[key], value), f"state[{key}] changed"
    assert torch.equal(param, snap[1]), "param changed"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("shape", [(37,), (24, 7), (6, 5, 3, 3)], ids=_ids)
def test_nonfinite_gradient_is_skipped(tk, net, shape, bad):
    gen = torch.Generator().manual_seed(3)
    param = torch.randn(shape, generator=gen).to(torch.bfloat16)
    state = rule.init_tensor_state(param)
    tk.apply_step(net, state, torch.randn(shape, generator=gen), param, 0.01, 0.1)  # state off zero
    grad = torch.randn(shape, generator=gen)
    grad.view(-1)[grad.numel() // 2] = bad
    snap = _snapshot(state, param)
    ok = tk.apply_step(net, state, grad, param, 0.01, 0.1)
    assert ok.item() == 0.0
    _assert_bitwise(state, param, snap)
    d, ok = tk.direction(net, state, grad, param)
    assert ok.item() == 0.0 and torch.equal(d, torch.zeros_like(d))
    _assert_bitwise(state, param, snap)
    tk.apply_held(param, d, ok, 0.01, 0.1)
    _assert_bitwise(state, param, snap)
    ok = tk.apply_step(net, state, torch.randn(shape, generator=gen), param, 0.01, 0.1)  # steps on after
    assert ok.item() == 1.0 and not torch.equal(param, snap[1])


def test_nan_propagates_without_the_skip(tk, net):
    param = torch.randn(24, 7)
    state = rule.init_tensor_state(param)
    grad = torch.randn(24, 7)
    grad[3, 4] = float("nan")
    ok = tk.apply_step(net, state, grad, param, 0.01, 0.0, skip_nonfinite=False)
    assert ok.item() == 1.0 and torch.isnan(param).all() and torch.isnan(state["m"][:, 3, 4]).all()


@pytest.mark.parametrize("shape", [(), (24, 7), (5, 3, 4)], ids=_ids)
def test_clean_steps_are_bitwise_unaffected_by_the_flag(tk, net, shape):
    gen = torch.Generator().manual_seed(11)
    param = torch.randn(shape, generator=gen)
    runs = {skip: (param.clone(), rule.init_tensor_state(param)) for skip in (True, False)}
    for t in range(2):
        grad = torch.randn(shape, generator=gen)
        outs = {}
        for skip, (p, state) in runs.items():
            d, ok = tk.direction(net, state, grad, p, skip_nonfinite=skip)
            tk.apply_step(net, state, grad, p, 0.01, 0.1, skip_nonfinite=skip)
            outs[skip] = (d, ok)
        assert torch.equal(outs[True][0], outs[False][0]) and outs[True][1].item() == outs[False][1].item() == 1.0
        (p1, s1), (p2, s2) = runs[True], runs[False]
        assert torch.equal(p1, p2) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_lr_and_weight_decay_as_device_tensors(tk, net):
    gen = torch.Generator().manual_seed(5)
    param = torch.randn(9, 10, 3, generator=gen)
    grad = torch.randn(9, 10, 3, generator=gen)
    by_value, by_tensor = param.clone(), param.clone()
    s_value, s_tensor = rule.init_tensor_state(param), rule.init_tensor_state(param)
    tk.apply_step(net, s_value, grad, by_value, 0.03, 0.2)
    tk.apply_step(net, s_tensor, grad, by_tensor, torch.tensor(0.03), torch.tensor(0.2))
    assert torch.equal(by_value, by_tensor)
    d, ok = tk.direction(net, s_value, grad, by_value)
    tk.apply_held(by_value, d, ok, 0.03, 0.2)
    tk.apply_held(by_tensor, d, ok, torch.tensor(0.03), torch.tensor(0.2))
    assert torch.equal(by_value, by_tensor)
    with pytest.raises(ValueError, match="lr"):
        tk.apply_step(net, s_value, grad, by_value, torch.tensor([0.1, 0.2]), 0.0)


def test_non_contiguous_operands_are_copied(tk, net):
    gen = torch.Generator().manual_seed(9)
    storage = torch.randn(7, 24, generator=gen)
    param = storage.t()  # (24, 7), not contiguous
    grad = torch.randn(7, 24, generator=gen).t()
    dense = param.contiguous()
    s1, s2 = rule.init_tensor_state(dense), rule.init_tensor_state(dense)
    tk.apply_step(net, s1, grad, param, 0.01, 0.1)
    tk.apply_step(net, s2, grad.contiguous(), dense, 0.01, 0.1)
    assert torch.equal(param, dense) and torch.equal(storage.t(), dense)
    d, ok = tk.direction(net, s1, grad, param)
    tk.apply_held(param, d.t().contiguous().t(), ok, 0.01, 0.0)
    d2, ok2 = tk.direction(net, s2, grad.contiguous(), dense)
    tk.apply_held(dense, d2, ok2, 0.01, 0.0)
    assert torch.equal(param, dense)


def test_bfloat16_held_direction(tk, net):
    """apply_held takes a bfloat16 direction (Newton-Schulz in bfloat16), normalised in float32."""
    gen = torch.Generator().manual_seed(2)
    param = torch.randn(12, 10, generator=gen)
    d = torch.randn(12, 10, generator=gen).to(torch.bfloat16)
    ok = torch.tensor(1.0)
    expected = param - 0.02 * _finish(d.float(), False)
    tk.apply_held(param, d, ok, 0.02, 0.0)
    torch.testing.assert_close(param, expected, rtol=0, atol=1e-6)


class _Counting:
    """A kernel whose launches are counted."""

    def __init__(self, kernel, counts: collections.Counter, name: str) -> None:
        self.kernel, self.counts, self.name = kernel, counts, name

    def __getitem__(self, grid):
        self.counts[self.name] += 1
        return self.kernel[grid]


@pytest.mark.parametrize("small, large, launches", [
    ((37,), (1000,), (2, 2)), ((1500,), (5000,), (4, 6)),  # vectors: groups within one tile, or across tiles
    ((24, 7), (30, 30), (4, 4)), ((40, 30), (70, 40), (6, 8)),  # matrices likewise
    ((5, 3, 3, 3), (16, 12, 3, 3), (4, 4)),  # conv kernels: every window within a tile
], ids=["vector-fused", "vector", "matrix-fused", "matrix", "conv"])
def test_launches_do_not_grow_with_size(tk, net, monkeypatch, small, large, launches):
    """Triton launches per tensor (the flag's torch.zeros comes on top): a count set by the shape's
    kind (groups within one tile or not), the same for a larger tensor of that kind."""
    counts: collections.Counter = collections.Counter()
    for name in ("_grad_stats", "_flag_pass", "_stat_reduce", "_factors", "_accumulate", "_reduce_groups",
                 "_direction", "_fused", "_held"):
        monkeypatch.setattr(tk, name, _Counting(getattr(tk, name), counts, name))
    for shape in (small, large):
        param = torch.randn(shape)
        state = rule.init_tensor_state(param)
        counts.clear()
        d, ok = tk.direction(net, state, torch.randn(shape), param)
        assert sum(counts.values()) == launches[0], counts
        counts.clear()
        tk.apply_step(net, state, torch.randn(shape), param, 0.01, 0.0)
        assert sum(counts.values()) == launches[1], counts
        counts.clear()
        tk.apply_held(param, d, ok, 0.01, 0.0)
        assert sum(counts.values()) == 3, counts


def test_supports(tk):
    assert tk.supports(torch.zeros(3, 4)) and tk.supports(torch.zeros((), dtype=torch.bfloat16))
    assert tk.supports(torch.zeros(2, 3, 4, 5, 6, dtype=torch.float64))
    assert not tk.supports(torch.zeros(0, 4))
    assert not tk.supports(torch.zeros(3, dtype=torch.int32))
    assert not tk.supports(torch.zeros(3, dtype=torch.complex64))


def test_bad_operands_are_named(tk, net):
    param = torch.randn(6, 4)
    state = rule.init_tensor_state(param)
    grad = torch.randn(6, 4)
    with pytest.raises(ValueError, match=r"state\['fac_c'\]"):
        tk.direction(net, {**state, "fac_c": torch.zeros(3, 5)}, grad, param)
    with pytest.raises(KeyError, match="'v'"):
        tk.direction(net, {k: v for k, v in state.items() if k != "v"}, grad, param)
    with pytest.raises(ValueError, match="grad has shape"):
        tk.direction(net, state, torch.randn(4, 6), param)
    with pytest.raises(ValueError, match="net must be"):
        tk.direction(net[:-1], state, grad, param)
    with pytest.raises(ValueError, match="state\\['m'\\] must be contiguous"):
        tk.direction(net, {**state, "m": torch.zeros(3, 4, 6).transpose(1, 2)}, grad, param)
    with pytest.raises(ValueError, match="d must be"):
        tk.apply_held(param, torch.zeros(4, 6), torch.tensor(1.0), 0.01, 0.0)
    with pytest.raises(TypeError, match="dtype"):
        tk.direction(net, state, grad, param.to(torch.int64))
    assert int(state["m"].abs().sum()) == 0  # nothing touched by a refused call


def test_cpu_tensors_need_the_interpreter():
    pytest.importorskip("triton", reason="triton is not installed")
    module = importlib.import_module("celo2.kernels.triton")
    if module.INTERPRETED:
        pytest.skip("this process imported celo2.kernels.triton with TRITON_INTERPRET=1")
    param = torch.randn(4, 3)
    assert not module.supports(param)
    with pytest.raises(RuntimeError, match="interpreter"):
        module.direction(torch.zeros(layout.NET_SIZE), rule.init_tensor_state(param), param, param)


def test_module_imports_without_triton(monkeypatch):
    """Without Triton the module still imports: nothing is supported and calls say why."""
    import importlib.util
    import sys

    import celo2.kernels

    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    path = Path(celo2.kernels.__file__).with_name("triton.py")
    spec = importlib.util.spec_from_file_location("celo2_kernels_triton_absent", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    param = torch.zeros(3)
    assert not module.AVAILABLE and not module.INTERPRETED and not module.supports(param)
    with pytest.raises(RuntimeError, match="not installed"):
        module.direction(torch.zeros(layout.NET_SIZE), rule.init_tensor_state(param), param, param)


def test_lr_and_weight_decay_on_another_device_are_refused_naming_both(tk, net):
    """A 0-d ``lr`` or weight decay on another device than the parameter (here ``meta`` against the
    CPU, as a CPU tensor against a CUDA parameter) is refused before anything is written."""
    gen = torch.Generator().manual_seed(4)
    param = torch.randn(6, 5, generator=gen)
    grad = torch.randn(6, 5, generator=gen)
    state = rule.init_tensor_state(param)
    before = param.clone()
    elsewhere = torch.tensor(0.01, device="meta")
    with pytest.raises(ValueError, match=r"lr is a tensor on meta but the parameter is on cpu"):
        tk.apply_step(net, state, grad, param, elsewhere, 0.0)
    with pytest.raises(ValueError, match=r"weight_decay is a tensor on meta but the parameter is on cpu"):
        tk.apply_step(net, state, grad, param, 0.01, elsewhere)
    assert torch.equal(param, before) and int(state["m"].abs().sum()) == 0
    d, ok = tk.direction(net, state, grad, param)
    with pytest.raises(ValueError, match=r"lr is a tensor on meta but the parameter is on cpu.*lr\.to\('cpu'\)"):
        tk.apply_held(param, d, ok, elsewhere, 0.0)
    assert torch.equal(param, before)
    with pytest.raises(ValueError, match="weight_decay is a tensor on cuda:1 but the parameter is on cpu"):
        tk.check_scalar(_FakeDeviceTensor(), "weight_decay", torch.device("cpu"))
    tk.check_scalar(0.5, "lr", torch.device("cuda", 1))  # a float is read by value anywhere
    tk.check_scalar(torch.tensor(0.5), "lr", torch.device("cpu"))


class _FakeDeviceTensor(torch.Tensor):
    """A one-element tensor that reports a second GPU as its device (no GPU needed to check the message)."""

    def __new__(cls):  # noqa: D102
        return torch.Tensor._make_subclass(cls, torch.tensor(0.1))

    @property
    def device(self):  # noqa: D102
        return torch.device("cuda", 1)


def test_launches_go_to_the_parameters_device(tk):
    """Triton launches on the current CUDA device: the kernels make the parameter's device current
    around their launches (a parameter on a second GPU); on the CPU nothing changes."""
    ctx = tk.launch_device(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1
    assert tk.launch_device(torch.device("cuda", 0)).idx == 0
    with tk.launch_device(torch.device("cpu")):
        pass


def test_launches_run_inside_the_parameters_device_context(tk, net, monkeypatch):
    """Every entry point launches inside :func:`launch_device` of its parameter."""
    import contextlib

    entered: list[torch.device] = []
    depth = [0]
    launched_outside: list[str] = []

    @contextlib.contextmanager
    def recording(device):
        entered.append(device)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    class _Watched:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            if depth[0] == 0:
                launched_outside.append(self.name)
            return self.kernel[grid]

    monkeypatch.setattr(tk, "launch_device", recording)
    for name in ("_grad_stats", "_flag_pass", "_stat_reduce", "_factors", "_accumulate", "_reduce_groups",
                 "_direction", "_fused", "_held"):
        monkeypatch.setattr(tk, name, _Watched(getattr(tk, name), name))
    for shape in [(37,), (40, 30), (1500,), (5, 3, 3, 3)]:
        param = torch.randn(shape)
        state = rule.init_tensor_state(param)
        d, ok = tk.direction(net, state, torch.randn(shape), param)
        tk.apply_step(net, state, torch.randn(shape), param, 0.01, 0.0)
        tk.apply_held(param, d, ok, 0.01, 0.0)
    assert not launched_outside, launched_outside
    assert entered and all(dev == torch.device("cpu") for dev in entered)


# Several tensors of each kind in one call: vectors and matrices, groups within one tile and across several,
# conv kernels, a 0-D tensor, and a bfloat16 parameter (a group of its own).
MANY = [(37,), (24, 7), (40, 30), (1500,), (5, 3, 3, 3), (), (7, 24), (70, 40), (30,), (6, 5, 3, 3)]


def _many(seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) * 0.5 for s in MANY]
    params[2] = params[2].to(torch.bfloat16)
    grads = [torch.randn(s, generator=gen).to(p.dtype) for s, p in zip(MANY, params)]
    return params, grads


def test_many_tensors_in_one_call_equal_one_call_each(tk, net):
    """direction_many, apply_step_many and apply_held_many give bitwise what one call per tensor gives,
    whichever tensors share a launch; a non-finite gradient skips its own tensor only."""
    params, grads = _many(0)
    grads[1][3, 4] = float("nan")  # a fused factored group
    grads[7][0, 0] = float("inf")  # a factored group across tiles
    one = [p.clone() for p in params]
    s_many = [rule.init_tensor_state(p) for p in params]
    s_one = [rule.init_tensor_state(p) for p in params]
    for step in range(2):
        got = tk.direction_many(net, s_many, grads, params)
        want = [tk.direction(net, s, g, p) for s, g, p in zip(s_one, grads, one)]
        for k, ((d, ok), (d1, ok1)) in enumerate(zip(got, want)):
            assert torch.equal(d, d1) and ok.item() == ok1.item() == (0.0 if k in (1, 7) else 1.0), k
            assert all(torch.equal(s_many[k][key], s_one[k][key]) for key in s_many[k]), k
        tk.apply_held_many(params, [d for d, _ in got], [ok for _, ok in got], 0.01, 0.1)
        for p, (d, ok) in zip(one, want):
            tk.apply_held(p, d, ok, 0.01, 0.1)
        assert all(torch.equal(a, b) for a, b in zip(params, one))
        oks = tk.apply_step_many(net, s_many, grads, params, 0.02, 0.1)
        oks1 = [tk.apply_step(net, s, g, p, 0.02, 0.1) for s, g, p in zip(s_one, grads, one)]
        assert [o.item() for o in oks] == [o.item() for o in oks1]
        assert all(torch.equal(a, b) for a, b in zip(params, one))
        assert all(torch.equal(a[key], b[key]) for a, b in zip(s_many, s_one) for key in a)


def test_launches_per_call_depend_on_the_groups_only(tk, net, monkeypatch):
    """The same kinds of tensor, two or four of each: the same launches; the device tables of a call
    are built once and reused by the next call with the same tensors."""
    counts: collections.Counter = collections.Counter()
    for name in ("_grad_stats", "_flag_pass", "_stat_reduce", "_factors", "_accumulate", "_reduce_groups",
                 "_direction", "_fused", "_held"):
        monkeypatch.setattr(tk, name, _Counting(getattr(tk, name), counts, name))
    seen = []
    for copies in (1, 2):
        params = [torch.randn(s) for s in MANY[:5] * copies]
        states = [rule.init_tensor_state(p) for p in params]
        grads = [torch.randn(p.shape) for p in params]
        counts.clear()
        tk.apply_step_many(net, states, grads, params, 0.01, 0.0)
        seen.append(sum(counts.values()))
        built = len(tk._PLAN_CACHE)
        tk.apply_step_many(net, states, grads, params, 0.01, 0.0)
        assert len(tk._PLAN_CACHE) == built  # the second call reuses the first call's tables
    assert seen[0] == seen[1], seen
