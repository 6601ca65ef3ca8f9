"""The bench report: best (LR, weight decay) per optimizer, edge-of-grid flags, tables, plots, machine info.

The selection follows the paper's protocol: for each task and optimizer, the
final validation loss is averaged over seeds in every cell (peak LR, weight
decay) of the grid (a diverged seed makes that cell's mean infinite) and the
cell with the lowest mean wins. A best LR at either end of its grid is
flagged: the optimum may lie beyond it, so that optimizer's number is not
tuned. With a weight-decay grid (more than one value), a best weight decay at
either end is flagged the same way; at a lowest value of 0 (no decay) the
flag is informative only, since no lower value exists. With one weight decay
per optimizer (fixed, not searched) the report reads as it did before
weight-decay grids existed.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from celo2._io import atomic_write_text
from celo2._provenance import git_commit
from celo2.eval.runner import RunSpec

EDGE_LOW, EDGE_HIGH, EDGE_SINGLE = "low", "high", "single"


@dataclass
class OptimizerResult:
    """One optimizer on one task, summarised over its (LR, weight decay) grid and seeds.

    ``grid`` holds the LRs and ``wd_grid`` the weight decays; ``losses`` maps a
    cell ``(lr, wd)`` to the final validation loss of each finished seed.
    ``edge`` is the LR edge flag of the best cell and ``wd_edge`` its weight
    decay's (None when the weight decay was one fixed value).
    """

    optimizer: str
    grid: list[float]
    losses: dict[tuple[float, float], list[float]] = field(default_factory=dict)
    step_ms: list[float] = field(default_factory=list)  # per finished run, any cell
    expected_runs: int = 0
    wd_grid: list[float] = field(default_factory=list)
    best_lr: float | None = None
    best_wd: float | None = None
    best_mean: float = math.inf
    best_std: float = 0.0
    edge: str | None = None
    wd_edge: str | None = None

    @property
    def done_runs(self) -> int:
        return sum(len(v) for v in self.losses.values())

    @property
    def complete(self) -> bool:
        return self.done_runs >= self.expected_runs

    @property
    def searched_wd(self) -> bool:
        """Whether weight decay was a grid (more than one value) rather than fixed."""
        return len(self.wd_grid) > 1

    def cells(self) -> list[tuple[float, float]]:
        """Every (lr, wd) of the grid, LR-major, both ascending."""
        return [(lr, wd) for lr in sorted(self.grid) for wd in sorted(self.wd_grid)]

    def mean_at(self, lr: float, wd: float | None = None) -> float:
        """Mean final loss over seeds in cell ``(lr, wd)`` (``wd`` None: the best cell's weight decay,
        or the only one); infinite when a seed diverged or none finished."""
        if wd is None:
            wd = self.best_wd if self.best_wd is not None else (self.wd_grid[0] if self.wd_grid else 0.0)
        vals = self.losses.get((lr, wd), [])
        if not vals or any(not math.isfinite(v) for v in vals):
            return math.inf
        return sum(vals) / len(vals)

    @property
    def diverged_cells(self) -> list[tuple[float, float]]:
        return [c for c in self.cells() if any(not math.isfinite(v) for v in self.losses.get(c, []))]

    @property
    def diverged_lrs(self) -> list[float]:
        """LRs where a seed diverged in some cell."""
        return sorted({lr for lr, _ in self.diverged_cells})


def edge_flag(best_lr: float | None, grid: Sequence[float]) -> str | None:
    """``"low"``/``"high"`` when the best LR is the grid's end, ``"single"`` for a 1-point grid."""
    if best_lr is None or not grid:
        return None
    values = sorted(set(grid))
    if len(values) == 1:
        return EDGE_SINGLE
    if math.isclose(best_lr, values[0], rel_tol=1e-9):
        return EDGE_LOW
    if math.isclose(best_lr, values[-1], rel_tol=1e-9):
        return EDGE_HIGH
    return None


