"""The meta-training loop: :class:`MetaTrainer` and :func:`meta_train`.

Its pieces have modules of their own: :mod:`~celo2.metatrain.run_folder` (who may use the folder,
Ctrl-C), :mod:`~celo2.metatrain.checkpoint` (the checkpoint format, resume fallback),
:mod:`~celo2.metatrain.metrics` (the metrics file), :mod:`~celo2.metatrain.compile_cache` (compiled
iterations shared in a process). The names they define that users catch or call are importable from
here too.

Run folder::

    RUN_DIR/config.json            full configuration (written at start)
    RUN_DIR/metrics.jsonl|csv      one row per iteration
    RUN_DIR/checkpoint/trainer.npz full trainer state (what --resume reads)
    RUN_DIR/checkpoint/trainer.prev.npz the checkpoint before it, read when trainer.npz is
                                   unreadable (a resume names the file and iteration it falls back to)
    RUN_DIR/checkpoint/theta.state theta at that checkpoint, authors' format
    RUN_DIR/thetas/theta-NNNNNN.state  theta at every checkpoint, kept (1.8 KB each), so
                                   that a checkpoint can be chosen afterwards on a
                                   validation task (``celo2 bench --theta``)
    RUN_DIR/theta.state            final theta, authors' format
    RUN_DIR/metadata.json          config, data, iterations, wall time, final meta-loss, git commit

Every file is written to a temporary name and moved into place with
``os.replace``, so a run killed at any moment leaves either the previous or
the new checkpoint, never a torn one; temporary files of an interrupted write
are removed when the folder is next opened. A checkpoint's files are staged
together before any is renamed, so a full disk (or any other write error)
raises an ``OSError`` naming the file with the previous checkpoint whole. The
folder is locked while a run uses it (:class:`celo2._runlock.RunLock`): a
second process stops at once; it carries the marker ``.celo2-run``, and a run
never writes into a folder without it that holds anything but an earlier
version's run.

Ctrl-C (SIGINT) and SIGTERM are deferred while the trainer works: XLA compiling, or a
checkpoint half written, is never cut off. The run stops at the next safe point
(after the compile or the iteration in progress), writes a checkpoint of the
iterations done and raises :class:`MetaTrainInterrupted`; a second signal
aborts at once (the checkpoints on disk are whole either way). Resuming restores the complete state
(theta, outer AdamW, every inner run, PES accumulators, the root key); since
every random draw is derived from the root key and the iteration number, the
resumed run computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from celo2._io import atomic_write_bytes
from celo2._provenance import git_commit
from celo2._runlock import RunLock, check_owner
from celo2.metatrain import checkpoint
from celo2.metatrain.checkpoint import (
    CHECKPOINT_FORMAT,
    RESUMABLE_KEYS,
    CheckpointError,
    CorruptCheckpointError,
    check_same_run,
)
from celo2.metatrain.compile_cache import COMPILED, jitted_iteration, state_shardings
from celo2.metatrain.config import ConfigError, MetaTrainConfig
from celo2.metatrain.metrics import MetricsWriter, read_metrics, truncate_metrics
from celo2.metatrain.run_folder import (
    DeferredInterrupt,
    MetaTrainInterrupted,
    RunDirError,
    check_fresh,
    is_legacy_run,
    stderr,
)
from celo2.metatrain.tasks import TaskData, load_task_data
from celo2.rule.theta import Theta
from celo2.theta_files import load_theta, save_theta


@dataclass
class MetaTrainResult:
    run_dir: Path
    theta: Theta
    iterations: int
    final_meta_loss: float | None
    wall_time_s: float


class MetaTrainer:
    """PES meta-training of the Celo2 theta for one configuration.

    ``data`` (a :class:`TaskData`) replaces loading the config's task families;
    ``inner_optimizer`` (``theta_tree -> optax.GradientTransformation``)
    replaces the config's inner optimiser; ``devices`` are the JAX devices to
    lay particles over (default: all, when ``config.shard``).
    """

    def __init__(self, config: MetaTrainConfig, *, data: TaskData | None = None,
                 inner_optimizer: Callable | None = None, devices: list | None = None):
        import jax

        from celo2.metatrain.pes import PES

        self.config = config
        self.data = data if data is not None else load_task_data(
            config.tasks, config.data_dir, config.image_size, config.num_classes)
        self.pes = PES(config, self.data.X.shape[0], inner_optimizer, in_dim=self.data.X.shape[2])
        self.mesh = self._make_mesh(devices if devices is not None else jax.devices())
        self._X = self._replicated(self.data.X)
        self._y = self._replicated(self.data.y)
        self._sizes = self._replicated(self.data.sizes)
        self._step = jitted_iteration(self.pes, self.mesh, inner_optimizer)
        self._compiled = None

    # -- devices ---------------------------------------------------------------------
    def _make_mesh(self, devices: list):
        """A 1-D mesh over as many devices as divide the number of pairs (pairs stay together)."""
        from celo2.metatrain.pes import particle_mesh

        return particle_mesh(devices, self.pes.num_pairs) if self.config.shard else None

    @property
    def num_devices(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.size)

    def _replicated(self, x):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        if self.mesh is None:
            return jax.device_put(x)
        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

    def _place(self, state):
        """Particle arrays split over the mesh, everything else replicated."""
        import jax

        if self.mesh is None:
            return jax.device_put(state)
        return jax.device_put(state, state_shardings(self.pes, self.mesh))

    # -- state -----------------------------------------------------------------------
    def initial_theta(self) -> Theta:
        """The theta the run starts from: ``config.theta_init``'s file, else ``Theta.init(seed, variant)``.

        Raises:
            ConfigError: ``theta_init`` holds a theta of another rule variant than ``config.variant``.
        """
        c = self.config
        if not c.theta_init:
            return Theta.init(c.seed, c.variant)
        theta = load_theta(c.theta_init)
        if theta.variant != c.variant:
            raise ConfigError(
                f"theta_init={c.theta_init}: a theta of rule variant {theta.variant.label}, but the run trains "
                f"{c.variant.label}; set the config's variant to the file's (--set 'variant={theta.variant.to_json()}') "
                "or start from a theta of the run's variant")
        return theta

    def init_state(self):
        import jax.numpy as jnp

        return self._place(self.pes.init(jnp.asarray(self.initial_theta().to_flat()), self.config.seed))

    def compile(self, state) -> float:
        """Compile the iteration for ``state``'s layout ahead of time; returns seconds spent."""
        import jax

        args = (state, self._X, self._y, self._sizes)
        sig = str(jax.tree_util.tree_map(
            lambda a: (tuple(a.shape), str(a.dtype), str(getattr(a, "sharding", ""))), args))
        key = (id(self._step), sig)
        t0 = time.perf_counter()
        if key not in COMPILED:
            if len(COMPILED) >= 8:
                COMPILED.pop(next(iter(COMPILED)))
            COMPILED[key] = self._step.lower(*args).compile()
        self._compiled = COMPILED[key]
        return time.perf_counter() - t0

    def step(self, state):
        """One outer iteration; returns the new state and metrics as Python floats."""
        if self._compiled is None:
            self.compile(state)
        state, metrics = self._compiled(state, self._X, self._y, self._sizes)
        return state, {k: float(v) for k, v in metrics.items()}

    def theta_of(self, state) -> Theta:
        """The state's theta, of the run's rule variant."""
        return Theta.from_flat(np.asarray(state.theta, np.float32), variant=self.config.variant)

    # -- checkpoints -----------------------------------------------------------------
    def save_checkpoint(self, state, run_dir: str | os.PathLike, extra: dict | None = None, *,
                        snapshot: bool = True) -> Path:
        """Write the state's checkpoint into ``run_dir`` (see :func:`celo2.metatrain.checkpoint.save_checkpoint`).

        Args:
            state: the trainer state to save.
            run_dir: the run folder.
            extra: more metadata keys stored in the checkpoint (e.g. ``wall_time_s``).
            snapshot: also keep theta in ``thetas/theta-NNNNNN.state`` (default ``True``).

        Returns:
            The path of ``trainer.npz``.
        """
        return checkpoint.save_checkpoint(state, self.theta_of(state), self.config, self.num_devices, run_dir,
                                          extra, snapshot=snapshot)

    def load_checkpoint(self, path: str | os.PathLike) -> tuple[Any, dict]:
        """The state saved in ``trainer.npz`` (checked against this trainer's layout) and its metadata.

        Args:
            path: ``trainer.npz``, its ``checkpoint`` folder or the run folder.

        Returns:
            ``(state, meta)``, the state laid over this trainer's devices.

        Raises:
            CheckpointError: see :func:`celo2.metatrain.checkpoint.load_checkpoint`.
        """
        import jax

        theta0 = Theta.init(0, self.config.variant).to_flat()
        template = jax.eval_shape(lambda: self.pes.init(theta0, self.config.seed))
        state, meta = checkpoint.load_checkpoint(path, self.config, template)
        return self._place(state), meta

    # -- the loop ----------------------------------------------------------------------
    def train(self, run_dir: str | os.PathLike, *, resume: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None, stop_after: int | None = None) -> MetaTrainResult:
        """Meta-train into ``run_dir`` (see the module docstring for its contents).

        Args:
            run_dir: the run folder; locked for the duration of the call.
            resume: continue from ``run_dir/checkpoint`` (or start afresh when there is none yet).
            progress: show a progress bar.
            log: where messages go (default: standard error).
            stop_after: end this session after that many iterations without finishing the run
                (for tests and timing).

        Returns:
            The run folder, theta, iterations done, final meta-loss and wall time.

        Raises:
            RunDirError: the folder holds something and ``resume`` is False.
            RunFolderError: the folder cannot be created, written or locked (another process has it),
                or it holds files that are not a meta-training run's (nothing is written then).
            CheckpointError: no usable checkpoint, or one of a different configuration.
            OSError: a file cannot be written (a full disk, ...); ``exc.filename`` names it, and the
                checkpoints on disk are whole.
            MetaTrainInterrupted: Ctrl-C or SIGTERM; raised at the next safe point, after saving a
                checkpoint.
        """
        log = log or stderr
        run = Path(run_dir)
        check_fresh(run, resume)
        with DeferredInterrupt() as interrupt, _lock(run, log):
            return self._train_locked(run, interrupt, resume=resume, progress=progress, log=log,
                                      stop_after=stop_after)

    def _load_latest(self, run: Path, log: Callable[[str], None]) -> tuple[Any, dict] | None:
        """The newest readable checkpoint of ``run`` (falling back to the previous one), or None if none."""
        return checkpoint.load_latest(run, self.load_checkpoint, log)

    def _train_locked(self, run: Path, interrupt: DeferredInterrupt, *, resume: bool, progress: bool,
                      log: Callable[[str], None], stop_after: int | None) -> MetaTrainResult:
        import jax

        c = self.config
        metrics_path = run / ("metrics.jsonl" if c.metrics_format == "jsonl" else "metrics.csv")
        ckpt_path = run / "checkpoint" / "trainer.npz"

        def stop_if_asked(state, saved: Path | None, saved_at: int) -> None:
            """At a safe point: on Ctrl-C, checkpoint what is not saved yet, then raise."""
            if not interrupt.requested:
                return
            it = int(state.iteration)
            if it > saved_at:
                writer.flush()
                saved = self.save_checkpoint(state, run, {"wall_time_s": elapsed_before + time.perf_counter() - t0},
                                             snapshot=False)
            raise MetaTrainInterrupted(run, it if saved else 0, saved, interrupt.signum or signal.SIGINT)

        elapsed_before = 0.0
        loaded = self._load_latest(run, log) if resume else None
        if loaded is not None:
            state, meta = loaded
            elapsed_before = float(meta.get("wall_time_s", 0.0))
            start = int(meta["iteration"])
            checkpoint.sync_theta_file(run, self.theta_of(state), log)
            truncate_metrics(metrics_path, start, log)
            log(f"resuming {run} from iteration {start}")
            if int(meta.get("devices", 1)) != self.num_devices:
                log(f"note: the run used {meta.get('devices', 1)} device(s), now {self.num_devices}: "
                    "it continues correctly, but float rounding will differ from an uninterrupted run")
        else:
            if resume:
                log(f"no checkpoint in {run}: starting from scratch")
                truncate_metrics(metrics_path, 0, log)
            state = self.init_state()
            start = 0
        saved = ckpt_path if loaded is not None else None
        saved_at = start
        atomic_write_bytes(run / "config.json", (c.to_json() + "\n").encode())
        log(f"meta-train config (preset {c.preset!r}):\n{c.to_json()}")
        log(f"tasks: {self.data.summary()} training images; {self.pes.P} particles "
            f"({c.inner_steps_per_iteration:,} inner steps per iteration) on {self.num_devices} device(s)")

        commit = git_commit()  # now, not at the end: the checkout may move while the run lasts
        t0 = time.perf_counter()  # wall time counts compilation too
        writer = MetricsWriter(metrics_path, c.metrics_format)
        bar = None
        last = None
        steps = c.inner_steps_per_iteration
        try:
            stop_if_asked(state, saved, saved_at)
            if start < c.iterations:
                log("compiling the iteration ...")
                log(f"compiled the iteration in {self.compile(state):.1f} s")
            stop_if_asked(state, saved, saved_at)
            total = c.iterations
            end = total if stop_after is None else min(total, start + stop_after)
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, initial=start, desc="meta-train", unit="it", dynamic_ncols=True)
            for it in range(start, end):
                t_it = time.perf_counter()
                state, m = self.step(state)
                dt = time.perf_counter() - t_it
                row = {
                    "iteration": it + 1,
                    "meta_loss": m["meta_loss"],
                    "grad_norm": m["grad_norm"],
                    "inner_steps_per_s": steps / dt,
                    "wall_time_s": elapsed_before + time.perf_counter() - t0,
                    "resets": int(m["resets"]),
                    "nonfinite_losses": int(m["nonfinite_losses"]),
                }
                try:
                    writer.write(row)
                except OSError as exc:  # a full disk: name the file (the checkpoints on disk are whole)
                    if exc.filename is not None:
                        raise
                    raise OSError(exc.errno, exc.strerror or str(exc), str(metrics_path)) from exc
                last = row
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(meta_loss=f"{m['meta_loss']:.4f}", steps_s=f"{steps / dt:,.0f}")
                if (it + 1) % c.checkpoint_every == 0 or it + 1 == total:
                    writer.flush()
                    saved = self.save_checkpoint(state, run, {"wall_time_s": row["wall_time_s"]})
                    saved_at = it + 1
                stop_if_asked(state, saved, saved_at)
        finally:
            writer.close()
            if bar is not None:
                bar.close()
        jax.block_until_ready(state)
        wall = elapsed_before + time.perf_counter() - t0
        iterations = int(state.iteration)
        theta = self.theta_of(state)
        if iterations >= total:
            theta.metadata.update({"iterations": iterations, "config": c.to_dict()})
            save_theta(theta, run / "theta.state")
            meta = {
                "config": c.to_dict(),
                "data": self.data.summary(),
                "iterations": iterations,
                "inner_steps": iterations * steps,
                "wall_time_s": wall,
                "final_meta_loss": None if last is None else last["meta_loss"],
                "theta_sha256": theta.checksum(),
                "devices": self.num_devices,
                "jax_version": jax.__version__,
                "platform": platform.platform(),
                "git_commit": commit,
            }
            atomic_write_bytes(run / "metadata.json", (json.dumps(meta, indent=2) + "\n").encode())
            log(f"done: {iterations} iterations in {wall:.0f} s; theta -> {run / 'theta.state'}")
        return MetaTrainResult(run, theta, iterations, None if last is None else last["meta_loss"], wall)


