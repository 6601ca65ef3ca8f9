"""The real MNIST and Fashion-MNIST in the project's shared folder (skipped elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest

from celo2.data import load_images, load_task_images


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_dataset_counts_and_range(shared_datasets, name):
    for split, n in (("train", 60_000), ("test", 10_000)):
        x, y = load_images(name, split, root=shared_datasets)
        assert x.shape == (n, 28, 28) and x.dtype == np.float32
        assert y.shape == (n,) and y.dtype == np.int64
        assert x.min() == 0.0 and x.max() == 1.0
        assert np.bincount(y, minlength=10).min() > n // 20  # all ten classes, roughly balanced
    if name == "mnist":
        assert y[:5].tolist() == [7, 2, 1, 0, 4]  # the well-known first MNIST test labels


def test_real_task_images(shared_datasets, monkeypatch):
    monkeypatch.setenv("CELO2_DATA_DIR", str(shared_datasets))
    x, y = load_task_images("mnist", "test")
    assert x.shape == (10_000, 64) and x.dtype == np.float32 and y.shape == (10_000,)
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    # Centre pixels carry ink on average; the 8x8 corners are nearly blank.
    img = x.reshape(-1, 8, 8).mean(0)
    assert img[3:5, 3:5].mean() > 5 * img[0, 0]
