"""Which parameters the Celo2 harness gives to the learned rule and which to AdamW.

Shared by both front ends so that a model is routed the same way in PyTorch
and in JAX: tensors of fewer than two dimensions always go to AdamW; when
parameter names are known, names matching :data:`ADAM_NAME_PATTERN`
(embeddings and output heads, by convention) go to AdamW too.
"""

from __future__ import annotations

import re
from typing import Sequence

#: Default pattern (searched in the full parameter name) for tensors that the
#: Celo2 harness hands to AdamW although they are matrices: token/position
#: embeddings and output heads. Override it with ``adam_name_pattern``.
ADAM_NAME_PATTERN = (
    r"(^|[./\[\]'_])("
    r"embed\w*|embedding\w*|wte|wpe|tok_embeddings|pos_embed\w*|"
    r"lm_head|head|heads?\.?\d*|classifier|output_layer|fc_out|readout"
    r")($|[./\[\]'_])"
)

LEARNED = "celo2"
ADAM = "adam"


def route(name: str | None, shape: Sequence[int], pattern: str | None = ADAM_NAME_PATTERN) -> str:
    """The branch of the harness that steps a tensor.

    Args:
        name: The parameter's name (``named_parameters()`` / the pytree path), or ``None`` when
            names are unknown (then only the shape decides).
        shape: The tensor's shape.
        pattern: Regular expression searched in ``name``; a match sends a matrix to AdamW (default
            :data:`ADAM_NAME_PATTERN`; ``None`` or ``""``: shapes only).

    Returns:
        ``"celo2"`` (:data:`LEARNED`) for tensors of two or more dimensions whose name does not
        match, else ``"adam"`` (:data:`ADAM`).

    Example:
        >>> route("layers.0.attn.weight", (64, 64))
        'celo2'
        >>> route("lm_head.weight", (1000, 64)), route("layers.0.norm.weight", (64,))
        ('adam', 'adam')
        >>> route("lm_head.weight", (1000, 64), pattern=None)
        'celo2'
    """
    if len(shape) < 2:
        return ADAM
    if name is not None and pattern and re.search(pattern, name):
        return ADAM
    return LEARNED


def format_routing_table(rows: Sequence[tuple[str, str, Sequence[int]]]) -> str:
    """A plain-text table of the routing, with totals per branch.

    Args:
        rows: ``(branch, name, shape)`` per tensor, in the order to print.

    Returns:
        The table: one line per tensor, then one line of totals per branch.

    Example:
        >>> print(format_routing_table([("celo2", "w", (4, 3)), ("adam", "b", (3,))]))
        branch  parameter  shape  elements
        ------  ---------  -----  --------
        celo2   w          4x3          12
        adam    b          3             3
        ------  ---------  -----  --------
        adam: 1 tensors, 3 elements
        celo2: 1 tensors, 12 elements
    """
    header = ("branch", "parameter", "shape", "elements")
    body = [
        (branch, name, "x".join(map(str, shape)) or "scalar", f"{_numel(shape):,}")
        for branch, name, shape in rows
    ]
    totals: dict[str, int] = {}
    for branch, _, shape in rows:
        totals[branch] = totals.get(branch, 0) + _numel(shape)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]
    line = "  ".join("-" * w for w in widths)

    def fmt(r: Sequence[str]) -> str:
        return "  ".join(
            r[i].rjust(widths[i]) if i == 3 else r[i].ljust(widths[i]) for i in range(4)
        )

    out = [fmt(header), line, *map(fmt, body), line]
    for branch, total in sorted(totals.items()):
        count = sum(1 for b, _, _ in rows if b == branch)
        out.append(f"{branch}: {count} tensors, {total:,} elements")
    return "\n".join(out)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
