"""Fetching the published dataset files, for users with a network.

Nothing in celo2 downloads implicitly: :func:`download_dataset` is called on
purpose and writes ``root/<name>/``, the layout :func:`celo2.data.load_images`
reads. Every file is streamed to a temporary file beside its target and moved
into place with ``os.replace`` only once it is complete and checked, so an
interrupted download never leaves a half-written file that would later be
mistaken for data. Checks: the byte count against ``Content-Length``, the
published MD5 when fetching from the default URLs (a mirror given as
``base_url`` may recompress, so there only the structure is checked), and
the structure of every file (IDX header, MATLAB header and variables, the
CIFAR archive's members).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from celo2.data.errors import DatasetFormatError, DownloadError
from celo2.data.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, parse_idx, read_bytes_maybe_gzip
from celo2.data.names import BUILTIN_DATASETS, canonical_name

TIMEOUT_S = 60.0
_CHUNK = 1 << 20
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_MEMBERS = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)


@dataclass(frozen=True)
class Source:
    """Where a dataset is published: base URLs tried in order, file names and their MD5."""

    base_urls: tuple[str, ...]
    files: dict[str, str] = field(default_factory=dict)


# Base URLs: the publisher's own address first, then a widely used mirror of
# the identical files (yann.lecun.com often refuses automated downloads).
SOURCES: dict[str, Source] = {
    "mnist": Source(
        ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/"),
        {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": Source(
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "cifar10": Source(
        ("https://www.cs.toronto.edu/~kriz/",),
        {CIFAR_ARCHIVE: "c58f30108f718f92721af3b95e74349a"},
    ),
    "svhn": Source(
        ("http://ufldl.stanford.edu/housenumbers/",),
        {
            "train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
            "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3",
        },
    ),
}


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


# -- structural checks ---------------------------------------------------------------
def _check_idx(path: Path, origin: str) -> None:
    magic = IDX_IMAGES_MAGIC if "-images" in origin.rsplit("/", 1)[-1] else IDX_LABELS_MAGIC
    parse_idx(read_bytes_maybe_gzip(path), origin=origin, expected_magic=magic)


def _check_mat(path: Path, origin: str) -> None:
    with open(path, "rb") as fh:
        head = fh.read(128)
    if not head.startswith(b"MATLAB"):
        raise DatasetFormatError(f"{origin}: not a MATLAB .mat file (header {head[:20]!r})")
    try:
        import scipy.io
    except ImportError:  # pragma: no cover - the header check is all we can do
        return
    try:
        names = {entry[0] for entry in scipy.io.whosmat(str(path))}
    except Exception as exc:
        raise DatasetFormatError(f"{origin}: unreadable MATLAB file ({type(exc).__name__}: {exc})") from exc
    missing = {"X", "y"} - names
    if missing:
        raise DatasetFormatError(f"{origin}: missing variable(s) {', '.join(sorted(missing))}")


def _check_cifar_archive(path: Path, origin: str) -> None:
    try:
        with tarfile.open(path, "r:*") as tar:
            names = set(tar.getnames())
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetFormatError(f"{origin}: not a readable tar archive ({exc})") from exc
    missing = [m for m in CIFAR_MEMBERS if f"{CIFAR_FOLDER}/{m}" not in names]
    if missing:
        raise DatasetFormatError(f"{origin}: archive lacks {CIFAR_FOLDER}/{', '.join(missing)}")


def _checker(filename: str):
    if filename.endswith(".tar.gz"):
        return _check_cifar_archive
    if filename.endswith(".mat"):
        return _check_mat
    return _check_idx


# -- transfer -------------------------------------------------------------------------
def _fetch(url: str, target: Path, md5: str | None, progress: bool) -> None:
    """Stream ``url`` into ``target`` atomically; raise DownloadError/DatasetFormatError on failure."""
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        request = urllib.request.Request(url, headers={"User-Agent": "celo2-data"})
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            from tqdm.auto import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name, disable=not progress, leave=False) as bar:
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DownloadError(f"{url}: truncated transfer, received {received} of {total} bytes")
        if received == 0:
            raise DownloadError(f"{url}: empty response")
        if md5 is not None and digest.hexdigest() != md5:
            raise DownloadError(f"{url}: MD5 {digest.hexdigest()} does not match the published {md5}")
        _checker(target.name)(tmp, str(target))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fetch_any(bases: Sequence[str], filename: str, target: Path, md5: str | None, progress: bool) -> None:
    errors = []
    for base in bases:
        url = base.rstrip("/") + "/" + filename
        _say(progress, f"downloading {url} -> {target}")
        try:
            _fetch(url, target, md5, progress)
            return
        except (DownloadError, DatasetFormatError, urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            errors.append(f"{url}: {exc}" if url not in str(exc) else str(exc))
    raise DownloadError(f"could not download {target}:\n  " + "\n  ".join(errors))


def _extract_cifar(archive: Path, dest: Path) -> None:
    """Extract the regular files under ``cifar-10-batches-py/`` (and nothing else) into ``dest``."""
    final = dest / CIFAR_FOLDER
    staging = Path(tempfile.mkdtemp(dir=dest, prefix=".cifar-extract."))
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not member.isfile() or len(parts) != 2 or parts[0] != CIFAR_FOLDER or parts[1] in ("..", "."):
                    continue
                source = tar.extractfile(member)
                if source is None:
                    continue
                with source, open(staging / parts[1], "wb") as out:
                    shutil.copyfileobj(source, out, _CHUNK)
        final.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, final / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def download_dataset(
    name: str,
    root: "str | os.PathLike[str]",
    base_url: "str | Sequence[str] | None" = None,
    progress: bool = True,
) -> Path:
    """Fetch the published files of ``name`` (mnist, fashion-mnist, cifar10, svhn) into ``root/<name>/``.

    Files already present are kept. ``base_url`` replaces the default
    addresses (a string, or several tried in order), e.g. a local mirror.
    CIFAR-10's archive is unpacked to ``root/cifar10/cifar-10-batches-py/``
    and then deleted. Returns ``root/<name>``.
    """

    key = canonical_name(name)
    if key in BUILTIN_DATASETS:
        raise ValueError(f"dataset {key!r} is built in; there is nothing to download")
    source = SOURCES[key]
    if base_url is None:
        bases, verify = source.base_urls, True
    else:
        bases = (base_url,) if isinstance(base_url, (str, os.PathLike)) else tuple(base_url)
        bases, verify = tuple(os.fspath(b) for b in bases), False
        if not bases:
            raise ValueError("base_url is an empty sequence")
    dest = Path(root).expanduser() / key
    dest.mkdir(parents=True, exist_ok=True)

    if key == "cifar10":
        final = dest / CIFAR_FOLDER
        if all((final / m).is_file() for m in CIFAR_MEMBERS):
            _say(progress, f"{final}: already present, skipping")
            return dest
        archive = dest / CIFAR_ARCHIVE
        if not archive.is_file():
            _fetch_any(bases, CIFAR_ARCHIVE, archive, source.files[CIFAR_ARCHIVE] if verify else None, progress)
        _extract_cifar(archive, dest)
        archive.unlink()
        return dest

    for filename, md5 in source.files.items():
        target = dest / filename
        if target.is_file() and target.stat().st_size > 0:
            _say(progress, f"{target}: already present, skipping")
            continue
        _fetch_any(bases, filename, target, md5 if verify else None, progress)
    return dest
