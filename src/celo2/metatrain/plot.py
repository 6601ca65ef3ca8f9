"""PNGs of meta-training: runs' meta-loss curves (``celo2 meta-train plot RUN_DIR...``) and thetas' scores."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from celo2._io import atomic_write_bytes
from celo2.metatrain.trainer import RunDirError, read_metrics


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, smooth: int | None = None) -> Path:
    """Draw one run's meta-loss against iteration (raw and a moving average).

    Args:
        run_dir: a meta-training run folder (its metrics file is read).
        out: PNG path (default ``RUN_DIR/meta_loss.png``).
        smooth: moving-average window in iterations (default: 1/50 of the run).

    Returns:
        The PNG's path.

    Raises:
        RunDirError: the folder is missing or its metrics file holds no rows.
    """
    run = Path(run_dir)
    return plot_runs({run.name: run}, Path(out) if out is not None else run / "meta_loss.png", smooth,
                     title=f"PES meta-training: {run.name}", raw=True)


def plot_runs(runs: dict[str, str | os.PathLike], out: str | os.PathLike, smooth: int | None = None, *,
              title: str | None = None, raw: bool | None = None) -> Path:
    """Draw several runs' meta-loss curves on one axis, so recipes can be compared at equal iterations.

    A PES meta-loss is noisy from one iteration to the next; each curve is drawn as a moving average (and,
    for a single run or with ``raw=True``, the raw values faintly behind it).

    Args:
        runs: label -> run folder, in the order of the legend.
        out: PNG path.
        smooth: moving-average window in iterations (default: 1/50 of the longest run).
        title: the plot's title (default: names the number of runs).
        raw: also draw the raw values (default: only when there is one run).

    Returns:
        The PNG's path.

    Raises:
        RunDirError: a folder is missing or its metrics file holds no rows (named).
        ValueError: ``runs`` is empty.
    """
    if not runs:
        raise ValueError("plot_runs: no runs given")
    curves = {}
    for label, run_dir in runs.items():
        run = Path(run_dir)
        if not run.is_dir():
            raise RunDirError(f"run folder not found: {run}")
        rows = read_metrics(run)
        if not rows:
            raise RunDirError(f"{run}: the metrics file holds no rows yet")
        curves[label] = (np.asarray([r["iteration"] for r in rows], float),
                         np.asarray([r["meta_loss"] for r in rows], float))
    raw = len(curves) == 1 if raw is None else raw
    window = smooth or max(1, max(len(loss) for _, loss in curves.values()) // 50)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for k, (label, (it, loss)) in enumerate(curves.items()):
        color = f"C{k % 10}"
        if raw:
            ax.plot(it, loss, lw=0.6, alpha=0.35, color=color, label=f"{label}: meta-loss" if len(curves) > 1 else
                    "meta-loss")
        if window > 1 and len(loss) >= window:
            avg = np.convolve(loss, np.ones(window) / window, mode="valid")
            ax.plot(it[window - 1:], avg, lw=1.6, color=color,
                    label=label if len(curves) > 1 else f"moving average ({window})")
        elif not raw:
            ax.plot(it, loss, lw=1.2, color=color, label=label)
    ax.set_xlabel("outer iteration")
    ax.set_ylabel("meta-loss (clipped mean training loss)")
    smoothed = f", moving averages of {window} iterations" if len(curves) > 1 and window > 1 else ""
    ax.set_title((title or f"PES meta-training: {len(curves)} runs") + smoothed, fontsize=10 if smoothed else None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8 if len(curves) > 3 else 10)
    return _save(fig, Path(out))


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


__all__ = ["plot_run", "plot_runs", "plot_scores"]
