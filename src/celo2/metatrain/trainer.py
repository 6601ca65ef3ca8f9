"""The meta-training loop: run folder, metrics, atomic checkpoints, exact resume.

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
are removed when the folder is next opened. The folder is locked while a run
uses it (:class:`celo2._runlock.RunLock`): a second process stops at once.

Ctrl-C (SIGINT) is deferred while the trainer works: XLA compiling, or a
checkpoint half written, is never cut off. The run stops at the next safe point
(after the compile or the iteration in progress), writes a checkpoint of the
iterations done and raises :class:`MetaTrainInterrupted`; a second Ctrl-C
aborts at once (the checkpoints on disk are whole either way). Resuming restores the complete state
(theta, outer AdamW, every inner run, PES accumulators, the root key); since
every random draw is derived from the root key and the iteration number, the
resumed run computes exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from celo2._io import atomic_write_bytes
from celo2._runlock import LOCK_NAME, RunFolderError, RunLock
from celo2._provenance import git_commit
from celo2.metatrain.config import MetaTrainConfig
from celo2.metatrain.tasks import TaskData, load_task_data
from celo2.rule import spec
from celo2.rule.theta import Theta, load_theta, save_theta

CHECKPOINT_FORMAT = "celo2-metatrain-v1"
#: Config keys a resumed run may change (they do not alter what is computed).
RESUMABLE_KEYS = ("iterations", "checkpoint_every", "data_dir", "shard")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not match the run's configuration."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that cannot be read as one (torn, truncated, not a checkpoint)."""


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