def select_best(res: OptimizerResult) -> OptimizerResult:
    """Fill ``best_*``, ``edge`` and ``wd_edge`` from ``losses`` (ties go to the smaller LR, then the
    smaller weight decay). A result without ``wd_grid`` takes the weight decays of its cells; ``losses``
    keyed by LR alone (a result written before weight-decay grids) become cells at its one weight
    decay (``wd_grid[0]``, else 0)."""
    if any(not isinstance(k, tuple) for k in res.losses):
        wd0 = res.wd_grid[0] if res.wd_grid else 0.0
        res.losses = {(k if isinstance(k, tuple) else (k, wd0)): v for k, v in res.losses.items()}
    if not res.wd_grid:
        res.wd_grid = sorted({wd for _, wd in res.losses}) or [0.0]
    best_cell, best = None, math.inf
    for lr, wd in res.cells():
        m = res.mean_at(lr, wd)
        if m < best:
            best_cell, best = (lr, wd), m
    res.best_lr, res.best_wd = best_cell if best_cell else (None, None)
    res.best_mean = best
    vals = res.losses.get(best_cell, []) if best_cell is not None else []
    res.best_std = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    res.edge = edge_flag(res.best_lr, res.grid)
    res.wd_edge = edge_flag(res.best_wd, res.wd_grid) if res.searched_wd else None
    return res


def summarize(specs: Iterable[RunSpec], records: dict[str, dict[str, Any]]) -> dict[str, dict[str, OptimizerResult]]:
    """``{task: {optimizer: OptimizerResult}}`` over the planned ``specs`` (in plan order)."""
    out: dict[str, dict[str, OptimizerResult]] = {}
    for spec in specs:
        res = out.setdefault(spec.task, {}).setdefault(spec.optimizer, OptimizerResult(spec.optimizer, []))
        if spec.lr not in res.grid:
            res.grid.append(spec.lr)
        if spec.weight_decay not in res.wd_grid:
            res.wd_grid.append(spec.weight_decay)
        res.expected_runs += 1
        rec = records.get(spec.key)
        if rec is not None:  # the cell comes from the plan's spec: a record needs no weight_decay of its own
            res.losses.setdefault((spec.lr, spec.weight_decay), []).append(float(rec["final_val_loss"]))
            if rec.get("step_ms") and rec["status"] == "ok":
                res.step_ms.append(float(rec["step_ms"]))
    for per_task in out.values():
        for res in per_task.values():
            res.grid.sort()
            res.wd_grid.sort()
            select_best(res)
    return out


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "diverged"
    return f"{x:.{digits}g}"


def _edge_text(res: OptimizerResult) -> str:
    if res.best_lr is None:
        return "**diverged at every LR**" if not res.searched_wd else "**diverged in every cell**"
    texts = [{
        EDGE_LOW: "**edge: lowest LR** (not tuned)",
        EDGE_HIGH: "**edge: highest LR** (not tuned)",
        EDGE_SINGLE: "**one LR only** (not tuned)",
    }.get(res.edge, "")]
    if res.wd_edge == EDGE_HIGH:
        texts.append("**edge: highest WD** (not tuned)")
    elif res.wd_edge == EDGE_LOW:
        texts.append("edge: lowest WD (0: no decay)" if res.best_wd == 0 else "**edge: lowest WD** (not tuned)")
    return "; ".join(t for t in texts if t)


def untuned(res: OptimizerResult) -> bool:
    """Whether the best cell lies on an edge that the grid could extend past (any LR edge, a top WD,
    or a bottom WD above 0)."""
    return bool(res.edge) or res.wd_edge == EDGE_HIGH or (res.wd_edge == EDGE_LOW and bool(res.best_wd))


def edge_label(res: OptimizerResult) -> str:
    """Short text of the best cell's edges, e.g. ``"LR low, WD high"`` (empty inside the grid)."""
    parts = []
    if res.edge in (EDGE_LOW, EDGE_HIGH):
        parts.append(f"LR {res.edge}")
    elif res.edge == EDGE_SINGLE:
        parts.append("one LR")
    if res.wd_edge in (EDGE_LOW, EDGE_HIGH):
        parts.append(f"WD {res.wd_edge}" + (" (0)" if res.wd_edge == EDGE_LOW and res.best_wd == 0 else ""))
    return ", ".join(parts)


def ratio(a: float, b: float) -> float:
    """``a / b`` for losses, inf/nan-safe (nan when undefined)."""
    if not math.isfinite(a):
        return math.inf if (math.isfinite(b) and b > 0) else math.nan
    if not math.isfinite(b) or b <= 0:
        return math.nan
    return a / b


def task_winners(per_task: dict[str, OptimizerResult]) -> list[str]:
    """Optimizers with the lowest best loss on a task (several on an exact tie)."""
    best = min((r.best_mean for r in per_task.values()), default=math.inf)
    if not math.isfinite(best):
        return []
    return [name for name, r in per_task.items() if r.best_mean == best]


