"""benchmarks/triton_traffic.py runs end to end and counts what the kernels must move."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_traffic_is_counted_per_element(tmp_path):
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")
    out = tmp_path / "traffic.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_traffic.py"),
                          "--shapes", "24x7", "30x20", "40x30", "--dtypes", "float32", "bfloat16",
                          "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 3
    by = {(r["variant"], r["dtype"], tuple(r["shape"])): r for r in rows}
    for variant in ("celo2-base", "celo2"):
        for dtype, size in (("float32", 4), ("bfloat16", 2)):
            # Groups within one tile (fused passes): the full-size streams per element do not depend
            # on the size (masked lanes are not counted).
            a, b = by[(variant, dtype, (24, 7))], by[(variant, dtype, (30, 20))]
            assert (a["operand_read"], a["operand_write"]) == (b["operand_read"], b["operand_write"])
            for shape in ((24, 7), (40, 30)):  # at least: read g, p, m (3), v; write p, m (3), v
                row = by[(variant, dtype, shape)]
                assert row["operand_read"] >= 2 * size + 16 and row["operand_write"] >= size + 16
            assert by[(variant, dtype, (24, 7))]["operand_read"] < by[(variant, dtype, (40, 30))]["operand_read"]
        assert by[(variant, "bfloat16", (40, 30))]["operand_read"] < by[(variant, "float32", (40, 30))]["operand_read"]
    assert "celo2-base: bytes per element per step" in res.stdout


def test_a_celo2_base_step_of_a_matrix_moves_84_bytes_per_element_and_bfloat16_state_fewer(tmp_path):
    """Groups across several tiles: the direction is written once and applied (not computed twice), the
    state stored by the direction pass: 84 bytes per float32 element (96 before), 60 with bfloat16 state."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")
    out = tmp_path / "traffic.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_traffic.py"), "--shapes", "40x30",
                          "--dtypes", "float32", "--state-dtypes", "float32", "bfloat16", "--variants", "celo2-base",
                          "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    by = {r["state_dtype"]: r for r in json.loads(out.read_text())["rows"]}
    assert by["float32"]["operand_total"] == 84.0, by["float32"]
    assert by["bfloat16"]["operand_total"] == 60.0, by["bfloat16"]


def test_the_bytes_of_a_step_are_accounted_per_pass_and_operand(tmp_path):
    """``--by-pass``: the launches in order, each with the full-size operands it reads and writes; they add up
    to the totals (docs/performance.md's table of a float32 matrix's Celo2-base step)."""
    pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot run")
    out = tmp_path / "traffic.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_traffic.py"), "--shapes", "40x30",
                          "--dtypes", "float32", "--variants", "celo2-base", "--by-pass", "--json", str(out)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    moving = {p["pass"]: (p["read"], p["write"]) for p in row["passes"] if p["read"] or p["write"]}
    assert moving == {
        "grad_stats": ({"g": 4.0}, {}),
        "accumulate": ({"g": 4.0, "p": 4.0, "m": 12.0, "v": 4.0}, {}),
        "direction": ({"g": 4.0, "p": 4.0, "m": 12.0, "v": 4.0}, {"m": 12.0, "v": 4.0, "d": 4.0}),
        "held": ({"d": 4.0, "p": 4.0}, {"p": 4.0}),
    }, row["passes"]
    assert [p["pass"] for p in row["passes"]] == [
        "grad_stats", "stat_reduce", "factors", "accumulate", "reduce_groups", "direction", "reduce_groups #2",
        "held"]
    assert sum(sum(p["read"].values()) for p in row["passes"]) == row["operand_read"]
    assert sum(sum(p["write"].values()) for p in row["passes"]) == row["operand_write"]
    (line,) = [x for x in res.stdout.splitlines() if x.split()[:1] == ["direction"]]
    assert line.split(None, 1)[1] == "read  24.0 (g 4, p 4, m 12, v 4); write  20.0 (m 12, v 4, d 4)", line
