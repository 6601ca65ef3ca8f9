"""Image-classification datasets of the Celo2 task set, read from their published formats.

``load_images`` returns a dataset at full resolution; ``load_task_images``
gives the meta-training view (grey, resized bilinearly to 8x8, flattened,
[0, 1]). Downloaded datasets live under one data root, found as: an explicit
``root`` argument, else ``$CELO2_DATA_DIR``; nothing is ever fetched
implicitly (see :func:`celo2.data.download_dataset`).

Layout under the data root (a few common variants are accepted too)::

    mnist/            train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
                      t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz  (or not gzipped)
    fashion-mnist/    same file names as mnist/
    cifar-10-batches-py/  (or cifar10/cifar-10-batches-py/) data_batch_1..5, test_batch
    svhn/             train_32x32.mat  test_32x32.mat
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np

from celo2.data import builtin, cifar, svhn
from celo2.data.errors import DatasetFormatError, DatasetNotFoundError
from celo2.data.idx import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx
from celo2.data.names import BUILTIN_DATASETS, DATASETS, FILE_DATASETS, canonical_name
from celo2.data.transforms import resize_bilinear, to_grey

DATA_ENV_VAR = "CELO2_DATA_DIR"
SPLITS = ("train", "test")
#: Folders (relative to the data root) searched for each IDX dataset, in order.
_IDX_FOLDERS = {
    "mnist": ("mnist", "MNIST", "mnist/raw", "MNIST/raw"),
    "fashion-mnist": (
        "fashion-mnist",
        "fashion_mnist",
        "FashionMNIST",
        "fashion-mnist/raw",
        "FashionMNIST/raw",
    ),
}
_CIFAR_FOLDERS = (
    "cifar-10-batches-py",
    "cifar10/cifar-10-batches-py",
    "cifar10",
    "cifar-10/cifar-10-batches-py",
    "CIFAR10/cifar-10-batches-py",
)
_SVHN_FOLDERS = ("svhn", "SVHN", ".")


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return split


def resolve_data_root(root: "str | os.PathLike[str] | None" = None) -> Path | None:
    """The data root: an explicit ``root``, else ``$CELO2_DATA_DIR``, else ``None``."""
    if root is not None and str(root) != "":
        return Path(root).expanduser()
    env = os.environ.get(DATA_ENV_VAR, "").strip()
    return Path(env).expanduser() if env else None


def _require_root(name: str, root) -> Path:
    resolved = resolve_data_root(root)
    if resolved is None:
        raise DatasetNotFoundError(
            f"dataset {name!r} is read from files and no data folder was given: pass "
            f"--data-dir DIR (root=DIR in Python) or set the environment variable "
            f"{DATA_ENV_VAR}=DIR. To fetch it: python -c \"import celo2.data as d; "
            f"d.download_dataset('{name}', 'DIR')\". Built-in datasets needing no files: "
            f"{', '.join(BUILTIN_DATASETS)}."
        )
    if not resolved.is_dir():
        raise DatasetNotFoundError(f"data folder {resolved} does not exist (dataset {name!r})")
    return resolved


def _not_found(name: str, root: Path, looked: list[str], hint: str) -> DatasetNotFoundError:
    where = "\n  ".join(looked)
    return DatasetNotFoundError(
        f"dataset {name!r} not found under {root}. Looked for {hint} in:\n  {where}\n"
        f"Fetch it with celo2.data.download_dataset('{name}', '{root}')."
    )


def _find_idx_file(folder: Path, stem: str) -> Path | None:
    # Published names use "-idx3-ubyte"; some mirrors write "train-images.idx3-ubyte".
    variants = [stem, stem.replace("-idx", ".idx")]
    for base in variants:
        for suffix in (".gz", ""):
            path = folder / (base + suffix)
            if path.is_file():
                return path
    return None


def _load_idx_dataset(name: str, split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    image_stem, label_stem = f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"
    looked = []
    for rel in _IDX_FOLDERS[name]:
        folder = root / rel
        looked.append(str(folder))
        images_path = _find_idx_file(folder, image_stem)
        labels_path = _find_idx_file(folder, label_stem)
        if images_path is None and labels_path is None:
            continue
        if images_path is None or labels_path is None:
            missing = image_stem if images_path is None else label_stem
            raise DatasetNotFoundError(f"{folder}: found one file of the {split} split but not {missing}[.gz]")
        images = read_idx(images_path, IDX_IMAGES_MAGIC)
        labels = read_idx(labels_path, IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise DatasetFormatError(
                f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
            )
        if labels.size and labels.max() > 9:
            raise DatasetFormatError(f"{labels_path}: labels must lie in 0..9, found {labels.max()}")
        return images, labels.astype(np.int64)
    raise _not_found(name, root, looked, f"{image_stem}[.gz] and {label_stem}[.gz]")


def _load_cifar(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    names = cifar.TRAIN_BATCHES if split == "train" else cifar.TEST_BATCHES
    looked = []
    for rel in _CIFAR_FOLDERS:
        folder = root / rel
        looked.append(str(folder))
        present = [n for n in names if (folder / n).is_file()]
        if not present:
            continue
        if len(present) != len(names):
            missing = ", ".join(n for n in names if n not in present)
            raise DatasetNotFoundError(f"{folder}: incomplete CIFAR-10 {split} split, missing {missing}")
        return cifar.read_cifar_split(folder, split)
    raise _not_found("cifar10", root, looked, ", ".join(names))


def _load_svhn(split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    filename = svhn.FILES[split]
    looked = []
    for rel in _SVHN_FOLDERS:
        path = root / rel / filename
        looked.append(os.path.normpath(path.parent))
        if path.is_file():
            return svhn.read_svhn_mat(path)
    raise _not_found("svhn", root, looked, filename)


def _load_raw(name: str, split: str, root) -> tuple[np.ndarray, np.ndarray, float]:
    """Images in their stored dtype, labels, and the divisor that maps pixels to [0, 1]."""
    if name == "digits":
        images, labels = builtin.load_digits(split)
        return images, labels, 1.0
    if name == "synthetic":
        images, labels = builtin.load_synthetic(split)
        return images, labels, 1.0
    folder = _require_root(name, root)
    if name in _IDX_FOLDERS:
        images, labels = _load_idx_dataset(name, split, folder)
    elif name == "cifar10":
        images, labels = _load_cifar(split, folder)
    else:
        images, labels = _load_svhn(split, folder)
    return images, labels, 255.0


def load_images(
    name: str, split: str = "train", root: "str | os.PathLike[str] | None" = None
) -> tuple[np.ndarray, np.ndarray]:
    """A dataset at full resolution.

    Returns images float32 in [0, 1], ``(N, H, W)`` grey or ``(N, H, W, 3)``
    colour, and labels int64 ``(N,)``. ``name`` is one of :data:`DATASETS`;
    file datasets are read under ``root`` (or ``$CELO2_DATA_DIR``).
    """
    key = canonical_name(name)
    _check_split(split)
    images, labels, scale = _load_raw(key, split, root)
    out = images.astype(np.float32)
    if scale != 1.0:
        out *= np.float32(1.0 / scale)
    return out, labels


def load_task_images(
    name: str, split: str = "train", root: "str | os.PathLike[str] | None" = None, size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """The meta-training view: grey, bilinearly resized to ``size`` x ``size``, flattened.

    Returns ``(N, size*size)`` float32 in [0, 1] and int64 labels. Results are
    cached in memory (meta-training asks for the same data over and over);
    every call returns fresh copies, so callers may modify them freely.
    """
    key = canonical_name(name)
    _check_split(split)
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    resolved = None if key in BUILTIN_DATASETS else str(_require_root(key, root).resolve())
    images, labels = _task_images_cached(key, split, resolved, size)
    return images.copy(), labels.copy()


@functools.lru_cache(maxsize=32)
def _task_images_cached(name: str, split: str, root: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    raw, labels, scale = _load_raw(name, split, root)
    out = np.empty((len(raw), size * size), np.float32)
    chunk = 10_000  # colour datasets stay small in memory while being converted
    for start in range(0, len(raw), chunk):
        grey = to_grey(raw[start : start + chunk])
        small = resize_bilinear(grey, size) * np.float32(1.0 / scale)
        out[start : start + chunk] = small.reshape(len(small), -1)
    np.clip(out, 0.0, 1.0, out=out)
    return out, labels


def clear_cache() -> None:
    """Forget the images cached by :func:`load_task_images`."""
    _task_images_cached.cache_clear()


__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS",
    "DATA_ENV_VAR",
    "FILE_DATASETS",
    "SPLITS",
    "canonical_name",
    "clear_cache",
    "load_images",
    "load_task_images",
    "resize_bilinear",
    "resolve_data_root",
    "to_grey",
]
