"""Readers of the published formats: IDX (MNIST, Fashion-MNIST), CIFAR-10 pickles, SVHN .mat."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest

from celo2.data import DatasetFormatError, DatasetNotFoundError, load_images
from celo2.data.idx import IDX_IMAGES_MAGIC, read_idx, write_idx

from celo2_data_makers import idx_bytes, write_cifar, write_mnist_like, write_svhn


# -- IDX ------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_idx_reads_hand_made_files(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    data = idx_bytes(arr)
    path = tmp_path / ("x.gz" if gz else "x")
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path, IDX_IMAGES_MAGIC)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_idx_write_read_roundtrip_non_uint8(tmp_path):
    arr = np.array([[1, -2], [300, 4]], dtype=np.int32)
    out = read_idx(write_idx(tmp_path / "a.idx.gz", arr))
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, arr)


def test_idx_wrong_magic_names_file_and_magic(tmp_path):
    path = tmp_path / "labels-as-images"
    path.write_bytes(idx_bytes(np.zeros(5, np.uint8)))  # 0x801
    with pytest.raises(DatasetFormatError, match=r"labels-as-images.*0x00000801.*0x00000803"):
        read_idx(path, IDX_IMAGES_MAGIC)


def test_idx_truncated_payload_names_file(tmp_path):
    path = tmp_path / "short-images"
    path.write_bytes(idx_bytes(np.zeros((3, 28, 28), np.uint8))[:-10])
    with pytest.raises(DatasetFormatError, match=r"short-images.*\(3, 28, 28\)"):
        read_idx(path)


def test_idx_corrupt_gzip_names_file(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros((3, 4, 4), np.uint8)))[:-12])
    with pytest.raises(DatasetFormatError, match="broken.gz"):
        read_idx(path)


def test_idx_garbage_is_not_idx(tmp_path):
    path = tmp_path / "garbage"
    path.write_bytes(b"hello world, not an idx file")
    with pytest.raises(DatasetFormatError, match="garbage.*not an IDX"):
        read_idx(path)


# -- MNIST-like datasets --------------------------------------------------------------
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_like_loading(tmp_path, name):
    written = write_mnist_like(tmp_path / name, n_train=12, n_test=5)
    x, y = load_images(name, "train", root=tmp_path)
    assert x.shape == (12, 28, 28) and x.dtype == np.float32
    assert y.shape == (12,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x, written["train"][0] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, written["train"][1])
    xt, yt = load_images(name, "test", root=tmp_path)
    assert xt.shape == (5, 28, 28) and yt.shape == (5,)
    np.testing.assert_array_equal(yt, written["t10k"][1])


def test_mnist_and_fashion_are_read_from_their_own_folders(tmp_path):
    a = write_mnist_like(tmp_path / "mnist", seed=1)
    b = write_mnist_like(tmp_path / "fashion-mnist", seed=2)
    xa, _ = load_images("mnist", root=tmp_path)
    xb, _ = load_images("fashion_mnist", root=tmp_path)  # alias
    np.testing.assert_allclose(xa * 255, a["train"][0], atol=1e-4)
    np.testing.assert_allclose(xb * 255, b["train"][0], atol=1e-4)


def test_layout_variants_raw_and_dotted_names(tmp_path):
    written = write_mnist_like(tmp_path / "FashionMNIST" / "raw", gz=False, dotted=True)
    x, y = load_images("fashion-mnist", "test", root=tmp_path)
    np.testing.assert_allclose(x * 255, written["t10k"][0], atol=1e-4)


def test_count_mismatch_names_both_files(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist_like(folder, n_train=12)
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(11, np.uint8))))
    with pytest.raises(DatasetFormatError, match=r"train-images-idx3-ubyte.gz holds 12 images.*train-labels-idx1-ubyte.gz holds 11"):
        load_images("mnist", root=tmp_path)


def test_labels_file_in_place_of_images_names_file(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist_like(folder)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(12, np.uint8))))
    with pytest.raises(DatasetFormatError, match="train-images-idx3-ubyte.gz"):
        load_images("mnist", root=tmp_path)


def test_missing_dataset_lists_where_it_looked(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_images("mnist", root=tmp_path)
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg
    assert str(tmp_path / "mnist") in msg and "download_dataset" in msg


def test_half_present_split_names_missing_file(tmp_path):
    folder = tmp_path / "mnist"
    write_mnist_like(folder)
    os.remove(folder / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_images("mnist", "test", root=tmp_path)


# -- CIFAR-10 -------------------------------------------------------------------------
def test_cifar_channel_first_rows_become_hwc(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)  # fills every batch, then overwrite test_batch by hand
    row = np.zeros((1, 3072), np.uint8)
    row[0, :1024], row[0, 1024:2048], row[0, 2048:] = 10, 20, 30
    row[0, 1 * 32 + 2] = 200  # red plane, row 1, column 2
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": row, b"labels": [7]}, fh, protocol=2)
    x, y = load_images("cifar10", "test", root=tmp_path)
    assert x.shape == (1, 32, 32, 3) and x.dtype == np.float32
    assert y.tolist() == [7] and y.dtype == np.int64
    np.testing.assert_allclose(x[0, 0, 0], np.array([10, 20, 30]) / 255.0, rtol=1e-6)
    assert x[0, 1, 2, 0] == pytest.approx(200 / 255.0)
    assert x[0, 2, 1, 0] == pytest.approx(10 / 255.0)


@pytest.mark.parametrize("layout", ["cifar-10-batches-py", "cifar10/cifar-10-batches-py"])
def test_cifar_train_concatenates_batches_in_order(tmp_path, layout):
    written = write_cifar(tmp_path / layout, n_per_batch=3, protocol=pickle.HIGHEST_PROTOCOL)
    x, y = load_images("cifar10", "train", root=tmp_path)
    assert x.shape == (15, 32, 32, 3) and y.shape == (15,)
    expected = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    np.testing.assert_allclose(x * 255, expected, atol=1e-4)
    np.testing.assert_array_equal(y, np.concatenate([written[f"data_batch_{i}"][1] for i in range(1, 6)]))
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_cifar_missing_batch_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    os.remove(folder / "data_batch_4")
    with pytest.raises(DatasetNotFoundError, match="data_batch_4"):
        load_images("cifar10", root=tmp_path)


def test_cifar_missing_key_and_bad_shape(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8)}, fh)
    with pytest.raises(DatasetFormatError, match=r"test_batch.*b'labels'"):
        load_images("cifar10", "test", root=tmp_path)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DatasetFormatError, match=r"test_batch.*\(2, 100\)"):
        load_images("cifar10", "test", root=tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar_refuses_pickles_that_run_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Evil(), b"labels": []}, fh)
    with pytest.raises(DatasetFormatError, match=r"test_batch.*refusing.*system"):
        load_images("cifar10", "test", root=tmp_path)


def test_cifar_garbage_file_names_file(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "test_batch").write_bytes(b"\x00not a pickle at all")
    with pytest.raises(DatasetFormatError, match="test_batch"):
        load_images("cifar10", "test", root=tmp_path)


# -- SVHN -----------------------------------------------------------------------------
@pytest.mark.parametrize("folder", ["svhn", "SVHN"])
def test_svhn_layout_and_label_10_is_digit_0(tmp_path, folder):
    images, digits = write_svhn(tmp_path / folder, "test", n=12)
    x, y = load_images("svhn", "test", root=tmp_path)
    assert x.shape == (12, 32, 32, 3) and x.dtype == np.float32
    assert y.dtype == np.int64 and y.tolist() == digits.tolist()
    assert y[0] == 0 and y[10] == 0 and set(y.tolist()) == set(range(10))
    np.testing.assert_allclose(x * 255, images, atol=1e-4)


def test_svhn_missing_and_malformed(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    with pytest.raises(DatasetNotFoundError, match="train_32x32.mat"):
        load_images("svhn", root=tmp_path)
    (tmp_path / "svhn").mkdir()
    scipy_io.savemat(str(tmp_path / "svhn" / "train_32x32.mat"), {"X": np.zeros((32, 32, 3, 2), np.uint8)})
    with pytest.raises(DatasetFormatError, match=r"train_32x32.mat.*'y'"):
        load_images("svhn", root=tmp_path)
    scipy_io.savemat(
        str(tmp_path / "svhn" / "train_32x32.mat"),
        {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1), np.uint8)},
    )
    with pytest.raises(DatasetFormatError, match=r"train_32x32.mat.*2 images.*3 labels"):
        load_images("svhn", root=tmp_path)
    (tmp_path / "svhn" / "train_32x32.mat").write_bytes(b"not matlab")
    with pytest.raises(DatasetFormatError, match="train_32x32.mat"):
        load_images("svhn", root=tmp_path)
