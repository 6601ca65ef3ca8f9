"""The optax front end under bad gradients, odd shapes and dtypes.

Non-finite policy (``nonfinite``) for ``celo2`` / ``celo2_base``, with the CPU
kernels (checked inside the custom calls) and on XLA's formulation; zero-size
tensors; float64 parameters (in a child interpreter with ``jax_enable_x64``);
zero gradients; a mismatched state handed to the kernels (in a child: a crash
fails the test); half-precision parameters (float32 AdamW moments); float0
gradients; derivatives asked through the CPU kernels.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import celo2.optax as co
from celo2.optax import cpu_ffi

SHAPES = {"matrix": (12, 8), "vector": (8,), "conv": (6, 4, 3, 3), "nd": (3, 5, 4)}
FNS = {"celo2": co.celo2, "celo2_base": co.celo2_base}
KERNELS = [pytest.param(True, id="kernels", marks=pytest.mark.skipif(not cpu_ffi.AVAILABLE, reason="no numba")),
           pytest.param(False, id="xla")]


def _params():
    rng = np.random.default_rng(0)
    return {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in SHAPES.items()}


def _grads(step: int):
    rng = np.random.default_rng(100 + step)
    return {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in SHAPES.items()}


def _stepper(opt):
    @jax.jit
    def step(params, state, grads):
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(x.shape == y.shape and bool(jnp.array_equal(x, y)) for x, y in zip(la, lb))


def _tensor_state(state, name):
    """Every state leaf that belongs to tensor ``name`` (its path names it)."""
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)
            if f"'{name}'" in jax.tree_util.keystr(path)}


@pytest.mark.parametrize("fn", list(FNS))
@pytest.mark.parametrize("kernels", KERNELS)
def test_a_bad_gradient_skips_its_tensor_only(fn, kernels):
    """NaN / +-inf in a matrix, a vector (AdamW in celo2) and a conv kernel, one
    compiled step for all (compiles dominate this test's time)."""
    opt = FNS[fn](1e-2, weight_decay=0.1, cpu_kernels=kernels)
    step = _stepper(opt)
    params = _params()
    state = opt.init(params)
    for i in range(2):
        params, state = step(params, state, _grads(i))
    grads = _grads(2)
    for bad, value in (("matrix", np.nan), ("matrix", -np.inf), ("vector", np.inf), ("vector", np.nan),
                       ("conv", np.nan), ("conv", np.inf)):
        _check_skip(fn, kernels, step, params, state, grads, bad, value)


def _check_skip(fn, kernels, step, params, state, grads, bad, value):  # noqa: ANN001
    poisoned = dict(grads, **{bad: grads[bad].reshape(-1).at[5].set(value).reshape(grads[bad].shape)})
    new_params, new_state = step(params, state, poisoned)
    assert bool(jnp.array_equal(new_params[bad], params[bad])), f"{bad} moved ({value})"
    before, after = _tensor_state(state, bad), _tensor_state(new_state, bad)
    counters = [k for k in after if "nonfinite_steps" in k]
    assert counters, "no counter for the tensor"
    for key in after:
        if key not in counters:
            assert bool(jnp.array_equal(after[key], before[key])), f"state {key} of {bad} changed"
    assert co.nonfinite_steps(new_state) == {f"['{n}']": int(n == bad) for n in SHAPES}
    # The others: as the same step with the bad tensor left out (for the matrix,
    # a model without it), else with its gradient clean (the same compiled step).
    others = [n for n in SHAPES if n != bad]
    if bad == "matrix" and value != value:
        ref_opt = FNS[fn](1e-2, weight_decay=0.1, cpu_kernels=kernels)
        sub = lambda tree: {n: tree[n] for n in others}  # noqa: E731
        ref_params, ref_state = sub(_params()), ref_opt.init(sub(_params()))
        ref_step = _stepper(ref_opt)
        for i in range(2):
            ref_params, ref_state = ref_step(ref_params, ref_state, sub(_grads(i)))
        ref_params, _ = ref_step(ref_params, ref_state, sub(grads))
    else:
        ref_params, _ = step(params, state, grads)
    for n in others:
        assert bool(jnp.array_equal(new_params[n], ref_params[n])), f"{n} differs from the run without {bad}"
    # Clean steps after it stay finite.
    for i in range(3, 5):
        new_params, new_state = step(new_params, new_state, _grads(i))
    for leaf in jax.tree_util.tree_leaves((new_params, new_state)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert bool(jnp.all(jnp.isfinite(leaf)))


@pytest.mark.parametrize("fn", list(FNS))
@pytest.mark.parametrize("kernels", KERNELS)
def test_propagate_is_the_unguarded_step(fn, kernels):
    """Clean gradients: skip and propagate give the same bits. A NaN under
    propagate flows as before the guard existed and nothing is counted."""
    runs = {}
    for policy in ("skip", "propagate"):
        opt = FNS[fn](1e-2, weight_decay=0.1, cpu_kernels=kernels, nonfinite=policy)
        step = _stepper(opt)
        params, state = _params(), opt.init(_params())
        for i in range(3):
            params, state = step(params, state, _grads(i))
        runs[policy] = (params, state, step)
    assert _leaves_equal(runs["skip"][0], runs["propagate"][0])
    params, state, step = runs["propagate"]
    grads = _grads(3)
    grads["matrix"] = grads["matrix"].at[2, 2].set(jnp.nan)
    params, state = step(params, state, grads)
    assert bool(jnp.all(jnp.isnan(params["matrix"])))
    assert set(co.nonfinite_steps(state).values()) == {0}


def test_scale_by_celo2_counts_and_refuses_unknown_policies():
    raw = co.scale_by_celo2(nonfinite="skip")
    params = {"w": jnp.ones((4, 3))}
    state = raw.init(params)
    updates, state = raw.update({"w": jnp.full((4, 3), jnp.inf)}, state, params)
    assert bool(jnp.all(updates["w"] == 0))
    assert co.nonfinite_steps(state) == {"['w']": 1}
    for fn in (co.scale_by_celo2, co.celo2_base):
        with pytest.raises(ValueError, match="nonfinite"):
            fn(1e-3, nonfinite="zero") if fn is co.celo2_base else fn(nonfinite="zero")
    with pytest.raises(ValueError, match="nonfinite"):
        co.celo2(1e-3, nonfinite="zero")


@pytest.mark.parametrize("fn", list(FNS))
@pytest.mark.parametrize("kernels", KERNELS)
def test_zero_size_tensors_get_zero_size_updates(fn, kernels):
    shapes = {"a": (0,), "b": (0, 5), "c": (5, 0), "d": (0, 3, 3, 3), "w": (4, 3)}
    params = {n: jnp.ones(s, jnp.float32) for n, s in shapes.items()}
    opt = FNS[fn](1e-2, cpu_kernels=kernels)
    step = _stepper(opt)
    state = opt.init(params)
    for _ in range(2):
        params, state = step(params, state, {n: jnp.ones(s, jnp.float32) for n, s in shapes.items()})
    assert {n: p.shape for n, p in params.items()} == shapes
    assert bool(jnp.all(jnp.isfinite(params["w"])))


@pytest.mark.parametrize("fn", list(FNS))
def test_zero_gradients_still_move_parameters_by_about_lr(fn, zero_gradient_thetas):
    """Documented behaviour: unit-RMS directions, so exactly zero gradients
    move a rule-routed parameter by about lr per step (shipped theta, and the
    published one where the shared folder is present)."""
    lr = 1e-3
    for label, theta in zero_gradient_thetas.items():
        opt = FNS[fn](lr, theta=theta)
        step = _stepper(opt)
        params = {"w": jnp.asarray(np.random.default_rng(0).standard_normal((32, 16)), jnp.float32)}
        state = opt.init(params)
        for i in range(3):
            new, state = step(params, state, {"w": jnp.zeros((32, 16), jnp.float32)})
            rms = float(jnp.sqrt(jnp.mean((new["w"] - params["w"]) ** 2)))
            assert 0.5 * lr < rms < 1.5 * lr, (label, i, rms)
            params = new


CHILD_CASES = ["float64_is_updated_in_float64", "kernels_refuse_a_mismatched_state"]


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
def test_half_precision_adamw_keeps_float32_moments(dtype, nonfinite):
    """The AdamW branch of ``celo2`` on half-precision parameters: its moments are float32 (a
    gradient of 1e-5 squares to zero in float16), its updates are those of float32 parameters
    (the oracle: the same run in float32), finite, in the parameters' dtype."""
    params = {"bias": jnp.full((64,), 0.5, dtype), "w": jnp.full((8, 8), 0.5, dtype)}
    grads = {n: jnp.full(p.shape, 1e-5, dtype) for n, p in params.items()}
    wide = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
    opt = co.celo2(5e-3, weight_decay=0.1, nonfinite=nonfinite, cpu_kernels=False)
    state, oracle_state = opt.init(params), opt.init(wide(params))
    moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)
               if "'bias'" in jax.tree_util.keystr(path) and leaf.ndim == 1]
    assert moments and all(m.dtype == jnp.float32 for m in moments)
    update = jax.jit(opt.update)
    for _ in range(6):
        updates, state = update(grads, state, params)
        expected, oracle_state = update(wide(grads), oracle_state, wide(params))
        assert updates["bias"].dtype == dtype
        assert bool(jnp.all(jnp.isfinite(updates["bias"])))
        np.testing.assert_allclose(np.asarray(updates["bias"], np.float32), np.asarray(expected["bias"]),
                                   rtol=1e-2, atol=1e-6)
    # Adam's direction is about 1 per step for a constant gradient: 20 x 5e-3 x (1 + 0.1 x 0.5).
    np.testing.assert_allclose(np.asarray(updates["bias"], np.float32), -0.105, rtol=2e-2)


