"""bfloat16 optimizer state in celo2.optax (issue 28): the JAX hash and rounding are celo2.rule.rounding's,
bit for bit, in every path (XLA, reference, CPU kernels) and in both branches of the harness; no stall,
skip, conversion, jit/vmap. Resume and the bytes of state per parameter are tested here for bfloat16 and
8-bit state (``state_dtype="int8"``) alike; the 8-bit format's own tests are in test_int8_state.py."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from celo2.optax import celo2, celo2_base, convert_state_dtype, cpu_ffi, scale_by_celo2
from celo2.optax import functional as rule
from celo2.optax import rounding as jr
from celo2.optax.functional import theta_to_jax
from celo2.optax.state import ScaleByCelo2State
from celo2.rule import rounding as ref
from celo2.rule.state import STATE_KEYS

import optax_runs as runs

KERNELS = [False, pytest.param(True, marks=pytest.mark.skipif(not cpu_ffi.AVAILABLE, reason="no CPU kernels"))]


def _bits(x) -> np.ndarray:
    """A bfloat16 array's bit patterns."""
    return np.asarray(jnp.asarray(x, jnp.bfloat16)).view(np.uint16)


def _same(a, b) -> bool:
    """Two pytrees equal leaf by leaf, bitwise."""
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


# ---------------------------------------------------------------- the hash and the rounding


def test_jax_hash_gives_the_pinned_answers():
    assert jr.mix32(jnp.arange(4, dtype=jnp.uint32)).tolist() == [0, 2261973619, 229111015, 3983417082]
    assert int(jr.stream_key(0, 1, 0, 1)) == 2196780706
    assert int(jr.stream_key(7, 3, 2, 4)) == 1714008317
    key = jr.stream_key(0, 1, 0, 1)
    bits = jr.random_bits(key, jr.mix32(jnp.arange(6, dtype=jnp.uint32)))
    assert bits.tolist() == [33593, 61936, 20718, 62055, 56476, 5043]
    # Traced counters (int32 steps past 2**31 wrap like the reference's modulo 2**32).
    traced = jax.jit(jr.stream_key, static_argnums=3)(jnp.uint32(7), jnp.int32(3), jnp.int32(2), 4)
    assert int(traced) == 1714008317


@pytest.mark.parametrize("shape", [(1000,), (3, 17, 5), (3, 0), (2, 3, 4, 5)])
def test_stochastic_round_is_the_reference_bit_for_bit(shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-30, 30, shape)).astype(np.float32)
    if x.size:
        flat = x.reshape(-1)
        flat[:8] = [np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3.3e38][: flat.size]
    got = jax.jit(lambda v: jr.stochastic_round(v, jr.StateRounding(11, 5, 3), "fac_c"))(jnp.asarray(x))
    expected = ref.stochastic_round(x, seed=11, step=5, tensor=3, slot="fac_c")
    np.testing.assert_array_equal(_bits(got), expected)


def test_state_dtype_and_seed_are_checked():
    with pytest.raises(ValueError, match="state_dtype must be one of float32, bfloat16, int8; got 'float16'"):
        celo2(1e-3, state_dtype=jnp.float16)
    with pytest.raises(ValueError, match="state_dtype must be one of float32, bfloat16, int8; got 'int4'"):
        celo2_base(1e-3, state_dtype="int4")
    for bad in (-1, 2**32, 1.5, "0"):
        with pytest.raises(ValueError, match="rounding_seed must be an integer in"):
            scale_by_celo2(rounding_seed=bad)
    params = {"w": jnp.ones((4, 3))}
    for dtype in (jnp.bfloat16, "bfloat16", np.dtype(jnp.bfloat16)):
        state = celo2_base(1e-3, state_dtype=dtype).init(params)
        assert {str(x.dtype) for x in jax.tree_util.tree_leaves(state[0].tensors)} == {"bfloat16"}


# ---------------------------------------------------------------- one tensor, every path


