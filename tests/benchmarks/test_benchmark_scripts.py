"""The benchmark scripts still run end to end (tiny sizes, a few seconds of
measuring): they are commands users run, so they must not rot. The figures
they print are not checked here, only that every row is measured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_step_time_measures_every_optimizer_of_both_frameworks(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "step_time.json"
    res = _run([str(BENCH / "step_time.py"), "--sizes", "tiny", "--repeats", "2", "--warmup", "1",
                "--threads", "1", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    tiny = data["sizes"]["tiny"]
    assert set(tiny["torch"]) == {"adamw_foreach", "adamw_fused", "muon", "celo2_base", "celo2"}
    assert set(tiny["jax"]) == {"adamw", "muon", "celo2_base", "celo2", "celo2_base_xla", "celo2_xla"}
    for fw in ("torch", "jax"):
        for kind, row in tiny[fw].items():
            assert row["median_s"] > 0 and len(row["all_s"]) == 2, (fw, kind)
            assert row["state_bytes"] > 0, (fw, kind)
    # The PyTorch memory workers ran: peak extra memory includes the state.
    for kind, row in tiny["torch"].items():
        assert row["peak_extra_bytes"] >= 0 and row["largest_param_bytes"] > 0, kind
        assert row["step_transient_bytes"] >= 0 and row["kept_after_first_bytes"] >= 0, kind
    # The JAX memory-ordered compile ran in its own process, for every optimizer.
    for kind, row in tiny["jax"].items():
        assert row["temp_bytes_memory_ordered"] >= 0 and row["temp_bytes"] >= 0, kind
    # The training-step compile (gradients made inside the step) ran for both schedules, against SGD's.
    for kind, row in tiny["jax"].items():
        for key in ("train_temp_over_sgd_bytes", "train_temp_over_sgd_bytes_memory_ordered"):
            assert isinstance(row[key], int), (kind, key)
    assert tiny["jax"]["adamw"]["train_temp_over_sgd_bytes_memory_ordered"] <= tiny["jax"]["celo2_base_xla"][
        "train_temp_over_sgd_bytes_memory_ordered"]
    assert "mem-ord." in res.stdout and "train+" in res.stdout
    assert "celo2_base" in res.stdout and "x adamw" in res.stdout and "x muon" in res.stdout


def test_metatrain_throughput_reports_inner_steps_per_second(tmp_path):
    pytest.importorskip("jax")
    res = _run([str(BENCH / "metatrain_throughput.py"), "--pairs", "1", "--truncation", "5", "--repeats", "1",
                "--devices", "1", "--json"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["inner_steps_per_iteration"] == 4 * 1 * 2 * 5  # tasks x pairs x 2 x truncation
    assert summary["inner_steps_per_s"] > 0 and summary["devices"] == 1
