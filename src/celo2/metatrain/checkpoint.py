"""The meta-training checkpoint format: ``checkpoint/trainer.npz`` and the thetas beside it.

``trainer.npz`` holds every leaf of the trainer state (``leaf_NNNNN``) and a JSON ``__meta__`` record
(format, iteration, tree structure, configuration, devices). A checkpoint is written as one unit
(:func:`celo2._io.atomic_write_group`): ``theta.state``, ``trainer.npz`` and the trajectory's snapshot
are all staged before any is renamed into place, so a full disk or any other write error leaves the
previous checkpoint whole and the folder consistent. The checkpoint a write replaces is kept as
``trainer.prev.npz``, and :func:`load_latest` falls back to it when the latest cannot be read;
:func:`sync_theta_file` makes ``theta.state`` agree with the checkpoint a resume starts from (a kill
between the renames, or a fallback, can leave them apart).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from celo2._io import atomic_write_bytes, atomic_write_group
from celo2.metatrain.config import MetaTrainConfig
from celo2.rule.theta import Theta
from celo2.theta_files.formats import theta_to_flax_bytes

CHECKPOINT_FORMAT = "celo2-metatrain-v1"
#: Config keys a resumed run may change (they do not alter what is computed).
RESUMABLE_KEYS = ("iterations", "checkpoint_every", "data_dir", "shard")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the run's configuration."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read as one (torn, truncated, not a checkpoint)."""


def check_same_run(saved: MetaTrainConfig, current: MetaTrainConfig, origin: str) -> None:
    a, b = saved.to_dict(), current.to_dict()
    changed = [k for k in a if k not in RESUMABLE_KEYS and k != "preset" and a[k] != b.get(k)]
    if changed:
        raise CheckpointError(
            f"{origin}: the run was started with a different configuration: "
            + ", ".join(f"{k}={a[k]!r} (now {b.get(k)!r})" for k in changed)
            + f"; only {', '.join(RESUMABLE_KEYS)} may change on resume")


def save_checkpoint(state, theta: Theta, config: MetaTrainConfig, devices: int, run_dir: str | os.PathLike,
                    extra: dict | None = None, *, snapshot: bool = True) -> Path:
    """Write ``checkpoint/theta.state``, ``checkpoint/trainer.npz`` (and the snapshot) as one unit.

    Args:
        state: the trainer state to save (a pytree of arrays).
        theta: the state's theta (stored in the authors' format beside the state).
        config: the run's configuration, stored with the state.
        devices: the number of devices the state is laid over.
        run_dir: the run folder.
        extra: more metadata keys stored in the checkpoint (e.g. ``wall_time_s``).
        snapshot: also keep theta in ``thetas/theta-NNNNNN.state`` (the regular checkpoints;
            not the one written on Ctrl-C, so the trajectory keeps its spacing).

    Returns:
        The path of ``trainer.npz``. The one it replaces is kept as ``trainer.prev.npz``.

    Raises:
        OSError: a file cannot be written (a full disk, no permission, a non-regular file in the
            way); ``exc.filename`` names it, and every file of the previous checkpoint is as it was.
    """
    import jax

    ckpt = Path(run_dir) / "checkpoint"
    iteration = int(state.iteration)
    theta.metadata.update({"iteration": iteration, "config": config.to_dict()})
    theta_bytes = theta_to_flax_bytes(theta)
    files = [(ckpt / "theta.state", theta_bytes)]
    if snapshot:
        # The trajectory, for choosing a checkpoint by validation afterwards:
        # PES's meta-loss is noisy and does not rank thetas out of distribution.
        files.append((Path(run_dir) / "thetas" / f"theta-{iteration:06d}.state", theta_bytes))
    leaves = jax.tree_util.tree_leaves(state)
    arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    meta = {
        "format": CHECKPOINT_FORMAT,
        "iteration": iteration,
        "num_leaves": len(leaves),
        "treedef": str(jax.tree_util.tree_structure(state)),
        "config": config.to_dict(),
        "devices": devices,
        **(extra or {}),
    }
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.asarray(json.dumps(meta)), **arrays)
    path = ckpt / "trainer.npz"
    files.append((path, buf.getvalue()))

    def keep_previous() -> None:
        if path.exists():
            _keep_previous(path, ckpt / "trainer.prev.npz")

    atomic_write_group(files, before_commit=keep_previous)
    return path


