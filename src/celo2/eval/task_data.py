"""The bench's data: 28x28 images and the byte-level corpus, cached per process, and seeded batch orders.

Image tasks read 28x28 Fashion-MNIST (or MNIST) through :mod:`celo2.data`; when no data folder is
given and none is found, they fall back to the built-in scikit-learn digits upsampled to 28x28 and
say so in ``ImageData.source`` (which the report prints).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_DATASETS = ("fashion-mnist", "mnist")


class TaskDataError(RuntimeError):
    """A task's data could not be loaded (the message says which and where)."""


@dataclass
class ImageData:
    train_x: torch.Tensor  # (N, 28, 28) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    source: str


_IMAGE_CACHE: dict[tuple[str, str | None], ImageData] = {}
_TEXT_CACHE: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}


def _upsample28(images: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(images, np.float32))[:, None]
    return F.interpolate(t, size=(28, 28), mode="bilinear", align_corners=False)[:, 0].clamp_(0, 1).numpy()


def resolve_root(data_dir: "str | Path | None") -> "str | None":
    """The data folder actually used: ``data_dir``, else ``$CELO2_DATA_DIR``, else None."""
    from celo2.data import resolve_data_root

    root = resolve_data_root(data_dir)
    return None if root is None else str(Path(root).resolve())


def load_image_data(dataset: str, data_dir: "str | Path | None") -> ImageData:
    """28x28 train/validation images of ``dataset``, cached per process.

    With no data folder at all the task falls back to the built-in digits
    (upsampled); with a folder that lacks the dataset it is an error, so a
    typo in ``--data-dir`` never silently benchmarks on other data.
    """
    if dataset not in IMAGE_DATASETS:
        raise TaskDataError(f"unknown image dataset {dataset!r}; choose one of {', '.join(IMAGE_DATASETS)}")
    key = (dataset, None if data_dir is None else str(data_dir))
    if key in _IMAGE_CACHE:
        return _IMAGE_CACHE[key]
    from celo2.data import load_images

    root = resolve_root(data_dir)
    try:
        tx, ty = load_images(dataset, split="train", root=root)
        vx, vy = load_images(dataset, split="test", root=root)
        source = f"{dataset} 28x28 ({len(ty)} train / {len(vy)} test images) from {root}"
    except FileNotFoundError as exc:
        if root is not None:
            raise TaskDataError(f"data folder {root}: no {dataset} there ({exc})") from exc
        tx, ty = load_images("digits", split="train")
        vx, vy = load_images("digits", split="test")
        tx, vx = _upsample28(tx), _upsample28(vx)
        source = (
            f"BUILT-IN FALLBACK: no data folder given (--data-dir or $CELO2_DATA_DIR), so instead of "
            f"{dataset}: scikit-learn digits (8x8) upsampled bilinearly to 28x28 "
            f"({len(ty)} train / {len(vy)} test)"
        )
    if tuple(tx.shape[1:]) != (28, 28):
        raise TaskDataError(f"{dataset}: expected 28x28 images, got {tuple(tx.shape[1:])}")
    data = ImageData(
        torch.from_numpy(np.ascontiguousarray(tx, np.float32)),
        torch.from_numpy(np.asarray(ty, np.int64)),
        torch.from_numpy(np.ascontiguousarray(vx, np.float32)),
        torch.from_numpy(np.asarray(vy, np.int64)),
        source,
    )
    _IMAGE_CACHE[key] = data
    return data


def load_text() -> tuple[np.ndarray, np.ndarray, str]:
    """The project's offline byte-level corpus (train, val, description)."""
    if "text" not in _TEXT_CACHE:
        from celo2.data import load_text_corpus

        train, val = load_text_corpus()
        train = np.asarray(train, np.uint8)
        val = np.asarray(val, np.uint8)
        desc = f"celo2.data.load_text_corpus(): byte-level, {len(train):,} train / {len(val):,} val bytes"
        _TEXT_CACHE["text"] = (train, val, desc)
    return _TEXT_CACHE["text"]


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` example indices: epochs of seeded permutations, fixed by ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A]))
    need = steps * batch_size
    chunks, have = [], 0
    while have < need:
        chunks.append(rng.permutation(n))
        have += n
    return np.concatenate(chunks)[:need].reshape(steps, batch_size)
