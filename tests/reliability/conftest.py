"""Fixtures of the reliability tests: ``celo2`` in a subprocess, so that a crash (a signal) fails the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child ``celo2``: this tree's sources first, no data folder, no GPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("CELO2_DATA_DIR", None)
    env.update({"JAX_PLATFORMS": "cpu", "PYTHONFAULTHANDLER": "1", **extra})
    return env


def check_no_crash(result: Finished, what: str) -> None:
    """A negative return code is a signal (SIGSEGV, SIGABRT, ...): always a failure."""
    if result.returncode < 0:
        name = signal.Signals(-result.returncode).name
        pytest.fail(f"{what} crashed with {name}:\n{result.stderr[-3000:]}")


def run_celo2(*argv: str, cwd: Path, timeout: float = 120, env: dict | None = None) -> Finished:
    """Run ``python -m celo2 ARGV`` to the end; fails the test on a crash or a hang."""
    try:
        p = subprocess.run([sys.executable, "-m", "celo2", *argv], cwd=cwd, env=env or child_env(),
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"celo2 {' '.join(argv)} did not finish in {timeout} s:\n{exc.stderr}")
    result = Finished(p.returncode, p.stdout, p.stderr)
    check_no_crash(result, f"celo2 {' '.join(argv)}")
    return result


def _default_sigint() -> None:
    """In the child, before ``exec``: SIGINT's default action, as under a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Child:
    """A ``celo2`` subprocess whose stderr is read as it comes (to signal it at a chosen moment)."""

    def __init__(self, *argv: str, cwd: Path, env: dict | None = None):
        self.argv = argv
        # A terminal's Ctrl-C: a test run started in the background of a non-interactive shell ignores
        # SIGINT, which children inherit (and which meta-training then rightly leaves ignored). Only then
        # is the child forked with SIGINT reset (a preexec_fn rules out posix_spawn).
        ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        self.proc = subprocess.Popen([sys.executable, "-m", "celo2", *argv], cwd=cwd, env=env or child_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=_default_sigint if ignored else None)
        os.set_blocking(self.proc.stderr.fileno(), False)
        self.err = b""

    def wait_for(self, text: str, timeout: float = 120) -> None:
        """Block until ``text`` appears on the child's stderr (fails if it exits or takes too long)."""
        end = time.monotonic() + timeout
        while text.encode() not in self.err:
            chunk = self.proc.stderr.read()
            if chunk:
                self.err += chunk
                continue
            if self.proc.poll() is not None or time.monotonic() > end:
                self.proc.kill()
                pytest.fail(f"celo2 {' '.join(self.argv)}: no {text!r} on stderr (rc {self.proc.poll()}):\n"
                            f"{self.err.decode(errors='replace')[-3000:]}")
            time.sleep(0.02)

    def finish(self, timeout: float = 120) -> Finished:
        os.set_blocking(self.proc.stderr.fileno(), True)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"celo2 {' '.join(self.argv)} did not finish in {timeout} s")
        result = Finished(self.proc.returncode, out.decode(errors="replace"),
                          (self.err + err).decode(errors="replace"))
        check_no_crash(result, f"celo2 {' '.join(self.argv)}")
        return result


@pytest.fixture
def celo2_cli():
    """:func:`run_celo2`."""
    return run_celo2


@pytest.fixture
def celo2_child():
    """:class:`Child` (killed at the end of the test if still running)."""
    children: list[Child] = []

    def start(*argv: str, cwd: Path, env: dict | None = None) -> Child:
        children.append(Child(*argv, cwd=cwd, env=env))
        return children[-1]

    yield start
    for c in children:
        if c.proc.poll() is None:
            c.proc.kill()
            c.proc.wait()


@pytest.fixture(scope="session")
def env_with():
    """:func:`child_env`."""
    return child_env


@pytest.fixture
def zero_gradient_thetas(request) -> dict:
    """The thetas the zero-gradient behaviour is measured with: the shipped one
    (``None``) always, the published one where the shared folder is present."""
    thetas = {"shipped": None}
    try:
        thetas["published"] = request.getfixturevalue("published_theta")
    except pytest.skip.Exception:
        pass
    return thetas
