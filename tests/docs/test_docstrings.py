"""Every public name documents every parameter of its signature (Google style), and the docstring examples run.

"Public" is ``__all__`` of ``celo2``, ``celo2.rule``, ``celo2.torch`` and ``celo2.optax``. A function's
``Args:`` section must name each parameter of its signature; a class's docstring (or its ``__init__``'s)
must name each parameter of ``__init__`` (``Args:``, or ``Attributes:`` for the fields of a NamedTuple
or dataclass). Names that are neither (constants, modules) are skipped.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import re

import pytest

_SECTION = re.compile(r"^(\s*)(Args|Arguments|Attributes|Parameters):\s*$")
_ITEM = re.compile(r"^\s*\**([A-Za-z_][A-Za-z0-9_]*)\s*(\([^)]*\))?\s*:")


def documented_names(doc: str | None) -> set[str]:
    """Names listed in the ``Args:`` / ``Attributes:`` sections of a Google-style docstring."""
    if not doc:
        return set()
    lines = inspect.cleandoc(doc).splitlines()
    names: set[str] = set()
    i = 0
    while i < len(lines):
        match = _SECTION.match(lines[i])
        if not match:
            i += 1
            continue
        base = len(match.group(1))
        item_indent = None
        i += 1
        while i < len(lines):
            line = lines[i]
            if line.strip() and len(line) - len(line.lstrip()) <= base:
                break
            indent = len(line) - len(line.lstrip())
            if line.strip() and (item_indent is None or indent == item_indent):
                item = _ITEM.match(line)
                if item:
                    item_indent = indent
                    names.add(item.group(1))
            i += 1
    return names


def _parameters(obj) -> list[str]:
    if inspect.isclass(obj) and hasattr(obj, "_fields"):  # a NamedTuple: its fields are its parameters
        return list(obj._fields)
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    return [name for name, p in sig.parameters.items()
            if name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _undocumented(module_name: str) -> dict[str, list[str]]:
    module = importlib.import_module(module_name)
    gaps: dict[str, list[str]] = {}
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            continue  # exceptions take a message, documented by the class docstring itself
        doc = inspect.getdoc(obj) or ""
        if inspect.isclass(obj):
            doc += "\n" + (inspect.getdoc(obj.__init__) if obj.__init__ is not object.__init__ else "")
        params = _parameters(obj)
        missing = sorted(set(params) - documented_names(doc))
        if not doc.strip():
            missing = ["(no docstring)", *missing]
        if missing:
            gaps[f"{module_name}.{name}"] = missing
    return gaps


def test_the_parser_reads_google_sections() -> None:
    doc = """Summary.

    Args:
        a: First.
        b (int): Second, over
            two lines: not a name.
        *args: Ignored.

    Returns:
        x: not an argument.
    """
    assert documented_names(doc) == {"a", "b", "args"}


MODULES = [
    "celo2",
    "celo2.rule",
    "celo2.theta_files",
    "celo2.optax",
    "celo2.torch",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_public_names_document_every_parameter(module_name: str) -> None:
    framework = {"celo2.torch": "torch", "celo2.optax": "optax"}.get(module_name)
    if framework:
        pytest.importorskip(framework, reason=f"{module_name} needs {framework}")
    gaps = _undocumented(module_name)
    assert not gaps, "parameters missing from the Args sections:\n" + "\n".join(
        f"  {name}: {', '.join(missing)}" for name, missing in sorted(gaps.items()))


DOCTEST_MODULES = ["celo2.rule.theta", "celo2.theta_files", "celo2.rule.routing", "celo2.optax.transform"]


@pytest.mark.parametrize("module_name", DOCTEST_MODULES)
def test_docstring_examples_run(module_name: str) -> None:
    if module_name.startswith("celo2.optax"):
        pytest.importorskip("optax")
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.attempted > 0, f"{module_name} has no docstring examples"
    assert result.failed == 0
