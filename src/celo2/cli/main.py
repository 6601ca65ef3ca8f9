"""Entry point of the ``celo2`` command.

Each subcommand lives in its own module of this package and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with
the parsed arguments, returning an exit code). Modules are imported lazily by
name so that ``celo2 theta show`` does not pay for importing JAX.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand name -> module under ``celo2.cli`` that registers it.
SUBCOMMANDS = {
    "demo": "demo",
    "theta": "theta",
    "meta-train": "metatrain",
    "bench": "bench",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=first if first in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: not an error.
        sys.stderr.close()
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
