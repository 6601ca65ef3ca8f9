"""The layers of ``src/celo2`` hold: no import circle, no arrow from a lower
layer up into a front end or an application, no private name taken across
modules. Imports are read from the source (``ast``), function-local ones
included, so a circle hidden inside a function counts as one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

LOWER = ("celo2.rule", "celo2.kernels", "celo2.data", "celo2.theta_files")
"""Layers that know nothing of the front ends and applications above them."""
UPPER = ("celo2.torch", "celo2.optax", "celo2.metatrain", "celo2.eval", "celo2.cli")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / "celo2").rglob("*.py"))}


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES.get(name, Path()).name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class _Imports(ast.NodeVisitor):
    """The celo2 modules one module imports, the private names it takes, and its private attribute reads."""

    def __init__(self, module: str) -> None:
        self.module = module
        self.targets: set[str] = set()
        self.private: list[str] = []
        self.module_aliases: dict[str, str] = {}

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.startswith("celo2"):
                self.targets.add(alias.name)
                if alias.asname:
                    self.module_aliases[alias.asname] = alias.name
        self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = _absolute(self.module, node)
        if not source.startswith("celo2"):
            return
        for alias in node.names:
            full = f"{source}.{alias.name}"
            if full in MODULES:  # a submodule
                self.targets.add(full)
                self.module_aliases[alias.asname or alias.name] = full
                if _private(alias.name) and source != self.module.rpartition(".")[0] and source != self.module:
                    self.private.append(f"{self.module}: from {source} import {alias.name} (a private module of "
                                        f"another package)")
            else:
                self.targets.add(source)
                if _private(alias.name):
                    self.private.append(f"{self.module}: from {source} import {alias.name}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in self.module_aliases and _private(node.attr):
            self.private.append(f"{self.module}: {node.value.id}.{node.attr} "
                                f"({self.module_aliases[node.value.id]})")
        self.generic_visit(node)


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _scan(module: str, path: Path) -> _Imports:
    visitor = _Imports(module)
    visitor.visit(ast.parse(path.read_text(), filename=str(path)))
    return visitor


SCANS = {name: _scan(name, path) for name, path in MODULES.items()}


def _graph() -> dict[str, set[str]]:
    return {name: {t for t in scan.targets if t in MODULES and t != name} for name, scan in SCANS.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _in(name: str, layers: tuple[str, ...]) -> bool:
    return any(name == layer or name.startswith(layer + ".") for layer in layers)


def test_the_scanner_sees_the_package():
    assert "celo2.rule.spec" in MODULES and "celo2.torch.optimizer" in MODULES
    assert "celo2.rule.spec" in SCANS["celo2.rule.layout"].targets


def test_the_cycle_finder_finds_a_planted_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_circles():
    cycles = _cycles(_graph())
    assert not cycles, "import circles (function-local imports counted):\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_import_nothing_above_them(layer):
    arrows = sorted(f"{name} -> {target}" for name, scan in SCANS.items() if _in(name, (layer,))
                    for target in scan.targets if _in(target, UPPER))
    assert not arrows, "arrows up out of " + layer + ":\n" + "\n".join(arrows)


def test_the_rule_reads_no_theta_files():
    """Theta files and the Hub sit above ``celo2.rule`` (``celo2.theta_files`` builds on ``Theta``), never inside it."""
    arrows = sorted(f"{name} -> {target}" for name, scan in SCANS.items() if _in(name, ("celo2.rule",))
                    for target in scan.targets if _in(target, ("celo2.theta_files",)))
    assert not arrows, "arrows from the rule up into its files:\n" + "\n".join(arrows)


def test_no_private_names_across_modules():
    taken = sorted(entry for scan in SCANS.values() for entry in scan.private)
    assert not taken, "private names taken from another module:\n" + "\n".join(taken)


def test_examples_use_public_names_only():
    taken = []
    for path in sorted(EXAMPLES.glob("*.py")):
        scan = _Imports("examples." + path.stem)
        scan.visit(ast.parse(path.read_text(), filename=str(path)))
        taken += [entry.replace(scan.module, path.name, 1) for entry in scan.private]
        taken += [f"{path.name}: imports {t}" for t in scan.targets if any(_private(p) for p in t.split("."))]
    assert not taken, "examples reach into private names:\n" + "\n".join(sorted(taken))
