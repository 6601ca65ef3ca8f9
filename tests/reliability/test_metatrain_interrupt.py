"""Ctrl-C and damaged files in ``celo2 meta-train``, each run in a subprocess (a crash fails the test).

The smoke preset of ``tests/cli/test_metatrain.py``; the children share a JAX
compilation cache, so only the first one (the one interrupted while it
compiles) pays the full compile.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

import celo2

ITERATIONS = 150
EVERY = 50
TRAIN = ("meta-train", "--preset", "smoke", "--iterations", str(ITERATIONS), "--checkpoint-every", str(EVERY),
         "--no-progress")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("interrupt")


@pytest.fixture(scope="module")
def env(work, env_with):
    cache = work / "jax-cache"
    return env_with(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                     JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


_REFERENCE: dict[str, np.ndarray] = {}


def _reference(celo2_cli, work: Path, env) -> np.ndarray:
    """Theta of the uninterrupted run of the same length (computed once, after the cache is warm)."""
    if "theta" not in _REFERENCE:
        r = celo2_cli(*TRAIN, "--out", "reference", cwd=work, env=env)
        assert r.returncode == 0, r.stderr
        _REFERENCE["theta"] = celo2.load_theta(work / "reference" / "theta.state").to_flat()
    return _REFERENCE["theta"]


def _interrupt(child) -> tuple[str, list[str]]:
    child.proc.send_signal(signal.SIGINT)
    r = child.finish()
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and "Fatal Python error" not in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if "resume with: " in l]
    assert len(lines) == 1, r.stderr
    return r.stderr, shlex.split(lines[0].split("resume with: ", 1)[1])


def _resume(celo2_cli, work: Path, env, command: list[str]) -> str:
    assert command[:2] == ["celo2", "meta-train"] and "--resume" in command
    r = celo2_cli(*command[1:], cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    return r.stderr


def test_ctrl_c_while_compiling_exits_cleanly_and_resumes_to_the_same_theta(work, env, celo2_child, celo2_cli):
    child = celo2_child(*TRAIN, "--out", "during-compile", cwd=work, env=env)
    child.wait_for("compiling the iteration")
    time.sleep(1.0)  # into the compile, which takes XLA several seconds (the cache is empty yet)
    err, command = _interrupt(child)
    assert "compiled the iteration" in err  # the compile was let finish, not torn down
    assert "no checkpoint yet" in err
    _resume(celo2_cli, work, env, command)
    got = celo2.load_theta(work / "during-compile" / "theta.state").to_flat()
    np.testing.assert_array_equal(got, _reference(celo2_cli, work, env))


def test_ctrl_c_mid_run_saves_a_checkpoint_and_resumes_to_the_same_theta(work, env, celo2_child, celo2_cli):
    run = work / "mid-run"
    child = celo2_child(*TRAIN, "--out", str(run), cwd=work, env=env)
    child.wait_for("compiled the iteration")
    first = run / "thetas" / f"theta-{EVERY:06d}.state"  # the first checkpoint: the run is under way
    end = time.monotonic() + 60
    while not first.exists() and child.proc.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    _, command = _interrupt(child)
    with np.load(run / "checkpoint" / "trainer.npz") as npz:
        saved_at = json.loads(str(npz["__meta__"]))["iteration"]
    assert 0 < saved_at < ITERATIONS
    err = _resume(celo2_cli, work, env, command)
    assert f"from iteration {saved_at}" in err
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))
    np.testing.assert_array_equal(celo2.load_theta(run / "theta.state").to_flat(), _reference(celo2_cli, work, env))


def test_damaged_checkpoint_and_metrics_fall_back_with_warnings(work, env, celo2_cli):
    reference = _reference(celo2_cli, work, env)
    run = work / "damaged"
    shutil.copytree(work / "reference", run)
    ckpt = run / "checkpoint"
    assert (ckpt / "trainer.prev.npz").is_file()
    (ckpt / "trainer.npz").write_bytes(b"PK\x03\x04 torn by a full disk")
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines.insert(4, "%%% not json %%%")
    path.write_text("\n".join(lines) + "\n")
    (run / "theta.state").unlink()

    r = celo2_cli("meta-train", "--out", str(run), "--resume", "--no-progress", cwd=work, env=env)
    assert r.returncode == 0, r.stderr
    warning = [l for l in r.stderr.splitlines() if "falling back to" in l]
    assert len(warning) == 1 and str(ckpt / "trainer.npz") in warning[0], r.stderr
    assert f"{ckpt / 'trainer.prev.npz'} (iteration {ITERATIONS - EVERY})" in warning[0]
    assert f"warning: {path}:5: not a metrics row" in r.stderr, r.stderr
    assert "not json" in (run / "metrics.rejected.txt").read_text()
    rows = [json.loads(l) for l in path.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(1, ITERATIONS + 1))
    np.testing.assert_array_equal(celo2.load_theta(run / "theta.state").to_flat(), reference)



def test_no_usable_checkpoint_is_one_line_and_exit_2(work, capsys):
    """In-process (no computation happens: the checkpoints are read before anything is compiled)."""
    from celo2.cli.main import main

    run = work / "unusable"
    (run / "checkpoint").mkdir(parents=True)
    from celo2.metatrain import preset

    (run / "config.json").write_text(preset("smoke", iterations=ITERATIONS, checkpoint_every=EVERY).to_json())
    (run / "checkpoint" / "trainer.prev.npz").write_bytes(b"garbage")
    (run / "checkpoint" / "trainer.npz").write_bytes(b"garbage too")
    code = main(["meta-train", "--out", str(run), "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("celo2 meta-train: error: no usable checkpoint"), err
    assert "trainer.npz" in line and "trainer.prev.npz" in line
    assert (run / "checkpoint" / "trainer.npz").read_bytes() == b"garbage too"


def test_sigterm_mid_run_saves_a_checkpoint_exits_143_and_resumes_to_the_same_theta(work, env, celo2_child,
                                                                                    celo2_cli):
    """SIGTERM (a preemption) is handled as Ctrl-C: a checkpoint at the iteration reached, the resume command."""
    run = work / "sigterm"
    child = celo2_child(*TRAIN, "--out", str(run), cwd=work, env=env)
    child.wait_for("compiled the iteration")
    first = run / "thetas" / f"theta-{EVERY:06d}.state"
    end = time.monotonic() + 60
    while not first.exists() and child.proc.poll() is None and time.monotonic() < end:
        time.sleep(0.01)
    child.proc.send_signal(signal.SIGTERM)
    r = child.finish()
    assert r.returncode == 143, r.stderr
    assert "Traceback" not in r.stderr and "interrupted by SIGTERM" in r.stderr, r.stderr
    lines = [l for l in r.stderr.splitlines() if "resume with: " in l]
    assert len(lines) == 1, r.stderr
    with np.load(run / "checkpoint" / "trainer.npz") as npz:
        saved_at = json.loads(str(npz["__meta__"]))["iteration"]
    assert EVERY <= saved_at < ITERATIONS
    err = _resume(celo2_cli, work, env, shlex.split(lines[0].split("resume with: ", 1)[1]))
    assert f"from iteration {saved_at}" in err
    np.testing.assert_array_equal(celo2.load_theta(run / "theta.state").to_flat(), _reference(celo2_cli, work, env))


#: ``celo2 meta-train`` with ``os.fsync`` failing with ENOSPC (no file named, as the kernel reports it) the
#: second time a checkpoint's ``trainer.npz`` is flushed: a disk that fills up between two checkpoints.
_FULL_DISK = """
import errno, os, sys
from celo2.cli.main import main

