"""The bench report: best LR per optimizer, edge-of-grid flags, tables, plots, machine info.

The selection follows the paper's protocol: for each task and optimizer, the
final validation loss is averaged over seeds at every peak LR of the grid
(a diverged seed makes that LR's mean infinite) and the LR with the lowest
mean wins. A best LR at either end of its grid is flagged: the optimum may lie
beyond it, so that optimizer's number is not tuned.
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
    """One optimizer on one task, summarised over its LR grid and seeds."""

    optimizer: str
    grid: list[float]
    losses: dict[float, list[float]] = field(default_factory=dict)  # lr -> final val loss per seed
    step_ms: list[float] = field(default_factory=list)  # per finished run, any LR
    expected_runs: int = 0
    best_lr: float | None = None
    best_mean: float = math.inf
    best_std: float = 0.0
    edge: str | None = None

    @property
    def done_runs(self) -> int:
        return sum(len(v) for v in self.losses.values())

    @property
    def complete(self) -> bool:
        return self.done_runs >= self.expected_runs

    def mean_at(self, lr: float) -> float:
        vals = self.losses.get(lr, [])
        if not vals or any(not math.isfinite(v) for v in vals):
            return math.inf
        return sum(vals) / len(vals)

    @property
    def diverged_lrs(self) -> list[float]:
        return [lr for lr in self.grid if any(not math.isfinite(v) for v in self.losses.get(lr, []))]


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
    """Fill ``best_*`` and ``edge`` from ``losses`` (ties go to the smaller LR)."""
    best_lr, best = None, math.inf
    for lr in sorted(res.grid):
        m = res.mean_at(lr)
        if m < best:
            best_lr, best = lr, m
    res.best_lr, res.best_mean = best_lr, best
    vals = res.losses.get(best_lr, []) if best_lr is not None else []
    res.best_std = statistics.pstdev(vals) if len(vals) > 1 else 0.0
    res.edge = edge_flag(best_lr, res.grid)
    return res


def summarize(specs: Iterable[RunSpec], records: dict[str, dict[str, Any]]) -> dict[str, dict[str, OptimizerResult]]:
    """``{task: {optimizer: OptimizerResult}}`` over the planned ``specs`` (in plan order)."""
    out: dict[str, dict[str, OptimizerResult]] = {}
    for spec in specs:
        res = out.setdefault(spec.task, {}).setdefault(spec.optimizer, OptimizerResult(spec.optimizer, []))
        if spec.lr not in res.grid:
            res.grid.append(spec.lr)
        res.expected_runs += 1
        rec = records.get(spec.key)
        if rec is not None:
            res.losses.setdefault(spec.lr, []).append(float(rec["final_val_loss"]))
            if rec.get("step_ms") and rec["status"] == "ok":
                res.step_ms.append(float(rec["step_ms"]))
    for per_task in out.values():
        for res in per_task.values():
            res.grid.sort()
            select_best(res)
    return out


def _fmt(x: float, digits: int = 4) -> str:
    if x is None or not math.isfinite(x):
        return "diverged"
    return f"{x:.{digits}g}"


def _edge_text(res: OptimizerResult) -> str:
    if res.best_lr is None:
        return "**diverged at every LR**"
    return {
        EDGE_LOW: "**edge: lowest LR** (not tuned)",
        EDGE_HIGH: "**edge: highest LR** (not tuned)",
        EDGE_SINGLE: "**one LR only** (not tuned)",
    }.get(res.edge, "")


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
    """Two PNGs per task: curves at the best LR, final loss vs LR. Returns file names per task."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    by_cell: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    for s in specs:
        if s.key in records:
            by_cell.setdefault((s.task, s.optimizer, s.lr), []).append(records[s.key])
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
            recs = by_cell.get((task, name, res.best_lr), [])
            c = colors[i % len(colors)]
            xs, ys = _mean_curve(recs, "train_curve")
            ax.plot(xs, ys, color=c, alpha=0.55, lw=1, label=f"{name} train (lr={res.best_lr:g})")
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
        ax.set_title(f"{task}: each optimizer at its best LR (lines: train, dots: val; mean over seeds)", fontsize=10)
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
            for lr in res.grid:
                if lr not in res.losses:
                    continue
                m = res.mean_at(lr)
                if math.isfinite(m) and (top is None or m <= top):
                    xs.append(lr)
                    ys.append(m)
                else:
                    cap_x.append(lr)
            ax.plot(xs, ys, color=c, marker=markers[i % len(markers)], label=name, alpha=0.85)
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
        ax.set_title(f"{task}: final loss vs LR (x at top: diverged or worse than init)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fname = f"lr_{task}.png"
        fig.savefig(run_dir / fname, dpi=110)
        plt.close(fig)
        names.append(fname)
        files[task] = names
    return files


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
            add(f"| {name} | {', '.join(f'{x:g}' for x in grid)} | {wds.get(name, '')} |")
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
        add("| optimizer | best final val loss (mean ± std over seeds) | best LR | ratio to AdamW | ms/step | flags |")
        add("| --- | --- | --- | --- | --- | --- |")
        for name, res in per_task.items():
            loss = _fmt(res.best_mean)
            if res.best_lr is not None and len(res.losses.get(res.best_lr, [])) > 1:
                loss += f" ± {res.best_std:.2g}"
            if name in winners:
                loss = f"**{loss}** (best)"
            r = ratio(res.best_mean, adamw.best_mean) if adamw else math.nan
            flags = [_edge_text(res)]
            div = res.diverged_lrs
            if div:
                flags.append(f"diverged at LR {', '.join(f'{x:g}' for x in div)}")
            if not res.complete:
                flags.append(f"incomplete ({res.done_runs}/{res.expected_runs} runs)")
            ms = f"{statistics.median(res.step_ms):.3g}" if res.step_ms else "-"
            add(f"| {name} | {loss} | {'-' if res.best_lr is None else f'{res.best_lr:g}'} | "
                f"{'n/a' if math.isnan(r) else f'{r:.3f}'} | {ms} | {'; '.join(f for f in flags if f)} |")
        add("")
        add("ms/step: median wall time of one training step over this optimizer's runs (CPU; "
            "indicative only when the machine is shared).")
        add("")
        add("Final validation loss at every LR (mean over seeds):")
        add("")
        all_lrs = sorted({lr for res in per_task.values() for lr in res.grid})
        add("| optimizer | " + " | ".join(f"{lr:g}" for lr in all_lrs) + " |")
        add("| --- |" + " --- |" * len(all_lrs))
        for name, res in per_task.items():
            cells = []
            for lr in all_lrs:
                if lr not in res.grid:
                    cells.append("")
                elif lr not in res.losses:
                    cells.append("(not run)")
                else:
                    cell = _fmt(res.mean_at(lr))
                    cells.append(f"**{cell}**" if lr == res.best_lr else cell)
            add(f"| {name} | " + " | ".join(cells) + " |")
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
        + "; `*` marks a best LR at the edge of its grid (not tuned); wins count tasks where the optimizer "
        "had the lowest loss.")
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
            star = "*" if res.edge else ""
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
