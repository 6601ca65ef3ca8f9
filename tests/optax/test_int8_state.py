"""8-bit blockwise optimizer state in the JAX front end (issue 28, ``state_dtype="int8"``): the jnp quantiser
against the NumPy reference bit for bit (under jit), the same codes as the PyTorch front end over six steps,
the state's structure, skipped tensors, conversions and their errors, bad seeds. Resume and the bytes of
state per parameter are tested for bfloat16 and 8-bit state alike in test_state_dtype.py."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import celo2
from celo2.optax import ScaleByCelo2State, celo2 as celo2_optax, celo2_base, convert_state_dtype, scale_by_celo2
from celo2.optax import blockwise8 as O
from celo2.rule import blockwise8 as B

import optax_runs as runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "torch"))  # the torch test module, imported below

WIDTH = 300
"""The dense layer's width in :func:`optax_runs.tree`: its kernel fills blocks of 256 elements."""


def _values(shape: tuple[int, ...], key: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * np.exp(rng.uniform(-8, 8, shape))).astype(np.float32)
    flat = x.reshape(-1)
    if flat.size > 2 * B.BLOCK_ELEMENTS:
        flat[: 2 * B.BLOCK_ELEMENTS: 97] = 0.0
        flat[B.BLOCK_ELEMENTS + 5] = np.nan
        flat[-1] = np.inf
    return np.abs(x) if B.is_second_moment(key) else x


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 300), (3, 7, 61)])
@pytest.mark.parametrize("key", ["m", "v", "exp_avg", "exp_avg_sq"])
def test_jnp_quantiser_equals_the_numpy_reference_bit_for_bit(shape, key):
    x = _values(shape, key)
    want = B.stochastic_quantise(x, seed=11, step=6, tensor=4, key=key)
    got = jax.jit(lambda v: O.stochastic_encode(v, key, jnp.uint32(11), jnp.int32(6), 4))(jnp.asarray(x))
    assert got.codes.dtype == B.code_dtype(key) and got.codes.shape == x.shape
    np.testing.assert_array_equal(np.asarray(got.codes), want[0])
    np.testing.assert_array_equal(np.asarray(got.scales).view(np.uint32), want[1].view(np.uint32))
    back = jax.jit(lambda b: O.decode(b, key))(got)
    np.testing.assert_array_equal(np.asarray(back), B.dequantise(*want, key))
    near = jax.jit(lambda v: O.encode(v, key))(jnp.asarray(x))
    ref = B.quantise(x, B.NEAREST_BITS, key)
    np.testing.assert_array_equal(np.asarray(near.codes), ref[0])
    np.testing.assert_array_equal(np.asarray(near.scales).view(np.uint32), ref[1].view(np.uint32))


def test_the_torch_and_jax_front_ends_store_the_same_codes_over_six_steps():
    """Celo2Base with 8-bit state, six steps of fixed gradients, in both front ends: every code equal. The
    front ends' float32 accumulators are the same formula with operations ordered and fused differently (XLA),
    so a block's largest value, and so its scale, may differ in the last bits (a few ulps): the scales are
    checked to a relative 1e-6, the codes exactly (a code could move by one step where a value sits on a code
    boundary; none does here)."""
    import test_state_int8 as torch_side

    torch_states = torch_side.int8_states("reference")
    params, grads = torch_side.tensors_and_gradients()
    jparams = [jnp.asarray(p.detach().numpy()) for p in params]
    opt = celo2_base(1e-2, theta=celo2.Theta.init(seed=0), cpu_kernels=False, state_dtype="int8",
                     rounding_seed=torch_side.SEED)
    state = opt.init(jparams)
    update = jax.jit(opt.update)
    for step in range(torch_side.STEPS):
        _, state = update([jnp.asarray(g.numpy()) for g in grads[step]], state, jparams)
    rule = state[0]
    assert int(rule.count) == torch_side.STEPS and int(rule.rounding_seed) == torch_side.SEED
    for shape, want, ts in zip(torch_side.SHAPES, torch_states, rule.tensors):
        for key, stored in zip(ts._fields, ts):
            np.testing.assert_array_equal(np.asarray(stored.codes), want[key], err_msg=f"{key} of {shape}")
            np.testing.assert_allclose(np.asarray(stored.scales), want[key + B.SCALE_SUFFIX], rtol=1e-6, atol=0,
                                       err_msg=f"{key} scales of {shape}")


def _stored(state) -> list:
    return [x for x in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, O.Blockwise8))
            if isinstance(x, O.Blockwise8)]


