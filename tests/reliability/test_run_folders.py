"""Run-folder locks, stale temporary files and the permissions of atomic writes."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from celo2._io import atomic_write_bytes, atomic_write_text, remove_stale_temps
from celo2._runlock import LOCK_NAME, RunFolderError, RunFolderLockedError, RunLock

HOLD = """
import sys, time
from celo2._runlock import RunLock
lock = RunLock(sys.argv[1])
print("held", flush=True)
time.sleep(60)
"""


@pytest.fixture
def holder(tmp_path, env_with):
    """A second process holding the lock of ``tmp_path / 'run'``."""
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=env_with(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    yield run, p
    p.kill()
    p.wait()


def test_second_process_is_refused_naming_the_holder(holder):
    run, p = holder
    with pytest.raises(RunFolderLockedError) as exc:
        RunLock(run)
    msg = str(exc.value)
    assert f"pid {p.pid}" in msg and os.uname().nodename in msg and "started 20" in msg and "-c" in msg


@pytest.mark.parametrize("argv", [
    ["bench", "--suite", "smoke", "--steps", "1", "--tasks", "mlp", "--optimizers", "adamw", "--lrs", "1e-3",
     "--no-progress", "--out"],
    ["demo", "--quick", "--no-progress", "--out"],
    ["meta-train", "--preset", "smoke", "--iterations", "2", "--no-progress", "--out"],
])
def test_cli_on_a_folder_in_use_stops_at_once(holder, celo2_cli, tmp_path, argv):
    run, p = holder
    r = celo2_cli(*argv, str(run), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and f"in use by another process (pid {p.pid}" in r.stderr, r.stderr
    assert sorted(os.listdir(run)) == [LOCK_NAME]  # nothing written by the refused process


def test_stale_lock_is_taken_over_with_a_message(tmp_path, env_with):
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=env_with(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    p.kill()  # SIGKILL: no cleanup; the kernel drops the flock, the record stays
    p.wait()
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == p.pid
    (run / "metrics.jsonl").write_text("")  # the folder holds a run, so it is kept
    messages = []
    with RunLock(run, log=messages.append) as lock:
        assert lock.held and json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(messages) == 1 and "taking over" in messages[0] and f"pid {p.pid}" in messages[0]
    assert (run / LOCK_NAME).read_text() == ""  # released: no record left to look stale
    with RunLock(run, log=messages.append):
        pass
    assert len(messages) == 1


def test_stale_temp_files_are_removed_when_the_folder_is_opened(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    stale = [run / ".metrics.jsonl.abcd_123.tmp", run / "checkpoint" / ".trainer.npz.x1Y2z3W4.tmp"]
    keep = [run / "notes.tmp", run / ".hidden", run / "checkpoint" / "trainer.npz"]
    for p in stale + keep:
        p.write_bytes(b"x")
    messages = []
    with RunLock(run, log=messages.append):
        pass
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert len(messages) == 2 and all("interrupted write" in m for m in messages)
    assert remove_stale_temps(run) == []


def test_bad_folders_are_named(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunFolderError, match="is a file, not a folder"):
        RunLock(tmp_path / "file")
    with pytest.raises(RunFolderError, match="a parent is a file"):
        RunLock(tmp_path / "file" / "run")


def test_a_folder_created_for_nothing_is_removed(tmp_path):
    with RunLock(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_new_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "a.txt", "hello")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o666 & ~mask


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    path.chmod(0o640)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_read_only_file_is_not_replaced(tmp_path):
    path = tmp_path / "theta.state"
    path.write_text("keep me")
    path.chmod(0o444)
    with pytest.raises(PermissionError) as exc:
        atomic_write_bytes(path, b"new")
    assert exc.value.filename == str(path) and "read-only" in str(exc.value)
    assert path.read_text() == "keep me" and os.listdir(tmp_path) == ["theta.state"]
