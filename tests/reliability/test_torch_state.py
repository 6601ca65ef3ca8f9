"""PyTorch optimizers under bad state: mismatched saved state, resized
parameters, foreign optimizers' state, kernels handed wrong operands; float64
and zero-size parameters.

The cases that could crash the interpreter (they did, on the Numba kernels)
run in a child interpreter, once with the CPU kernels and once on the PyTorch
path (``CELO2_CPU_KERNELS=0``); a crash fails the test.
"""

from __future__ import annotations

import copy
import sys

import pytest

CRASH_CASES = [
    "load_16x10_into_32x10_then_steps",
    "resized_parameter_stops_the_step_before_any_write",
    "mismatched_state_is_refused_whole",
    "algorithm_switch_is_refused",
    "adamw_state_is_refused",
    "kernels_refuse_wrong_operands",
]


@pytest.fixture(scope="module", params=["kernels", "torch-path"])
def batch(request):
    from reliability.isolated import run_cases

    env = {"CELO2_CPU_KERNELS": "1" if request.param == "kernels" else "0"}
    return run_cases(__file__, CRASH_CASES, env=env)


@pytest.mark.parametrize("case", CRASH_CASES)
def test_isolated(batch, case):
    batch.check(case)


# --- the cases (run in the child) ------------------------------------------------
def _opt_state(opt):
    """A deep copy of everything load_state_dict could change, in parameter order."""
    params = [p for g in opt.param_groups for p in g["params"]]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return copy.deepcopy({"state": [dict(opt.state[p]) if p in opt.state else None for p in params],
                          "groups": groups, "ids": [id(p) for p in params]})


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _refused(opt, state_dict, *needles) -> None:
    """``load_state_dict`` raises a ValueError naming every needle and changes nothing."""
    before = _opt_state(opt)
    try:
        opt.load_state_dict(state_dict)
    except ValueError as exc:
        for needle in needles:
            assert needle in str(exc), (needle, str(exc))
    else:
        raise AssertionError(f"load_state_dict accepted a mismatched state (expected {needles})")
    after = _opt_state(opt)
    assert _same(before["groups"], after["groups"]), "param groups changed"
    assert before["ids"] == after["ids"], "parameters changed"
    assert _same(before["state"], after["state"]), "state changed"


def _stepped(shapes, cls=None, named=False, steps=1, **kw):
    import torch

    from celo2.torch import Celo2

    cls = cls or Celo2
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    args = [(f"w{i}", p) for i, p in enumerate(params)] if named else params
    opt = cls(args, lr=1e-2, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


def case_load_16x10_into_32x10_then_steps():
    import torch

    _, small = _stepped([(16, 10)], named=True)
    params, big = _stepped([(32, 10)], named=True, steps=0)
    _refused(big, small.state_dict(), "w0", "(3, 16, 10)", "(3, 32, 10)")
    assert not big.state
    for _ in range(3):
        params[0].grad = torch.randn_like(params[0])
        big.step()
    assert torch.isfinite(params[0]).all()


def case_resized_parameter_stops_the_step_before_any_write():
    import torch

    from celo2.torch import Celo2, Celo2Base

    for cls in (Celo2, Celo2Base):
        for shape, new in (((16, 10), (32, 10)), ((12,), (20,)), ((4, 3, 3, 3), (8, 3, 3, 3))):
            params, opt = _stepped([(6, 5), shape, (7,)], cls=cls, named=True)
            params[1].data = torch.randn(new)
            for p in params:
                p.grad = torch.randn_like(p)
            before = [p.detach().clone() for p in params]
            states = copy.deepcopy([dict(opt.state[p]) for p in params])
            try:
                opt.step()
            except RuntimeError as exc:
                assert "w1" in str(exc) and str(tuple(new)) in str(exc), str(exc)
            else:
                raise AssertionError(f"{cls.__name__}: step on a resized {shape} -> {new} parameter ran")
            for p, b, s in zip(params, before, states):
                assert torch.equal(p.detach(), b), "a parameter was written before the error"
                assert _same(s, dict(opt.state[p])), "a state was written before the error"


def case_mismatched_state_is_refused_whole():
    import torch

    shapes = [(6, 5), (16, 10), (7,)]
    _, src = _stepped(shapes, named=True)
    _, dst = _stepped(shapes, named=True)
    good = src.state_dict()
    dst.load_state_dict(copy.deepcopy(good))  # the same model loads

    def edited(fn):
        sd = copy.deepcopy(good)
        fn(sd)
        return sd

    # Every class of mismatch, on the second tensor (the first would load first if not checked whole).
    _refused(dst, edited(lambda sd: sd["state"][1].update(m=torch.zeros(3, 10, 16))), "w1", "'m'")
    _refused(dst, edited(lambda sd: sd["state"][1].update(fac_r=torch.zeros(3, 17))), "w1", "fac_r")
    _refused(dst, edited(lambda sd: sd["state"][1].update(fac_c=torch.zeros(3, 9))), "w1", "fac_c")
    _refused(dst, edited(lambda sd: sd["state"][1].pop("v")), "w1", "'v'")
    _refused(dst, edited(lambda sd: sd["state"][1].update(v=torch.zeros(16, 10, dtype=torch.int64))), "w1", "v")
    _refused(dst, edited(lambda sd: sd["state"][1].update(nonfinite_steps=torch.zeros(2))), "w1", "nonfinite_steps")
    _refused(dst, edited(lambda sd: sd["state"][2].update(exp_avg=torch.zeros(8))), "w2", "exp_avg")
    # A learned-branch state on the AdamW-routed vector, and the reverse.
    _refused(dst, edited(lambda sd: sd["state"].update({2: copy.deepcopy(sd["state"][1])})), "w2", "adam")
    _refused(dst, edited(lambda sd: sd["state"].update({1: copy.deepcopy(sd["state"][2])})), "w1", "celo2")
    _refused(dst, edited(lambda sd: sd["param_groups"][0]["params"].pop()), "param group 0")
    _refused(dst, edited(lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))), "param groups")
    # Without names, the parameter is named by group and index.
    _, src2 = _stepped(shapes)
    _, dst2 = _stepped([(6, 5), (32, 10), (7,)])
    _refused(dst2, src2.state_dict(), "group0.param1")