class _DeferredInterrupt:
    """SIGINT sets a flag instead of raising, while meta-training holds this; see the module docstring.

    Only the main thread can take signals; elsewhere (and where SIGINT is
    ignored) this changes nothing and :attr:`requested` stays False.
    """

    _active: "_DeferredInterrupt | None" = None

    def __init__(self) -> None:
        self.requested = False
        self._previous = None
        self._owner = False

    def __enter__(self) -> "_DeferredInterrupt":
        if _DeferredInterrupt._active is not None:  # nested: the outer one holds the handler
            return _DeferredInterrupt._active
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, None):
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._owner = True
            _DeferredInterrupt._active = self
        return self

    def __exit__(self, *exc) -> None:
        if self._owner:
            signal.signal(signal.SIGINT, self._previous)
            _DeferredInterrupt._active = None
            self._owner = False

    def _handle(self, signum, frame) -> None:
        # os.write, not print: a handler may run in the middle of another write to stderr.
        if self.requested:
            os.write(2, b"\ninterrupted again: aborting now (the checkpoints on disk are whole)\n")
            os._exit(130)
        self.requested = True
        os.write(2, b"\ninterrupt: stopping at the next safe point and saving a checkpoint "
                    b"(Ctrl-C again to abort at once)\n")


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
        self._step = _jitted_iteration(self.pes, self.mesh, inner_optimizer)
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
        return jax.device_put(state, _state_shardings(self.pes, self.mesh))

    # -- state -----------------------------------------------------------------------
    def initial_theta(self) -> Theta:
        c = self.config
        return load_theta(c.theta_init) if c.theta_init else Theta.init(c.seed)

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
        if key not in _COMPILED:
            if len(_COMPILED) >= 8:
                _COMPILED.pop(next(iter(_COMPILED)))
            _COMPILED[key] = self._step.lower(*args).compile()
        self._compiled = _COMPILED[key]
        return time.perf_counter() - t0

    def step(self, state):
        """One outer iteration; returns the new state and metrics as Python floats."""
        if self._compiled is None:
            self.compile(state)
        state, metrics = self._compiled(state, self._X, self._y, self._sizes)
        return state, {k: float(v) for k, v in metrics.items()}

    @staticmethod
    def theta_of(state) -> Theta:
        return Theta.from_flat(np.asarray(state.theta, np.float32))

    # -- checkpoints -----------------------------------------------------------------
    def save_checkpoint(self, state, run_dir: str | os.PathLike, extra: dict | None = None, *,
                        snapshot: bool = True) -> Path:
        """Write ``checkpoint/theta.state`` then ``checkpoint/trainer.npz``, each atomically.

        Args:
            state: the trainer state to save.
            run_dir: the run folder.
            extra: more metadata keys stored in the checkpoint (e.g. ``wall_time_s``).
            snapshot: also keep theta in ``thetas/theta-NNNNNN.state`` (the regular checkpoints;
                not the one written on Ctrl-C, so the trajectory keeps its spacing).

        Returns:
            The path of ``trainer.npz``. The one it replaces is kept as ``trainer.prev.npz``.
        """
        import jax

        ckpt = Path(run_dir) / "checkpoint"
        theta = self.theta_of(state)
        theta.metadata.update({"iteration": int(state.iteration), "config": self.config.to_dict()})
        save_theta(theta, ckpt / "theta.state")
        if snapshot:
            # The trajectory, for choosing a checkpoint by validation afterwards:
            # PES's meta-loss is noisy and does not rank thetas out of distribution.
            save_theta(theta, Path(run_dir) / "thetas" / f"theta-{int(state.iteration):06d}.state")
        leaves = jax.tree_util.tree_leaves(state)
        arrays = {f"leaf_{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
        meta = {
            "format": CHECKPOINT_FORMAT,
            "iteration": int(state.iteration),
            "num_leaves": len(leaves),
            "treedef": str(jax.tree_util.tree_structure(state)),
            "config": self.config.to_dict(),
            "devices": self.num_devices,
            **(extra or {}),
        }
        buf = io.BytesIO()
        np.savez(buf, __meta__=np.asarray(json.dumps(meta)), **arrays)
        path = ckpt / "trainer.npz"
        if path.exists():
            _keep_previous(path, ckpt / "trainer.prev.npz")
        atomic_write_bytes(path, buf.getvalue())
        return path

    def load_checkpoint(self, path: str | os.PathLike) -> tuple[Any, dict]:
        """The state saved in ``trainer.npz`` (checked against this trainer's layout) and its metadata."""
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
        _check_same_run(saved, self.config, origin=str(path))
        theta0 = Theta.init(0).to_flat()
        template = jax.eval_shape(lambda: self.pes.init(theta0, self.config.seed))
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
        state = jax.tree_util.tree_unflatten(treedef, leaves)
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
            RunFolderError: the folder cannot be created, written or locked (another process has it).
            CheckpointError: no usable checkpoint, or one of a different configuration.
            MetaTrainInterrupted: Ctrl-C; raised at the next safe point, after saving a checkpoint.
        """
        log = log or _stderr
        run = Path(run_dir)
        _check_fresh(run, resume)
        with _DeferredInterrupt() as interrupt, RunLock(run, flag="run folder", log=log):
            return self._train_locked(run, interrupt, resume=resume, progress=progress, log=log,
                                      stop_after=stop_after)

    def _load_latest(self, run: Path, log: Callable[[str], None]) -> tuple[Any, dict] | None:
        """The newest readable checkpoint of ``run`` (falling back to the previous one), or None if none."""
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
                state, meta = self.load_checkpoint(path)
            except CorruptCheckpointError as exc:
                problems.append(str(exc))
                continue
            if problems:
                log(f"warning: {'; '.join(problems)}; falling back to {path} (iteration {int(meta['iteration'])})")
            return state, meta
        raise CheckpointError(f"no usable checkpoint in {ckpt}: {'; '.join(problems)}")

    def _train_locked(self, run: Path, interrupt: _DeferredInterrupt, *, resume: bool, progress: bool,
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
            raise MetaTrainInterrupted(run, it if saved else 0, saved)

        elapsed_before = 0.0
        loaded = self._load_latest(run, log) if resume else None
        if loaded is not None:
            state, meta = loaded
            elapsed_before = float(meta.get("wall_time_s", 0.0))
            start = int(meta["iteration"])
            _truncate_metrics(metrics_path, start, log)
            log(f"resuming {run} from iteration {start}")
            if int(meta.get("devices", 1)) != self.num_devices:
                log(f"note: the run used {meta.get('devices', 1)} device(s), now {self.num_devices}: "
                    "it continues correctly, but float rounding will differ from an uninterrupted run")
        else:
            if resume:
                log(f"no checkpoint in {run}: starting from scratch")
                _truncate_metrics(metrics_path, 0, log)
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
        writer = _MetricsWriter(metrics_path, c.metrics_format)
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
                writer.write(row)
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


#: Config keys that do not change the compiled iteration (bookkeeping, init, data source).
_NOT_COMPILED = ("iterations", "checkpoint_every", "data_dir", "metrics_format", "seed",
                 "theta_init", "preset", "tasks", "shard")
_STEP_CACHE: dict[tuple, Callable] = {}
_COMPILED: dict[tuple, Any] = {}


def _state_shardings(pes, mesh):
    """A TrainerState of shardings: particles split along the mesh axis, the rest replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from celo2.metatrain.pes import PARTICLE_AXIS

    template = jax.eval_shape(lambda: pes.init(np.zeros(spec.NUM_THETA_PARAMS, np.float32), 0))
    part = NamedSharding(mesh, PartitionSpec(PARTICLE_AXIS))
    rep = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree_util.tree_map(lambda _: rep, template)
    return shardings._replace(particles=jax.tree_util.tree_map(lambda _: part, template.particles))


def _jitted_iteration(pes, mesh, inner_optimizer) -> Callable:
    """One jitted iteration per computation, shared by trainers of equal configs.

    Compiling the iteration takes XLA 10-30 s on a CPU; a resumed run, or a
    second trainer in the same process, reuses the first one's executable.
    """
    import jax

    cfg = pes.config.to_dict()
    key = (
        json.dumps({k: v for k, v in cfg.items() if k not in _NOT_COMPILED}, sort_keys=True),
        pes.num_tasks, pes.in_dim, id(inner_optimizer) if inner_optimizer is not None else None,
        None if mesh is None else tuple(d.id for d in mesh.devices.flat),
    )
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) >= 8:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        kwargs = {}
        if mesh is not None:
            # Pin the output layout to the input layout, so that every iteration
            # runs the same executable (compiled ahead of time).
            from jax.sharding import NamedSharding, PartitionSpec

            kwargs["out_shardings"] = (_state_shardings(pes, mesh), NamedSharding(mesh, PartitionSpec()))
        _STEP_CACHE[key] = jax.jit(lambda s, X, y, n: pes.iteration(s, X, y, n, mesh=mesh), **kwargs)
    return _STEP_CACHE[key]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _check_fresh(run: Path, resume: bool) -> None:
    """A new run needs an empty (or missing) folder; only ``resume`` continues one."""
    if run.is_dir() and not resume and any(p.name != LOCK_NAME for p in run.iterdir()):
        raise RunDirError(
            f"run folder {run} is not empty; pass --resume to continue it or choose another --out")


