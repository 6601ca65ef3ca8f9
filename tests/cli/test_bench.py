"""``celo2 bench`` end to end on tiny configs: outputs, resume, determinism, bad flags."""

from __future__ import annotations

import json

import pytest

from celo2.cli.main import main

TINY = ["--suite", "smoke", "--steps", "4", "--no-progress", "--jobs", "1"]


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv("CELO2_DATA_DIR", raising=False)


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


def test_smoke_bench_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["bench", *TINY, "--tasks", "mlp,gpt", "--optimizers", "adamw,sgd",
               "--lrs", "1e-3,1e-2", "--out", str(out)])
    assert rc == 0
    recs = _records(out)
    assert len(recs) == 2 * 2 * 2
    assert {r["config"]["optimizer"] for r in recs} == {"adamw", "sgd"}
    assert all(r["config"]["task_config"]["steps"] == 4 for r in recs)
    for f in ("report.md", "results.csv", "environment.json", "bench.json",
              "curves_mlp.png", "lr_mlp.png", "curves_gpt.png", "lr_gpt.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = (out / "report.md").read_text()
    assert "## Task `mlp`" in md and "## Task `gpt`" in md and "## Summary across tasks" in md
    assert "Command: `celo2 bench --suite smoke" in md
    assert "BUILT-IN FALLBACK" in md  # no data folder given: the report says so
    assert "torch" in json.loads((out / "environment.json").read_text())["versions"]
    assert "report:" in capsys.readouterr().out


def test_killed_bench_resumes_and_skips_finished_runs(tmp_path):
    out = tmp_path / "run"
    base = [*TINY, "--tasks", "mlp", "--lrs", "1e-3,1e-2", "--out", str(out)]
    assert main(["bench", *base, "--optimizers", "adamw"]) == 0  # the part that finished before the kill
    first = {r["key"]: r for r in _records(out)}
    with open(out / "results.jsonl", "a") as f:
        f.write('{"key": "half-writ')  # the kill hit during a write
    assert main(["bench", *base, "--optimizers", "adamw,muon"]) == 0
    recs = _records(out)
    assert len(recs) == 4
    again = {r["key"]: r for r in recs}
    for key, rec in first.items():
        assert again[key]["finished_at"] == rec["finished_at"], "finished runs must not rerun"
    history = json.loads((out / "bench.json").read_text())["invocations"]
    assert [h["runs_executed"] for h in history] == [2, 2]
    assert main(["bench", *base, "--optimizers", "adamw,muon"]) == 0
    assert json.loads((out / "bench.json").read_text())["invocations"][-1]["runs_executed"] == 0


def test_same_seed_same_losses_across_benches(tmp_path):
    args = [*TINY, "--tasks", "cnn", "--optimizers", "muon", "--lrs", "1e-2"]
    assert main(["bench", *args, "--out", str(tmp_path / "a")]) == 0
    assert main(["bench", *args, "--out", str(tmp_path / "b")]) == 0
    (a,), (b,) = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert a["key"] == b["key"]
    assert a["final_val_loss"] == b["final_val_loss"]
    assert a["train_curve"] == b["train_curve"]


def test_thetas_side_by_side(tmp_path, theta_paths):
    out = tmp_path / "run"
    rc = main(["bench", *TINY, "--tasks", "mlp", "--optimizers", "celo2,adamw", "--lrs", "1e-3",
               "--theta", f"one={theta_paths[0]}", "--theta", f"two={theta_paths[1]}", "--out", str(out)])
    assert rc == 0
    assert {r["config"]["optimizer"] for r in _records(out)} == {"celo2[one]", "celo2[two]", "adamw"}
    md = (out / "report.md").read_text()
    assert "| celo2[one] |" in md and "| celo2[two] |" in md
    assert "one LR only" in md  # a 1-point grid is flagged as untuned
    rc = main(["bench", *TINY, "--tasks", "mlp", "--optimizers", "celo2", "--lrs", "1e-3", "--adam-lr-mult", "1",
               "--theta", f"one={theta_paths[0]}", "--out", str(out)])
    assert rc == 0
    assert [r["config"]["optimizer_options"] for r in _records(out) if "optimizer_options" in r["config"]] == [
        {"adam_lr_mult": 1.0}]
    md = (out / "report.md").read_text()
    assert "Optimizer options of celo2[one]: `adam_lr_mult=1`." in md and "--adam-lr-mult 1" in md


def test_published_theta_trains(tmp_path, published_theta_path):
    out = tmp_path / "run"
    rc = main(["bench", *TINY, "--steps", "8", "--tasks", "mlp", "--optimizers", "celo2,celo2-base",
               "--lrs", "3e-3", "--theta", f"published={published_theta_path}", "--out", str(out)])
    assert rc == 0
    recs = _records(out)
    assert all(r["status"] == "ok" for r in recs)
    for r in recs:  # the learned optimizer must actually lower the loss
        assert r["final_val_loss"] < r["val_curve"]["loss"][0]


def test_wd_grid_runs_a_two_d_search(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--tasks", "mlp", "--optimizers", "adamw,sgd", "--lrs", "1e-3,1e-2", "--out", str(out)]
    assert main(["bench", *args, "--wd-grid", "adamw=0,0.1", "--dry-run"]) == 0
    assert "adamw: LRs 0.001, 0.01, weight decays 0, 0.1" in capsys.readouterr().out
    assert main(["bench", *args, "--wd-grid", "adamw=0,0.1"]) == 0
    recs = _records(out)
    assert sorted((r["config"]["optimizer"], r["config"]["lr"], r["config"]["weight_decay"]) for r in recs) == [
        ("adamw", 1e-3, 0.0), ("adamw", 1e-3, 0.1), ("adamw", 1e-2, 0.0), ("adamw", 1e-2, 0.1),
        ("sgd", 1e-3, 0.0), ("sgd", 1e-2, 0.0)]
    md = (out / "report.md").read_text()
    assert "best WD" in md and "Best cell per optimizer and task" in md
    assert "--wd-grid adamw=0,0.1" in md  # the command line
    assert (out / "lr_wd_mlp.png").is_file()
    # The fixed-WD bench in the same folder resumes its cells (adamw at 0.1 is a cell of the 2-D grid).
    assert main(["bench", *args, "--weight-decay", "adamw=0.1"]) == 0
    assert json.loads((out / "bench.json").read_text())["invocations"][-1]["runs_executed"] == 0
    # Bare --wd-grid: every optimizer's default grid.
    assert main(["bench", *args, "--wd-grid", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "weight decays 0, 0.01, 0.1, 1" in text and "weight decays 0, 0.0001, 0.001, 0.01" in text


def test_report_only_and_dry_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*TINY, "--tasks", "mlp", "--optimizers", "sgd", "--lrs", "1e-2", "--out", str(out)]
    assert main(["bench", *args, "--dry-run"]) == 0
    assert not (out / "results.jsonl").exists()
    assert "1 runs" in capsys.readouterr().out
    assert main(["bench", *args, "--report-only"]) == 2
    assert "--report-only" in capsys.readouterr().err
    assert main(["bench", *args]) == 0
    (out / "report.md").unlink()
    assert main(["bench", *args, "--report-only"]) == 0
    assert (out / "report.md").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--tasks", "nope"], "--tasks: unknown task 'nope'"),
    (["--optimizers", "lion"], "--optimizers: unknown optimizer 'lion'"),
    (["--lrs", "abc"], "--lrs"),
    (["--lr-grid", "adamw=1:2"], "--lr-grid adamw"),
    (["--lr-grid", "sgd=0.1"], "--lr-grid: 'sgd' is not one of the selected"),
    (["--seeds", "x"], "--seeds"),
    (["--theta", "p=/nonexistent/theta.state", "--optimizers", "celo2"], "--theta"),
    (["--data-dir", "/nonexistent-celo2-data"], "/nonexistent-celo2-data"),
    (["--wd-grid", "adamw=0,-1"], "--wd-grid adamw: weight decays must be >= 0"),
    (["--wd-grid", "sgd=0,1e-3"], "--wd-grid: 'sgd' is not one of the selected"),
    (["--wd-grid", "adamw=0", "--wd-grid", "adamw=1"], "--wd-grid: 'adamw' given twice"),
    (["--wd-grid", "adamw=0,1", "--weight-decay", "adamw=0.1"], "give one of them"),
    (["--adam-lr-mult", "1"], "--adam-lr-mult: sets Celo2's AdamW branch, but no celo2 optimizer"),
])
def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys, flags, needle):
    args = ["bench", *TINY, "--tasks", "mlp", "--optimizers", "adamw", "--out", str(tmp_path / "r"), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err, err


@pytest.mark.parametrize("flags,needle", [
    (["--suite", "huge"], "--suite"),
    (["--lr-grid", "adamw"], "--lr-grid"),
    (["--weight-decay", "x=abc"], "--weight-decay"),
    (["--wd-grid", "=0,1"], "--wd-grid"),
    (["--steps", "0"], "argument --steps: must be a positive integer"),
    (["--jobs", "-1"], "argument --jobs"),
])
def test_argparse_level_errors(capsys, flags, needle):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *flags])
    assert exc.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.fixture
def theta_paths(tmp_path):
    import celo2

    paths = [tmp_path / "one.npz", tmp_path / "two.npz"]
    celo2.save_theta(celo2.Theta.init(seed=1), paths[0])
    celo2.save_theta(celo2.Theta.init(seed=2), paths[1])
    return paths
