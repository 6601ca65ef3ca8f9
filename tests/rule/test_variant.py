"""Rule variants as data: defaults, validation, serialisation, theta shapes, files, the kernels' refusal."""

from __future__ import annotations

import io
import json
import zipfile

import msgpack
import numpy as np
import pytest

from celo2 import Theta, load_theta, save_theta
from celo2.rule import layout, spec
from celo2.rule.theta import ThetaError
from celo2.rule.variant import (ALL_GROUPS, PUBLISHED, RuleVariant, VariantError, VariantNotSupportedError,
                                parse_field)
from celo2.theta_files import formats

SMALL = RuleVariant(hidden_width=4, hidden_layers=3, rms_decay=0.999, feature_groups=("m", "g", "row", "fac_m"),
                    output_norm="none", outputs="direction+magnitude")
VARIANTS = [
    RuleVariant(hidden_width=4),
    RuleVariant(hidden_width=16),
    RuleVariant(hidden_layers=1),
    RuleVariant(rms_decay=0.999),
    RuleVariant(momentum_decays=(0.5, 0.9, 0.95), factored_decays=(0.8, 0.9, 0.99)),
    RuleVariant(feature_groups=("g", "m", "v", "col")),
    RuleVariant(output_norm="none"),
    RuleVariant(outputs="direction+magnitude"),
    SMALL,
]


def test_published_is_the_spec():
    assert PUBLISHED == RuleVariant()
    assert PUBLISHED.is_published and not RuleVariant(hidden_width=4).is_published
    assert PUBLISHED.hidden_width == spec.HIDDEN_SIZE and PUBLISHED.hidden_layers == spec.HIDDEN_LAYERS
    assert PUBLISHED.rms_decay == spec.RMS_DECAY
    assert PUBLISHED.momentum_decays == spec.MOMENTUM_DECAYS
    assert PUBLISHED.factored_decays == spec.FACTORED_DECAYS
    assert PUBLISHED.groups == spec.FEATURE_GROUPS
    assert PUBLISHED.vector_groups == spec.FEATURE_GROUPS[: spec.VECTOR_GROUPS]
    assert PUBLISHED.theta_shapes() == spec.theta_shapes()
    assert PUBLISHED.theta_keys == spec.THETA_KEYS
    assert PUBLISHED.num_theta_params == spec.NUM_THETA_PARAMS == 347
    assert PUBLISHED.num_features == spec.NUM_FEATURES
    assert PUBLISHED.differences() == [] and PUBLISHED.label == "published"


def test_variant_shapes():
    shapes = SMALL.theta_shapes()
    assert shapes == {
        "w0__0": (1, 4), "w0__3": (3, 4), "w0__9": (3, 4), "w0__13": (3, 4), "b0": (4,),
        "w1": (4, 4), "b1": (4,), "w2": (4, 4), "b2": (4,), "w3": (4, 3), "b3": (3,),
    }
    assert SMALL.feature_groups == ("g", "m", "row", "fac_m")  # spec order, whatever order was given
    assert [g.name for g in SMALL.vector_groups] == ["g", "m"]
    assert SMALL.num_features == 10 and SMALL.output_key == "w3"
    assert SMALL.num_theta_params == sum(int(np.prod(s)) for s in shapes.values())
    assert RuleVariant(hidden_layers=1).theta_keys[-2:] == ("w1", "b1")


@pytest.mark.parametrize("changes, field", [
    ({"hidden_width": 0}, "hidden_width"),
    ({"hidden_width": 2.5}, "hidden_width"),
    ({"hidden_layers": True}, "hidden_layers"),
    ({"rms_decay": 1.0}, "rms_decay"),
    ({"rms_decay": float("nan")}, "rms_decay"),
    ({"momentum_decays": (0.9, 0.99)}, "momentum_decays"),
    ({"factored_decays": (0.9, 0.99, -0.1)}, "factored_decays"),
    ({"feature_groups": ()}, "feature_groups"),
    ({"feature_groups": ("g", "nope")}, "feature_groups"),
    ({"feature_groups": ("g", "g")}, "feature_groups"),
    ({"feature_groups": ("row", "col")}, "feature_groups"),
    ({"output_norm": "l2"}, "output_norm"),
    ({"outputs": "magnitude"}, "outputs"),
])
def test_bad_fields_are_named(changes, field):
    with pytest.raises(VariantError, match=f"rule variant: {field}="):
        RuleVariant(**changes)


