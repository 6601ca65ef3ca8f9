"""The contract every PyTorch backend meets, and the tail of a step they share.

:class:`Backend` is what :func:`celo2.torch.functional.celo2` asks of a
backend; :func:`finish` (the output RMS, then return or apply) and
:func:`apply_update` (``p <- p (1 - lr wd) - lr * direction``) are written
here once for every backend and for the sharded path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch

from celo2.rule import spec
from celo2.rule.state import work_shape
from celo2.torch._rounding import TensorRounding
from celo2.torch._state import TorchTheta
from celo2.torch.ns import newton_schulz

Apply = tuple[Any, Any]
"""``(lr, weight_decay)``: ``lr`` a float or a 0-d tensor, ``weight_decay`` a float (or a 0-d tensor where a
backend reads it on the device)."""


@dataclass(frozen=True)
class Options:
    """Tuning that only the chunked path reads, passed through every backend unchanged.

    Attributes:
        chunk_elements: Elements per chunk (``None``: the path's default).
        workspace: Chunk scratch reused across tensors (a
            :class:`celo2.torch.backends.torch.Workspace`), or ``None``.
    """

    chunk_elements: Optional[int] = None
    workspace: Any = None


@dataclass(frozen=True)
class StateRounding:
    """How a step stores bfloat16 state (:mod:`celo2.rule.rounding`); ``None`` in its place means float32 state.

    Every accumulator the step writes is computed in float32 and rounded to
    bfloat16 stochastically, with the random bits of
    :func:`celo2.rule.rounding.stream_key` / :func:`celo2.rule.rounding.random_bits`
    so that every backend stores the same bits.

    Attributes:
        seed: The optimizer's rounding seed (``0 <= seed < 2**32``).
        steps: Per tensor (parallel to the step's lists), a 0-d ``torch.int64`` tensor on the
            parameter's device: the tensor's step count after this step (1 at the first). A tensor, so
            that a step reads no value on the host and can be captured in a CUDA graph; a CPU
            backend may read it.
        tensors: Per tensor, its index in the optimizer's order (the counter's ``tensor`` field).
    """

    seed: int
    steps: Sequence[torch.Tensor]
    tensors: Sequence[int]

    def tensor(self, j: int) -> TensorRounding:
        """The rounding of the ``j``-th tensor of the lists."""
        return TensorRounding(self.seed, self.steps[j], self.tensors[j])

    def select(self, indices: Sequence[int]) -> "StateRounding":
        """The rounding of the tensors at ``indices`` of the lists, as lists of their own (for a backend given
        those tensors)."""
        return StateRounding(self.seed, [self.steps[j] for j in indices], [self.tensors[j] for j in indices])


def tensor_rounding(rounding: Optional[StateRounding], j: int) -> Optional[TensorRounding]:
    """The ``j``-th tensor's rounding, or ``None`` for float32 state."""
    return None if rounding is None else rounding.tensor(j)


class Backend(Protocol):
    """What :func:`celo2.torch.functional.celo2` asks of a backend.

    Every method takes parallel lists (parameters, gradients, states) of
    non-empty tensors that :meth:`takes` accepted, all on one device, and
    updates the states in place. With ``rounding`` (a :class:`StateRounding`)
    the accumulators are ``torch.bfloat16`` tensors, read as float32 and
    written with stochastic rounding; without it they are float32. Parameters are read-only except in
    :meth:`apply` and :meth:`apply_held`.

    Attributes:
        name: The ``backend=`` value that selects it.
        gates_nonfinite: Whether it checks gradients for NaN and +-inf itself
            (on the device, returning a flag per tensor), so the caller wraps
            none of its tensors in a :class:`celo2.torch._nonfinite.Gate`.
        state_dtypes: The dtypes of state it reads and writes (``torch.float32``, and ``torch.bfloat16``
            where it takes ``rounding``); :func:`celo2.torch.functional.pick` gives it no tensor whose
            state is of another dtype.
        runs_variants: Whether it runs every rule variant (:class:`celo2.rule.variant.RuleVariant`, read
            from ``theta.variant``) or the published rule only (the fused kernels, which read the packed
            weights of :func:`celo2.rule.layout.pack_theta`); :func:`celo2.torch.functional.pick` gives a
            backend of the published rule only no tensor of another variant, and
            :func:`celo2.torch.functional.check_backend` refuses it by name when it is asked for.
    """

    name: str
    gates_nonfinite: bool
    state_dtypes: tuple[torch.dtype, ...]
    runs_variants: bool

    def takes(self, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> bool:
        """Whether this backend can step this tensor (dtype, device, layout, shape)."""

    def gives_raw(self, ndim: int) -> bool:
        """Whether, under Newton-Schulz, this backend hands over the raw direction of a tensor of ``ndim``
        (two or more) dims for the caller to orthogonalise with others (:meth:`raw`, then
        :meth:`apply_held`), rather than orthogonalising it itself in :meth:`apply` / :meth:`directions`."""

    def apply(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool, apply: Apply, skip: bool,
              options: Options, rounding: Optional[StateRounding] = None) -> list[Optional[torch.Tensor]]:
        """The whole step of each tensor, ``p <- p (1 - lr wd) - lr * direction`` in place.

        Returns:
            Per tensor, where :attr:`gates_nonfinite`: a 0-d flag on the device, 0 where the tensor was
            skipped (``skip``) and left bitwise unchanged; else ``None``.
        """

    def directions(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool,
                   options: Options, rounding: Optional[StateRounding] = None) -> list[torch.Tensor]:
        """Each tensor's finished direction (float32, unit RMS over the last two axes, the parameter's shape);
        no non-finite check."""

    def raw(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            states: Sequence[dict[str, torch.Tensor]], *, skip: bool,
            options: Options, rounding: Optional[StateRounding] = None,
            ) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Each tensor's raw direction, before Newton-Schulz and the output RMS.

        Returns:
            Per tensor ``(d, ok)``: ``d`` float32 in the work shape; ``ok`` as from :meth:`apply`.
        """

    def apply_held(self, params: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
                   oks: Sequence[Optional[torch.Tensor]], apply: Apply) -> None:
        """Finish orthogonalised raw directions: output RMS, then the update (where ``ok``, if given)."""


def group_sumsq(d: torch.Tensor) -> torch.Tensor:
    """Sum of squares of ``d`` over its last two axes (float32, those axes kept with size 1)."""
    axes = tuple(range(max(0, d.ndim - 2), d.ndim))
    return torch.linalg.vector_norm(d, dim=axes, keepdim=True, dtype=torch.float32).square_()


def finish(d: torch.Tensor, *, orthogonalize: bool = False, param: Optional[torch.Tensor] = None,
           apply: Optional[Apply] = None, rows: Optional[tuple[int, int]] = None,
           sumsq: Optional[torch.Tensor] = None, count: Optional[int] = None) -> Optional[torch.Tensor]:
    """The tail of every step: Newton-Schulz (optional, float32), the output RMS, then return or apply.

    ``d`` is scaled to unit RMS over its last two axes (its normalisation
    groups), ``d / sqrt(mean(d^2) + OUTPUT_NORM_EPS)``, and either returned or
    applied to ``param``.

    Args:
        d: A direction in the work shape (float32, or bfloat16 from Newton-Schulz); scratch, changed in place.
        orthogonalize: Newton-Schulz (float32, in place) first, on tensors of two or more dims.
        param: The parameter to update (with ``apply``).
        apply: ``(lr, weight_decay)``: update ``param`` and return ``None``; ``None``: return the direction.
        rows: ``d`` holds only rows ``a:b`` of the work shape's leading axis (default: all).
        sumsq: The sum of squares per group when it is known already (e.g. completed across ranks).
        count: The number of elements ``sumsq`` is over (default: the last two axes of ``d``).

    Returns:
        With ``apply``, ``None``; else the direction (float32, unit RMS per group), in ``d``'s storage
        where ``d`` is float32.
    """
    if orthogonalize and d.ndim >= 2:
        d = newton_schulz(d, inplace=True)
    if apply is None:
        d = d.to(torch.float32)
    if sumsq is None:
        sumsq = group_sumsq(d)
    if count is None:
        count = d.shape[-1] * (d.shape[-2] if d.ndim >= 2 else 1)
    scale = sumsq.mul_(1.0 / count).add_(spec.OUTPUT_NORM_EPS).rsqrt_()
    if apply is None:
        return d.mul_(scale)
    a, b = rows if rows is not None else (0, work_shape(param.shape)[0])
    apply_update(param, a, b, d, apply, scale)
    return None


def apply_update(param: torch.Tensor, a: int, b: int, d: torch.Tensor, apply: Apply,
                 scale: Optional[torch.Tensor | float]) -> None:
    """``p[a:b] <- p[a:b] (1 - lr wd) - lr * scale * d`` in the work shape.

    Args:
        param: The parameter, updated in place in its own dtype (float64 is never rounded
            through float32; bfloat16 and float16 are combined in float32 and rounded once).
        a: First row of the work shape's leading axis.
        b: One past the last row.
        d: The direction of those rows (float32, or bfloat16 from Newton-Schulz); scratch.
        apply: ``(lr, weight_decay)``.
        scale: A factor on ``d`` broadcastable against it, or ``None`` for 1.
    """
    lr, wd = apply
    p = param.detach().reshape(work_shape(param.shape))[a:b]
    step = -lr if scale is None else scale * (-lr)
    if p.dtype in (torch.float32, torch.float64):
        if wd:
            p.mul_(1.0 - lr * wd)
        if p.dtype != d.dtype:
            p.add_(d.to(p.dtype).mul_(step))
        elif isinstance(step, torch.Tensor):
            p.addcmul_(d, step)
        else:
            p.add_(d, alpha=step)
    else:
        d = d if d.dtype == torch.float32 else d.to(torch.float32)
        d.mul_(step).add_(p.to(torch.float32).mul_(1.0 - lr * wd) if wd else p.to(torch.float32))
        p.copy_(d)
