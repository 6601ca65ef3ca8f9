"""The README's quick starts run unchanged, and its set-up commands are the ones CI runs."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


QUICK_STARTS = {
    "Quick start: PyTorch": "torch",
    "Quick start: JAX / optax": "optax",
}


@pytest.mark.parametrize("title", sorted(QUICK_STARTS))
def test_quick_start_runs_as_pasted(title: str, tmp_path: Path) -> None:
    pytest.importorskip(QUICK_STARTS[title], reason=f"the {title!r} quick start needs {QUICK_STARTS[title]}")
    blocks = _python_blocks(_section(title))
    assert len(blocks) == 1, f"{title}: expected one python block, found {len(blocks)}"
    script = tmp_path / "quick_start.py"
    script.write_text(blocks[0], encoding="utf-8")
    src = str(REPO_ROOT / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{title} failed:\n{proc.stdout}\n{proc.stderr}"
    loss = float(re.search(r"final training loss (\S+)", proc.stdout).group(1))
    assert loss == loss and loss < 1.386, f"{title}: the loss did not go below chance level (ln 4): {loss}"


def test_setup_commands_are_the_ones_ci_runs() -> None:
    first_block = re.search(r"^```bash\n(.*?)^```", README, re.S | re.M).group(1).splitlines()
    install = first_block[0].split("#")[0].strip()
    test = first_block[1].split("#")[0].strip()
    assert install == 'pip install torch==2.13.0 && pip install -e ".[all,test]" && celo2 demo'
    assert test == "python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder"
    ci = [line.strip() for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert ci[-1] == test, "CI's last step must be exactly the README's test command"
    assert "python -m pip install --quiet torch==2.13.0" in ci


def test_the_test_commands_plugin_is_in_the_test_extra() -> None:
    """``-n``/``--dist`` are pytest-xdist's flags: the extra the README installs must bring it."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    first_block = re.search(r"^```bash\n(.*?)^```", README, re.S | re.M).group(1).splitlines()
    test = first_block[1].split("#")[0].split()
    assert "-n" in test and "--dist" in test
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"]
    assert any(re.match(r"pytest-xdist\b", requirement) for requirement in extras["test"]), extras["test"]


def test_readme_is_short_and_its_links_resolve() -> None:
    assert len(README.splitlines()) <= 200
    for target in re.findall(r"\]\(((?!https?://)[^)#]+)", README):
        assert (REPO_ROOT / target).exists(), f"README links to {target}, which does not exist"


def test_the_slow_modules_started_first_exist_and_start_first() -> None:
    """tests/conftest.py names the slowest modules, started first by the test command's workers."""
    spec = importlib.util.spec_from_file_location("celo2_tests_root_conftest", REPO_ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    tests = REPO_ROOT / "tests"
    assert conftest.SLOW_MODULES and len(set(conftest.SLOW_MODULES)) == len(conftest.SLOW_MODULES)
    for module in conftest.SLOW_MODULES:
        assert (tests / module).is_file(), f"tests/conftest.py SLOW_MODULES names {module}, which does not exist"
    ranks = [conftest.start_rank(tests / module) for module in conftest.SLOW_MODULES]
    assert ranks == list(range(len(conftest.SLOW_MODULES)))
    assert conftest.start_rank(tests / "docs" / "test_readme.py") == len(conftest.SLOW_MODULES)
    assert conftest.start_rank(REPO_ROOT / "README.md") == len(conftest.SLOW_MODULES)
