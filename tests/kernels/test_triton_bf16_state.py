"""bfloat16 state in the Triton kernels (issue 28), under the interpreter: every accumulator is computed in
float32 and stored rounded stochastically exactly as :mod:`celo2.rule.rounding` says, bit for bit."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from celo2.rule import rounding
from celo2.torch import rule


@dataclass
class _Rounding:
    seed: int
    steps: list
    tensors: list


def _bf16_state(param: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A state off zero (positive statistics), stored in bfloat16."""
    state = rule.init_tensor_state(param)
    out = {}
    for key, value in state.items():
        x = torch.randn(value.shape, generator=gen) * 0.1
        out[key] = (x.abs() + 0.01 if key in ("v", "fac_r", "fac_c") else x).to(torch.bfloat16)
    return out


def _expected_bits(state32: dict[str, torch.Tensor], seed: int, step: int, tensor: int) -> dict[str, np.ndarray]:
    return {key: rounding.stochastic_round(value.numpy(), seed=seed, step=step, tensor=tensor, slot=key)
            for key, value in state32.items() if value.numel()}


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(np.uint16)


SHAPES = [(37,), (24, 7), (7, 24), (40, 30), (3, 4, 5), (6, 5, 3, 3)]


@pytest.mark.parametrize("apply", [False, True], ids=["direction", "apply_step"])
def test_bfloat16_state_matches_the_numpy_reference_bit_for_bit(tk, random_theta, apply):
    """Several tensors in one call (several groups), two steps: the stored bits are
    :func:`celo2.rule.rounding.stochastic_round` of the float32 step's new state, and the direction (or
    the parameter) is the float32 state's step on the same values."""
    net = tk.pack_net(random_theta, "cpu")
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    states = [_bf16_state(p, gen) for p in params]
    seed, tensor_ids = 2**32 - 5, [3 + 2 * i for i in range(len(SHAPES))]
    steps = [torch.tensor(s, dtype=torch.int64) for s in (1, 7, 2**32 + 9, 5, 11, 2)]
    for t in range(2):
        grads = [torch.randn(s, generator=gen) for s in SHAPES]
        grads[1][2, 3] = float("nan")  # propagated: NaN state stays NaN, its quiet bit set
        states32 = [{k: v.float() for k, v in st.items()} for st in states]
        p32 = [p.clone() for p in params]
        if apply:
            ref = tk.apply_step_many(net, states32, grads, p32, 0.01, 0.1, skip_nonfinite=False)
            got = tk.apply_step_many(net, states, grads, params, 0.01, 0.1, skip_nonfinite=False,
                                     rounding=_Rounding(seed, steps, tensor_ids))
        else:
            ref = [d for d, _ in tk.direction_many(net, states32, grads, p32, skip_nonfinite=False)]
            got = [d for d, _ in tk.direction_many(net, states, grads, params, skip_nonfinite=False,
                                                   rounding=_Rounding(seed, steps, tensor_ids))]
        for k, shape in enumerate(SHAPES):
            expected = _expected_bits(states32[k], seed, int(steps[k]) % 2**32, tensor_ids[k])
            for key, bits in expected.items():
                assert states[k][key].dtype == torch.bfloat16
                assert np.array_equal(_bits(states[k][key]), bits), f"{shape} state[{key}] step {t}"
            if apply:
                assert torch.equal(params[k], p32[k]) or (k == 1 and torch.isnan(params[k]).all()), shape
            else:
                assert torch.equal(got[k], ref[k]) or (k == 1 and torch.isnan(got[k]).any()), shape
        assert torch.isnan(states[1]["m"][:, 2, 3].float()).all()
        steps = [s + 1 for s in steps]


def test_bfloat16_state_is_skipped_bitwise(tk, random_theta):
    net = tk.pack_net(random_theta, "cpu")
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(s, generator=gen) for s in ((24, 7), (37,))]
    states = [_bf16_state(p, gen) for p in params]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    grads[0][0, 0] = float("inf")
    before = [{k: v.clone() for k, v in st.items()} for st in states]
    oks = tk.apply_step_many(net, states, grads, params, 0.01, 0.1,
                             rounding=_Rounding(7, [torch.tensor(1), torch.tensor(1)], [0, 1]))
    assert [float(ok) for ok in oks] == [0.0, 1.0]
    assert all(torch.equal(before[0][k], states[0][k]) for k in before[0])
    assert not torch.equal(before[1]["m"], states[1]["m"])


def test_bfloat16_state_needs_rounding_and_float32_state_refuses_it(tk, random_theta):
    net = tk.pack_net(random_theta, "cpu")
    param = torch.randn(6, 4)
    state32 = rule.init_tensor_state(param)
    state16 = {k: v.to(torch.bfloat16) for k, v in state32.items()}
    with pytest.raises(ValueError, match=r"state\['m'\] must be float32"):
        tk.direction(net, state16, param, param)
    with pytest.raises(ValueError, match=r"state\['m'\] must be bfloat16"):
        tk.direction(net, state32, param, param, rounding=_Rounding(0, [torch.tensor(1)], [0]))
    with pytest.raises(ValueError, match="rounding steps must be 0-d int64"):
        tk.direction(net, state16, param, param, rounding=_Rounding(0, [torch.tensor(1.0)], [0]))
