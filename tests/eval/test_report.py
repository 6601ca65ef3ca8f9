"""Best-LR selection, edge-of-grid flags and the Markdown report, on made-up records."""

from __future__ import annotations

import math

import pytest

from celo2.eval import report as P
from celo2.eval import selection as S
from celo2.eval.runner import RunSpec


def test_edge_flag():
    grid = [1e-4, 1e-3, 1e-2]
    assert S.edge_flag(1e-4, grid) == S.EDGE_LOW
    assert S.edge_flag(1e-2, grid) == S.EDGE_HIGH
    assert S.edge_flag(1e-3, grid) is None
    assert S.edge_flag(1e-3, [1e-3]) == S.EDGE_SINGLE
    assert S.edge_flag(None, grid) is None


def _res(losses):
    r = S.OptimizerResult("x", sorted(losses))
    r.losses = {lr: list(v) for lr, v in losses.items()}
    return S.select_best(r)


def test_best_lr_uses_the_seed_mean_and_a_diverged_seed_disqualifies():
    r = _res({1e-3: [1.0, 1.2], 1e-2: [0.5, math.inf], 1e-1: [math.inf, math.inf]})
    assert r.best_lr == 1e-3 and r.best_mean == pytest.approx(1.1)
    assert r.edge == S.EDGE_LOW
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
    assert summary["mlp"]["sgd"].edge == S.EDGE_HIGH
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
    assert S.ratio(1.0, 2.0) == 0.5
    assert S.ratio(math.inf, 2.0) == math.inf
    assert math.isnan(S.ratio(1.0, 0.0))
    assert math.isnan(S.ratio(1.0, math.inf))


def _grid_specs_and_records(table, task="mlp"):
    """table: optimizer -> {(lr, wd): loss or None (not run)}; one seed."""
    specs, records = [], {}
    for opt, row in table.items():
        for (lr, wd), loss in row.items():
            s = RunSpec(task, {"steps": 3, "batch_size": 2}, opt, lr, wd, 0)
            specs.append(s)
            if loss is not None:
                records[s.key] = {
                    "final_val_loss": loss, "status": "ok" if math.isfinite(loss) else "diverged",
                    "data_source": "made up", "step_ms": 1.0,
                    "train_curve": {"step": [1, 2, 3], "loss": [2.0, 1.5, loss]},
                    "val_curve": {"step": [0, 3], "loss": [2.3, loss]},
                    # A record as older benches wrote it would do as well: the cell comes from the spec.
                    "config": {"task": task},
                }
    return specs, records


def _cells(lrs, wds, f):
    return {(lr, wd): f(i, j) for i, lr in enumerate(lrs) for j, wd in enumerate(wds)}


def test_two_d_search_picks_the_best_cell_and_flags_edges_in_both_directions(tmp_path):
    lrs, wds = [1e-3, 1e-2, 1e-1], [0.0, 0.01, 0.1]
    specs, records = _grid_specs_and_records({
        # interior LR, interior WD
        "adamw": _cells(lrs, wds, lambda i, j: 1.0 + abs(i - 1) + abs(j - 1) * 0.5),
        # interior LR, top WD
        "muon": _cells(lrs, wds, lambda i, j: 1.0 + abs(i - 1) - 0.1 * j),
        # lowest LR, WD 0 (no decay) wins
        "celo2": _cells(lrs, wds, lambda i, j: 0.5 + i + 0.1 * j),
        # one diverged cell and one not run
        "sgd": _cells(lrs, wds, lambda i, j: math.inf if (i, j) == (2, 2) else (None if (i, j) == (0, 0)
                                                                                  else 2.0 - 0.1 * i + 0.1 * j)),
    })
    summary = P.write_report(tmp_path, specs, records, {"suite": "test", "command": "celo2 bench x"})
    adamw, muon, celo2, sgd = (summary["mlp"][k] for k in ("adamw", "muon", "celo2", "sgd"))
    assert (adamw.best_lr, adamw.best_wd, adamw.edge, adamw.wd_edge) == (1e-2, 0.01, None, None)
    assert (muon.best_lr, muon.best_wd, muon.edge, muon.wd_edge) == (1e-2, 0.1, None, S.EDGE_HIGH)
    assert (celo2.best_lr, celo2.best_wd, celo2.edge, celo2.wd_edge) == (1e-3, 0.0, S.EDGE_LOW, S.EDGE_LOW)
    assert S.untuned(muon) and S.untuned(celo2) and not S.untuned(adamw)
    assert S.edge_label(celo2) == "LR low, WD low (0)" and S.edge_label(muon) == "WD high"
    assert sgd.diverged_cells == [(1e-1, 0.1)] and not sgd.complete
    md = (tmp_path / "report.md").read_text()
    assert "| optimizer | best final val loss (mean ± std over seeds) | best LR | best WD |" in md
    assert "| muon | 1.000 (best)" not in md
    assert "| muon | 0.8 | 0.01 | 0.1 |" in md
    assert "**edge: highest WD** (not tuned)" in md
    assert "edge: lowest WD (0: no decay)" in md
    assert "diverged in 1 of 9 cells" in md
    assert "| celo2 | 0 | **0.5** | 1.5 | 2.5 |" in md  # the (LR, WD) cell table, best cell in bold
    assert "| muon | 0.01 / 0.1 (WD high) |" in md  # the best-cell table
    assert "| celo2 | 0.001 / 0 (LR low, WD low (0)) |" in md
    assert "(not run)" in md
    assert "| muon | 0.800* |" in md  # a top-edge WD is not tuned
    for f in ("curves_mlp.png", "lr_mlp.png", "lr_wd_mlp.png"):
        assert (tmp_path / f).stat().st_size > 0, f


def test_one_weight_decay_keeps_the_old_report(tmp_path):
    """A bench with a fixed weight decay writes no WD column, no heat map, the old protocol text."""
    specs, records = _specs_and_records({"adamw": {1e-3: 0.8, 1e-2: 0.5, 1e-1: 0.7}})
    P.write_report(tmp_path, specs, records, {"suite": "test", "weight_decays": {"adamw": [0.1]},
                                              "grids": {"adamw": [1e-3, 1e-2, 1e-1]}})
    md = (tmp_path / "report.md").read_text()
    assert "best WD" not in md and "Weight decay is fixed per optimizer" in md
    assert "| adamw | 0.001, 0.01, 0.1 | 0.1 |" in md
    assert not (tmp_path / "lr_wd_mlp.png").exists()


def test_results_keyed_by_lr_alone_still_select():
    """OptimizerResult.losses keyed by LR (as before weight-decay grids) are read as one-WD cells."""
    r = S.OptimizerResult("x", [1e-3, 1e-2], wd_grid=[0.1])
    r.losses = {1e-3: [1.0], 1e-2: [0.5]}
    S.select_best(r)
    assert (r.best_lr, r.best_wd, r.wd_edge) == (1e-2, 0.1, None)
    assert r.mean_at(1e-3) == 1.0
