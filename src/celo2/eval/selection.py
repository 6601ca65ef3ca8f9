"""Which (LR, weight decay) cell wins for each optimizer on each task: pure selection, no files.

The selection follows the paper's protocol: for each task and optimizer, the
final validation loss is averaged over seeds in every cell (peak LR, weight
decay) of the grid (a diverged seed makes that cell's mean infinite) and the
cell with the lowest mean wins. A best LR at either end of its grid is
flagged: the optimum may lie beyond it, so that optimizer's number is not
tuned. With a weight-decay grid (more than one value), a best weight decay at
either end is flagged the same way; at a lowest value of 0 (no decay) the
flag is informative only, since no lower value exists. With one weight decay
per optimizer (fixed, not searched) the result reads as it did before
weight-decay grids existed.

The renderers (:mod:`celo2.eval.report` for Markdown and CSV,
:mod:`celo2.eval.plots` for PNGs) read what this module selects.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

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
