"""Meta-training throughput: inner steps per second of PES with the Celo2 rule, per task model.

``--model mlp`` (default) is the published 64-32-10 image MLP; ``--model conv`` the small
conv net of the ``conv-*`` families; ``--model transformer`` the tiny causal byte
transformer of ``text-docstrings`` (:mod:`celo2.metatrain.tasks`).

Inner steps are counted as the spec counts them: per outer iteration,
tasks x pairs x 2 x truncation length (3,200 for the published recipe).
The script times whole outer iterations (unroll of every particle, PES
gradient, outer AdamW) after compilation and reports the median of several.

    python benchmarks/metatrain_throughput.py                   # paper sizes, one device per core
    python benchmarks/metatrain_throughput.py --devices 1       # everything on one host device
    python benchmarks/metatrain_throughput.py --data-dir DATA   # real MNIST/F-MNIST + built-ins
    python benchmarks/metatrain_throughput.py --model transformer --tasks 1 --pairs 4 --batch-size 16

Without ``--data-dir`` the tasks read random 8x8 images or random bytes (the cost of an
inner step does not depend on the values). Wall-clock figures depend on
what else runs on the machine; CPU time is printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8, help="antithetic pairs per task (paper: 8)")
    ap.add_argument("--truncation", type=int, default=50, help="truncation length (paper: 50)")
    ap.add_argument("--repeats", type=int, default=5, help="timed iterations after compilation")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ap.add_argument("--devices", type=int, default=cores,
                    help=f"host devices to shard particles over (default: one per core, {cores} here, "
                         "as 'celo2 meta-train' does)")
    ap.add_argument("--inner-optimizer", default="celo2", help="celo2 (default), celo2-base, adam")
    ap.add_argument("--data-dir", default=None, help="use mnist, fashion-mnist, digits, synthetic from here "
                    "(--model mlp only)")
    ap.add_argument("--model", choices=("mlp", "conv", "transformer"), default="mlp",
                    help="task model: the image MLP (default), the conv-* families' conv net, or "
                         "text-docstrings' byte transformer")
    ap.add_argument("--tasks", type=int, default=4, help="task families (random data; default 4)")
    ap.add_argument("--batch-size", type=int, default=64, help="inner batch size (default 64)")
    ap.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = ap.parse_args(argv)

    if args.devices > 1:  # must be set before JAX starts
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()

    import jax
    import numpy as np

    from celo2.metatrain import TaskData, TaskFamily, preset, register_task_family
    from celo2.metatrain.task_models import ImageMLP
    from celo2.metatrain.tasks import CONV_NET, DOCSTRING_TRANSFORMER
    from celo2.metatrain.trainer import MetaTrainer

    model = {"mlp": ImageMLP(), "conv": CONV_NET, "transformer": DOCSTRING_TRANSFORMER}[args.model]
    if args.data_dir:
        if args.model != "mlp":
            ap.error("--data-dir goes with --model mlp")
        tasks = ("mnist", "fashion-mnist", "digits", "synthetic")
        data = None
    else:
        rng = np.random.default_rng(0)
        tasks = tuple(f"bench-random-{args.model}-{i}" for i in range(args.tasks))
        for name in tasks:
            register_task_family(TaskFamily(name, lambda root, size: (None, None), model=model), replace=True)
        n, t = 10_000, args.tasks
        if args.model == "transformer":
            shape = (t, n, DOCSTRING_TRANSFORMER.context)
            X = rng.integers(0, 256, shape).astype(np.uint8)
            y = rng.integers(0, 256, shape).astype(np.uint8)
        else:
            X = rng.random((t, n, 64), dtype=np.float32)
            y = rng.integers(0, 10, (t, n)).astype(np.int32)
        data = TaskData(tasks, X, y, np.full(t, n, np.int32))
    config = preset("paper", tasks=tasks, data_dir=args.data_dir, pairs_per_task=args.pairs,
                    truncation_length=args.truncation, min_unroll_length=max(100, args.truncation),
                    inner_optimizer=args.inner_optimizer, batch_size=args.batch_size)
    trainer = MetaTrainer(config, data=data)
    state = trainer.init_state()
    t0 = time.perf_counter()
    compile_s = trainer.compile(state)
    state, _ = trainer.step(state)  # first run: allocations
    jax.block_until_ready(state)
    walls, cpus = [], []
    for _ in range(args.repeats):
        w, c = time.perf_counter(), time.process_time()
        state, metrics = trainer.step(state)
        jax.block_until_ready(state)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    steps = config.inner_steps_per_iteration
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    summary = {
        "inner_steps_per_iteration": steps,
        "iteration_s_median": round(wall, 4),
        "inner_steps_per_s": round(steps / wall, 1),
        "inner_steps_per_cpu_s": round(steps / cpu, 1),
        "iteration_s_all": [round(x, 4) for x in walls],
        "compile_s": round(compile_s, 1),
        "devices": trainer.num_devices,
        "inner_optimizer": args.inner_optimizer,
        "model": repr(trainer.pes.model),
        "parameters": int(sum(int(np.prod(s)) for s in trainer.pes.shapes.values())),
        "batch_size": args.batch_size,
        "pairs_per_task": args.pairs,
        "truncation_length": args.truncation,
        "tasks": list(tasks),
        "cpu_count": os.cpu_count(),
        "loadavg_1min": round(os.getloadavg()[0], 2),
        "jax": jax.__version__,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    if not args.json:
        print(f"{steps:,} inner steps per outer iteration on {trainer.num_devices} device(s); "
              f"compile {compile_s:.1f} s")
        print(f"median iteration {wall * 1e3:.0f} ms -> {steps / wall:,.0f} inner steps/s "
              f"(per CPU-second: {steps / cpu:,.0f}); load average {summary['loadavg_1min']}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
