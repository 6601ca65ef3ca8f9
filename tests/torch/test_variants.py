"""celo2.torch runs every rule variant on the chunked and reference backends, as the NumPy formula
(tests/variant_formula.py) says and as celo2.optax does; the fused backends (Numba, Triton) run the
published rule only: ``"auto"`` leaves them with one note, a forced one is refused by name at construction."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from variant_formula import VARIANTS, float64_arrays, formula_step, theta_of, zero_state

from celo2.rule.variant import PUBLISHED, RuleVariant, VariantNotSupportedError, VariantPathWarning
from celo2.torch import Celo2, Celo2Base
from celo2.torch import functional as F
from celo2.torch._state import TorchTheta, init_tensor_state

CASES = [((5, 3), True), ((3, 6), False), ((4,), False), ((7, 5), True)]
"""(shape, orthogonalize): matrices of both factorings, with and without Newton-Schulz, a vector, and a
matrix in tiny chunks."""


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.label)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_backends_step_as_the_formula(variant, backend):
    theta = theta_of(variant)
    tt, arrays = TorchTheta.from_theta(theta), float64_arrays(theta)
    rng = np.random.default_rng(1)
    for shape, orthogonalize in CASES:
        param = rng.normal(size=shape)
        state, expected_state = init_tensor_state(torch.zeros(shape)), zero_state(shape)
        for _ in range(2):
            grad = rng.normal(size=shape) * 0.5
            expected, expected_state = formula_step(variant, arrays, expected_state, grad, param, orthogonalize)
            d = F.tensor_step(tt, state, torch.tensor(grad, dtype=torch.float32),
                              torch.tensor(param, dtype=torch.float32), orthogonalize, backend=backend,
                              chunk_elements=8 if shape == (7, 5) else None, ns_dtype=torch.float32)
            np.testing.assert_allclose(d.numpy(), expected, rtol=2e-4, atol=2e-5,
                                       err_msg=f"{backend} {shape} orthogonalize={orthogonalize}")
            np.testing.assert_allclose(state["m"].numpy(), expected_state["m"], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(state["v"].numpy(), expected_state["v"], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.label)
def test_chunked_and_reference_agree_on_a_3d_tensor(variant):
    tt = TorchTheta.from_theta(theta_of(variant))
    rng = np.random.default_rng(4)
    shape = (3, 4, 6)
    param = torch.tensor(rng.normal(size=shape), dtype=torch.float32)
    states = {b: init_tensor_state(param) for b in ("torch", "reference")}
    for _ in range(2):
        grad = torch.tensor(rng.normal(size=shape), dtype=torch.float32)
        out = {b: F.tensor_step(tt, states[b], grad, param, True, backend=b, chunk_elements=24) for b in states}
        torch.testing.assert_close(out["torch"], out["reference"], rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.is_published], ids=lambda v: v.label)
def test_optimizers_with_a_variant_theta_agree_with_optax(variant):
    """``Celo2`` with backend "auto" takes the chunked path (one note) and steps as celo2.optax does."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import optax

    from celo2.optax import celo2 as optax_celo2

    theta = theta_of(variant)
    lr, wd = 0.01, 0.1
    rng = np.random.default_rng(5)
    init = {"w": rng.normal(size=(6, 4)), "k": rng.normal(size=(4, 7)), "b": rng.normal(size=(4,))}
    tparams = [torch.nn.Parameter(torch.tensor(init[k], dtype=torch.float32)) for k in init]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt = Celo2(zip(init, tparams), lr=lr, weight_decay=wd, theta=theta, ns_dtype=torch.float32)
    notes = [w for w in caught if issubclass(w.category, VariantPathWarning)]
    assert len(notes) == 1 and "chunked" in str(notes[0].message) and variant.label in str(notes[0].message)
    jopt = optax_celo2(lr, weight_decay=wd, theta=theta, cpu_kernels=False, ns_dtype="float32")
    jparams = {k: jnp.asarray(v, jnp.float32) for k, v in init.items()}
    jstate = jopt.init(jparams)
    for _ in range(2):
        grads = {k: rng.normal(size=v.shape) for k, v in init.items()}
        for p, k in zip(tparams, init):
            p.grad = torch.tensor(grads[k], dtype=torch.float32)
        opt.step()
        updates, jstate = jopt.update({k: jnp.asarray(g, jnp.float32) for k, g in grads.items()}, jstate, jparams)
        jparams = optax.apply_updates(jparams, updates)
        for p, k in zip(tparams, init):
            np.testing.assert_allclose(p.detach().numpy(), np.asarray(jparams[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    del jax


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("make", [Celo2, Celo2Base])
def test_a_forced_fast_backend_refuses_a_variant_at_construction(backend, make):
    theta = theta_of(RuleVariant(rms_decay=0.999))
    param = torch.nn.Parameter(torch.ones(3, 2))
    try:
        F.check_backend(backend)
    except ValueError:
        pytest.skip(f"{backend} is not installed")
    with pytest.raises(VariantNotSupportedError, match=rf"backend='{backend}'.*rms_decay=0.999 \(published 0.95\)"):
        make([param], theta=theta, backend=backend)
    opt = make([param], theta=theta, backend="torch")
    with pytest.raises(VariantNotSupportedError, match=rf"param group 1: backend='{backend}'"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(2))], "backend": backend})
    assert len(opt.param_groups) == 1 and not opt.state


def test_functional_auto_skips_the_fused_backends_for_a_variant():
    variant = RuleVariant(hidden_width=4)
    tt = TorchTheta.from_theta(theta_of(variant))
    param = torch.ones(4, 3)
    state = init_tensor_state(param)
    assert F.pick("auto", state, param, param, variant).runs_variants
    assert F.pick("auto", state, param, param, PUBLISHED).name == F.pick("auto", state, param, param).name
    assert tt.net is None and tt.variant == variant


def test_the_published_theta_says_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error", VariantPathWarning)
        Celo2([torch.nn.Parameter(torch.ones(3, 2))], theta=theta_of(PUBLISHED))
