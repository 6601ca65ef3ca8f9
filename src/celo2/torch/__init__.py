"""Celo2 for PyTorch: ``Celo2`` (the harness) and ``Celo2Base`` (the rule everywhere).

:func:`celo2.torch.functional.celo2` is the functional form (lists of tensors).
"""

from celo2.torch.optimizer import Celo2, Celo2Base
from celo2.torch.rule import TorchTheta, init_tensor_state, newton_schulz, tensor_step

__all__ = ["Celo2", "Celo2Base", "TorchTheta", "init_tensor_state", "newton_schulz", "tensor_step"]
