"""Planning and running a bench: suites, LR and weight-decay grids, thetas, the run folder.

This is the library behind ``celo2 bench`` (the CLI only parses flags into a
:class:`BenchOptions`). It expands tasks x optimizers x LR grid x weight-decay
grid x seeds into :class:`~celo2.eval.runner.RunSpec` s, runs the missing ones
(resuming from ``results.jsonl``), then writes the report.

Weight decay is one fixed value per optimizer in the ``smoke``, ``quick`` and
``full`` suites (``--weight-decay``); ``--wd-grid`` makes it a grid, and the
``compare`` suite (the optimizer comparison: full sizes, the five supervised
tasks, Celo2 against AdamW and Muon) searches LR x weight decay by default
with each optimizer's :attr:`~celo2.eval.optimizers.OptimizerInfo.wd_grid`.
A run's key hashes its weight decay, so the fixed-decay runs of a ``full``
bench are the matching cells of a 2-D search in the same run folder.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celo2.eval import optimizers as opt_registry
from celo2.eval import tasks as task_registry
from celo2.eval.runner import RESULTS_FILE, ResultStore, RunSpec, ThetaRef, execute
from celo2.eval.theta_specs import SHIPPED_LABEL as SHIPPED

SUITES = ("smoke", "quick", "full", "compare")
#: The most seeds ``--seeds N`` may ask for (every seed repeats the whole grid of runs).
MAX_SEED_COUNT = 1000

#: Per suite: default tasks, optimizers, seeds and LR grids (lo, hi, points).
#: ``full`` uses 7 log-spaced points over three decades per optimizer (the
#: paper used 7 in [1e-5, 1e-3] for far larger models); ``quick`` uses 3
#: half-decade-spaced points centred where each optimizer did best in pilot
#: runs of the quick tasks (MLP, GPT); edges are still flagged in the report.
#: ``compare`` trains the full suite's task sizes (``sizes``) over a 2-D grid:
#: 5 half-decade LRs around each optimizer's best LRs of the full bench
#: (``benchmarks/results/full/``: the same LR values, so those runs are its
#: cells at the default weight decay) times each optimizer's weight-decay grid.
SUITE_DEFAULTS: dict[str, dict[str, Any]] = {
    "smoke": {
        "tasks": ["mlp", "gpt"],
        "optimizers": ["celo2", "adamw"],
        "seeds": 1,
        "grids": {k: (1e-3, 1e-2, 2) for k in opt_registry.OPTIMIZERS} | {"sgd": (1e-2, 1e-1, 2)},
    },
    "quick": {
        "tasks": ["mlp", "cnn", "gpt", "vit", "autoencoder"],
        "optimizers": list(opt_registry.DEFAULT_SUITE_OPTIMIZERS),
        "seeds": 1,
        "grids": {
            "celo2": (1e-3, 1e-2, 3),
            "celo2-base": (1e-3, 1e-2, 3),
            "celo2-bf16": (1e-3, 1e-2, 3),
            "celo2-base-bf16": (1e-3, 1e-2, 3),
            "adamw": (10**-2.5, 10**-1.5, 3),
            "adam": (10**-2.5, 10**-1.5, 3),
            "sgd": (10**-1.5, 10**-0.5, 3),
            "muon": (10**-2.25, 10**-1.25, 3),
        },
    },
    "full": {
        "tasks": list(task_registry.TASKS),
        "optimizers": list(opt_registry.DEFAULT_SUITE_OPTIMIZERS),
        "seeds": 3,
        "grids": {k: (*v.lr_grid, 7) for k, v in opt_registry.OPTIMIZERS.items()},
    },
    "compare": {
        "sizes": "full",
        "tasks": ["mlp", "cnn", "gpt", "vit", "autoencoder"],
        "optimizers": ["celo2", "adamw", "muon"],
        "seeds": 3,
        "wd_search": True,
        "grids": {
            "celo2": (10**-3.5, 10**-1.5, 5),
            "celo2-base": (10**-3.5, 10**-1.5, 5),
            "celo2-bf16": (10**-3.5, 10**-1.5, 5),
            "celo2-base-bf16": (10**-3.5, 10**-1.5, 5),
            "adamw": (1e-3, 1e-1, 5),
            "adam": (1e-3, 1e-1, 5),
            "sgd": (1e-2, 1.0, 5),
            "muon": (1e-3, 1e-1, 5),
        },
    },
}


class BenchError(ValueError):
    """A bad bench option; the message names the flag and the value."""


@dataclass
class BenchOptions:
    suite: str = "quick"
    tasks: list[str] | None = None
    optimizers: list[str] | None = None
    lrs: list[float] | None = None  # one grid for every optimizer
    lr_grids: dict[str, list[float]] = field(default_factory=dict)  # per kind or display name
    seeds: list[int] | None = None
    steps: int | None = None
    thetas: list[str] | None = None  # "shipped", "LABEL=PATH" or "PATH"
    weight_decays: dict[str, float] = field(default_factory=dict)  # "*" = every optimizer
    #: weight-decay grids by "*", kind or display name; None: that optimizer's default grid
    wd_grids: dict[str, list[float] | None] = field(default_factory=dict)
    #: Celo2's AdamW-branch LR multiplier (None: the published default, ``spec.ADAM_LR_MULT``)
    adam_lr_mult: float | None = None
    out: str | None = None
    data_dir: str | None = None
    dataset: str = "fashion-mnist"
    jobs: int | None = None  # None: 1 for smoke, else one per CPU core (at most 8)
    threads: int = 1
    progress: bool = True
    report_only: bool = False
    dry_run: bool = False
    command: str | None = None


# -- parsing helpers (shared with the CLI) -----------------------------------------


def parse_grid(text: str, flag: str = "--lr-grid") -> list[float]:
    """``LO:HI:N`` (log-spaced) or ``A,B,C`` (explicit) -> sorted LRs."""
    text = text.strip()
    try:
        if ":" in text:
            parts = text.split(":")
            if len(parts) != 3:
                raise ValueError
            lo, hi, n = float(parts[0]), float(parts[1]), int(parts[2])
            return opt_registry.log_grid(lo, hi, n)
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        detail = f" ({exc})" if str(exc) else ""
        raise BenchError(
            f"{flag}: cannot parse {text!r}{detail}; use LO:HI:N (e.g. 1e-4:1e-1:7) or a list (e.g. 1e-3,1e-2)"
        ) from None
    if not values:
        raise BenchError(f"{flag}: empty LR list {text!r}")
    bad = [v for v in values if not (v > 0 and math.isfinite(v))]
    if bad:
        raise BenchError(f"{flag}: learning rates must be positive and finite, got {bad}")
    return sorted(set(values))


def parse_wd_grid(text: str, flag: str = "--wd-grid") -> list[float] | None:
    """``A,B,C`` -> sorted weight decays (each >= 0); ``default`` -> None (the optimizer's default grid).

    Args:
        text: The grid as written after ``NAME=`` (or alone).
        flag: The flag named in error messages.

    Returns:
        The sorted distinct values, or None for ``default``.

    Raises:
        BenchError: Unparseable, empty, negative or non-finite values (the message names ``flag``).
    """
    text = text.strip()
    if text == "default":
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{flag}: cannot parse {text!r}; use a comma list of weight decays (e.g. 0,0.01,0.1) "
                         "or 'default'") from None
    if not values:
        raise BenchError(f"{flag}: empty weight-decay list {text!r}")
    bad = [v for v in values if not (v >= 0 and math.isfinite(v))]
    if bad:
        raise BenchError(f"{flag}: weight decays must be >= 0 and finite, got {bad}")
    return sorted(set(values))


def parse_seeds(text: str) -> list[int]:
    """``N`` -> seeds 0..N-1; ``A,B`` -> exactly those seeds.

    Args:
        text: the value of ``--seeds``.

    Returns:
        The sorted distinct seeds.

    Raises:
        BenchError: not integers, a count below 1 or above :data:`MAX_SEED_COUNT`, or a negative seed.
    """
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"--seeds: expected a count N or a comma list of integers, got {text!r}") from None
    if "," not in text and len(values) == 1:
        n = values[0]
        if n < 1:
            raise BenchError(f"--seeds: need at least 1 seed, got {n}")
        if n > MAX_SEED_COUNT:
            raise BenchError(f"--seeds: at most {MAX_SEED_COUNT} seeds (each is a full set of runs), got {n}")
        values = list(range(n))
    if not values or any(s < 0 for s in values):
        raise BenchError(f"--seeds: seeds must be non-negative integers, got {text!r}")
    return sorted(set(values))


def _split_list(values: list[str] | None) -> list[str] | None:
    if values is None:
        return None
    out = [v.strip() for item in values for v in item.split(",") if v.strip()]
    return out or None


# -- thetas ---------------------------------------------------------------------


def resolve_thetas(entries: list[str] | None) -> tuple[dict[str, Any], list[ThetaRef], bool]:
    """``(label -> Theta, refs, labelled)``; ``labelled`` is False only for the default shipped theta."""
    from celo2.eval.theta_specs import ThetaSpecError, load_labelled_thetas

    labelled = entries is not None
    try:
        loaded = load_labelled_thetas(entries or [SHIPPED], flag="--theta")
    except ThetaSpecError as exc:
        raise BenchError(str(exc)) from None
    thetas = {t.label: t.theta for t in loaded}
    refs = [ThetaRef(t.label, t.source, t.theta.checksum()) for t in loaded]
    return thetas, refs, labelled


# -- planning ------------------------------------------------------------------


@dataclass
class Plan:
    specs: list[RunSpec]
    grids: dict[str, list[float]]  # display optimizer name -> LRs
    wd_grids: dict[str, list[float]]  # display optimizer name -> weight decays (one: fixed, not searched)
    thetas: dict[str, Any]
    theta_refs: list[ThetaRef]
    tasks: list[str]
    optimizers: list[str]
    optimizer_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # only non-default ones


def _expand_optimizers(names: list[str], refs: list[ThetaRef], labelled: bool) -> list[tuple[str, ThetaRef | None]]:
    labels = {r.label: r for r in refs}
    out: list[tuple[str, ThetaRef | None]] = []
    for name in names:
        kind = opt_registry.optimizer_kind(name)
        if kind not in opt_registry.OPTIMIZERS:
            raise BenchError(f"--optimizers: unknown optimizer {name!r}; known: {', '.join(opt_registry.OPTIMIZERS)}")
        info = opt_registry.OPTIMIZERS[kind]
        if "[" in name:
            if not info.uses_theta or not name.endswith("]"):
                raise BenchError(f"--optimizers: {name!r}: only celo2[LABEL] / celo2-base[LABEL] take a theta label")
            label = name[len(kind) + 1 : -1]
            if label not in labels:
                raise BenchError(f"--optimizers: {name!r}: no --theta labelled {label!r} (have: {', '.join(labels)})")
            out.append((name, labels[label]))
        elif info.uses_theta:
            for r in refs:
                out.append((f"{kind}[{r.label}]" if labelled else kind, r))
        else:
            out.append((name, None))
    seen: set[str] = set()
    return [(n, r) for n, r in out if not (n in seen or seen.add(n))]


def make_plan(opts: BenchOptions) -> Plan:
    if opts.suite not in SUITES:
        raise BenchError(f"--suite: unknown suite {opts.suite!r}; choose one of {', '.join(SUITES)}")
    defaults = SUITE_DEFAULTS[opts.suite]
    suite_cfgs = task_registry.SUITES[defaults.get("sizes", opts.suite)]
    tasks = _split_list(opts.tasks) or defaults["tasks"]
    for t in tasks:
        if t not in task_registry.TASKS:
            raise BenchError(f"--tasks: unknown task {t!r}; known: {', '.join(task_registry.TASKS)}")
        if t not in suite_cfgs:
            raise BenchError(f"--tasks: task {t!r} has no config in suite {opts.suite!r}")
    tasks = list(dict.fromkeys(tasks))
    if opts.dataset not in task_registry.IMAGE_DATASETS:
        raise BenchError(f"--dataset: unknown {opts.dataset!r}; choose one of {', '.join(task_registry.IMAGE_DATASETS)}")
    if opts.steps is not None and opts.steps < 1:
        raise BenchError(f"--steps: must be >= 1, got {opts.steps}")
    if opts.jobs is not None and opts.jobs < 1:
        raise BenchError(f"--jobs: must be >= 1, got {opts.jobs}")
    if opts.data_dir is not None and not Path(opts.data_dir).expanduser().is_dir():
        raise BenchError(f"--data-dir {opts.data_dir}: not a folder")
    if opts.threads < 1:
        raise BenchError(f"--threads: must be >= 1, got {opts.threads}")

    names = _split_list(opts.optimizers) or defaults["optimizers"]
    # Validate names before touching thetas, so a typo is reported as such.
    for n in names:
        if opt_registry.optimizer_kind(n) not in opt_registry.OPTIMIZERS:
            raise BenchError(f"--optimizers: unknown optimizer {n!r}; known: {', '.join(opt_registry.OPTIMIZERS)}")
    needs_theta = any(opt_registry.OPTIMIZERS[opt_registry.optimizer_kind(n)].uses_theta for n in names)
    if needs_theta:
        thetas, refs, labelled = resolve_thetas(opts.thetas)
    else:
        thetas, refs, labelled = {}, [], False
    expanded = _expand_optimizers(names, refs, labelled)

    # LR grids: suite default per kind < --lrs < --lr-grid KIND < --lr-grid NAME.
    display = [n for n, _ in expanded]
    for key in opts.lr_grids:
        if key not in display and key not in {opt_registry.optimizer_kind(n) for n in display}:
            raise BenchError(f"--lr-grid: {key!r} is not one of the selected optimizers ({', '.join(display)})")
    grids: dict[str, list[float]] = {}
    for name in display:
        kind = opt_registry.optimizer_kind(name)
        lo, hi, n = defaults["grids"][kind]
        grid = opt_registry.log_grid(lo, hi, n)
        if opts.lrs is not None:
            grid = list(opts.lrs)
        grid = opts.lr_grids.get(kind, grid)
        grids[name] = sorted(opts.lr_grids.get(name, grid))

    # Weight decay: suite default (one value, or the kind's grid for a 2-D suite) < "*" < KIND < NAME,
    # where --weight-decay gives one value and --wd-grid a grid (both for the same key is refused).
    kinds = {opt_registry.optimizer_kind(n) for n in display}
    for flag, given in (("--weight-decay", opts.weight_decays), ("--wd-grid", opts.wd_grids)):
        for key in given:
            if key != "*" and key not in display and key not in kinds:
                raise BenchError(f"{flag}: {key!r} is not one of the selected optimizers ({', '.join(display)})")
    both = sorted(set(opts.weight_decays) & set(opts.wd_grids))
    if both:
        raise BenchError(f"--weight-decay and --wd-grid both set {', '.join(both)}: give one of them")
    wd_grids: dict[str, list[float]] = {}
    for name in display:
        kind = opt_registry.optimizer_kind(name)
        info = opt_registry.OPTIMIZERS[kind]
        wd_list = list(info.wd_grid) if defaults.get("wd_search") else [info.default_weight_decay]
        for key in ("*", kind, name):
            if key in opts.weight_decays:
                wd_list = [opts.weight_decays[key]]
            elif key in opts.wd_grids:
                grid = opts.wd_grids[key]
                wd_list = list(info.wd_grid) if grid is None else list(grid)
        for wd in wd_list:
            if not (wd >= 0 and math.isfinite(wd)):
                raise BenchError(f"--weight-decay: must be >= 0, got {wd} for {name}")
        wd_grids[name] = sorted(set(wd_list))

    options: dict[str, dict[str, Any]] = {name: {} for name in display}
    if opts.adam_lr_mult is not None:
        if not (opts.adam_lr_mult >= 0 and math.isfinite(opts.adam_lr_mult)):
            raise BenchError(f"--adam-lr-mult: must be >= 0 and finite, got {opts.adam_lr_mult}")
        celo2_names = [n for n in display if opt_registry.optimizer_kind(n) == "celo2"]
        if not celo2_names:
            raise BenchError("--adam-lr-mult: sets Celo2's AdamW branch, but no celo2 optimizer is selected")
        from celo2.rule.spec import ADAM_LR_MULT

        if opts.adam_lr_mult != ADAM_LR_MULT:  # the default stays out of the key: same runs as without the flag
            for n in celo2_names:
                options[n] = {"adam_lr_mult": float(opts.adam_lr_mult)}

    seeds = opts.seeds if opts.seeds is not None else list(range(defaults["seeds"]))
    specs: list[RunSpec] = []
    for task in tasks:
        cfg = copy.deepcopy(suite_cfgs[task])
        if opts.steps is not None:
            cfg["steps"] = int(opts.steps)
        uses_images = task_registry.TASKS[task].uses_images
        if uses_images:
            cfg["dataset"] = opts.dataset
        data_dir = task_registry.resolve_root(opts.data_dir) if uses_images else None
        for name, ref in expanded:
            for lr in grids[name]:
                for wd in wd_grids[name]:
                    for seed in seeds:
                        specs.append(RunSpec(task, cfg, name, lr, wd, seed, ref, data_dir,
                                             optimizer_options=options[name]))
    return Plan(specs, grids, wd_grids, thetas, refs, tasks, display, {n: o for n, o in options.items() if o})


# -- running ---------------------------------------------------------------------


def default_jobs(suite: str) -> int:
    """Parallel runs when --jobs is not given: every core for real suites (runs are single-threaded)."""
    import os

    return 1 if suite == "smoke" else max(1, min(8, os.cpu_count() or 1))


def default_out(suite: str) -> str:
    return f"bench-{suite}"


def is_earlier_bench_folder(folder: Path) -> bool:
    """Whether ``folder`` (unmarked) holds a bench from before run folders carried a marker.

    Args:
        folder: an existing folder without a run-folder marker.

    Returns:
        True when its ``bench.json`` lists invocations, or the first line of its ``results.jsonl``
        is a bench record (a ``key`` and a ``config`` of this bench's protocol).
    """
    try:
        meta = json.loads((folder / "bench.json").read_text(encoding="utf-8"))
        if isinstance(meta, dict) and isinstance(meta.get("invocations"), list):
            return True
    except (OSError, ValueError):
        pass
    try:
        with open(folder / RESULTS_FILE, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return (isinstance(first, dict) and isinstance(first.get("key"), str) and isinstance(first.get("config"), dict)
            and str(first["config"].get("protocol", "")).startswith("celo2-bench"))


def _update_meta_file(run_dir: Path, entry: dict[str, Any]) -> None:
    path = run_dir / "bench.json"
    history: list[dict[str, Any]] = []
    if path.exists():
        try:
            history = json.loads(path.read_text(encoding="utf-8")).get("invocations", [])
        except (json.JSONDecodeError, AttributeError):
            history = []
    history.append(entry)
    from celo2._io import atomic_write_text

    atomic_write_text(path, json.dumps({"invocations": history}, indent=2) + "\n")


def run_bench(opts: BenchOptions, log=print) -> dict[str, Any]:
    """Plan, run what is missing, write the report; returns a small summary dict."""
    from celo2.eval.report import environment_info, write_report

    t0 = time.perf_counter()
    plan = make_plan(opts)
    jobs = opts.jobs if opts.jobs is not None else default_jobs(opts.suite)
    run_dir = Path(opts.out or default_out(opts.suite))
    if run_dir.exists() and not run_dir.is_dir():
        raise BenchError(f"--out {run_dir}: exists and is not a folder")
    store = ResultStore(run_dir)
    done = store.load()
    n_done = sum(1 for s in plan.specs if s.key in done)
    log(
        f"bench: {len(plan.specs)} runs ({len(plan.tasks)} tasks x {len(plan.optimizers)} optimizers x LR grid x "
        f"{'weight-decay grid x ' if any(len(v) > 1 for v in plan.wd_grids.values()) else ''}"
        f"seeds), {n_done} already in {store.path}"
    )
    if opts.dry_run:
        for name in plan.optimizers:
            wds = plan.wd_grids[name]
            log(f"  {name}: LRs {', '.join(f'{x:g}' for x in plan.grids[name])}, "
                f"weight decay{'s' if len(wds) > 1 else ''} {', '.join(f'{x:g}' for x in wds)}")
        return {"planned": len(plan.specs), "done": n_done, "executed": 0, "run_dir": str(run_dir)}
    if opts.report_only:
        if n_done == 0:
            raise BenchError(
                f"--report-only: none of the {len(plan.specs)} runs these flags select is in {store.path}; "
                "pass the same --suite/--tasks/--optimizers/--theta/LR flags as the run"
            )
        records, executed = {s.key: done[s.key] for s in plan.specs if s.key in done}, 0
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        records, executed = execute(plan.specs, store, plan.thetas, jobs=jobs, threads=opts.threads,
                                    progress=opts.progress)
    wall = time.perf_counter() - t0
    env = environment_info(opts.threads, jobs)
    meta = {
        "suite": opts.suite,
        "command": opts.command or "(celo2.eval.bench.run_bench called from Python)",
        "thetas": [r.__dict__ for r in plan.theta_refs],
        "grids": plan.grids,
        "weight_decays": plan.wd_grids,
        "optimizer_options": plan.optimizer_options,
        "environment": env,
        "wall_s": None if opts.report_only else wall,
        "executed": executed,
    }
    summary = write_report(run_dir, plan.specs, records, meta)
    _update_meta_file(run_dir, {
        "command": meta["command"], "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(wall, 2), "runs_executed": executed, "runs_planned": len(plan.specs),
        **({"report_only": True} if opts.report_only else {}),
    })
    log(f"bench: {executed} runs executed in {wall:.1f} s; report: {run_dir / 'report.md'}")
    return {"planned": len(plan.specs), "done": len(records), "executed": executed, "run_dir": str(run_dir),
            "wall_s": wall, "summary": summary}
