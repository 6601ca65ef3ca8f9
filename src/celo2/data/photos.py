"""Task families built from real photographs: 8x8 grey, 10-way, with natural-image statistics.

They stand in for CIFAR-10 and SVHN (grey, 8x8) where those files are not at
hand, and are built at run time from the photographs that scikit-image's wheel
ships in ``skimage/data/`` (and its ``lfw_subset.npy`` face crops); nothing is
downloaded.

The split of photographs is written down once, here:

* :data:`META_TRAIN_PHOTOS` (and the LFW crops) are the only pictures the
  families below ever read; they are for meta-training.
* :data:`HELD_OUT_PHOTOS` are never read by these families: they are kept for
  evaluation (a bench or validation task may use them, and must use no
  picture of :data:`META_TRAIN_PHOTOS`). The two motorcycle views are a stereo
  pair of one scene, so both sit on the same side.

Families (each ``train`` and ``test`` split is its own random stream of the
same generator, so test images are new crops of the same distribution):

``photo-patches``
    Which of the ten meta-training photographs a patch comes from. A patch is
    a square crop of side log-uniform in ``[16, 160]`` pixels at a uniform
    position, area-averaged to 8x8, under a random flip/rotation (the 8
    symmetries of the square), its mean moved by up to 0.15, its contrast
    scaled by a factor log-uniform in [1/1.5, 1.5] and pixel noise (std 0.03)
    added, so that neither orientation nor exact brightness names the
    photograph (the CIFAR-10 stand-in: "what is in the picture").
``photo-faces``
    Where a face is: a 48x48 background (a crop of side log-uniform in
    [48, 192] of a meta-training photograph, under a random symmetry) with one
    LFW crop pasted at one of nine cells of a 3x3 grid, jittered by up to 4
    pixels; the crop is rescaled to 16x16 and given the background's mean and
    0.5..1 times its contrast. Classes 0..8 are the cell of a face, class 9 a
    non-face LFW crop pasted at a random cell; the canvas is area-averaged to
    8x8 and jittered like ``photo-patches`` (the SVHN stand-in: an object in
    clutter).

Both are deterministic for a seed (:data:`PHOTO_SEED` by default) and
have :data:`PHOTO_SIZES` images per split.
"""

from __future__ import annotations

import functools
import os

import numpy as np

#: The photographs the families read (all meta-training). Ten: one class each in ``photo-patches``.
META_TRAIN_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png",
    "coins.png", "grass.png", "gravel.png", "moon.png", "rocket.jpg",
)
#: Photographs reserved for evaluation: no meta-training family reads them. ``china.jpg`` and
#: ``flower.jpg`` are scikit-learn's two sample images; the rest are in ``skimage/data/``.
HELD_OUT_PHOTOS = (
    "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg",
    "china.jpg", "flower.jpg",
)
#: The LFW crops of ``skimage/data/lfw_subset.npy``: the first 100 are faces, the next 100 are not.
LFW_FILE = "lfw_subset.npy"
LFW_FACES = 100

PHOTO_FAMILIES = ("photo-patches", "photo-faces")
PHOTO_SEED = 0
PHOTO_SIZES = {"train": 30_000, "test": 5_000}
NUM_CLASSES = 10

_FAMILY_IDS = {name: i for i, name in enumerate(PHOTO_FAMILIES)}
_PATCH_SIDES = (16.0, 160.0)
_CANVAS, _FACE, _FACE_JITTER = 48, 16, 4
_FACE_CONTRAST = (0.5, 1.0)
_NOISE_STD = 0.03
_GAIN, _SHIFT = 1.5, 0.15


def _skimage_data_dir() -> str:
    try:
        import skimage
    except ImportError as exc:
        raise ImportError(
            "the photo task families (photo-patches, photo-faces) need scikit-image: "
            "pip install 'celo2[photos]'"
        ) from exc
    return os.path.join(os.path.dirname(skimage.__file__), "data")


def _read_photo(name: str) -> np.ndarray:
    """One photograph of the split as a float64 grey ``(H, W)`` array in [0, 1]."""
    if name not in META_TRAIN_PHOTOS:
        # Held-out pictures must never feed a meta-training family; this module reads no other.
        raise ValueError(f"photograph {name!r} is not one of META_TRAIN_PHOTOS")
    from skimage.io import imread

    path = os.path.join(_skimage_data_dir(), name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path}: scikit-image's bundled photograph is missing (reinstall scikit-image>=0.26)"
        )
    image = np.asarray(imread(path), np.float64)
    if image.ndim == 3:
        image = image[..., :3].mean(axis=-1)  # plain RGB mean, as celo2.data.to_grey
    return image / 255.0


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
    return tuple(_read_photo(name) for name in META_TRAIN_PHOTOS)


