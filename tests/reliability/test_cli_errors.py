"""Every class of user error in ``celo2 demo | bench | meta-train``: one line on stderr, exit 2, no traceback.

Each case runs ``python -m celo2`` in its own subprocess; the subprocesses run
side by side (most of their time is importing PyTorch or JAX).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = ["bench", "--suite", "smoke", "--steps", "1", "--tasks", "mlp", "--optimizers", "adamw", "--lrs", "1e-3",
         "--no-progress", "--jobs", "1"]
SMOKE = ["meta-train", "--preset", "smoke", "--iterations", "2", "--no-progress"]
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _unwritable(tmp: Path) -> Path | None:
    """A folder this process cannot create anything in (root ignores permission bits: use /sys)."""
    if os.geteuid() != 0:
        locked = tmp / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        return locked
    probe = Path("/sys/celo2-reliability-probe")
    try:
        probe.mkdir()
    except OSError:
        return Path("/sys")
    probe.rmdir()
    return None


#: case -> (argv with {tmp} for the work folder, text the one line must contain)
CASES = {
    "bench-corrupt-idx": ([*BENCH, "--data-dir", "{tmp}/data", "--out", "{tmp}/b1"],
                          "{tmp}/data/fashion-mnist/train-images-idx3-ubyte: truncated IDX header"),
    "bench-out-under-a-file": ([*BENCH, "--out", "{tmp}/afile/run"], "--out {tmp}/afile/run: cannot create"),
    "bench-out-is-a-file": ([*BENCH, "--out", "{tmp}/afile"], "is a file, not a folder"),
    "bench-out-unwritable": ([*BENCH, "--out", "{unwritable}/run"], "--out {unwritable}/run: cannot create"),
    "bench-data-dir-is-a-file": ([*BENCH, "--data-dir", "{tmp}/afile", "--out", "{tmp}/b2"], "not a folder"),
    "bench-steps-zero": ([*BENCH, "--steps", "0"], "argument --steps: must be a positive integer"),
    "demo-negative-lr": (["demo", "--quick", "--celo2-lr", "-1"], "argument --celo2-lr: must be a positive"),
    "demo-steps-zero": (["demo", "--quick", "--steps", "0"], "argument --steps: must be a positive integer"),
    "demo-out-under-a-file": (["demo", "--quick", "--no-progress", "--out", "{tmp}/afile/x"],
                              "--out {tmp}/afile/x: cannot create"),
    "demo-corrupt-idx": (["demo", "--quick", "--no-progress", "--dataset", "fashion-mnist", "--data-dir",
                          "{tmp}/data", "--out", "{tmp}/d1"], "truncated IDX header"),
    "meta-train-out-under-a-file": ([*SMOKE, "--out", "{tmp}/afile/m"], "{tmp}/afile/m: cannot create"),
    "meta-train-iterations-zero": ([*SMOKE, "--iterations", "0"], "argument --iterations: must be a positive"),
    "meta-train-corrupt-checkpoint": (["meta-train", "--out", "{tmp}/m-corrupt", "--resume", "--no-progress"],
                                      "{tmp}/m-corrupt/checkpoint: {tmp}/m-corrupt/checkpoint/trainer.npz: not a "
                                      "readable meta-training checkpoint"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory, env_with):
    """Every case's (returncode, stderr, stdout), run side by side."""
    from celo2.metatrain import preset

    tmp = tmp_path_factory.mktemp("cli-errors")
    (tmp / "afile").write_text("a file, not a folder")
    data = tmp / "data" / "fashion-mnist"
    data.mkdir(parents=True)
    for name in IDX_FILES:
        (data / name).write_bytes(b"\x00\x00\x08\x03junk")  # IDX magic, then a header cut short
    run = tmp / "m-corrupt"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.json").write_text(preset("smoke", iterations=2).to_json())
    (run / "checkpoint" / "trainer.npz").write_bytes(b"PK\x03\x04 torn")
    unwritable = _unwritable(tmp)
    procs = {}
    for case, (argv, _) in CASES.items():
        if "{unwritable}" in " ".join(argv) and unwritable is None:
            continue
        argv = [a.format(tmp=tmp, unwritable=unwritable) for a in argv]
        procs[case] = subprocess.Popen([sys.executable, "-m", "celo2", *argv], cwd=tmp, env=env_with(),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for case, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[case] = (p.returncode, stderr, stdout)
    return tmp, unwritable, out


@pytest.mark.parametrize("case", list(CASES))
def test_user_error_is_one_line_and_exit_2(results, case):
    tmp, unwritable, out = results
    if case not in out:
        pytest.skip("no folder here that this process cannot write to")
    code, stderr, _ = out[case]
    assert code >= 0, f"crashed with signal {-code}:\n{stderr}"
    assert "Traceback" not in stderr, stderr
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    command = CASES[case][0][0]
    assert lines[0].startswith(f"celo2 {command}: "), stderr
    needle = CASES[case][1].format(tmp=tmp, unwritable=unwritable)
    assert needle in lines[0], stderr


def test_a_programming_error_keeps_its_traceback(monkeypatch, capsys):
    """The top-level handler takes only the project's user errors; a bug is not hidden."""
    from celo2.cli import main as cli_main

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli_main, "build_parser", lambda only=None: _parser_with(broken))
    with pytest.raises(ZeroDivisionError):
        cli_main.main(["x"])


def _parser_with(func):
    from celo2.cli.main import OneLineParser

    parser = OneLineParser(prog="celo2")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("x").set_defaults(func=func)
    return parser