def _check_same_run(saved: MetaTrainConfig, current: MetaTrainConfig, origin: str) -> None:
    a, b = saved.to_dict(), current.to_dict()
    changed = [k for k in a if k not in RESUMABLE_KEYS and k != "preset" and a[k] != b.get(k)]
    if changed:
        raise CheckpointError(
            f"{origin}: the run was started with a different configuration: "
            + ", ".join(f"{k}={a[k]!r} (now {b.get(k)!r})" for k in changed)
            + f"; only {', '.join(RESUMABLE_KEYS)} may change on resume")


class _MetricsWriter:
    """Appends rows as JSON lines or CSV; flushed at checkpoints."""

    FIELDS = ("iteration", "meta_loss", "grad_norm", "inner_steps_per_s", "wall_time_s",
              "resets", "nonfinite_losses")

    def __init__(self, path: Path, fmt: str):
        self.fmt = fmt
        new = not path.exists() or path.stat().st_size == 0
        self.fh = open(path, "a", newline="")
        self.csv = None
        if fmt == "csv":
            self.csv = csv.DictWriter(self.fh, fieldnames=self.FIELDS)
            if new:
                self.csv.writeheader()

    def write(self, row: dict) -> None:
        if self.csv is not None:
            self.csv.writerow(row)
        else:
            self.fh.write(json.dumps(row) + "\n")

    def flush(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())

    def close(self) -> None:
        self.flush()
        self.fh.close()


