"""Where a theta comes from and where it goes: files, the Hugging Face Hub, the shipped theta.

:func:`load_theta` turns whatever names a theta (a path, a folder, an
``hf://`` URL, a mapping, nothing for the shipped one) into a validated
:class:`~celo2.rule.theta.Theta`; :func:`save_theta` writes one atomically in
the format its extension names. The rule itself (:mod:`celo2.rule`) knows
nothing of files; this package sits above it and below the front ends:

* :mod:`celo2.theta_files.formats`: the bytes of each format, read with bounds
  on every size (flax msgpack ``.state``, the project's ``.npz``, PyLO's ``.pt``);
* :mod:`celo2.theta_files.hub`: ``hf://`` URLs and their download.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from celo2._io import atomic_write_bytes
from celo2.rule.theta import Theta, ThetaError, validated_arrays
from celo2.theta_files import formats, hub

__all__ = ["ThetaNotFoundError", "default_theta_path", "load_theta", "save_theta"]

#: The file name of the theta shipped in ``celo2/assets``.
_DEFAULT_ASSET = "celo2_theta.state"


class ThetaNotFoundError(FileNotFoundError):
    """No theta where one was asked for."""


def default_theta_path() -> Path:
    """Where the project's own meta-trained theta is shipped inside the package.

    Returns:
        The path of ``celo2/assets/celo2_theta.state`` (it may be absent from a stripped install).
    """
    return Path(__file__).resolve().parent.parent / "assets" / _DEFAULT_ASSET


def _load_shipped() -> Theta:
    """The shipped theta, checked against the ``theta_sha256`` that its JSON record holds."""
    path = default_theta_path()
    if not path.exists():
        raise ThetaNotFoundError(
            "this installation of celo2 ships no default theta. Pass a theta file: "
            "load_theta('path/to/theta.state') (the authors' checkpoint, e.g. "
            "'hf://amoudgl/celo2'), or meta-train one with 'celo2 meta-train'."
        )
    theta = load_theta(path)
    meta_path = path.with_suffix(".json")
    if meta_path.exists():
        try:
            record = json.loads(formats.read_theta_bytes(meta_path).decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise ThetaError(f"{meta_path}: malformed JSON record of the shipped theta ({exc!s:.200})") from exc
        if not isinstance(record, dict):
            raise ThetaError(f"{meta_path}: the record of the shipped theta is not a JSON object")
        recorded = record.get("theta_sha256")
        if recorded is not None and recorded != theta.checksum():
            raise ThetaError(
                f"{path}: the shipped theta hashes to {theta.checksum()}, its record {meta_path.name} says "
                f"{recorded}: the installed file is corrupted (reinstall celo2)"
            )
        theta.metadata.update(record)
    theta.metadata["source"] = "celo2 (shipped)"
    return theta


def load_theta(source: "str | os.PathLike[str] | Theta | Mapping[str, Any] | None" = None) -> Theta:
    """Load a theta from a file, a mapping, an ``hf://owner/repo[/file][@revision]`` URL, or the default.

    With no argument this returns the project's own meta-trained theta shipped in
    the package, checked against the checksum its JSON record holds. The format of
    a file is detected from its contents (and its extension where contents are
    ambiguous). Every parser is bounded (file and member sizes, declared array
    sizes, nesting), and anything malformed raises :class:`ThetaError`.

    What each format can detect: the project's ``.npz`` (format ``celo2-theta-v2``)
    carries a SHA-256 of its content, so any changed weight or metadata byte
    raises; older ``celo2-theta-v1`` and plain ``.npz`` files, and PyLO ``.pt``
    files, are protected by zip's per-member CRC-32 only, which catches accidental
    damage but not an edit written back with a fresh CRC. The authors' flax
    ``.state`` has no checksum: a flipped weight byte that keeps the value finite
    loads as a different theta; damage to its structure raises. Details:
    ``docs/theta-files.md``.

    Args:
        source: A path to a ``.state``, ``.npz`` or ``.pt`` file, or to a folder holding
            ``theta.state``; an ``hf://owner/repo[/path/in/repo][@revision]`` URL (file
            ``theta.state`` by default); a :class:`Theta` (returned as is); a mapping of
            theta keys to arrays; or ``None`` (default) for the shipped theta.

    Returns:
        The validated theta; ``metadata["source"]`` says where it came from.

    Raises:
        ThetaNotFoundError: The file, the folder's theta or the shipped theta does not exist.
        ThetaError: The source is malformed, truncated, corrupted, too large, of an unknown
            format, or (``hf://``) cannot be fetched; the message names the file and the problem.
    
    Example:
        >>> import celo2
        >>> theta = celo2.load_theta()            # the shipped theta
        >>> theta.metadata["source"]
        'celo2 (shipped)'
        >>> celo2.load_theta("no/such/theta.state")
        Traceback (most recent call last):
        ...
        celo2.theta_files.ThetaNotFoundError: theta file not found: no/such/theta.state
    """
    if source is None:
        return _load_shipped()
    if isinstance(source, Theta):
        return source
    if isinstance(source, Mapping):
        return Theta(validated_arrays(dict(source), "mapping"))
    text = os.fspath(source)
    if text.startswith(hub.SCHEME):
        return load_theta(hub.download_from_hub(text))
    path = Path(text).expanduser()
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as exc:  # e.g. a name too long, or a NUL byte in it
        raise ThetaError(f"{text!r:.200}: not a usable theta path ({exc})") from exc
    if not exists:
        raise ThetaNotFoundError(f"theta file not found: {path}")
    if is_dir:
        for candidate in (path / hub.DEFAULT_FILENAME, path / _DEFAULT_ASSET):
            if candidate.exists():
                return load_theta(candidate)
        raise ThetaNotFoundError(f"{path}: a folder without a {hub.DEFAULT_FILENAME} file")
    return formats.theta_from_file(path)



def save_theta(theta: "Theta | Mapping[str, Any]", path: "str | os.PathLike[str]", format: str | None = None) -> Path:
    """Write ``theta`` atomically (a reader sees the old file or the whole new one).

    Formats: ``.state``/``.msgpack`` (or ``format="flax"``): the authors' flax msgpack,
    byte for byte what ``flax.serialization.to_bytes`` writes, with no checksum;
    ``.npz`` (``"npz"``): the project's own, format ``celo2-theta-v2`` with the metadata
    and a SHA-256 of the content that :func:`load_theta` verifies; ``.pt``/``.pth``
    (``"pylo"``): a PyLO-style PyTorch ``state_dict``, guarded by zip's CRC-32 only.
    What each can detect when damaged is in ``docs/theta-files.md``.

    Args:
        theta: A :class:`Theta`, or a mapping of theta keys to arrays.
        path: The file to write; its folder is created if missing.
        format: ``"flax"``, ``"npz"`` or ``"pylo"``; ``None`` (default) follows the extension of ``path``.

    Returns:
        The path written.

    Raises:
        ThetaError: ``theta`` is malformed, ``path`` is an existing folder or lies under a
            file, or the format cannot be told from ``format`` or the extension.
        OSError: The file cannot be written (e.g. a parent is a file, or no permission).

    Example:
        >>> import tempfile, celo2
        >>> folder = tempfile.mkdtemp()
        >>> path = celo2.save_theta(celo2.Theta.init(seed=1), f"{folder}/mine.npz")
        >>> celo2.load_theta(path).allclose(celo2.Theta.init(seed=1))
        True
    """
    theta = load_theta(theta) if not isinstance(theta, Theta) else theta
    path = Path(path).expanduser()
    if path.is_dir():
        raise ThetaError(f"{path}: is a folder; give the file to write, e.g. {path / 'theta.state'}")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ThetaError(f"{path}: cannot be written, {blocking} is a file, not a folder")
    writer = formats.WRITERS.get(format or formats.FORMAT_OF_SUFFIX.get(path.suffix.lower(), ""))
    if writer is None:
        raise ThetaError(
            f"{path}: cannot tell the theta format from the extension {path.suffix!r}; "
            "use .state (authors' flax msgpack), .npz (celo2) or .pt (PyLO), or pass format="
        )
    atomic_write_bytes(path, writer(theta))
    return path
