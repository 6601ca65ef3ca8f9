"""The benchmark scripts still run end to end (tiny sizes, a few seconds of
measuring): they are commands users run, so they must not rot. The figures
they print are not checked here, only that every row is measured."""

from __future__ import annotations

import importlib.util
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


def test_step_time_measures_every_torch_optimizer_and_the_compared_jax_rows(tmp_path):
    pytest.importorskip("jax")
    out = tmp_path / "step_time.json"
    # JAX: AdamW and Celo2-base on XLA's formulation, compared below on the memory-ordered schedule. Each
    # further JAX optimizer costs two compiles in each of two processes; the optimizers themselves are
    # tested in tests/optax. Celo2 on the CPU kernels is measured in the GPT test below, in the timing
    # process only: the memory-ordered process runs every kind through the same code under another flag.
    jax_kinds = {"adamw", "celo2_base_xla"}
    res = _run([str(BENCH / "step_time.py"), "--sizes", "tiny", "--repeats", "2", "--warmup", "1",
                "--threads", "1", "--jax-optimizers", ",".join(sorted(jax_kinds)), "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    tiny = data["sizes"]["tiny"]
    assert set(tiny["torch"]) == set(step_time_kinds())
    assert set(tiny["jax"]) == jax_kinds
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
    assert "celo2_base" in res.stdout and "x adamw" in res.stdout and "x muon_fp32" in res.stdout
    for kind in ("muon", "celo2_base", "celo2_fp32"):  # the memory bound is checkable from the figures
        row = tiny["torch"][kind]
        assert row["ns_workspace_bytes"] >= 0 and (row["ns_workspace_bytes"] > 0) == (kind != "celo2_base"), kind


def test_step_time_names_an_unknown_optimizer(tmp_path):
    res = _run([str(BENCH / "step_time.py"), "--sizes", "tiny", "--jax-optimizers", "adamw,adam"], tmp_path)
    assert res.returncode == 2 and "--jax-optimizers: unknown ['adam']" in res.stderr, res.stderr[-2000:]


def step_time_kinds() -> list[str]:
    sys.path.insert(0, str(BENCH))
    try:
        import step_time
    finally:
        sys.path.remove(str(BENCH))
    return list(step_time.TORCH_OPTS)


def test_step_time_gpt_shapes_and_training_step_share(tmp_path):
    """The GPT parameter sets are the tied GPT's own parameters (GPT-2 small: 124M), the training-step
    share is measured for every PyTorch optimizer (tiny GPT, CPU), and JAX's Celo2 on the CPU kernels
    is timed with its compiled step's scratch and its training step's (where JAX is installed)."""
    with_jax = importlib.util.find_spec("jax") is not None
    sys.path.insert(0, str(BENCH))
    try:
        import step_time
    finally:
        sys.path.remove(str(BENCH))
    n = sum(step_time._numel(s) for _, s in step_time.model_shapes("gpt2-124m"))
    assert 124_000_000 < n < 124_600_000, n  # GPT-2 small with tied head (+ the head's bias)
    assert ("blocks.0.qkv.weight", (2304, 768)) in step_time.model_shapes("gpt2-124m")
    xl = sum(step_time._numel(s) for _, s in step_time.model_shapes("gpt3-xl"))
    assert 1.30e9 < xl < 1.33e9, xl
    out = tmp_path / "gpt.json"
    res = _run([str(BENCH / "step_time.py"), "--sizes", "gpt-tiny", "--frameworks",
                "torch,jax" if with_jax else "torch", "--jax-optimizers", "celo2", "--no-memory",
                "--train-share", "gpt-tiny", "--train-batch", "2", "--repeats", "2", "--warmup", "1",
                "--threads", "1", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    kinds = set(step_time.TORCH_OPTS)
    assert set(data["sizes"]["gpt-tiny"]["torch"]) == kinds
    if with_jax:
        jax_rows = data["sizes"]["gpt-tiny"]["jax"]
        assert set(jax_rows) == {"celo2"}
        row = jax_rows["celo2"]
        assert row["median_s"] > 0 and len(row["all_s"]) == 2 and row["state_bytes"] > 0, row
        assert row["temp_bytes"] >= 0 and isinstance(row["train_temp_over_sgd_bytes"], int), row
    share = data["train_share"]
    assert set(share["rows"]) == kinds and share["tokens_per_step"] == 2 * 16
    for kind, row in share["rows"].items():
        assert row["forward_backward_s"] > 0 and row["step_s"] > 0 and 0 < row["share"] < 1, kind
    assert data["torch_ns_dtype_auto"] in ("float32", "bfloat16")
    assert "training step of gpt-tiny" in res.stdout


def test_metatrain_throughput_reports_inner_steps_per_second(tmp_path):
    pytest.importorskip("jax")
    res = _run([str(BENCH / "metatrain_throughput.py"), "--pairs", "1", "--truncation", "5", "--repeats", "1",
                "--devices", "1", "--json"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["inner_steps_per_iteration"] == 4 * 1 * 2 * 5  # tasks x pairs x 2 x truncation
    assert summary["inner_steps_per_s"] > 0 and summary["devices"] == 1


def test_distributed_step_measures_both_optimizers_under_fsdp2(tmp_path):
    res = _run([str(BENCH / "distributed_step.py"), "--tiny"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = {line.split()[0]: line.split() for line in res.stdout.splitlines() if "/float32" in line}
    assert set(lines) == {"adamw/float32", "celo2/float32"}, res.stdout
    # sent KiB (FSDP2's collectives counted) > 0 for both; only Celo2's optimizer sends; parity printed.
    assert float(lines["adamw/float32"][1]) > 0 and float(lines["adamw/float32"][2]) == 0
    assert float(lines["celo2/float32"][2]) > 0 and float(lines["celo2/float32"][6]) < 1e-5


def test_optax_sharded_step_keeps_the_sharding(tmp_path):
    pytest.importorskip("jax")
    res = _run([str(BENCH / "optax_sharded_step.py"), "--size", "64", "--steps", "2"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "sharding=P('x', None)" in res.stdout and "sharding=P(None, 'x')" in res.stdout, res.stdout


def test_compare_table_reports_each_folders_best_cell_and_refuses_a_task_twice(tmp_path):
    for task in ("mlp", "gpt"):
        res = _run(["-m", "celo2.cli.main", "bench", "--suite", "smoke", "--tasks", task, "--optimizers",
                    "adamw,muon", "--steps", "3", "--seeds", "0,1", "--wd-grid", "adamw=0,0.1",
                    "--wd-grid", "muon=0,0.1", "--jobs", "1", "--out", task], tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    res = _run([str(BENCH / "compare_table.py"), "mlp", "gpt", "--out", "table"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "table" / "ratios.png").stat().st_size > 0
    text = (tmp_path / "table" / "table.md").read_text()
    # The oracle: the lowest mean over seeds among each folder's cells, read straight from its CSV.
    import csv
    for task in ("mlp", "gpt"):
        cells: dict[tuple[str, float, float], list[float]] = {}
        with (tmp_path / task / "results.csv").open() as fh:
            for row in csv.DictReader(fh):
                cells.setdefault((row["optimizer"], float(row["lr"]), float(row["weight_decay"])), []).append(
                    float(row["final_val_loss"]))
        assert len(cells) == 8 and all(len(v) == 2 for v in cells.values())
        for opt in ("adamw", "muon"):
            (_, lr, wd), vals = min(((k, v) for k, v in cells.items() if k[0] == opt), key=lambda kv: sum(kv[1]))
            assert f"{sum(vals) / 2:.4g} ± " in text and f"(LR {lr:g}, WD {wd:g})" in text, (task, opt)
    assert "| muon / adamw |" in text
    twice = _run([str(BENCH / "compare_table.py"), "mlp", "mlp"], tmp_path)
    assert twice.returncode == 2 and "task 'mlp' is in both" in twice.stderr


def test_step_memory_measures_every_case(tmp_path):
    out = tmp_path / "step_memory.json"
    res = _run([str(BENCH / "step_memory.py"), "--quick", "--optimizers", "Celo2Base", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:] + res.stdout[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["backend"], tuple(r["shape"])) for r in rows} == {
        (b, s) for b in ("auto", "torch") for s in ((1 << 20,), (1, 1 << 20), (1024, 1024))}
    assert all(r["transient_bytes"] >= 0 and r["seconds"] > 0 for r in rows)


def test_triton_resources_prints_registers_and_spills_of_compiled_kernels(tmp_path):
    pytest.importorskip("triton")
    res = _run([str(BENCH / "triton_resources.py"), "--quick", "--targets", "sm_90", "--max-compiles", "2",
                "--json", str(tmp_path / "out.json")], tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rows = json.loads((tmp_path / "out.json").read_text())["results"]
    assert len(rows) == 2 and all(r["target"] == "sm_90" and r["registers"] > 0 for r in rows)
    assert "regs" in res.stdout and "spill" in res.stdout and "factored direction passes" in res.stdout


def test_state_8bit_quality_runs_the_simulated_kind_on_the_bench(tmp_path):
    pytest.importorskip("celo2.torch")
    out = tmp_path / "8bit"
    res = _run([str(BENCH / "state_8bit_quality.py"), "--suite", "smoke", "--task", "mlp", "--lr", "0.001",
                "--weight-decay", "0", "--seeds", "1", "--steps", "5", "--out", str(out)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["config"]["optimizer"] for r in rows] == ["celo2-8bit-sim"] and rows[0]["status"] == "ok"


def test_blockwise_8bit_quantisation_is_unbiased_and_within_one_code():
    torch = pytest.importorskip("torch")
    spec = importlib.util.spec_from_file_location("state_8bit_quality", BENCH / "state_8bit_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    x = torch.linspace(-1.0, 1.0, 1000) ** 3
    scale = x.abs().max() / 127  # one block's codes are multiples of its scale
    draws = []
    for seed in range(200):
        y = x.clone()
        module.quantise_blockwise_(y, torch.Generator().manual_seed(seed))
        draws.append(y)
    draws = torch.stack(draws)
    assert float((draws - x).abs().max()) <= float(scale) * 1.0001 + 1e-7
    assert float((draws.mean(0) - x).abs().max()) < 0.2 * float(scale)  # unbiased: the mean approaches x
    v = torch.rand(300)  # non-negative: 255 unsigned codes per block
    w = v.clone()
    module.quantise_blockwise_(w, torch.Generator().manual_seed(0))
    assert bool((w >= 0).all())
