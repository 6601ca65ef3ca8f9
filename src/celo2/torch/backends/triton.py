"""The Triton kernels as a PyTorch backend (``backend="triton"``).

An adapter over :mod:`celo2.kernels.triton` (the contract: one tensor per call,
a fixed number of launches whatever its size, no host synchronisation, ``lr``
and ``weight_decay`` as floats or 0-d device tensors). That module is imported
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
from celo2.torch.backends.base import Apply, Options, finish


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
def direction(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
              skip_nonfinite: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw direction ``(d, ok)`` (see :func:`celo2.kernels.triton.direction`); ``state`` updated in place."""
    return kernels().direction(theta.net, state, grad, param, skip_nonfinite=skip_nonfinite)


@torch.compiler.disable
def apply_held(param: torch.Tensor, d: torch.Tensor, ok: torch.Tensor, lr, weight_decay) -> None:  # noqa: ANN001
    """Finish a held direction: output RMS, weight decay and the update where ``ok`` (3 launches)."""
    kernels().apply_held(param, d, ok, lr, weight_decay)


@torch.compiler.disable
def apply_step(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
               lr, weight_decay, skip_nonfinite: bool) -> torch.Tensor:  # noqa: ANN001
    """A whole step without holding the direction; returns ``ok``."""
    return kernels().apply_step(theta.net, state, grad, param, lr, weight_decay, skip_nonfinite=skip_nonfinite)


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
    tensor of two or more dims. Tensors go one per call to the kernels.
    """

    name = "triton"
    gates_nonfinite = True
    state_dtypes = (torch.float32,)

    def takes(self, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> bool:
        """:func:`supports` of the parameter."""
        return supports(param)

    def gives_raw(self, ndim: int) -> bool:
        """Every tensor of two or more dims."""
        return ndim >= 2

    def apply(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool, apply: Apply, skip: bool,
              options: Options) -> list[Optional[torch.Tensor]]:
        """:func:`apply_step` on each tensor; the flags it returns.

        Raises:
            ValueError: ``lr`` or weight decay a tensor on another device than a parameter (checked
                for every tensor before the first launch).
        """
        lr, weight_decay = apply
        check_apply(params, apply)
        return [apply_step(theta, st, g, p, lr, weight_decay, skip) for p, g, st in zip(params, grads, states)]

    def directions(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool,
                   options: Options) -> list[torch.Tensor]:
        """Each raw direction, orthogonalised (float32) where asked, at unit RMS."""
        return [finish(direction(theta, st, g, p, False)[0], orthogonalize=orthogonalize).reshape(p.shape)
                for p, g, st in zip(params, grads, states)]

    def raw(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            states: Sequence[dict[str, torch.Tensor]], *, skip: bool,
            options: Options) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """:func:`direction` of each tensor."""
        return [direction(theta, st, g, p, skip) for p, g, st in zip(params, grads, states)]

    def apply_held(self, params: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
                   oks: Sequence[Optional[torch.Tensor]], apply: Apply) -> None:
        """:func:`apply_held` on each, where its flag is set.

        Raises:
            ValueError: as :meth:`apply` (before the first launch).
        """
        check_apply(params, apply)
        for param, d, ok in zip(params, directions, oks):
            apply_held(param, d, ok, *apply)


BACKEND = TritonBackend()
"""The Triton kernels (usable where :func:`available`)."""
