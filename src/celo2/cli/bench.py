"""``celo2 bench``: Celo2 against AdamW, Adam, SGD and Muon on CPU-sized PyTorch tasks.

Thin wrapper: flags -> :class:`celo2.eval.bench.BenchOptions` ->
:func:`celo2.eval.bench.run_bench`, holding the run folder's lock
(:class:`celo2._runlock.RunLock`). Bad flags exit with status 2 and a message
naming the flag (``celo2.cli.main`` reports the errors).
"""

from __future__ import annotations

import argparse
import math
import shlex
import signal
import sys
import threading
from pathlib import Path

from celo2.cli.main import nonnegative_float, positive_int

EPILOG = """\
examples:
  celo2 bench --suite quick --data-dir DATA                      # ~10 min on 2 cores
  celo2 bench --suite full --data-dir DATA --jobs 2 --out benchmarks/results/full
  celo2 bench --tasks mlp,cnn,gpt --optimizers celo2,adamw \\
      --theta shipped --theta published=theta.state               # compare thetas
  celo2 bench --optimizers adamw,sgd --lr-grid adamw=1e-4:1e-1:7 --lr-grid sgd=1e-2,1e-1,1
  celo2 bench --suite compare --data-dir DATA --theta shipped \
      --theta published=theta.state --out runs/compare          # LR x weight-decay search
  celo2 bench --suite full --tasks mlp --wd-grid --wd-grid adamw=0,0.03,0.1,0.3
  celo2 bench ...same flags as the run... --report-only          # rewrite the report

A bench resumes: rerunning the same command with the same --out skips runs
already recorded in RUN_DIR/results.jsonl (use a new --out to start afresh).
Ctrl-C or SIGTERM stops it with the finished runs kept and prints that command
(exit status 130 or 143). --out must be a new or empty folder, or a bench's own.
"""


