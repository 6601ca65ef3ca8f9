"""PNGs of meta-training: a run's meta-loss curve (``celo2 meta-train plot RUN_DIR``) and thetas' scores."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from celo2._io import atomic_write_bytes
from celo2.metatrain.trainer import RunDirError, read_metrics


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, smooth: int | None = None) -> Path:
    """Draw meta-loss against iteration (raw and a moving average) to ``out`` (default ``RUN_DIR/meta_loss.png``)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"run folder not found: {run}")
    rows = read_metrics(run)
    if not rows:
        raise RunDirError(f"{run}: the metrics file holds no rows yet")
    it = np.asarray([r["iteration"] for r in rows], float)
    loss = np.asarray([r["meta_loss"] for r in rows], float)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(it, loss, lw=0.6, alpha=0.35, color="C0", label="meta-loss")
    window = smooth or max(1, len(loss) // 50)
    if window > 1 and len(loss) >= window:
        avg = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(it[window - 1:], avg, lw=1.6, color="C0", label=f"moving average ({window})")
    ax.set_xlabel("outer iteration")
    ax.set_ylabel("meta-loss (clipped mean training loss)")
    ax.set_title(f"PES meta-training: {run.name}")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, Path(out) if out is not None else run / "meta_loss.png")


def plot_scores(scores, out: str | os.PathLike) -> Path:
    """Each theta's meta-loss minus the first theta's, paired by run stream:
    the mean over tasks with a 95% interval (2 standard errors), and each task
    as a marker (``scores``: a :class:`celo2.metatrain.score.MetaLossScores`)."""
    plt = _pyplot()
    labels = scores.labels
    base = labels[0]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(labels) + 2.5), 4), dpi=120)
    diffs = [scores.paired_difference(label, base) for label in labels]
    ax.bar(x, [d for d, _ in diffs], yerr=[2 * e if np.isfinite(e) else 0.0 for _, e in diffs],
           color="0.8", edgecolor="0.4", capsize=4, label="mean over tasks (95% interval)")
    per_task = {label: scores.per_task(label) for label in labels}
    for t, task in enumerate(scores.tasks):
        diff = [per_task[label][task] - per_task[base][task] for label in labels]
        ax.plot(x + (t - (len(scores.tasks) - 1) / 2) * 0.12, diff, "o", ms=4, color=f"C{t}", label=task)
    ax.axhline(0.0, color="0.3", lw=0.8)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(f"meta-loss minus {base}'s (lower is better)")
    steps = scores.truncations * scores.truncation_length
    ax.set_title(f"Thetas on the meta-loss: {scores.runs_per_task} run streams per task x {steps:,} steps, seed {scores.seed}",
                 fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, Path(out))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Write the figure as a PNG, atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


__all__ = ["plot_run", "plot_scores"]