def _paths(cpu):
    if cpu:
        return lambda th, s, g, p, o, rounding=None: rule.tensor_step(th, s, g, p, o, True, rounding=rounding)
    return lambda th, s, g, p, o, rounding=None: rule.tensor_step(th, s, g, p, o, False, rounding=rounding)


STEP_PATHS = {
    "xla": _paths(False),
    "kernels": _paths(True),
    "reference": lambda th, s, g, p, o, rounding=None: rule.reference_tensor_step(th, s, g, p, o, rounding=rounding),
}


@pytest.mark.parametrize("path", list(STEP_PATHS))
@pytest.mark.parametrize("shape,orthogonalize", [((37,), False), ((24, 7), True), ((6, 5, 3, 3), False)],
                         ids=["vector", "matrix", "conv"])
def test_every_path_stores_the_reference_rounding_of_its_float32_step(random_theta, path, shape, orthogonalize):
    """Six steps with bfloat16 state: each stored accumulator is ``stochastic_round`` (the NumPy
    reference) of the float32 values the same path computes from the previous stored state."""
    if path == "kernels" and not cpu_ffi.AVAILABLE:
        pytest.skip("no CPU kernels")
    theta = theta_to_jax(random_theta)
    fn = STEP_PATHS[path]
    low = jax.jit(lambda s, g, p, r: fn(theta, s, g, p, orthogonalize, rounding=r))
    wide = jax.jit(lambda s, g, p: fn(theta, s, g, p, orthogonalize))
    rng = np.random.default_rng(3)
    param = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
    state = rule.init_tensor_state(param, jnp.bfloat16)
    for step in range(1, 7):
        grad = jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 10.0 ** (step % 3 - 1))
        d_low, new = low(state, grad, param, jr.StateRounding(jnp.uint32(9), jnp.int32(step), 4))
        d_wide, f32 = wide(jr.load_state(state), grad, param)
        np.testing.assert_allclose(np.asarray(d_low), np.asarray(d_wide), rtol=1e-4, atol=1e-5)  # two programs
        for key, stored, exact in zip(STATE_KEYS, new, f32):
            assert stored.dtype == jnp.bfloat16, key
            expected = ref.stochastic_round(np.asarray(exact), seed=9, step=step, tensor=4, slot=key)
            np.testing.assert_array_equal(_bits(stored), expected, err_msg=f"{path} {key} step {step}")
        state, param = new, param - 0.01 * d_low


def test_a_bfloat16_state_without_rounding_and_a_float32_one_with_it_are_refused(random_theta):
    theta = theta_to_jax(random_theta)
    param = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="bfloat16 and rounding is None"):
        rule.tensor_step(theta, rule.init_tensor_state(param, jnp.bfloat16), param, param, False)
    with pytest.raises(ValueError, match="float32 and rounding is given"):
        rule.tensor_step(theta, rule.init_tensor_state(param), param, param, False,
                         rounding=jr.StateRounding(0, 1, 0))


# ---------------------------------------------------------------- whole optimizers


