"""A real English text corpus that every Python installation carries.

``pydoc_data.topics.topics`` is the Python reference manual's topic texts
(what ``help("if")`` prints), shipped in the standard library: a few hundred
kilobytes of technical English, available offline, identical for a given
Python version. It serves as a small character-level language-modelling task
with byte tokens (vocabulary 256), so no tokenizer and no download are needed.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
CORPORA = ("python-docs",)
_SEPARATOR = "\n\n"


@functools.lru_cache(maxsize=4)
def _corpus_bytes(name: str) -> bytes:
    if name == "python-docs":
        try:
            from pydoc_data.topics import topics
        except ImportError as exc:  # some distributions strip pydoc_data
            raise FileNotFoundError(
                "text corpus 'python-docs' needs the standard-library module pydoc_data.topics, "
                "which this Python installation lacks; pass the path of a UTF-8 text file instead"
            ) from exc
        # Sorted topic names: a deterministic order, independent of dict order.
        return _SEPARATOR.join(topics[key].strip("\n") for key in sorted(topics)).encode("utf-8")
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"unknown text corpus {name!r}: use one of {', '.join(CORPORA)} or the path of a text file"
        )
    return path.read_bytes()


def load_text_corpus(name: str = "python-docs", val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Byte tokens (uint8, vocabulary :data:`VOCAB_SIZE`) of a corpus, split into train and validation.

    The split is contiguous: the last ``val_fraction`` of the bytes is
    validation, so no text leaks across it. ``name`` is ``"python-docs"`` or a
    path to a text file. Returns fresh arrays on every call.
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    data = _corpus_bytes(os.fspath(name))
    tokens = np.frombuffer(data, dtype=np.uint8)
    if tokens.size < 2:
        raise ValueError(f"text corpus {name!r} is empty")
    n_val = max(1, int(round(tokens.size * float(val_fraction))))
    n_val = min(n_val, tokens.size - 1)
    return tokens[:-n_val].copy(), tokens[-n_val:].copy()
