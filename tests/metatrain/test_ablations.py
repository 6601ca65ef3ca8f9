"""``benchmarks/ablations.py --quick``: rows meta-train with equal compute, resume skips finished rows,
the held-out scores, table and plots are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "ablations.py"


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_quick_ablations_train_score_and_resume(tmp_path):
    out = tmp_path / "ablations"
    args = ["--quick", "--rows", "default,width-4", "--out", str(out), "--no-progress"]
    res = _run(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    for name in ("README.md", "table.md", "scores.json", "scores.png", "ablations.png", "meta_loss.png"):
        assert (out / name).is_file(), name
    configs = {row: json.loads((out / "runs" / row / "config.json").read_text()) for row in ("default", "width-4")}
    assert configs["width-4"]["variant"]["hidden_width"] == 4 and configs["default"]["variant"]["hidden_width"] == 8
    same = ("iterations", "pairs_per_task", "truncation_length", "tasks", "seed", "batch_size")
    assert all(configs["default"][k] == configs["width-4"][k] for k in same)  # equal compute per row
    scores = json.loads((out / "scores.json").read_text())
    assert scores["tasks"] == ["synthetic"] and set(scores["thetas"]) == {"default", "width-4"}
    table = (out / "table.md").read_text()
    assert "| width-4 | hidden width 4 | 4.128 | +8.29% |" in table and "| default |" in table
    # Resume: finished rows are not trained again.
    res = _run([*args, "--resume"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[default] done already" in res.stderr and "[width-4] done already" in res.stderr
    assert "compiling the iteration" not in res.stderr


def test_scoring_on_a_training_family_is_refused(tmp_path):
    res = _run(["--quick", "--rows", "default", "--score-tasks", "digits", "--out", str(tmp_path / "x")], tmp_path)
    assert res.returncode != 0 and "held-out" in res.stderr
