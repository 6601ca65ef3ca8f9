"""``celo2 bench --theta FILE`` scores a rule variant's theta (torch front end, chunked backend)."""

from __future__ import annotations

import json
import warnings

import pytest

from celo2 import Theta, save_theta
from celo2.cli.main import main
from celo2.rule.variant import RuleVariant


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch):
    monkeypatch.delenv("CELO2_DATA_DIR", raising=False)


def test_bench_scores_a_variant_theta(tmp_path):
    variant = RuleVariant(hidden_width=4, output_norm="none", outputs="direction+magnitude")
    path = tmp_path / "small.npz"
    save_theta(Theta.init(3, variant), path)
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = main(["bench", "--suite", "smoke", "--steps", "4", "--no-progress", "--jobs", "1", "--tasks", "mlp",
                   "--optimizers", "celo2,celo2-base", "--lrs", "1e-3", "--theta", f"small={path}",
                   "--out", str(out)])
    assert rc == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["config"]["optimizer"] for r in records} == {"celo2[small]", "celo2-base[small]"}
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
