"""The bench report's PNGs: loss curves at each optimizer's best cell, final loss against LR, and the
LR x weight-decay heat map where weight decay was searched. Matplotlib is optional: without it no
plot is written and the report says so."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Sequence

from celo2.eval.runner import RunSpec
from celo2.eval.selection import OptimizerResult, edge_label

def _mean_curve(recs: list[dict[str, Any]], which: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of a stored curve (only at steps every seed reached)."""
    if not recs:
        return [], []
    curves = [r[which] for r in recs]
    n = min(len(c["step"]) for c in curves)
    steps = curves[0]["step"][:n]
    return steps, [sum(c["loss"][i] for c in curves) / len(curves) for i in range(n)]


def write_plots(run_dir: Path, summary: dict[str, dict[str, OptimizerResult]], specs: Sequence[RunSpec],
                records: dict[str, dict[str, Any]], metrics: dict[str, str]) -> dict[str, list[str]]:
    """Two PNGs per task (curves at the best cell, final loss vs LR at the best weight decay), and a
    third, an LR x weight-decay heat map, for a task where weight decay was searched. Returns file
    names per task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    by_cell: dict[tuple[str, str, float, float], list[dict[str, Any]]] = {}
    for s in specs:
        if s.key in records:
            by_cell.setdefault((s.task, s.optimizer, s.lr, s.weight_decay), []).append(records[s.key])
    files: dict[str, list[str]] = {}
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = ["o", "s", "^", "v", "D", "P", "X", "*"]
    for task, per_task in summary.items():
        names = []
        # Loss curves at each optimizer's best LR.
        fig, ax = plt.subplots(figsize=(7, 4.5))
        all_pos = True
        for i, (name, res) in enumerate(per_task.items()):
            if res.best_lr is None:
                continue
            recs = by_cell.get((task, name, res.best_lr, res.best_wd), [])
            c = colors[i % len(colors)]
            xs, ys = _mean_curve(recs, "train_curve")
            at = f"lr={res.best_lr:g}" + (f", wd={res.best_wd:g}" if res.searched_wd else "")
            ax.plot(xs, ys, color=c, alpha=0.55, lw=1, label=f"{name} train ({at})")
            vx, vy = _mean_curve(recs, "val_curve")
            ax.plot(vx, vy, color=c, marker=markers[i % len(markers)], ms=3, lw=1.5, label=f"{name} val")
            all_pos &= all(v > 0 for v in ys + vy)
        if all_pos:
            from matplotlib.ticker import ScalarFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss: {metrics.get(task, 'loss')}".replace("val ", ""))
        best_what = "(LR, WD)" if any(r.searched_wd for r in per_task.values()) else "LR"
        ax.set_title(f"{task}: each optimizer at its best {best_what} (lines: train, dots: val; mean over seeds)",
                     fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fname = f"curves_{task}.png"
        fig.savefig(run_dir / fname, dpi=110)
        plt.close(fig)
        names.append(fname)

        # Final validation loss against LR (stability across the grid).
        fig, ax = plt.subplots(figsize=(7, 4.5))
        inits = [r["val_curve"]["loss"][0] for cell in by_cell.values() for r in cell
                 if r["config"]["task"] == task and r["val_curve"]["loss"]]
        finite_inits = [v for v in inits if math.isfinite(v)]
        top = 1.3 * statistics.median(finite_inits) if finite_inits else None
        plotted: list[float] = []
        for i, (name, res) in enumerate(per_task.items()):
            c = colors[i % len(colors)]
            xs, ys, cap_x = [], [], []
            wd = res.best_wd if res.best_wd is not None else res.wd_grid[0]
            for lr in res.grid:
                if (lr, wd) not in res.losses:
                    continue
                m = res.mean_at(lr, wd)
                if math.isfinite(m) and (top is None or m <= top):
                    xs.append(lr)
                    ys.append(m)
                else:
                    cap_x.append(lr)
            label = f"{name} (wd={wd:g})" if res.searched_wd else name
            ax.plot(xs, ys, color=c, marker=markers[i % len(markers)], label=label, alpha=0.85)
            plotted += ys
            if cap_x and top is not None:
                ax.plot(cap_x, [top] * len(cap_x), color=c, marker="x", ls="none", ms=8)
        ax.set_xscale("log")
        if plotted and min(plotted) > 0 and max(plotted) / min(plotted) > 3:
            ax.set_yscale("log")
        if top is not None:
            ax.set_ylim(top=top * 1.02)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(f"final {metrics.get(task, 'loss')}")
        ax.set_title(f"{task}: final loss vs LR" + (" at the best WD" if best_what != "LR" else "")
                     + " (x at top: diverged or worse than init)", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fname = f"lr_{task}.png"
        fig.savefig(run_dir / fname, dpi=110)
        plt.close(fig)
        names.append(fname)
        if best_what != "LR":
            fname = f"lr_wd_{task}.png"
            _heat_map(plt, run_dir / fname, task, per_task, top, metrics.get(task, "loss"))
            names.append(fname)
        files[task] = names
    return files


def _heat_map(plt, path: Path, task: str, per_task: dict[str, OptimizerResult], top: float | None,
              metric: str) -> None:
    """One panel per optimizer: mean final loss over its LR x weight-decay cells, one shared log colour
    scale, the best cell boxed; grey cells diverged, were worse than ``top`` (1.3 x the initial loss)
    or were not run."""
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle

    results = [r for r in per_task.values() if r.grid and r.wd_grid]
    finite = [m for r in results for c in r.cells() if math.isfinite(m := r.mean_at(*c))
              and (top is None or m <= top)]
    if not results or not finite:
        return
    lo, hi = min(finite), max(finite)
    norm = LogNorm(lo, hi) if lo > 0 and hi > lo else Normalize(lo, hi if hi > lo else lo + 1)
    n = len(results)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 0.8, 3.4 * rows + 0.5), squeeze=False,
                             layout="constrained")
    cmap = plt.get_cmap("viridis").with_extremes(bad="0.8")
    im = None
    for ax, res in zip(axes.flat, results):
        grid = np.full((len(res.wd_grid), len(res.grid)), np.nan)
        for j, lr in enumerate(res.grid):
            for i, wd in enumerate(res.wd_grid):
                m = res.mean_at(lr, wd)
                if (lr, wd) in res.losses and math.isfinite(m) and (top is None or m <= top):
                    grid[i, j] = m
                    ax.text(j, i, f"{m:.3g}", ha="center", va="center", fontsize=7,
                            color="w" if norm(m) < 0.5 else "k")
                else:
                    ax.text(j, i, "x" if (lr, wd) in res.losses else "-", ha="center", va="center", fontsize=8)
        im = ax.imshow(np.ma.masked_invalid(grid), origin="lower", cmap=cmap, norm=norm, aspect="auto")
        if res.best_lr is not None:
            j, i = res.grid.index(res.best_lr), res.wd_grid.index(res.best_wd)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
        ax.set_xticks(range(len(res.grid)), [f"{x:g}" for x in res.grid], fontsize=7, rotation=30)
        ax.set_yticks(range(len(res.wd_grid)), [f"{x:g}" for x in res.wd_grid], fontsize=7)
        ax.set_xlabel("peak LR", fontsize=8)
        ax.set_ylabel("weight decay", fontsize=8)
        edges = edge_label(res)
        ax.set_title(res.optimizer + (f" [{edges}]" if edges else ""), fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85, label=f"final {metric}")
    fig.suptitle(f"{task}: final loss per (LR, WD) cell, mean over seeds (red: best; x: diverged or worse "
                 "than init; -: not run)", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)
