"""What bfloat16 Newton-Schulz costs Celo2 in quality: the bench's tasks at their best LR, float32 against bfloat16.

    python benchmarks/ns_dtype_quality.py --data-dir ../shared/datasets --tasks mlp:0.001,gpt:0.00316 --seeds 0,1,2

Each run is :func:`celo2.eval.runner.run_one` of the bench (the ``--suite`` task config, warm-up and
cosine schedule, weight decay 0.1 as the bench's Celo2 default) with the shipped theta, once with
``Celo2(ns_dtype=torch.float32)`` and once with ``ns_dtype=torch.bfloat16``, same seeds. The LRs given
are the best of the full suite (``benchmarks/results/full``). Prints the final validation loss per
seed and the paired mean difference (bfloat16 - float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path
from typing import Any


def run(task: str, lr: float, seed: int, ns_dtype: str, data_dir: str | None, suite: str = "full") -> dict[str, Any]:
    """One bench run of Celo2 with Newton-Schulz in ``ns_dtype``."""
    import torch

    import celo2
    from celo2.eval import optimizers as opt_registry
    from celo2.eval import runner, tasks
    from celo2.torch import Celo2

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[ns_dtype]

    def factory(model, lr, weight_decay, theta=None):  # noqa: ANN001, ANN202
        return Celo2(model.named_parameters(), lr=lr, weight_decay=weight_decay, theta=theta, ns_dtype=dtype)

    info = opt_registry.OPTIMIZERS["celo2"]
    opt_registry.OPTIMIZERS["celo2"] = dataclasses.replace(info, factory=factory)
    try:
        cfg = tasks.SUITES[suite][task]
        root = tasks.resolve_root(data_dir) if tasks.TASKS[task].uses_images else None
        spec = runner.RunSpec(task=task, task_config=dict(cfg), optimizer="celo2", lr=lr,
                              weight_decay=info.default_weight_decay, seed=seed, data_dir=root)
        rec = runner.run_one(spec, theta=celo2.load_theta(None))
    finally:
        opt_registry.OPTIMIZERS["celo2"] = info
    return {"task": task, "lr": lr, "seed": seed, "ns_dtype": ns_dtype, "status": rec["status"],
            "final_val_loss": rec["final_val_loss"], "wall_s": rec.get("wall_s")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="mlp:0.001,gpt:0.00316", help="TASK:LR pairs")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--suite", default="full", help="task configs of this bench suite (full, quick, smoke)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    rows = []
    for item in args.tasks.split(","):
        task, lr = item.split(":")
        for seed in map(int, args.seeds.split(",")):
            for ns in ("float32", "bfloat16"):
                rows.append(run(task, float(lr), seed, ns, args.data_dir, args.suite))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"{'task':6s} {'lr':>8s} {'seed':>4s} {'float32':>9s} {'bfloat16':>9s} {'bf16-fp32':>10s}")
    summary = {}
    for task in dict.fromkeys(r["task"] for r in rows):
        diffs = []
        for seed in dict.fromkeys(r["seed"] for r in rows if r["task"] == task):
            f, b = (next(r for r in rows if r["task"] == task and r["seed"] == seed and r["ns_dtype"] == ns)
                    for ns in ("float32", "bfloat16"))
            diffs.append(b["final_val_loss"] - f["final_val_loss"])
            print(f"{task:6s} {f['lr']:8.5f} {seed:4d} {f['final_val_loss']:9.4f} {b['final_val_loss']:9.4f} "
                  f"{diffs[-1]:+10.4f}")
        mean = statistics.mean(diffs)
        sd = statistics.stdev(diffs) if len(diffs) > 1 else float("nan")
        summary[task] = {"mean_diff": mean, "sd_diff": sd, "n": len(diffs)}
        print(f"{task:6s} mean bf16 - fp32 = {mean:+.4f} (sd {sd:.4f}, {len(diffs)} seeds)")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