def case_algorithm_switch_is_refused():
    import torch

    from celo2.torch import Celo2, Celo2Base

    shapes = [(6, 5), (8,)]
    _, celo2 = _stepped(shapes)
    _, base = _stepped(shapes, cls=Celo2Base)
    _refused(_stepped(shapes, cls=Celo2Base)[1], celo2.state_dict(), "branch", "Celo2Base")
    _refused(_stepped(shapes)[1], base.state_dict(), "branch", "Celo2")
    _, plain = _stepped(shapes, orthogonalize=False)
    _refused(_stepped(shapes)[1], plain.state_dict(), "orthogonalize")
    _, propagate = _stepped(shapes, nonfinite="propagate")
    _refused(_stepped(shapes)[1], propagate.state_dict(), "nonfinite")
    # A state saved before the nonfinite option existed loads and keeps this optimizer's setting.
    old = celo2.state_dict()
    for g in old["param_groups"]:
        del g["nonfinite"]
    for s in old["state"].values():
        del s["nonfinite_steps"]
    params, fresh = _stepped(shapes, steps=0)
    fresh.load_state_dict(old)
    assert fresh.param_groups[0]["nonfinite"] == "skip"
    for p in params:
        p.grad = torch.randn_like(p)
    fresh.step()
    assert fresh.nonfinite_steps() == {"group0.param0": 0, "group0.param1": 0}
    assert isinstance(fresh, Celo2)


def case_adamw_state_is_refused():
    import torch

    params = [torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(5))]
    adamw = torch.optim.AdamW(params)
    for p in params:
        p.grad = torch.randn_like(p)
    adamw.step()
    from celo2.torch import Celo2, Celo2Base

    for cls in (Celo2, Celo2Base):
        _refused(_stepped([(6, 5), (5,)], cls=cls)[1], adamw.state_dict(), "not a Celo2")


def case_kernels_refuse_wrong_operands():
    """The kernels' host wrappers check what they are handed (the optimizer's
    checks come first; this is the layer below them)."""
    import torch

    from celo2.kernels import cpu as cpu_kernels
    from celo2.theta_files import load_theta
    from celo2.torch import functional, rule

    if not functional.USE_CPU_KERNELS:
        return
    theta = rule.TorchTheta.from_theta(load_theta(None))
    for small, big in (((16, 10), (32, 10)), ((10, 16), (10, 32)), ((12,), (20,)), ((8, 6, 3, 3), (16, 6, 3, 3))):
        assert cpu_kernels.kernel_kind(big) is not None
        state = rule.init_tensor_state(torch.zeros(small))
        p, g = torch.randn(big), torch.randn(big)
        try:
            rule.tensor_step(theta, state, g, p, False)
        except ValueError as exc:
            assert "celo2 CPU kernels" in str(exc), str(exc)
        else:
            raise AssertionError(f"the kernels took a {small} state for a {big} tensor")
    m = torch.zeros(3, 8, 5)
    try:
        cpu_kernels.check_operands("matrix", (8, 5), {"m": m.numpy()[:, :, ::-1]})
    except ValueError as exc:
        assert "contiguous" in str(exc)
    else:
        raise AssertionError("a reversed view passed the contiguity check")
    try:
        cpu_kernels.check_operands("matrix", (8, 5), {"v": torch.zeros(8, 5, dtype=torch.float64).numpy()})
    except ValueError as exc:
        assert "float64" in str(exc)
    else:
        raise AssertionError("a float64 operand passed the check")


