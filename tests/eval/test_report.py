"""Best-LR selection, edge-of-grid flags and the Markdown report, on made-up records."""

from __future__ import annotations

import math

import pytest

from celo2.eval import report as P
from celo2.eval.runner import RunSpec


def test_edge_flag():
    grid = [1e-4, 1e-3, 1e-2]
    assert P.edge_flag(1e-4, grid) == P.EDGE_LOW
    assert P.edge_flag(1e-2, grid) == P.EDGE_HIGH
    assert P.edge_flag(1e-3, grid) is None
    assert P.edge_flag(1e-3, [1e-3]) == P.EDGE_SINGLE
    assert P.edge_flag(None, grid) is None


def _res(losses):
    r = P.OptimizerResult("x", sorted(losses))
    r.losses = {lr: list(v) for lr, v in losses.items()}
    return P.select_best(r)


def test_best_lr_uses_the_seed_mean_and_a_diverged_seed_disqualifies():
    r = _res({1e-3: [1.0, 1.2], 1e-2: [0.5, math.inf], 1e-1: [math.inf, math.inf]})
    assert r.best_lr == 1e-3 and r.best_mean == pytest.approx(1.1)
    assert r.edge == P.EDGE_LOW
    assert r.diverged_lrs == [1e-2, 1e-1]


def test_interior_best_is_not_flagged_and_ties_go_to_the_smaller_lr():
    r = _res({1e-3: [2.0], 1e-2: [1.0], 1e-1: [1.0]})
    assert r.best_lr == 1e-2 and r.edge is None


def test_all_diverged():
    r = _res({1e-3: [math.inf], 1e-2: [math.inf]})
    assert r.best_lr is None and r.best_mean == math.inf
    assert "diverged at every LR" in P._edge_text(r)


def _specs_and_records(table):
    """table: optimizer -> {lr: loss}; one seed, one task 'mlp'."""
    specs, records = [], {}
    for opt, row in table.items():
        for lr, loss in row.items():
            s = RunSpec("mlp", {"steps": 3, "batch_size": 2}, opt, lr, 0.0, 0)
            specs.append(s)
            if loss is not None:
                records[s.key] = {
                    "final_val_loss": loss, "status": "ok" if math.isfinite(loss) else "diverged",
                    "data_source": "made up", "step_ms": 1.0,
                    "train_curve": {"step": [1, 2, 3], "loss": [2.0, 1.5, loss]},
                    "val_curve": {"step": [0, 3], "loss": [2.3, loss]},
                    "config": {"task": "mlp"},
                }
    return specs, records


def test_markdown_report_tables_flags_ratios_and_wins(tmp_path):
    specs, records = _specs_and_records({
        "celo2": {1e-3: 1.0, 1e-2: 0.4, 1e-1: 0.9},     # interior best, beats AdamW
        "adamw": {1e-3: 0.8, 1e-2: 0.5, 1e-1: math.inf},  # interior best
        "sgd": {1e-2: 2.0, 1e-1: 1.0},                  # best at the high edge
        "muon": {1e-3: 0.6, 1e-2: None},                # one run missing
    })
    summary = P.write_report(tmp_path, specs, records, {"suite": "test", "command": "celo2 bench x"})
    md = (tmp_path / "report.md").read_text()
    assert summary["mlp"]["celo2"].best_lr == 1e-2
    assert summary["mlp"]["sgd"].edge == P.EDGE_HIGH
    assert "| celo2 | **0.4** (best) | 0.01 | 0.800 |" in md
    assert "edge: highest LR" in md and "edge: lowest LR" in md  # sgd high, muon low
    assert "diverged at LR 0.1" in md
    assert "incomplete (1/2 runs)" in md
    assert "**incomplete**" in md
    summary_row = next(line for line in md.splitlines() if line.startswith("| celo2 | 0.800"))
    assert summary_row.rstrip().endswith("| 0.800 | 1 | 1 |")
    for f in ("results.csv", "environment.json", "curves_mlp.png", "lr_mlp.png"):
        assert (tmp_path / f).exists(), f
    csv_lines = (tmp_path / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(records)


def test_summary_shows_own_loss_where_adamw_solved_the_task(tmp_path):
    """No ratio exists to AdamW's 0 (a solved task); the summary must still
    show who failed to solve it instead of hiding it behind n/a."""
    specs, records = _specs_and_records({
        "celo2": {1e-3: 0.37, 1e-2: 0.5, 1e-1: 0.9},
        "adamw": {1e-3: 0.5, 1e-2: 0.0, 1e-1: 0.2},
        "muon": {1e-3: 0.6, 1e-2: 0.0, 1e-1: 0.4},
    })
    P.write_report(tmp_path, specs, records, {"suite": "test", "command": "celo2 bench x"})
    md = (tmp_path / "report.md").read_text()
    assert "| celo2 | abs 0.37* |" in md  # best at the lowest LR, so also flagged
    assert "| muon | = 0 |" in md


def test_ratio_is_safe():
    assert P.ratio(1.0, 2.0) == 0.5
    assert P.ratio(math.inf, 2.0) == math.inf
    assert math.isnan(P.ratio(1.0, 0.0))
    assert math.isnan(P.ratio(1.0, math.inf))
