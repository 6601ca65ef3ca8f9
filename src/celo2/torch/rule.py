"""The Celo2 rule on one tensor, in PyTorch: the per-tensor API.

The pieces live in their own modules: the weights and state
(:mod:`celo2.torch._state`), the formula spelled out
(:mod:`celo2.torch._reference`), the chunked PyTorch path
(:mod:`celo2.torch._chunked`), the Numba and Triton backends
(:mod:`celo2.torch._numba`, :mod:`celo2.torch._triton`), Newton-Schulz
(:mod:`celo2.torch.ns`) and the step on lists of tensors
(:mod:`celo2.torch.functional`). This module gathers what works on one
tensor, under the names it has always had.
"""

from __future__ import annotations

from celo2.torch._reference import reference_tensor_step
from celo2.torch._state import TorchTheta, init_tensor_state, state_shapes, work_shape
from celo2.torch.functional import apply_step, tensor_step
from celo2.torch.ns import newton_schulz

__all__ = ["TorchTheta", "apply_step", "init_tensor_state", "newton_schulz", "reference_tensor_step",
           "state_shapes", "tensor_step", "work_shape"]
