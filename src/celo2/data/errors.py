"""Exceptions of :mod:`celo2.data`.

Two kinds, so callers can tell "go and fetch the data" apart from "the file you
have is broken"; both subclass built-ins (``FileNotFoundError`` and
``ValueError``) so generic handlers keep working.
"""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they were looked for (the message lists where)."""


class DatasetFormatError(ValueError):
    """A dataset file exists but is malformed: bad magic number, shape, key or size."""


class DownloadError(OSError):
    """Fetching a dataset failed: network error, truncated transfer or checksum mismatch."""