def test_json_is_stable_and_round_trips():
    text = PUBLISHED.to_json()
    assert text == (
        '{"factored_decays":[0.9,0.99,0.999],"feature_groups":["g","clip_g","p","m","v","m_rsqrt_v","rsqrt_v",'
        '"fac_g","g_rsqrt_v","row","col","rsqrt_row","rsqrt_col","fac_m"],"hidden_layers":2,"hidden_width":8,'
        '"momentum_decays":[0.9,0.99,0.999],"output_norm":"rms","outputs":"direction","rms_decay":0.95}')
    for variant in [PUBLISHED, *VARIANTS]:
        assert RuleVariant.from_json(variant.to_json()) == variant
        assert RuleVariant.from_dict(json.loads(json.dumps(variant.to_dict()))) == variant
    assert RuleVariant.from_dict({"hidden_width": 4}) == RuleVariant(hidden_width=4)  # the rest: published
    numpy_typed = RuleVariant(hidden_width=np.int64(4), rms_decay=np.float32(0.5))
    assert numpy_typed.to_json() == RuleVariant(hidden_width=4, rms_decay=0.5).to_json()


def test_bad_records_are_named():
    with pytest.raises(VariantError, match="unknown rule variant field.*width"):
        RuleVariant.from_dict({"width": 4})
    with pytest.raises(VariantError, match="here: malformed rule variant record"):
        RuleVariant.from_json("{", origin="here")
    with pytest.raises(VariantError, match="a mapping of fields"):
        RuleVariant.from_json("[1]")


def test_differences_and_label():
    assert RuleVariant(hidden_width=4, rms_decay=0.999).differences() == [
        "hidden_width=4 (published 8)", "rms_decay=0.999 (published 0.95)"]
    assert RuleVariant(outputs="direction+magnitude").label == "outputs=direction+magnitude"


def test_parse_field():
    assert parse_field("hidden_width", "4") == 4
    assert parse_field("rms_decay", "0.999") == 0.999
    assert parse_field("momentum_decays", "0.5,0.9,0.99") == (0.5, 0.9, 0.99)
    assert parse_field("feature_groups", "g, m") == ("g", "m")
    assert parse_field("feature_groups", "all") == ALL_GROUPS
    with pytest.raises(VariantError, match="hidden_width='x'"):
        parse_field("hidden_width", "x")
    with pytest.raises(VariantError, match="unknown field 'depth'"):
        parse_field("depth", "3")


# -- thetas of variants ------------------------------------------------------------------------
def test_theta_of_a_variant():
    theta = Theta.init(3, SMALL)
    assert theta.variant == SMALL and theta.num_params == SMALL.num_theta_params
    assert list(theta.arrays) == list(SMALL.theta_keys)
    assert theta.first_layer().shape == (10, 4) and theta.first_layer(vector=True).shape == (4, 4)
    assert Theta.from_flat(theta.to_flat(), variant=SMALL).allclose(theta)
    with pytest.raises(ThetaError, match="347 values, got"):
        Theta.from_flat(theta.to_flat())
    with pytest.raises(ThetaError, match=r"'w0__0' has shape \(1, 8\), expected \(1, 4\) \(rule variant hidden_wi"):
        Theta(Theta.init(0).arrays, variant=RuleVariant(hidden_width=4))
    with pytest.raises(KeyError, match=r"theta of rule variant .* has no array 'w2'"):
        Theta.init(0, RuleVariant(hidden_layers=1))["w2"]


def test_published_theta_is_unchanged():
    theta = Theta.init(0)
    assert theta.variant is PUBLISHED and theta.num_params == 347
    assert theta.checksum() == "671cffa8b3e551ba"  # the value before variants existed


