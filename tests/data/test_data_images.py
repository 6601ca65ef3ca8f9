"""The image API: data root resolution, grey conversion, resizing, task view, built-in datasets."""

from __future__ import annotations

import time

import numpy as np
import pytest

import celo2.data as data
from celo2.data import (
    DATA_ENV_VAR,
    DatasetNotFoundError,
    load_images,
    load_task_images,
    resize_bilinear,
    resolve_data_root,
    to_grey,
)

from celo2_data_makers import write_cifar, write_mnist_like


# -- data root ------------------------------------------------------------------------
def test_resolve_data_root_precedence(tmp_path, monkeypatch):
    assert DATA_ENV_VAR == "CELO2_DATA_DIR"
    assert resolve_data_root() is None
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "env"))
    assert resolve_data_root() == tmp_path / "env"
    assert resolve_data_root(tmp_path / "explicit") == tmp_path / "explicit"


def test_env_var_is_used_by_loaders(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "mnist", n_train=7)
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path))
    x, y = load_images("mnist")
    assert x.shape == (7, 28, 28)
    assert load_task_images("mnist")[0].shape == (7, 64)


def test_explicit_root_beats_env_var(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "a" / "mnist", n_train=7)
    write_mnist_like(tmp_path / "b" / "mnist", n_train=9)
    monkeypatch.setenv(DATA_ENV_VAR, str(tmp_path / "a"))
    assert load_images("mnist", root=tmp_path / "b")[0].shape[0] == 9


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "svhn"])
def test_no_root_error_names_flag_and_env_var(name):
    with pytest.raises(DatasetNotFoundError) as info:
        load_images(name)
    assert "--data-dir" in str(info.value) and DATA_ENV_VAR in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        load_task_images(name)


