"""Reader for SVHN, cropped digits (``train_32x32.mat`` / ``test_32x32.mat``).

The MATLAB files hold ``X`` of shape ``(32, 32, 3, N)`` uint8 and ``y`` of
shape ``(N, 1)`` with labels 1..10, where 10 stands for the digit 0; labels
are mapped to 0..9 here so that label == digit.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from celo2.data.errors import DatasetFormatError

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_svhn_mat(path: "str | os.PathLike[str]") -> tuple[np.ndarray, np.ndarray]:
    """One ``.mat`` file -> ``(images uint8 (N, 32, 32, 3), labels int64 (N,) in 0..9)``."""
    import scipy.io  # optional dependency, only for SVHN

    path = Path(path)
    origin = str(path)
    if not path.exists():
        raise FileNotFoundError(origin)
    try:
        mat = scipy.io.loadmat(str(path))
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise DatasetFormatError(f"{origin}: MATLAB v7.3 files are not supported ({exc})") from exc
    except Exception as exc:
        raise DatasetFormatError(f"{origin}: not a readable MATLAB file ({type(exc).__name__}: {exc})") from exc
    for key in ("X", "y"):
        if key not in mat:
            found = ", ".join(k for k in mat if not k.startswith("__"))
            raise DatasetFormatError(f"{origin}: missing variable '{key}' (found: {found})")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"])
    if x.ndim != 4 or x.shape[2] != 3:
        raise DatasetFormatError(f"{origin}: 'X' has shape {x.shape}, expected (H, W, 3, N)")
    if x.dtype != np.uint8:
        raise DatasetFormatError(f"{origin}: 'X' has dtype {x.dtype}, expected uint8")
    y = y.reshape(-1)
    if y.shape[0] != x.shape[3]:
        raise DatasetFormatError(f"{origin}: 'X' holds {x.shape[3]} images but 'y' holds {y.shape[0]} labels")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise DatasetFormatError(f"{origin}: labels must lie in 1..10 (10 = digit 0)")
    labels = y.astype(np.int64) % 10
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    return images, labels


def write_svhn_mat(path: "str | os.PathLike[str]", images: np.ndarray, labels) -> Path:
    """Write ``images`` ``(N, H, W, 3)`` uint8 and digit labels 0..9 in SVHN's layout (for fixtures)."""
    import scipy.io

    images = np.asarray(images, np.uint8)
    y = np.asarray(labels, np.int64).reshape(-1, 1)
    y = np.where(y == 0, 10, y).astype(np.uint8)
    scipy.io.savemat(str(path), {"X": images.transpose(1, 2, 3, 0), "y": y})
    return Path(path)
