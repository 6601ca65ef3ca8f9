"""The per-tensor API of the PyTorch front end, under the names it has always had (re-exports only).

The pieces live in their own modules: the weights and state
(:mod:`celo2.torch._state`, shapes from :mod:`celo2.rule.state`), the
backends (:mod:`celo2.torch.backends`), Newton-Schulz
(:mod:`celo2.torch.ns`) and the step on lists of tensors
(:mod:`celo2.torch.functional`).
"""

from __future__ import annotations

from celo2.rule.state import state_shapes, work_shape
from celo2.torch._state import TorchTheta, init_tensor_state
from celo2.torch.backends.reference import reference_tensor_step
from celo2.torch.functional import apply_step, tensor_step
from celo2.torch.ns import newton_schulz

__all__ = ["TorchTheta", "apply_step", "init_tensor_state", "newton_schulz", "reference_tensor_step",
           "state_shapes", "tensor_step", "work_shape"]