# -- environment -------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment_info(threads: int, jobs: int) -> dict[str, Any]:
    """Machine and versions: enough to tell whether two reports are comparable."""
    import numpy
    import torch

    import celo2

    versions = {"python": sys.version.split()[0], "celo2": celo2.__version__, "torch": torch.__version__,
                "numpy": numpy.__version__}
    for mod in ("scipy", "sklearn", "matplotlib", "tqdm"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional packages
            pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads_per_run": threads,
        "parallel_runs": jobs,
        "versions": versions,
        "git_commit": git_commit(),
    }


# -- writing -------------------------------------------------------------------


def write_csv(path: Path, specs: Sequence[RunSpec], records: dict[str, dict[str, Any]]) -> None:
    """One row per finished run of the plan, config flattened."""
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "task", "optimizer", "theta", "theta_checksum", "lr", "weight_decay", "seed", "steps",
                "status", "final_val_loss", "final_train_loss", "diverged_at_step", "wall_s", "task_config"])
    for s in specs:
        r = records.get(s.key)
        if r is None:
            continue
        w.writerow([s.key, s.task, s.optimizer, s.theta.label if s.theta else "", s.theta.checksum if s.theta else "",
                    repr(s.lr), repr(s.weight_decay), s.seed, s.task_config["steps"], r["status"],
                    repr(float(r["final_val_loss"])), repr(float(r.get("final_train_loss", math.inf))),
                    "" if r.get("diverged_at_step") is None else r["diverged_at_step"], r.get("wall_s", ""),
                    json.dumps(s.task_config, sort_keys=True)])
    atomic_write_text(path, buf.getvalue())


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


