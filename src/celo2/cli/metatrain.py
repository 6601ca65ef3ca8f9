"""``celo2 meta-train``: PES meta-training of theta; ``plot RUN_DIR`` and ``score THETA...``."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from celo2.cli.main import positive_int, seed_int

DESCRIPTION = """\
Meta-train the Celo2 theta with PES (spec section 3) on task families: MLPs and conv nets on
images, a tiny causal transformer on bytes.

  celo2 meta-train --preset smoke --out runs/smoke          # ~1 min (compiling), built-in data
  celo2 meta-train --preset cpu --data-dir DATA --out runs/cpu
  celo2 meta-train --out runs/cpu --resume                  # continue a killed run
  celo2 meta-train plot runs/cpu                            # meta-loss curve -> PNG
  celo2 meta-train plot runs/cpu w4=runs/width4 --output c.png   # curves compared
  celo2 meta-train score shipped published=theta.state --data-dir DATA   # thetas on the meta-loss
  celo2 meta-train --preset cpu --set variant.hidden_width=4 --out runs/width4  # a rule variant

Presets: paper (the published recipe), cpu (sized for 2 CPU cores), cpu-photos (cpu
with the photo families of celo2.data.photos for digits and synthetic), cpu-text (the
byte transformer on the standard library's docstrings), cpu-conv (the conv net on
images the bench never evaluates), smoke.
Any setting can be changed with --set key=value (see --print-config for keys); the rule
itself with --set variant.FIELD=VALUE (hidden_width, hidden_layers, rms_decay,
momentum_decays, factored_decays, feature_groups, output_norm, outputs: docs/meta-training.md,
"Rule variants"). 'score' runs each theta with the rule variant its file records.
'score' runs every theta, unperturbed, on the same inner runs of the preset's
tasks and reports the meta-loss (mean clipped training loss per inner step)
per task, with paired differences to the first theta: checkpoints or thetas
compared on the objective meta-training optimises, without PES's noise.
File-based tasks (mnist, fashion-mnist, cifar10, svhn) read DATA given by
--data-dir or $CELO2_DATA_DIR; digits and synthetic need no files.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "meta-train", help="meta-train theta with PES; 'plot RUN_DIR' draws its curve; 'score THETA...' "
                           "compares thetas on the meta-loss",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("action", nargs="*", metavar="plot RUN_DIR | score THETA",
                   help="'plot RUN_DIR [RUN_DIR ...]' draws meta-loss curves (several: on one axis, LABEL=RUN_DIR "
                        "names one, --output required); 'score THETA [THETA ...]' scores "
                        "thetas ('shipped', LABEL=PATH or PATH) on the meta-loss; neither: train")
    p.add_argument("--preset", default=None, help="paper, cpu (default), cpu-photos, cpu-text, cpu-conv or smoke")
    p.add_argument("--tasks", default=None,
                   help="comma-separated task families, e.g. mnist,fashion-mnist,digits,synthetic")
    p.add_argument("--data-dir", default=None, help="dataset folder (else $CELO2_DATA_DIR)")
    p.add_argument("--iterations", type=positive_int, default=None, help="outer iterations")
    p.add_argument("--out", default=None, help="run folder (default runs/meta-train-PRESET-seedSEED)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--seed", type=seed_int, default=None, help="root seed of theta's init and every random draw")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="N")
    p.add_argument("--metrics-format", default=None, help="jsonl (default) or csv")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set pairs_per_task=4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cpu-devices", default="auto", metavar="N",
                   help="split the CPU into N JAX host devices so that particles run on every core "
                        "(default: one per core; 1 turns it off; ignored if XLA_FLAGS sets it)")
    p.add_argument("--truncations", type=positive_int, default=None, metavar="N",
                   help="(score) truncations per run stream (default 400: 20,000 inner steps at the cpu preset)")
    p.add_argument("--runs-per-task", type=positive_int, default=None, metavar="K",
                   help="(score) run streams per task (default: 2 x pairs_per_task, a PES iteration's worth)")
    p.add_argument("--output", default=None,
                   help="(plot) PNG path, default RUN_DIR/meta_loss.png; (score) also write the scores as JSON here, "
                        "and their plot beside it (.png)")
    p.set_defaults(func=run)


