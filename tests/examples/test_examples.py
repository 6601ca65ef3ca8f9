"""Every script in ``examples/`` runs at its tiny size; those needing a missing package skip, saying which."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"

# script -> (packages it needs, extra arguments after --tiny)
CASES = {
    "torch_loop.py": (("torch",), []),
    "flax_optax.py": (("jax", "optax", "flax"), []),
    "hf_trainer.py": (("torch", "transformers", "accelerate"), []),  # Trainer needs accelerate
    "lightning_module.py": (("torch", "lightning"), []),
    "metatrain_custom_task.py": (("jax", "optax", "torch"), ["--out", "{tmp}/run"]),
    "torch_ddp.py": (("torch",), []),
    "fsdp2_gpt.py": (("torch",), ["--check"]),
}
# scripts started by a launcher rather than by python alone
LAUNCHERS = {"fsdp2_gpt.py": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]}


def test_every_example_has_a_case() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(CASES)


@pytest.mark.parametrize("script", sorted(CASES))
def test_example_runs_tiny(script: str, tmp_path: Path) -> None:
    needs, extra = CASES[script]
    missing = [name for name in needs if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"examples/{script} needs {', '.join(missing)}, not installed here "
                    f"(pip install {' '.join(missing)})")
    src = str(REPO_ROOT / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    args = [a.format(tmp=tmp_path) for a in extra]
    proc = subprocess.run([sys.executable, *LAUNCHERS.get(script, []), str(EXAMPLES / script), "--tiny", *args],
                          cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"examples/{script} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    if script == "fsdp2_gpt.py":
        assert "max |FSDP2 - one process|" in proc.stdout
    assert "loss" in proc.stdout or "theta written" in proc.stdout or "DDP" in proc.stdout
