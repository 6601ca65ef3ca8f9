"""Task models beyond the image MLP: shapes, losses, determinism, routing, and one model per run."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from celo2.metatrain import TaskError, TaskFamily, load_task_data, preset, register_task_family, task_families
from celo2.metatrain.byte_transformer import ByteTransformer
from celo2.metatrain.compile_cache import jitted_iteration
from celo2.metatrain.image_convnet import ImageConvNet, conv2d_same
from celo2.metatrain.pes import PES
from celo2.metatrain.task_models import ImageMLP
from celo2.metatrain.tasks import CONV_FAMILY_IMAGES, CONV_NET, DOCSTRING_TRANSFORMER, docstring_loader

SMOKE = preset("smoke")
TINY_TEXT = ByteTransformer(width=16, layers=1, heads=2, context=8)


@pytest.fixture
def tiny_text_family():
    """``test-text-tiny``: a 16-wide transformer on 8-byte windows of 20 kB of docstrings."""
    from celo2.metatrain.tasks import _REGISTRY

    register_task_family(TaskFamily("test-text-tiny", docstring_loader(TINY_TEXT, stride=4, max_bytes=20_000),
                                    False, "tiny text for tests", TINY_TEXT), replace=True)
    yield "test-text-tiny"
    _REGISTRY.pop("test-text-tiny", None)


def test_the_new_families_are_registered_with_their_models():
    fams = task_families()
    assert fams["text-docstrings"].model == DOCSTRING_TRANSFORMER and not fams["text-docstrings"].needs_data_root
    for name in CONV_FAMILY_IMAGES:
        assert fams[f"conv-{name}"].model == CONV_NET
        assert fams[f"conv-{name}"].needs_data_root == fams[name].needs_data_root
    assert fams["digits"].model == ImageMLP()  # the published families keep the image MLP


def test_conv_families_use_only_images_the_bench_never_evaluates():
    from celo2.eval.task_data import IMAGE_DATASETS

    assert not set(CONV_FAMILY_IMAGES) & (set(IMAGE_DATASETS) | {"digits"})  # digits: the bench's fallback
    assert not any(f"conv-{n}" in task_families() for n in (*IMAGE_DATASETS, "digits"))


def test_the_conv_net_matches_xla_convolution_and_has_the_documented_shapes():
    model = ImageConvNet(channels=(4, 6), strides=(1, 2))
    shapes = model.shapes(SMOKE, (64,))
    assert shapes == {"conv0": (3, 3, 1, 4), "conv0_b": (4,), "conv1": (3, 3, 4, 6), "conv1_b": (6,),
                      "head": (6, 10), "head_b": (10,)}
    params = model.init(jax.random.PRNGKey(0), shapes)
    assert {k: v.shape for k, v in params.items()} == shapes
    x = jax.random.uniform(jax.random.PRNGKey(1), (5, 8, 8, 4))
    for stride in (1, 2):
        ours = conv2d_same(x, params["conv1"], stride)
        ref = jax.lax.conv_general_dilated(x, params["conv1"], (stride, stride), ((1, 1), (1, 1)),
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
        assert ours.shape == ref.shape == (5, 8 // stride, 8 // stride, 6)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    loss = model.loss(params, jnp.ones((3, 64)), jnp.asarray([0, 4, 9]))
    assert loss.shape == () and np.isfinite(loss)
    with pytest.raises(TaskError, match="not flat square images"):
        model.shapes(SMOKE, (60,))
    with pytest.raises(TaskError, match="equal length"):
        ImageConvNet(channels=(4, 6), strides=(1,))


def test_the_transformer_is_causal_and_starts_near_a_uniform_guess():
    model = ByteTransformer(width=16, layers=2, heads=4, context=12)
    shapes = model.shapes(SMOKE, (12,))
    assert shapes["tok_embed"] == (256, 16) and shapes["l1_qkv"] == (16, 48) and shapes["head"] == (16, 256)
    params = model.init(jax.random.PRNGKey(0), shapes)
    assert float(params["l0_ln1"].min()) == 1.0  # gains start at one
    x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (3, 12)), jnp.uint8)
    logits = model.logits(params, x)
    assert logits.shape == (3, 12, 256)
    changed = model.logits(params, x.at[:, 7:].set(0))
    np.testing.assert_allclose(logits[:, :7], changed[:, :7], rtol=1e-5, atol=1e-5)  # no peeking ahead
    assert not np.allclose(logits[:, 7:], changed[:, 7:])
    loss = float(model.loss(params, x, x))
    assert abs(loss - np.log(256)) < 1.5
    with pytest.raises(TaskError, match="windows of shape \\(8,\\), expected \\(12,\\)"):
        model.shapes(SMOKE, (8,))
    with pytest.raises(TaskError, match="not divisible"):
        ByteTransformer(width=10, heads=4)


def test_routing_follows_the_harness_for_new_models_and_the_paper_for_the_mlp():
    t = DOCSTRING_TRANSFORMER
    labels = t.param_labels(t.init(jax.random.PRNGKey(0), t.shapes(SMOKE, (t.context,))))
    assert {k for k, v in labels.items() if v == "celo2"} == {"l0_qkv", "l0_proj", "l0_fc", "l0_out"}
    c = CONV_NET
    labels = c.param_labels(c.init(jax.random.PRNGKey(0), c.shapes(SMOKE, (64,))))
    assert {k for k, v in labels.items() if v == "celo2"} == {"conv0", "conv1"}
    m = ImageMLP()
    labels = m.param_labels(m.init(jax.random.PRNGKey(0), m.shapes(SMOKE, (64,))))
    assert {k for k, v in labels.items() if v == "celo2"} == {"w0", "w1"}


@pytest.mark.parametrize("tasks", [("conv-synthetic",), ("test-text-tiny",)])
def test_same_seed_same_data_and_same_initial_runs(tasks, tiny_text_family):
    config = preset("smoke", tasks=tasks)
    a, b = load_task_data(tasks, None), load_task_data(tasks, None)
    assert np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y)
    pes = PES(config, 1, in_dim=a.X.shape[2])
    theta = jnp.zeros(347, jnp.float32)
    s1, s2, s3 = pes.init(theta, seed=3), pes.init(theta, seed=3), pes.init(theta, seed=4)
    for k in s1.particles.params:
        assert s1.particles.params[k].shape == (pes.P, *pes.shapes[k])
        assert np.array_equal(s1.particles.params[k], s2.particles.params[k])
    assert not all(np.array_equal(s1.particles.params[k], s3.particles.params[k]) for k in pes.shapes)


def test_text_data_are_byte_windows_and_bad_ones_are_named(tiny_text_family):
    data = load_task_data(["test-text-tiny"], None)
    assert data.X.dtype == data.y.dtype == np.uint8 and data.X.shape[2] == 8 and data.y.shape == data.X.shape
    assert np.array_equal(data.X[0, 0, 1:], data.y[0, 0, :-1])
    model = task_families()["test-text-tiny"].model
    with pytest.raises(TaskError, match="'bad'.*windows have shape \\(4, 5\\), expected \\(N, 8\\)"):
        model.check_data("bad", np.zeros((4, 5), np.uint8), np.zeros((4, 5), np.uint8), image_size=8, num_classes=10)
    with pytest.raises(TaskError, match="'bad'.*targets must be integer bytes"):
        model.check_data("bad", np.zeros((4, 8), np.uint8), np.full((4, 8), 300), image_size=8, num_classes=10)


def test_families_of_different_models_do_not_mix_in_one_run():
    with pytest.raises(TaskError, match="'synthetic'.*'conv-synthetic'.*different models"):
        load_task_data(["synthetic", "conv-synthetic"], None)
    with pytest.raises(TaskError, match="different models"):
        PES(preset("smoke", tasks=("synthetic", "conv-synthetic")), 2)


def test_the_compiled_iteration_is_not_shared_between_models():
    mlp = PES(preset("smoke", tasks=("synthetic",)), 1)
    conv = PES(preset("smoke", tasks=("conv-synthetic",)), 1)
    assert mlp.in_dim == conv.in_dim == 64
    assert jitted_iteration(mlp, None, None) is not jitted_iteration(conv, None, None)
    assert jitted_iteration(conv, None, None) is jitted_iteration(PES(preset("smoke", tasks=("conv-synthetic",)), 1),
                                                                  None, None)


@pytest.mark.parametrize("tasks", [("conv-synthetic",), ("test-text-tiny",)])
def test_a_few_outer_iterations_of_meta_training_on_a_new_family(tasks, tiny_text_family, tmp_path):
    from celo2 import Theta
    from celo2.metatrain import meta_train
    from celo2.metatrain.config import BYTE_META_LOSS_CLIP
    from celo2.metatrain.trainer import read_metrics

    clip = BYTE_META_LOSS_CLIP if tasks == ("test-text-tiny",) else SMOKE.meta_loss_clip
    config = preset("smoke", tasks=tasks, pairs_per_task=1, batch_size=4, iterations=3, checkpoint_every=3,
                    meta_loss_clip=clip, augmentation="none")
    result = meta_train(config, tmp_path / "run", progress=False, log=lambda msg: None)
    rows = read_metrics(tmp_path / "run")
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    assert all(0 < r["meta_loss"] < clip for r in rows)  # real losses, not the clip
    assert np.all(np.isfinite(result.theta.to_flat()))
    assert not result.theta.allclose(Theta.init(config.seed))
