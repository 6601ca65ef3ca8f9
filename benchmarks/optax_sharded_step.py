"""celo2.optax on one matrix split over forced host devices: step time, kept sharding, collectives.

    python benchmarks/optax_sharded_step.py                      # 1024x1024, 2 host devices, 15 steps
    python benchmarks/optax_sharded_step.py --size 2048 --devices 4 --ns-dtype float32 --variant base
    python benchmarks/optax_sharded_step.py --state-dtype bfloat16         # bfloat16 optimizer state

Each row jits one ``optax.apply_updates(update(...))`` step and prints the median step time, whether the
CPU kernels' custom call is in the compiled program, the update's sharding, and the all-gathers and
all-reduces of the compiled HLO with their shapes (a whole-matrix all-gather shows where the matrix is
reassembled: Newton-Schulz on a square matrix split on its rows). Rows: one device with the kernels and
with XLA's formulation, the matrix split on axis 0 and on axis 1, and replicated on an Auto mesh.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import time
from collections import Counter


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="the matrix is size x size")
    parser.add_argument("--devices", type=int, default=2, help="forced host devices")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--ns-dtype", default="auto", help="celo2's ns_dtype (auto, float32, bfloat16)")
    parser.add_argument("--variant", choices=("celo2", "base"), default="celo2")
    parser.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the optimizer state's dtype (state_dtype=)")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    from celo2.optax import celo2, celo2_base

    def make(**kw):  # noqa: ANN003, ANN202
        kw["state_dtype"] = args.state_dtype
        return celo2_base(1e-3, **kw) if args.variant == "base" else celo2(1e-3, ns_dtype=args.ns_dtype, **kw)

    mesh = jax.make_mesh((args.devices,), ("x",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.size, args.size)).astype(np.float32) * 0.02
    g = rng.standard_normal((args.size, args.size)).astype(np.float32) * 0.01

    def row(label: str, opt, place) -> None:  # noqa: ANN001
        params, grads = {"w": jax.device_put(w, place)}, {"w": jax.device_put(g, place)}
        state = opt.init(params)

        def step(p, s, gr):  # noqa: ANN001, ANN202
            u, s = opt.update(gr, s, p)
            return optax.apply_updates(p, u), s

        fn = jax.jit(step, donate_argnums=(0, 1))
        text = fn.lower(params, state, grads).compile().as_text()
        gathers = Counter(re.findall(r"= (f32\[[\d,]*\])\{?[\d,]*\}? all-gather\(", text))
        reduces = Counter(re.findall(r"= (f32\[[\d,]*\])\{?[\d,]*\}? all-reduce\(", text))
        for _ in range(3):
            params, state = fn(params, state, grads)
        jax.block_until_ready(params)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            params, state = fn(params, state, grads)
            jax.block_until_ready(params)
            times.append(time.perf_counter() - t0)
        spec = getattr(params["w"].sharding, "spec", "one device")
        print(f"{label:26s} {1e3 * statistics.median(times):8.1f} ms  kernels={'celo2_matrix_step' in text!s:5s} "
              f"sharding={spec}  all-gather={dict(gathers)}  all-reduce={dict(reduces)}", flush=True)

    print(f"{args.variant} on a {args.size}x{args.size} float32 matrix, {args.state_dtype} state, "
          f"{args.devices} host devices, median of {args.steps} steps")
    one = jax.devices()[0]
    row("one device (kernels)", make(), one)
    row("one device (XLA)", make(cpu_kernels=False), one)
    row("split on axis 0", make(), NamedSharding(mesh, P("x", None)))
    row("split on axis 1", make(), NamedSharding(mesh, P(None, "x")))
    row("replicated, Auto mesh", make(), NamedSharding(mesh, P()))


if __name__ == "__main__":
    main()
