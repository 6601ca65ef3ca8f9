"""One adapter per front end so that tests replay the same inputs through both."""

from __future__ import annotations

import numpy as np


class JaxRule:
    name = "jax"

    def __init__(self, theta):
        import jax.numpy as jnp

        from celo2.optax import functional as rule

        import jax

        self._jnp, self._rule = jnp, rule
        self.theta = rule.theta_to_jax(theta)
        self._step = jax.jit(rule.tensor_step, static_argnums=(4,))

    def init(self, param: np.ndarray):
        return self._rule.init_tensor_state(self._jnp.asarray(param))

    def step(self, state, grad: np.ndarray, param: np.ndarray, orthogonalize: bool):
        jnp = self._jnp
        direction, state = self._step(
            self.theta, state, jnp.asarray(grad), jnp.asarray(param), orthogonalize
        )
        return np.asarray(direction), state


class TorchRule:
    name = "torch"

    def __init__(self, theta):
        import torch

        from celo2.torch import rule

        self._torch, self._rule = torch, rule
        self.theta = rule.TorchTheta.from_theta(theta)

    def init(self, param: np.ndarray):
        return self._rule.init_tensor_state(self._torch.from_numpy(np.array(param)))

    def step(self, state, grad: np.ndarray, param: np.ndarray, orthogonalize: bool):
        torch = self._torch
        direction = self._rule.tensor_step(
            self.theta, state, torch.from_numpy(np.array(grad)), torch.from_numpy(np.array(param)), orthogonalize
        )
        return direction.numpy(), state


FRONTENDS = {"jax": JaxRule, "torch": TorchRule}


class JaxKernelRule(JaxRule):
    """The JAX front end with its CPU fast path: matrices and conv kernels
    through the Numba kernels (an XLA custom call)."""

    name = "jax-cpu-kernels"

    def __init__(self, theta):
        import functools

        import jax
        import pytest

        from celo2.optax import cpu_ffi

        if not cpu_ffi.AVAILABLE:
            pytest.skip("numba is not installed: no CPU kernels for JAX")
        super().__init__(theta)
        self._step = jax.jit(functools.partial(self._rule.tensor_step, cpu_kernels=True), static_argnums=(4,))


FRONTENDS["jax-cpu-kernels"] = JaxKernelRule
