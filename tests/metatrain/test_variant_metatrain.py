"""Meta-training and scoring a rule variant other than the published one, end to end on the smoke preset."""

from __future__ import annotations

import json

import numpy as np
import pytest

import celo2
from celo2.metatrain import preset
from celo2.metatrain.checkpoint import CheckpointError, check_same_run
from celo2.metatrain.config import ConfigError, MetaTrainConfig, override
from celo2.metatrain.score import score_thetas
from celo2.metatrain.trainer import MetaTrainer, meta_train, read_metrics
from celo2.rule.variant import PUBLISHED, RuleVariant

VARIANT = RuleVariant(hidden_width=4, rms_decay=0.999, outputs="direction+magnitude")
SMOKE = preset("smoke", iterations=2, checkpoint_every=1,
               **{"variant.hidden_width": "4", "variant.rms_decay": "0.999", "variant.outputs": "direction+magnitude"})


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def variant_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("variant")
    return run, meta_train(SMOKE, run, progress=False, log=_quiet)


def test_config_takes_variant_fields():
    assert SMOKE.variant == VARIANT
    cfg = json.loads(SMOKE.to_json())
    assert cfg["variant"]["hidden_width"] == 4 and cfg["variant"]["outputs"] == "direction+magnitude"
    assert MetaTrainConfig.from_dict(cfg) == SMOKE
    assert preset("smoke").variant is PUBLISHED
    assert override(SMOKE, {"variant": "published"}).variant == PUBLISHED
    assert override(SMOKE, {"variant": '{"hidden_layers": 3}'}).variant == RuleVariant(hidden_layers=3)
    with pytest.raises(ConfigError, match="hidden_width=0: must be a positive integer"):
        override(SMOKE, {"variant.hidden_width": "0"})
    with pytest.raises(ConfigError, match="unknown field 'width'"):
        override(SMOKE, {"variant.width": "4"})
    with pytest.raises(ConfigError, match="variant: .*unknown rule variant field"):
        MetaTrainConfig.from_dict({"variant": {"width": 4}})


def test_a_variant_meta_trains(variant_run):
    run, result = variant_run
    assert result.iterations == 2 and result.theta.variant == VARIANT
    theta = celo2.load_theta(run / "theta.state")
    assert theta.variant == VARIANT and theta.allclose(result.theta)
    assert celo2.load_theta(run / "thetas" / "theta-000001.state").variant == VARIANT
    assert not theta.allclose(celo2.Theta.init(SMOKE.seed, VARIANT))  # it moved
    rows = read_metrics(run)
    assert all(np.isfinite(r["meta_loss"]) and r["grad_norm"] > 0 for r in rows)
    assert json.loads((run / "config.json").read_text())["variant"] == VARIANT.to_dict()


def test_resume_refuses_another_variant(variant_run):
    with pytest.raises(CheckpointError, match="variant="):
        check_same_run(SMOKE, SMOKE.replace(variant="published"), "run")


def test_theta_init_of_another_variant_is_refused(tmp_path):
    path = celo2.save_theta(celo2.Theta.init(0), tmp_path / "published.state")
    trainer = MetaTrainer(SMOKE.replace(theta_init=str(path)))
    with pytest.raises(ConfigError, match=r"theta_init=.*published.state: a theta of rule variant published"):
        trainer.initial_theta()


def test_score_runs_each_theta_with_its_own_variant(variant_run):
    _, result = variant_run
    thetas = {"published": celo2.Theta.init(0), "variant": result.theta, "again": result.theta}
    scores = score_thetas(thetas, preset("smoke"), truncations=2, runs_per_task=2, seed=1)
    for label in thetas:
        assert np.all(np.isfinite(scores.streams[label]))
    np.testing.assert_array_equal(scores.streams["variant"], scores.streams["again"])
    assert not np.array_equal(scores.streams["variant"], scores.streams["published"])
