"""bfloat16 state split over two (forced host) devices stores the bits of the unsplit state: the
rounding's element index is the global one (issue 28).

As in tests/optax/test_sharding.py the checks run in a subprocess (this file as a script, on two forced
host devices: :mod:`two_devices`).
"""

from __future__ import annotations

import numpy as np
import pytest
import two_devices

STEPS = 3
# name -> (shape, how it is split over the mesh axis "x"); under celo2 "bias" and "embed" take AdamW.
CASES = {
    "w_rows": ((64, 32), ("x", None)),
    "w_cols": ((32, 64), (None, "x")),
    "conv": ((16, 8, 3, 3), ("x", None, None, None)),
    "bias": ((64,), ("x",)),
    "embed": ((64, 32), (None, "x")),
}


def _bits(x) -> np.ndarray:
    return np.asarray(x).view(np.uint16)


_ONE_DEVICE: dict = {}  # optimizer name -> its state after STEPS steps on one device, outside any mesh


def _run(mode: str) -> dict:
    """The rounding function and ``STEPS`` optimizer steps, split over a 2-device mesh of axis type
    ``mode`` and on one device: which stored leaves agree bitwise."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from celo2.optax import celo2, celo2_base
    from celo2.optax import rounding as jr
    from celo2.rule import rounding as ref

    mesh, ctx = two_devices.mesh(mode)
    rng = np.random.default_rng(0)
    out: dict = {"mode": mode, "round": {}, "state": {}}
    x = rng.standard_normal((4, 64, 32)).astype(np.float32)
    expected = ref.stochastic_round(x, seed=3, step=2, tensor=1, slot="m")
    with ctx():
        for spec in ((None, "x", None), (None, None, "x"), ("x", None, None)):
            xs = jax.device_put(x, NamedSharding(mesh, P(*spec)))
            got = jax.jit(lambda v: jr.stochastic_round(v, jr.StateRounding(3, 2, 1), "m"))(xs)
            out["round"][str(spec)] = bool(np.array_equal(_bits(got), expected)) and \
                len(got.sharding.device_set) == 2

    host = {k: rng.standard_normal(s).astype(np.float32) * 0.5 for k, (s, _) in CASES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) * 10.0 ** (t % 3 - 1) for k, (s, _) in CASES.items()}
             for t in range(STEPS)]
    shardings = {k: NamedSharding(mesh, P(*spec)) for k, (_, spec) in CASES.items()}
    for name in ("celo2", "celo2_base"):
        make = celo2 if name == "celo2" else celo2_base
        kw = {"ns_dtype": "float32"} if name == "celo2" else {}
        opt = make(1e-2, cpu_kernels=False, state_dtype=jnp.bfloat16, rounding_seed=7, **kw)

        def step(params, state, g):
            u, state = opt.update(g, state, params)
            return optax.apply_updates(params, u), state

        if name not in _ONE_DEVICE:  # the same in every mode: run once
            one = jax.devices()[0]
            p1 = jax.device_put(host, one)
            s1 = opt.init(p1)
            f1 = jax.jit(step)
            for t in range(STEPS):
                p1, s1 = f1(p1, s1, jax.device_put(grads[t], one))
            _ONE_DEVICE[name] = s1
        s1 = _ONE_DEVICE[name]
        with ctx():
            p2 = jax.device_put(host, shardings)
            s2 = jax.jit(opt.init)(p2) if mode == "explicit" else opt.init(p2)
            f2 = jax.jit(step)
            for t in range(STEPS):
                p2, s2 = f2(p2, s2, jax.device_put(grads[t], shardings))
        equal = {}
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(s1), jax.tree_util.tree_leaves(s2)):
            if a.dtype == jnp.bfloat16:
                split = len(b.sharding.device_set) == 2 and not b.sharding.is_fully_replicated
                equal[jax.tree_util.keystr(path)] = [bool(np.array_equal(_bits(a), _bits(b))), bool(split)]
        out["state"][name] = equal
    return out


def main() -> None:
    """Print one JSON line per mesh axis type."""
    two_devices.print_results(lambda mode=mode: _run(mode) for mode in ("auto", "explicit"))


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return two_devices.run_script(__file__, timeout=900)


def test_rounding_a_split_accumulator_gives_the_unsplit_bits(results):
    assert {r["mode"] for r in results} == {"auto", "explicit"}
    for r in results:
        assert r["round"] and all(r["round"].values()), (r["mode"], r["round"])


def test_split_optimizer_state_stores_the_unsplit_bits(results):
    for r in results:
        for name, leaves in r["state"].items():
            assert leaves, (r["mode"], name)
            unequal = [k for k, (same, _) in leaves.items() if not same]
            assert not unequal, (r["mode"], name, unequal)
            # The momenta of the split matrices stay split.
            assert any(split for k, (_, split) in leaves.items() if "'w_rows'" in k), (r["mode"], name)


if __name__ == "__main__":
    main()
