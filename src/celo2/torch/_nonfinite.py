"""The non-finite guard of the PyTorch front end: skip a tensor whose gradient has a NaN or +-inf.

Two ways to know: on the host for CPU gradients the Numba kernels read anyway
(:func:`grad_finite`), or on the device with no synchronisation
(:class:`Gate`). Backends that gate by themselves (Triton) need neither.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from celo2.kernels import cpu as cpu_kernels


def grad_finite(g: torch.Tensor) -> bool:
    """Host check of a CPU gradient.

    Args:
        g: The gradient (on the CPU).

    Returns:
        Whether no element is NaN or +-inf.
    """
    if cpu_kernels.AVAILABLE and g.dtype == torch.float32 and g.is_contiguous():
        return cpu_kernels.all_finite(g.detach().numpy())
    return bool(torch.isfinite(g).all())


class Gate:
    """The device-side non-finite guard of one tensor: ``ok`` (no NaN or
    +-inf in its gradient) is computed where the gradient lives, the tensor
    and its state are copied, and :meth:`close` puts the copies back where
    ``ok`` is false (``torch.where``: bitwise either way, no host
    synchronisation) and counts the skipped step.

    Args:
        p: The parameter (its ``grad`` is checked unless ``ok`` is given).
        state: The tensors to restore with it.
        counter: The 0-d integer counter of skipped steps.
        ok: The flag, when it is computed elsewhere (a sharded tensor's, reduced over its shards).
    """

    def __init__(self, p: torch.Tensor, state: list[torch.Tensor], counter: torch.Tensor,
                 ok: Optional[torch.Tensor] = None) -> None:
        self.ok = torch.isfinite(p.grad).all() if ok is None else ok.to(torch.bool)
        self.tensors = [p.detach(), *state]
        self.saved = [t.clone() for t in self.tensors]
        self.counter = counter

    def close(self) -> None:
        """Restore where the gradient was not finite and count the step."""
        for t, old in zip(self.tensors, self.saved):
            t.copy_(torch.where(self.ok, t, old))
        self.counter.add_(self.ok.logical_not().to(self.counter.dtype))
        self.saved = []


def count_skipped(counter: torch.Tensor, ok: torch.Tensor) -> None:
    """Add 1 to ``counter`` where a backend's device-side flag ``ok`` is 0 (no host synchronisation)."""
    counter.add_((ok == 0).to(counter.dtype))


def count_skipped_many(counters: Sequence[torch.Tensor], oks: Sequence[torch.Tensor]) -> None:
    """:func:`count_skipped` of many tensors in a fixed number of operations (a stack, a comparison, a cast
    and one ``_foreach_add_``), whatever their number: no host synchronisation either.

    Args:
        counters: Per tensor, its 0-d integer counter of skipped steps (one dtype and device).
        oks: Per tensor, the backend's 0-d flag on that device (0 where the tensor was skipped).
    """
    if not counters:
        return
    skipped = (torch.stack([ok.reshape(()) for ok in oks]) == 0).to(counters[0].dtype)
    torch._foreach_add_(list(counters), list(skipped.unbind()))