def _parse_kv_grid(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=LO:HI:N or NAME=A,B,..., got {text!r}")
    name, grid = text.split("=", 1)
    return name.strip(), grid


def _parse_wd(text: str) -> tuple[str, float]:
    name, _, value = text.rpartition("=")
    try:
        wd = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or NAME=NUMBER, got {text!r}") from None
    if not (math.isfinite(wd) and wd >= 0):
        raise argparse.ArgumentTypeError(f"weight decay must be a finite number >= 0, got {text!r}")
    return (name.strip() or "*"), wd


def _parse_wd_grid_arg(text: str) -> tuple[str, str]:
    """``NAME=LIST``, ``LIST`` or ``default`` -> (key, text); the key ``*`` means every optimizer."""
    name, sep, grid = text.rpartition("=")
    if sep and not name.strip():
        raise argparse.ArgumentTypeError(f"expected [NAME=]A,B,... or [NAME=]default, got {text!r}")
    return (name.strip() or "*"), grid


def register(subparsers) -> None:
    from celo2.eval.bench import SUITES
    from celo2.eval.optimizers import OPTIMIZERS
    from celo2.eval.tasks import IMAGE_DATASETS, TASKS

    p = subparsers.add_parser(
        "bench",
        help="benchmark Celo2 against AdamW, Adam, SGD and Muon (PyTorch, CPU-sized)",
        description="Train a suite of small PyTorch tasks with every optimizer at every peak LR of a "
        "log-spaced grid (5% warmup + cosine), pick each optimizer's best LR by final validation "
        "loss, and write results, a Markdown report and plots to a run folder.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", default="quick", choices=SUITES,
                   help="smoke (seconds, plumbing only), quick (under 10 min on 2 cores), full (about 2 h on 2 cores), "
                   "compare (full sizes, 5 supervised tasks, celo2/adamw/muon, LR x weight-decay search; see "
                   "docs/benchmarking.md for its cost); default quick")
    p.add_argument("--tasks", action="append", metavar="T1,T2",
                   help=f"tasks to run (default: the suite's); known: {', '.join(TASKS)}")
    p.add_argument("--optimizers", action="append", metavar="O1,O2",
                   help=f"optimizers (default: the suite's); known: {', '.join(OPTIMIZERS)}; "
                   "celo2[LABEL] picks one --theta")
    p.add_argument("--theta", action="append", metavar="SPEC",
                   help="theta for celo2/celo2-base: 'shipped' (default, celo2.load_theta()), LABEL=PATH or "
                   "PATH; repeat to compare thetas side by side (optimizers become celo2[LABEL])")
    p.add_argument("--lrs", metavar="GRID", help="one LR grid for every optimizer: LO:HI:N or A,B,...")
    p.add_argument("--lr-grid", action="append", default=[], type=_parse_kv_grid, metavar="NAME=GRID",
                   help="LR grid of one optimizer (kind or celo2[LABEL]): NAME=LO:HI:N (log-spaced) or NAME=A,B,...")
    p.add_argument("--seeds", metavar="N|A,B", help="number of seeds (0..N-1) or a comma list; default: the suite's")
    p.add_argument("--steps", type=positive_int, metavar="N", help="override every task's number of training steps")
    p.add_argument("--weight-decay", action="append", default=[], type=_parse_wd, metavar="[NAME=]WD",
                   help="weight decay for every optimizer (WD) or one (NAME=WD); defaults: 0.1 for "
                   "adamw/muon/celo2/celo2-base, 0 for adam/sgd")
    p.add_argument("--wd-grid", action="append", default=[], type=_parse_wd_grid_arg, nargs="?", const="default",
                   metavar="[NAME=]WDS",
                   help="search weight decay too (a 2-D LR x WD grid): alone, every optimizer's default grid "
                   "(0,0.01,0.1,1 for the decoupled adamw/muon/celo2/celo2-base, 0,1e-4,1e-3,1e-2 for the L2 "
                   "decay of adam/sgd); WDS (A,B,... or 'default') for every optimizer, NAME=WDS for one; "
                   "the compare suite searches by default")
    p.add_argument("--adam-lr-mult", type=nonnegative_float, metavar="M",
                   help="LR multiplier of Celo2's AdamW branch (heads, embeddings, vectors); default the "
                   "published 20. CartPole needs about 1: benchmarks/results/cartpole/README.md")
    p.add_argument("--out", metavar="RUN_DIR", help="run folder (default: ./bench-SUITE); resumed if it has results")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder holding fashion-mnist/ or mnist/ IDX files (else $CELO2_DATA_DIR; with neither, "
                   "image tasks use built-in digits upsampled to 28x28, and the report says so)")
    p.add_argument("--dataset", default="fashion-mnist", choices=IMAGE_DATASETS,
                   help="28x28 dataset of the image tasks (default fashion-mnist)")
    p.add_argument("--jobs", type=positive_int, metavar="N",
                   help="runs in parallel processes, each single-threaded (default: 1 for smoke, else one per "
                   "CPU core up to 8); results do not depend on it")
    p.add_argument("--threads", type=positive_int, default=1, metavar="N", help="torch threads per run (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the report from RUN_DIR's results, for the runs the other flags select; run nothing")
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, grids) and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the bench the flags describe; bad input raises the project's errors (reported by ``cli.main``)."""
    from celo2._runlock import RunLock
    from celo2.eval.bench import (
        BenchError,
        BenchOptions,
        default_out,
        is_earlier_bench_folder,
        parse_grid,
        parse_seeds,
        parse_wd_grid,
        run_bench,
    )
    from celo2.eval.runner import RESULTS_FILE, ResultStore
    from celo2.metatrain.config import MAX_SEED

    grids = {}
    for name, text in args.lr_grid:
        if name in grids:
            raise BenchError(f"--lr-grid: {name!r} given twice")
        grids[name] = parse_grid(text, flag=f"--lr-grid {name}")
    wd_grids = {}
    for name, text in args.wd_grid:
        if name in wd_grids:
            raise BenchError(f"--wd-grid: {name!r} given twice")
        wd_grids[name] = parse_wd_grid(text, flag="--wd-grid" if name == "*" else f"--wd-grid {name}")
    opts = BenchOptions(
        suite=args.suite,
        tasks=args.tasks,
        optimizers=args.optimizers,
        lrs=None if args.lrs is None else parse_grid(args.lrs, flag="--lrs"),
        lr_grids=grids,
        seeds=None if args.seeds is None else _checked_seeds(parse_seeds(args.seeds), MAX_SEED),
        steps=args.steps,
        thetas=args.theta,
        weight_decays=dict(args.weight_decay),
        wd_grids=wd_grids,
        adam_lr_mult=args.adam_lr_mult,
        out=args.out,
        data_dir=args.data_dir,
        dataset=args.dataset,
        jobs=args.jobs,
        threads=args.threads,
        progress=not args.no_progress,
        report_only=args.report_only,
        dry_run=args.dry_run,
        command=_command_from_args(args),
    )
    run_dir = Path(opts.out or default_out(opts.suite))
    if opts.dry_run or (opts.report_only and not run_dir.is_dir()):
        run_bench(opts)  # writes nothing
        return 0
    try:
        with _SigtermStops(), RunLock(run_dir, flag="--out", kind="bench", adopt=is_earlier_bench_folder):
            run_bench(opts)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM through _SigtermStops
        signum = getattr(exc, "signum", signal.SIGINT)
        kept = len(ResultStore(run_dir).load())
        command = shlex.join(["celo2", *(getattr(args, "argv", None) or ["bench"])])
        print(f"celo2 bench: interrupted by {signal.Signals(signum).name}: {kept} finished run(s) are kept in "
              f"{run_dir / RESULTS_FILE} (the runs in progress are lost); resume with: {command}",
              file=sys.stderr)
        return 128 + signum
    return 0


