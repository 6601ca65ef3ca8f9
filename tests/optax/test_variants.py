"""celo2.optax runs every rule variant: XLA's formulation and the reference against the NumPy formula
(tests/variant_formula.py); the CPU kernels, published-only, are left for XLA with one note, or refuse
a variant by name when forced."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest

pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from variant_formula import VARIANTS, float64_arrays, formula_step, theta_of, zero_state  # noqa: E402

from celo2 import ThetaError, save_theta  # noqa: E402
from celo2.optax import celo2, celo2_base, scale_by_celo2  # noqa: E402
from celo2.optax.functional import init_tensor_state, reference_tensor_step, tensor_step, theta_to_jax  # noqa: E402
from celo2.rule.variant import (PUBLISHED, RuleVariant, VariantError, VariantNotSupportedError,  # noqa: E402
                                VariantPathWarning)

CASES = [((5, 3), True), ((3, 6), False), ((4,), False)]
"""(shape, orthogonalize): a tall and a wide matrix (both factorings), with and without Newton-Schulz, a vector."""


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.label)
def test_both_formulations_step_as_the_formula(variant):
    theta = theta_of(variant)
    tree, arrays = theta_to_jax(theta), float64_arrays(theta)
    rng = np.random.default_rng(1)
    xla, ref = tensor_step, reference_tensor_step  # op by op: a compile per variant and shape costs more
    for shape, orthogonalize in CASES:
        param = rng.normal(size=shape)
        if True:
            expected_state = zero_state(shape)
            states = {"xla": init_tensor_state(jnp.zeros(shape)), "ref": init_tensor_state(jnp.zeros(shape))}
            for _ in range(2):
                grad = rng.normal(size=shape) * 0.5
                expected, expected_state = formula_step(variant, arrays, expected_state, grad, param, orthogonalize)
                for name, step in (("xla", xla), ("ref", ref)):
                    d, states[name] = step(tree, states[name], jnp.asarray(grad, jnp.float32),
                                           jnp.asarray(param, jnp.float32), orthogonalize, variant=variant)
                    np.testing.assert_allclose(np.asarray(d), expected, rtol=2e-4, atol=2e-5,
                                               err_msg=f"{name} {shape} orthogonalize={orthogonalize}")
                    np.testing.assert_allclose(np.asarray(states[name].m), expected_state["m"], rtol=1e-5,
                                               atol=1e-7)
                    np.testing.assert_allclose(np.asarray(states[name].v), expected_state["v"], rtol=1e-5,
                                               atol=1e-9)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.is_published], ids=lambda v: v.label)
def test_a_variant_theta_steps_through_the_optimizers(variant, tmp_path):
    """``celo2``/``celo2_base`` take the Theta (or its file), run XLA with one note, and step as the formula."""
    theta = theta_of(variant)
    path = tmp_path / "theta.npz"
    save_theta(theta, path)
    arrays = float64_arrays(theta)
    lr, wd = 0.01, 0.1
    rng = np.random.default_rng(2)
    params = {"w": rng.normal(size=(5, 3)), "u": rng.normal(size=(4,))}
    celo2_f32 = functools.partial(celo2, ns_dtype="float32")  # "auto" may multiply in bfloat16
    for make, ruled, orthogonalize in ((celo2_f32, ("w",), True), (celo2_base, ("w", "u"), False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = make(lr, weight_decay=wd, theta=str(path))
        notes = [w for w in caught if issubclass(w.category, VariantPathWarning)]
        assert len(notes) == 1 and "XLA" in str(notes[0].message) and variant.label in str(notes[0].message)
        jparams = {k: jnp.asarray(p, jnp.float32) for k, p in params.items()}
        state = opt.init(jparams)
        expected_states = {k: zero_state(params[k].shape) for k in ruled}
        ref_params = dict(params)
        for _ in range(2):
            grads = {k: rng.normal(size=p.shape) * 0.5 for k, p in params.items()}
            updates, state = opt.update({k: jnp.asarray(g, jnp.float32) for k, g in grads.items()},
                                                 state, jparams)
            for key in ruled:
                d, expected_states[key] = formula_step(variant, arrays, expected_states[key], grads[key],
                                                       ref_params[key], orthogonalize)
                expected = -lr * (d + wd * ref_params[key])
                np.testing.assert_allclose(np.asarray(updates[key]), expected, rtol=2e-4, atol=2e-6, err_msg=key)
            jparams = optax.apply_updates(jparams, updates)
            ref_params = {k: np.asarray(p, np.float64) for k, p in jparams.items()}


def test_a_forced_kernel_path_refuses_a_variant_by_name():
    variant = RuleVariant(rms_decay=0.999)  # same arrays as the published rule, another update
    theta = theta_of(variant)
    with pytest.raises(VariantNotSupportedError, match=r"cpu_kernels=True.*rms_decay=0.999"):
        scale_by_celo2(theta, cpu_kernels=True)
    with pytest.raises(VariantNotSupportedError, match=r"cpu_kernels=True.*rms_decay=0.999"):
        tensor_step(theta_to_jax(theta), init_tensor_state(jnp.zeros((3, 2))), jnp.ones((3, 2)), jnp.ones((3, 2)),
                    True, cpu_kernels=True, variant=variant)


def test_a_dict_theta_names_its_variant_and_a_theta_its_own():
    variant = RuleVariant(hidden_width=4)
    theta = theta_of(variant)
    with pytest.raises(VariantError, match="variant= is hidden_width=16 but the theta belongs"):
        scale_by_celo2(theta, variant=RuleVariant(hidden_width=16))
    with pytest.raises(ThetaError, match=r"'w0__0' has shape \(1, 4\), expected \(1, 8\).*variant="):
        scale_by_celo2({k: v for k, v in theta.arrays.items()})  # a variant's dict read as the published rule's
    tree = theta_to_jax(theta)
    params = {"w": jnp.ones((3, 2))}
    a = scale_by_celo2(tree, variant=variant, cpu_kernels=False)
    b = scale_by_celo2(theta, cpu_kernels=False)
    ua, _ = a.update(params, a.init(params), params)
    ub, _ = b.update(params, b.init(params), params)
    np.testing.assert_array_equal(np.asarray(ua["w"]), np.asarray(ub["w"]))


def test_the_published_theta_says_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", VariantPathWarning)
        scale_by_celo2(theta_of(PUBLISHED))


def test_published_variant_is_bitwise_the_default():
    """``variant=PUBLISHED`` given or left out traces the same code."""
    theta = theta_to_jax(theta_of(PUBLISHED))
    rng = np.random.default_rng(0)
    p = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    g = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
    s = init_tensor_state(p)
    a, _ = tensor_step(theta, s, g, p, True)
    b, _ = tensor_step(theta, s, g, p, True, variant=PUBLISHED)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
