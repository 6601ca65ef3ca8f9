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


#: Runs examples/fsdp2_gpt.py with ``dcp.save`` wrapped: on save number KILL_AT, rank 1 writes part of
#: its shard into the new save's folder and is killed (SIGKILL), as a preemption inside a save would.
_KILL_DURING_SAVE = """
import os, runpy, signal, sys
from pathlib import Path
import torch.distributed.checkpoint as dcp

real_save, calls, kill_at = dcp.save, [], int(os.environ["KILL_AT"])

def save(state, *args, checkpoint_id=None, **kwargs):
    calls.append(checkpoint_id)
    if len(calls) == kill_at and os.environ["RANK"] == "1":
        Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
        Path(checkpoint_id, "__1_0.distcp").write_bytes(b"torn by a kill during the save")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(state, *args, checkpoint_id=checkpoint_id, **kwargs)

dcp.save = save
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_fsdp2_kill_during_a_save_loses_only_the_steps_since_the_previous_save(tmp_path: Path) -> None:
    """Two gloo ranks on the CPU; rank 1 dies inside the third save; the rerun resumes from the second
    save and ends where an uninterrupted run ends (``--check``: within 1e-5 of one process)."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("examples/fsdp2_gpt.py needs torch")
    src = str(REPO_ROOT / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    ckpt = tmp_path / "ckpt"
    driver = tmp_path / "kill_during_save.py"
    driver.write_text(_KILL_DURING_SAVE)
    launch = [sys.executable, *LAUNCHERS["fsdp2_gpt.py"]]
    example = [str(EXAMPLES / "fsdp2_gpt.py"), "--tiny", "--check", "--checkpoint", str(ckpt), "--save-every", "1"]
    killed = subprocess.run([*launch, str(driver), *example], cwd=tmp_path, env=dict(env, KILL_AT="3"),
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode != 0, killed.stdout[-3000:]
    assert (ckpt / "latest").read_text().strip() == "step-000002", sorted(os.listdir(ckpt))
    resumed = subprocess.run([*launch, *example], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, f"{resumed.stdout[-3000:]}\n{resumed.stderr[-3000:]}"
    assert f"resumed from {ckpt / 'step-000002'} at step 2" in resumed.stdout, resumed.stdout
    assert "max |FSDP2 - one process|" in resumed.stdout
    assert sorted(os.listdir(ckpt)) == ["latest", "step-000005"]
