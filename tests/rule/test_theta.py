"""Theta I/O: every format, every failure names what is wrong, nothing half-loaded."""

from __future__ import annotations

import json

import numpy as np
import pytest

import celo2
from celo2.rule import spec
from celo2.rule.theta import ThetaError
from celo2.theta_files import ThetaNotFoundError, load_theta, save_theta


def test_three_published_formats_hold_the_same_numbers(reference_dir):
    a = load_theta(reference_dir / "celo2_official_theta.state")
    b = load_theta(reference_dir / "celo2_official_theta.npz")
    c = load_theta(reference_dir / "celo2_official_theta_pylo.pt")
    assert a.num_params == spec.NUM_THETA_PARAMS == 347
    assert a.allclose(b) and a.allclose(c)
    assert a.checksum() == b.checksum() == c.checksum()


def test_group_widths_match_the_published_first_layer(published_theta):
    for group in spec.FEATURE_GROUPS:
        assert published_theta[f"w0__{group.index}"].shape[0] == group.width
    assert spec.NUM_FEATURES == 30 and spec.NUM_VECTOR_FEATURES == 15


def test_saving_the_authors_format_reproduces_their_file_byte_for_byte(published_theta_path, tmp_path):
    theta = load_theta(published_theta_path)
    out = save_theta(theta, tmp_path / "theta.state")
    assert out.read_bytes() == published_theta_path.read_bytes()


def test_flax_reads_what_we_write(random_theta, tmp_path):
    serialization = pytest.importorskip("flax.serialization")
    path = save_theta(random_theta, tmp_path / "theta.state")
    tree = serialization.msgpack_restore(path.read_bytes())
    for key in spec.THETA_KEYS:
        np.testing.assert_array_equal(tree["ff_mod_stack"]["~"][key], random_theta[key])


@pytest.mark.parametrize("suffix", [".state", ".npz", ".pt"])
def test_round_trip_every_format(random_theta, tmp_path, suffix):
    random_theta.metadata["note"] = "kept in npz"
    path = save_theta(random_theta, tmp_path / f"theta{suffix}")
    back = load_theta(path)
    assert back.allclose(random_theta)
    if suffix == ".npz":
        assert back.metadata["note"] == "kept in npz"


def test_pylo_layout_is_out_by_in(random_theta, tmp_path):
    torch = pytest.importorskip("torch")
    path = save_theta(random_theta, tmp_path / "theta.pt")
    state = torch.load(path, weights_only=True)
    assert tuple(state["first_layer_weights.3"].shape) == (8, 3)
    assert tuple(state["output.weight"].shape) == (3, 8)
    np.testing.assert_array_equal(state["hidden.weight"].numpy(), random_theta["w1"].T)


def test_flat_round_trip_and_init_statistics():
    theta = celo2.Theta.init(seed=0)
    assert celo2.Theta.from_flat(theta.to_flat()).allclose(theta)
    w0 = theta.first_layer()
    assert w0.shape == (30, 8)
    assert np.all(np.abs(w0) <= 2.0 / np.sqrt(30) + 1e-7)
    assert 0.5 / np.sqrt(30) < w0.std() < 1.5 / np.sqrt(30)
    assert np.all(theta["b0"] == 0) and np.all(theta["b2"] == 0)
    assert not celo2.Theta.init(seed=1).allclose(theta)


def _arrays(theta):
    return {k: v.copy() for k, v in theta.arrays.items()}


def test_missing_key_is_named(random_theta):
    arrays = _arrays(random_theta)
    del arrays["w1"]
    with pytest.raises(ThetaError, match="missing theta key.*w1"):
        load_theta(arrays)


def test_wrong_shape_is_named(random_theta):
    arrays = _arrays(random_theta)
    arrays["w0__3"] = np.zeros((2, 8), np.float32)
    with pytest.raises(ThetaError, match=r"'w0__3' has shape \(2, 8\), expected \(3, 8\)"):
        load_theta(arrays)


def test_unknown_key_and_non_finite_are_rejected(random_theta):
    arrays = _arrays(random_theta)
    arrays["w3"] = np.zeros(3, np.float32)
    with pytest.raises(ThetaError, match="unknown theta key.*w3"):
        load_theta(arrays)
    arrays = _arrays(random_theta)
    arrays["b1"][2] = np.nan
    with pytest.raises(ThetaError, match="'b1' holds non-finite"):
        load_theta(arrays)


def test_pylo_missing_key_names_the_state_dict_key(random_theta, tmp_path):
    torch = pytest.importorskip("torch")
    state = {k: torch.from_numpy(v) for k, v in random_theta.to_pylo_state_dict().items()}
    del state["hidden.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ThetaError, match="hidden.bias"):
        load_theta(tmp_path / "bad.pt")


def test_unknown_format_is_named(tmp_path):
    path = tmp_path / "theta.txt"
    path.write_text("hello, not a theta")
    with pytest.raises(ThetaError, match="unknown theta file format"):
        load_theta(path)
    with pytest.raises(ThetaError, match="extension '.txt'"):
        save_theta(celo2.Theta.init(), tmp_path / "out.txt")


@pytest.mark.parametrize("suffix", [".state", ".npz", ".pt"])
def test_truncated_or_corrupted_files_never_half_load(random_theta, tmp_path, suffix):
    good = save_theta(random_theta, tmp_path / f"good{suffix}").read_bytes()
    rng = np.random.default_rng(0)
    cuts = sorted(set([1, 7, len(good) // 3, len(good) // 2, len(good) - 1]))
    for cut in cuts:
        bad = tmp_path / f"cut{cut}{suffix}"
        bad.write_bytes(good[:cut])
        with pytest.raises(ThetaError):
            load_theta(bad)
    # Flip bytes in the middle: either rejected, or (if the damage hit only
    # padding) identical to the original; never a different, partial theta.
    for trial in range(5):
        data = bytearray(good)
        pos = int(rng.integers(len(data) // 4, len(data) - 4))
        data[pos : pos + 4] = b"\xff\x00\xfe\x01"
        bad = tmp_path / f"flip{trial}{suffix}"
        bad.write_bytes(bytes(data))
        try:
            back = load_theta(bad)
        except ThetaError:
            continue
        assert back.num_params == spec.NUM_THETA_PARAMS
        assert all(np.all(np.isfinite(back[k])) for k in spec.THETA_KEYS)


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.state").write_bytes(b"")
    with pytest.raises(ThetaError, match="empty file"):
        load_theta(tmp_path / "empty.state")
    with pytest.raises(ThetaNotFoundError, match="not found"):
        load_theta(tmp_path / "nope.state")


def test_default_theta_missing_explains_how_to_get_one(monkeypatch, tmp_path):
    import celo2.theta_files as theta_module

    monkeypatch.setattr(theta_module, "default_theta_path", lambda: tmp_path / "absent.state")
    with pytest.raises(ThetaNotFoundError, match="meta-train"):
        load_theta()


def test_default_theta_reads_the_shipped_file_and_metadata(monkeypatch, tmp_path, random_theta):
    import celo2.theta_files as theta_module

    path = save_theta(random_theta, tmp_path / "celo2_theta.state")
    path.with_suffix(".json").write_text(json.dumps({"iterations": 5}))
    monkeypatch.setattr(theta_module, "default_theta_path", lambda: path)
    theta = load_theta()
    assert theta.allclose(random_theta) and theta.metadata["iterations"] == 5


def test_folder_with_theta_state(tmp_path, random_theta):
    save_theta(random_theta, tmp_path / "theta.state")
    assert load_theta(tmp_path).allclose(random_theta)
