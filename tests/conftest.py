"""Shared test fixtures (the reference data in ``../shared``, skipped where absent), and the order in which
the test modules start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO_ROOT = TESTS.parent
SHARED = Path(os.environ.get("CELO2_SHARED_DIR", REPO_ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"
DATASETS = SHARED / "datasets"

#: The slowest test modules (paths under tests/), slowest first. They start before every other module,
#: so that on two pytest-xdist workers (the README's test command: whole modules per worker, in
#: collection order) no long module is left running alone at the end. A module missing here still
#: runs, only later.
SLOW_MODULES: tuple[str, ...] = (
    "benchmarks/test_benchmark_scripts.py",
    "metatrain/test_score.py",
    "metatrain/test_tasks_models.py",
    "kernels/test_triton.py",
    "examples/test_examples.py",
    "reliability/test_metatrain_interrupt.py",
    "optax/test_sharding.py",
    "metatrain/test_tasks.py",
    "kernels/test_cpu_passes.py",
    "kernels/test_cpu_cache_bits.py",
    "metatrain/test_sharding.py",
    "kernels/test_triton_traffic.py",
    "torch/test_distributed.py",
    "kernels/test_triton_compile.py",
)


def start_rank(path: Path) -> int:
    """Where the module at ``path`` starts: its place in :data:`SLOW_MODULES`, else after all of them.

    Args:
        path: A test module's path.

    Returns:
        Its index in :data:`SLOW_MODULES`, or ``len(SLOW_MODULES)`` for any other module.
    """
    try:
        key = path.resolve().relative_to(TESTS).as_posix()
    except ValueError:
        return len(SLOW_MODULES)
    return SLOW_MODULES.index(key) if key in SLOW_MODULES else len(SLOW_MODULES)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Move the tests of :data:`SLOW_MODULES` to the front, keeping every module's own order.

    The sort is stable and runs last: the order of the tests inside a module (which pytest has
    arranged around its module-scoped fixtures by then) and the order of the other modules stay as
    they were.
    """
    items.sort(key=lambda item: start_rank(item.path))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared reference folder beside the repo); absent here")
    return path


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    return _require(REFERENCE)


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    return _require(DATASETS)


@pytest.fixture(scope="session")
def published_theta_path(reference_dir: Path) -> Path:
    return _require(reference_dir / "celo2_official_theta.state")


@pytest.fixture(scope="session")
def published_theta(published_theta_path: Path):
    import celo2

    return celo2.load_theta(published_theta_path)


@pytest.fixture(scope="session")
def random_theta():
    """A theta that needs no shared files, for tests of mechanics rather than values."""
    import celo2

    return celo2.Theta.init(seed=123)
