"""The meta-training run folder: who may use it, and Ctrl-C while a run holds it.

A new run needs an empty (or missing) folder; only ``resume`` continues one. The folder is locked
while a run uses it (:class:`celo2._runlock.RunLock`): a second process stops at once.

Ctrl-C (SIGINT) is deferred while the trainer works (:class:`DeferredInterrupt`): XLA compiling, or a
checkpoint half written, is never cut off. The run stops at the next safe point (after the compile or
the iteration in progress), writes a checkpoint of the iterations done and raises
:class:`MetaTrainInterrupted`; a second Ctrl-C aborts at once (the checkpoints on disk are whole
either way).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from celo2._runlock import LOCK_NAME, RunFolderError


class RunDirError(RunFolderError):
    """A run folder that cannot be used as asked (exists without --resume, ...)."""


class MetaTrainInterrupted(KeyboardInterrupt):
    """Meta-training stopped by Ctrl-C (SIGINT) at a safe point.

    Attributes:
        run_dir: the run folder.
        iteration: the iterations done (and saved, when ``checkpoint`` is not None).
        checkpoint: the checkpoint to resume from, or None when no iteration has been saved yet.
    """

    def __init__(self, run_dir: Path, iteration: int, checkpoint: Path | None):
        self.run_dir, self.iteration, self.checkpoint = Path(run_dir), int(iteration), checkpoint
        saved = f"checkpoint {checkpoint} (iteration {iteration})" if checkpoint else "no checkpoint yet"
        super().__init__(f"meta-training of {run_dir} interrupted: {saved}")


class DeferredInterrupt:
    """SIGINT sets a flag instead of raising, while meta-training holds this; see the module docstring.

    Only the main thread can take signals; elsewhere (and where SIGINT is
    ignored) this changes nothing and :attr:`requested` stays False.
    """

    _active: "DeferredInterrupt | None" = None

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._owner = False

    def __enter__(self) -> "DeferredInterrupt":
        if DeferredInterrupt._active is not None:  # nested: the outer one holds the handler
            return DeferredInterrupt._active
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._owner = True
            DeferredInterrupt._active = self
        return self

    def __exit__(self, *exc) -> None:
        if self._owner:
            signal.signal(signal.SIGINT, self._previous)
            DeferredInterrupt._active = None
            self._owner = False

    def _handle(self, signum, frame) -> None:
        # os.write, not print: a handler may run in the middle of another write to stderr.
        if self.requested:
            os.write(2, b"\ninterrupted again: aborting now (the checkpoints on disk are whole)\n")
            os._exit(130)
        self.requested = True
        os.write(2, b"\ninterrupt: stopping at the next safe point and saving a checkpoint "
                    b"(Ctrl-C again to abort at once)\n")


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_fresh(run: Path, resume: bool) -> None:
    """A new run needs an empty (or missing) folder; only ``resume`` continues one."""
    if run.is_dir() and not resume and any(p.name != LOCK_NAME for p in run.iterdir()):
        raise RunDirError(
            f"run folder {run} is not empty; pass --resume to continue it or choose another --out")
