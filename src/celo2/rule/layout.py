"""How every fused backend sees the rule: channel order, weight packing and direction modes.

:mod:`celo2.rule.spec` says *what* the rule computes. This module says how the
fused implementations (the Numba CPU kernels, the Triton GPU kernels and the
chunked PyTorch path) lay that computation out, so that each backend reads one
description instead of restating it:

* **Channel order.** Of the 30 input channels, 18 vary per element (the 15 of
  the first nine groups, in spec order, then the three ``fac_m``) and 12 are
  rank-1 broadcasts of the factored statistics (``row`` and ``rsqrt_row`` vary
  along one axis, ``col`` and ``rsqrt_col`` along the other). Tensors of fewer
  than two dimensions use the first 15 per-element channels only.
* **Weight packing.** The weights a kernel reads, as one flat float32 vector
  (:data:`PACKED`): the first-layer rows of the per-element, row and column
  channels, ``b0``, ``w1`` as ``(in, out)``, ``b1``, and the direction output's
  column of ``w2`` and entry of ``b2``.
* **Direction modes.** What the last pass of a fused step does with the
  direction it computes (:class:`DirectionMode`): write it, sum its squares,
  apply it, or write it over the gradient. The passes themselves are code, in
  :mod:`celo2.kernels.cpu` and :mod:`celo2.kernels.triton`; docs/architecture.md
  ("The passes of a fused step") names them.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from celo2.rule import spec
from celo2.rule.variant import RuleVariant, require_published


def _group_rows() -> dict[str, tuple[int, ...]]:
    """Rows of the ``(30, 8)`` first layer read by each feature group, by name."""
    rows, start = {}, 0
    for group in spec.FEATURE_GROUPS:
        rows[group.name] = tuple(range(start, start + group.width))
        start += group.width
    return rows


GROUP_ROWS: dict[str, tuple[int, ...]] = _group_rows()
"""Feature-group name -> its rows of the concatenated ``(30, 8)`` first layer."""

ELEMENT_ROWS: tuple[int, ...] = tuple(
    r for g in spec.FEATURE_GROUPS[: spec.VECTOR_GROUPS] for r in GROUP_ROWS[g.name]
) + GROUP_ROWS["fac_m"]
"""First-layer rows of the 18 per-element channels, in the kernels' channel order."""

ROW_STAT_ROWS: tuple[int, ...] = GROUP_ROWS["row"] + GROUP_ROWS["rsqrt_row"]
"""First-layer rows of the six channels built from the row statistic."""

COL_STAT_ROWS: tuple[int, ...] = GROUP_ROWS["col"] + GROUP_ROWS["rsqrt_col"]
"""First-layer rows of the six channels built from the column statistic."""

MATRIX_CHANNELS: int = len(ELEMENT_ROWS)  # 18
"""Per-element channels of a tensor with two or more dimensions."""

VECTOR_CHANNELS: int = spec.NUM_VECTOR_FEATURES  # 15
"""Per-element channels of a 0-D or 1-D tensor: the first 15 of the matrix order."""

RANK1_CHANNELS: int = len(ROW_STAT_ROWS)  # 6 per side
"""Channels per side (row or column) built from a factored statistic."""


def _channel_offsets() -> dict[str, int]:
    """Position of each per-element group's first channel in the kernels' order."""
    offsets, position = {}, 0
    for group in spec.FEATURE_GROUPS[: spec.VECTOR_GROUPS]:
        offsets[group.name] = position
        position += group.width
    offsets["fac_m"] = position
    return offsets


CHANNEL_OFFSET: dict[str, int] = _channel_offsets()
"""Per-element group name -> offset of its first channel (``g`` 0, ``clip_g`` 1,
``p`` 2, ``m`` 3, ``v`` 6, ``m_rsqrt_v`` 7, ``rsqrt_v`` 10, ``fac_g`` 11,
``g_rsqrt_v`` 14, ``fac_m`` 15)."""


@dataclass(frozen=True)
class Segment:
    """One array inside the packed weight vector.

    Attributes:
        name: what the array is (``"w_el"``, ``"b0"``, ...).
        shape: its shape inside the vector (row-major).
        offset: index of its first float in the vector.
    """

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        """Number of floats the segment holds."""
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        """Index one past the segment's last float."""
        return self.offset + self.size