def test_nonexistent_root_is_named(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        load_images("mnist", root=tmp_path / "nowhere")


def test_bad_split_and_name():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_images("digits", "validation")
    with pytest.raises(ValueError, match="'train' or 'test'"):
        load_task_images("digits", "val")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'.*mnist"):
        load_images("imagenet")


# -- grey and resize ------------------------------------------------------------------
def test_to_grey_averages_rgb_and_passes_grey():
    rgb = np.zeros((2, 3, 4, 3), np.float32)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0.3, 0.6, 0.9
    rgb[1, 0, 0] = (1.0, 0.0, 0.5)
    grey = to_grey(rgb)
    assert grey.shape == (2, 3, 4) and grey.dtype == np.float32
    np.testing.assert_allclose(grey[0], 0.6, rtol=1e-6)
    assert grey[1, 0, 0] == pytest.approx(0.5)
    g = np.random.default_rng(0).random((2, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(to_grey(g), g)
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        to_grey(np.zeros((5, 5)))


@pytest.mark.parametrize("shape,size", [((3, 28, 28), 8), ((2, 5, 7), 8), ((1, 32, 32), 3)])
def test_resize_keeps_constants_constant(shape, size):
    out = resize_bilinear(np.full(shape, 0.37, np.float32), size)
    assert out.shape == (shape[0], size, size) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.37, rtol=1e-6)


def test_resize_known_small_cases():
    img = np.arange(16, dtype=np.float32).reshape(1, 4, 4)
    # Halving: each output pixel samples the centre of a 2x2 block, i.e. its mean.
    np.testing.assert_allclose(resize_bilinear(img, 2)[0], [[2.5, 4.5], [10.5, 12.5]])
    # Doubling a 2x2: half-pixel centres, edges clamped.
    up = resize_bilinear(np.array([[[0.0, 1.0], [2.0, 3.0]]], np.float32), 4)[0]
    np.testing.assert_allclose(up[0], [0.0, 0.25, 0.75, 1.0])
    np.testing.assert_allclose(up[:, 0], [0.0, 0.5, 1.5, 2.0])
    # Same size is the identity.
    np.testing.assert_allclose(resize_bilinear(img, 4), img)


def test_resize_matches_torch_bilinear_without_antialias():
    torch = pytest.importorskip("torch")
    imgs = np.random.default_rng(1).random((4, 28, 28)).astype(np.float32)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(imgs)[:, None], size=(8, 8), mode="bilinear", align_corners=False, antialias=False
    )[:, 0].numpy()
    np.testing.assert_allclose(resize_bilinear(imgs, 8), ref, atol=1e-6)
    imgs = np.random.default_rng(2).random((3, 5, 9)).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(imgs)[:, None], size=(7, 7), mode="bilinear", align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(resize_bilinear(imgs, 7), ref, atol=1e-6)


def test_resize_is_fast_on_mnist_sized_input():
    imgs = np.random.default_rng(0).integers(0, 256, (60_000, 28, 28), dtype=np.uint8)
    start = time.perf_counter()
    out = resize_bilinear(imgs, 8)
    assert out.shape == (60_000, 8, 8)
    assert time.perf_counter() - start < 10.0


def test_resize_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        resize_bilinear(np.zeros((4, 4)), 2)
    with pytest.raises(ValueError, match="positive"):
        resize_bilinear(np.zeros((1, 4, 4)), 0)


# -- task view ------------------------------------------------------------------------
def test_task_images_grey_resized_flat(tmp_path):
    written = write_mnist_like(tmp_path / "mnist", n_train=12)
    x, y = load_task_images("mnist", root=tmp_path)
    assert x.shape == (12, 64) and x.dtype == np.float32 and y.dtype == np.int64
    expected = resize_bilinear(written["train"][0].astype(np.float32) / 255.0, 8).reshape(12, 64)
    np.testing.assert_allclose(x, expected, atol=1e-6)
    assert load_task_images("mnist", root=tmp_path, size=4)[0].shape == (12, 16)


def test_task_images_of_colour_data_average_rgb(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py", n_per_batch=3)
    x, y = load_task_images("cifar10", "test", root=tmp_path)
    images = written["test_batch"][0].astype(np.float32) / 255.0
    expected = resize_bilinear(images.mean(axis=-1), 8).reshape(3, 64)
    assert x.shape == (3, 64)
    np.testing.assert_allclose(x, expected, atol=1e-6)
    np.testing.assert_array_equal(y, written["test_batch"][1])


def test_task_images_cached_but_returned_as_copies(tmp_path, monkeypatch):
    write_mnist_like(tmp_path / "mnist", n_train=12)
    x1, _ = load_task_images("mnist", root=tmp_path)
    calls = []
    monkeypatch.setattr(data.images, "_load_raw", lambda *a: calls.append(a))
    x1[:] = -5.0  # mutating a result must not corrupt the cache
    x2, _ = load_task_images("mnist", root=tmp_path)
    assert calls == []  # served from the cache
    assert x2.min() >= 0.0


# -- built-in datasets ----------------------------------------------------------------
def test_digits_builtin():
    x, y = load_images("digits", "train")
    xt, yt = load_images("digits", "test")
    assert x.shape == (1437, 8, 8) and xt.shape == (360, 8, 8)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(y.tolist()) == set(range(10)) and set(yt.tolist()) == set(range(10))
    x2, y2 = load_images("digits", "train")
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    # 8x8 already: the task view is the flattened images.
    np.testing.assert_allclose(load_task_images("digits", "test")[0], xt.reshape(360, 64), atol=1e-6)


def test_synthetic_builtin_is_deterministic_balanced_and_not_trivial():
    x, y = load_images("synthetic", "train")
    xt, yt = load_images("synthetic", "test")
    assert x.shape == (10_000, 8, 8) and xt.shape == (2_000, 8, 8)
    assert 0.0 <= x.min() and x.max() <= 1.0 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [1000] * 10
    x2, _ = load_images("synthetic", "train")
    np.testing.assert_array_equal(x, x2)
    assert not np.allclose(x[:2000], xt)
    # Classes overlap: a nearest-class-mean classifier is far from perfect, yet far above chance.
    means = np.stack([x[y == c].mean(0) for c in range(10)])
    pred = ((xt[:, None] - means[None]) ** 2).sum((2, 3)).argmin(1)
    assert 0.3 < (pred == yt).mean() < 0.8
