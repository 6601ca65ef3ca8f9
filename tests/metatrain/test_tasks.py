"""Task families: built-ins, the published datasets, adding one, and data that do not fit."""

from pathlib import Path

import numpy as np
import pytest

from celo2.metatrain import TaskError, TaskFamily, load_task_data, preset, register_task_family, task_families
from celo2.metatrain.tasks import _REGISTRY

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "datasets"


def test_the_papers_and_the_built_in_families_are_registered():
    fams = task_families()
    assert {"mnist", "fashion-mnist", "cifar10", "svhn", "digits", "synthetic"} <= set(fams)
    assert not fams["digits"].needs_data_root and not fams["synthetic"].needs_data_root
    assert fams["mnist"].needs_data_root


def test_built_in_families_stack_into_one_padded_array():
    data = load_task_data(["digits", "synthetic"], None)
    assert data.X.dtype == np.float32 and data.X.shape[0] == 2 and data.X.shape[2] == 64
    n_digits, n_synth = data.sizes
    assert data.X.shape[1] == max(n_digits, n_synth)
    assert 0.0 <= data.X.min() and data.X.max() <= 1.0
    assert data.y[0, :n_digits].max() == 9 and np.all(data.X[0, n_digits:] == 0)


@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason="shared MNIST files not present")
def test_mnist_from_its_published_files():
    data = load_task_data(["mnist", "fashion-mnist"], str(DATA))
    assert list(data.sizes) == [60000, 60000] and data.X.shape == (2, 60000, 64)


def test_a_new_family_plugs_in_and_bad_data_are_named():
    rng = np.random.default_rng(0)

    def good(root, size):
        return rng.random((100, size * size), dtype=np.float32), rng.integers(0, 10, 100)

    def wrong_size(root, size):
        return np.zeros((10, 50), np.float32), np.zeros(10, int)

    def bad_labels(root, size):
        return np.zeros((10, size * size), np.float32), np.full(10, 12)

    try:
        register_task_family(TaskFamily("test-good", good, description="random pixels"))
        register_task_family(TaskFamily("test-size", wrong_size))
        register_task_family(TaskFamily("test-labels", bad_labels))
        with pytest.raises(TaskError, match="already registered"):
            register_task_family(TaskFamily("test-good", good))
        assert preset("smoke", tasks=("digits", "test-good")).tasks == ("digits", "test-good")
        assert load_task_data(["test-good"], None).X.shape == (1, 100, 64)
        with pytest.raises(TaskError, match="'test-size'.*\\(10, 50\\).*\\(N, 64\\)"):
            load_task_data(["test-size"], None)
        with pytest.raises(TaskError, match="'test-labels'.*labels span \\[12, 12\\]"):
            load_task_data(["test-labels"], None)
    finally:
        for name in ("test-good", "test-size", "test-labels"):
            _REGISTRY.pop(name, None)


def test_the_photo_families_are_registered_and_need_no_data_folder():
    fams = task_families()
    for name in ("photo-patches", "photo-faces"):
        assert not fams[name].needs_data_root and "scikit-image" in fams[name].description


def test_the_photo_families_meta_train_a_few_outer_iterations(tmp_path):
    pytest.importorskip("skimage", reason="the photo families need scikit-image (pip install 'celo2[photos]')")
    from celo2 import Theta
    from celo2.metatrain import meta_train
    from celo2.metatrain.trainer import read_metrics

    config = preset("smoke", tasks=("photo-patches", "photo-faces"), iterations=3, checkpoint_every=3)
    data = load_task_data(config.tasks, None)
    assert data.summary() == {"photo-patches": 30000, "photo-faces": 30000}
    result = meta_train(config, tmp_path / "run", progress=False, log=lambda msg: None)
    rows = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["meta_loss"]) for r in rows)
    assert np.all(np.isfinite(result.theta.to_flat()))
    assert not result.theta.allclose(Theta.init(config.seed))  # the outer steps moved theta
    assert (tmp_path / "run" / "theta.state").is_file()
