"""Reader for CIFAR-10, "python version" (``cifar-10-batches-py``).

Each batch is a pickled dict with ``b"data"`` (``(N, 3072)`` uint8: three
32x32 planes, red, green, blue, channel-first) and ``b"labels"`` (N ints in
0..9). The pickles are read with a restricted unpickler that only admits the
few numpy globals such a file needs, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np

from celo2.data.errors import DatasetFormatError

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("test_batch",)
IMAGE_SHAPE = (32, 32, 3)
_ROW = 32 * 32 * 3

#: Globals a CIFAR pickle (Python 2 or 3 protocol, numpy 1 or 2) may reference.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    """Admits numpy arrays and plain containers only."""

    def __init__(self, file, origin: str):
        super().__init__(file, encoding="bytes")
        self._origin = origin

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise DatasetFormatError(
                f"{self._origin}: refusing to unpickle '{module}.{name}' "
                "(a CIFAR batch holds only numpy arrays and lists)"
            )
        return super().find_class(module, name)


def _get(batch: dict, key: str, origin: str):
    for candidate in (key.encode(), key):
        if candidate in batch:
            return batch[candidate]
    keys = ", ".join(repr(k) for k in list(batch)[:8])
    raise DatasetFormatError(f"{origin}: missing key b'{key}' (keys found: {keys})")


def read_cifar_batch(path: "str | os.PathLike[str]") -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> ``(images uint8 (N, 32, 32, 3), labels int64 (N,))``."""
    path = Path(path)
    origin = str(path)
    try:
        with open(path, "rb") as fh:
            batch = _SafeUnpickler(io.BufferedReader(fh), origin).load()
    except FileNotFoundError:
        raise
    except DatasetFormatError:
        raise
    except Exception as exc:  # pickle raises many kinds on garbage input
        raise DatasetFormatError(f"{origin}: not a CIFAR-10 python batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(batch, dict):
        raise DatasetFormatError(f"{origin}: expected a pickled dict, found {type(batch).__name__}")
    data = np.asarray(_get(batch, "data", origin))
    labels = np.asarray(_get(batch, "labels", origin))
    if data.ndim != 2 or data.shape[1] != _ROW:
        raise DatasetFormatError(f"{origin}: b'data' has shape {data.shape}, expected (N, {_ROW})")
    if data.dtype != np.uint8:
        raise DatasetFormatError(f"{origin}: b'data' has dtype {data.dtype}, expected uint8")
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DatasetFormatError(
            f"{origin}: {data.shape[0]} images but b'labels' has shape {labels.shape}"
        )
    if labels.size and (not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > 9):
        raise DatasetFormatError(f"{origin}: labels must be integers in 0..9")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def read_cifar_split(folder: "str | os.PathLike[str]", split: str) -> tuple[np.ndarray, np.ndarray]:
    """All batches of ``split`` ("train": data_batch_1..5, "test": test_batch) in ``folder``, concatenated."""
    folder = Path(folder)
    names = TRAIN_BATCHES if split == "train" else TEST_BATCHES
    parts = [read_cifar_batch(folder / n) for n in names]
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
    )


def write_cifar_batch(path: "str | os.PathLike[str]", images: np.ndarray, labels) -> Path:
    """Write ``images`` ``(N, 32, 32, 3)`` uint8 and ``labels`` as a CIFAR batch (for fixtures)."""
    path = Path(path)
    images = np.asarray(images, np.uint8)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), _ROW)
    with open(path, "wb") as fh:
        pickle.dump({b"batch_label": b"fixture", b"data": rows, b"labels": [int(x) for x in labels]}, fh, protocol=2)
    return path