@pytest.mark.parametrize("name", ["celo2", "celo2_base"])
def test_every_accumulator_is_stored_as_codes_and_a_skipped_tensor_keeps_them(random_theta, name):
    params = runs.tree(width=WIDTH)
    opt = runs.make(name, state_dtype="int8", rounding_seed=3, cpu_kernels=False)(random_theta)
    _, state = runs.run(opt, params, 3)
    stored = _stored(state)
    per_tensor = 4 if name == "celo2_base" else None
    assert stored and all(b.codes.dtype in (jnp.int8, jnp.uint8) and b.scales.dtype == jnp.float32 for b in stored)
    if per_tensor:
        assert len(stored) == per_tensor * len(jax.tree_util.tree_leaves(params))
    floats = [x for x in jax.tree_util.tree_leaves(state) if x.dtype == jnp.float32 and x.size > 1]
    assert all(any(x is b.scales for b in stored) for x in floats)  # no float accumulator left
    _, after = runs.run(opt, params, 1, state=state, start=3, nan_leaf="embed")
    leaf = lambda st: [x for p, x in jax.tree_util.tree_leaves_with_path(  # noqa: E731
        st, is_leaf=lambda x: isinstance(x, O.Blockwise8))
        if "'embed'" in jax.tree_util.keystr(p) and isinstance(x, O.Blockwise8)]
    assert leaf(state)
    for a, b in zip(leaf(state), leaf(after)):
        assert np.asarray(a.codes).tobytes() == np.asarray(b.codes).tobytes()
        assert np.asarray(a.scales).tobytes() == np.asarray(b.scales).tobytes()
    moved = [x for p, x in jax.tree_util.tree_leaves_with_path(after, is_leaf=lambda x: isinstance(x, O.Blockwise8))
             if "'dense'" in jax.tree_util.keystr(p) and isinstance(x, O.Blockwise8)]
    before = [x for p, x in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, O.Blockwise8))
              if "'dense'" in jax.tree_util.keystr(p) and isinstance(x, O.Blockwise8)]
    assert any(not np.array_equal(np.asarray(a.codes), np.asarray(b.codes)) for a, b in zip(before, moved))


@pytest.mark.parametrize("name", ["celo2", "celo2_base"])
def test_a_float_state_converts_to_int8_rounded_to_nearest_and_back_to_the_decoded_values(random_theta, name):
    params = runs.tree(width=WIDTH)
    _, state = runs.run(runs.make(name, cpu_kernels=False)(random_theta), params, 2)
    eight = convert_state_dtype(state, "int8", rounding_seed=9)
    opt8 = runs.make(name, state_dtype="int8", cpu_kernels=False)(random_theta)
    assert jax.tree_util.tree_structure(eight) == jax.tree_util.tree_structure(opt8.init(params))
    assert len(_stored(eight)) >= 4
    back = convert_state_dtype(eight, jnp.float32)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype and a.shape == b.shape
    rule = [n for n in jax.tree_util.tree_leaves(eight, is_leaf=lambda x: isinstance(x, ScaleByCelo2State))
            if isinstance(n, ScaleByCelo2State)][0]
    rule32 = [n for n in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, ScaleByCelo2State))
              if isinstance(n, ScaleByCelo2State)][0]
    assert int(rule.rounding_seed) == 9
    tensors8 = jax.tree_util.tree_leaves(rule.tensors, is_leaf=lambda x: isinstance(x, O.Blockwise8))
    tensors32 = jax.tree_util.tree_leaves(rule32.tensors)
    keys = [k for _ in range(len(tensors32) // 4) for k in ("m", "v", "fac_r", "fac_c")]
    for key, stored, x in zip(keys, tensors8, tensors32):
        ref = B.quantise(np.asarray(x), B.NEAREST_BITS, key)
        np.testing.assert_array_equal(np.asarray(stored.codes), ref[0], err_msg=key)
        np.testing.assert_array_equal(np.asarray(stored.scales).view(np.uint32), ref[1].view(np.uint32))
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
               for a, b in zip(jax.tree_util.tree_leaves(convert_state_dtype(eight, "int8")),
                               jax.tree_util.tree_leaves(eight)))
    runs.run(opt8, params, 2, state=eight, start=2)  # it steps on
    low = convert_state_dtype(eight, jnp.bfloat16)
    runs.run(runs.make(name, state_dtype=jnp.bfloat16, cpu_kernels=False)(random_theta), params, 1, state=low, start=2)


@pytest.mark.parametrize("source", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_a_float_state_in_an_int8_optimizer_is_refused_naming_the_conversion(random_theta, source):
    """A float32 state (no seed) and a bfloat16 one (seeded, float accumulators) alike."""
    params = runs.tree(width=WIDTH)
    _, state = runs.run(runs.make("celo2_base", state_dtype=source, cpu_kernels=False)(random_theta), params, 1)
    with pytest.raises(ValueError, match=r"keeps 8-bit blockwise \(int8\) state.*convert_state_dtype\(state, 'int8'\)"):
        runs.run(runs.make("celo2_base", state_dtype="int8", cpu_kernels=False)(random_theta), params, 1, state=state)
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        scale_by_celo2(state_dtype="int4")


@pytest.mark.parametrize("bad", [-1, 2**32, 1.5, "0"])
def test_a_bad_seed_for_int8_state_is_refused_when_the_optimizer_is_built(bad):
    """Every constructor of 8-bit state refuses the seed before any state exists, the 8-bit wrapper of the
    float32 rule too (it is public: :func:`celo2.optax.blockwise8.blockwise8_rule`)."""
    for build in (lambda: scale_by_celo2(state_dtype="int8", rounding_seed=bad),
                  lambda: celo2_base(1e-3, state_dtype="int8", rounding_seed=bad),
                  lambda: celo2_optax(1e-3, state_dtype="int8", rounding_seed=bad),
                  lambda: O.blockwise8_rule(scale_by_celo2(), rounding_seed=bad)):
        with pytest.raises(ValueError, match="rounding_seed must be an integer in"):
            build()
