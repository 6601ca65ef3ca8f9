"""The meta-training run folder: who may use it, and Ctrl-C or SIGTERM while a run holds it.

A new run needs an empty (or missing) folder; only ``resume`` continues one, and only a folder that
is a meta-training run (its marker, or a run of an earlier version: :func:`is_legacy_run`). The
folder is locked while a run uses it (:class:`celo2._runlock.RunLock`): a second process stops at once.

Ctrl-C (SIGINT) and SIGTERM (what Slurm, Kubernetes and cloud preemption send first) are deferred
while the trainer works (:class:`DeferredInterrupt`): XLA compiling, or a checkpoint half written, is
never cut off. The run stops at the next safe point (after the compile or the iteration in
progress), writes a checkpoint of the iterations done and raises :class:`MetaTrainInterrupted`; a
second signal aborts at once (the checkpoints on disk are whole either way). The exit status is
``128 + the signal's number``: 130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from celo2._runlock import LOCK_NAME, MARKER_NAME, RunFolderError

#: The signals meta-training stops on at a safe point, saving a checkpoint.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunDirError(RunFolderError):
    """A run folder that cannot be used as asked (exists without --resume, ...)."""


class MetaTrainInterrupted(KeyboardInterrupt):
    """Meta-training stopped by Ctrl-C (SIGINT) or SIGTERM at a safe point.

    Attributes:
        run_dir: the run folder.
        iteration: the iterations done (and saved, when ``checkpoint`` is not None).
        checkpoint: the checkpoint to resume from, or None when no iteration has been saved yet.
        signum: the signal that stopped the run.
        exit_status: the command's exit status for it, ``128 + signum`` (130 SIGINT, 143 SIGTERM).
    """

    def __init__(self, run_dir: Path, iteration: int, checkpoint: Path | None, signum: int = signal.SIGINT):
        self.run_dir, self.iteration, self.checkpoint = Path(run_dir), int(iteration), checkpoint
        self.signum = int(signum)
        self.exit_status = 128 + self.signum
        saved = f"checkpoint {checkpoint} (iteration {iteration})" if checkpoint else "no checkpoint yet"
        super().__init__(f"meta-training of {run_dir} interrupted by {signal.Signals(self.signum).name}: {saved}")


class DeferredInterrupt:
    """SIGINT and SIGTERM set a flag instead of acting, while meta-training holds this; see the module docstring.

    Only the main thread can take signals; elsewhere this changes nothing and
    :attr:`requested` stays False. A signal that is ignored (``SIG_IGN``, as
    ``nohup`` sets SIGINT) stays ignored.

    Attributes:
        requested: a stop signal arrived.
        signum: the first stop signal that arrived (None before one does).
    """

    _active: "DeferredInterrupt | None" = None

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "DeferredInterrupt":
        if DeferredInterrupt._active is not None:  # nested: the outer one holds the handlers
            return DeferredInterrupt._active
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) not in (signal.SIG_IGN, None):
                    self._previous[signum] = signal.signal(signum, self._handle)
            if self._previous:
                DeferredInterrupt._active = self
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self._previous:
            DeferredInterrupt._active = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        # os.write, not print: a handler may run in the middle of another write to stderr.
        if self.requested:
            os.write(2, b"\ninterrupted again: aborting now (the checkpoints on disk are whole)\n")
            os._exit(128 + signum)
        self.requested = True
        self.signum = signum
        name = signal.Signals(signum).name.encode()
        os.write(2, b"\n" + name + b": stopping at the next safe point and saving a checkpoint "
                    b"(Ctrl-C again to abort at once)\n")


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def check_fresh(run: Path, resume: bool) -> None:
    """A new run needs an empty (or missing) folder; only ``resume`` continues one."""
    if run.is_dir() and not resume and any(p.name not in (LOCK_NAME, MARKER_NAME) for p in run.iterdir()):
        raise RunDirError(
            f"run folder {run} is not empty; pass --resume to continue it or choose another --out")


def is_legacy_run(folder: Path) -> bool:
    """Whether ``folder`` is a meta-training run written before run folders carried a marker.

    Such a run has a checkpoint (``checkpoint/trainer.npz`` or ``trainer.prev.npz``) beside its
    ``config.json``; a folder without one holds nothing a resume could continue.

    Args:
        folder: an existing folder without a marker.

    Returns:
        True when it looks like an earlier version's meta-training run.
    """
    ckpt = folder / "checkpoint"
    return (folder / "config.json").is_file() and any(
        (ckpt / name).is_file() for name in ("trainer.npz", "trainer.prev.npz"))
