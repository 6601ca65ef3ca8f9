"""NaN stays NaN through the kernels' conversions to bfloat16 and float16, for every NaN bit pattern.

NVIDIA GPUs produce 0x7FFFFFFF for every float32 NaN; the interpreter produces
0x7FC00000. The held direction below carries each exact pattern into the
update's float32 arithmetic, whose result is then rounded to the parameter's
dtype: its NaN must survive the rounding (a NaN whose payload carries into
the sign bit would become a zero and silently erase the step's failure)."""

from __future__ import annotations

import pytest
import torch

NAN_BITS = {"0x7FFFFFFF": 0x7FFFFFFF, "0xFFFFFFFF": -1, "0x7FC00000": 0x7FC00000}


def _float32_from_bits(bits: list[int]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("pattern", list(NAN_BITS), ids=list(NAN_BITS))
@pytest.mark.parametrize("lr", [0.01, 0.0], ids=["lr", "zero-lr"])
def test_nan_bit_patterns_stay_nan_when_rounded_to_the_parameter_dtype(tk, dtype, pattern, lr):
    d = _float32_from_bits([0x3F800000] * 11 + [NAN_BITS[pattern]]).reshape(3, 4)  # 1.0 everywhere but one
    assert torch.isnan(d).sum() == 1 and d.view(torch.int32)[2, 3].item() == NAN_BITS[pattern]
    param = torch.full((3, 4), 0.5, dtype=dtype)
    tk.apply_held(param, d, torch.tensor(1.0), lr, 0.1)
    # The NaN reaches the group's output RMS, so every element of the update is NaN, and stays NaN.
    assert torch.isnan(param).all(), f"{pattern} -> {param.view(torch.int16 if dtype == torch.float16 else dtype)}"


@pytest.mark.parametrize("pattern", list(NAN_BITS), ids=list(NAN_BITS))
def test_nan_in_a_float32_parameter_update_stays_nan(tk, pattern):
    """The float32 path (no rounding) as the control."""
    d = _float32_from_bits([0x3F800000] * 5 + [NAN_BITS[pattern]])
    param = torch.full((6,), 0.5)
    tk.apply_held(param, d, torch.tensor(1.0), 0.01, 0.0)
    assert torch.isnan(param).all()


@pytest.mark.parametrize("value", [1.0, -3.5, 65504.0, 1.00390625, 1.01171875, float("inf"), float("-inf"), 0.0, -0.0])
def test_finite_and_infinite_values_round_as_before(tk, value):
    """The NaN guard changes nothing else: bfloat16 rounding to nearest even of ``p - lr d`` (lr 0:
    ``p`` itself) matches torch's own rounding."""
    src = torch.full((4,), value, dtype=torch.float32)
    param = src.to(torch.bfloat16)
    d = torch.ones(4)
    tk.apply_held(param, d, torch.tensor(1.0), 0.0, 0.0)
    assert torch.equal(param.view(torch.int16), src.to(torch.bfloat16).view(torch.int16))
