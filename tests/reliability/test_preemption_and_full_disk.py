"""SIGTERM in ``celo2 bench`` and a full disk in ``celo2 bench | demo``: the work done is kept, one line says
what happened (naming the file), and the exit status says how it ended (143 SIGTERM, 2 a write error)."""

from __future__ import annotations

import errno
import json
import os
import shlex
import signal
import time

import pytest

from celo2.cli.main import main

BENCH = ["bench", "--suite", "smoke", "--tasks", "mlp", "--optimizers", "adamw", "--no-progress", "--jobs", "1"]


def _records(path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_sigterm_stops_a_bench_keeping_finished_runs_and_saying_how_to_resume(tmp_path, celo2_child, celo2_cli):
    out = tmp_path / "bench"
    argv = [*BENCH, "--steps", "150", "--lrs", "1e-4,3e-4,1e-3,3e-3,1e-2,3e-2", "--out", str(out)]
    child = celo2_child(*argv, cwd=tmp_path)
    results = out / "results.jsonl"
    end = time.monotonic() + 120
    while not (results.exists() and results.read_text().count("\n") >= 1) and child.proc.poll() is None:
        assert time.monotonic() < end, "no run finished in 120 s"
        time.sleep(0.02)
    child.proc.send_signal(signal.SIGTERM)
    r = child.finish()
    assert r.returncode == 143, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    line = [l for l in r.stderr.splitlines() if "resume with: " in l]
    assert len(line) == 1 and "interrupted by SIGTERM" in line[0] and str(results) in line[0], r.stderr
    kept = len(_records(results))
    assert 1 <= kept < 6
    command = shlex.split(line[0].split("resume with: ", 1)[1])
    assert command[:2] == ["celo2", "bench"]
    r = celo2_cli(*command[1:], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(_records(results)) == 6
    assert json.loads((out / "bench.json").read_text())["invocations"][-1]["runs_executed"] == 6 - kept


def _full_disk_for(monkeypatch, name_prefix: str) -> None:
    """``os.fsync`` fails with ENOSPC (naming no file, as the kernel reports it) for files named ``name_prefix*``."""
    real = os.fsync

    def fsync(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(name_prefix):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def test_a_full_disk_in_a_bench_names_the_file_and_keeps_the_results(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    args = [*BENCH, "--steps", "2", "--out", str(out)]
    assert main([*args, "--lrs", "1e-3"]) == 0
    before = (out / "results.jsonl").read_bytes()
    report = (out / "report.md").read_bytes()
    capsys.readouterr()
    _full_disk_for(monkeypatch, "results.jsonl")
    assert main([*args, "--lrs", "1e-3,1e-2"]) == 2
    line = _one_line(capsys)
    assert line == f"celo2 bench: error: {out / 'results.jsonl'}: No space left on device", line
    assert (out / "results.jsonl").read_bytes().startswith(before)
    assert (out / "report.md").read_bytes() == report
    monkeypatch.undo()
    _full_disk_for(monkeypatch, ".report.md.")
    assert main([*args, "--lrs", "1e-3"]) == 2
    assert _one_line(capsys) == f"celo2 bench: error: {out / 'report.md'}: No space left on device"
    assert (out / "report.md").read_bytes() == report
    assert not list(out.glob(".*.tmp"))


def test_a_full_disk_in_the_demo_names_the_file_and_keeps_the_previous_outputs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--no-progress", "--steps", "5", "--out", str(out)]
    assert main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _full_disk_for(monkeypatch, ".results.json.")
    assert main([*argv, "--seed", "1"]) == 2
    assert _one_line(capsys) == f"celo2 demo: error: {out / 'results.json'}: No space left on device"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # all three outputs, or none


@pytest.mark.parametrize("errno_code", [errno.ENOSPC, errno.EDQUOT, errno.EIO])
def test_atomic_write_names_the_file_on_any_os_error(tmp_path, monkeypatch, errno_code):
    from celo2._io import atomic_write_bytes

    path = tmp_path / "theta.state"
    path.write_bytes(b"old")

    def fail(fd):
        raise OSError(errno_code, os.strerror(errno_code))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError) as exc:
        atomic_write_bytes(path, b"new")
    assert exc.value.errno == errno_code and exc.value.filename == str(path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["theta.state"]
