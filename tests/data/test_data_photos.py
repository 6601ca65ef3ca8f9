"""The photo task families: shapes, determinism, class balance, the split of photographs, clear errors."""

import builtins
import os
import re

import numpy as np
import pytest

pytest.importorskip("skimage", reason="the photo families need scikit-image (pip install 'celo2[photos]')")

from celo2.data import photos  # noqa: E402


@pytest.mark.parametrize("name", photos.PHOTO_FAMILIES)
def test_images_are_8x8_in_unit_range_with_balanced_labels(name):
    X, y = photos.make_photo_family(name, 500)
    assert X.shape == (500, 8, 8) and X.dtype == np.float32 and y.shape == (500,)
    assert 0.0 <= X.min() and X.max() <= 1.0 and np.all(np.isfinite(X))
    assert np.array_equal(np.bincount(y, minlength=10), np.full(10, 50))
    assert X.std() > 0.05  # images, not a constant


@pytest.mark.parametrize("name", photos.PHOTO_FAMILIES)
def test_same_seed_same_images_and_streams_differ(name):
    a, ya = photos.make_photo_family(name, 200, seed=3, stream=0)
    b, yb = photos.make_photo_family(name, 200, seed=3, stream=0)
    c, _ = photos.make_photo_family(name, 200, seed=3, stream=1)
    d, _ = photos.make_photo_family(name, 200, seed=4, stream=0)
    assert np.array_equal(a, b) and np.array_equal(ya, yb)
    assert not np.allclose(a, c) and not np.allclose(a, d)


def test_load_gives_flat_train_and_test_splits_of_the_documented_sizes():
    X, y = photos.load_photo_family("photo-patches", "train")
    Xt, yt = photos.load_photo_family("photo-patches", "test")
    assert X.shape == (photos.PHOTO_SIZES["train"], 64) and Xt.shape == (photos.PHOTO_SIZES["test"], 64)
    assert not np.array_equal(X[:100], Xt[:100])
    X[:] = -1.0  # callers get copies
    assert photos.load_photo_family("photo-patches", "train")[0].min() >= 0.0
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        photos.load_photo_family("photo-patches", "val")
    with pytest.raises(ValueError, match="unknown photo family 'photo-nope'.*photo-patches"):
        photos.make_photo_family("photo-nope", 10)
    with pytest.raises(ValueError, match="n and size must be positive"):
        photos.make_photo_family("photo-faces", 0)


def test_the_classes_of_photo_patches_are_its_photographs():
    # Class k's patches come from photograph k: class means follow the photographs' means.
    X, y = photos.make_photo_family("photo-patches", 2000)
    means = np.array([X[y == k].mean() for k in range(10)])
    photo_means = np.array([p.mean() for p in photos._photos()])
    assert np.corrcoef(means, photo_means)[0, 1] > 0.95
    assert np.abs(means - photo_means).max() < 0.03


def test_meta_training_and_held_out_photographs_are_disjoint_and_installed():
    train, held = set(photos.META_TRAIN_PHOTOS), set(photos.HELD_OUT_PHOTOS)
    assert len(train) == 10 and not train & held
    stems = {re.sub(r"_(left|right)$", "", os.path.splitext(n)[0]) for n in held}
    assert not stems & {os.path.splitext(n)[0] for n in train}  # a stereo pair stays on one side
    folder = photos._skimage_data_dir()
    for name in photos.META_TRAIN_PHOTOS + (photos.LFW_FILE,):
        assert os.path.isfile(os.path.join(folder, name)), name


def test_the_families_read_no_held_out_photograph(monkeypatch):
    photos._photos.cache_clear()
    opened = []
    real_imread = __import__("skimage.io", fromlist=["imread"]).imread

    def spy(path, *a, **k):
        opened.append(os.path.basename(path))
        return real_imread(path, *a, **k)

    monkeypatch.setattr("skimage.io.imread", spy)
    for name in photos.PHOTO_FAMILIES:
        photos.make_photo_family(name, 20)
    assert set(opened) == set(photos.META_TRAIN_PHOTOS)
    with pytest.raises(ValueError, match="not one of META_TRAIN_PHOTOS"):
        photos._read_photo(photos.HELD_OUT_PHOTOS[0])
    photos._photos.cache_clear()


def test_a_missing_scikit_image_is_named(monkeypatch):
    real_import = builtins.__import__

    def no_skimage(name, *a, **k):
        if name == "skimage" or name.startswith("skimage."):
            raise ImportError("No module named 'skimage'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_skimage)
    with pytest.raises(ImportError, match=r"scikit-image.*celo2\[photos\]"):
        photos._skimage_data_dir()
