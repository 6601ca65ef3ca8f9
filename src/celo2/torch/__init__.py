"""Celo2 for PyTorch: ``Celo2`` (the harness) and ``Celo2Base`` (the rule everywhere).

:func:`celo2.torch.functional.celo2` is the functional form (lists of tensors).
The per-tensor pieces (``tensor_step``, ``init_tensor_state``, ``newton_schulz``,
``TorchTheta``) are in :mod:`celo2.torch.rule`. The optimizer classes live in
:mod:`celo2.torch.optimizer`; their AdamW branch in :mod:`celo2.torch._adamw`
and their checkpoint checks in :mod:`celo2.torch._checkpoint`.
"""

from celo2.torch.optimizer import Celo2, Celo2Base

__all__ = ["Celo2", "Celo2Base"]
