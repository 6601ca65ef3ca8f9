"""Cost per step of the non-finite gradient guard: ``nonfinite="skip"`` vs ``"propagate"``.

    python benchmarks/nonfinite_guard.py --size 10m --repeats 9

Times torch ``Celo2`` / ``Celo2Base`` and JAX ``celo2`` / ``celo2_base``
(jitted update with donation, CPU kernels where they apply), each with both
policies, side by side in one process on the model of
``benchmarks/step_time.py`` (its parameter sets are imported, not rebuilt).
The gradients are finite, so both policies do the same arithmetic and the
difference is the guard itself. Rounds interleave the optimizers (each round
starts at a different one, so slow phases of a shared machine spread evenly);
the figure is the median over rounds, the ratio skip / propagate of medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_time  # noqa: E402 - the parameter sets of the step-time benchmark

POLICIES = ("skip", "propagate")


def _interleaved(runs: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """``runs``: label -> zero-argument callable doing one step (blocking)."""
    labels = list(runs)
    for fn in runs.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in labels}
    for r in range(repeats):
        for label in labels[r % len(labels):] + labels[: r % len(labels)]:
            t0 = time.perf_counter()
            runs[label]()
            times[label].append(time.perf_counter() - t0)
    return times


def torch_runs(size: str, theta) -> dict:  # noqa: ANN001
    import torch

    from celo2.torch import Celo2, Celo2Base

    base = step_time._torch_params(size)
    runs = {}
    for cls in (Celo2, Celo2Base):
        for policy in POLICIES:
            named = []
            for name, p in base:
                q = torch.nn.Parameter(p.detach().clone())
                q.grad = p.grad  # shared, never modified by the optimizers
                named.append((name, q))
            opt = cls(named, lr=step_time.LR, theta=theta, nonfinite=policy)
            runs[f"torch {cls.__name__} {policy}"] = opt.step
    return runs


def jax_runs(size: str, theta) -> dict:  # noqa: ANN001
    import jax
    import optax

    import celo2.optax as co

    params0, grads = step_time._jax_setup(size)
    runs = {}
    for fn in (co.celo2, co.celo2_base):
        for policy in POLICIES:
            opt = fn(step_time.LR, theta=theta, nonfinite=policy)

            def step(params, state, grads, opt=opt):  # noqa: ANN001, ANN202
                updates, state = opt.update(grads, state, params)
                return optax.apply_updates(params, updates), state

            compiled = jax.jit(step, donate_argnums=(0, 1))
            params = jax.tree_util.tree_map(lambda x: x + 0, params0)
            box = [params, opt.init(params)]

            def run(compiled=compiled, box=box) -> None:
                box[0], box[1] = compiled(box[0], box[1], grads)
                jax.block_until_ready(box)

            runs[f"jax {fn.__name__} {policy}"] = run
    return runs


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="10m", choices=list(step_time.SIZES), help="parameter set (default 10m)")
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds (default 9)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per optimizer first (default 2)")
    ap.add_argument("--frontends", default="torch,jax", help="comma-separated subset of torch,jax")
    ap.add_argument("--theta", default=None, help="theta file (default: the published one, else random)")
    ap.add_argument("--out", default=None, help="also write the figures here as JSON")
    args = ap.parse_args(argv)
    theta = step_time._load_theta(args.theta)
    runs = {}
    frontends = args.frontends.split(",")
    if "torch" in frontends:
        runs.update(torch_runs(args.size, theta))
    if "jax" in frontends:
        runs.update(jax_runs(args.size, theta))
    times = _interleaved(runs, args.repeats, args.warmup)
    medians = {k: statistics.median(v) for k, v in times.items()}
    params = sum(step_time._numel(s) for _, s in step_time.model_shapes(args.size))
    print(f"{args.size}: {params / 1e6:.2f}M parameters, median of {args.repeats} rounds")
    print(f"{'optimizer':28s} {'skip ms':>9s} {'propagate ms':>13s} {'ratio':>7s} {'cost ms':>8s}")
    rows = {}
    for label in runs:
        if not label.endswith(" skip"):
            continue
        name = label[: -len(" skip")]
        skip, prop = medians[label], medians[name + " propagate"]
        rows[name] = {"skip_s": skip, "propagate_s": prop, "ratio": skip / prop,
                      "all_skip_s": times[label], "all_propagate_s": times[name + " propagate"]}
        print(f"{name:28s} {skip * 1e3:9.1f} {prop * 1e3:13.1f} {skip / prop:7.3f} {(skip - prop) * 1e3:8.2f}")
    result = {"size": args.size, "parameters": params, "repeats": args.repeats, "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
