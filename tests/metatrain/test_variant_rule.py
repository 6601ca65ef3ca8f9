"""Every rule variant steps in meta-training as its formula (tests/variant_formula.py) says.

The inner optimiser PES runs (:func:`celo2.metatrain.pes.default_inner_optimizer`: celo2.optax's XLA
formulation, theta traced) is stepped twice on a small matrix and a vector and compared with the rule
spelled out in NumPy (float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from variant_formula import VARIANTS, float64_arrays, formula_step, theta_of, zero_state

from celo2.metatrain.config import preset
from celo2.metatrain.pes import default_inner_optimizer, unflatten_theta
from celo2.rule.variant import RuleVariant

LR, WD = 0.01, 0.1


@pytest.mark.parametrize("inner", ["celo2", "celo2-base"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.label)
def test_inner_step_is_the_formula(variant, inner):
    config = preset("smoke", inner_optimizer=inner, variant=variant, inner_lr=LR, inner_weight_decay=WD)
    theta = theta_of(variant)
    arrays = float64_arrays(theta)
    factory = default_inner_optimizer(config)
    flat = jnp.asarray(theta.to_flat(), jnp.float32)

    @jax.jit
    def update(flat, grads, opt_state, params):  # theta traced, as inside PES
        return factory(unflatten_theta(flat, variant)).update(grads, opt_state, params)

    rng = np.random.default_rng(3)
    params = {"w": rng.normal(size=(5, 3)), "v": rng.normal(size=(4,))}  # default routing: the vector to AdamW
    ref_params = dict(params)
    states = {k: zero_state(p.shape) for k, p in params.items()}
    jparams = {k: jnp.asarray(p, jnp.float32) for k, p in params.items()}
    opt_state = factory(unflatten_theta(flat, variant)).init(jparams)
    for _ in range(2):
        grads = {k: rng.normal(size=p.shape) * 0.5 for k, p in params.items()}
        updates, opt_state = update(flat, {k: jnp.asarray(g, jnp.float32) for k, g in grads.items()},
                                    opt_state, jparams)
        jparams = optax.apply_updates(jparams, updates)
        ruled = ("w", "v") if inner == "celo2-base" else ("w",)
        for key in ruled:
            d, states[key] = formula_step(variant, arrays, states[key], grads[key], ref_params[key],
                                          orthogonalize=inner == "celo2")
            expected = -LR * (d + WD * ref_params[key])
            np.testing.assert_allclose(np.asarray(updates[key]), expected, rtol=2e-4, atol=2e-6, err_msg=key)
            ref_params[key] = ref_params[key] + expected
        ref_params = {k: (ref_params[k] if k in ruled else np.asarray(jparams[k], np.float64)) for k in params}


def test_nonfinite_gradient_keeps_the_tensor():
    variant = RuleVariant(hidden_width=4)
    config = preset("smoke", inner_optimizer="celo2-base", variant=variant, inner_lr=LR, inner_weight_decay=WD)
    theta = unflatten_theta(jnp.asarray(theta_of(variant).to_flat()), variant)
    opt = default_inner_optimizer(config)(theta)
    params = {"w": jnp.ones((3, 2)), "u": jnp.ones((2, 2))}
    state = opt.init(params)
    grads = {"w": jnp.full((3, 2), jnp.nan), "u": jnp.ones((2, 2))}
    updates, new = opt.update(grads, state, params)
    assert np.all(np.asarray(updates["w"]) == 0) and np.all(np.isfinite(np.asarray(updates["u"])))
    def w_state(tree):
        return [np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
                if "tensors" in jax.tree_util.keystr(path) and "['w']" in jax.tree_util.keystr(path)]

    before, after = w_state(state), w_state(new)
    assert len(before) == 4 and all(np.array_equal(a, b) for a, b in zip(before, after))
