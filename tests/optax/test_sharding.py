"""Parameters split over two (forced host) devices with ``NamedSharding``: ``celo2`` and
``celo2_base`` under ``jit`` return each update split like its parameter, equal to the update
of the same optimizer on one device (the CPU kernels there), step after step.

The checks run in a subprocess (this file as a script, :mod:`two_devices`), since the device count
is fixed when JAX starts.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import two_devices

STEPS = 3
TOL = 1e-5  # float32: the sharded XLA formulation against the single-device kernels
BF16_TOL = 0.05  # bfloat16 Newton-Schulz: |difference| / |parameter's movement|, as tests/torch/test_backends.py
# (mesh axis type, optimizer, Newton-Schulz dtype): "auto" is the default (bfloat16 on CPUs that multiply it).
RUNS = [("auto", "celo2", "auto"), ("auto", "celo2_base", "auto"), ("explicit", "celo2", "float32"),
        ("explicit", "celo2_base", "auto")]

# name -> (shape, how it is split over the mesh axis "x"); the names route matrices and conv
# kernels to the rule and the vector and "embed" to AdamW under celo2 (celo2_base: all to the rule).
CASES = {
    "w_rows": ((64, 32), ("x", None)),                # split on axis 0 (tall: Newton-Schulz transposes it)
    "w_cols": ((32, 64), (None, "x")),                # split on axis 1
    "w_square": ((32, 32), ("x", None)),              # split on the rows Newton-Schulz multiplies
    "conv_hwio": ((3, 3, 8, 16), (None, None, None, "x")),  # XLA's formulation on one device too
    "conv_oihw": ((16, 8, 3, 3), ("x", None, None, None)),  # the CPU kernels' conv kernel on one device
    "bias": ((64,), ("x",)),
    "embed": ((64, 32), (None, "x")),                 # AdamW under celo2
}


# (optimizer, the Newton-Schulz dtype it resolves to: "auto" is "float32" on some CPUs) -> the single-device
# run: (compiled text, updates, parameters).
_REFERENCE: dict = {}


def _run(mode: str, name: str, ns: str) -> dict:
    """``STEPS`` steps of optimizer ``name`` (Newton-Schulz in ``ns``) on ``CASES``, split over a
    2-device mesh with axes of type ``mode`` and on one device; what the test asserts on."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec as P

    from celo2.optax import celo2, celo2_base, cpu_ffi

    mesh, ctx = two_devices.mesh(mode)
    opt = celo2(1e-2, ns_dtype=ns) if name == "celo2" else celo2_base(1e-2)
    rng = np.random.default_rng(0)
    host = {k: rng.standard_normal(s).astype(np.float32) * 0.5 for k, (s, _) in CASES.items()}
    grads = [{k: rng.standard_normal(s).astype(np.float32) * 10.0 ** (t % 3 - 1) for k, (s, _) in CASES.items()}
             for t in range(STEPS)]
    shardings = {k: NamedSharding(mesh, P(*spec)) for k, (_, spec) in CASES.items()}

    def step(params, state, g):
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), u, state

    one = jax.devices()[0]
    from celo2.hardware import resolve_ns_dtype_name

    ns_name = resolve_ns_dtype_name(ns, "cpu") if name == "celo2" else "float32"
    out: dict = {"mode": mode, "opt": name, "ns": ns_name, "spec_ok": {}, "update_err": {}, "param_err": {},
                 "moved": {}}
    if (name, ns_name) not in _REFERENCE:  # one device, outside any mesh: the CPU kernels as without sharding
        f1 = jax.jit(step)
        p1 = jax.device_put(host, one)
        s1 = opt.init(p1)
        hlo1 = f1.lower(p1, s1, jax.device_put(grads[0], one)).compile().as_text()
        ref = []
        for t in range(STEPS):
            p1, u1, s1 = f1(p1, s1, jax.device_put(grads[t], one))
            ref.append(jax.device_get(u1))
        _REFERENCE[name, ns_name] = (hlo1, ref, jax.device_get(p1))
    hlo1, ref, p1 = _REFERENCE[name, ns_name]
    with ctx():
        f2 = jax.jit(step)
        p2 = jax.device_put(host, shardings)
        s2 = jax.jit(opt.init)(p2) if mode == "explicit" else opt.init(p2)
        hlo2 = f2.lower(p2, s2, jax.device_put(grads[0], shardings)).compile().as_text()
        for t in range(STEPS):
            p2, u2, s2 = f2(p2, s2, jax.device_put(grads[t], shardings))
            for k, (shape, _) in CASES.items():
                ok = u2[k].sharding.is_equivalent_to(shardings[k], len(shape)) and \
                    p2[k].sharding.is_equivalent_to(shardings[k], len(shape))
                out["spec_ok"][k] = out["spec_ok"].get(k, True) and bool(ok)
                err = float(np.max(np.abs(np.asarray(u2[k]) - ref[t][k])))
                out["update_err"][k] = max(out["update_err"].get(k, 0.0), err)
        for k in CASES:
            out["param_err"][k] = float(np.max(np.abs(np.asarray(p2[k]) - np.asarray(p1[k]))))
            out["moved"][k] = [float(np.linalg.norm(np.asarray(p2[k]) - np.asarray(p1[k]))),
                               float(np.linalg.norm(np.asarray(p1[k]) - host[k]))]
        # The rule's momenta (3, 64, 32) of the split matrices stay split: no whole copy per device.
        out["state_split"] = [len(leaf.sharding.device_set) == 2 and not leaf.sharding.is_fully_replicated
                              for leaf in jax.tree_util.tree_leaves(s2) if leaf.shape == (3, 64, 32)]
    out["kernels_one_device"] = (not cpu_ffi.AVAILABLE) or cpu_ffi.TARGET in hlo1
    out["kernels_split"] = any(t in hlo2 for t in (cpu_ffi.TARGET, cpu_ffi.CONV_TARGET, cpu_ffi.VECTOR_TARGET))
    out["all_gathers"] = sorted(set(re.findall(r"= (f32\[[\d,]*\])\{?[\d,]*\}? all-gather\(", hlo2)))
    return out


