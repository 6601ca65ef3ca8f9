"""The MLP of the CPU kernels is written out unit by unit (so that LLVM keeps it in
registers and vectorises the loop), once in ``direction`` and once in ``grouped``.
Both copies are pinned here to the one description of the network: the channel
order of :mod:`celo2.rule.layout` and the hidden size of :mod:`celo2.rule.spec`."""

from __future__ import annotations

import ast
import inspect
import re
import textwrap

import pytest

from celo2.kernels import cpu as cpu_kernels
from celo2.kernels.cpu import _loops
from celo2.rule import layout, spec

pytestmark = pytest.mark.skipif(not cpu_kernels.AVAILABLE, reason="numba is not installed")

# The local name each loop gives each per-element channel, by feature group (layout order within a group).
CHANNEL_NAMES = {"g": ["g"], "clip_g": ["x1"], "p": ["pp"], "m": ["m0", "m1", "m2"], "v": ["vv"],
                 "m_rsqrt_v": ["x7", "x8", "x9"], "rsqrt_v": ["rv"], "fac_g": ["x11", "x12", "x13"],
                 "g_rsqrt_v": ["x14"], "fac_m": ["x15", "x16", "x17"]}


def _channels() -> list[str]:
    """The channel names in the layout's order (row ``c`` of the per-element first layer)."""
    names: list[str] = [""] * layout.MATRIX_CHANNELS
    for group, offset in layout.CHANNEL_OFFSET.items():
        for i, name in enumerate(CHANNEL_NAMES[group]):
            names[offset + i] = name
    assert all(names), "a channel of celo2.rule.layout has no name in this test"
    return names


def _expected(first_bias: str) -> dict[str, str]:
    """The unrolled network as source, one statement per unit; ``first_bias`` formats each first-layer unit's bias."""
    H = spec.HIDDEN_SIZE
    units = {}
    for k in range(H):
        terms = " + ".join(f"W[{c}, {k}] * {x}" for c, x in enumerate(_channels()))
        units[f"h{k}"] = f"max({first_bias.format(k=k)} + {terms}, _ZERO)"
    for k in range(H):
        terms = " + ".join(f"W1[{j}, {k}] * h{j}" for j in range(H))
        units[f"u{k}"] = f"max(b1[{k}] + {terms}, _ZERO)"
    units["d"] = "b2 + " + " + ".join(f"w2[{k}] * u{k}" for k in range(H))
    return units


def _assignments(fn) -> dict[str, ast.expr]:  # noqa: ANN001
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn.py_func)))
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if re.fullmatch(r"[hu]\d+|d", name):
                found[name] = node.value
    return found


@pytest.mark.parametrize("fn,first_bias", [(_loops.direction, "t{k} + C{k}[j]"), (_loops.grouped, "T{k}[j]")],
                         ids=["direction", "grouped"])
def test_the_unrolled_mlp_is_the_layouts_network(fn, first_bias):
    got = _assignments(fn)
    expected = _expected(first_bias)
    assert sorted(got) == sorted(expected), "the loop's hidden units are not those of spec.HIDDEN_SIZE"
    for name, source in expected.items():
        assert ast.dump(got[name]) == ast.dump(ast.parse(source, mode="eval").body), (
            f"{fn.py_func.__name__}: unit {name} is not the layout's network:\n{ast.unparse(got[name])}")


def test_the_loops_name_their_modes():
    """The direction loops test the named modes of celo2.rule.layout.DirectionMode, never bare numbers."""
    source = inspect.getsource(_loops)
    assert not re.search(r"mode\s*[!=]=\s*\d", source)
    for mode in layout.DirectionMode:
        assert getattr(cpu_kernels, mode.name) == int(mode)
