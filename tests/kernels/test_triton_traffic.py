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
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_traffic.py"), "--shapes", "24x7", "40x30",
                          "--dtypes", "float32", "bfloat16", "--json", str(out)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 2 * 2 * 2
    by = {(r["variant"], r["dtype"], tuple(r["shape"])): r for r in rows}
    for variant in ("celo2-base", "celo2"):
        for dtype, size in (("float32", 4), ("bfloat16", 2)):
            small, large = by[(variant, dtype, (24, 7))], by[(variant, dtype, (40, 30))]
            # The full-size streams per element do not depend on the size (masked lanes are not counted).
            assert small["operand_read"] == large["operand_read"]
            assert small["operand_write"] == large["operand_write"]
            # At least: read g, p, m (3), v; write p, m (3), v.
            assert small["operand_read"] >= 2 * size + 16 and small["operand_write"] >= size + 16
        assert by[(variant, "bfloat16", (24, 7))]["operand_read"] < by[(variant, "float32", (24, 7))]["operand_read"]
    assert "celo2-base: bytes per element per step" in res.stdout
