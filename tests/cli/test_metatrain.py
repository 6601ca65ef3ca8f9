"""``celo2 meta-train``: flags, presets, clear errors, a smoke run with resume, ``plot``."""

import json

import pytest

from celo2.cli.main import main


def _run(capsys, *argv):
    code = main(["meta-train", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_print_config_shows_the_full_preset(capsys):
    code, out, _ = _run(capsys, "--preset", "cpu", "--print-config", "--set", "pairs_per_task=3", "--seed", "5")
    assert code == 0
    cfg = json.loads(out)
    assert cfg["preset"] == "cpu" and cfg["pairs_per_task"] == 3 and cfg["seed"] == 5
    assert cfg["tasks"] == ["mnist", "fashion-mnist", "digits", "synthetic"]
    assert {"perturbation_std", "truncation_length", "outer_lr", "augmentation"} <= set(cfg)


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "nope"], "--preset 'nope'"),
    (["--set", "bogus=1"], "bogus"),
    (["--set", "augmentation=layer"], "augmentation='layer'"),
    (["--set", "pairs_per_task"], "expected key=value"),
    (["--resume"], "--resume needs --out"),
    (["frobnicate"], "unknown action 'frobnicate'"),
    (["plot"], "usage: celo2 meta-train plot RUN_DIR"),
    (["--tasks", "digits,imagenet", "--print-config"], "unknown task family 'imagenet'"),
])
def test_bad_input_gives_a_one_line_error(capsys, argv, needle):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert needle in err and "Traceback" not in err


def test_unknown_task_and_missing_data_are_named(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("CELO2_DATA_DIR", raising=False)
    code, _, err = _run(capsys, "--preset", "smoke", "--tasks", "digits,imagenet", "--out", str(tmp_path / "a"))
    assert code == 2 and "unknown task family 'imagenet'" in err
    code, _, err = _run(capsys, "--preset", "smoke", "--tasks", "mnist", "--out", str(tmp_path / "b"))
    assert code == 2 and "'mnist'" in err and "--data-dir" in err
    code, _, err = _run(capsys, "--preset", "smoke", "--tasks", "mnist", "--data-dir", str(tmp_path / "nowhere"),
                        "--out", str(tmp_path / "c"))
    assert code == 2 and "nowhere" in err


def test_smoke_run_resume_and_plot(capsys, tmp_path):
    out = tmp_path / "run"
    # iterations and checkpoint_every are not compiled in: this reuses test_trainer's executable.
    code, stdout, err = _run(capsys, "--preset", "smoke", "--iterations", "2", "--checkpoint-every", "2",
                             "--out", str(out), "--no-progress")
    assert code == 0, err
    assert stdout.strip().endswith("theta.state") and (out / "theta.state").exists()
    assert '"preset": "smoke"' in err  # the full config is printed at start
    code, _, err = _run(capsys, "--preset", "smoke", "--out", str(out))
    assert code == 2 and "--resume" in err
    code, _, err = _run(capsys, "--out", str(out), "--resume", "--set", "pairs_per_task=3", "--no-progress")
    assert code == 2 and "pairs_per_task" in err
    code, _, err = _run(capsys, "--out", str(out), "--resume", "--iterations", "4", "--no-progress")
    assert code == 0, err
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    code, stdout, err = _run(capsys, "plot", str(out))
    assert code == 0, err
    png = out / "meta_loss.png"
    assert stdout.strip() == str(png) and png.read_bytes()[:4] == b"\x89PNG"


def test_plot_reports_a_folder_that_is_not_a_run(capsys, tmp_path):
    code, _, err = _run(capsys, "plot", str(tmp_path / "missing"))
    assert code == 2 and "missing" in err
    code, _, err = _run(capsys, "plot", str(tmp_path))
    assert code == 2 and "no metrics" in err


def test_plot_reads_csv_metrics(capsys, tmp_path):
    rows = "iteration,meta_loss,grad_norm,inner_steps_per_s,wall_time_s,resets,nonfinite_losses\n"
    rows += "".join(f"{i},{2.3 - 0.01 * i},1.0,5000,{i},0,0\n" for i in range(1, 60))
    (tmp_path / "metrics.csv").write_text(rows)
    code, _, err = _run(capsys, "plot", str(tmp_path), "--output", str(tmp_path / "x.png"))
    assert code == 0, err
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def _csv_run(folder, slope: float):
    folder.mkdir()
    rows = "iteration,meta_loss,grad_norm,inner_steps_per_s,wall_time_s,resets,nonfinite_losses\n"
    rows += "".join(f"{i},{2.3 - slope * i},1.0,5000,{i},0,0\n" for i in range(1, 120))
    (folder / "metrics.csv").write_text(rows)
    return folder


def test_plot_draws_several_runs_on_one_axis_and_names_what_is_wrong(capsys, tmp_path):
    a, b = _csv_run(tmp_path / "a", 0.01), _csv_run(tmp_path / "b", 0.005)
    png = tmp_path / "both.png"
    code, stdout, err = _run(capsys, "plot", str(a), f"slow={b}", "--output", str(png))
    assert code == 0, err
    assert stdout.strip() == str(png) and png.read_bytes()[:4] == b"\x89PNG"
    one = tmp_path / "one.png"
    assert _run(capsys, "plot", str(a), "--output", str(one))[0] == 0
    assert png.read_bytes() != one.read_bytes()  # the second curve is drawn
    code, _, err = _run(capsys, "plot", str(a), str(b))
    assert code == 2 and "give --output PNG" in err and not (a / "meta_loss.png").exists()
    code, _, err = _run(capsys, "plot", f"x={a}", f"x={b}", "--output", str(png))
    assert code == 2 and "repeated label in 'x=" in err
    code, _, err = _run(capsys, "plot", str(a), "x=", "--output", str(png))
    assert code == 2 and "plot 'x=': expected LABEL=RUN_DIR" in err
    code, stdout, err = _run(capsys, "plot", str(a), f"b=c={b}", "--output", str(tmp_path / "eq.png"))
    assert code == 2 and "c=" in err  # the label ends at the first '=': the folder 'c=...' does not exist
    code, _, err = _run(capsys, "plot", str(a), f"gone={tmp_path / 'missing'}", "--output", str(tmp_path / "g.png"))
    assert code == 2 and "missing" in err and not (tmp_path / "g.png").exists()