@pytest.mark.parametrize("fn", list(FNS) + ["scale_by_celo2"])
def test_float0_gradients_are_refused_naming_the_leaf(fn):
    """``jax.grad(..., allow_int=True)`` gives integer parameters float0 gradients: a clear error
    naming the leaf, before anything is computed."""
    params = {"w": jnp.ones((4, 3)), "steps": jnp.zeros((3,), jnp.int32)}
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)(params)
    assert grads["steps"].dtype == jax.dtypes.float0
    opt = co.scale_by_celo2() if fn == "scale_by_celo2" else FNS[fn](1e-2)
    state = opt.init(params)
    with pytest.raises(TypeError, match=r"\['steps'\] is float0.*floating-point parameters only"):
        opt.update(grads, state, params)


@pytest.mark.skipif(not cpu_ffi.AVAILABLE, reason="no numba")
@pytest.mark.parametrize("fn", list(FNS))
def test_differentiating_through_the_kernels_names_cpu_kernels_false(fn):
    """A derivative through an update on the CPU kernels (a custom call) says what to do;
    with ``cpu_kernels=False`` the same derivative is computed."""
    params = {"w": jnp.ones((6, 4)) * 0.3, "conv": jnp.ones((4, 3, 3, 3)) * 0.2, "b": jnp.ones((5,))}
    grads = jax.tree_util.tree_map(lambda p: p * 0.1, params)

    def moved(opt, params):
        updates, _ = opt.update(grads, opt.init(params), params)
        return sum(jnp.sum(u) for u in jax.tree_util.tree_leaves(optax.apply_updates(params, updates)))

    with pytest.raises(TypeError, match="cpu_kernels=False"):
        jax.grad(lambda p: moved(FNS[fn](1e-2, cpu_kernels=True), p))(params)
    derivative = jax.grad(lambda p: moved(FNS[fn](1e-2, cpu_kernels=False), p))(params)
    assert all(bool(jnp.all(jnp.isfinite(d))) for d in jax.tree_util.tree_leaves(derivative))