def _plot(targets: list[str], output: str | None) -> int:
    """``plot RUN_DIR`` (one curve, default beside it) or ``plot [LABEL=]RUN_DIR ...`` (curves on one axis)."""
    from celo2.metatrain.plot import plot_run, plot_runs

    if not targets:
        return _fail("usage: celo2 meta-train plot RUN_DIR [[LABEL=]RUN_DIR ...] [--output PNG]")
    if len(targets) == 1 and "=" not in targets[0]:
        print(plot_run(targets[0], output))
        return 0
    if output is None:
        return _fail("plot of several runs: give --output PNG (one picture for all of them)")
    runs: dict[str, str] = {}
    for target in targets:  # LABEL=RUN_DIR split at the first '=', as theta specs are (eval.theta_specs)
        label, path = (x.strip() for x in target.split("=", 1)) if "=" in target else (Path(target).name, target)
        if not label or not path:
            return _fail(f"plot {target!r}: expected LABEL=RUN_DIR")
        if label in runs:
            return _fail(f"plot: repeated label in {target!r}; give each run a distinct LABEL=RUN_DIR")
        runs[label] = path
    print(plot_runs(runs, output))
    return 0


def _fail(msg: str) -> int:
    print(f"celo2 meta-train: error: {msg}", file=sys.stderr)
    return 2


def _resolve_config(args):
    from celo2.metatrain.config import ConfigError, MetaTrainConfig, PRESETS, override, parse_set, preset

    flags: dict[str, object] = {}
    if args.tasks is not None:
        flags["tasks"] = args.tasks
    for name in ("data_dir", "iterations", "seed", "checkpoint_every", "metrics_format"):
        if getattr(args, name) is not None:
            flags[name] = getattr(args, name)
    flags.update(parse_set(args.overrides))

    out = Path(args.out) if args.out else None
    if args.resume:
        if out is None:
            raise ConfigError("--resume needs --out RUN_DIR (the run to continue)")
        from celo2._runlock import check_owner
        from celo2.metatrain.run_folder import is_legacy_run

        # A folder that is not a meta-training run is refused before anything in it is read or written.
        check_owner(out, "meta-train", is_legacy_run, where=f"--out {out}")
        saved = out / "config.json"
        if saved.exists():
            try:
                base = MetaTrainConfig.from_dict(json.loads(saved.read_text()))
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{saved}: not a meta-training configuration ({exc})") from None
            if args.preset is not None and args.preset != base.preset:
                raise ConfigError(f"--preset {args.preset}: {out} was started with preset {base.preset!r}")
            return override(base, flags), out
    name = args.preset or "cpu"
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    config = preset(name, **flags)
    if out is None:
        out = Path("runs") / f"meta-train-{name}-seed{config.seed}"
    return config, out


def _printed_config(args, config) -> bool:
    """``--print-config``: print the resolved config (and do nothing else)."""
    if args.print_config:
        print(config.to_json())
    return bool(args.print_config)


