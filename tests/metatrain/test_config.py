"""Config, presets and overrides: defaults follow the spec, bad input names itself."""

import math

import pytest

from celo2.metatrain import ConfigError, MetaTrainConfig, PRESETS, parse_set, preset
from celo2.metatrain.config import BYTE_META_LOSS_CLIP


def test_paper_preset_is_the_published_recipe():
    c = preset("paper")
    assert c.tasks == ("mnist", "fashion-mnist", "cifar10", "svhn")
    assert (c.pairs_per_task, c.perturbation_std, c.truncation_length) == (8, 0.01, 50)
    assert (c.min_unroll_length, c.max_unroll_length, c.initial_offset_max) == (100, 2000, 2000)
    assert (c.inner_lr, c.adam_lr_mult, c.augmentation) == (1e-3, 20.0, "global")
    assert (c.reparam_scale_min, c.reparam_scale_max) == (1e-3, 1e3)
    assert (c.outer_lr, c.outer_b1, c.outer_b2, c.outer_eps, c.outer_weight_decay) == (1e-4, 0.9, 0.999, 1e-8, 1e-4)
    assert c.meta_loss_clip == pytest.approx(1.5 * math.log(10))
    assert c.iterations == 100_000
    assert c.inner_steps_per_iteration == 3200  # 4 x 8 x 2 x 50, as the spec counts


def test_cpu_preset_uses_built_in_and_mnist_families():
    c = preset("cpu")
    assert set(c.tasks) == {"mnist", "fashion-mnist", "digits", "synthetic"}
    assert c.iterations < 100_000


def test_cpu_photos_preset_swaps_the_generated_families_for_the_photo_ones():
    c, cpu = preset("cpu-photos"), preset("cpu")
    assert c.tasks == ("mnist", "fashion-mnist", "photo-patches", "photo-faces")
    assert c.replace(tasks=cpu.tasks, preset="cpu") == cpu  # nothing else differs
    assert c.preset == "cpu-photos" and c.inner_steps_per_iteration == 1600


def test_unknown_preset_is_named():
    with pytest.raises(ConfigError, match="'nope'.*paper, cpu, cpu-photos, cpu-text, cpu-conv, smoke"):
        preset("nope")


def test_overrides_are_typed_and_checked():
    c = preset("smoke", **parse_set(["pairs_per_task=3", "tasks=digits", "augmentation=tensor",
                                     "outer_lr=3e-4", "shard=false", "hidden_sizes=16,8"]))
    assert (c.pairs_per_task, c.tasks, c.augmentation) == (3, ("digits",), "tensor")
    assert (c.outer_lr, c.shard, c.hidden_sizes) == (3e-4, False, (16, 8))
    with pytest.raises(ConfigError, match="unknown key.*bogus"):
        preset("smoke", bogus=1)
    with pytest.raises(ConfigError, match="pairs_per_task='x'"):
        preset("smoke", pairs_per_task="x")
    with pytest.raises(ConfigError, match="augmentation='layer'.*none, global, tensor, parameter"):
        preset("smoke", augmentation="layer")
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set(["pairs_per_task"])


def test_invalid_combinations_are_refused():
    with pytest.raises(ConfigError, match="min_unroll_length.*truncation_length"):
        MetaTrainConfig(truncation_length=50, min_unroll_length=20)
    with pytest.raises(ConfigError, match="max_unroll_length"):
        MetaTrainConfig(min_unroll_length=100, max_unroll_length=50)
    with pytest.raises(ConfigError, match="perturbation_std"):
        MetaTrainConfig(perturbation_std=0.0)
    with pytest.raises(ConfigError, match="inner_optimizer"):
        MetaTrainConfig(inner_optimizer="sgd")


def test_round_trip_through_json():
    c = preset("cpu", seed=3)
    import json

    assert MetaTrainConfig.from_dict(json.loads(c.to_json())) == c
    assert set(PRESETS) == {"paper", "cpu", "cpu-photos", "cpu-text", "cpu-conv", "smoke"}


def test_family_presets_train_one_model_each():
    """cpu-text and cpu-conv name families of one model (a run trains one model) and say what they cost."""
    from celo2.metatrain.tasks import get_task_family

    for name, model_kind in (("cpu-text", "text"), ("cpu-conv", "conv")):
        c = preset(name)
        models = {repr(get_task_family(t).model) for t in c.tasks}
        assert len(models) == 1, (name, models)
        assert all(t.startswith(model_kind) for t in c.tasks)
    assert preset("cpu-text").meta_loss_clip == BYTE_META_LOSS_CLIP
    assert preset("cpu-text").inner_steps_per_iteration == 400
    assert preset("cpu-conv").inner_steps_per_iteration == 1200
