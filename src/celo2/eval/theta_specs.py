"""Theta specs of the command line (``shipped``, ``LABEL=PATH``, ``PATH``), loaded into labelled thetas.

Used by ``celo2 bench --theta`` and ``celo2 meta-train score``; the loaders themselves are
:func:`celo2.load_theta`'s. A theta of any rule variant loads (its file records the variant);
the bench runs it on the PyTorch front end's chunked backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from celo2.rule.theta import Theta, ThetaError
from celo2.theta_files import ThetaNotFoundError, load_theta

SHIPPED_LABEL = "shipped"
"""The theta spec that names the project's shipped theta (``load_theta()``)."""


class ThetaSpecError(ValueError):
    """A command-line theta spec that names no loadable theta; the message names the spec."""


@dataclass(frozen=True)
class LabelledTheta:
    """A theta named on a command line: its label, the theta, and where it came from."""

    label: str
    theta: Theta
    source: str


def load_labelled_thetas(entries: "list[str]", flag: str = "--theta") -> "list[LabelledTheta]":
    """Load the thetas of command-line specs: ``shipped``, ``LABEL=PATH`` or
    ``PATH`` (labelled by the file's stem). Labels must be distinct and made of
    letters, digits, ``-``, ``_`` and ``.``, since they become column names
    and file names. Shared by ``celo2 bench`` and ``celo2 meta-train score``.

    Args:
        entries: The specs as given on the command line, in order.
        flag: The flag or subcommand the specs came from, named in error messages (default ``"--theta"``).

    Returns:
        One :class:`LabelledTheta` per spec, in order.

    Raises:
        ThetaSpecError: A spec is malformed, a label is repeated or not usable, or its theta
            cannot be loaded (the message names the spec and the loader's reason).
    """
    out: list[LabelledTheta] = []
    for entry in entries:
        if entry == SHIPPED_LABEL:
            label, path = SHIPPED_LABEL, None
        elif "=" in entry:
            label, path = (x.strip() for x in entry.split("=", 1))
            if not label or not path:
                raise ThetaSpecError(f"{flag} {entry!r}: expected LABEL=PATH")
        else:
            label, path = Path(entry).stem, entry
        if not label.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ThetaSpecError(f"{flag} {entry!r}: label {label!r} must be letters, digits, '-', '_' or '.'")
        if any(t.label == label for t in out):
            raise ThetaSpecError(f"{flag}: label {label!r} given twice")
        try:
            theta = load_theta(path)
        except ThetaNotFoundError as exc:
            if path is None:
                raise ThetaSpecError(
                    f"{flag} shipped: the project has no shipped theta yet "
                    f"({exc}); pass {flag} LABEL=PATH (e.g. {flag} published=theta.state)"
                ) from None
            raise ThetaSpecError(f"{flag} {entry!r}: {exc}") from None
        except (ThetaError, OSError) as exc:
            raise ThetaSpecError(f"{flag} {entry!r}: cannot load {path}: {exc}") from None
        source = "celo2.load_theta() (shipped)" if path is None else str(Path(path).resolve())
        if not theta.variant.is_published:  # the report's theta table names the rule it runs
            source += f" (rule variant {theta.variant.label})"
        out.append(LabelledTheta(label, theta, source))
    return out
