"""The shapes the rule works in and the per-tensor state it keeps, framework-free.

Every backend and both front ends size and orient their accumulators from
here, so the arithmetic on shapes is written once:

* :func:`work_shape`: a 0-D parameter is worked on as shape ``(1,)``;
* :func:`factoring`: which two axes the factored (Adafactor-style) statistics
  reduce over, and so which of the two statistics runs along a matrix's rows;
* :func:`state_shapes`: the shape of each accumulator of :data:`STATE_KEYS`.

Accumulators carry the decay index as their leading axis: ``m`` has one slice
per :data:`~celo2.rule.spec.MOMENTUM_DECAYS`, ``fac_r`` and ``fac_c`` one per
:data:`~celo2.rule.spec.FACTORED_DECAYS`. A tensor that is not factored keeps
a per-element second moment in ``fac_r`` and an empty ``fac_c``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Sequence

from celo2.rule import spec

STATE_KEYS: tuple[str, ...] = ("m", "v", "fac_r", "fac_c")
"""The accumulators of one tensor, in the order every backend stores them:
the momenta, the RMS second moment, the row and the column statistics."""


def work_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape the rule works in: a 0-D tensor is treated as shape ``(1,)``.

    Args:
        shape: A parameter's shape (a ``torch.Size``, a JAX shape or a tuple).

    Returns:
        ``shape`` as a tuple of ints, ``(1,)`` for a 0-D shape.
    """
    shape = tuple(shape)
    return shape if shape else (1,)


@dataclass(frozen=True)
class Factoring:
    """The two axes the factored statistics of one shape reduce over.

    Attributes:
        d1: The second-largest axis; the column statistic is the mean of
            ``g^2`` over it (``fac_c`` lacks this axis).
        d0: The largest axis (the later one on a tie); the row statistic is the
            mean of ``g^2`` over it (``fac_r`` lacks this axis).
        ndim: The rank of the work shape.
    """

    d1: int
    d0: int
    ndim: int

    @property
    def rows_first(self) -> bool:
        """For a matrix ``(R, C)``: whether the row statistic holds one value per
        row (``d0`` is the last axis), else one per column. Decided by the
        axes, not the sizes, which tie on square matrices."""
        return self.d0 == self.ndim - 1

    def row_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The row statistic's shape (without the decay axis): ``shape`` less ``d0``."""
        return tuple(s for i, s in enumerate(shape) if i != self.d0)

    def col_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The column statistic's shape (without the decay axis): ``shape`` less ``d1``."""
        return tuple(s for i, s in enumerate(shape) if i != self.d1)


def factoring(shape: Sequence[int]) -> Optional[Factoring]:
    """How a tensor of ``shape`` is factored, or ``None`` below two dimensions.

    Args:
        shape: The work shape (see :func:`work_shape`).

    Returns:
        The :class:`Factoring` of :func:`celo2.rule.spec.factored_dims`, or ``None``.
    """
    shape = work_shape(shape)
    dims = spec.factored_dims(shape)
    if dims is None:
        return None
    return Factoring(d1=dims[0], d0=dims[1], ndim=len(shape))


def state_shapes(shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The shape of each accumulator of a parameter of ``shape``.

    Args:
        shape: The parameter's shape (0-D counts as ``(1,)``).

    Returns:
        :data:`STATE_KEYS` -> shape: ``m`` ``(3, *shape)``, ``v`` ``shape``,
        ``fac_r`` ``(3, *shape less d0)`` and ``fac_c`` ``(3, *shape less d1)``
        for a factored tensor; ``fac_r`` ``(3, *shape)`` and ``fac_c`` ``(3, 0)``
        for a vector.
    """
    return dict(_state_shapes(work_shape(shape)))


@lru_cache(maxsize=1024)
def _state_shapes(shape: tuple[int, ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """:func:`state_shapes` as pairs, cached: front ends check state shapes on every step."""
    k = len(spec.FACTORED_DECAYS)
    f = factoring(shape)
    if f is None:
        fac_r, fac_c = (k, *shape), (k, 0)
    else:
        fac_r, fac_c = (k, *f.row_shape(shape)), (k, *f.col_shape(shape))
    return (("m", (len(spec.MOMENTUM_DECAYS), *shape)), ("v", shape), ("fac_r", fac_r), ("fac_c", fac_c))
