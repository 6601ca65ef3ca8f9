"""The Triton kernels compiled ahead of time for real GPUs (sm_80, sm_90), with no GPU present.

``benchmarks/triton_resources.py --quick`` records the launches that real ``Celo2`` and
``Celo2Base`` steps make under the interpreter (float32, bfloat16 and float16 parameters,
0-D tensors, vectors, matrices with widths that are not multiples of 16, groups over
several tiles, conv kernels, float and 0-d tensor ``lr`` and weight decay, both
non-finite policies) and the tiles of GPT-2 and GPT-3 XL matrices, binds each with
Triton's own argument binder, and compiles the hardest configuration of each kind
with ``triton.compile``. This test fails on a compile error, on any local or stack
spill, on shared memory over the target's limit, and on more than 128 registers per
thread for a factored direction pass at a GPT shape. Results are cached under the
temporary folder, keyed by the kernels' source: a rerun with unchanged kernels is quick.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "triton_resources.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    triton = pytest.importorskip("triton", reason="triton is not installed: nothing to compile")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists():
        pytest.skip("this Triton wheel ships no cuobjdump: resource usage cannot be read")
    out = tmp_path_factory.mktemp("resources") / "resources.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)], cwd=out.parent, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.exists(), res.stdout[-3000:] + res.stderr[-5000:]
    data = json.loads(out.read_text())
    data["returncode"], data["stdout"] = res.returncode, res.stdout
    return data


def test_every_compiled_configuration_fits_without_spills(report):
    assert not report["problems"], "\n".join(report["problems"])
    assert report["returncode"] == 0, report["stdout"][-3000:]
    results = report["results"]
    assert {r["target"] for r in results} == {"sm_80", "sm_90"}
    assert all(not r["error"] and r["spill_bytes"] == 0 and r["stack_bytes"] == 0 for r in results)


def test_factored_direction_passes_at_gpt_shapes_use_at_most_128_registers(report):
    gpt = [r for r in report["results"] if r["factored_direction"] and "gpt" in r["tags"]]
    assert {r["target"] for r in gpt} == {"sm_80", "sm_90"}
    assert all(0 < r["registers"] <= 128 and r["occupancy"] >= 0.25 for r in gpt), gpt


def test_the_recorded_launches_cover_every_kind_of_step(report):
    """The recording saw what the brief of the check names: every kernel, each parameter dtype, both
    kinds of tensor, tiles within one group and across several, float and tensor lr and weight decay."""
    recorded = report["recorded"]
    kernels = {r["kernel"] for r in recorded}
    assert kernels == {"_grad_stats", "_flag_pass", "_stat_reduce", "_factors", "_accumulate", "_reduce_groups",
                       "_direction", "_fused", "_held"}
    declared = [r["declared"] for r in recorded]
    assert {d["P_KIND"] for d in declared if "P_KIND" in d} >= {0, 2, 3}  # float32, bfloat16, float16
    assert {(d["LR_T"], d["WD_T"]) for d in declared if "LR_T" in d} >= {(0, 0), (1, 1)}
    assert {d["FACTORED"] for d in declared if "FACTORED" in d} == {0, 1}
    assert {d["SKIP"] for d in declared if "SKIP" in d} == {0, 1}
    assert {int(d["SBF"]) for d in declared if "SBF" in d} == {0, 1}  # float32 and bfloat16 state
    assert any("gpt" in r["tags"] for r in recorded) and any("steps" in r["tags"] for r in recorded)
    # widths that are not multiples of 16: factored direction passes whose later length is not specialised
    assert any(r["kernel"] in ("_direction", "_fused") and r["declared"].get("FACTORED") and "%16:" not in r["config"]
               for r in recorded)