def sync_theta_file(run_dir: str | os.PathLike, theta: Theta, log: Callable[[str], None]) -> bool:
    """Make ``checkpoint/theta.state`` hold ``theta``, the theta of the checkpoint a resume starts from.

    Args:
        run_dir: the run folder.
        theta: the theta of the trainer state loaded.
        log: where a rewrite is reported.

    Returns:
        Whether the file was rewritten (it was missing or held another theta).
    """
    path = Path(run_dir) / "checkpoint" / "theta.state"
    data = theta_to_flax_bytes(theta)
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    atomic_write_bytes(path, data)
    log(f"note: {path} did not hold the checkpoint's theta; rewritten from {path.parent / 'trainer.npz'}'s state")
    return True


def load_checkpoint(path: str | os.PathLike, config: MetaTrainConfig, template: Any) -> tuple[Any, dict]:
    """The state saved in ``trainer.npz``, checked against ``template``, and its metadata.

    Args:
        path: ``trainer.npz``, its ``checkpoint`` folder or the run folder.
        config: the configuration the state must have been saved under (up to :data:`RESUMABLE_KEYS`).
        template: the trainer state's structure (e.g. from ``jax.eval_shape``): leaves with shapes and dtypes.

    Returns:
        ``(state, meta)``: the state on the host, and the checkpoint's metadata record.

    Raises:
        CheckpointError: no checkpoint there, or one of a different configuration or layout.
        CorruptCheckpointError: the file cannot be read as a checkpoint.
    """
    import jax

    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint" / "trainer.npz" if (path / "checkpoint").is_dir() else path / "trainer.npz"
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(str(npz["__meta__"]))
            leaves = [npz[f"leaf_{i:05d}"] for i in range(int(meta["num_leaves"]))]
            int(meta["iteration"]), dict(meta["config"])
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise CorruptCheckpointError(f"{path}: not a readable meta-training checkpoint ({exc})") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise CorruptCheckpointError(f"{path}: format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    saved = MetaTrainConfig.from_dict(meta["config"])
    check_same_run(saved, config, origin=str(path))
    t_leaves, treedef = jax.tree_util.tree_flatten(template)
    if len(t_leaves) != len(leaves) or str(treedef) != meta["treedef"]:
        raise CheckpointError(
            f"{path}: the saved trainer state has a different structure "
            f"({len(leaves)} arrays) than this configuration ({len(t_leaves)} arrays)")
    for i, (t, x) in enumerate(zip(t_leaves, leaves)):
        if tuple(t.shape) != tuple(x.shape) or np.dtype(t.dtype) != x.dtype:
            raise CheckpointError(
                f"{path}: array leaf_{i:05d} is {x.dtype}{list(x.shape)}, "
                f"expected {np.dtype(t.dtype)}{list(t.shape)}")
    return jax.tree_util.tree_unflatten(treedef, leaves), meta


def load_latest(run: Path, load: Callable[[Path], tuple[Any, dict]],
                log: Callable[[str], None]) -> tuple[Any, dict] | None:
    """The newest readable checkpoint of ``run``, falling back to the previous one.

    Args:
        run: the run folder.
        load: reads one checkpoint file (raising :class:`CorruptCheckpointError` for an unreadable one).
        log: where the fallback is reported.

    Returns:
        ``load``'s result for the checkpoint used, or ``None`` when the run has none yet.

    Raises:
        CheckpointError: checkpoints exist but none can be read.
    """
    ckpt = run / "checkpoint"
    candidates = [ckpt / "trainer.npz", ckpt / "trainer.prev.npz"]
    if not any(p.exists() for p in candidates):
        return None
    problems = []
    for path in candidates:
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        try:
            state, meta = load(path)
        except CorruptCheckpointError as exc:
            problems.append(str(exc))
            continue
        if problems:
            log(f"warning: {'; '.join(problems)}; falling back to {path} (iteration {int(meta['iteration'])})")
        return state, meta
    raise CheckpointError(f"no usable checkpoint in {ckpt}: {'; '.join(problems)}")


def _keep_previous(path: Path, prev: Path) -> None:
    """Make ``prev`` a copy of ``path`` atomically, ``path`` staying in place throughout."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{prev.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            os.unlink(tmp)
            os.link(path, tmp)  # a second name for the same file: no copy needed
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, prev)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(prev)) from exc
        raise
