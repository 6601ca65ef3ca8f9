"""A byte-level text corpus of the Python standard library's own docstrings, for meta-training.

Built at run time from the ``.py`` files of the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``): every module, class and function docstring,
read with :mod:`ast` (nothing is imported or executed), cleaned by
:func:`ast.get_docstring`, duplicates dropped. Nothing is downloaded; the corpus is
identical for a given Python version.

It is kept apart from the bench's text corpus (:mod:`celo2.data.text`, the reference
manual's topics in ``pydoc_data``): the ``pydoc_data`` package is never read, and a
docstring that would bring in one of the bench corpus's :data:`OVERLAP_WINDOW`-byte passages
starting at a multiple of :data:`OVERLAP_STRIDE` (checked together with the bytes before it,
as passages may span docstrings) is dropped, so the meta-training text holds no passage of the bench's of
``OVERLAP_WINDOW + OVERLAP_STRIDE - 1`` bytes or more. Test packages (``test``,
``tests``, ``idle_test``) and ``site-packages`` are skipped.

Splits are by source file: a file whose relative path hashes (CRC-32) to 0 modulo
:data:`SELECTION_MODULUS` belongs to ``"selection"`` (kept for choosing checkpoints,
never meta-trained on), every other file to ``"train"``. Files are read in the
order of that hash, so a ``max_bytes`` budget takes a spread of the library rather
than its alphabetical head.
"""

from __future__ import annotations

import ast
import functools
import sysconfig
import zlib
from pathlib import Path

import numpy as np

SPLITS = ("train", "selection")
SELECTION_MODULUS = 10
OVERLAP_WINDOW = 64
OVERLAP_STRIDE = 16
DEFAULT_MAX_BYTES = 1 << 20
SKIPPED_DIRECTORIES = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                                 "pydoc_data", "__pycache__"})
_SEPARATOR = "\n\n"


class DocstringCorpusError(ValueError):
    """A bad split, budget or window size, or a standard library without docstrings to read."""


def stdlib_root() -> Path:
    """The folder of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _file_hash(relative: str) -> int:
    return zlib.crc32(relative.encode("utf-8"))


def stdlib_sources(split: str = "train") -> list[tuple[str, Path]]:
    """The standard-library source files of ``split``, as ``(relative path, path)`` in hash order.

    Args:
        split: ``"train"`` or ``"selection"``.

    Returns:
        The files, ordered by the CRC-32 of their relative path (then by the path).

    Raises:
        DocstringCorpusError: an unknown split.
    """
    if split not in SPLITS:
        raise DocstringCorpusError(f"docstring corpus: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    root = stdlib_root()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIPPED_DIRECTORIES & set(rel.parts[:-1]):
            continue
        key = rel.as_posix()
        in_selection = _file_hash(key) % SELECTION_MODULUS == 0
        if in_selection == (split == "selection"):
            out.append((key, path))
    out.sort(key=lambda item: (_file_hash(item[0]), item[0]))
    return out


def docstrings_of_source(source: bytes) -> list[str]:
    """The module, class and function docstrings of one Python source, in file order.

    Args:
        source: The file's bytes (its coding cookie is honoured).

    Returns:
        The cleaned docstrings (:func:`ast.get_docstring`); empty for a file that
        does not parse under this Python.
    """
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc.strip())
    return out


@functools.lru_cache(maxsize=1)
def _bench_windows() -> frozenset[bytes]:
    """Every ``OVERLAP_WINDOW``-byte passage of the bench's corpus starting at a multiple of the stride."""
    from celo2.data.text import load_text_corpus

    try:
        train, val = load_text_corpus("python-docs")
    except FileNotFoundError:  # no pydoc_data: nothing to stay apart from
        return frozenset()
    text = np.concatenate([train, val]).tobytes()
    return frozenset(text[i:i + OVERLAP_WINDOW] for i in range(0, len(text) - OVERLAP_WINDOW + 1, OVERLAP_STRIDE))


def shares_a_bench_passage(text: bytes) -> bool:
    """Whether ``text`` holds one of the bench corpus's stride-aligned ``OVERLAP_WINDOW``-byte passages."""
    windows = _bench_windows()
    return any(text[i:i + OVERLAP_WINDOW] in windows for i in range(len(text) - OVERLAP_WINDOW + 1))


@functools.lru_cache(maxsize=4)
def _corpus(split: str, max_bytes: int) -> bytes:
    seen: set[str] = set()
    out = bytearray()
    separator = _SEPARATOR.encode()
    for _, path in stdlib_sources(split):
        for doc in docstrings_of_source(path.read_bytes()):
            if doc in seen:
                continue
            seen.add(doc)
            piece = (separator if out else b"") + doc.encode("utf-8")
            # A passage may span docstrings: check the piece with the bytes before it.
            if shares_a_bench_passage(bytes(out[-(OVERLAP_WINDOW - 1):]) + piece):
                continue
            out += piece
            if len(out) >= max_bytes:
                return bytes(out[:max_bytes])
    return bytes(out)


def load_docstring_corpus(split: str = "train", max_bytes: int = DEFAULT_MAX_BYTES) -> np.ndarray:
    """Byte tokens (uint8, vocabulary 256) of the standard library's docstrings.

    Args:
        split: ``"train"`` (for meta-training) or ``"selection"`` (held out, for choosing
            checkpoints).
        max_bytes: Stop once this many bytes are gathered (files in hash order); the
            full library gives about 1.8 MB.

    Returns:
        A fresh uint8 array of at most ``max_bytes`` bytes.

    Raises:
        DocstringCorpusError: an unknown split, a budget under two bytes, or no docstring found.
    """
    if int(max_bytes) < 2:
        raise DocstringCorpusError(f"docstring corpus: max_bytes={max_bytes}: must be >= 2")
    data = _corpus(split, int(max_bytes))
    if len(data) < 2:
        raise DocstringCorpusError(
            f"docstring corpus: no docstrings found under {stdlib_root()} for split {split!r}")
    return np.frombuffer(data, dtype=np.uint8).copy()


def byte_windows(tokens: np.ndarray, context: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Next-byte prediction examples: windows of ``context`` bytes and the same windows shifted by one.

    Args:
        tokens: 1-D uint8 bytes.
        context: Bytes per example.
        stride: Bytes between the starts of consecutive windows.

    Returns:
        ``(inputs, targets)``, both uint8 of shape ``(N, context)``; ``targets[i, j]`` is the
        byte after ``inputs[i, j]``.

    Raises:
        DocstringCorpusError: ``context`` or ``stride`` under 1, or fewer than ``context + 1`` bytes.
    """
    tokens = np.asarray(tokens, np.uint8).reshape(-1)
    if context < 1 or stride < 1:
        raise DocstringCorpusError(f"byte windows: context={context}, stride={stride}: both must be >= 1")
    if tokens.size < context + 1:
        raise DocstringCorpusError(f"byte windows: {tokens.size} bytes cannot fill one window of {context} + 1")
    starts = np.arange(0, tokens.size - context, stride)
    offsets = starts[:, None] + np.arange(context)[None, :]
    return tokens[offsets], tokens[offsets + 1]


__all__ = [
    "DEFAULT_MAX_BYTES", "DocstringCorpusError", "OVERLAP_STRIDE", "OVERLAP_WINDOW", "SELECTION_MODULUS",
    "SKIPPED_DIRECTORIES", "SPLITS", "byte_windows", "docstrings_of_source", "load_docstring_corpus",
    "shares_a_bench_passage", "stdlib_root", "stdlib_sources",
]