@pytest.mark.parametrize("name", ["celo2", "celo2_base"])
def test_the_xla_and_cpu_kernel_paths_store_the_same_bits(random_theta, name):
    if not cpu_ffi.AVAILABLE:
        pytest.skip("no CPU kernels")
    params = runs.tree()
    states = {k: runs.run(runs.make(name, state_dtype=jnp.bfloat16, cpu_kernels=k)(random_theta), params, 6)[1]
              for k in (False, True)}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(states[False]), jax.tree_util.tree_leaves(states[True])):
        np.testing.assert_array_equal(np.atleast_1d(np.asarray(a)).view(np.uint8), np.atleast_1d(np.asarray(b)).view(np.uint8),
                                      err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("fmt", [jnp.bfloat16, "int8"], ids=["bfloat16", "int8"])
@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("name", ["celo2", "celo2_base"])
def test_resume_from_a_saved_state_is_bitwise_the_uninterrupted_run(random_theta, name, kernels, fmt):
    opt = runs.make(name, state_dtype=fmt, rounding_seed=12345, cpu_kernels=kernels)(random_theta)
    params = runs.tree()
    p6, s6 = runs.run(opt, params, 6)
    p3, s3 = runs.run(opt, params, 3)
    saved = jax.tree_util.tree_map(np.asarray, (p3, s3))  # a checkpoint on the host
    restored = jax.tree_util.tree_map(jnp.asarray, saved)
    p33, s33 = runs.run(opt, restored[0], 3, state=restored[1], start=3)
    assert _same(s6, s33) and _same(p6, p33)
    assert not _same(s6, runs.run(runs.make(name, state_dtype=fmt, cpu_kernels=kernels)(random_theta), params, 6)[1])


@pytest.mark.parametrize("kernels", KERNELS)
def test_a_skipped_tensor_keeps_its_bfloat16_state_bitwise(random_theta, kernels):
    opt = runs.make("celo2", state_dtype=jnp.bfloat16, cpu_kernels=kernels)(random_theta)
    params = runs.tree()
    _, before = runs.run(opt, params, 2)
    grads = runs.grads(params, 2)
    grads["dense"] = {"kernel": grads["dense"]["kernel"].at[0, 0].set(jnp.nan),
                      "bias": grads["dense"]["bias"].at[3].set(jnp.inf)}
    _, after = jax.jit(opt.update)(grads, before, params)
    flat_b = dict((jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(before))
    changed = {k for k, x in jax.tree_util.tree_leaves_with_path(after)
               if np.asarray(x).tobytes() != np.asarray(flat_b[jax.tree_util.keystr(k)]).tobytes()}
    names = {jax.tree_util.keystr(k) for k in changed}
    assert not any("'dense'" in n and "nonfinite" not in n for n in names), names
    assert any("'conv'" in n for n in names) and any("'embed'" in n for n in names)


def test_the_adamw_branch_stores_the_reference_rounding_with_whole_tree_numbers(random_theta):
    """AdamW's moments: optax's float32 arithmetic from the stored moments, stored as the reference rounds
    them, with tensor = the leaf's index in the whole parameter tree (not in the AdamW branch's part)."""
    params = runs.tree()
    numbers = jr.number_tensors(params)
    routed = ["['embed']", "['dense']['bias']", "['lm_head']['kernel']", "['scale']"]
    assert [numbers[k] for k in routed] != list(range(len(routed)))
    for nonfinite in ("skip", "propagate"):
        opt = celo2(1e-2, theta=random_theta, state_dtype=jnp.bfloat16, rounding_seed=5, nonfinite=nonfinite)
        _, s1 = runs.run(opt, params, 1)
        _, s2 = runs.run(opt, params, 1, state=s1, start=1)
        for leaf in routed:
            g = np.asarray(_flat(runs.grads(params, 1))[leaf])
            mu = np.float32(1 - 0.9) * g + np.float32(0.9) * _adam_moment(s1, leaf, "mu")
            nu = np.float32(1 - 0.95) * (g * g) + np.float32(0.95) * _adam_moment(s1, leaf, "nu")
            for key, value, slot in (("mu", mu, "exp_avg"), ("nu", nu, "exp_avg_sq")):
                expected = ref.stochastic_round(value, seed=5, step=2, tensor=numbers[leaf], slot=slot)
                np.testing.assert_array_equal(_bits(_adam_moment(s2, leaf, key)), expected,
                                              err_msg=f"{nonfinite} {leaf} {key}")


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _adam_moment(state, leaf: str, key: str) -> np.ndarray:
    """One tensor's AdamW moment in a celo2 state, as float32 (found by the leaf's path)."""
    for node in jax.tree_util.tree_leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if not isinstance(node, optax.ScaleByAdamState):
            continue
        tree = getattr(node, key)
        flat = _flat(tree)
        if leaf in flat:
            return np.asarray(flat[leaf]).astype(np.float32)
    for path, node in jax.tree_util.tree_leaves_with_path(
            state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(node, optax.ScaleByAdamState) and jax.tree_util.keystr(path).endswith(leaf):
            return np.asarray(getattr(node, key)).astype(np.float32)
    raise KeyError(leaf)


# ---------------------------------------------------------------- no stall


def _momentum_after(steps: int, store) -> float:
    """The beta-0.999 momentum (m[2]) of a small tensor after ``steps`` constant gradients of 1."""
    theta = theta_to_jax(None)
    param = jnp.zeros((4, 8))
    grad = jnp.ones((4, 8))

    def body(carry, step):
        state = carry
        _, new = rule.tensor_step(theta, jr.load_state(state), grad, param, False)
        return store(new, step), None

    state0 = store(rule.init_tensor_state(param), jnp.int32(0))
    state, _ = jax.lax.scan(body, state0, jnp.arange(1, steps + 1, dtype=jnp.int32))
    return float(jnp.mean(state.m[2].astype(jnp.float32)))


def test_no_stall_with_stochastic_rounding_and_a_stall_with_round_to_nearest():
    steps = 3000
    wide = _momentum_after(steps, lambda s, step: s)
    stochastic = _momentum_after(steps, lambda s, step: jr.store_state(s, jr.StateRounding(0, step, 0)))
    nearest = _momentum_after(steps, lambda s, step: rule.TensorState(*(x.astype(jnp.bfloat16) for x in s)))
    assert abs(wide - (1 - 0.999 ** steps)) < 1e-3, wide
    assert abs(stochastic - wide) <= 0.02 * wide, (stochastic, wide)
    assert abs(nearest - wide) > 0.02 * wide, (nearest, wide)  # round-to-nearest freezes it far below


# ---------------------------------------------------------------- jit and vmap


def test_traced_theta_under_jit_and_vmap_with_bfloat16_state(random_theta):
    params = {"w": jnp.ones((8, 6)) * 0.1, "b": jnp.zeros(6)}
    grads = {"w": jnp.cos(jnp.arange(48, dtype=jnp.float32)).reshape(8, 6), "b": jnp.ones(6)}
    theta = theta_to_jax(random_theta)
    batch = jax.tree_util.tree_map(lambda x: jnp.stack([x, x * 1.1, x]), theta)

    def two_updates(th):
        opt = celo2(1e-2, theta=th, param_labels={"w": "celo2", "b": "adam"}, state_dtype=jnp.bfloat16)
        state = opt.init(params)
        _, state = opt.update(grads, state, params)
        updates, state = opt.update(grads, state, params)
        return updates, state

    out, states = jax.jit(jax.vmap(two_updates))(batch)
    assert out["w"].shape == (3, 8, 6) and np.all(np.isfinite(np.asarray(out["w"])))
    np.testing.assert_array_equal(np.asarray(out["w"][0]), np.asarray(out["w"][2]))
    assert "bfloat16" in {str(x.dtype) for x in jax.tree_util.tree_leaves(states)}
    one_out, one_state = jax.jit(two_updates)(theta)
    # The batched program sums in its own order: float32 values an ulp apart, so the stored bfloat16
    # (rounded from them) agrees to within one bfloat16 unit.
    np.testing.assert_allclose(np.asarray(out["w"][0]), np.asarray(one_out["w"]), rtol=1e-4, atol=1e-7)
    for a, b in zip(jax.tree_util.tree_leaves(states), jax.tree_util.tree_leaves(one_state)):
        np.testing.assert_allclose(np.asarray(a[0]).astype(np.float64), np.asarray(b).astype(np.float64),
                                   rtol=2.0 ** -7, atol=0)


# ---------------------------------------------------------------- conversion


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("name", ["celo2", "celo2_base"])
def test_a_float32_state_converts_to_bfloat16_and_back(random_theta, name, nonfinite):
    params = runs.tree()
    f32 = runs.make(name, nonfinite=nonfinite)(random_theta)
    b16 = runs.make(name, nonfinite=nonfinite, state_dtype=jnp.bfloat16, rounding_seed=4)(random_theta)
    _, state = runs.run(f32, params, 3)
    low = convert_state_dtype(state, jnp.bfloat16, rounding_seed=4)
    assert jax.tree_util.tree_structure(low) == jax.tree_util.tree_structure(b16.init(params))
    rule_state = lambda st: [n for n in jax.tree_util.tree_leaves(  # noqa: E731
        st, is_leaf=lambda x: isinstance(x, ScaleByCelo2State)) if isinstance(n, ScaleByCelo2State)][0]
    for a, b in zip(jax.tree_util.tree_leaves(rule_state(state).tensors), jax.tree_util.tree_leaves(rule_state(low).tensors)):
        np.testing.assert_array_equal(_bits(b), _bits(a.astype(jnp.bfloat16)))  # round to nearest-even, once
    assert int(rule_state(low).rounding_seed) == 4 and rule_state(back := convert_state_dtype(low, "float32")).rounding_seed is None
    if name == "celo2":
        for leaf in ("['embed']", "['dense']['bias']"):
            for key in ("mu", "nu"):
                np.testing.assert_array_equal(_bits(_adam_moment(low, leaf, key)),
                                              _bits(jnp.asarray(_adam_moment(state, leaf, key)).astype(jnp.bfloat16)))
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(rule_state(low).tensors), jax.tree_util.tree_leaves(rule_state(back).tensors)):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b))  # exact
    assert _same(convert_state_dtype(back, jnp.bfloat16, rounding_seed=4), low)
    assert _same(convert_state_dtype(low, jnp.bfloat16), low)
    runs.run(b16, params, 2, state=low, start=3)  # the converted state steps on


