"""The 8-bit blockwise quantiser's NumPy reference (celo2.rule.blockwise8): pinned answers with given bits,
the code ranges, the rounding (stochastic, unbiased; nearest with NEAREST_BITS), the floor of positive second
moments, blocks and their tails, and non-finite values."""

from __future__ import annotations

import numpy as np
import pytest

from celo2.rule import blockwise8 as B
from celo2.rule import rounding as R


def test_pinned_codes_and_scales_with_given_bits():
    """Independent of the hash: the formula ``floor(x / scale + bits * 2**-16)`` on six values."""
    bits = np.array([0, 65535, 32768, 12345, 40000, 0], np.uint32)
    x = np.array([0.5, -1.27, 0.003, 1.0e-3, 0.0, 2.54], np.float32)
    codes, scales = B.quantise(x, bits, "m")
    assert codes.dtype == np.int8 and codes.tolist() == [25, -63, 0, 0, 0, 127]
    assert scales.view(np.uint32).tolist() == [1017370378]  # float32(2.54) * float32(1 / 127) = 0.02
    v = np.array([4.0, 1e-12, 0.25, 0.0, 1.0, 9.0], np.float32)
    codes, scales = B.quantise(v, bits, "v")
    # sqrt: 2, 1e-6, 0.5, 0, 1, 3 with the step 3 * float32(1/255), a hair above 3/255 (so 3 is 254.99998 steps,
    # 254 with bits 0); 1e-6 would round to 0 but a positive value keeps code 1.
    assert codes.dtype == np.uint8 and codes.tolist() == [169, 1, 42, 0, 85, 254]
    assert scales.view(np.uint32).tolist() == [1010876610]
    np.testing.assert_array_equal(B.dequantise(codes, scales, "v"), (codes.astype(np.float32) * scales[0]) ** 2)


def test_stochastic_quantise_takes_the_bits_of_the_shared_counter():
    x = np.random.default_rng(0).standard_normal((3, 7, 50)).astype(np.float32)
    for key in ("m", "v", "exp_avg", "exp_avg_sq"):
        value = np.abs(x) if B.is_second_moment(key) else x
        got = B.stochastic_quantise(value, seed=7, step=3, tensor=2, key=key)
        stream = R.stream_key(7, 3, 2, R.SLOTS[key])
        want = B.quantise(value, R.random_bits(stream, np.arange(x.size).reshape(x.shape)), key)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    other = B.stochastic_quantise(x, seed=7, step=4, tensor=2, key="m")
    assert not np.array_equal(other[0], B.stochastic_quantise(x, seed=7, step=3, tensor=2, key="m")[0])


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000])
@pytest.mark.parametrize("key", ["m", "fac_c"])
def test_codes_stay_in_range_and_values_within_one_step(n, key):
    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * np.exp(3 * rng.standard_normal(n))).astype(np.float32)
    if B.is_second_moment(key):
        x = x * x
    bits = rng.integers(0, 1 << 16, n).astype(np.uint32)
    codes, scales = B.quantise(x, bits, key)
    assert codes.shape == x.shape and codes.dtype == B.code_dtype(key)
    assert scales.shape == (B.scale_count(n),) and scales.dtype == np.float32
    per = np.repeat(scales, B.BLOCK_ELEMENTS)[:n]
    back = B.dequantise(codes, scales, key)
    if B.is_second_moment(key):
        assert codes.min() >= 0 and codes.max() <= 255
        assert np.all(np.abs(np.sqrt(back) - np.sqrt(x)) <= per * (1 + 1e-6))
        assert np.all((back > 0) == (x > 0))  # no positive value decodes to 0
    else:
        assert codes.min() >= -127 and codes.max() <= 127
        assert np.all(np.abs(back - x) <= per * (1 + 1e-6))


def test_nearest_bits_round_to_the_nearest_code():
    x = np.linspace(-3, 3, 600, dtype=np.float32)
    codes, scales = B.quantise(x, B.NEAREST_BITS, "m")
    per = np.repeat(scales, B.BLOCK_ELEMENTS)[:x.size]
    assert np.all(np.abs(codes * per - x) <= per / 2 * (1 + 1e-5))


def test_stochastic_rounding_is_unbiased():
    """Every bit pattern once: the mean decoded value is the value, to within 2**-16 of a code step."""
    x = np.full(B.BLOCK_ELEMENTS, 0.3, np.float32)
    x[0] = 1.0  # the block's scale: 1/127
    total = np.zeros_like(x, dtype=np.float64)
    for b in range(0, 1 << 16, 64):
        total += B.dequantise(*B.quantise(x, b, "m"), "m")
    mean = total / (1 << 10)
    assert abs(mean[1] - 0.3) < (1 / 127) * 2 ** -9  # the sampled bits are spaced 64 apart


def test_a_block_with_a_non_finite_value_decodes_to_nan_and_others_are_untouched():
    x = np.ones(3 * B.BLOCK_ELEMENTS + 10, np.float32)
    x[B.BLOCK_ELEMENTS + 3] = np.nan
    x[-1] = np.inf
    for key in ("m", "v"):
        codes, scales = B.quantise(x, 0, key)
        assert np.isnan(scales[1]) and np.isnan(scales[3]) and np.isfinite(scales[[0, 2]]).all()
        back = B.dequantise(codes, scales, key)
        assert np.isnan(back[B.BLOCK_ELEMENTS:2 * B.BLOCK_ELEMENTS]).all() and np.isnan(back[-10:]).all()
        alone = B.dequantise(*B.quantise(x[:B.BLOCK_ELEMENTS], 0, key), key)
        np.testing.assert_array_equal(back[:B.BLOCK_ELEMENTS], alone)
        assert np.isfinite(alone).all()


def test_a_block_of_zeros_has_scale_zero_and_decodes_to_zeros():
    x = np.zeros(300, np.float32)
    x[:256] = -0.0
    for key in ("m", "v"):
        codes, scales = B.quantise(x, 65535, key)
        assert (codes == 0).all() and (scales == 0).all()
        assert (B.dequantise(codes, scales, key) == 0).all()


def test_state_formats_and_names():
    assert B.check_state_format("int8") == "int8" and B.check_state_format("torch.int8") == "int8"
    assert B.check_state_format("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="float32, bfloat16, int8; got 'int4'"):
        B.check_state_format("int4")
    assert [B.code_dtype(k) for k in ("m", "v", "exp_avg", "exp_avg_sq")] == [np.int8, np.uint8, np.int8, np.uint8]
