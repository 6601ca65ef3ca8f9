"""The bench's task registry: fixed data order, seeded init, data fallbacks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from celo2.eval import tasks as T


def test_batch_indices_fixed_by_seed_and_epoch_complete():
    a = T.batch_indices(10, 4, 5, seed=3)
    assert a.shape == (5, 4)
    assert np.array_equal(a, T.batch_indices(10, 4, 5, seed=3))
    assert not np.array_equal(a, T.batch_indices(10, 4, 5, seed=4))
    assert sorted(a.reshape(-1)[:10]) == list(range(10)), "first epoch is a permutation"


@pytest.mark.parametrize("task", list(T.TASKS))
def test_every_task_builds_trains_and_evaluates(task):
    cfg = T.SUITES["smoke"][task]
    p = T.build_problem(task, cfg, seed=0)
    loss, value = p.train_loss(0)
    assert loss.requires_grad and math.isfinite(value)
    loss.backward()
    assert any(q.grad is not None for q in p.model.parameters())
    assert math.isfinite(p.val_loss())
    assert p.data_source


@pytest.mark.parametrize("task", ["mlp", "gpt", "rl"])
def test_same_seed_same_model_and_batches(task):
    cfg = T.SUITES["smoke"][task]
    a, b = T.build_problem(task, cfg, seed=1), T.build_problem(task, cfg, seed=1)
    c = T.build_problem(task, cfg, seed=2)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.model.parameters(), c.model.parameters()))
    assert a.train_loss(3)[1] == b.train_loss(3)[1]


def test_image_tasks_fall_back_to_builtin_digits_and_say_so():
    data = T.load_image_data("fashion-mnist", None)
    assert data.source.startswith("BUILT-IN FALLBACK")
    assert tuple(data.train_x.shape[1:]) == (28, 28)
    assert 0.0 <= float(data.train_x.min()) and float(data.train_x.max()) <= 1.0


def test_explicit_data_dir_without_the_dataset_is_an_error(tmp_path):
    with pytest.raises(T.TaskDataError, match=str(tmp_path)):
        T.load_image_data("mnist", tmp_path)


def test_real_fashion_mnist_when_available(datasets_dir):
    data = T.load_image_data("fashion-mnist", datasets_dir)
    assert len(data.train_y) == 60000 and len(data.val_y) == 10000
    assert "BUILT-IN" not in data.source


def test_cartpole_validation_is_a_fraction():
    p = T.build_problem("rl", T.SUITES["smoke"]["rl"], seed=0)
    v = p.val_loss()
    assert 0.0 <= v <= 1.0