real_fsync, seen = os.fsync, []

def fsync(fd):
    if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".trainer.npz."):
        seen.append(fd)
        if len(seen) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)

os.fsync = fsync
sys.exit(main(sys.argv[1:]))
"""


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_the_previous_checkpoint_whole(work, env):
    import subprocess
    import sys

    run = work / "full-disk"
    argv = ["meta-train", "--preset", "smoke", "--iterations", "4", "--checkpoint-every", "2", "--no-progress",
            "--out", str(run)]
    p = subprocess.run([sys.executable, "-c", _FULL_DISK, *argv], cwd=work, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert line.startswith(f"celo2 meta-train: error: {run / 'checkpoint' / 'trainer.npz'}: No space left on device"), line
    assert "resume with: " in line
    ckpt = run / "checkpoint"
    with np.load(ckpt / "trainer.npz") as npz:
        assert json.loads(str(npz["__meta__"]))["iteration"] == 2
    # theta.state is the checkpoint's theta (iteration 2), not the one the failed write was for.
    assert (ckpt / "theta.state").read_bytes() == (run / "thetas" / "theta-000002.state").read_bytes()
    assert sorted(p.name for p in (run / "thetas").iterdir()) == ["theta-000002.state"]
    assert not [p for p in run.rglob(".*.tmp")]
    r = subprocess.run([sys.executable, "-m", "celo2", *shlex.split(line.split("resume with: ", 1)[1])[1:]],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "from iteration 2" in r.stderr, r.stderr[-3000:]
