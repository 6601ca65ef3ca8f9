"""Runs of the bench: one run = one (task, optimizer, peak LR, seed); resumable.

Each finished run is appended as one JSON line to ``results.jsonl`` in the run
folder, keyed by a hash of its full config. A bench that is killed loses at
most the run in progress: on restart, runs whose key is already in the file
are skipped. A partial last line (a kill during a write) is moved to
``results.rejected.txt`` before the next append, so that it cannot corrupt the
following record and nothing is thrown away. A write that fails (a full disk)
raises an ``OSError`` naming ``results.jsonl``; the records before it stay whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from celo2.eval import optimizers as opt_registry
from celo2.eval import tasks as task_registry

#: Bumped when the protocol changes in a way that makes old results incomparable.
PROTOCOL = "celo2-bench-v1"
#: Points of the stored training curve (means over equal windows of steps).
CURVE_POINTS = 50
#: Validation evaluations during a run (plus one at step 0 and the final one).
EVAL_POINTS = 10
RESULTS_FILE = "results.jsonl"


@dataclass(frozen=True)
class ThetaRef:
    """A theta as the bench names it: label, where it came from, checksum."""

    label: str
    source: str
    checksum: str


@dataclass
class RunSpec:
    task: str
    task_config: dict[str, Any]
    optimizer: str  # display name, e.g. "adamw" or "celo2[published]"
    lr: float
    weight_decay: float
    seed: int
    theta: ThetaRef | None = None
    data_dir: str | None = None  # the resolved data folder of image tasks
    #: keyword arguments of the optimizer's factory beyond LR and weight decay (e.g. Celo2's
    #: adam_lr_mult); stored and hashed only when not empty, so runs without any keep their keys
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    _key: str | None = field(default=None, repr=False, compare=False)

    def config(self) -> dict[str, Any]:
        """The full config of the run, as stored and hashed."""
        import celo2

        cfg = {
            "protocol": PROTOCOL,
            "celo2_version": celo2.__version__,
            "task": self.task,
            "task_config": self.task_config,
            "data_dir": self.data_dir,
            "optimizer": self.optimizer,
            "optimizer_kind": opt_registry.optimizer_kind(self.optimizer),
            "theta": None
            if self.theta is None
            else {"label": self.theta.label, "source": self.theta.source, "checksum": self.theta.checksum},
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "schedule": {"warmup_fraction": opt_registry.WARMUP_FRACTION, "decay": "cosine-to-zero"},
            "eval_points": EVAL_POINTS,
        }
        if self.optimizer_options:
            cfg["optimizer_options"] = dict(sorted(self.optimizer_options.items()))
        return cfg

    @property
    def key(self) -> str:
        """Hash of the config minus where things live (theta file path, data folder path).

        The theta counts by checksum and the data by kind (files or built-in
        fallback), so a bench resumes after its inputs are moved.
        """
        if self._key is None:
            cfg = self.config()
            if cfg["theta"] is not None:
                cfg["theta"] = {k: v for k, v in cfg["theta"].items() if k != "source"}
            cfg["data_dir"] = None if self.data_dir is None else "files"
            blob = json.dumps(cfg, sort_keys=True, separators=(",", ":"))
            self._key = hashlib.sha256(blob.encode()).hexdigest()[:20]
        return self._key


def _finite(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x)


def run_one(spec: RunSpec, theta: Any = None, make_optimizer: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Train once and return the run's record (never raises on divergence).

    A non-finite training or validation loss ends the run with
    ``status="diverged"`` and an infinite final loss.

    Args:
        spec: The run: task, config, optimizer, peak LR, weight decay, seed.
        theta: The :class:`celo2.Theta` of ``spec.theta`` (None for optimizers without one).
        make_optimizer: Builds the optimizer instead of the registry, called as
            ``make_optimizer(model, lr=, weight_decay=, theta=)`` (the factory signature of
            :mod:`celo2.eval.optimizers`); for experiments with variants the registry does not
            hold (``benchmarks/cartpole_diagnosis.py``). ``spec.optimizer`` should then name
            the variant, since it keys the record.

    Returns:
        The run's record (config, status, final losses, curves, timings).
    """
    t0 = time.perf_counter()
    cfg = spec.task_config
    steps = int(cfg["steps"])
    problem = task_registry.build_problem(spec.task, cfg, spec.seed, spec.data_dir)
    model = problem.model
    if make_optimizer is None:
        optimizer = opt_registry.build_optimizer(spec.optimizer, model, spec.lr, spec.weight_decay, theta=theta,
                                                 **spec.optimizer_options)
    else:
        optimizer = make_optimizer(model, lr=spec.lr, weight_decay=spec.weight_decay, theta=theta)
    schedulers = opt_registry.make_schedulers(optimizer, steps)
    train_time = 0.0  # seconds inside training steps only (no data loading, no evaluation)

    eval_steps = sorted({int(round(i * steps / EVAL_POINTS)) for i in range(EVAL_POINTS + 1)})
    val_steps: list[int] = []
    val_losses: list[float] = []
    train_losses: list[float] = []
    status, diverged_at = "ok", None

    def evaluate(step: int) -> bool:
        v = problem.val_loss()
        val_steps.append(step)
        val_losses.append(v if math.isfinite(v) else math.inf)
        return math.isfinite(v)

    if not evaluate(0):
        status, diverged_at = "diverged", 0
    step = 0
    while status == "ok" and step < steps:
        ts = time.perf_counter()
        loss, value = problem.train_loss(step)
        if not (math.isfinite(value) and bool(torch.isfinite(loss.detach()).all())):
            status, diverged_at = "diverged", step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for s in schedulers:
            s.step()
        train_time += time.perf_counter() - ts
        train_losses.append(value)
        step += 1
        if step in eval_steps and step > 0 and not evaluate(step):
            status, diverged_at = "diverged", step
    if status == "ok" and not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        status, diverged_at = "diverged", steps

    # Training curve: means over CURVE_POINTS equal windows of the steps done.
    curve_steps, curve = [], []
    if train_losses:
        n = len(train_losses)
        edges = sorted({int(round(i * n / min(CURVE_POINTS, n))) for i in range(min(CURVE_POINTS, n) + 1)})
        for a, b in zip(edges[:-1], edges[1:]):
            curve_steps.append(b)
            curve.append(sum(train_losses[a:b]) / (b - a))

    final = val_losses[-1] if status == "ok" else math.inf
    return {
        "key": spec.key,
        "config": spec.config(),
        "status": status,
        "final_val_loss": final,
        "final_train_loss": curve[-1] if (curve and status == "ok") else math.inf,
        "diverged_at_step": diverged_at,
        "train_curve": {"step": curve_steps, "loss": curve},
        "val_curve": {"step": val_steps, "loss": val_losses},
        "data_source": problem.data_source,
        "wall_s": round(time.perf_counter() - t0, 3),
        "step_ms": round(1000 * train_time / max(1, len(train_losses)), 3),
        "torch_threads": torch.get_num_threads(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# -- storage ---------------------------------------------------------------------


def _to_json(obj: Any) -> Any:
    """Strict JSON: non-finite floats become null (the record's status says why)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    return obj


def _from_json(rec: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`_to_json` for the loss fields."""
    for k in ("final_val_loss", "final_train_loss"):
        if rec.get(k) is None:
            rec[k] = math.inf
    for c in ("train_curve", "val_curve"):
        if c in rec:
            rec[c]["loss"] = [math.inf if v is None else v for v in rec[c]["loss"]]
    return rec


class ResultStore:
    """``results.jsonl``: one record per finished run, append-only."""

    def __init__(self, run_dir: "str | Path"):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RESULTS_FILE

    def load(self) -> dict[str, dict[str, Any]]:
        """Records by key; unreadable lines (a run killed mid-write) are skipped with a warning."""
        out: dict[str, dict[str, Any]] = {}
        if not self.path.exists():
            return out
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rec = json.loads(line)
                    key = rec["key"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    print(f"warning: {self.path}:{lineno}: skipping an unreadable record", file=sys.stderr)
                    continue
                out[key] = _from_json(rec)
        return out

    @property
    def rejected_path(self) -> Path:
        """Where a partial last line is kept (``results.rejected.txt``)."""
        return self.run_dir / "results.rejected.txt"

    def _repair_tail(self) -> None:
        """Move a trailing partial line to :attr:`rejected_path`, so the next append starts on a fresh line."""
        if not self.path.exists():
            return
        with open(self.path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            f.seek(0)
            data = f.read()
            cut = data.rfind(b"\n") + 1
            with open(self.rejected_path, "ab") as kept:  # kept before it is cut: nothing is lost
                kept.write(data[cut:] + b"\n")
                kept.flush()
                os.fsync(kept.fileno())
            f.seek(cut)
            f.truncate()
        print(f"warning: {self.path}: moved a partial last record (an interrupted write) to {self.rejected_path}",
              file=sys.stderr)

    def append(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line, flushed to disk.

        Args:
            record: a finished run's record.

        Raises:
            OSError: the file cannot be written (a full disk, ...); ``exc.filename`` names it.
        """
        line = json.dumps(_to_json(record), sort_keys=True, allow_nan=False) + "\n"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._repair_tail()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            if exc.filename is not None:
                raise
            raise OSError(exc.errno, exc.strerror or str(exc), str(self.path)) from exc


# -- execution -------------------------------------------------------------------


def _init_worker(threads: int, parent_pid: int) -> None:
    """Worker setup: thread count, and exit as soon as the bench process is gone.

    A killed bench (SIGTERM, SIGKILL) cannot stop its workers; without this
    watchdog they would finish their runs as orphans, burning CPU for nothing.
    """
    import threading

    torch.set_num_threads(threads)

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="celo2-bench-parent-watch").start()


def _worker(spec: RunSpec, theta: Any, threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    return run_one(spec, theta)


def execute(
    specs: Iterable[RunSpec],
    store: ResultStore,
    thetas: dict[str, Any] | None = None,
    jobs: int = 1,
    threads: int = 1,
    progress: bool = True,
) -> tuple[dict[str, dict[str, Any]], int]:
    """Run every spec not already in ``store``; returns (records of ``specs``, runs executed)."""
    specs = list(specs)
    thetas = thetas or {}
    done = store.load()
    todo = [s for s in specs if s.key not in done]
    # Duplicate specs (same key) run once.
    seen: set[str] = set()
    todo = [s for s in todo if not (s.key in seen or seen.add(s.key))]

    from tqdm import tqdm

    bar = tqdm(
        total=len(specs),
        initial=len(specs) - len(todo),
        desc="bench runs",
        unit="run",
        disable=not progress,
        mininterval=1.0,
        dynamic_ncols=True,
    )

    def theta_of(spec: RunSpec) -> Any:
        return None if spec.theta is None else thetas[spec.theta.label]

    def finish(rec: dict[str, Any]) -> None:
        store.append(rec)
        done[rec["key"]] = rec
        c = rec["config"]
        loss = rec["final_val_loss"]
        bar.set_postfix_str(f"{c['task']} {c['optimizer']} lr={c['lr']:g} -> {loss:.4g}", refresh=False)
        bar.update(1)

    executed = 0
    try:
        if jobs <= 1:
            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                for spec in todo:
                    bar.set_postfix_str(f"{spec.task} {spec.optimizer} lr={spec.lr:g} seed={spec.seed}")
                    finish(run_one(spec, theta_of(spec)))
                    executed += 1
            finally:
                torch.set_num_threads(previous)
        else:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            pool = ProcessPoolExecutor(
                max_workers=jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=(threads, os.getpid())
            )
            try:
                futures = [pool.submit(_worker, s, theta_of(s), threads) for s in todo]
                for fut in as_completed(futures):
                    finish(fut.result())
                    executed += 1
            except BaseException:
                # Interrupted or a run failed: what finished is already on disk; drop the rest.
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            pool.shutdown(wait=True)
    finally:
        bar.close()
    return {s.key: done[s.key] for s in specs if s.key in done}, executed
