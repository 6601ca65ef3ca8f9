"""Run test cases that could crash the interpreter (a segfault in a kernel, an
abort in glibc) in a fresh one, so a crash fails the test instead of the run.

A test module lists its cases as functions ``case_<name>()`` and ends with::

    if __name__ == "__main__":
        from isolated import child_main  # this folder is sys.path[0] there
        child_main(globals())

The parent calls :func:`run_cases` (one interpreter for a batch of cases: the
imports and the kernels' cache load are paid once) and checks each result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

_SRC = Path(__file__).resolve().parents[2] / "src"
_START, _DONE = "@@start ", "@@done "


def child_main(namespace: dict) -> None:
    """Run the cases named on the command line, reporting each on stdout."""
    for name in sys.argv[1:]:
        print(_START + name, flush=True)
        try:
            namespace["case_" + name]()
            result = "ok"
        except Exception:  # noqa: BLE001 - reported to the parent, which fails the test
            result = traceback.format_exc().replace("\n", "\\n")
        print(f"{_DONE}{name} {result}", flush=True)


class Batch:
    """The outcome of one child process: per-case results and how it ended."""

    def __init__(self, proc: subprocess.CompletedProcess) -> None:
        self.results: dict[str, str] = {}
        self.running = None
        for line in proc.stdout.splitlines():
            if line.startswith(_START):
                self.running = line[len(_START):]
            elif line.startswith(_DONE):
                name, _, result = line[len(_DONE):].partition(" ")
                self.results[name] = result.replace("\\n", "\n")
                self.running = None
        self.returncode = proc.returncode
        self.stderr = proc.stderr[-3000:]

    def check(self, name: str) -> None:
        """Fail (``AssertionError``) unless case ``name`` ran and passed."""
        if name not in self.results:
            how = (f"killed by {signal.Signals(-self.returncode).name}" if self.returncode < 0
                   else f"exit status {self.returncode}")
            raise AssertionError(f"the child interpreter died ({how}) while running case {self.running!r}:\n"
                                 f"{self.stderr}")
        assert self.results[name] == "ok", f"case {name}:\n{self.results[name]}"


def run_cases(script: str, cases: list[str], env: "dict[str, str] | None" = None, timeout: float = 600) -> Batch:
    """Run ``case_<name>`` of ``script`` for each of ``cases`` in one fresh interpreter."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join([str(_SRC), full_env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, script, *cases], capture_output=True, text=True, env=full_env,
                          timeout=timeout)
    return Batch(proc)
