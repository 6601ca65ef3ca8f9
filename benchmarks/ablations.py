"""The paper's ablation table on this machine: one meta-training run per row, equal compute, scored held out.

Rows (Celo2 paper, LM-30M validation loss beside each; default 3.812):

    default                 the published rule and recipe                 3.812
    width-4                 hidden width 4                               4.128
    width-16                hidden width 16                              3.857
    rms-decay-0.999         second-moment decay 0.999                    3.893
    no-augmentation         no task augmentation (reparametrisation)     4.417
    no-output-norm          no per-step RMS output normalisation         3.961
    direction+magnitude     direction and magnitude outputs              3.900

Every row meta-trains with the same preset (tasks, iterations, pairs, truncations: equal
compute), from the same seed, changing only its rule variant (``--set variant.FIELD=...``)
or, for ``no-augmentation``, ``augmentation=none``. Each row is a run folder under
``OUT/runs/ROW``; ``--resume`` continues unfinished rows and skips finished ones. Each
row's theta is then scored with ``celo2 meta-train score`` semantics (every theta on the
same inner runs, unperturbed, paired differences) on held-out task families, never the
training families and never the bench's (default: the photo families), without task
augmentation (as a user's training runs). Written to ``OUT``: ``table.md``, ``scores.json``,
``ablations.png`` (paper's change beside ours, per row), ``scores.png`` (paired differences
per task), ``meta_loss.png`` (every row's meta-training curve) and ``README.md`` (command, run
times, table).

    python benchmarks/ablations.py --data-dir ../shared/datasets                  # the long version
    python benchmarks/ablations.py --data-dir ../shared/datasets --resume         # continue it
    python benchmarks/ablations.py --quick --out /tmp/ablations                  # seconds per row, CI
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "ablations"


@dataclass(frozen=True)
class Row:
    """One ablation: its name, what it changes in the meta-training config, the paper's figure."""

    name: str
    description: str
    changes: dict = field(default_factory=dict)
    paper: float = float("nan")


ROWS: tuple[Row, ...] = (
    Row("default", "the published rule and recipe", {}, 3.812),
    Row("width-4", "hidden width 4", {"variant.hidden_width": "4"}, 4.128),
    Row("width-16", "hidden width 16", {"variant.hidden_width": "16"}, 3.857),
    Row("rms-decay-0.999", "second-moment decay 0.999", {"variant.rms_decay": "0.999"}, 3.893),
    Row("no-augmentation", "no task augmentation", {"augmentation": "none"}, 4.417),
    Row("no-output-norm", "no output normalisation", {"variant.output_norm": "none"}, 3.961),
    Row("direction+magnitude", "direction and magnitude outputs", {"variant.outputs": "direction+magnitude"}, 3.900),
)
BASELINE = ROWS[0].name

#: ``--quick``: the smoke preset on one family, two iterations; scored briefly on another family.
QUICK = {"preset": "smoke", "train": {"tasks": "digits", "iterations": "2", "pairs_per_task": "1",
                                      "checkpoint_every": "1"},
         "score_tasks": "synthetic", "truncations": 2, "runs_per_task": 2}


def _configs(args) -> tuple[dict, object]:
    """Each row's meta-training config and the scoring config."""
    from celo2.metatrain.config import override, parse_set, preset

    common = dict(QUICK["train"]) if args.quick else {}
    if args.data_dir is not None:
        common["data_dir"] = args.data_dir
    if args.iterations is not None:
        common["iterations"] = str(args.iterations)
    common.update(parse_set(args.overrides))
    common["seed"] = str(args.seed)
    base = preset(QUICK["preset"] if args.quick else args.preset, **common)
    rows = [r for r in ROWS if r.name in args.rows]
    configs = {r.name: override(base, r.changes) for r in rows}
    score_tasks = QUICK["score_tasks"] if args.quick and args.score_tasks is None else (
        args.score_tasks or "photo-patches,photo-faces")
    scoring = override(base, {"tasks": score_tasks, "augmentation": args.score_augmentation})
    clash = sorted(set(scoring.tasks) & set(base.tasks))
    if clash:
        raise SystemExit(f"ablations: --score-tasks {','.join(clash)} also trains the rows; score on held-out "
                         "families (never the training ones, never the bench's)")
    return configs, scoring


