"""A small model trained on fixed batches, for the state-format tests of the PyTorch front end
(``tests/torch/test_state_dtype.py``, ``tests/torch/test_state_int8.py``): build it, train it, take a
bitwise snapshot of its weights and optimizer state, and round-trip a state_dict through ``torch.save``.

The test modules import it by name with this folder on ``sys.path`` (pytest runs with
``--import-mode=importlib``, which does not add a test's folder)."""

from __future__ import annotations

import io

import torch
import torch.nn as nn

HIDDEN = 50
"""Width of :func:`model`'s hidden layer: its second weight (4 x 50) fills blocks of 256 elements of 8-bit
state, and leaves a partial one."""


def model() -> nn.Module:
    """The same small MLP (6 -> :data:`HIDDEN` -> 4, seeded) on every call.

    Returns:
        ``nn.Sequential(Linear, ReLU, Linear)``; its parameters are named ``0.weight``, ``0.bias``,
        ``2.weight``, ``2.bias``.
    """
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 4))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch: 8 inputs and targets, the same on every call.

    Args:
        step: The training step (any integer).

    Returns:
        ``(x, y)`` of shapes (8, 6) and (8, 4).
    """
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, generator=g), torch.randn(8, 4, generator=g)


def train(net: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    """One optimizer step on :func:`data` of each of ``steps`` (mean squared error).

    Args:
        net: The model (from :func:`model`).
        opt: Its optimizer.
        steps: The step numbers, which pick the batches.
    """
    for step in steps:
        x, y = data(step)
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()


def snapshot(net: nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Copies of every weight, then of every state entry of each parameter (sorted by key).

    Args:
        net: The model.
        opt: Its optimizer.

    Returns:
        The tensors, cloned, for :func:`bitwise_equal`.
    """
    out = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        out += [t.clone() for _, t in sorted(opt.state[p].items())]
    return out


def bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether two lists of tensors hold the same dtypes and the same values (``torch.equal``: a NaN equals nothing).

    Args:
        a: Tensors (a :func:`snapshot`).
        b: Tensors to compare, in the same order.

    Returns:
        True when the lists have equal length and each pair has one dtype and equal elements.
    """
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def saved(opt: torch.optim.Optimizer) -> dict:
    """``opt.state_dict()`` after a ``torch.save`` / ``torch.load(weights_only=True)`` round trip: what a
    checkpoint file gives back, sharing no tensor with the optimizer.

    Args:
        opt: The optimizer.

    Returns:
        The loaded state_dict.
    """
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)
