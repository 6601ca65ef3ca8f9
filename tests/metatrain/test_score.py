"""Scoring thetas on the meta-loss: common random numbers, paired differences, CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from celo2 import Theta
from celo2.cli.main import main
from celo2.metatrain import ConfigError, preset
from celo2.metatrain.score import score_thetas

CONFIG = preset("smoke")  # digits + synthetic: built in, no files


@pytest.fixture(scope="module")
def thetas():
    good = Theta.init(0)
    # The same network with its last layer scaled down 1000x and a unit output
    # bias: the raw direction is then mostly b2's constant, which the output
    # normalisation blows up to a unit-RMS step in one fixed direction per
    # tensor: a poor rule. (Scaling w2 alone changes nothing: Theta.init's b2
    # is 0, and the output normalisation undoes a uniform scale.)
    shifted = {"w2": lambda v: v * 1e-3, "b2": lambda v: v + 1.0}
    bad = Theta({k: shifted.get(k, lambda v: v)(v) for k, v in good.arrays.items()})
    return {"init": good, "again": good, "frozen": bad}


@pytest.fixture(scope="module")
def scores(thetas):
    return score_thetas(thetas, CONFIG, truncations=6, seed=3)


def test_every_theta_runs_the_same_inner_runs(scores):
    # The same theta twice gives the same per-stream losses, bit for bit.
    np.testing.assert_array_equal(scores.streams["init"], scores.streams["again"])
    d, e = scores.paired_difference("again", "init")
    assert d == 0.0 and e == 0.0
    assert scores.streams["init"].shape == (2 * 2 * CONFIG.pairs_per_task,)
    assert list(scores.per_task("init")) == ["digits", "synthetic"]
    assert np.all(np.isfinite(scores.streams["frozen"]))
    assert np.all((scores.streams["init"] >= 0) & (scores.streams["init"] <= CONFIG.meta_loss_clip))


def test_a_different_theta_scores_differently(scores):
    d, e = scores.paired_difference("frozen", "init")
    assert d != 0.0 and e > 0.0
    table = scores.table()
    assert "| frozen |" in table and "minus init (paired)" in table


def test_the_score_is_the_mean_training_loss_of_the_adam_baseline_for_any_theta():
    # The adam inner optimiser ignores theta: two thetas must score alike.
    cfg = preset("smoke", inner_optimizer="adam")
    s = score_thetas({"a": Theta.init(0), "b": Theta.init(1)}, cfg, truncations=3, seed=0)
    np.testing.assert_array_equal(s.streams["a"], s.streams["b"])


def test_the_seed_picks_the_runs(thetas):
    a = score_thetas({"t": thetas["init"]}, CONFIG, truncations=3, seed=0)
    b = score_thetas({"t": thetas["init"]}, CONFIG, truncations=3, seed=1)
    assert not np.array_equal(a.streams["t"], b.streams["t"])


def test_bad_arguments_are_named():
    with pytest.raises(ConfigError, match="truncations=0"):
        score_thetas({"t": Theta.init(0)}, CONFIG, truncations=0)
    with pytest.raises(ConfigError, match="runs_per_task=1"):
        score_thetas({"t": Theta.init(0)}, CONFIG, runs_per_task=1)
    with pytest.raises(ConfigError, match="no theta"):
        score_thetas({}, CONFIG)


SCRIPT = """
import json
from celo2 import Theta
from celo2.metatrain import preset
from celo2.metatrain.score import score_thetas
import jax
s = score_thetas({"t": Theta.init(0)}, preset("smoke"), truncations=6, seed=3)
print("RESULT" + json.dumps({"devices": len(jax.devices()), "streams": s.streams["t"].tolist()}))
"""


def test_two_devices_give_the_one_device_scores(scores):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[len("RESULT"):])
    assert out["devices"] == 2
    # Each stream draws from its own index, whichever device runs it (the
    # fixture ran the same theta, seed and truncations on one device).
    np.testing.assert_allclose(out["streams"], scores.streams["init"], rtol=1e-5)


def test_cli_scores_thetas_and_writes_json(tmp_path, capsys):
    from celo2 import save_theta

    path = save_theta(Theta.init(0), tmp_path / "a.state")
    other = save_theta(Theta.init(1), tmp_path / "other.state")
    out = tmp_path / "scores.json"
    rc = main(["meta-train", "score", f"mine={path}", str(other), "--preset", "smoke",
               "--truncations", "2", "--no-progress", "--cpu-devices", "1", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| mine |" in captured.out and "| other |" in captured.out and "minus mine (paired)" in captured.out
    saved = json.loads(out.read_text())
    assert saved["tasks"] == ["digits", "synthetic"] and saved["truncations"] == 2
    assert saved["thetas"]["mine"]["difference_to_first"] is None
    assert set(saved["thetas"]["other"]["difference_to_first"]) == {"mean", "stderr"}
    png = tmp_path / "scores.png"
    assert str(png) in captured.out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv,needle", [
    (["score"], "usage: celo2 meta-train score THETA"),
    (["score", "x=/no/such/theta.state"], "theta file not found: /no/such/theta.state"),
    (["score", "bad label=/x.state"], "label 'bad label' must be"),
    (["score", "shipped", "shipped"], "label 'shipped' given twice"),
    (["score", "shipped", "--iterations", "3"], "--iterations belongs to training"),
    (["score", "shipped", "--out", "runs/x"], "--out belong to training"),
    (["--truncations", "3"], "--truncations and --runs-per-task belong to"),
    (["score", "shipped", "--truncations", "0"], "argument --truncations: must be a positive integer, got '0'"),
])
def test_cli_names_bad_score_input(argv, needle, capsys):
    try:
        rc = main(["meta-train", *argv, "--preset", "smoke", "--no-progress", "--cpu-devices", "1"])
    except SystemExit as exc:  # flag values are refused by argparse, with exit code 2
        rc = exc.code
    assert rc == 2
    assert needle in capsys.readouterr().err
