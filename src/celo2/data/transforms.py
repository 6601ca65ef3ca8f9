"""Image preprocessing of the meta-training tasks: grey conversion and bilinear resizing.

The paper's tasks are 8x8 greyscale images in [0, 1]: colour images are
averaged over RGB, then every image is resized bilinearly to 8x8.
"""

from __future__ import annotations

import numpy as np


def to_grey(images) -> np.ndarray:
    """``(N, H, W, 3)`` -> ``(N, H, W)`` by the plain mean of R, G and B (the paper's choice,
    not a luminance weighting); grey ``(N, H, W)`` input passes through. Returns float32."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[-1] == 3:
        return images.mean(axis=-1, dtype=np.float32)
    if images.ndim == 4 and images.shape[-1] == 1:
        return images[..., 0].astype(np.float32)
    if images.ndim == 3:
        return images.astype(np.float32, copy=False)
    raise ValueError(f"to_grey expects (N, H, W) or (N, H, W, 3) images, got shape {images.shape}")


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` matrix of 1-D bilinear interpolation weights (rows sum to 1).

    Half-pixel-centre convention: output pixel ``i`` samples the input at
    ``(i + 0.5) * in_size / out_size - 0.5``, clamped to the edge pixels. This
    is the convention of ``tf.image.resize(method="bilinear", antialias=False)``
    and of ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    weights = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def resize_bilinear(images, size: int) -> np.ndarray:
    """``(N, H, W)`` -> ``(N, size, size)`` float32 by separable bilinear interpolation.

    No antialiasing: when shrinking 28x28 to 8x8 each output pixel blends the
    2x2 input pixels around its sample point, exactly what the
    published pipeline's ``tf.image.resize`` default does, so the tasks look
    like the ones theta was meta-trained on. Implemented as two matrix
    products (rows, then columns), so 60,000 MNIST images take well under a second.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"resize_bilinear expects (N, H, W) images, got shape {images.shape}")
    size = int(size)
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    n, h, w = images.shape
    rows = bilinear_matrix(h, size).astype(np.float32)
    cols = bilinear_matrix(w, size).astype(np.float32).T
    out = np.empty((n, size, size), np.float32)
    chunk = 8192  # bounds the float32 temporaries for large uint8 inputs
    for start in range(0, n, chunk):
        block = images[start : start + chunk].astype(np.float32, copy=False)
        out[start : start + chunk] = np.matmul(np.matmul(rows, block), cols)
    return out