def test_conversion_errors_name_the_problem(random_theta):
    params = {"w": jnp.ones((4, 3))}
    opt = celo2_base(1e-3, theta=random_theta)
    state = opt.init(params)
    with pytest.raises(ValueError, match="state_dtype must be one of float32, bfloat16, int8; got 'float16'"):
        convert_state_dtype(state, jnp.float16)
    bad = jax.tree_util.tree_map(lambda x: x.astype(jnp.float16) if x.dtype == jnp.float32 else x, state)
    with pytest.raises(ValueError, match=r"the state leaf \[0\]\.tensors\['w'\]\.m is float16"):
        convert_state_dtype(bad, jnp.bfloat16)
    with pytest.raises(ValueError, match="no Celo2 state"):
        convert_state_dtype(optax.adam(1e-3).init(params), jnp.bfloat16)
    low = celo2_base(1e-3, theta=random_theta, state_dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"the accumulator \['w'\]\.m is float32, but this optimizer keeps bfloat16 "
                                         r"state; convert the state with celo2.optax.convert_state_dtype"):
        low.update(params, state, params)


# ---------------------------------------------------------------- bytes of state per parameter


@pytest.mark.parametrize("fmt,bound,fraction,rel", [("bfloat16", 8.5, 1 / 2, 0.01), ("int8", 4.25, 1 / 4, 0.05)],
                         ids=["bfloat16", "int8"])
@pytest.mark.parametrize("shapes", [(256, 64, 64, 2), (50257, 1024, 768, 12)], ids=["bench-gpt", "gpt2-124m"])
def test_state_is_its_formats_bytes_per_parameter(random_theta, shapes, fmt, bound, fraction, rel):
    """celo2 and celo2_base on the bench's GPT and GPT-2 124M: at most ``bound`` bytes of state per parameter,
    ``fraction`` of float32 state's to within ``rel``."""
    params = runs.gpt_shapes(*shapes)
    figures = {}
    for name in ("celo2", "celo2_base"):
        for dtype in ("float32", fmt):
            figures[name, dtype] = runs.state_bytes_per_parameter(runs.make(name, state_dtype=dtype)(random_theta),
                                                                  params)
    figures["adamw", "float32"] = runs.state_bytes_per_parameter(optax.adamw(1e-3), params)
    print({f"{k[0]}/{k[1]}": round(v, 3) for k, v in figures.items()})
    for name in ("celo2", "celo2_base"):
        assert figures[name, fmt] <= bound, figures
        assert figures[name, fmt] == pytest.approx(figures[name, "float32"] * fraction, rel=rel), figures
