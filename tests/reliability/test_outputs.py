"""Nothing a user owns is overwritten: non-regular output paths, run folders that are not the command's own.

The commands run in subprocesses (``celo2_cli``): a command that replaced a FIFO or a device node, or
wrote into a user's folder, is seen from outside as it would be by the user.
"""

from __future__ import annotations

import json
import os
import stat

import pytest

import celo2
from celo2._io import atomic_write_bytes, check_replaceable
from celo2._runlock import LOCK_NAME, MARKER_NAME, RunFolderError, RunLock, check_owner, run_folder_kind


def _kind_of(path) -> str:
    mode = os.lstat(path).st_mode
    for test, name in ((stat.S_ISLNK, "link"), (stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "chardev"),
                       (stat.S_ISREG, "file")):
        if test(mode):
            return name
    return "other"


def _make(kind: str, path, tmp_path) -> str:
    """A non-regular file of ``kind`` at ``path``; returns the word the refusal must use."""
    if kind == "fifo":
        os.mkfifo(path)
        return "FIFO"
    if kind == "link":
        target = tmp_path / "link-target.txt"
        target.write_text("the user's file")
        os.symlink(target, path)
        return "symbolic link"
    try:  # a null device of our own, not /dev/null: the test must not risk the system's
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    return "character device"


NON_REGULAR = ["fifo", "link", "chardev"]


@pytest.mark.parametrize("kind", NON_REGULAR)
def test_atomic_write_refuses_a_non_regular_target(tmp_path, kind):
    path = tmp_path / "out.bin"
    word = _make(kind, path, tmp_path)
    with pytest.raises(FileExistsError) as exc:
        atomic_write_bytes(path, b"new")
    assert exc.value.filename == str(path) and word in exc.value.strerror
    assert _kind_of(path) == kind
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