def _set_cpu_devices(value: str) -> None:
    """Ask XLA for one host device per core before JAX starts (XLA runs small ops on one thread)."""
    import os

    from celo2.metatrain.config import ConfigError

    if value == "auto":
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    else:
        try:
            n = int(value)
        except ValueError:
            raise ConfigError(f"--cpu-devices {value!r}: expected a positive integer or 'auto'") from None
        if n < 1:
            raise ConfigError(f"--cpu-devices {value!r}: expected a positive integer or 'auto'")
    flags = os.environ.get("XLA_FLAGS", "")
    if n <= 1 or "xla_force_host_platform_device_count" in flags:
        return
    if "jax" in sys.modules:  # too late to change (only when called from Python)
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def run(args) -> int:
    """Train, ``plot`` or ``score``; bad input raises the project's errors (one line, exit 2, in ``cli.main``)."""
    if args.action and args.action[0] == "score":
        return _score(args)
    if args.truncations is not None or args.runs_per_task is not None:
        return _fail("--truncations and --runs-per-task belong to 'celo2 meta-train score THETA...'")
    if args.action:
        if args.action[0] != "plot":
            return _fail(f"unknown action {args.action[0]!r}; the actions are 'plot RUN_DIR' and 'score THETA...'")
        return _plot(args.action[1:], args.output)
    if args.output is not None:
        return _fail("--output belongs to 'celo2 meta-train plot RUN_DIR' and 'celo2 meta-train score THETA...'")
    config, out = _resolve_config(args)
    if _printed_config(args, config):
        return 0
    _set_cpu_devices(args.cpu_devices)
    from celo2.metatrain.trainer import MetaTrainInterrupted, meta_train

    try:
        result = meta_train(config, out, resume=args.resume, progress=not args.no_progress)
    except MetaTrainInterrupted as exc:
        print(f"celo2 meta-train: {exc}; resume with: {_resume_command(args, out)}", file=sys.stderr)
        return exc.exit_status
    except OSError as exc:
        if exc.filename is None:
            raise
        return _fail(f"{exc.filename}: {exc.strerror or exc}; the checkpoints on disk are whole: "
                     f"free the space (or fix the file) and resume with: {_resume_command(args, out)}")
    if result.iterations >= config.iterations:
        print(out / "theta.state")
    return 0


def _resume_command(args, out: Path) -> str:
    """The command that continues the run in ``out``: the one typed, with ``--resume`` (and ``--out``)."""
    argv = list(getattr(args, "argv", None) or ["meta-train"])
    if args.out is None:
        argv += ["--out", str(out)]
    if "--resume" not in argv:
        argv.append("--resume")
    return shlex.join(["celo2", *argv])


def _score(args) -> int:
    """``celo2 meta-train score THETA...``: the thetas on the preset's meta-loss, side by side."""
    from celo2.eval.theta_specs import load_labelled_thetas

    specs = args.action[1:]
    if not specs:
        return _fail("usage: celo2 meta-train score THETA [THETA ...] (THETA: shipped, LABEL=PATH or PATH)")
    if args.resume or args.out is not None:
        return _fail("score writes no run folder: --resume and --out belong to training (use --output FILE.json)")
    if args.iterations is not None:
        return _fail("--iterations belongs to training; score runs --truncations N per run stream")
    config, _ = _resolve_config(args)
    if _printed_config(args, config):
        return 0
    thetas = load_labelled_thetas(specs, flag="score")
    _set_cpu_devices(args.cpu_devices)
    from celo2.metatrain.score import DEFAULT_TRUNCATIONS, score_thetas

    truncations = DEFAULT_TRUNCATIONS if args.truncations is None else args.truncations
    print(f"scoring {len(thetas)} theta(s) on tasks {', '.join(config.tasks)}: {truncations} truncations "
          f"x {config.truncation_length} steps per run stream, seed {config.seed}", file=sys.stderr)
    scores = score_thetas({t.label: t.theta for t in thetas}, config, truncations=truncations,
                          runs_per_task=args.runs_per_task, progress=not args.no_progress)
    print(f"meta-loss: mean clipped training loss per inner step, {scores.runs_per_task} run streams per task "
          f"x {scores.truncations * scores.truncation_length} steps, the same for every theta")
    print(scores.table())
    if args.output:
        from celo2.metatrain.plot import plot_scores

        print(scores.save(args.output))
        print(plot_scores(scores, Path(args.output).with_suffix(".png")))
    return 0