def _segments() -> tuple[Segment, ...]:
    h = spec.HIDDEN_SIZE
    shapes = (
        ("w_el", (MATRIX_CHANNELS, h)),  # first-layer rows of the per-element channels
        ("w_row", (RANK1_CHANNELS, h)),  # ... of the row-statistic channels
        ("w_col", (RANK1_CHANNELS, h)),  # ... of the column-statistic channels
        ("b0", (h,)),
        ("w1", (h, h)),  # (in, out)
        ("b1", (h,)),
        ("w2", (h,)),  # the direction output's column of the last layer
        ("b2", (1,)),  # the direction output's bias
    )
    out, offset = [], 0
    for name, shape in shapes:
        out.append(Segment(name, shape, offset))
        offset += math.prod(shape)
    return tuple(out)


PACKED: tuple[Segment, ...] = _segments()
"""The packed weight vector's arrays, in order."""

SEGMENT: dict[str, Segment] = {s.name: s for s in PACKED}
"""Segment name -> :class:`Segment`."""

NET_SIZE: int = PACKED[-1].stop  # 329
"""Length of the packed weight vector."""


def pack_theta(theta: Mapping[str, Any], xp: Any = np) -> Any:
    """The weights the fused kernels read, as one float32 vector in :data:`PACKED` order.

    Args:
        theta: a :class:`celo2.rule.theta.Theta` of the published rule, or any
            mapping with the published keys (``w0__0`` ... ``b2``, weights ``(in, out)``).
        xp: the array namespace to build it with: ``numpy`` (the default) or
            ``jax.numpy``, for a theta that may be traced (PES perturbs it
            inside ``jit``).

    Returns:
        A ``(NET_SIZE,)`` float32 array of ``xp``.

    Raises:
        KeyError: a published key is missing from ``theta``.
        celo2.rule.variant.VariantNotSupportedError: ``theta`` belongs to a rule variant other
            than the published one (its ``variant``); the message names how it differs and where
            variants run (:data:`celo2.rule.variant.VARIANT_PATHS`).
    """
    variant = getattr(theta, "variant", None)
    if isinstance(variant, RuleVariant):
        require_published(variant, "celo2.rule.layout.pack_theta (the weights every fused backend reads)")
    f32 = xp.float32
    first = xp.concatenate([xp.asarray(theta[f"w0__{g.index}"], f32) for g in spec.FEATURE_GROUPS])
    parts = {
        "w_el": first[xp.asarray(ELEMENT_ROWS)],
        "w_row": first[xp.asarray(ROW_STAT_ROWS)],
        "w_col": first[xp.asarray(COL_STAT_ROWS)],
        "b0": theta["b0"],
        "w1": theta["w1"],
        "b1": theta["b1"],
        "w2": xp.asarray(theta["w2"], f32)[:, spec.DIRECTION_OUTPUT],
        "b2": xp.asarray(theta["b2"], f32)[spec.DIRECTION_OUTPUT : spec.DIRECTION_OUTPUT + 1],
    }
    return xp.concatenate([xp.ravel(xp.asarray(parts[seg.name], f32)) for seg in PACKED])


def unpack(net: Any) -> dict[str, Any]:
    """Views of the packed vector's arrays, by segment name.

    Works on anything sliceable and reshapeable the NumPy way (NumPy and JAX
    arrays, PyTorch tensors).

    Args:
        net: a ``(NET_SIZE,)`` packed weight vector.

    Returns:
        Segment name -> view of ``net`` with the segment's shape.

    Raises:
        ValueError: ``net`` does not have ``NET_SIZE`` elements.
    """
    if tuple(net.shape) != (NET_SIZE,):
        raise ValueError(f"packed weights have shape {tuple(net.shape)}, expected ({NET_SIZE},)")
    return {s.name: net[s.offset : s.stop].reshape(s.shape) for s in PACKED}


class DirectionMode(enum.IntEnum):
    """What the direction pass does with the direction it computes.

    Attributes:
        WRITE: write the raw direction out (Newton-Schulz or the caller needs
            it whole).
        SQUARES: only sum its squares (the output RMS, before ``APPLY``).
        APPLY: apply it to the parameter, ``p <- p * decay + step * d``, without
            ever holding it.
        OVER_GRAD: write it over the gradient's buffer, each row once that row
            has been read.
    """

    WRITE = 0
    SQUARES = 1
    APPLY = 2
    OVER_GRAD = 3
