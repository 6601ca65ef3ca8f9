"""``celo2 theta show|convert|push``: inspect, convert and share theta files."""

from __future__ import annotations

import argparse
import sys

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("theta", help="inspect, convert or share a theta (the learned rule's weights)")
    sub = parser.add_subparsers(dest="theta_command", metavar="ACTION")
    show = sub.add_parser("show", help="print shapes, parameter count, checksum and feature groups")
    show.add_argument("path", nargs="?", default=None, help="theta file or hf://owner/repo (default: the shipped theta)")
    show.set_defaults(func=_show)
    convert = sub.add_parser("convert", help="convert between .state (authors' flax msgpack), .npz (celo2) and .pt (PyLO)")
    convert.add_argument("source", help="input theta file or hf://owner/repo")
    convert.add_argument("dest", help="output path; the format follows the extension")
    convert.add_argument("--format", choices=("flax", "npz", "pylo"), default=None, help="override the output format")
    convert.set_defaults(func=_convert)
    push = sub.add_parser(
        "push", help="upload a theta file and a generated model card (README.md) to a Hugging Face Hub repository",
        description="Upload THETA (a theta file, or a meta-training run folder: its theta.state and, for the card's "
                    "recipe, its metadata.json) and a model card to REPO_ID on the Hugging Face Hub (needs "
                    "'pip install huggingface_hub'). The repository is created if missing; local files are only read.")
    push.add_argument("theta", metavar="THETA", help="theta file (.state, .npz, .pt) or meta-training run folder")
    push.add_argument("repo_id", metavar="REPO_ID", help="Hub repository, owner/name")
    push.add_argument("--revision", default=None, help="branch to commit to (created if missing; default: main)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or 'hf auth login')")
    push.add_argument("--endpoint", default=None, help="Hub URL (default https://huggingface.co or HF_ENDPOINT)")
    push.add_argument("--run", default=None, metavar="RUN_DIR",
                      help="meta-training run folder whose metadata.json gives the card's recipe")
    push.add_argument("--bench", default=None, metavar="REPORT",
                      help="celo2 bench report (report.md, a table.md, or a bench run folder) for the card's tables")
    push.set_defaults(func=_push)
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
    print(f"variant:    {theta.variant.label}")
    print(f"{'key':<8} {'shape':<8} {'mean':>10} {'std':>10}  feature group")
    groups = {f"w0__{g.index}": g for g in spec.FEATURE_GROUPS}
    for key in theta.variant.theta_keys:
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


def _push(args: argparse.Namespace) -> int:
    from celo2.theta_files.push import push_theta

    url = push_theta(args.theta, args.repo_id, revision=args.revision, private=args.private, token=args.token,
                     endpoint=args.endpoint, run_dir=args.run, bench_report=args.bench)
    print(url)
    return 0
