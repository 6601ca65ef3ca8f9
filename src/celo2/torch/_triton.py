"""The Triton kernels as a PyTorch backend (``backend="triton"``).

An adapter over :mod:`celo2.kernels.triton` (the contract: one tensor per call,
a fixed number of launches whatever its size, no host synchronisation, ``lr``
and ``weight_decay`` as floats or 0-d device tensors). That module is imported
on first use only, so ``import celo2.torch`` never imports Triton; Triton reads
``TRITON_INTERPRET`` then, and with ``TRITON_INTERPRET=1`` the kernels run on
CPU tensors through its interpreter.

Each call is a graph break under ``torch.compile`` (``torch.compiler.disable``):
the kernels launch eagerly inside a compiled training step.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Optional

import torch

from celo2.torch._state import TorchTheta


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
