"""One table across bench run folders: each optimizer's best (LR, weight decay) cell per task.

``celo2 bench`` writes one report per run folder. When the comparison is run one task per
folder (each task with LR grids centred on its own optimum, as in
``benchmarks/results/compare/``), this script puts the folders side by side:

* per task and optimizer, the best cell's final validation loss (mean ± std over seeds), its
  LR and weight decay, and whether it lies on the grid's edge in either direction;
* the ratios asked for when comparing thetas and optimizers: every Celo2 theta against a
  reference theta (``--reference``, default ``published``), every optimizer against a baseline
  (``--baseline``, default ``adamw``), and Celo2 against Muon;
* a PNG of every optimizer's ratio to the baseline, per task.

The cells come from each folder's ``results.csv``, which holds the runs of that folder's last
bench plan only, and the best cell is chosen by the bench's own rule
(:func:`celo2.eval.selection.select_best`: lowest mean over seeds, a diverged seed counts as
infinite). A folder whose plan is not finished is marked with its run count.

    python benchmarks/compare_table.py benchmarks/results/compare/*/ --out benchmarks/results/compare
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

from celo2.eval.selection import OptimizerResult, edge_label, ratio, select_best
from celo2.eval.tasks import TASKS


def read_folder(folder: Path) -> tuple[dict[str, dict[str, OptimizerResult]], dict[str, int]]:
    """``({task: {optimizer: result}}, {"done": n, "planned": m})`` from one bench run folder.

    Raises:
        FileNotFoundError: the folder has no ``results.csv`` (not a bench run folder, or no report yet).
    """
    path = folder / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no results.csv; pass bench run folders (run `celo2 bench ... --out {folder}`)")
    out: dict[str, dict[str, OptimizerResult]] = {}
    done = 0
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            res = out.setdefault(row["task"], {}).setdefault(row["optimizer"], OptimizerResult(row["optimizer"], []))
            lr, wd = float(row["lr"]), float(row["weight_decay"])
            if lr not in res.grid:
                res.grid.append(lr)
            if wd not in res.wd_grid:
                res.wd_grid.append(wd)
            res.losses.setdefault((lr, wd), []).append(float(row["final_val_loss"]))
            done += 1
    for per_task in out.values():
        for res in per_task.values():
            res.grid.sort()
            res.wd_grid.sort()
            select_best(res)
    planned = done
    meta = folder / "bench.json"
    if meta.is_file():
        invocations = json.loads(meta.read_text()).get("invocations", [])
        if invocations:
            planned = int(invocations[-1].get("runs_planned", done))
    return out, {"done": done, "planned": planned}


def collect(folders: list[Path]) -> tuple[dict[str, dict[str, OptimizerResult]], dict[str, dict[str, int]]]:
    """Merge folders into ``{task: {optimizer: result}}``; a task met in two folders is an error.

    Raises:
        ValueError: the same task appears in more than one folder.
    """
    tasks: dict[str, dict[str, OptimizerResult]] = {}
    counts: dict[str, dict[str, int]] = {}
    where: dict[str, Path] = {}
    for folder in folders:
        per_task, count = read_folder(folder)
        for task, results in per_task.items():
            if task in tasks:
                raise ValueError(f"task {task!r} is in both {where[task]} and {folder}; give each task one folder")
            tasks[task], where[task], counts[task] = results, folder, count
    order = {t: i for i, t in enumerate(TASKS)}  # the registry's order
    names = sorted(tasks, key=lambda t: (order.get(t, len(order)), t))
    return {t: tasks[t] for t in names}, {t: counts[t] for t in names}


def _cell(res: OptimizerResult) -> str:
    if res.best_lr is None:
        return "diverged"
    edges = edge_label(res)
    return (f"{res.best_mean:.4g} ± {res.best_std:.2g} (LR {res.best_lr:g}, WD {res.best_wd:g})"
            + (f" *{edges}*" if edges else ""))


def _ratio_text(x: float) -> str:
    return f"{x:.3f}" if math.isfinite(x) else "n/a"


def optimizer_order(tasks: dict[str, dict[str, OptimizerResult]]) -> list[str]:
    """Every optimizer met, in first-seen order."""
    names: list[str] = []
    for per_task in tasks.values():
        names += [n for n in per_task if n not in names]
    return names


def render(tasks: dict[str, dict[str, OptimizerResult]], counts: dict[str, dict[str, int]],
           reference: str, baseline: str) -> str:
    """The markdown tables: best cells, then ratios."""
    names = optimizer_order(tasks)
    cols = list(tasks)
    head = "| optimizer | " + " | ".join(
        t + ("" if counts[t]["done"] >= counts[t]["planned"] else f" ({counts[t]['done']} of {counts[t]['planned']} runs)")
        for t in cols) + " |"
    lines = ["Best cell per task: final validation loss, mean ± std over seeds, at the best (LR, weight decay);",
             "*edges* name a best cell on the grid's end (WD low (0) is the floor, not untuned).", "",
             head, "|" + " --- |" * (len(cols) + 1)]
    for n in names:
        lines.append(f"| {n} | " + " | ".join(_cell(tasks[t][n]) if n in tasks[t] else "" for t in cols) + " |")

    ref = f"celo2[{reference}]"
    rows: list[tuple[str, str, str]] = []
    for n in names:
        if n.startswith("celo2[") and n != ref:
            rows.append((f"{n} / {ref}", n, ref))
    for n in names:
        if n != baseline:
            rows.append((f"{n} / {baseline}", n, baseline))
    for n in names:
        if n.startswith("celo2") and "muon" in names:
            rows.append((f"{n} / muon", n, "muon"))
    lines += ["", "Ratios of best losses (below 1: the first is better):", "",
              "| ratio | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    for label, a, b in rows:
        vals = [_ratio_text(ratio(tasks[t][a].best_mean, tasks[t][b].best_mean)) if a in tasks[t] and b in tasks[t]
                else "" for t in cols]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines) + "\n"


def plot(tasks: dict[str, dict[str, OptimizerResult]], baseline: str, path: Path) -> None:
    """Grouped bars: each optimizer's best loss over the baseline's, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in optimizer_order(tasks) if n != baseline]
    cols = [t for t in tasks if baseline in tasks[t]]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cols) + 2), 4.0))
    finite: list[float] = []
    for i, n in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cols))]
        ys = [ratio(tasks[t][n].best_mean, tasks[t][baseline].best_mean) if n in tasks[t] else math.nan for t in cols]
        finite += [y for y in ys if math.isfinite(y)]
        ax.bar(xs, [y if math.isfinite(y) else 0.0 for y in ys], width, label=n)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(cols)), cols)
    ax.set_ylabel(f"best final val loss / {baseline}'s")
    if finite:
        ax.set_ylim(min(0.95, min(finite) - 0.03), max(1.05, max(finite) + 0.03))
    ax.legend(fontsize=8, ncol=2)
    ax.set_title("Best cell of the LR x weight-decay search, per task")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="bench run folders (one per task)")
    p.add_argument("--reference", default="published", help="the theta label every other theta is divided by")
    p.add_argument("--baseline", default="adamw", help="the optimizer every other one is divided by")
    p.add_argument("--out", type=Path, help="write table.md and ratios.png into this folder")
    args = p.parse_args(argv)
    try:
        tasks, counts = collect(args.folders)
    except (FileNotFoundError, ValueError) as exc:
        print(f"compare_table: {exc}", file=sys.stderr)
        return 2
    text = render(tasks, counts, args.reference, args.baseline)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "table.md").write_text(text)
        plot(tasks, args.baseline, args.out / "ratios.png")
        print(f"wrote {args.out / 'table.md'} and {args.out / 'ratios.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