def main() -> None:
    """Run every case of ``RUNS`` and print one JSON line per case."""
    two_devices.print_results(lambda case=case: _run(*case) for case in RUNS)


def _elements(shape_text: str) -> int:
    """``"f32[3,3,1,2]"`` -> 18."""
    dims = re.findall(r"\d+", shape_text[shape_text.index("["):])
    return int(np.prod([int(d) for d in dims])) if dims else 1


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return two_devices.run_script(__file__, timeout=600)


def test_every_case_ran(results):
    assert {(r["mode"], r["opt"]) for r in results} == {(m, o) for m in ("auto", "explicit")
                                                       for o in ("celo2", "celo2_base")}


def test_updates_and_parameters_stay_split_like_the_parameters(results):
    for r in results:
        assert all(r["spec_ok"].values()), (r["mode"], r["opt"], r["spec_ok"])
        assert set(r["spec_ok"]) == set(CASES)


def test_split_updates_equal_the_single_device_updates(results):
    assert any(r["opt"] == "celo2" and r["ns"] == "float32" for r in results)
    for r in results:
        for k in CASES:
            if r["ns"] == "bfloat16":  # Newton-Schulz's bfloat16 products, summed in another order
                diff, moved = r["moved"][k]
                assert diff <= BF16_TOL * moved + 1e-7, (r["mode"], k, diff, moved)
                continue
            assert r["update_err"][k] <= TOL, (r["mode"], r["opt"], k, r["update_err"][k])
            assert r["param_err"][k] <= TOL, (r["mode"], r["opt"], k, r["param_err"][k])


def test_one_device_keeps_the_cpu_kernels_and_split_tensors_do_not_take_them(results):
    for r in results:
        assert r["kernels_one_device"], (r["mode"], r["opt"])
        assert not r["kernels_split"], (r["mode"], r["opt"])


def test_the_rule_state_of_a_split_matrix_is_split(results):
    for r in results:
        assert r["state_split"] and all(r["state_split"]), (r["mode"], r["opt"], r["state_split"])


def test_no_tensor_is_gathered_whole_outside_newton_schulz(results):
    # Every statistic spanning a tensor is reduced from partial sums: an all-gather result holds at
    # most a square of Newton-Schulz on "w_square" (its rows are gathered for the products).
    biggest = max(int(np.prod(s)) for s, _ in CASES.values() if len(s) == 2 and s[0] == s[1])
    for r in results:
        sizes = [_elements(s) for s in r["all_gathers"]]
        assert all(n <= biggest for n in sizes), (r["mode"], r["opt"], r["all_gathers"])
        if r["opt"] == "celo2_base":  # no Newton-Schulz: only small partial sums travel
            assert all(n <= 64 for n in sizes), (r["mode"], r["opt"], r["all_gathers"])


if __name__ == "__main__":
    main()
