"""Planning a bench: grids, seeds, theta labels and the errors for bad options."""

from __future__ import annotations

import pytest

import celo2
from celo2.eval import bench as B
from celo2.eval import theta_specs as theta_module  # where the bench resolves its --theta specs


def test_parse_grid_forms():
    assert B.parse_grid("1e-4:1e-2:3") == [1e-4, 1e-3, 1e-2]
    assert B.parse_grid("1e-2,1e-3") == [1e-3, 1e-2]
    for bad in ("abc", "1e-3:1e-2", "0,1e-3", "-1:1:3", "1e-3:1e-2:0", ""):
        with pytest.raises(B.BenchError, match="--lr-grid"):
            B.parse_grid(bad)


def test_parse_seeds():
    assert B.parse_seeds("3") == [0, 1, 2]
    assert B.parse_seeds("5,2") == [2, 5]
    for bad in ("0", "x", "-1,2"):
        with pytest.raises(B.BenchError, match="--seeds"):
            B.parse_seeds(bad)


def test_plan_counts_and_grids():
    plan = B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp,gpt"], optimizers=["adamw", "sgd"],
                                      seeds=[0, 1], lr_grids={"sgd": [0.1]}))
    assert plan.optimizers == ["adamw", "sgd"]
    assert plan.grids == {"adamw": [1e-3, 1e-2], "sgd": [0.1]}
    assert len(plan.specs) == 2 * (2 + 1) * 2
    assert len({s.key for s in plan.specs}) == len(plan.specs)
    assert all(s.task_config["dataset"] == "fashion-mnist" for s in plan.specs if s.task == "mlp")


def test_steps_override_and_weight_decay():
    plan = B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["adamw", "adam"], steps=3,
                                      weight_decays={"*": 0.01, "adam": 0.0}))
    assert {s.task_config["steps"] for s in plan.specs} == {3}
    assert plan.weight_decays == {"adamw": 0.01, "adam": 0.0}


def test_theta_labels_expand_celo2(theta_files):
    plan = B.make_plan(B.BenchOptions(
        suite="smoke", tasks=["mlp"], optimizers=["celo2", "adamw"],
        thetas=[f"a={theta_files['a']}", f"b={theta_files['b']}"],
    ))
    assert plan.optimizers == ["celo2[a]", "celo2[b]", "adamw"]
    checks = {s.optimizer: s.theta.checksum for s in plan.specs if s.theta}
    assert checks["celo2[a]"] != checks["celo2[b]"]
    one = B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["celo2[b]"],
                                     thetas=[f"a={theta_files['a']}", f"b={theta_files['b']}"]))
    assert one.optimizers == ["celo2[b]"]


def test_default_theta_is_the_shipped_one_unlabelled(monkeypatch, random_theta):
    monkeypatch.setattr(theta_module, "load_theta", lambda source=None: random_theta)
    plan = B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["celo2-base"]))
    assert plan.optimizers == ["celo2-base"]
    assert plan.theta_refs[0].label == "shipped"


def test_missing_shipped_theta_says_what_to_do(monkeypatch):
    def missing(source=None):
        raise celo2.ThetaNotFoundError("no asset")

    monkeypatch.setattr(theta_module, "load_theta", missing)
    with pytest.raises(B.BenchError, match="--theta shipped.*--theta LABEL=PATH"):
        B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["celo2"]))
    # Baselines alone need no theta.
    B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["adamw"]))


@pytest.mark.parametrize("opts,needle", [
    (dict(suite="huge"), "--suite"),
    (dict(tasks=["mlp,nope"]), "--tasks: unknown task 'nope'"),
    (dict(optimizers=["adamw,lion"]), "--optimizers: unknown optimizer 'lion'"),
    (dict(optimizers=["adamw[x]"]), "only celo2"),
    (dict(optimizers=["adamw"], lr_grids={"sgd": [0.1]}), "--lr-grid: 'sgd'"),
    (dict(optimizers=["adamw"], weight_decays={"muon": 0.1}), "--weight-decay: 'muon'"),
    (dict(optimizers=["adamw"], weight_decays={"*": -1.0}), "--weight-decay"),
    (dict(steps=0), "--steps"),
    (dict(jobs=0), "--jobs"),
    (dict(dataset="cifar"), "--dataset"),
])
def test_bad_options_name_the_flag(opts, needle):
    opts.setdefault("optimizers", ["adamw"])
    with pytest.raises(B.BenchError, match=needle.replace("[", r"\[").replace("(", r"\(")):
        B.make_plan(B.BenchOptions(**opts))


def test_bad_theta_options(theta_files, tmp_path):
    with pytest.raises(B.BenchError, match="--theta .*missing"):
        B.make_plan(B.BenchOptions(optimizers=["celo2"], thetas=[f"x={tmp_path / 'missing.state'}"]))
    with pytest.raises(B.BenchError, match="given twice"):
        B.make_plan(B.BenchOptions(optimizers=["celo2"], thetas=[f"a={theta_files['a']}", f"a={theta_files['b']}"]))
    with pytest.raises(B.BenchError, match="no --theta labelled 'c'"):
        B.make_plan(B.BenchOptions(optimizers=["celo2[c]"], thetas=[f"a={theta_files['a']}"]))
    bad = tmp_path / "bad.state"
    bad.write_bytes(b"not a theta")
    with pytest.raises(B.BenchError, match="cannot load"):
        B.make_plan(B.BenchOptions(optimizers=["celo2"], thetas=[str(bad)]))
