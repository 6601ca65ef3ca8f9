"""Newton-Schulz batched over shape groups: the same matrices as one matrix at a
time in float32, close in bfloat16, and the groups and batches the shapes call for."""

from __future__ import annotations

import pytest
import torch

from celo2 import hardware
from celo2.torch import ns
from celo2.torch.backends.reference import reference_newton_schulz
from celo2.torch import rule

# Wide, tall (joins the wide group of its transpose), another wide of the same
# shape, a lone large one (column blocks), a square pair, conv-like windows.
MIXED = [(24, 40), (40, 24), (24, 40), (300, 260), (16, 16), (16, 16), (5, 4, 3, 3), (2, 3, 3)]


def _mats(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in shapes]


def test_plan_groups_by_wide_shape_and_marks_transposed_members():
    plan = ns.plan_batches(MIXED)
    assert [(b.shape, b.members, b.transposed, b.counts) for b in plan] == [
        ((24, 40), (0, 1, 2), (False, True, False), (1, 1, 1)),
        ((260, 300), (3,), (True,), (1,)),
        ((16, 16), (4, 5), (False, False), (1, 1)),
        ((3, 3), (6, 7), (False, False), (20, 2)),
    ]


def test_plan_cuts_groups_at_max_elements():
    plan = ns.plan_batches([(10, 10)] * 5 + [(30, 30)], max_elements=250)
    assert [b.members for b in plan] == [(0, 1), (2, 3), (4,), (5,)]  # (30, 30) exceeds it alone
    assert all(b.numel <= 250 for b in plan[:3])
    # On the CPU only small matrices are stacked; a larger one is a batch alone.
    plan = ns.plan_batches([(10, 10), (30, 30), (10, 10), (30, 30)], max_member=200)
    assert [b.members for b in plan] == [(0, 2), (1,), (3,)]
    assert ns.batch_member_limit("cpu") == ns.CPU_BATCH_MEMBER_ELEMENTS and ns.batch_member_limit("meta") is None
    with pytest.raises(ValueError, match="tensor 1 has shape"):
        ns.plan_batches([(3, 3), (3,)])


def test_batched_float32_equals_one_matrix_at_a_time():
    mats = _mats(MIXED)
    got = ns.newton_schulz_many([m.clone() for m in mats], dtype=torch.float32)
    for m, out in zip(mats, got):
        assert out.shape == m.shape and out.dtype == torch.float32
        # Today's per-tensor function and the spelled-out formula.
        torch.testing.assert_close(out, rule.newton_schulz(m.clone()), rtol=0, atol=3e-6)
        torch.testing.assert_close(out, reference_newton_schulz(m), rtol=1e-4, atol=1e-5)


def test_inputs_are_kept_unless_in_place():
    mats = _mats(MIXED)
    copies = [m.clone() for m in mats]
    ns.newton_schulz_many(mats)
    for m, c in zip(mats, copies):
        assert torch.equal(m, c)
    big = _mats([(300, 260)])[0]
    out = ns.newton_schulz_many([big], inplace=True)[0]
    assert out.data_ptr() == big.data_ptr()  # a batch of one runs in the tensor's own storage


def test_bfloat16_is_close_to_float32():
    mats = _mats(MIXED, seed=1)
    ref = ns.newton_schulz_many(mats, dtype=torch.float32)
    got = ns.newton_schulz_many(mats, dtype=torch.bfloat16)
    for r, out in zip(ref, got):
        assert out.dtype == torch.bfloat16 and out.shape == r.shape
        rel = (out.float() - r).norm() / r.norm()
        assert rel < 3e-2, rel
    # Single tensors too, and the column-block path (large) in bfloat16.
    single = ns.newton_schulz(mats[3], dtype=torch.bfloat16)
    assert (single.float() - ref[3]).norm() / ref[3].norm() < 3e-2


def test_column_blocks_batched_equal_one_product():
    """A large batch is updated by column blocks on the CPU; the numbers are those of one product."""
    x = torch.randn(3, 128, 200, generator=torch.Generator().manual_seed(2))
    assert x.numel() > ns.NS_INPLACE_MIN
    expected = reference_newton_schulz(x)
    torch.testing.assert_close(ns.newton_schulz(x.clone(), inplace=True), expected, rtol=1e-4, atol=1e-5)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        ns.newton_schulz(torch.zeros(5))
    with pytest.raises(ValueError, match="ns_dtype='float16'"):
        ns.resolve_ns_dtype("float16", "cpu")


def test_ns_dtype_resolution(monkeypatch):
    assert ns.resolve_ns_dtype(torch.float32, "cpu") is torch.float32
    assert ns.resolve_ns_dtype("bfloat16", "cpu") is torch.bfloat16
    assert ns.resolve_ns_dtype("bf16", "meta") is torch.bfloat16
    assert ns.resolve_ns_dtype("auto", "meta") is torch.float32  # neither CUDA nor a CPU
    for native in (True, False):
        monkeypatch.setattr(hardware, "cpu_multiplies_bf16", lambda native=native: native)
        assert ns.resolve_ns_dtype("auto", "cpu") is (torch.bfloat16 if native else torch.float32)


def test_cpu_probe_reads_the_flags(tmp_path):
    hardware.cpu_multiplies_bf16.cache_clear()
    try:
        for flags, expected in (("fpu sse avx512f", False), ("fpu avx512f amx_bf16 amx_tile", True),
                                ("fpu avx512_bf16", True)):
            f = tmp_path / f"cpuinfo{expected}{len(flags)}"
            f.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
            assert hardware.cpu_multiplies_bf16(str(f)) is expected
        assert hardware.cpu_multiplies_bf16(str(tmp_path / "absent")) is False
    finally:
        hardware.cpu_multiplies_bf16.cache_clear()
