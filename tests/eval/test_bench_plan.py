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
    assert plan.wd_grids == {"adamw": [0.01], "adam": [0.0]}


def test_fixed_weight_decay_by_default_in_the_old_suites():
    """smoke/quick/full keep one weight decay per optimizer: the runs (and keys) of earlier benches."""
    for suite in ("smoke", "quick", "full"):
        plan = B.make_plan(B.BenchOptions(suite=suite, tasks=["mlp"], optimizers=["adamw", "adam", "sgd", "muon"]))
        assert plan.wd_grids == {"adamw": [0.1], "adam": [0.0], "sgd": [0.0], "muon": [0.1]}
        assert len(plan.specs) == sum(len(g) for g in plan.grids.values()) * len({s.seed for s in plan.specs})


def test_wd_grid_default_override_and_precedence():
    plan = B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["adamw", "sgd", "muon"],
                                      seeds=[0], wd_grids={"*": None, "muon": [0.0, 0.5]},
                                      weight_decays={"sgd": 1e-4}))
    assert plan.wd_grids == {"adamw": [0.0, 0.01, 0.1, 1.0], "sgd": [1e-4], "muon": [0.0, 0.5]}
    assert len(plan.specs) == 2 * 4 + 2 * 1 + 2 * 2  # 2 LRs each in the smoke suite
    cells = {(s.optimizer, s.lr, s.weight_decay) for s in plan.specs}
    assert len(cells) == len(plan.specs) == len({s.key for s in plan.specs})
    # The L2-decay optimizers get their own (smaller) default grid.
    l2 = B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["adam"], wd_grids={"adam": None}))
    assert l2.wd_grids == {"adam": [0.0, 1e-4, 1e-3, 1e-2]}


def test_compare_suite_searches_lr_and_wd_at_full_sizes():
    from celo2.eval import tasks as T

    plan = B.make_plan(B.BenchOptions(suite="compare", optimizers=["adamw", "muon"], seeds=[0]))
    assert plan.tasks == ["mlp", "cnn", "gpt", "vit", "autoencoder"]
    assert plan.wd_grids["adamw"] == [0.0, 0.01, 0.1, 1.0]
    assert plan.grids["muon"] == [0.001, 0.00316, 0.01, 0.0316, 0.1]
    assert {s.task: s.task_config["steps"] for s in plan.specs} == {t: c["steps"] for t, c in T.SUITES["full"].items()
                                                                    if t != "rl"}
    # Its cells at the fixed default weight decay are the full suite's runs (same keys: resumable).
    full = B.make_plan(B.BenchOptions(suite="full", tasks=["mlp"], optimizers=["adamw"], seeds=[0]))
    shared = {s.key for s in full.specs} & {s.key for s in plan.specs}
    assert len(shared) == 5  # the 5 LRs of compare's grid at wd 0.1
    assert B.make_plan(B.BenchOptions(suite="compare", optimizers=["adamw"], seeds=[0],
                                      weight_decays={"*": 0.1})).wd_grids == {"adamw": [0.1]}


def test_adam_lr_mult_reaches_celo2_only_and_keeps_default_keys(monkeypatch, random_theta):
    monkeypatch.setattr(theta_module, "load_theta", lambda source=None: random_theta)
    base = B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["celo2", "adamw"]))
    same = B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["celo2", "adamw"], adam_lr_mult=20.0))
    assert [s.key for s in same.specs] == [s.key for s in base.specs]  # the published default: same runs
    one = B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["celo2", "adamw"], adam_lr_mult=1))
    assert one.optimizer_options == {"celo2": {"adam_lr_mult": 1.0}}
    assert {s.optimizer: s.optimizer_options for s in one.specs} == {"celo2": {"adam_lr_mult": 1.0}, "adamw": {}}
    assert not {s.key for s in one.specs if s.optimizer == "celo2"} & {s.key for s in base.specs}
    with pytest.raises(B.BenchError, match="--adam-lr-mult: .*no celo2"):
        B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["adamw"], adam_lr_mult=1))
    with pytest.raises(B.BenchError, match="--adam-lr-mult: must be >= 0"):
        B.make_plan(B.BenchOptions(suite="smoke", tasks=["mlp"], optimizers=["celo2"], adam_lr_mult=-1))


def test_parse_wd_grid():
    assert B.parse_wd_grid("0.1,0,0.01") == [0.0, 0.01, 0.1]
    assert B.parse_wd_grid("default") is None
    for bad in ("", "x", "-0.1,0", "inf"):
        with pytest.raises(B.BenchError, match="--wd-grid"):
            B.parse_wd_grid(bad)


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
    (dict(optimizers=["adamw"], wd_grids={"sgd": None}), "--wd-grid: 'sgd'"),
    (dict(optimizers=["adamw"], wd_grids={"adamw": [0.1]}, weight_decays={"adamw": 0.1}), "give one of them"),
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
