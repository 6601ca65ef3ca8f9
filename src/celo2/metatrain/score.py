"""Scoring thetas on the meta-training objective, free of PES noise.

The meta-loss a PES run logs mixes theta's progress with the noise of its
perturbations and of whichever inner runs it happened to sample, so it cannot
tell two checkpoints, or a meta-trained theta and the published one, apart.
Here every theta trains the same inner runs (same data order, initial
weights, reparametrisation scales, lengths and starting offsets: common random
numbers), unperturbed, with no outer step, and the score is the meta-loss
itself: the clipped training loss averaged over every inner step. Differences
between thetas are paired run stream by run stream, so their standard errors
are far smaller than those of the scores.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from celo2._io import atomic_write_bytes
from celo2.metatrain.config import ConfigError, MetaTrainConfig
from celo2.metatrain.tasks import TaskData, load_task_data
from celo2.rule.theta import Theta
from celo2.theta_files import load_theta

DEFAULT_TRUNCATIONS = 400
"""Truncations per run stream: 400 x 50 = 20,000 inner steps, about 30 inner
runs of the default log-uniform lengths in [100, 2000]."""

_SCORE_SALT = 0x5C0E


@dataclass
class MetaLossScores:
    """Scores of several thetas on the same inner runs.

    ``streams[label]``: per run stream (``tasks x runs_per_task``, task-major),
    the mean clipped training loss over all its steps.
    """

    tasks: tuple[str, ...]
    runs_per_task: int
    truncations: int
    truncation_length: int
    seed: int
    streams: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return list(self.streams)

    def per_task(self, label: str) -> dict[str, float]:
        """Mean score of ``label`` on each task."""
        s = self.streams[label].reshape(len(self.tasks), self.runs_per_task)
        return {t: float(v) for t, v in zip(self.tasks, s.mean(axis=1))}

    def mean(self, label: str) -> float:
        """Mean over tasks (each task weighs the same, as in meta-training)."""
        return float(self.streams[label].mean())

    def stderr(self, label: str) -> float:
        """Standard error of :meth:`mean` over run streams."""
        return _stderr(self.streams[label])

    def paired_difference(self, label: str, baseline: str) -> tuple[float, float]:
        """``(mean, standard error)`` of ``label`` minus ``baseline``, paired by run stream."""
        d = self.streams[label] - self.streams[baseline]
        return float(d.mean()), _stderr(d)

    def to_dict(self) -> dict[str, Any]:
        base = self.labels[0] if self.streams else None
        return {
            "objective": "mean clipped training loss per inner step (the PES meta-loss), unperturbed theta",
            "tasks": list(self.tasks),
            "runs_per_task": self.runs_per_task,
            "truncations": self.truncations,
            "truncation_length": self.truncation_length,
            "inner_steps_per_stream": self.truncations * self.truncation_length,
            "seed": self.seed,
            "thetas": {
                label: {
                    "mean": self.mean(label),
                    "stderr": self.stderr(label),
                    "per_task": self.per_task(label),
                    "difference_to_first": None if label == base else dict(
                        zip(("mean", "stderr"), self.paired_difference(label, base))),
                    "seconds": self.seconds.get(label),
                    "streams": self.streams[label].tolist(),
                }
                for label in self.labels
            },
        }

    def table(self) -> str:
        """A Markdown table: per-task scores, the mean, and the paired difference to the first theta."""
        base = self.labels[0]
        head = ["theta", *self.tasks, "mean ± s.e.", f"minus {base} (paired)"]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for label in self.labels:
            cells = [label, *(f"{v:.4f}" for v in self.per_task(label).values()),
                     f"{self.mean(label):.4f} ± {self.stderr(label):.4f}"]
            if label == base:
                cells.append("-")
            else:
                d, e = self.paired_difference(label, base)
                cells.append(f"{d:+.4f} ± {e:.4f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        path = Path(path)
        atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())
        return path


def _stderr(x: np.ndarray) -> float:
    return float(np.std(x, ddof=1) / math.sqrt(x.size)) if x.size > 1 else float("nan")


def score_thetas(thetas: Mapping[str, Theta | str | None], config: MetaTrainConfig, *,
                 truncations: int = DEFAULT_TRUNCATIONS, runs_per_task: int | None = None,
                 seed: int | None = None, data: TaskData | None = None,
                 inner_optimizer: Callable | None = None, devices: list | None = None,
                 progress: bool = False) -> MetaLossScores:
    """Score each theta (label -> theta or anything :func:`celo2.load_theta`
    takes) on ``config``'s meta-training objective.

    Every theta trains the same ``runs_per_task`` run streams per task
    (default ``2 x pairs_per_task``: as many inner runs as a PES iteration of
    ``config`` steps) for ``truncations`` truncations of
    ``config.truncation_length`` steps; a stream starts a new inner run (fresh
    weights, scale and length, drawn from ``seed``) whenever one ends, as in
    meta-training. ``config``'s PES and outer-optimiser settings are unused.

    Each theta runs the rule of its own variant (``theta.variant``, recorded in its
    file), whatever ``config.variant`` says: thetas of different variants are scored
    side by side on the same inner runs.
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as PS

    from celo2.metatrain.pes import PARTICLE_AXIS, PES, clip_meta_loss, particle_mesh

    if not thetas:
        raise ConfigError("score: no theta to score")
    if truncations < 1:
        raise ConfigError(f"score: truncations={truncations}: must be >= 1")
    K = 2 * config.pairs_per_task if runs_per_task is None else runs_per_task
    if K < 2:
        raise ConfigError(f"score: runs_per_task={K}: must be >= 2 (the standard errors need two)")
    seed = config.seed if seed is None else seed
    loaded = {label: load_theta(t) for label, t in thetas.items()}
    data = data if data is not None else load_task_data(
        config.tasks, config.data_dir, config.image_size, config.num_classes)
    num_tasks = data.X.shape[0]
    P = num_tasks * K
    mesh = particle_mesh(devices if devices is not None else jax.devices(), P) if config.shard else None
    root = jax.random.fold_in(jax.random.PRNGKey(seed), _SCORE_SALT)
    clip = config.meta_loss_clip

    # Every random draw comes from the stream's global index, so the scores do
    # not depend on how many devices share the streams, and a device never
    # needs another's data (no collectives).
    def indices(n_local):
        first = jax.lax.axis_index(PARTICLE_AXIS) * n_local if mesh is not None else 0
        return first + jnp.arange(n_local)

    def stream_keys(base, idx, slot):
        return jax.vmap(lambda j: jax.random.fold_in(base, 3 * j + slot))(idx)

    def compiled_for(variant):
        """The jitted ``start`` and ``truncation`` of ``variant``'s rule."""
        pes = PES(config.replace(variant=variant), num_tasks, inner_optimizer, in_dim=data.X.shape[2])

        def start(theta, zeros):  # zeros: one per stream, laid out as the streams are
            idx = indices(zeros.shape[0])
            runs = jax.vmap(lambda k: pes._draw_run(k, theta))(stream_keys(root, idx, 0))
            if config.initial_offset_max > 0:
                offsets = jax.vmap(lambda k: jax.random.randint(k, (), 0, config.initial_offset_max, jnp.int32))(
                    stream_keys(root, idx, 1))
                runs = runs._replace(step=offsets)
            return runs

        def truncation(theta, particles, total, i, X, y, sizes):
            idx = indices(particles.step.shape[0])
            base = jax.random.fold_in(root, i)
            theta_p = jnp.broadcast_to(theta, idx.shape + theta.shape)
            particles, losses, _ = pes._unroll(theta_p, particles, stream_keys(base, idx, 0),
                                               stream_keys(base, idx, 1), idx // K, X, y, sizes)
            return particles, total + jnp.sum(clip_meta_loss(losses, clip), axis=0)

        if mesh is not None:
            part, rep = PS(PARTICLE_AXIS), PS()
            start = jax.shard_map(start, mesh=mesh, in_specs=(rep, part), out_specs=part)
            truncation = jax.shard_map(truncation, mesh=mesh, in_specs=(rep, part, part, rep, rep, rep, rep),
                                       out_specs=(part, part))
        return jax.jit(start), jax.jit(truncation)

    if mesh is not None:
        # The data on every device once, not resharded at every call.
        X, y, sizes = jax.device_put((data.X, data.y, data.sizes), NamedSharding(mesh, PS()))
        zeros = jax.device_put(np.zeros(P, np.float32), NamedSharding(mesh, PS(PARTICLE_AXIS)))
    else:
        X, y, sizes = jax.device_put((data.X, data.y, data.sizes))
        zeros = jnp.zeros(P, jnp.float32)
    compiled: dict = {}

    scores = MetaLossScores(tuple(data.names), K, truncations, config.truncation_length, seed)
    for number, (label, theta) in enumerate(loaded.items(), 1):
        t0 = time.perf_counter()
        if theta.variant not in compiled:
            compiled[theta.variant] = compiled_for(theta.variant)
        start, truncation = compiled[theta.variant]
        flat = jnp.asarray(theta.to_flat())
        particles, total = start(flat, zeros), zeros
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=truncations, desc=f"score {label} ({number}/{len(loaded)})", unit="trunc",
                       dynamic_ncols=True)
        for i in range(truncations):
            particles, total = truncation(flat, particles, total, i + 1, X, y, sizes)
            if bar is not None:
                bar.update(1)
                if (i + 1) % 20 == 0 or i + 1 == truncations:
                    steps = (i + 1) * config.truncation_length
                    bar.set_postfix(meta_loss=f"{float(jnp.mean(total)) / steps:.4f}")
        if bar is not None:
            bar.close()
        scores.streams[label] = np.asarray(total, np.float64) / (truncations * config.truncation_length)
        scores.seconds[label] = time.perf_counter() - t0
    return scores


__all__ = ["DEFAULT_TRUNCATIONS", "MetaLossScores", "score_thetas"]