def _train(name: str, config, run: Path, resume: bool, progress: bool) -> dict:
    """Meta-train one row into ``run`` (or find it done); its ``metadata.json`` record."""
    from celo2.metatrain.trainer import meta_train

    meta_path = run / "metadata.json"
    if resume and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("iterations", 0) >= config.iterations:
            print(f"[{name}] done already: {meta['iterations']} iterations in {meta['wall_time_s']:.0f} s",
                  file=sys.stderr)
            return meta
    print(f"[{name}] meta-training: {config.variant.label}, augmentation {config.augmentation}, "
          f"{config.iterations} iterations", file=sys.stderr)
    meta_train(config, run, resume=resume, progress=progress)
    return json.loads(meta_path.read_text())


def _command(name: str, config, run: Path, args) -> str:
    """The ``celo2 meta-train`` command that trains a row (for the README)."""
    row = next(r for r in ROWS if r.name == name)
    argv = ["celo2", "meta-train", "--preset", config.preset, "--seed", str(config.seed),
            "--iterations", str(config.iterations), "--out", str(run)]
    if config.data_dir:
        argv += ["--data-dir", config.data_dir]
    sets = (dict(QUICK["train"]) if args.quick else {}) | dict(kv.split("=", 1) for kv in args.overrides) | row.changes
    for key, value in sets.items():
        if key not in ("iterations", "data_dir", "seed"):
            argv += ["--set", f"{key}={value}"]
    return shlex.join(argv)


