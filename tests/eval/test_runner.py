"""One bench run: determinism, divergence handling, resumable storage."""

from __future__ import annotations

import copy
import json
import math

import pytest

from celo2.eval import runner as R
from celo2.eval import tasks as T


def _spec(task="mlp", optimizer="adamw", lr=3e-3, seed=0, steps=None, **kw):
    cfg = copy.deepcopy(T.SUITES["smoke"][task])
    if steps is not None:
        cfg["steps"] = steps
    return R.RunSpec(task, cfg, optimizer, lr, 0.0, seed, **kw)


@pytest.mark.parametrize("task,optimizer", [("mlp", "adamw"), ("cnn", "muon"), ("gpt", "sgd")])
def test_a_run_is_deterministic_for_a_fixed_seed(task, optimizer):
    a = R.run_one(_spec(task, optimizer))
    b = R.run_one(_spec(task, optimizer))
    assert a["status"] == "ok"
    assert a["final_val_loss"] == b["final_val_loss"]
    assert a["train_curve"] == b["train_curve"] and a["val_curve"] == b["val_curve"]
    c = R.run_one(_spec(task, optimizer, seed=1))
    assert c["final_val_loss"] != a["final_val_loss"], "another seed must change the run"


@pytest.mark.parametrize("optimizer", ["celo2", "celo2-base"])
def test_learned_optimizer_runs_are_deterministic(optimizer, random_theta):
    ref = R.ThetaRef("random", "test", random_theta.checksum())
    a = R.run_one(_spec("mlp", optimizer, theta=ref), random_theta)
    b = R.run_one(_spec("mlp", optimizer, theta=ref), random_theta)
    assert a["status"] == "ok"
    assert a["final_val_loss"] == b["final_val_loss"] and a["train_curve"] == b["train_curve"]


def test_divergence_is_recorded_not_raised(tmp_path):
    rec = R.run_one(_spec("mlp", "sgd", lr=1e6))
    assert rec["status"] == "diverged"
    assert rec["final_val_loss"] == math.inf
    assert rec["diverged_at_step"] is not None
    store = R.ResultStore(tmp_path)
    store.append(rec)
    text = store.path.read_text()
    json.loads(text)  # strict JSON: no Infinity/NaN tokens
    assert "Infinity" not in text and "NaN" not in text
    back = store.load()[rec["key"]]
    assert back["final_val_loss"] == math.inf and back["status"] == "diverged"


def test_key_depends_on_the_full_config(random_theta):
    base = _spec()
    assert base.key == _spec().key
    assert base.key != _spec(lr=1e-2).key
    assert base.key != _spec(seed=1).key
    assert base.key != _spec(steps=5).key
    t1 = R.ThetaRef("x", "p", "aaaa")
    t2 = R.ThetaRef("x", "p", "bbbb")
    assert _spec(optimizer="celo2", theta=t1).key != _spec(optimizer="celo2", theta=t2).key


def test_store_survives_a_kill_during_a_write(tmp_path):
    store = R.ResultStore(tmp_path)
    store.append({"key": "k1", "final_val_loss": 1.0})
    with open(store.path, "a") as f:
        f.write('{"key": "k2", "final_val_lo')  # killed mid-write
    assert set(store.load()) == {"k1"}
    store.append({"key": "k3", "final_val_loss": 2.0})
    assert set(store.load()) == {"k1", "k3"}
    assert all(json.loads(line) for line in store.path.read_text().splitlines())


def test_execute_skips_finished_runs(tmp_path):
    store = R.ResultStore(tmp_path)
    specs = [_spec(lr=lr) for lr in (1e-3, 1e-2)]
    recs, executed = R.execute(specs[:1], store, progress=False)
    assert executed == 1
    recs2, executed2 = R.execute(specs, store, progress=False)
    assert executed2 == 1 and set(recs2) == {s.key for s in specs}
    assert recs2[specs[0].key]["final_val_loss"] == recs[specs[0].key]["final_val_loss"]
    _, executed3 = R.execute(specs, store, progress=False)
    assert executed3 == 0


def test_parallel_runs_match_serial_runs(tmp_path):
    specs = [_spec("rl", "adamw", lr=3e-3), _spec("gpt", "muon", lr=1e-2)]  # no sklearn import in workers
    serial, _ = R.execute(specs, R.ResultStore(tmp_path / "serial"), progress=False)
    parallel, executed = R.execute(specs, R.ResultStore(tmp_path / "parallel"), jobs=2, progress=False)
    assert executed == 2
    for s in specs:
        assert parallel[s.key]["final_val_loss"] == serial[s.key]["final_val_loss"]
        assert parallel[s.key]["train_curve"] == serial[s.key]["train_curve"]


def test_key_ignores_where_inputs_live():
    t1 = R.ThetaRef("x", "/old/place.state", "aaaa")
    t2 = R.ThetaRef("x", "/new/place.state", "aaaa")
    assert _spec(optimizer="celo2", theta=t1).key == _spec(optimizer="celo2", theta=t2).key
    assert _spec(data_dir="/a").key == _spec(data_dir="/b").key != _spec(data_dir=None).key
