"""The rule's fused CPU kernels (Numba), shared by the PyTorch and JAX front ends.

:mod:`celo2.kernels.cpu` holds the compiled loops; the PyTorch optimizer calls
them on its tensors' NumPy views, the JAX front end through an XLA custom call
(:mod:`celo2.optax.cpu_ffi`).
"""
