"""Image datasets that need no download: scikit-learn's digits and a generated family.

``digits``: the 1,797 8x8 handwritten digits bundled with scikit-learn (UCI
"optical recognition of handwritten digits"), values 0..16 scaled to [0, 1].
The split is a fixed permutation (seed 0): 1,437 train, 360 test.

``synthetic``: a generated 8x8, 10-class problem, deterministic for its seed.
Each class has a prototype made of three random Gaussian blobs. A sample is
its class prototype shifted by up to one pixel in each direction, blended
with a random *other* class's prototype (weight up to 0.45), scaled in
contrast and overlaid with pixel noise (std 0.12), then clipped to [0, 1].
Shifts and blending make the classes overlap, so a linear model stays well
below what an MLP reaches and nothing reaches 100% (scikit-learn, 8x8 pixels
as features: logistic regression about 68% test accuracy, a 64-unit MLP
about 86%): a task an MLP can learn, but not trivially. 10,000 train and 2,000 test images (different random
streams, same prototypes).
"""

from __future__ import annotations

import numpy as np

DIGITS_TEST_SIZE = 360
DIGITS_SPLIT_SEED = 0
SYNTHETIC_SEED = 0
SYNTHETIC_SIZES = {"train": 10_000, "test": 2_000}
SYNTHETIC_CLASSES = 10
_SIDE = 8


def load_digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: ``(N, 8, 8)`` float32 in [0, 1], int64 labels."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the 'digits' dataset needs scikit-learn: pip install 'celo2[data]'"
        ) from exc
    bunch = sk_load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(labels))
    idx = order[DIGITS_TEST_SIZE:] if split == "train" else order[:DIGITS_TEST_SIZE]
    return images[idx], labels[idx]


def _prototypes(rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:_SIDE, 0:_SIDE].astype(np.float64)
    protos = np.zeros((SYNTHETIC_CLASSES, _SIDE, _SIDE))
    for c in range(SYNTHETIC_CLASSES):
        for _ in range(3):
            cy, cx = rng.uniform(1.0, _SIDE - 2.0, size=2)
            sy, sx = rng.uniform(0.7, 1.8, size=2)
            amp = rng.uniform(0.5, 1.0)
            protos[c] += amp * np.exp(-0.5 * (((yy - cy) / sy) ** 2 + ((xx - cx) / sx) ** 2))
        protos[c] /= protos[c].max()
    return protos


def _shifted(protos: np.ndarray) -> np.ndarray:
    """``(classes, 9, 8, 8)``: every prototype moved by dy, dx in {-1, 0, 1}, zero-filled."""
    padded = np.pad(protos, ((0, 0), (1, 1), (1, 1)))
    return np.stack(
        [padded[:, 1 + dy : 1 + dy + _SIDE, 1 + dx : 1 + dx + _SIDE] for dy in (-1, 0, 1) for dx in (-1, 0, 1)],
        axis=1,
    )


def make_synthetic(n: int, seed: int = SYNTHETIC_SEED, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of the synthetic problem (prototypes from ``seed``, samples from ``stream``)."""
    root = np.random.SeedSequence([seed, 0x5EED])
    protos = _shifted(_prototypes(np.random.default_rng(root)))
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A, stream]))
    labels = rng.permutation(np.arange(n) % SYNTHETIC_CLASSES).astype(np.int64)
    other = (labels + rng.integers(1, SYNTHETIC_CLASSES, size=n)) % SYNTHETIC_CLASSES
    shift_a = rng.integers(0, 9, size=n)
    shift_b = rng.integers(0, 9, size=n)
    mix = rng.uniform(0.0, 0.45, size=(n, 1, 1))
    contrast = rng.uniform(0.6, 1.0, size=(n, 1, 1))
    noise = rng.normal(0.0, 0.12, size=(n, _SIDE, _SIDE))
    images = contrast * ((1.0 - mix) * protos[labels, shift_a] + mix * protos[other, shift_b]) + noise
    return np.clip(images, 0.0, 1.0).astype(np.float32), labels


def load_synthetic(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The ``synthetic`` dataset's split (see the module docstring)."""
    return make_synthetic(SYNTHETIC_SIZES[split], SYNTHETIC_SEED, stream=0 if split == "train" else 1)
