"""``celo2 demo``: runs end to end (quick mode), learns, is deterministic, and fails clearly without a theta."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

import celo2
import celo2.theta_files as theta_module
from celo2.cli.main import main

REFERENCE_THETA = Path(__file__).resolve().parents[2] / ".." / "shared" / "reference" / "celo2_official_theta.state"


@pytest.fixture
def reference_theta() -> Path:
    if not REFERENCE_THETA.exists():
        pytest.skip(f"reference theta {REFERENCE_THETA} is absent (only present in the project's workspace)")
    return REFERENCE_THETA


def _demo(out: Path, theta: Path, *extra: str) -> int:
    return main(["demo", "--quick", "--no-progress", "--theta", str(theta), "--out", str(out), *extra])


def _curves(out: Path) -> list[tuple]:
    runs = json.loads((out / "results.json").read_text())["runs"]
    return [(r["optimizer"], r["lr"], r["train_curve"], r["val_curve"], r["test_acc"]) for r in runs]


def test_demo_quick_trains_both_optimizers(tmp_path, reference_theta, capsys):
    out = tmp_path / "demo"
    assert _demo(out, reference_theta) == 0
    printed = capsys.readouterr().out
    for text in ("optimizer", "train loss", "val loss", "test acc", "time (s)", "Celo2", "AdamW", "best Celo2"):
        assert text in printed
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "table.txt").read_text().startswith("optimizer")
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(r["optimizer"] for r in runs) == ["AdamW", "Celo2"]
    for r in runs:
        assert not r["diverged"] and r["best"]
        assert len(r["train_curve"]) == 60 and all(math.isfinite(v) for v in r["train_curve"])
        values = [r["initial_train_loss"], r["final_train_loss"], r["val_loss"], r["test_loss"], r["test_acc"]]
        assert all(math.isfinite(v) for v in values)
        # Learned something: full-training-split loss fell clearly, validation loss too, accuracy above chance.
        assert r["final_train_loss"] < 0.85 * r["initial_train_loss"], r["optimizer"]
        assert r["val_curve"][-1] < r["val_curve"][0], r["optimizer"]
        assert r["test_acc"] > 0.2, r["optimizer"]


def test_demo_is_deterministic_for_a_seed(tmp_path, reference_theta):
    assert _demo(tmp_path / "a", reference_theta, "--steps", "20") == 0
    assert _demo(tmp_path / "b", reference_theta, "--steps", "20") == 0
    assert _demo(tmp_path / "c", reference_theta, "--steps", "20", "--seed", "1") == 0
    assert _curves(tmp_path / "a") == _curves(tmp_path / "b")
    assert _curves(tmp_path / "a") != _curves(tmp_path / "c")


def test_demo_without_theta_says_how_to_pass_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(theta_module, "default_theta_path", lambda: tmp_path / "missing" / "celo2_theta.state")
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--theta" in err and "no theta" in err
    assert not out.exists()  # nothing was trained, nothing written


def test_demo_with_missing_theta_file_names_it(tmp_path, capsys):
    missing = tmp_path / "nope.state"
    assert main(["demo", "--quick", "--no-progress", "--theta", str(missing), "--out", str(tmp_path / "o")]) == 2
    assert str(missing) in capsys.readouterr().err


def test_demo_dataset_needing_files_names_data_dir_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CELO2_DATA_DIR", raising=False)
    theta_path = celo2.save_theta(celo2.Theta.init(seed=0), tmp_path / "theta.npz")
    code = main(["demo", "--quick", "--no-progress", "--theta", str(theta_path), "--dataset", "mnist", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--data-dir" in capsys.readouterr().err
