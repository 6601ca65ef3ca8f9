"""The bench report as files: report.md, results.csv, environment.json, and the PNGs of
:mod:`celo2.eval.plots`, rendered from the selection of :mod:`celo2.eval.selection`."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

from celo2._io import atomic_write_text
from celo2._provenance import git_commit
from celo2.eval.plots import write_plots
from celo2.eval.runner import RunSpec
from celo2.eval.selection import (EDGE_HIGH, EDGE_LOW, EDGE_SINGLE, OptimizerResult, edge_label, ratio, summarize,
                                  task_winners, untuned)

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
