"""Why Celo2 fails the bench's CartPole task: variants of the harness that isolate the cause.

Trains the bench's ``rl`` task (full-suite config: REINFORCE, policy 4-32-32-2, 60 steps of 8
episodes) with Celo2 changed one way at a time, next to the optimizers that solve it, at each LR of
a half-decade grid and several seeds. Prints a table (mean loss per variant and LR, seeds solved at
the best LR) and writes ``results.csv``, ``results.jsonl`` (raw records; a rerun resumes from them)
and ``cartpole_lr.png`` to the output folder (default ``benchmarks/results/cartpole``).

The policy's tensors and where the bench's Celo2 sends them: ``layers.0.weight`` (32x4) and
``layers.1.weight`` (32x32) to the learned rule with Newton-Schulz, ``head.weight`` (2x32, by name)
and the three biases to AdamW at ``adam_lr_mult`` (20) times the LR.

Usage::

    PYTHONPATH=src python benchmarks/cartpole_diagnosis.py [--seeds 5] [--jobs 1] [--variants a,b]
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from functools import partial
from pathlib import Path

from celo2.eval import optimizers as opt_registry
from celo2.eval import tasks as task_registry
from celo2.eval.runner import ResultStore, RunSpec, run_one
from celo2.rule.routing import ADAM_NAME_PATTERN

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "cartpole"
PUBLISHED = HERE.parents[1] / "shared" / "reference" / "celo2_official_theta.state"
SOLVED = 0.05  # a seed whose final loss is below this balances the pole for > 95% of the horizon


def _celo2(model, lr, weight_decay, theta=None, **options):
    from celo2.torch import Celo2

    return Celo2(model.named_parameters(), lr=lr, weight_decay=weight_decay, theta=theta, **options)


def _celo2_split_mult(model, lr, weight_decay, theta=None, one_x="head."):
    """Celo2 whose AdamW branch runs at 1x the LR for the tensors named ``one_x...`` (a prefix, or
    ``"bias"`` for the hidden layers' biases) and at the default 20x for the rest."""
    from celo2.torch import Celo2

    def picked(name: str) -> bool:
        return name.startswith("layers.") and name.endswith(".bias") if one_x == "bias" else name.startswith(one_x)

    named = list(model.named_parameters())
    groups = [{"params": [(n, p) for n, p in named if not picked(n)]},
              {"params": [(n, p) for n, p in named if picked(n)], "adam_lr_mult": 1.0}]
    return Celo2(groups, lr=lr, weight_decay=weight_decay, theta=theta)


def _published_theta():
    import celo2

    return celo2.load_theta(str(PUBLISHED))


#: name -> (description, factory, which theta: "shipped", "published" or None)
VARIANTS: dict[str, tuple[str, object, str | None]] = {
    "celo2": ("bench's Celo2: NS on 32x4 and 32x32, head + biases AdamW at 20x LR",
              opt_registry.make_celo2, "shipped"),
    "celo2 mult=1": ("adam_lr_mult=1: head + biases AdamW at the same LR", partial(_celo2, adam_lr_mult=1.0),
                     "shipped"),
    "celo2 head 1x": ("head (2x32 + bias) AdamW at 1x LR, hidden biases still 20x",
                      partial(_celo2_split_mult, one_x="head."), "shipped"),
    "celo2 biases 1x": ("hidden biases AdamW at 1x LR, head still 20x",
                        partial(_celo2_split_mult, one_x="bias"), "shipped"),
    "celo2 no-NS": ("orthogonalize=False (rule on 32x4, 32x32 without NS; AdamW 20x)",
                    partial(_celo2, orthogonalize=False), "shipped"),
    "celo2 head->rule": ("head 2x32 to the rule with NS (shapes-only routing)",
                         partial(_celo2, adam_name_pattern=None), "shipped"),
    "celo2 in->adam": ("input layer 32x4 to AdamW 20x too (NS on 32x32 only)",
                       partial(_celo2, adam_name_pattern=f"(?:{ADAM_NAME_PATTERN})|^layers\\.0\\."), "shipped"),
    "celo2 wd=0": ("weight decay 0 instead of 0.1", opt_registry.make_celo2, "shipped"),
    "celo2 published": ("bench's Celo2 with the published theta", opt_registry.make_celo2, "published"),
    "celo2 published mult=1": ("published theta, adam_lr_mult=1", partial(_celo2, adam_lr_mult=1.0), "published"),
    "celo2-base": ("reference: rule on every tensor, no NS, no AdamW", opt_registry.make_celo2_base, "shipped"),
    "muon": ("reference: Muon on 32x4, 32x32, AdamW (same LR) on head + biases", opt_registry.make_muon, None),
    "adamw": ("reference: AdamW on everything", opt_registry.make_adamw, None),
}
LRS = [0.000316, 0.001, 0.00316, 0.01, 0.0316, 0.1]


def _spec(name: str, lr: float, seed: int) -> RunSpec:
    cfg = dict(task_registry.SUITES["full"]["rl"])
    wd = 0.0 if name.endswith("wd=0") else 0.1
    return RunSpec("rl", cfg, f"diag:{name}", lr, wd, seed)


def _run(name: str, lr: float, seed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    _, factory, which = VARIANTS[name]
    theta = None
    if which == "shipped":
        import celo2

        theta = celo2.load_theta()
    elif which == "published":
        theta = _published_theta()
    return run_one(_spec(name, lr, seed), theta, make_optimizer=factory)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5; the bench uses 3)")
    ap.add_argument("--jobs", type=int, default=1, help="parallel processes (default 1)")
    ap.add_argument("--variants", help="comma list of variants (default: all): " + ", ".join(VARIANTS))
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder")
    ap.add_argument("--lrs", help="comma list of LRs to run for the variants given (default: "
                    + ",".join(f"{x:g}" for x in LRS) + "); the table shows every recorded LR")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",")] if args.variants else list(VARIANTS)
    for n in names:
        if n not in VARIANTS:
            ap.error(f"--variants: unknown {n!r}; known: {', '.join(VARIANTS)}")
    if "celo2 published" in names and not PUBLISHED.is_file():
        print(f"skipping 'celo2 published': {PUBLISHED} is absent", file=sys.stderr)
        names.remove("celo2 published")
    out = Path(args.out)
    store = ResultStore(out)
    done = store.load()
    run_lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else LRS
    todo = [(n, lr, s) for n in names for lr in run_lrs for s in range(args.seeds)
            if _spec(n, lr, s).key not in done]
    print(f"{len(todo)} runs to do, {len(names) * len(run_lrs) * args.seeds - len(todo)} resumed from {store.path}",
          file=sys.stderr)
    if args.jobs <= 1:
        for i, job in enumerate(todo):
            rec = _run(*job)
            store.append(rec)
            done[rec["key"]] = rec
            print(f"[{i + 1}/{len(todo)}] {job} -> {rec['final_val_loss']:.3f}", file=sys.stderr)
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        import os

        from celo2.eval.runner import _init_worker  # one thread each; workers exit with this process

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(1, os.getpid())) as pool:
            futs = {pool.submit(_run, *job): job for job in todo}
            for i, fut in enumerate(as_completed(futs)):
                rec = fut.result()
                store.append(rec)
                done[rec["key"]] = rec
                print(f"[{i + 1}/{len(todo)}] {futs[fut]} -> {rec['final_val_loss']:.3f}", file=sys.stderr)

    # The table: every variant (all of them, not only those run now) at every LR with all seeds recorded.
    names = [n for n in VARIANTS if n in names or any(_spec(n, lr, 0).key in done for lr in LRS)]
    rows, table = [], {}
    for n in names:
        for lr in LRS:
            keys = [_spec(n, lr, s).key for s in range(args.seeds)]
            if not all(k in done for k in keys):
                continue
            vals = [done[k]["final_val_loss"] for k in keys]
            table[(n, lr)] = vals
            for s, v in enumerate(vals):
                rows.append([n, lr, _spec(n, lr, s).weight_decay, s, v])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["variant", "lr", "weight_decay", "seed", "final_val_loss"])
    w.writerows(rows)
    (out / "results.csv").write_text(buf.getvalue(), encoding="utf-8")

    lines = ["| variant | " + " | ".join(f"{lr:g}" for lr in LRS) + " | best (mean ± std) | seeds solved at best |",
             "| --- |" + " --- |" * (len(LRS) + 2)]
    names = [n for n in names if any((n, lr) in table for lr in LRS)]
    for n in names:
        means = {lr: statistics.fmean(table[(n, lr)]) for lr in LRS if (n, lr) in table}
        best = min(means, key=lambda lr: (means[lr], lr))
        vals = table[(n, best)]
        solved = sum(v < SOLVED for v in vals)
        cells = [("" if lr not in means else f"**{means[lr]:.3f}**" if lr == best else f"{means[lr]:.3f}")
                 for lr in LRS]
        lines.append(f"| {n} | " + " | ".join(cells) +
                     f" | {means[best]:.3f} ± {statistics.pstdev(vals):.2f} at {best:g} | {solved}/{len(vals)} |")
    print("\n".join(lines))
    print("\nvariants:")
    for n in names:
        print(f"  {n}: {VARIANTS[n][0]}")

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return 0
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, n in enumerate(names):
        xs = [lr for lr in LRS if (n, lr) in table]
        ys = [statistics.fmean(table[(n, lr)]) for lr in xs]
        style = "--" if n in ("celo2-base", "muon", "adamw") else "-"
        ax.plot(xs, ys, style, marker="o", ms=4, label=n)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final 1 - episode length / 500 (mean over seeds)")
    ax.set_title(f"CartPole (bench rl task): Celo2 variants, {args.seeds} seeds")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "cartpole_lr.png", dpi=110)
    plt.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
