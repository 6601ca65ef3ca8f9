"""Entry point of the ``celo2`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with
the parsed arguments, returning an exit code). Modules are imported lazily by
name so that ``celo2 theta show`` does not pay for importing JAX.

Errors of the user's making (a bad flag value, a missing or corrupt file, a
run folder in use, a path that cannot be written) end in one line on standard
error, ``celo2 COMMAND: error: ...``, and exit code 2; this module's
:func:`main` handles them for every subcommand (:func:`user_error_types`).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from typing import NoReturn

#: subcommand name -> module under ``celo2.cli`` that registers it.
SUBCOMMANDS = {
    "demo": "demo",
    "theta": "theta",
    "meta-train": "metatrain",
    "bench": "bench",
}

#: Modules defining exception types that mean bad input, and the names of those types.
_USER_ERRORS = {
    "celo2.rule.theta": ("ThetaError",),
    "celo2.rule.variant": ("VariantError",),
    "celo2.theta_files": ("ThetaNotFoundError",),
    "celo2.theta_files.push": ("HubPushError",),
    "celo2.eval.theta_specs": ("ThetaSpecError",),
    "celo2.data.errors": ("DatasetNotFoundError", "DatasetFormatError", "DownloadError"),
    "celo2._runlock": ("RunFolderError",),
    "celo2.metatrain.config": ("ConfigError",),
    "celo2.metatrain.tasks": ("TaskError",),
    "celo2.metatrain.checkpoint": ("CheckpointError",),
    "celo2.eval.bench": ("BenchError",),
    "celo2.eval.tasks": ("TaskDataError",),
}


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line naming the flag (exit code 2), not the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def user_error_types() -> tuple[type[BaseException], ...]:
    """The project's exception types that mean bad input, from the modules imported so far.

    A module not imported yet cannot have raised its exceptions, so nothing is
    imported here (``celo2 theta`` stays free of JAX and PyTorch).
    """
    types: list[type[BaseException]] = []
    for module, names in _USER_ERRORS.items():
        mod = sys.modules.get(module)
        if mod is not None:
            types += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return tuple(types)


def _is_user_error(exc: BaseException) -> bool:
    if isinstance(exc, user_error_types()):
        return True
    # An OSError naming a file is about a path the user gave (permissions, a file in the way, a full disk).
    return isinstance(exc, OSError) and getattr(exc, "filename", None) is not None


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


# -- argparse value types: bad values are reported by argparse, naming the flag ----------------


def _checked(text: str, convert, ok, want: str):
    """``convert(text)`` if it converts and passes ``ok``, else an argparse error saying ``want``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts of steps, iterations, jobs)."""
    return _checked(text, int, lambda v: v >= 1, "a positive integer")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates)."""
    return _checked(text, float, lambda v: math.isfinite(v) and v > 0, "a positive finite number")


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (weight decay)."""
    return _checked(text, float, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in ``[0, 2**32)`` (what NumPy, PyTorch and JAX all take)."""
    from celo2.metatrain.config import MAX_SEED

    return _checked(text, int, lambda v: 0 <= v <= MAX_SEED, f"an integer from 0 to {MAX_SEED} (2**32 - 1)")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``celo2`` parser; with ``only``, just that subcommand's module is imported."""
    parser = OneLineParser(
        prog="celo2",
        description="Celo2 learned optimizer: train with it, meta-train it, benchmark it.",
    )
    from celo2 import __version__

    parser.add_argument("--version", action="version", version=f"celo2 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            # Still list it in --help, without importing its module.
            sub.add_parser(name, help=f"(see 'celo2 {name} --help')", add_help=False)
            continue
        importlib.import_module(f"celo2.cli.{module}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``celo2`` command line.

    Args:
        argv: the arguments after ``celo2`` (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for bad input or a file that cannot be written (one line on
        stderr), 130 on Ctrl-C (SIGINT), 143 on SIGTERM where a command handles it (meta-train,
        bench: after saving what is done and printing how to resume).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    args.argv = argv  # the command as typed, for messages such as how to resume
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: not an error.
        sys.stderr.close()
        return 0
    except Exception as exc:
        if not _is_user_error(exc):
            raise
        print(f"celo2 {args.command}: error: {_message(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
