"""``celo2 meta-train plot RUN_DIR``: the meta-loss curve of a run as a PNG."""

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
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    path = Path(out) if out is not None else run / "meta_loss.png"
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


__all__ = ["plot_run"]