# --- in-process cases -------------------------------------------------------------
@pytest.mark.parametrize("edit,needles", [
    ({"maximize": True}, ("param group 0", "maximize=True")),
    ({"betas": (0.9, 0.999)}, ("param group 0", "adam_betas")),
    ({"lr": -1.0}, ("param group 0", "lr=-1.0")),
    ({"adam_betas": (0.9, 1.5)}, ("param group 0", "adam_betas")),
    ({"backend": "cuda-graphs"}, ()),  # the machine's setting: kept from this optimizer, so it loads
], ids=["maximize", "betas", "lr", "adam_betas", "backend"])
def test_saved_settings_pass_the_constructor_checks(edit, needles):
    """A saved param group is checked like a constructor's group before anything loads."""
    _, src = _stepped([(6, 5), (7,)], named=True)
    params, dst = _stepped([(6, 5), (7,)], named=True)
    sd = copy.deepcopy(src.state_dict())
    sd["param_groups"][0].update(edit)
    if needles:
        _refused(dst, sd, *needles, "nothing was loaded")
        return
    dst.load_state_dict(sd)
    assert dst.param_groups[0]["backend"] == "auto"
    for p in params:
        p.grad = p.detach().clone()
    dst.step()


@pytest.mark.parametrize("cls_name", ["Celo2", "Celo2Base"])
def test_float64_parameters_are_updated_in_float64(cls_name):
    import torch

    import celo2.torch as ct

    cls = getattr(ct, cls_name)
    torch.manual_seed(0)
    shapes = [(6, 5), (7,), (4, 3, 3, 3), (2, 3, 4)]
    for lr, wd in ((0.0, 0.0), (0.0, 0.1)):
        params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64) + 1e-9) for s in shapes]
        before = [p.detach().clone() for p in params]
        opt = cls(params, lr=lr, weight_decay=wd)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        for p, b in zip(params, before):
            assert torch.equal(p.detach(), b), f"lr=0 moved a float64 {tuple(p.shape)} parameter"
            for key, value in opt.state[p].items():
                if key not in ("step", "nonfinite_steps"):
                    assert value.dtype == torch.float32, key
    # lr > 0: the update lands in float64, not on the float32 grid.
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]
    opt = cls(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        assert not torch.equal(p.detach(), p.detach().float().double()), tuple(p.shape)


@pytest.mark.parametrize("cls_name", ["Celo2", "Celo2Base"])
@pytest.mark.parametrize("kernels", [True, False])
def test_zero_size_parameters_step(cls_name, kernels, monkeypatch):
    import torch

    import celo2.torch as ct
    from celo2.torch import functional, rule

    monkeypatch.setattr(functional, "USE_CPU_KERNELS", kernels and functional.USE_CPU_KERNELS)
    shapes = [(0,), (0, 5), (5, 0), (0, 3, 3, 3), (4, 3)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = getattr(ct, cls_name)(params, lr=1e-2)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    assert all(p.shape == s for p, s in zip(params, shapes))
    assert torch.isfinite(params[-1]).all()


@pytest.mark.parametrize("cls_name", ["Celo2", "Celo2Base"])
def test_zero_gradients_still_move_parameters_by_about_lr(cls_name, zero_gradient_thetas):
    """Documented behaviour: the rule's output has unit RMS, so exactly zero
    gradients move a parameter by about lr per step (shipped theta, and the
    published one where the shared folder is present)."""
    import torch

    import celo2.torch as ct

    lr = 1e-3
    for label, theta in zero_gradient_thetas.items():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(32, 16))
        opt = getattr(ct, cls_name)([p], lr=lr, theta=theta)
        for step in range(3):
            before = p.detach().clone()
            p.grad = torch.zeros_like(p)
            opt.step()
            rms = (p.detach() - before).pow(2).mean().sqrt().item()
            assert 0.5 * lr < rms < 1.5 * lr, (label, step, rms)


if __name__ == "__main__":
    from isolated import child_main  # this folder is sys.path[0] when run as a script

    child_main(globals())
