"""The stochastic rounding of bfloat16 state (celo2.rule.rounding): the reference every backend follows."""

from __future__ import annotations

import numpy as np
import pytest

from celo2.rule import rounding


def test_mix32_is_pinned_and_a_bijection_on_a_sample():
    # Known answers: every backend's hash is tested against these same numbers.
    assert rounding.mix32(np.arange(4)).tolist() == [0, 2261973619, 229111015, 3983417082]
    sample = rounding.mix32(np.arange(1 << 16, dtype=np.uint32) * np.uint32(40503))
    assert len(np.unique(sample)) == 1 << 16


def test_stream_key_and_bits_are_pinned():
    assert rounding.stream_key(0, 1, 0, 1) == 2196780706
    assert rounding.stream_key(7, 3, 2, 4) == 1714008317
    bits = rounding.random_bits(rounding.stream_key(0, 1, 0, 1), np.arange(6))
    assert bits.tolist() == [33593, 61936, 20718, 62055, 56476, 5043]


def test_every_counter_field_changes_the_bits():
    base = dict(seed=0, step=1, tensor=0, slot=1)
    key = rounding.stream_key(**base)
    for field in base:
        other = dict(base, **{field: base[field] + 1})
        assert rounding.stream_key(**other) != key, field


def test_representable_values_and_infinities_are_kept():
    x = np.float32([0.0, -0.0, 1.0, -2.5, 3.0e38, np.inf, -np.inf, 1e-40])
    x = rounding.bfloat16_to_float32(rounding.round_to_bfloat16(x, 0))  # representable after one rounding
    for bits in (0, 1, 0xFFFF):
        out = rounding.bfloat16_to_float32(rounding.round_to_bfloat16(x, bits))
        np.testing.assert_array_equal(out.view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("pattern", [0x7FFFFFFF, 0xFFFFFFFF, 0x7FC00000, 0x7F800001, 0xFF800001])
def test_nan_stays_nan_for_every_pattern_and_bits(pattern):
    x = np.array([pattern], dtype=np.uint32).view(np.float32)
    for bits in (0, 1, 0x7FFF, 0xFFFF):
        out = rounding.bfloat16_to_float32(rounding.round_to_bfloat16(x, bits))
        assert np.isnan(out).all(), hex(pattern)


def test_rounds_to_a_neighbour_with_the_right_probability():
    # 1 + f * ulp lies between two bfloat16 values; it must round up with probability f.
    ulp = 2.0 ** -7
    for f in (0.03, 0.25, 0.5, 0.9):
        x = np.full(200_000, 1.0 + f * ulp, dtype=np.float32)
        out = rounding.bfloat16_to_float32(rounding.stochastic_round(x, seed=5, step=9, tensor=3, slot="v"))
        assert set(np.unique(out).tolist()) <= {1.0, 1.0 + ulp}
        up = float(np.mean(out > 1.0))
        assert abs(up - f) < 0.005, (f, up)


def test_unbiased_where_round_to_nearest_is_not():
    x = np.full(100_000, -(1.0 + 0.3 * 2.0 ** -7), dtype=np.float32)
    out = rounding.bfloat16_to_float32(rounding.stochastic_round(x, seed=1, step=1, tensor=0, slot="m"))
    assert abs(float(out.mean()) - float(x[0])) < 2e-5


def test_offset_gives_the_whole_tensors_bits_to_a_run_of_it():
    x = np.linspace(-3, 3, 1000, dtype=np.float32) * np.float32(1.0001)
    whole = rounding.stochastic_round(x, seed=2, step=4, tensor=1, slot="fac_r")
    part = rounding.stochastic_round(x[300:700], seed=2, step=4, tensor=1, slot="fac_r", offset=300)
    np.testing.assert_array_equal(part, whole[300:700])


def test_state_dtype_names():
    assert rounding.check_state_dtype("torch.bfloat16") == "bfloat16"
    assert rounding.check_state_dtype("float32") == "float32"
    with pytest.raises(ValueError, match="state_dtype must be one of float32, bfloat16; got 'float16'"):
        rounding.check_state_dtype("float16")