def _table(scores, configs, metas) -> str:
    base_paper = ROWS[0].paper
    head = ["row", "change", "paper LM-30M", "paper vs default", "meta-loss here (held out)",
            "minus default (paired)", "here vs default", "direction agrees", "meta-train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    base = scores.mean(BASELINE) if BASELINE in scores.streams else float("nan")
    for row in ROWS:
        if row.name not in scores.streams:
            continue
        mean, se = scores.mean(row.name), scores.stderr(row.name)
        paper_change = row.paper / base_paper - 1
        if row.name == BASELINE or BASELINE not in scores.streams:
            diff_text, ratio_text, agrees = "-", "-", "-"
        else:
            d, e = scores.paired_difference(row.name, BASELINE)
            diff_text, ratio_text = f"{d:+.4f} ± {e:.4f}", f"{mean / base - 1:+.2%}"
            here = "worse" if d > 0 else "better"
            if abs(d) <= 2 * e:
                agrees = f"undecided ({here}, within 2 s.e.)"
            else:
                agrees = f"{'yes' if (d > 0) == (paper_change > 0) else 'no'} ({here} here)"
        lines.append("| " + " | ".join([
            row.name, row.description, f"{row.paper:.3f}", "-" if row.name == BASELINE else f"{paper_change:+.2%}",
            f"{mean:.4f} ± {se:.4f}", diff_text, ratio_text, agrees,
            f"{metas[row.name].get('wall_time_s', float('nan')):.0f}"]) + " |")
    return "\n".join(lines)


def _plot(scores, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in ROWS if r.name in scores.streams and r.name != BASELINE]
    if not rows or BASELINE not in scores.streams:
        return path
    base = scores.mean(BASELINE)
    x = np.arange(len(rows))
    paper = [100 * (r.paper / ROWS[0].paper - 1) for r in rows]
    ours = [100 * scores.paired_difference(r.name, BASELINE)[0] / base for r in rows]
    err = [200 * scores.paired_difference(r.name, BASELINE)[1] / base for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    ax.bar(x - 0.2, paper, 0.4, color="0.7", label="paper, LM-30M validation loss")
    ax.bar(x + 0.2, ours, 0.4, yerr=err, capsize=4, color="C0", label="here, held-out meta-loss (95% interval)")
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(x, [r.name for r in rows], rotation=25, ha="right")
    ax.set_ylabel("change from the default row (%, lower is better)")
    ax.set_title("Celo2 ablations: the paper's and this machine's, equal compute per row", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", help="meta-training preset of every row (default cpu)")
    ap.add_argument("--data-dir", default=None, help="dataset folder (else $CELO2_DATA_DIR)")
    ap.add_argument("--iterations", type=int, default=None, help="outer iterations of every row (default: preset's)")
    ap.add_argument("--seed", type=int, default=0, help="root seed of every row (default 0)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override applied to every row (repeatable)")
    ap.add_argument("--rows", default=",".join(r.name for r in ROWS), help="comma-separated rows (default: all)")
    ap.add_argument("--score-tasks", default=None,
                    help="held-out families scored (default photo-patches,photo-faces; --quick: synthetic)")
    ap.add_argument("--score-augmentation", default="none", help="augmentation while scoring (default none)")
    ap.add_argument("--truncations", type=int, default=None, help="scoring truncations per run stream (default 400)")
    ap.add_argument("--runs-per-task", type=int, default=None, help="scoring run streams per task")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    ap.add_argument("--resume", action="store_true", help="continue unfinished rows, skip finished ones")
    ap.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (seconds per row)")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in {row.name for row in ROWS}]
    if unknown:
        ap.error(f"--rows: unknown row {unknown[0]!r}; the rows are {', '.join(r.name for r in ROWS)}")

    from celo2.metatrain.plot import plot_runs, plot_scores
    from celo2.metatrain.score import DEFAULT_TRUNCATIONS, score_thetas
    from celo2.theta_files import load_theta

    configs, scoring = _configs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    metas = {name: _train(name, config, out / "runs" / name, args.resume, not args.no_progress)
             for name, config in configs.items()}
    thetas = {name: load_theta(out / "runs" / name / "theta.state") for name in configs}
    truncations = args.truncations or (QUICK["truncations"] if args.quick else DEFAULT_TRUNCATIONS)
    runs_per_task = args.runs_per_task or (QUICK["runs_per_task"] if args.quick else None)
    print(f"scoring {len(thetas)} theta(s) on {', '.join(scoring.tasks)} (augmentation {scoring.augmentation}), "
          f"{truncations} truncations per run stream", file=sys.stderr)
    t_score = time.perf_counter()
    scores = score_thetas(thetas, scoring, truncations=truncations, runs_per_task=runs_per_task,
                          progress=not args.no_progress)
    score_s = time.perf_counter() - t_score
    scores.save(out / "scores.json")
    plot_scores(scores, out / "scores.png")
    _plot(scores, out / "ablations.png")
    plot_runs({name: out / "runs" / name for name in configs}, out / "meta_loss.png",
              title="Each ablation row's PES meta-training (its training tasks)")
    table = _table(scores, configs, metas)
    (out / "table.md").write_text(table + "\n")
    commands = "\n".join(_command(name, config, out / "runs" / name, args) for name, config in configs.items())
    first = next(iter(configs.values()))
    readme = [
        "# Celo2 ablations on this machine", "",
        "The paper's ablation rows, each a meta-training run with equal compute (preset "
        f"`{first.preset}`, tasks {', '.join(first.tasks)}, {first.iterations} iterations x "
        f"{first.inner_steps_per_iteration} inner steps, seed {first.seed}), each theta scored on held-out "
        f"families {', '.join(scoring.tasks)} (augmentation {scoring.augmentation}; {truncations} truncations x "
        f"{scoring.truncation_length} steps, {scores.runs_per_task} run streams per task, the same inner runs "
        "for every theta). Lower is better; the paper's column is LM-30M validation loss.", "",
        table, "",
        f"Scoring took {score_s:.0f} s; the whole command {time.perf_counter() - t0:.0f} s "
        f"({'--resume' if args.resume else 'fresh'}).", "",
        "![ablations](ablations.png)", "", "![paired differences](scores.png)", "",
        "Each row's meta-loss during training (on its own training tasks: a row without augmentation sees "
        "unscaled tasks, so its curve sits on another scale):", "", "![meta-training curves](meta_loss.png)", "",
        "Command:", "", "```", shlex.join(["python", "benchmarks/ablations.py", *(argv if argv is not None else
                                                                                 sys.argv[1:])]), "```", "",
        "Each row's meta-training, as `celo2 meta-train`:", "", "```", commands, "```", "",
    ]
    (out / "README.md").write_text("\n".join(readme))
    print(table)
    print(out / "README.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