def test_checksum_tells_variants_with_equal_values_apart():
    a = Theta.init(0)
    b = Theta.from_flat(a.to_flat(), variant=RuleVariant(rms_decay=0.999))
    assert a.checksum() != b.checksum() and not a.allclose(b)


@pytest.mark.parametrize("suffix", [".state", ".npz", ".pt"])
@pytest.mark.parametrize("variant", [VARIANTS[2], VARIANTS[3], SMALL], ids=lambda v: v.label)
def test_variant_theta_round_trips_through_every_format(tmp_path, suffix, variant):
    theta = Theta.init(7, variant)
    path = save_theta(theta, tmp_path / f"theta{suffix}")
    back = load_theta(path)
    assert back.variant == variant and back.allclose(theta) and back.checksum() == theta.checksum()
    again = save_theta(back, tmp_path / f"again{suffix}")
    assert load_theta(again).allclose(theta)


def test_published_files_carry_no_variant_record():
    theta = Theta.init(1)
    tree = msgpack.unpackb(formats.theta_to_flax_bytes(theta), raw=False, ext_hook=lambda c, d: None)
    assert list(tree) == ["ff_mod_stack"]
    with zipfile.ZipFile(io.BytesIO(formats.theta_to_npz_bytes(theta))) as archive:
        names = archive.namelist()
        assert "__variant__.npy" not in names
        assert "celo2-theta-v2".encode("utf-32-le") in archive.read("__format__.npy")
    import torch

    state = torch.load(io.BytesIO(formats.theta_to_pylo_bytes(theta)), weights_only=True)
    assert formats.VARIANT_KEY not in state


def test_variant_record_that_does_not_fit_the_arrays_is_named(tmp_path):
    data = formats.theta_to_flax_bytes(Theta.init(0, RuleVariant(hidden_width=4)))
    tree = msgpack.unpackb(data, raw=False, ext_hook=lambda c, d: msgpack.ExtType(c, d))
    tree[formats.VARIANT_KEY] = RuleVariant(hidden_width=5).to_json()
    path = tmp_path / "wrong.state"
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    with pytest.raises(ThetaError, match=rf"{path}: theta key 'w0__0' has shape \(1, 4\), expected \(1, 5\)"):
        load_theta(path)
    tree[formats.VARIANT_KEY] = '{"hidden_width": 0}'
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    with pytest.raises(ThetaError, match=rf"{path}: rule variant record: rule variant: hidden_width=0"):
        load_theta(path)
    del tree[formats.VARIANT_KEY]  # no record: the published shapes are expected
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    with pytest.raises(ThetaError, match=rf"{path}: theta key 'w0__0' has shape \(1, 4\), expected \(1, 8\)"):
        load_theta(path)


def test_npz_checksum_covers_the_variant(tmp_path):
    path = save_theta(Theta.init(0, RuleVariant(rms_decay=0.999)), tmp_path / "t.npz")
    with np.load(path) as f:
        members = {k: f[k] for k in f.files}
    assert str(members["__format__"]) == "celo2-theta-v3"
    members["__variant__"] = np.asarray(RuleVariant(rms_decay=0.99).to_json())  # same shapes, other rule
    np.savez(tmp_path / "edited.npz", **members)
    with pytest.raises(ThetaError, match="checksum mismatch"):
        load_theta(tmp_path / "edited.npz")
    del members["__variant__"]
    np.savez(tmp_path / "stripped.npz", **members)
    with pytest.raises(ThetaError, match="celo2-theta-v3 without a __variant__ record"):
        load_theta(tmp_path / "stripped.npz")


def test_pack_theta_refuses_other_variants():
    assert layout.pack_theta(Theta.init(0)).shape == (layout.NET_SIZE,)
    with pytest.raises(VariantNotSupportedError) as info:
        layout.pack_theta(Theta.init(0, RuleVariant(rms_decay=0.999, output_norm="none")))
    message = str(info.value)
    assert "rms_decay=0.999 (published 0.95)" in message and "output_norm=none (published rms)" in message
    assert "meta-training" in message and "scoring" in message