@pytest.fixture(scope="module")
def batch():
    from reliability.isolated import run_cases

    return run_cases(__file__, CHILD_CASES)


@pytest.mark.parametrize("case", CHILD_CASES)
def test_isolated(batch, case):
    batch.check(case)


def case_float64_is_updated_in_float64():
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    shapes = {"matrix": (6, 5), "vector": (7,), "conv": (4, 3, 3, 3)}
    for fn in FNS.values():
        for lr, wd in ((0.0, 0.0), (0.0, 0.1), (1e-3, 0.0)):
            params = {n: jnp.asarray(rng.standard_normal(s) + 1e-9, jnp.float64) for n, s in shapes.items()}
            opt = fn(lr, weight_decay=wd)
            step = _stepper(opt)
            state = opt.init(params)
            new = params
            for i in range(3):
                new, state = step(new, state, {n: jnp.asarray(rng.standard_normal(s), jnp.float64)
                                               for n, s in shapes.items()})
            for n in shapes:
                assert new[n].dtype == jnp.float64
                if lr == 0.0:
                    assert bool(jnp.array_equal(new[n], params[n])), f"lr=0 moved float64 {n}"
                else:
                    assert not bool(jnp.array_equal(new[n], new[n].astype(jnp.float32).astype(jnp.float64))), n
            rule_states = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)
                           if ".tensors" in jax.tree_util.keystr(path)]
            assert rule_states and all(leaf.dtype == jnp.float32 for leaf in rule_states)


def case_kernels_refuse_a_mismatched_state():
    """A 16x10 state under a 32x10 parameter (and a vector, a conv kernel): a
    clear error at trace time, never a kernel writing out of bounds."""
    if not cpu_ffi.AVAILABLE:
        return
    for fn in FNS.values():
        for small, big in (((16, 10), (32, 10)), ((12,), (20,)), ((8, 6, 3, 3), (16, 6, 3, 3))):
            opt = fn(1e-2, cpu_kernels=True)
            state = opt.init({"w": jnp.zeros(small, jnp.float32)})
            try:
                opt.update({"w": jnp.ones(big, jnp.float32)}, state, {"w": jnp.ones(big, jnp.float32)})
            except (ValueError, TypeError) as exc:
                assert "shape" in str(exc), str(exc)
            else:
                raise AssertionError(f"{fn.__name__} took a {small} state for a {big} tensor")


if __name__ == "__main__":
    from isolated import child_main  # this folder is sys.path[0] when run as a script

    child_main(globals())
    sys.exit(0)
