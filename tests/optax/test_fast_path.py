"""The fast JAX formulation computes the straightforward formula and keeps
working where meta-training uses it (traced theta under jit + vmap)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celo2.optax import celo2
from celo2.optax import functional as rule
from celo2.optax.functional import theta_to_jax

# (shape, orthogonalize): Newton-Schulz is checked on one matrix only, the
# reference-step tests cover it further; each case is one compile.
CASES = [((), False), ((37,), False), ((24, 7), False), ((7, 24), True), ((3, 10, 9), False), ((6, 5, 3, 3), True)]


def _ids(shape):
    return "x".join(map(str, shape)) or "scalar"


def _both(theta, s_fast, s_ref, grad, param, orthogonalize):
    """Fast and reference step in one compiled program (one compile per case)."""
    got, s_fast = rule.tensor_step(theta, s_fast, grad, param, orthogonalize)
    expected, s_ref = rule.reference_tensor_step(theta, s_ref, grad, param, orthogonalize)
    return got, expected, s_fast, s_ref


_BOTH = jax.jit(_both, static_argnums=5)


@pytest.mark.parametrize("shape,orthogonalize", CASES, ids=lambda c: _ids(c) if isinstance(c, tuple) else str(c))
def test_fast_step_equals_the_reference_formula(random_theta, shape, orthogonalize):
    theta = theta_to_jax(random_theta)
    rng = np.random.default_rng(len(shape) * 100 + sum(shape))
    param = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.5)
    s_fast = s_ref = rule.init_tensor_state(param)
    for t in range(3):
        grad = rng.standard_normal(shape).astype(np.float32) * 10.0 ** (t - 2)
        if t == 1 and grad.size:
            grad.reshape(-1)[0] = 5000.0  # clipped to 1000
        got, expected, s_fast, s_ref = _BOTH(theta, s_fast, s_ref, jnp.asarray(grad), param, orthogonalize)
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=0, atol=5e-5)
        for a, b in zip(s_fast, s_ref):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
        param = param - 0.01 * expected


@pytest.mark.parametrize("shape", [(24, 7), (6, 5, 3, 3)], ids=_ids)
def test_fast_step_differentiates_like_the_reference_formula(random_theta, shape):
    """A derivative through the XLA formulation (``cpu_kernels=False``) over the parameter alone, so
    that most channels carry no tangent, is the reference formula's."""
    theta = theta_to_jax(random_theta)
    rng = np.random.default_rng(7)
    param = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.5)
    grad = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.1)
    weights = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    state = rule.init_tensor_state(param)

    def loss(fn, p):
        return jnp.sum(weights * fn(theta, state, grad, p, False)[0])

    got = jax.grad(lambda p: loss(rule.tensor_step, p))(param)
    expected = jax.grad(lambda p: loss(rule.reference_tensor_step, p))(param)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-3, atol=1e-4)


def test_fast_step_needs_far_less_scratch_than_the_reference(random_theta):
    """XLA's own accounting of the compiled step: no 30-channel tensor."""
    theta = theta_to_jax(random_theta)
    param = jnp.ones((256, 128), jnp.float32)
    grad = jnp.full((256, 128), 0.1, jnp.float32)
    state = rule.init_tensor_state(param)
    temps = {}
    for name, fn in (("fast", rule.tensor_step), ("reference", rule.reference_tensor_step)):
        compiled = jax.jit(fn, static_argnums=4).lower(theta, state, grad, param, False).compile()
        temps[name] = compiled.memory_analysis().temp_size_in_bytes / param.nbytes
    assert temps["fast"] < temps["reference"] / 4, temps


def test_traced_theta_under_jit_and_vmap_through_the_harness(random_theta):
    """Meta-training vmaps perturbed thetas through ``celo2(...)`` under jit."""
    params = {"w": jnp.ones((8, 6)) * 0.1, "b": jnp.zeros(6)}
    grads = {"w": jnp.cos(jnp.arange(48, dtype=jnp.float32)).reshape(8, 6), "b": jnp.ones(6)}
    labels = {"w": "celo2", "b": "adam"}
    theta = theta_to_jax(random_theta)
    noise = jax.tree_util.tree_map(lambda x: 0.1 * jnp.sin(jnp.arange(x.size, dtype=jnp.float32)).reshape(x.shape), theta)
    batch = jax.tree_util.tree_map(lambda x, e: jnp.stack([x, x + e, x]), theta, noise)

    def first_update(th):
        opt = celo2(1e-2, theta=th, param_labels=labels)
        updates, _ = opt.update(grads, opt.init(params), params)
        return updates

    out = jax.jit(jax.vmap(first_update))(batch)
    for key in params:
        assert out[key].shape == (3, *params[key].shape)
        assert np.all(np.isfinite(np.asarray(out[key])))
        np.testing.assert_allclose(np.asarray(out[key][0]), np.asarray(out[key][2]), rtol=1e-6, atol=1e-8)
    # The learned branch follows theta; the AdamW branch does not.
    assert not np.allclose(np.asarray(out["w"][0]), np.asarray(out["w"][1]))
    np.testing.assert_allclose(np.asarray(out["b"][0]), np.asarray(out["b"][1]))
