"""The Triton kernels as a PyTorch backend (``backend="triton"``).

An adapter over :mod:`celo2.kernels.triton` (the contract: the tensors of one
device per call, a launch per pass and group of tensors whatever their number
and sizes, no host synchronisation, ``lr`` and ``weight_decay`` as floats or
0-d device tensors, float32 or bfloat16 state). That module is imported
on first use only, so ``import celo2.torch`` never imports Triton; Triton reads
``TRITON_INTERPRET`` then, and with ``TRITON_INTERPRET=1`` the kernels run on
CPU tensors through its interpreter.

The kernels launch on each parameter's device (not the current CUDA device).
Each call is a graph break under ``torch.compile`` (``torch.compiler.disable``):
the kernels launch eagerly inside a compiled training step.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional, Sequence

import torch

from celo2.torch._state import TorchTheta
from celo2.torch.backends.base import Apply, Options, StateRounding, finish


@functools.lru_cache(maxsize=None)
def kernels() -> Optional[ModuleType]:
    """:mod:`celo2.kernels.triton` when Triton is installed, else ``None`` (imported once)."""
    try:
        from celo2.kernels import triton as module
    except ImportError:
        return None
    return module if module.AVAILABLE else None


def available() -> bool:
    """Whether Triton and the kernels import."""
    return kernels() is not None


def supports(param: torch.Tensor) -> bool:
    """Whether the kernels take this tensor (CUDA, or the CPU under the interpreter; its dtype and size)."""
    module = kernels()
    return module is not None and module.supports(param)


@torch.compiler.disable
def direction_many(theta: TorchTheta, states: Sequence[dict[str, torch.Tensor]], grads: Sequence[torch.Tensor],
                   params: Sequence[torch.Tensor], skip_nonfinite: bool,
                   rounding: Optional[StateRounding] = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The raw directions ``(d, ok)`` of tensors on one device (see
    :func:`celo2.kernels.triton.direction_many`); the states updated in place."""
    return kernels().direction_many(theta.net, states, grads, params, skip_nonfinite=skip_nonfinite,
                                    rounding=rounding)


@torch.compiler.disable
def apply_held_many(params: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
                    oks: Sequence[Optional[torch.Tensor]], lr, weight_decay) -> None:  # noqa: ANN001
    """Finish held directions of tensors on one device: output RMS, weight decay and the update where
    ``ok`` (3 launches per group)."""
    kernels().apply_held_many(params, directions, oks, lr, weight_decay)


@torch.compiler.disable
def apply_step_many(theta: TorchTheta, states: Sequence[dict[str, torch.Tensor]], grads: Sequence[torch.Tensor],
                    params: Sequence[torch.Tensor], lr, weight_decay, skip_nonfinite: bool,  # noqa: ANN001
                    rounding: Optional[StateRounding] = None) -> list[torch.Tensor]:
    """Whole steps of tensors on one device without holding their directions; returns each ``ok``."""
    return kernels().apply_step_many(theta.net, states, grads, params, lr, weight_decay,
                                     skip_nonfinite=skip_nonfinite, rounding=rounding)


def by_device(params: Sequence[torch.Tensor]) -> dict[torch.device, list[int]]:
    """The indices of ``params`` per device, each list in order (a kernel call takes one device)."""
    groups: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault(p.device, []).append(i)
    return groups


def _rounding_of(rounding: Optional[StateRounding], idx: list[int]) -> Optional[StateRounding]:
    """``rounding`` for the tensors at ``idx`` of its lists."""
    if rounding is None:
        return None
    return StateRounding(rounding.seed, [rounding.steps[i] for i in idx], [rounding.tensors[i] for i in idx])


def check_apply(params: Sequence[torch.Tensor], apply: Apply) -> None:
    """Refuse an ``lr`` or weight decay tensor on another device than any of ``params``.

    Args:
        params: the parameters about to step.
        apply: ``(lr, weight_decay)``, each a float or a 0-d tensor on the parameters' device.

    Raises:
        ValueError: naming the value, its device and the parameter's
            (:func:`celo2.kernels.triton.check_scalar`).
    """
    module = kernels()
    for device in {p.device for p in params}:
        for value, name in zip(apply, ("lr", "weight_decay")):
            module.check_scalar(value, name, device)


class TritonBackend:
    """The :class:`celo2.torch.backends.Backend` of the Triton kernels.

    It gates non-finite gradients itself (a flag on the device, no host
    synchronisation) and hands Newton-Schulz the raw direction of every
    tensor of two or more dims. The tensors of a call go to the kernels
    together, one call per device: a launch per pass and group of tensors.
    """

    name = "triton"
    gates_nonfinite = True
    state_dtypes = (torch.float32, torch.bfloat16)
    runs_variants = False

    def takes(self, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> bool:
        """:func:`supports` of the parameter."""
        return supports(param)

    def gives_raw(self, ndim: int) -> bool:
        """Every tensor of two or more dims."""
        return ndim >= 2

    def apply(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool, apply: Apply, skip: bool,
              options: Options, rounding: Optional[StateRounding] = None) -> list[Optional[torch.Tensor]]:
        """:func:`apply_step_many` on the tensors of each device; the flags it returns.

        Raises:
            ValueError: ``lr`` or weight decay a tensor on another device than a parameter (checked
                for every tensor before the first launch).
        """
        lr, weight_decay = apply
        check_apply(params, apply)
        oks: list[Optional[torch.Tensor]] = [None] * len(params)
        for idx in by_device(params).values():
            got = apply_step_many(theta, [states[i] for i in idx], [grads[i] for i in idx],
                                  [params[i] for i in idx], lr, weight_decay, skip, _rounding_of(rounding, idx))
            for i, ok in zip(idx, got):
                oks[i] = ok
        return oks

    def directions(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool,
                   options: Options, rounding: Optional[StateRounding] = None) -> list[torch.Tensor]:
        """Each raw direction, orthogonalised (float32) where asked, at unit RMS."""
        raws = self.raw(theta, params, grads, states, skip=False, options=options, rounding=rounding)
        return [finish(d, orthogonalize=orthogonalize).reshape(p.shape) for p, (d, _) in zip(params, raws)]

    def raw(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            states: Sequence[dict[str, torch.Tensor]], *, skip: bool,
            options: Options, rounding: Optional[StateRounding] = None,
            ) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """:func:`direction_many` on the tensors of each device."""
        out: list = [None] * len(params)
        for idx in by_device(params).values():
            got = direction_many(theta, [states[i] for i in idx], [grads[i] for i in idx], [params[i] for i in idx],
                                 skip, _rounding_of(rounding, idx))
            for i, pair in zip(idx, got):
                out[i] = pair
        return out

    def apply_held(self, params: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
                   oks: Sequence[Optional[torch.Tensor]], apply: Apply) -> None:
        """:func:`apply_held_many` on the tensors of each device, where their flags are set.

        Raises:
            ValueError: as :meth:`apply` (before the first launch).
        """
        check_apply(params, apply)
        for idx in by_device(params).values():
            apply_held_many([params[i] for i in idx], [directions[i] for i in idx], [oks[i] for i in idx], *apply)


BACKEND = TritonBackend()
"""The Triton kernels (usable where :func:`available`)."""