def read_metrics(run_dir: str | os.PathLike, warn: Callable[[str], None] | None = None) -> list[dict]:
    """The metrics rows of a run folder (JSON lines or CSV).

    Args:
        run_dir: the run folder.
        warn: called with a message naming the file and line of each line that is not a metrics
            row (a line cut short by a kill, or damaged); such lines are skipped either way.

    Returns:
        The rows, in file order.

    Raises:
        RunDirError: the folder has no metrics file.
    """
    run = Path(run_dir)

    def bad(path: Path, lineno: int, text: str) -> None:
        if warn is not None:
            warn(f"warning: {path}:{lineno}: not a metrics row, skipped: {text[:80]!r}")

    if (run / "metrics.jsonl").exists():
        path = run / "metrics.jsonl"
        rows = []
        for lineno, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                row = json.loads(line)
                int(row["iteration"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                bad(path, lineno, line)
                continue
            rows.append(row)
        return rows
    if (run / "metrics.csv").exists():
        path = run / "metrics.csv"
        with open(path, newline="", errors="replace") as fh:
            rows = []
            reader = csv.DictReader(fh)
            for r in reader:
                try:
                    row = {k: float(v) for k, v in r.items()}
                    int(row["iteration"])
                except (TypeError, ValueError, KeyError, AttributeError):
                    bad(path, reader.line_num, ",".join(str(v) for v in r.values()))
                    continue
                rows.append(row)
            return rows
    raise RunDirError(f"{run}: no metrics.jsonl or metrics.csv (is this a meta-train run folder?)")


def _truncate_metrics(path: Path, iteration: int, log: Callable[[str], None]) -> None:
    """Drop rows after ``iteration`` (logged by a killed run after its last checkpoint).

    Lines that are not metrics rows are dropped from the file, with a warning
    naming each: a row that cannot be parsed cannot be plotted or resumed from,
    and rows after the checkpoint are computed again anyway. Their text is kept
    in ``RUN_DIR/metrics.rejected.txt``, so nothing is destroyed.
    """
    if not path.exists():
        return
    rejected: list[str] = []

    def warn(msg: str) -> None:
        rejected.append(msg)
        log(msg)

    try:
        rows = [r for r in read_metrics(path.parent, warn) if int(r["iteration"]) <= iteration]
    except RunDirError:
        return
    if rejected:
        with open(path.parent / "metrics.rejected.txt", "a") as fh:
            fh.write("".join(m + "\n" for m in rejected))
    buf = io.StringIO()
    if path.suffix == ".csv":
        w = csv.DictWriter(buf, fieldnames=_MetricsWriter.FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: (int(r[k]) if k in ("iteration", "resets", "nonfinite_losses") else r[k])
                        for k in _MetricsWriter.FIELDS if k in r})
    else:
        for r in rows:
            buf.write(json.dumps(r) + "\n")
    atomic_write_bytes(path, buf.getvalue().encode())


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
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def meta_train(config: MetaTrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
               progress: bool = True, data: TaskData | None = None,
               inner_optimizer: Callable | None = None, stop_after: int | None = None,
               log: Callable[[str], None] | None = None) -> MetaTrainResult:
    """Meta-train theta with PES under ``config`` into the run folder ``out_dir``.

    With ``resume``, the configuration saved in ``out_dir/config.json`` must
    agree with ``config`` except for :data:`RESUMABLE_KEYS`.
    """
    run = Path(out_dir)
    if resume and (run / "config.json").is_file():
        saved = MetaTrainConfig.from_dict(json.loads((run / "config.json").read_text()))
        _check_same_run(saved, config, origin=str(run / "config.json"))
    log = log or _stderr
    _check_fresh(run, resume)
    # The folder is claimed before the data are loaded: a folder in use is reported at once.
    with _DeferredInterrupt() as interrupt, RunLock(run, flag="run folder", log=log):
        trainer = MetaTrainer(config, data=data, inner_optimizer=inner_optimizer)
        return trainer._train_locked(run, interrupt, resume=resume, progress=progress, log=log,
                                     stop_after=stop_after)


__all__ = [
    "CheckpointError", "CorruptCheckpointError", "MetaTrainInterrupted", "MetaTrainResult", "MetaTrainer",
    "RESUMABLE_KEYS", "RunDirError",
    "meta_train", "read_metrics",
]