@pytest.mark.parametrize("kind", NON_REGULAR)
def test_theta_convert_refuses_a_non_regular_destination(tmp_path, celo2_cli, kind):
    src = tmp_path / "src.state"
    celo2.save_theta(celo2.Theta.init(0), src)
    dest = tmp_path / "dest.state"
    word = _make(kind, dest, tmp_path)
    r = celo2_cli("theta", "convert", str(src), str(dest), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert str(dest) in r.stderr and word in r.stderr, r.stderr
    assert _kind_of(dest) == kind
    if kind == "link":
        assert (tmp_path / "link-target.txt").read_text() == "the user's file"


@pytest.mark.parametrize("kind", NON_REGULAR)
def test_meta_train_plot_refuses_a_non_regular_output(tmp_path, celo2_cli, kind):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"iteration": i, "meta_loss": 1.0 / i, "grad_norm": 0.1} for i in range(1, 6)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dest = tmp_path / "curve.png"
    word = _make(kind, dest, tmp_path)
    r = celo2_cli("meta-train", "plot", str(run), "--output", str(dest), cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert str(dest) in r.stderr and word in r.stderr, r.stderr
    assert _kind_of(dest) == kind


def test_a_regular_file_and_a_missing_path_are_still_written(tmp_path):
    assert check_replaceable(tmp_path / "missing") == 0o666 & ~_umask()
    (tmp_path / "old").write_text("old")
    atomic_write_bytes(tmp_path / "old", b"new")
    assert (tmp_path / "old").read_bytes() == b"new"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- run folders -----------------------------------------------------------------------------------

BENCH = ["bench", "--suite", "smoke", "--steps", "2", "--tasks", "mlp", "--optimizers", "adamw", "--lrs", "1e-3",
         "--no-progress", "--jobs", "1", "--out"]


def _users_folder(path, files: dict[str, bytes]) -> dict[str, bytes]:
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def _unchanged(path, files: dict[str, bytes]) -> None:
    assert sorted(os.listdir(path)) == sorted(files), sorted(os.listdir(path))  # no lock, no marker, nothing
    for name, data in files.items():
        assert (path / name).read_bytes() == data, name


@pytest.mark.parametrize("argv,files", [
    (["demo", "--quick", "--no-progress", "--out"],
     {"results.json": b'{"mine": 1}', "table.txt": b"my table\n", "loss_curves.png": b"my picture"}),
    (BENCH, {"results.jsonl": b'{"a": 1}\n{"b": 2}', "report.md": b"# my report\n",
             "environment.json": b"{}", "results.csv": b"x,y\n"}),
    (["meta-train", "--preset", "smoke", "--no-progress", "--resume", "--out"],
     {"theta.state": b"my theta", "metadata.json": b'{"mine": true}'}),
], ids=["demo", "bench", "meta-train-resume"])
def test_a_folder_of_the_users_files_is_refused_and_left_alone(tmp_path, celo2_cli, argv, files):
    out = tmp_path / "mine"
    _users_folder(out, files)
    r = celo2_cli(*argv, str(out), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert f"--out {out}: holds files that celo2 {argv[0]} did not write" in r.stderr, r.stderr
    _unchanged(out, files)


def test_another_commands_run_folder_is_refused(tmp_path, celo2_cli):
    out = tmp_path / "demo-run"
    out.mkdir()
    (out / MARKER_NAME).write_text(json.dumps({"command": "demo"}))
    (out / "results.json").write_text("{}")
    r = celo2_cli(*BENCH, str(out), cwd=tmp_path)
    assert r.returncode == 2 and "is a celo2 demo run folder, not a bench one" in r.stderr, r.stderr
    assert sorted(os.listdir(out)) == [MARKER_NAME, "results.json"]


def test_a_command_reuses_the_folder_it_made(tmp_path, celo2_cli):
    out = tmp_path / "bench"
    for _ in range(2):
        r = celo2_cli(*BENCH, str(out), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    assert run_folder_kind(out) == "bench"
    invocations = json.loads((out / "bench.json").read_text())["invocations"]
    assert [i["runs_executed"] for i in invocations] == [1, 0]


def test_markers_and_earlier_versions_folders(tmp_path):
    from celo2.cli.demo import is_earlier_demo_folder
    from celo2.eval.bench import is_earlier_bench_folder
    from celo2.metatrain.run_folder import is_legacy_run

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / LOCK_NAME).write_text("")  # an earlier version left its lock file: still empty
    assert check_owner(empty, "bench") is True
    bench = tmp_path / "old-bench"
    bench.mkdir()
    (bench / "bench.json").write_text(json.dumps({"invocations": []}))
    assert check_owner(bench, "bench", is_earlier_bench_folder) is True
    with pytest.raises(RunFolderError, match="did not write"):
        check_owner(bench, "demo", is_earlier_demo_folder)
    killed = tmp_path / "killed-bench"  # killed before its first report: results only
    killed.mkdir()
    (killed / "results.jsonl").write_text(json.dumps({"key": "k", "config": {"protocol": "celo2-bench-v1"}}) + "\n")
    assert is_earlier_bench_folder(killed) and not is_earlier_bench_folder(empty)
    run = tmp_path / "old-run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert not is_legacy_run(run)
    (run / "checkpoint" / "trainer.npz").write_bytes(b"x")
    assert is_legacy_run(run)
    with RunLock(run, kind="meta-train", adopt=is_legacy_run):
        pass
    assert run_folder_kind(run) == "meta-train"
    assert check_owner(run, "meta-train") is False


def test_a_folder_made_and_left_empty_is_removed_with_its_marker(tmp_path):
    with RunLock(tmp_path / "new", kind="demo"):
        assert run_folder_kind(tmp_path / "new") == "demo"
    assert not (tmp_path / "new").exists()


def test_bench_keeps_a_partial_last_line(tmp_path):
    from celo2.eval.runner import ResultStore

    store = ResultStore(tmp_path)
    store.path.write_bytes(b'{"key": "a", "config": {}}\n{"key": "b", "conf')
    store.append({"key": "c", "config": {"task": "mlp"}})
    assert store.path.read_bytes().splitlines()[:1] == [b'{"key": "a", "config": {}}']
    assert store.rejected_path.read_bytes() == b'{"key": "b", "conf\n'
    assert set(store.load()) == {"a", "c"}