def render_markdown(
    summary: dict[str, dict[str, OptimizerResult]],
    specs: Sequence[RunSpec],
    records: dict[str, dict[str, Any]],
    meta: dict[str, Any],
    plots: dict[str, list[str]],
) -> str:
    """The report's Markdown text."""
    from celo2.eval.tasks import TASKS

    lines: list[str] = []
    add = lines.append
    add(f"# Celo2 bench: suite `{meta.get('suite', '?')}`")
    add("")
    if meta.get("command"):
        add(f"Command: `{meta['command']}`")
        add("")
    total = len({s.key for s in specs})
    done = sum(1 for k in {s.key for s in specs} if k in records)
    add(f"Runs: {done} of {total} planned runs finished" + ("." if done == total else " (**incomplete**: rerun the same command to resume)."))
    add("")
    searched = any(r.searched_wd for per_task in summary.values() for r in per_task.values())
    if searched:
        add("Protocol: every optimizer trains every task from the same initialisation and data order "
            "(per seed) for the same number of steps, with linear warmup over the first 5% of steps then "
            "cosine decay to zero, in every cell of its grid of peak LR (log-spaced) x weight decay. The best "
            "cell per optimizer is the one with the lowest final validation loss averaged over seeds (a "
            "diverged seed counts as infinite). A best LR at the edge of its grid, or a best weight decay at "
            "the top of its grid (or at a bottom above 0), is flagged: that optimizer is not tuned there; a "
            "best weight decay of 0 at the bottom of its grid is noted (no decay wins). Weight decay follows "
            "each optimizer's own convention: decoupled and scaled by the LR (`p -= lr * wd * p`) for "
            "AdamW, Muon and Celo2 (both branches), an L2 term added to the gradient for Adam and SGD.")
    else:
        add("Protocol: every optimizer trains every task from the same initialisation and data order "
            "(per seed) for the same number of steps, with linear warmup over the first 5% of steps then "
            "cosine decay to zero, at each peak LR of its log-spaced grid. The best LR per optimizer is the one "
            "with the lowest final validation loss averaged over seeds (a diverged seed counts as infinite). "
            "Weight decay is fixed per optimizer (not swept). A best LR at the edge of its grid is flagged: "
            "that optimizer is not tuned there.")
    add("")
    thetas = meta.get("thetas") or []
    if thetas:
        add("Thetas (learned-optimizer weights):")
        add("")
        add("| label | source | sha256 (16 hex) |")
        add("| --- | --- | --- |")
        for t in thetas:
            add(f"| {t['label']} | `{t['source']}` | `{t['checksum']}` |")
        add("")
    grids = meta.get("grids", {})
    wds = meta.get("weight_decays", {})
    if grids:
        add("| optimizer | LR grid | weight decay |")
        add("| --- | --- | --- |")
        for name, grid in grids.items():
            wd = wds.get(name, "")
            wd_text = ", ".join(f"{x:g}" for x in wd) if isinstance(wd, (list, tuple)) else wd
            add(f"| {name} | {', '.join(f'{x:g}' for x in grid)} | {wd_text} |")
        add("")
    for name, options in (meta.get("optimizer_options") or {}).items():
        add(f"Optimizer options of {name}: " + ", ".join(f"`{k}={v:g}`" if isinstance(v, float) else f"`{k}={v}`"
                                                         for k, v in options.items()) + ".")
        add("")

    wins: dict[str, int] = {}
    for task, per_task in summary.items():
        info = TASKS.get(task)
        add(f"## Task `{task}`")
        add("")
        if info:
            add(f"{info.description}. Metric: {info.metric}, lower is better.")
        spec0 = next(s for s in specs if s.task == task)
        seeds = sorted({s.seed for s in specs if s.task == task})
        add(f"Steps: {spec0.task_config['steps']}, batch size: {spec0.task_config.get('batch_size', '?')}, "
            f"seeds: {', '.join(map(str, seeds))}. Config: `{json.dumps(spec0.task_config, sort_keys=True)}`.")
        sources = sorted({records[s.key]["data_source"] for s in specs if s.task == task and s.key in records})
        for src in sources:
            add(f"Data: {src}.")
        add("")
        adamw = per_task.get("adamw")
        winners = task_winners(per_task)
        for w in winners:
            wins[w] = wins.get(w, 0) + 1
        task_wd = any(r.searched_wd for r in per_task.values())
        add("| optimizer | best final val loss (mean ± std over seeds) | best LR | " + ("best WD | " if task_wd else "")
            + "ratio to AdamW | ms/step | flags |")
        add("| --- | --- | --- | --- | --- | --- |" + (" --- |" if task_wd else ""))
        for name, res in per_task.items():
            loss = _fmt(res.best_mean)
            if res.best_lr is not None and len(res.losses.get((res.best_lr, res.best_wd), [])) > 1:
                loss += f" ± {res.best_std:.2g}"
            if name in winners:
                loss = f"**{loss}** (best)"
            r = ratio(res.best_mean, adamw.best_mean) if adamw else math.nan
            flags = [_edge_text(res)]
            if res.searched_wd:
                div_cells = res.diverged_cells
                if div_cells:
                    flags.append(f"diverged in {len(div_cells)} of {len(res.cells())} cells")
            elif res.diverged_lrs:
                flags.append(f"diverged at LR {', '.join(f'{x:g}' for x in res.diverged_lrs)}")
            if not res.complete:
                flags.append(f"incomplete ({res.done_runs}/{res.expected_runs} runs)")
            ms = f"{statistics.median(res.step_ms):.3g}" if res.step_ms else "-"
            wd_cell = ("-" if res.best_wd is None else f"{res.best_wd:g}") + " | " if task_wd else ""
            add(f"| {name} | {loss} | {'-' if res.best_lr is None else f'{res.best_lr:g}'} | {wd_cell}"
                f"{'n/a' if math.isnan(r) else f'{r:.3f}'} | {ms} | {'; '.join(f for f in flags if f)} |")
        add("")
        add("ms/step: median wall time of one training step over this optimizer's runs (CPU; "
            "indicative only when the machine is shared).")
        add("")
        all_lrs = sorted({lr for res in per_task.values() for lr in res.grid})
        if task_wd:
            add("Final validation loss in every (LR, weight decay) cell (mean over seeds; columns: LR):")
            add("")
            add("| optimizer | WD | " + " | ".join(f"{lr:g}" for lr in all_lrs) + " |")
            add("| --- | --- |" + " --- |" * len(all_lrs))
        else:
            add("Final validation loss at every LR (mean over seeds):")
            add("")
            add("| optimizer | " + " | ".join(f"{lr:g}" for lr in all_lrs) + " |")
            add("| --- |" + " --- |" * len(all_lrs))
        for name, res in per_task.items():
            for wd in res.wd_grid:
                cells = []
                for lr in all_lrs:
                    if lr not in res.grid:
                        cells.append("")
                    elif (lr, wd) not in res.losses:
                        cells.append("(not run)")
                    else:
                        cell = _fmt(res.mean_at(lr, wd))
                        cells.append(f"**{cell}**" if (lr, wd) == (res.best_lr, res.best_wd) else cell)
                add(f"| {name} | " + (f"{wd:g} | " if task_wd else "") + " | ".join(cells) + " |")
        add("")
        for f in plots.get(task, []):
            add(f"![{f}]({f})")
        add("")

    add("## Summary across tasks")
    add("")
    optimizers = list(dict.fromkeys(o for per_task in summary.values() for o in per_task))
    tasks = list(summary)
    has_adamw = any("adamw" in per_task for per_task in summary.values())
    add(("Cells: best final validation loss divided by AdamW's on that task (below 1 beats AdamW); "
         "where AdamW's loss is 0 (a solved task, no ratio) a cell gives the optimizer's own loss as "
         "`= 0` or `abs VALUE`"
         if has_adamw else "Cells: best final validation loss (no AdamW in this run)")
        + ("; `*` marks a best LR at the edge of its grid or a best weight decay at an edge it could extend "
           "past (not tuned)" if searched else "; `*` marks a best LR at the edge of its grid (not tuned)")
        + "; wins count tasks where the optimizer had the lowest loss.")
    add("")
    head = "| optimizer | " + " | ".join(tasks) + " | geometric mean | wins | tasks beating AdamW |"
    add(head)
    add("| --- |" + " --- |" * (len(tasks) + 3))
    for o in optimizers:
        cells, logs, beats = [], [], 0
        for t in tasks:
            res = summary[t].get(o)
            if res is None:
                cells.append("")
                continue
            base = summary[t].get("adamw")
            val = ratio(res.best_mean, base.best_mean) if (has_adamw and base) else res.best_mean
            star = "*" if untuned(res) else ""
            if isinstance(val, float) and math.isnan(val):
                if base is not None and base.best_mean == 0 and math.isfinite(res.best_mean):
                    cells.append(("= 0" if res.best_mean == 0 else f"abs {res.best_mean:.3g}") + star)
                else:
                    cells.append("n/a")
            else:
                cells.append(("diverged" if not math.isfinite(val) else f"{val:.3f}") + star)
            if has_adamw and base and math.isfinite(val) and val > 0:
                logs.append(math.log(val))
                beats += val < 1 and o != "adamw"
        gm = f"{math.exp(sum(logs) / len(logs)):.3f}" if (has_adamw and logs) else "n/a"
        add(f"| {o} | " + " | ".join(cells) + f" | {gm} | {wins.get(o, 0)} | {beats if o != 'adamw' else '-'} |")
    add("")
    if searched:
        add("Best cell per optimizer and task: `LR / WD`, then the edges of the grid it lies on "
            "(LR low/high, WD low/high; WD low (0): no decay won); nothing after the cell: inside the grid.")
        add("")
        add("| optimizer | " + " | ".join(tasks) + " |")
        add("| --- |" + " --- |" * len(tasks))
        for o in optimizers:
            cells = []
            for t in tasks:
                res = summary[t].get(o)
                if res is None or res.best_lr is None:
                    cells.append("" if res is None else "diverged")
                    continue
                edges = edge_label(res)
                cells.append(f"{res.best_lr:g} / {res.best_wd:g}" + (f" ({edges})" if edges else ""))
            add(f"| {o} | " + " | ".join(cells) + " |")
        add("")

    env = meta.get("environment", {})
    if env:
        add("## Machine and versions")
        add("")
        for k in ("platform", "cpu", "cpu_count", "torch_threads_per_run", "parallel_runs", "git_commit"):
            add(f"- {k}: {env.get(k)}")
        add("- versions: " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()))
        if meta.get("wall_s") is not None:
            add(f"- wall time of the last invocation: {meta['wall_s']:.1f} s "
                f"({meta.get('executed', 0)} runs executed, the rest resumed from results.jsonl)")
        else:
            add("- this report was rewritten from results.jsonl (`--report-only`); the invocations that "
                "ran the runs are listed in bench.json")
        run_time = sum(records[s.key].get("wall_s", 0.0) for s in specs if s.key in records)
        add(f"- sum of per-run times over all finished runs: {run_time:.1f} s")
        add("")
    return "\n".join(lines) + "\n"


def write_report(run_dir: "str | Path", specs: Sequence[RunSpec], records: dict[str, dict[str, Any]],
                 meta: dict[str, Any]) -> dict[str, dict[str, OptimizerResult]]:
    """Write report.md, results.csv, PNGs and environment.json into ``run_dir``."""
    from celo2.eval.tasks import TASKS

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(specs, records)
    write_csv(run_dir / "results.csv", specs, records)
    plots = write_plots(run_dir, summary, specs, records, {k: v.metric for k, v in TASKS.items()})
    atomic_write_text(run_dir / "environment.json", json.dumps(meta.get("environment", {}), indent=2) + "\n")
    atomic_write_text(run_dir / "report.md", render_markdown(summary, specs, records, meta, plots))
    return summary
