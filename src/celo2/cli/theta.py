"""``celo2 theta show|convert``: inspect and convert theta files."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("theta", help="inspect or convert a theta (the learned rule's weights)")
    sub = parser.add_subparsers(dest="theta_command", metavar="ACTION")
    show = sub.add_parser("show", help="print shapes, parameter count, checksum and feature groups")
    show.add_argument("path", nargs="?", default=None, help="theta file or hf://owner/repo (default: the shipped theta)")
    show.set_defaults(func=_show)
    convert = sub.add_parser("convert", help="convert between .state (authors' flax msgpack), .npz (celo2) and .pt (PyLO)")
    convert.add_argument("source", help="input theta file or hf://owner/repo")
    convert.add_argument("dest", help="output path; the format follows the extension")
    convert.add_argument("--format", choices=("flax", "npz", "pylo"), default=None, help="override the output format")
    convert.set_defaults(func=_convert)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _show(args: argparse.Namespace) -> int:
    from celo2.rule import spec
    from celo2.rule.theta import ThetaError
    from celo2.theta_files import ThetaNotFoundError, load_theta

    try:
        theta = load_theta(args.path)
    except (ThetaError, ThetaNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"source:     {theta.metadata.get('source', args.path)}")
    print(f"parameters: {theta.num_params}")
    print(f"sha256:     {theta.checksum()}")
    print(f"{'key':<8} {'shape':<8} {'mean':>10} {'std':>10}  feature group")
    groups = {f"w0__{g.index}": g for g in spec.FEATURE_GROUPS}
    for key in spec.THETA_KEYS:
        value = theta[key]
        shape = "x".join(map(str, value.shape))
        group = groups.get(key)
        label = f"{group.index:>2} {group.name} [{group.width}]: {group.description}" if group else ""
        print(f"{key:<8} {shape:<8} {float(np.mean(value)):>10.4f} {float(np.std(value)):>10.4f}  {label}")
    extra = {k: v for k, v in theta.metadata.items() if k != "source"}
    if extra:
        print("metadata:")
        for k, v in extra.items():
            print(f"  {k}: {v}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from celo2.rule.theta import ThetaError
    from celo2.theta_files import ThetaNotFoundError, load_theta, save_theta

    try:
        theta = load_theta(args.source)
        path = save_theta(theta, args.dest, format=args.format)
    except (ThetaError, ThetaNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the destination cannot be written: a parent is a file, no permission, disk full
        print(f"error: cannot write {args.dest}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({theta.num_params} parameters, sha256:{theta.checksum()})")
    return 0
