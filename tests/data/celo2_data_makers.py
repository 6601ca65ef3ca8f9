"""Makers of tiny datasets in every published format, for the celo2.data tests (written by hand, independently of celo2.data)."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest



def idx_bytes(array: np.ndarray, magic_code: int | None = None) -> bytes:
    """IDX bytes built by hand (independently of celo2.data.idx.write_idx)."""
    array = np.asarray(array, np.uint8)
    code = 0x08 if magic_code is None else magic_code
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_mnist_like(folder: Path, n_train=12, n_test=5, gz=True, seed=0, dotted=False) -> dict:
    """Writes the four IDX files; returns the arrays written (uint8 images, labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[0, 0, 0], images[0, 0, 1] = 0, 255  # pin the range ends
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            if dotted:
                name = name.replace("-idx", ".idx")
            data = idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        out[prefix] = (images, labels)
    return out


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 32, 32, 3) -> the (N, 3072) channel-first rows of the published batches."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))


def write_cifar(folder: Path, n_per_batch=4, seed=0, protocol=2) -> dict:
    """Writes data_batch_1..5 and test_batch (plain dicts with bytes keys, like the published ones)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(n_per_batch, 32, 32, 3), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(folder / name, "wb") as fh:
            pickle.dump({b"batch_label": name.encode(), b"data": cifar_rows(images), b"labels": labels}, fh, protocol=protocol)
        out[name] = (images, np.array(labels))
    return out


def write_svhn(folder: Path, split="train", n=6, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Writes {split}_32x32.mat with X (32, 32, 3, N) and y (N, 1) in 1..10; returns images, digit labels."""
    scipy_io = pytest.importorskip("scipy.io")
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    digits = np.arange(n) % 10
    y = np.where(digits == 0, 10, digits).reshape(-1, 1).astype(np.uint8)
    scipy_io.savemat(str(folder / f"{split}_32x32.mat"), {"X": images.transpose(1, 2, 3, 0), "y": y})
    return images, digits