@functools.lru_cache(maxsize=1)
def _lfw() -> np.ndarray:
    path = os.path.join(_skimage_data_dir(), LFW_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: scikit-image's LFW subset is missing (reinstall scikit-image>=0.26)")
    crops = np.load(path).astype(np.float64)
    if crops.shape[0] != 2 * LFW_FACES or crops.ndim != 3:
        raise ValueError(f"{path}: expected 200 grey crops, found shape {crops.shape}")
    return crops


class _Sat:
    """Summed-area tables of several images, flattened end to end, for vectorised box means."""

    def __init__(self, images) -> None:
        tables, offsets, widths, off = [], [], [], 0
        for img in images:
            s = np.zeros((img.shape[0] + 1, img.shape[1] + 1))
            s[1:, 1:] = img.cumsum(0).cumsum(1)
            tables.append(s.ravel())
            offsets.append(off)
            widths.append(s.shape[1])
            off += s.size
        self.flat = np.concatenate(tables)
        self.offsets = np.asarray(offsets)
        self.widths = np.asarray(widths)
        self.shapes = np.asarray([img.shape for img in images])

    def crops(self, which, y0, x0, side, size: int) -> np.ndarray:
        """``(N, size, size)`` area means of square crops ``[y0, y0+side) x [x0, x0+side)``."""
        edges = np.round(np.arange(size + 1)[None, :] * (side[:, None] / size)).astype(np.int64)
        ys = y0[:, None] + edges
        xs = x0[:, None] + edges
        base = self.offsets[which][:, None, None]
        w = self.widths[which][:, None, None]

        def at(yy, xx):
            return self.flat[base + yy[:, :, None] * w + xx[:, None, :]]

        total = at(ys[:, 1:], xs[:, 1:]) - at(ys[:, :-1], xs[:, 1:]) - at(ys[:, 1:], xs[:, :-1]) + at(ys[:, :-1], xs[:, :-1])
        area = (ys[:, 1:] - ys[:, :-1])[:, :, None] * (xs[:, 1:] - xs[:, :-1])[:, None, :]
        return total / area


def _random_crops(sat: _Sat, rng, which, side) -> tuple[np.ndarray, np.ndarray]:
    hs, ws = sat.shapes[which, 0], sat.shapes[which, 1]
    y0 = np.floor(rng.random(len(which)) * (hs - side + 1)).astype(np.int64)
    x0 = np.floor(rng.random(len(which)) * (ws - side + 1)).astype(np.int64)
    return y0, x0


def _symmetries(images: np.ndarray, rng) -> np.ndarray:
    """Each image under a random one of the 8 symmetries of the square."""
    k = rng.integers(0, 8, size=len(images))
    out = images.copy()
    for code in range(8):
        sel = k == code
        block = np.rot90(images[sel], code % 4, axes=(1, 2))
        out[sel] = block[:, :, ::-1] if code >= 4 else block
    return out


def _jitter(images: np.ndarray, rng) -> np.ndarray:
    """Mean moved by up to +-_SHIFT, contrast scaled by a log-uniform factor in [1/_GAIN, _GAIN], pixel noise."""
    n = len(images)
    mean = images.mean(axis=(1, 2), keepdims=True)
    gain = np.exp(rng.uniform(-np.log(_GAIN), np.log(_GAIN), size=(n, 1, 1)))
    shift = rng.uniform(-_SHIFT, _SHIFT, size=(n, 1, 1))
    out = (images - mean) * gain + mean + shift + rng.normal(0.0, _NOISE_STD, size=images.shape)
    return np.clip(out, 0.0, 1.0)


def _balanced_labels(rng, n: int) -> np.ndarray:
    return rng.permutation(np.arange(n) % NUM_CLASSES).astype(np.int64)


def _make_patches(rng, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    sat = _Sat(_photos())
    labels = _balanced_labels(rng, n)
    lo, hi = np.log(_PATCH_SIDES[0]), np.log(_PATCH_SIDES[1])
    side = np.round(np.exp(rng.uniform(lo, hi, size=n))).astype(np.int64)
    side = np.maximum(side, size)
    y0, x0 = _random_crops(sat, rng, labels, side)
    return _symmetries(sat.crops(labels, y0, x0, side, size), rng), labels


def _make_faces(rng, n: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    from celo2.data.transforms import resize_bilinear

    photos = _photos()
    sat = _Sat(photos)
    labels = _balanced_labels(rng, n)
    which = rng.integers(0, len(photos), size=n)
    side = np.round(np.exp(rng.uniform(np.log(_CANVAS), np.log(4 * _CANVAS), size=n))).astype(np.int64)
    side = np.minimum(side, sat.shapes[which].min(axis=1))
    y0, x0 = _random_crops(sat, rng, which, side)
    canvas = _symmetries(sat.crops(which, y0, x0, side, _CANVAS), rng)
    lfw = resize_bilinear(_lfw(), _FACE).astype(np.float64)
    face = labels < 9
    pick = np.where(face, rng.integers(0, LFW_FACES, size=n), rng.integers(LFW_FACES, 2 * LFW_FACES, size=n))
    cell = np.where(face, labels, rng.integers(0, 9, size=n))
    step = (_CANVAS - _FACE) // 2
    py = (cell // 3) * step + rng.integers(-_FACE_JITTER, _FACE_JITTER + 1, size=n)
    px = (cell % 3) * step + rng.integers(-_FACE_JITTER, _FACE_JITTER + 1, size=n)
    py = np.clip(py, 0, _CANVAS - _FACE)
    px = np.clip(px, 0, _CANVAS - _FACE)
    bg_mean = canvas.mean(axis=(1, 2))
    bg_std = canvas.std(axis=(1, 2)) * rng.uniform(*_FACE_CONTRAST, size=n) + 0.02
    for i in range(n):
        crop = lfw[pick[i]]
        crop = (crop - crop.mean()) / (crop.std() + 1e-6) * bg_std[i] + bg_mean[i]
        canvas[i, py[i]:py[i] + _FACE, px[i]:px[i] + _FACE] = crop
    block = _CANVAS // size if _CANVAS % size == 0 else None
    if block is not None:
        small = canvas.reshape(n, size, block, size, block).mean(axis=(2, 4))
    else:
        small = resize_bilinear(canvas, size).astype(np.float64)
    return small, labels


_MAKERS = {"photo-patches": _make_patches, "photo-faces": _make_faces}


def make_photo_family(name: str, n: int, size: int = 8, seed: int = PHOTO_SEED,
                      stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images of one photo family.

    Args:
        name: One of :data:`PHOTO_FAMILIES`.
        n: Number of images (positive).
        size: Side of the square output images (8 for the meta-training tasks).
        seed: Seed of the family; the same ``(name, n, size, seed, stream)`` gives the same images.
        stream: Random stream within the seed (0: the ``train`` split, 1: ``test``).

    Returns:
        ``(X, y)``: images float32 ``(n, size, size)`` in [0, 1] and int64 labels ``(n,)`` in 0..9,
        balanced over the classes.

    Raises:
        ValueError: An unknown family name or a non-positive ``n`` or ``size``.
        ImportError: scikit-image is not installed.
    """
    if name not in _MAKERS:
        raise ValueError(f"unknown photo family {name!r}; choose one of {', '.join(PHOTO_FAMILIES)}")
    n, size = int(n), int(size)
    if n < 1 or size < 1:
        raise ValueError(f"photo family {name!r}: n and size must be positive, got n={n}, size={size}")
    if name == "photo-patches" and size > _PATCH_SIDES[0] or name == "photo-faces" and size > _CANVAS:
        raise ValueError(f"photo family {name!r}: size={size} is larger than its crops")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x9407, _FAMILY_IDS[name], int(stream)]))
    images, labels = _MAKERS[name](rng, n, size)
    images = _jitter(images, rng)
    return images.astype(np.float32), labels


def load_photo_family(name: str, split: str = "train", size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The ``train`` or ``test`` split of a photo family, in the meta-training view.

    Args:
        name: One of :data:`PHOTO_FAMILIES`.
        split: ``train`` (stream 0) or ``test`` (stream 1), :data:`PHOTO_SIZES` images each.
        size: Side of the images (8 for the meta-training tasks).

    Returns:
        ``(X, y)``: float32 ``(N, size*size)`` in [0, 1] and int64 labels ``(N,)``; fresh copies.

    Raises:
        ValueError: An unknown family or split.
        ImportError: scikit-image is not installed.
    """
    if split not in PHOTO_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    X, y = _cached(name, split, int(size))
    return X.copy(), y.copy()


@functools.lru_cache(maxsize=8)
def _cached(name: str, split: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = make_photo_family(name, PHOTO_SIZES[split], size, PHOTO_SEED,
                                       stream=0 if split == "train" else 1)
    return images.reshape(len(images), -1), labels


__all__ = [
    "HELD_OUT_PHOTOS", "LFW_FACES", "LFW_FILE", "META_TRAIN_PHOTOS", "PHOTO_FAMILIES", "PHOTO_SEED",
    "PHOTO_SIZES", "load_photo_family", "make_photo_family",
]
