"""Every numeric setting of ``celo2 meta-train | bench | demo`` refuses non-finite and out-of-range values
when the command line is read, naming the setting; nothing runs and nothing is written."""

from __future__ import annotations

import pytest

from celo2.cli.main import main

SMOKE = ["meta-train", "--preset", "smoke", "--print-config"]
BENCH = ["bench", "--suite", "smoke", "--tasks", "mlp", "--optimizers", "celo2,adamw", "--dry-run"]


def _refused(argv: list[str], capsys) -> str:
    """Run ``celo2 ARGV``; it must end with exit 2 and one line (argparse's own errors exit through SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2, (code, captured.err)
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1, captured.err
    assert captured.out == "", captured.out  # not even the config was printed
    return captured.err


@pytest.mark.parametrize("setting", [
    "inner_lr=inf", "inner_lr=1e400", "inner_lr=nan", "inner_weight_decay=nan", "inner_weight_decay=-1",
    "adam_lr_mult=nan", "adam_lr_mult=-1", "perturbation_std=inf", "outer_lr=inf", "outer_eps=nan",
    "outer_weight_decay=inf", "outer_b1=nan", "meta_loss_clip=inf", "reparam_scale_max=inf",
    "seed=-1", f"seed={2**64}", "iterations=1e400", "batch_size=nan",
])
def test_meta_train_set_refuses_a_bad_number(setting, capsys):
    err = _refused([*SMOKE, "--set", setting], capsys)
    assert f"{setting.split('=')[0]}=" in err, err


@pytest.mark.parametrize("seed", ["-1", str(2**64), str(2**32)])
def test_meta_train_seed_flag_is_checked(seed, capsys):
    err = _refused([*SMOKE, "--seed", seed], capsys)
    assert "argument --seed" in err and "2**32 - 1" in err, err


def test_meta_train_largest_seed_is_accepted(capsys):
    assert main([*SMOKE, "--seed", str(2**32 - 1)]) == 0
    assert f'"seed": {2**32 - 1}' in capsys.readouterr().out


@pytest.mark.parametrize("flags,needle", [
    (["--adam-lr-mult", "nan"], "argument --adam-lr-mult"),
    (["--adam-lr-mult", "inf"], "argument --adam-lr-mult"),
    (["--weight-decay", "inf"], "argument --weight-decay"),
    (["--weight-decay", "adamw=nan"], "argument --weight-decay"),
    (["--weight-decay", "-1"], "argument --weight-decay"),
    (["--lrs", "1e400"], "--lrs"),
    (["--lrs", "nan,1e-3"], "--lrs"),
    (["--wd-grid", "adamw=0,inf"], "--wd-grid adamw"),
    (["--seeds", str(2**32)], "--seeds: at most"),
    (["--seeds", f"0,{2**32}"], "--seeds: seeds must be integers from 0 to"),
    (["--seeds", "0,-1"], "--seeds"),
])
def test_bench_refuses_a_bad_number(flags, needle, capsys):
    err = _refused([*BENCH, *flags], capsys)
    assert needle in err, err


@pytest.mark.parametrize("flags,needle", [
    (["--seed", "-1"], "argument --seed"),
    (["--seed", str(2**64)], "argument --seed"),
    (["--weight-decay", "nan"], "argument --weight-decay"),
    (["--celo2-lr", "inf"], "argument --celo2-lr"),
    (["--adamw-lr", "1e400"], "argument --adamw-lr"),
])
def test_demo_refuses_a_bad_number(flags, needle, tmp_path, capsys):
    err = _refused(["demo", "--quick", "--no-progress", "--out", str(tmp_path / "demo"), *flags], capsys)
    assert needle in err, err
    assert not (tmp_path / "demo").exists()
