"""celo2.optax: the rule and harness as optax transformations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from celo2.optax import celo2, celo2_base, routing_table, scale_by_celo2


def _problem():
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "embed": {"embedding": jax.random.normal(k1, (12, 6)) * 0.3},
        "dense": {"kernel": jax.random.normal(k2, (6, 24)) * 0.3, "bias": jnp.zeros(24)},
        "lm_head": {"kernel": jax.random.normal(k3, (24, 3)) * 0.3},
    }
    tokens = jax.random.randint(key, (128,), 0, 12)
    labels = (tokens % 3).astype(jnp.int32)

    def loss(p):
        h = jnp.tanh(p["embed"]["embedding"][tokens] @ p["dense"]["kernel"] + p["dense"]["bias"])
        return optax.softmax_cross_entropy_with_integer_labels(h @ p["lm_head"]["kernel"], labels).mean()

    return params, loss


def _train(opt, params, loss, steps):
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        value, grads = jax.value_and_grad(loss)(p)
        updates, s = opt.update(grads, s, p)
        return optax.apply_updates(p, updates), s, value

    values = []
    for _ in range(steps):
        params, state, value = step(params, state)
        values.append(float(value))
    return params, values


def test_routing_labels_embeddings_heads_and_vectors_to_adam():
    params, _ = _problem()
    table = routing_table(params)
    lines = {line.split()[1]: line.split()[0] for line in table.splitlines()[2:] if line.startswith(("adam ", "celo2 "))}
    assert lines["['dense']['kernel']"] == "celo2"
    assert lines["['dense']['bias']"] == "adam"
    assert lines["['embed']['embedding']"] == "adam"
    assert lines["['lm_head']['kernel']"] == "adam"


def test_harness_trains_with_the_published_theta(published_theta):
    params, loss = _problem()
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 10, 200)
    _, values = _train(celo2(schedule, weight_decay=1e-4, theta=published_theta), params, loss, 200)
    assert values[-1] < 0.3 * values[0]


def test_celo2_base_trains_with_the_published_theta(published_theta):
    params, loss = _problem()
    _, values = _train(celo2_base(3e-3, theta=published_theta), params, loss, 200)
    assert values[-1] < 0.5 * values[0]


def test_inject_hyperparams_controls_the_learning_rate(random_theta):
    params, loss = _problem()
    opt = optax.inject_hyperparams(celo2)(learning_rate=0.0, weight_decay=0.1, theta=random_theta)
    new_params, _ = _train(opt, params, loss, 3)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(new_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = opt.init(params)
    assert float(state.hyperparams["learning_rate"]) == 0.0


def test_adam_branch_is_optax_adamw_at_the_multiplied_rate(random_theta):
    params = {"bias": jnp.linspace(-1, 1, 7)}
    grads = {"bias": jnp.cos(jnp.arange(7.0))}
    ours = celo2(1e-3, weight_decay=0.1, adam_lr_mult=20.0, theta=random_theta)
    ref = optax.adamw(2e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1)
    s1, s2 = ours.init(params), ref.init(params)
    p1 = p2 = params
    for _ in range(5):
        u1, s1 = ours.update(grads, s1, p1)
        u2, s2 = ref.update(grads, s2, p2)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    np.testing.assert_allclose(np.asarray(p1["bias"]), np.asarray(p2["bias"]), rtol=0, atol=1e-7)


def test_learned_branch_is_minus_lr_times_direction_plus_decay(random_theta):
    params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((5, 7)), jnp.float32)}
    grads = {"w": jnp.ones((5, 7)) * 0.1}
    raw = scale_by_celo2(random_theta)
    direction, _ = raw.update(grads, raw.init(params), params)
    opt = celo2(0.01, weight_decay=0.5, theta=random_theta)
    updates, _ = opt.update(grads, opt.init(params), params)
    expected = -0.01 * (direction["w"] + 0.5 * params["w"])
    np.testing.assert_allclose(np.asarray(updates["w"]), np.asarray(expected), rtol=1e-5, atol=1e-7)


def test_scale_by_celo2_needs_params(random_theta):
    raw = scale_by_celo2(random_theta)
    params = {"w": jnp.ones((3, 3))}
    with pytest.raises(ValueError, match="needs the parameters"):
        raw.update(params, raw.init(params))


def test_traced_theta_works_inside_jit_and_grad(random_theta):
    """Meta-training differentiates or perturbs theta: it must be a traceable input."""
    from celo2.optax.functional import theta_to_jax

    params = {"w": jnp.ones((4, 3)) * 0.1}
    grads = {"w": jnp.arange(12.0).reshape(4, 3) / 10}

    @jax.jit
    def first_step(theta):
        raw = scale_by_celo2(theta)
        d, _ = raw.update(grads, raw.init(params), params)
        return jnp.sum(d["w"] * jnp.arange(12.0).reshape(4, 3))

    theta = theta_to_jax(random_theta)
    value = first_step(theta)
    grad = jax.grad(first_step)(theta)
    assert np.isfinite(float(value))
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree_util.tree_leaves(grad))
