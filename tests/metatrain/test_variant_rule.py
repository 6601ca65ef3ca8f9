"""Every rule variant steps in meta-training as its formula, written out here in NumPy, says.

The inner optimiser PES runs (:func:`celo2.metatrain.pes.default_inner_optimizer`) is
stepped twice on a small matrix and a vector and compared with the rule spelled out
below from the spec (float64); the published variant is also checked against the
optax front end.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from celo2 import Theta
from celo2.metatrain.config import preset
from celo2.metatrain.pes import default_inner_optimizer, unflatten_theta
from celo2.rule.variant import PUBLISHED, RuleVariant

VARIANTS = [
    PUBLISHED,
    RuleVariant(hidden_width=4),
    RuleVariant(hidden_width=16),
    RuleVariant(hidden_layers=1),
    RuleVariant(hidden_layers=3),
    RuleVariant(rms_decay=0.999),
    RuleVariant(momentum_decays=(0.5, 0.9, 0.95), factored_decays=(0.8, 0.9, 0.99)),
    RuleVariant(feature_groups=("g", "m", "v", "col", "fac_m")),
    RuleVariant(output_norm="none"),
    RuleVariant(outputs="direction+magnitude"),
]
LR, WD = 0.01, 0.1


# -- the rule, written out from the spec ---------------------------------------------------
def ns(x):
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.sqrt(np.sum(x * x)) + 1e-8)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def rsqrt(x):
    return 1.0 / np.sqrt(x)


def reference_step(variant, theta, state, grad, param, orthogonalize):
    """One step of ``variant`` on a vector or a matrix; ``state``: dict m (3, *S), v, r (row), c (column)."""
    g = np.clip(grad, -1000.0, 1000.0)
    bm = np.asarray(variant.momentum_decays).reshape((3,) + (1,) * g.ndim)
    bf = np.asarray(variant.factored_decays)
    m = bm * state["m"] + (1 - bm) * g
    v = variant.rms_decay * state["v"] + (1 - variant.rms_decay) * g * g
    gsq = g * g + 1e-30
    feats = {"g": g[None], "clip_g": np.clip(g, -0.1, 0.1)[None], "p": param[None], "m": m, "v": v[None],
             "m_rsqrt_v": m * rsqrt(v + 1e-8), "rsqrt_v": rsqrt(v + 1e-8)[None],
             "g_rsqrt_v": (g * rsqrt(v + 1e-8))[None]}
    if g.ndim == 1:
        r = bf[:, None] * state["r"] + (1 - bf[:, None]) * gsq
        c = state["c"]
        feats["fac_g"] = g * rsqrt(np.maximum(r + 1e-9, 1e-9))
        groups = variant.vector_groups
        axes = (1,)
    else:
        rows, cols = g.shape
        d0, d1 = (0, 1) if rows > cols else (1, 0)  # d0: the larger axis (the later one on a tie)
        r = bf[:, None] * state["r"] + (1 - bf[:, None]) * gsq.mean(axis=d0)
        c = bf[:, None] * state["c"] + (1 - bf[:, None]) * gsq.mean(axis=d1)
        row = np.expand_dims(r, 1 + d0)  # varies along d1
        col = np.expand_dims(c, 1 + d1)
        row_factor = rsqrt(np.maximum(row / (r.mean(axis=1, keepdims=True)[..., None] + 1e-9), 1e-9))
        col_factor = rsqrt(np.maximum(col, 1e-9))
        full = (3,) + g.shape
        feats.update({"fac_g": g * row_factor * col_factor,
                      "row": np.broadcast_to(row, full), "col": np.broadcast_to(col, full),
                      "rsqrt_row": np.broadcast_to(rsqrt(row + 1e-8), full),
                      "rsqrt_col": np.broadcast_to(rsqrt(col + 1e-8), full),
                      "fac_m": m * row_factor * col_factor})
        groups = variant.groups
        axes = (1, 2)
    hidden = theta["b0"]
    for group in groups:
        x = feats[group.name]
        x = x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + 1e-9)
        hidden = hidden + np.einsum("c...,ch->...h", x, theta[f"w0__{group.index}"])
    hidden = np.maximum(hidden, 0)
    for k in range(1, variant.hidden_layers):
        hidden = np.maximum(hidden @ theta[f"w{k}"] + theta[f"b{k}"], 0)
    out = hidden @ theta[f"w{variant.hidden_layers}"] + theta[f"b{variant.hidden_layers}"]
    d = out[..., 0]
    if orthogonalize and d.ndim == 2:
        d = ns(d)
    if variant.output_norm == "rms":
        d = d / np.sqrt(np.mean(d * d) + 1e-9)
    if variant.outputs == "direction+magnitude":
        d = d * np.exp(1e-3 * out[..., 1])
    return -LR * (d + WD * param), {"m": m, "v": v, "r": r, "c": c}


def zero_state(shape):
    if len(shape) == 1:
        return {"m": np.zeros((3, *shape)), "v": np.zeros(shape), "r": np.zeros((3, *shape)), "c": np.zeros((3, 0))}
    rows, cols = shape
    d0, d1 = (0, 1) if rows > cols else (1, 0)
    return {"m": np.zeros((3, *shape)), "v": np.zeros(shape),
            "r": np.zeros((3, shape[d1])), "c": np.zeros((3, shape[d0]))}


def theta_of(variant, seed=0):
    theta = Theta.init(seed, variant)
    arrays = {k: v.astype(np.float64) for k, v in theta.arrays.items()}
    rng = np.random.default_rng(seed + 1)
    for key in arrays:
        if key.startswith("b"):
            arrays[key] = rng.normal(size=arrays[key].shape) * 0.3
    arrays[f"b{variant.hidden_layers}"][1] = 400.0  # the magnitude output far from 0: exp(0.4) is visible
    return arrays


@pytest.mark.parametrize("inner", ["celo2", "celo2-base"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.label)
def test_inner_step_is_the_formula(variant, inner):
    config = preset("smoke", inner_optimizer=inner, variant=variant, inner_lr=LR, inner_weight_decay=WD)
    theta = theta_of(variant)
    flat = np.concatenate([theta[k].reshape(-1) for k in variant.theta_keys])
    factory = default_inner_optimizer(config)
    flat = jnp.asarray(flat, jnp.float32)

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
            expected, states[key] = reference_step(variant, theta, states[key], grads[key], ref_params[key],
                                                   orthogonalize=inner == "celo2")
            np.testing.assert_allclose(np.asarray(updates[key]), expected, rtol=2e-4, atol=2e-6, err_msg=key)
            ref_params[key] = ref_params[key] + expected
        ref_params = {k: (ref_params[k] if k in ruled else np.asarray(jparams[k], np.float64)) for k in params}


def test_published_variant_rule_is_the_optax_front_end():
    import celo2.optax as co
    from celo2.metatrain.variant_rule import variant_celo2

    theta = Theta.init(5)
    tree = {k: jnp.asarray(v) for k, v in theta.arrays.items()}
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32), "b": jnp.zeros(5),
              "k": jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)}
    front = co.celo2(LR, weight_decay=WD, theta=tree, cpu_kernels=False, ns_dtype="float32")
    mine = variant_celo2(PUBLISHED, tree, LR, WD)
    sa, sb, pa, pb = front.init(params), mine.init(params), params, params
    for _ in range(3):
        g = {k: jnp.asarray(rng.normal(size=x.shape), jnp.float32) for k, x in params.items()}
        ua, sa = front.update(g, sa, pa)
        ub, sb = mine.update(g, sb, pb)
        for key in ua:
            np.testing.assert_allclose(np.asarray(ub[key]), np.asarray(ua[key]), rtol=1e-5, atol=1e-7)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)


def test_nonfinite_gradient_keeps_the_tensor():
    from celo2.metatrain.variant_rule import scale_by_variant

    variant = RuleVariant(hidden_width=4)
    theta = {k: jnp.asarray(v) for k, v in Theta.init(0, variant).arrays.items()}
    opt = scale_by_variant(variant, theta, LR, WD)
    params = {"w": jnp.ones((3, 2)), "u": jnp.ones((2, 2))}
    state = opt.init(params)
    grads = {"w": jnp.full((3, 2), jnp.nan), "u": jnp.ones((2, 2))}
    updates, new = opt.update(grads, state, params)
    assert np.all(np.asarray(updates["w"]) == 0) and np.all(np.isfinite(np.asarray(updates["u"])))
    assert all(np.array_equal(a, b) for a, b in zip(new.tensors["w"], state.tensors["w"]))
