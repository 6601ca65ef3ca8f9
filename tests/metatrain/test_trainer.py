"""End to end on the smoke preset: run folder, checkpoints, exact resume, clear errors.

All tests here share one configuration, so XLA compiles the iteration once.
"""

import json
import os

import numpy as np
import pytest

import celo2
from celo2.metatrain import preset
from celo2.metatrain.trainer import CheckpointError, MetaTrainer, RunDirError, meta_train, read_metrics

SMOKE = preset("smoke", iterations=4, checkpoint_every=2)


def _quiet(msg):
    pass


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("full")
    result = meta_train(SMOKE, run, progress=False, log=_quiet)
    return run, result


def test_smoke_run_writes_every_output(full_run):
    run, result = full_run
    for name in ("config.json", "metrics.jsonl", "theta.state", "metadata.json",
                 "checkpoint/theta.state", "checkpoint/trainer.npz"):
        assert (run / name).is_file(), name
    assert not [p for p in run.rglob("*.tmp")]  # no temporary files left behind
    # Every checkpoint's theta is kept; the last one is the final theta.
    snapshots = sorted(p.name for p in (run / "thetas").iterdir())
    assert snapshots == ["theta-000002.state", "theta-000004.state"]
    assert celo2.load_theta(run / "thetas" / "theta-000004.state").allclose(celo2.load_theta(run / "theta.state"))
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert np.isfinite(r["meta_loss"]) and 0 <= r["meta_loss"] <= SMOKE.meta_loss_clip
        assert np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["inner_steps_per_s"] > 0 and r["wall_time_s"] > 0
    theta = celo2.load_theta(run / "theta.state")  # the authors' format, read back
    assert np.all(np.isfinite(theta.to_flat()))
    assert theta.allclose(result.theta)
    assert not theta.allclose(celo2.Theta.init(SMOKE.seed))  # it moved
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["iterations"] == 4 and meta["config"]["preset"] == "smoke"
    assert meta["inner_steps"] == 4 * SMOKE.inner_steps_per_iteration
    assert meta["final_meta_loss"] == rows[-1]["meta_loss"]
    assert set(meta["data"]) == {"digits", "synthetic"}
    assert json.loads((run / "config.json").read_text()) == SMOKE.to_dict()


def test_killed_run_resumes_to_exactly_the_uninterrupted_theta(full_run, tmp_path):
    reference = full_run[1].theta
    run = tmp_path / "killed"
    # A session that dies after iteration 3: the last checkpoint is at 2, and
    # iteration 3 was logged but never checkpointed.
    partial = meta_train(SMOKE, run, progress=False, log=_quiet, stop_after=3)
    assert partial.iterations == 3 and not (run / "theta.state").exists()
    assert [r["iteration"] for r in read_metrics(run)] == [1, 2, 3]
    resumed = meta_train(SMOKE, run, resume=True, progress=False, log=_quiet)
    assert resumed.iterations == 4
    assert [r["iteration"] for r in read_metrics(run)] == [1, 2, 3, 4]  # row 3 redone, not doubled
    got = celo2.load_theta(run / "theta.state")
    np.testing.assert_array_equal(got.to_flat(), reference.to_flat())
    assert got.checksum() == reference.checksum()


def test_checkpoint_restores_every_array_bit_for_bit(full_run):
    import jax

    run, _ = full_run
    trainer = MetaTrainer(SMOKE)
    state, meta = trainer.load_checkpoint(run)
    assert meta["iteration"] == 4 and int(state.iteration) == 4
    with np.load(run / "checkpoint" / "trainer.npz") as npz:
        saved = [npz[f"leaf_{i:05d}"] for i in range(meta["num_leaves"])]
    for a, b in zip(jax.tree_util.tree_leaves(state), saved):
        np.testing.assert_array_equal(np.asarray(a), b)
    np.testing.assert_array_equal(
        trainer.theta_of(state).to_flat(), celo2.load_theta(run / "checkpoint" / "theta.state").to_flat())


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(full_run, tmp_path, monkeypatch):
    import shutil

    run = tmp_path / "crash"
    shutil.copytree(full_run[0], run)
    before = (run / "checkpoint" / "trainer.npz").read_bytes()
    trainer = MetaTrainer(SMOKE)
    state, _ = trainer.load_checkpoint(run)

    def dying_replace(src, dst):
        raise KeyboardInterrupt("killed during os.replace")

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(state, run)
    monkeypatch.undo()
    assert (run / "checkpoint" / "trainer.npz").read_bytes() == before
    assert not [p for p in run.rglob("*.tmp")]
    trainer.load_checkpoint(run)  # still readable


def test_resume_refuses_a_changed_configuration_and_names_the_key(full_run):
    with pytest.raises(CheckpointError, match="pairs_per_task=2 \\(now 3\\)"):
        meta_train(SMOKE.replace(pairs_per_task=3), full_run[0], resume=True, progress=False, log=_quiet)


def test_a_used_run_folder_needs_resume(full_run):
    with pytest.raises(RunDirError, match="not empty.*--resume"):
        meta_train(SMOKE, full_run[0], progress=False, log=_quiet)


def test_a_damaged_checkpoint_is_reported(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "trainer.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="trainer.npz: not a readable"):
        MetaTrainer(SMOKE).load_checkpoint(tmp_path)


def test_plot_draws_the_meta_loss_curve(full_run, tmp_path):
    from celo2.metatrain import plot_run

    out = plot_run(full_run[0], tmp_path / "curve.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000


def test_the_two_runs_of_a_pair_share_resets_lengths_and_scales(full_run):
    import jax

    state, _ = MetaTrainer(SMOKE).load_checkpoint(full_run[0])
    p = jax.tree_util.tree_map(np.asarray, state.particles)
    np.testing.assert_array_equal(p.step[0::2], p.step[1::2])
    np.testing.assert_array_equal(p.length[0::2], p.length[1::2])
    for k in p.scale:
        np.testing.assert_array_equal(p.scale[k][0::2], p.scale[k][1::2])
    # ... but not their weights: theta + eps and theta - eps train them differently.
    assert not np.array_equal(p.params["w0"][0::2], p.params["w0"][1::2])
    assert state.accumulator.shape == (SMOKE.num_pairs, 347)


def test_metadata_names_the_commit_the_run_started_from(tmp_path, monkeypatch):
    """A run lasts long enough for the checkout to move under it; the metadata
    records the code that started it, looked up once at the start."""
    from celo2.metatrain import trainer

    answers = iter(["commit-at-start", "commit-later"])
    monkeypatch.setattr(trainer, "git_commit", lambda: next(answers))
    meta_train(preset("smoke", iterations=2, checkpoint_every=2), tmp_path / "run", progress=False, log=_quiet)
    assert json.loads((tmp_path / "run" / "metadata.json").read_text())["git_commit"] == "commit-at-start"