def _lock(run: Path, log: Callable[[str], None]) -> RunLock:
    """The run folder's lock: a meta-training run folder (its marker, or an earlier version's run) only."""
    return RunLock(run, flag="run folder", log=log, kind="meta-train", adopt=is_legacy_run)


def meta_train(config: MetaTrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
               progress: bool = True, data: TaskData | None = None,
               inner_optimizer: Callable | None = None, stop_after: int | None = None,
               log: Callable[[str], None] | None = None) -> MetaTrainResult:
    """Meta-train theta with PES under ``config`` into the run folder ``out_dir``.

    With ``resume``, the configuration saved in ``out_dir/config.json`` must
    agree with ``config`` except for :data:`RESUMABLE_KEYS`.
    """
    run = Path(out_dir)
    if resume:  # a folder that is not a meta-training run is refused before its files are read
        check_owner(run, "meta-train", is_legacy_run, where=f"run folder {run}")
    if resume and (run / "config.json").is_file():
        saved = MetaTrainConfig.from_dict(json.loads((run / "config.json").read_text()))
        check_same_run(saved, config, origin=str(run / "config.json"))
    log = log or stderr
    check_fresh(run, resume)
    # The folder is claimed before the data are loaded: a folder in use is reported at once.
    with DeferredInterrupt() as interrupt, _lock(run, log):
        trainer = MetaTrainer(config, data=data, inner_optimizer=inner_optimizer)
        return trainer._train_locked(run, interrupt, resume=resume, progress=progress, log=log,
                                     stop_after=stop_after)


__all__ = [
    "CHECKPOINT_FORMAT", "CheckpointError", "CorruptCheckpointError", "MetaTrainInterrupted", "MetaTrainResult",
    "MetaTrainer", "RESUMABLE_KEYS", "RunDirError",
    "meta_train", "read_metrics",
]
