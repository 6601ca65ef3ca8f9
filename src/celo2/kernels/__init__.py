"""The rule's fused kernels, shared by the PyTorch and JAX front ends.

:mod:`celo2.kernels.cpu` holds the Numba CPU kernels (the PyTorch optimizer
calls them on its tensors' NumPy views, the JAX front end through an XLA
custom call); :mod:`celo2.kernels.triton` the GPU kernels. Kernels import
only :mod:`celo2.rule`, never a front end.
"""