class BenchStopped(KeyboardInterrupt):
    """A bench stopped by SIGTERM (a preemption); ``signum`` is the signal.

    Args:
        signum: the signal received.
    """

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(f"stopped by {signal.Signals(self.signum).name}")


class _SigtermStops:
    """While held (in the main thread), SIGTERM raises :class:`BenchStopped`, as Ctrl-C raises KeyboardInterrupt."""

    def __enter__(self) -> "_SigtermStops":
        self._previous = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, None):
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame) -> None:
        raise BenchStopped(signum)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _checked_seeds(seeds: list[int], largest: int) -> list[int]:
    """``seeds`` if none is above ``largest`` (seeds are ``[0, 2**32)``), else a :class:`BenchError`."""
    from celo2.eval.bench import BenchError

    over = [s for s in seeds if s > largest]
    if over:
        raise BenchError(f"--seeds: seeds must be integers from 0 to {largest} (2**32 - 1), got {over[0]}")
    return seeds


def _command_from_args(args: argparse.Namespace) -> str:
    """The command as parsed (flags in a fixed order), for the report's 'Command:' line."""
    parts = ["celo2", "bench", "--suite", args.suite]
    for flag, values in (("--tasks", args.tasks), ("--optimizers", args.optimizers), ("--theta", args.theta)):
        for v in values or []:
            parts += [flag, v]
    if args.lrs is not None:
        parts += ["--lrs", args.lrs]
    for name, grid in args.lr_grid:
        parts += ["--lr-grid", f"{name}={grid}"]
    for name, wd in args.weight_decay:
        parts += ["--weight-decay", f"{wd:g}" if name == "*" else f"{name}={wd:g}"]
    for name, grid in args.wd_grid:
        parts += ["--wd-grid", grid if name == "*" else f"{name}={grid}"]
    if args.adam_lr_mult is not None:
        parts += ["--adam-lr-mult", f"{args.adam_lr_mult:g}"]
    for flag, v in (("--seeds", args.seeds), ("--steps", args.steps), ("--out", args.out),
                    ("--data-dir", args.data_dir)):
        if v is not None:
            parts += [flag, str(v)]
    if args.dataset != "fashion-mnist":
        parts += ["--dataset", args.dataset]
    if args.jobs is not None:
        parts += ["--jobs", str(args.jobs)]
    if args.threads != 1:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)
