"""Fused Triton kernels for the rule on many tensors of any shapes at once (GPU; CPU under the interpreter).

The PyTorch front end calls these for accelerator tensors (``backend="triton"``)
instead of its chunked path, whose dispatch count grows with the tensors' sizes.
Here each pass of the rule runs for many tensors in one launch: the launches of
a step depend on the number of passes and of groups (below), never on the number
or sizes of the tensors. The kernels never synchronise with the host and never
read a tensor value on the host, so a step can be captured in a CUDA graph
(docs/cuda_graphs.md).

**Groups and tables.** A call's tensors (its *members*) are grouped by what a
kernel must know at compile time: the gradient, parameter and state dtypes,
whether the tensor is factored (two or more dims) or a vector, whether its
normalisation groups fit one tile, and the element tile. Each group has a
device table, one int64 row of :data:`FIELDS` per member: the addresses of its
gradient, parameter and accumulators, offsets into the call's one scratch
buffer (per-block partial sums, factored statistics, factors, the rank-1
first-layer terms), its sizes and geometry, and a few float32 constants as bit
patterns. The two factored statistics' fields are two blocks of
:data:`STAT_FIELDS`, the hi block :data:`STAT_STRIDE` columns after the lo one,
so a pass reads either statistic's fields from one column offset. Each
launch's programs are listed in a program map (int32 pairs: member, program of
that member), so a program reads its member's row and runs the one-tensor code
below on it. Tables and maps are built on the host once per
*call signature* (the members' addresses, shapes and dtypes, and for held
directions their addresses) and kept on the device (:data:`PLAN_CACHE_SIZE`
signatures, least recently used dropped): a step whose tensors sit where they
sat before copies nothing from the host. A call allocates its scratch, the
non-finite flags (one ``int32`` per member, zeroed: the call's one memset) and
the ``ok`` values afresh, so that calls never share buffers.

**One view of every shape.** A tensor (work shape ``S``: a 0-D tensor counts as
``(1,)``) is ``G`` normalisation groups of ``L`` contiguous elements: the whole
tensor for 0-D, 1-D and 2-D tensors, each leading index for ``N >= 3`` dims
(the input and output RMS are taken over the last two axes). A factored tensor
(two or more dims) is also viewed as the contiguous 5-D block
``(A, SH, B, SL, C)``, where ``SH`` and ``SL`` are the two factored axes of
:func:`celo2.rule.state.factoring` (``SH`` the earlier one). Its two
factored statistics are the tensor without ``SL`` (the "lo" statistic) and
without ``SH`` (the "hi" statistic); which of them is the row statistic (the
one without ``d0``) is a per-member field of the table (pointers, weights and
the counter slot), so every shape (conv kernels ``(O, I, kh, kw)`` as much as
``(3, 3, 4, 8)`` or a column) runs the same kernels. An element's statistic
indices follow from its flat index by integer division.

**Passes** (docs/architecture.md, "The passes of a fused step": the four
passes, with the reductions between them that the GPU launches apart), one
launch each per group. A factored group's direction:

1. ``_grad_stats``: reads ``g`` once; sums of ``clip(g)^2`` over ``SL``
   (complete per program) and per-block partial sums over ``SH``; raises the
   member's flag (``atomic_max`` on an integer: order-independent, hence
   deterministic) where ``g`` has a NaN or +-inf element;
2. ``_stat_reduce``: on the statistics folded on the fly, the row statistic's
   mean over ``d1`` and, per statistic group, the RMS of each statistic and of
   its ``rsqrt(. + eps)`` (the rank-1 channels' input normalisation);
3. ``_factors``: folds the statistics in place (unless the flag is up), writes
   the Adafactor factors and the rank-1 channels' share of the first layer
   (with ``b0``) per statistic element;
4. ``_accumulate``: folds ``g`` into ``m`` and ``v`` in registers and writes
   per-block partial sums of squares of the 18 per-element channels;
5. ``_reduce_groups``: the partials, summed in a fixed order, as each group's
   inverse input RMS per channel, and each member's ``ok``;
6. ``_direction``: folds ``g`` into ``m`` and ``v`` again and stores them
   (unless the flag is up), channels -> MLP -> the raw direction (written).

A vector group (15 channels, unfactored) takes ``_flag_pass`` (with the
non-finite skip only) instead of passes 1-3. :func:`apply_step_many`'s
direction pass also writes per-block sums of ``d^2``; a ``_reduce_groups`` and
``_held`` (the update from the direction just written) finish it: 8 launches
for a factored group, 6 for a vector group. :func:`apply_held_many` takes 3
per group. Storing the state in the direction pass rather than in
``_accumulate`` moves the same bytes and lets the direction read the float32
values of the folded state, as every backend does with bfloat16 state.

When every normalisation group fits one tile (``L <= TILE``: conv kernels and
other N-D tensors with small trailing axes, matrices and vectors of up to
``TILE`` elements), passes 4-6 are one launch, ``_fused``, which also applies
the direction with its groups' output RMS; then a direction and a Celo2-base
step both take 4 launches for a factored group and 2 for a vector group (1
without the skip), reading the full-size operands once after ``_grad_stats``.
Add one ``torch.zeros`` (the flags) per call.

Block sizes are fixed, or chosen per group from its largest member on the
host. The full-size streams per element of a step follow from these passes (a
matrix's Celo2-base step reads ``g`` three times, ``p``, ``m`` and ``v`` twice
and its direction once more with ``p``; it writes ``m``, ``v``, the direction
and ``p`` once); ``benchmarks/triton_traffic.py`` counts them from the
kernels' loads and stores.

**Determinism.** Every float reduction is a per-block partial reduced in a
fixed order by a later launch (or inside one program), so results do not
depend on scheduling or on which tensors share a launch; the only atomic is
the integer flag's maximum.

**Non-finite gradients.** The first pass that reads ``g`` raises the member's
flag in device memory; every later pass reads it: with ``skip_nonfinite`` the
state and parameter stores are masked off (state and parameter bitwise
unchanged), the written direction is zeros and ``ok`` is 0. A clean step stores
exactly what it would without the flag.

**Dtypes and layouts.** Gradients of any float dtype and parameters in
float32, bfloat16, float16 or float64 are loaded and cast to float32
explicitly. State is float32, or bfloat16 with ``rounding=``: read as float32,
every store rounded stochastically exactly as :mod:`celo2.rule.rounding` says
(the key from the seed, the member's step read from its device counter, its
tensor index and the accumulator's slot; 16 bits from the element's flat index
in the whole accumulator; NaN stays NaN). Parameter updates combine in float32
and round once (float64 parameters combine in float64). The kernels index
contiguous operands only: a non-contiguous gradient or parameter is copied to
a contiguous one first (an extra copy launch, and a new call signature), and a
non-contiguous parameter is updated through that copy and copied back; state
must be contiguous, shaped by :func:`celo2.rule.state.state_shapes` (as the
front end's ``init_tensor_state`` makes it). Element indices are 64-bit; a
tensor has fewer than :data:`MAX_ELEMENTS` elements.

**Devices.** Every launch runs on the parameters' device (:func:`launch_device`
makes it the current CUDA device around the launches; one call takes tensors of
one device); ``lr`` and weight decay are Python floats or 0-d tensors on that
device (:func:`check_scalar`).

Every constant comes from :mod:`celo2.rule.spec` and every offset from
:mod:`celo2.rule.layout` (as ``tl.constexpr`` module values). Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, so the interpreter mode is
fixed when this module is first imported (:data:`INTERPRETED`).
"""

from __future__ import annotations

import collections
import contextlib
import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from celo2.rule import layout, rounding, spec
from celo2.rule.state import STATE_KEYS, factoring, state_shapes, work_shape

try:  # Triton is optional: without it the front end keeps its other backends.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

AVAILABLE: bool = triton is not None
"""Whether Triton is installed."""

INTERPRETED: bool = bool(AVAILABLE and triton.knobs.runtime.interpret)
"""Whether the kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` at import): on CPU tensors."""

TILE: int = 1024
"""Elements per program of the element passes (a power of two)."""

MAX_ELEMENTS: int = 1 << 31
"""Tensors must have fewer elements (block counts and per-block partial offsets are 32-bit)."""

PARAM_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""Parameter dtypes the kernels take."""

STATE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16)
"""State dtypes the kernels read and write (bfloat16 with ``rounding=``)."""

STAT_FIELDS: tuple[str, ...] = (
    # the statistic's accumulator (address); offset of its sums of ``clip(g)^2`` in the scratch and their
    # partial rows (1 for lo, the blocks over ``SH`` for hi); its length and 1 / the length it sums over
    # (float32 bits)
    "fac", "tot", "parts", "n", "inv_count",
    # scratch offsets: its Adafactor factors, rank-1 first-layer terms, and its groups' input RMS
    "f", "t", "norm", "normr",
    # its normalisation groups (count, length); whether it is the row statistic (1) or not (0), its
    # first-layer weights' offset in the packed net and its bfloat16 counter slot
    "ng", "len", "is_row", "w", "slot",
    # an element's index in it: ``(n // span) * inner + n % inner``
    "inner", "span",
)
"""The fields of each factored statistic: in :data:`FIELDS` once with ``_lo`` and once with ``_hi`` appended,
in this order, so that a hi field sits :data:`STAT_STRIDE` columns after its lo field."""

STAT_STRIDE: int = len(STAT_FIELDS)
"""Columns from a lo statistic's field to the same field of the hi statistic."""

FIELDS: tuple[str, ...] = (
    # addresses of a member's operands
    "g", "p", "m", "v", "d", "ok", "step",
    # offsets into the call's scratch (``out``: into its output buffer for a raw direction)
    "out", "mean", "part", "inv", "sq", "scale",
    # sizes and geometry
    "n", "g_count", "l", "nlb", "sh", "b", "sl", "c", "nhb", "n_mean", "mean_s", "mean_q",
    # the member's index in the call (its flag and ``ok``); bfloat16 state: the tensor's index in the
    # optimizer's order
    "member", "tensor",
    # the two factored statistics (a vector's full-size statistic is ``fac_lo``)
    *(f"{k}_lo" for k in STAT_FIELDS),
    *(f"{k}_hi" for k in STAT_FIELDS),
)
"""The int64 fields of a member's row in its group's table (see the module docstring)."""

_FIELD: dict[str, int] = {name: k for k, name in enumerate(FIELDS)}
"""Each field's column."""

Scalar = Union[float, torch.Tensor]

# Direction-pass modes, the layout's names, and the fused pass's apply with its own output RMS.
WRITE, SQUARES, APPLY = (int(layout.DirectionMode.WRITE), int(layout.DirectionMode.SQUARES),
                         int(layout.DirectionMode.APPLY))
_APPLY_LOCAL = max(int(m) for m in layout.DirectionMode) + 1


def _f32(x: float) -> float:
    return float(np.float32(x))


def _one_minus(decay: float) -> float:
    """``1 - decay`` in float32 arithmetic, as the other backends compute their weights."""
    return float(np.float32(1.0) - np.float32(decay))


if AVAILABLE:
    _C = tl.constexpr
    # --- spec constants -------------------------------------------------------------
    _GRAD_CLIP = _C(_f32(spec.GRAD_CLIP))
    _FEATURE_CLIP = _C(_f32(spec.FEATURE_CLIP))
    _FEATURE_CLIP_SQ = _C(_f32(spec.FEATURE_CLIP**2))
    _RSQRT_EPS = _C(_f32(spec.RSQRT_EPS))
    _RMS_DECAY = _C(_f32(spec.RMS_DECAY))
    _RMS_W = _C(_f32(1.0 - spec.RMS_DECAY))
    _FACTORED_EPS = _C(_f32(spec.FACTORED_EPS))
    _VECTOR_FACTOR_EPS = _C(_f32(spec.VECTOR_FACTOR_EPS))
    _SAFE_RSQRT_FLOOR = _C(_f32(spec.SAFE_RSQRT_FLOOR))
    _ROW_MEAN_EPS = _C(_f32(spec.ROW_MEAN_EPS))
    _INPUT_NORM_EPS = _C(_f32(spec.INPUT_NORM_EPS))
    _OUTPUT_NORM_EPS = _C(_f32(spec.OUTPUT_NORM_EPS))
    _WM0, _WM1, _WM2 = (_C(_one_minus(b)) for b in spec.MOMENTUM_DECAYS)
    _WF0, _WF1, _WF2 = (_C(_one_minus(b)) for b in spec.FACTORED_DECAYS)
    _H = _C(spec.HIDDEN_SIZE)
    # --- layout: channel order and packed weights ----------------------------------
    _CH_G = _C(layout.CHANNEL_OFFSET["g"])
    _CH_CLIP = _C(layout.CHANNEL_OFFSET["clip_g"])
    _CH_P = _C(layout.CHANNEL_OFFSET["p"])
    _CH_M = _C(layout.CHANNEL_OFFSET["m"])
    _CH_V = _C(layout.CHANNEL_OFFSET["v"])
    _CH_MRV = _C(layout.CHANNEL_OFFSET["m_rsqrt_v"])
    _CH_RV = _C(layout.CHANNEL_OFFSET["rsqrt_v"])
    _CH_FACG = _C(layout.CHANNEL_OFFSET["fac_g"])
    _CH_GRV = _C(layout.CHANNEL_OFFSET["g_rsqrt_v"])
    _CH_FACM = _C(layout.CHANNEL_OFFSET["fac_m"])
    _W_EL = _C(layout.SEGMENT["w_el"].offset)
    _B0 = _C(layout.SEGMENT["b0"].offset)
    _W1 = _C(layout.SEGMENT["w1"].offset)
    _B1 = _C(layout.SEGMENT["b1"].offset)
    _W2 = _C(layout.SEGMENT["w2"].offset)
    _B2 = _C(layout.SEGMENT["b2"].offset)
    _NAN_ALL = _C(tl.PropagateNan.ALL)
    # --- bfloat16 state: celo2.rule.rounding ---------------------------------------------
    _MIX_A, _MIX_B = (_C(m) for m in rounding.MIX_MULTIPLIERS)
    _MIX_S0, _MIX_S1, _MIX_S2 = (_C(s) for s in rounding.MIX_SHIFTS)
    _BF16_QUIET = _C(rounding.BFLOAT16_QUIET_BIT)
    _SLOT_M, _SLOT_V, _SLOT_FAC_R = (_C(rounding.SLOTS[k]) for k in ("m", "v", "fac_r"))
    _INF = _C(float("inf"))

    # --- member tables: the column of each field (FIELDS) ------------------------------------
    _W = _C(len(FIELDS))
    _STAT = _C(STAT_STRIDE)
    _T_G = _C(_FIELD["g"])
    _T_P = _C(_FIELD["p"])
    _T_M = _C(_FIELD["m"])
    _T_V = _C(_FIELD["v"])
    _T_D = _C(_FIELD["d"])
    _T_OK = _C(_FIELD["ok"])
    _T_STEP = _C(_FIELD["step"])
    _T_OUT = _C(_FIELD["out"])
    _T_MEAN = _C(_FIELD["mean"])
    _T_PART = _C(_FIELD["part"])
    _T_INV = _C(_FIELD["inv"])
    _T_SQ = _C(_FIELD["sq"])
    _T_SCALE = _C(_FIELD["scale"])
    _T_N = _C(_FIELD["n"])
    _T_G_COUNT = _C(_FIELD["g_count"])
    _T_L = _C(_FIELD["l"])
    _T_NLB = _C(_FIELD["nlb"])
    _T_SH = _C(_FIELD["sh"])
    _T_B = _C(_FIELD["b"])
    _T_SL = _C(_FIELD["sl"])
    _T_C = _C(_FIELD["c"])
    _T_NHB = _C(_FIELD["nhb"])
    _T_N_MEAN = _C(_FIELD["n_mean"])
    _T_MEAN_S = _C(_FIELD["mean_s"])
    _T_MEAN_Q = _C(_FIELD["mean_q"])
    _T_MEMBER = _C(_FIELD["member"])
    _T_TENSOR = _C(_FIELD["tensor"])
    # a lo statistic's fields; ``+ _STAT``: the hi statistic's
    _T_FAC_LO = _C(_FIELD["fac_lo"])
    _T_TOT_LO = _C(_FIELD["tot_lo"])
    _T_PARTS_LO = _C(_FIELD["parts_lo"])
    _T_N_LO = _C(_FIELD["n_lo"])
    _T_INV_COUNT_LO = _C(_FIELD["inv_count_lo"])
    _T_F_LO = _C(_FIELD["f_lo"])
    _T_T_LO = _C(_FIELD["t_lo"])
    _T_NORM_LO = _C(_FIELD["norm_lo"])
    _T_NORMR_LO = _C(_FIELD["normr_lo"])
    _T_NG_LO = _C(_FIELD["ng_lo"])
    _T_LEN_LO = _C(_FIELD["len_lo"])
    _T_IS_ROW_LO = _C(_FIELD["is_row_lo"])
    _T_W_LO = _C(_FIELD["w_lo"])
    _T_SLOT_LO = _C(_FIELD["slot_lo"])
    _T_INNER_LO = _C(_FIELD["inner_lo"])
    _T_SPAN_LO = _C(_FIELD["span_lo"])

    # =============================================================================
    # Element helpers
    # =============================================================================
    # The kernels call Triton builtins only, none of triton.language's own
    # ``@triton.jit`` helpers (``tl.sum``, ``tl.zeros``, ``tl.cdiv``...): those
    # are decorated when Triton is first imported, so a copy of this module
    # decorated under the interpreter after Triton was imported in compiled mode
    # (as the tests load it) could not call them. Reductions pass the standard
    # library's combine functions to ``tl.reduce``: the interpreter recognises
    # those and reduces with NumPy (any other combine function it runs element
    # by element in Python).
    _SUM_COMBINE = tl.standard._sum_combine
    _MAX_COMBINE = tl.standard._elementwise_max

    @triton.jit
    def _sum(x, axis: tl.constexpr):
        """``tl.sum``: a reduction tree of fixed order."""
        return tl.reduce(x, axis, _SUM_COMBINE)

    @triton.jit
    def _max(x, axis: tl.constexpr):
        return tl.reduce(x, axis, _MAX_COMBINE)

    @triton.jit
    def _clip(x, c):
        """``clamp(x, -c, c)`` with NaN propagated (as ``torch.clamp``)."""
        return tl.minimum(tl.maximum(x, -c, propagate_nan=_NAN_ALL), c, propagate_nan=_NAN_ALL)

    @triton.jit
    def _relu(x):
        return tl.maximum(x, 0.0, propagate_nan=_NAN_ALL)

    @triton.jit
    def _nonfinite(x):
        """1 where ``x`` is NaN or +-inf, else 0."""
        return ((x != x) | (tl.abs(x) == _INF)).to(tl.int32)

    @triton.jit
    def _row(ptr, k: tl.constexpr, stride):
        """``ptr + k * stride`` without an int32 product that could overflow (``k`` small)."""
        for _ in tl.static_range(k):
            ptr += stride
        return ptr

    @triton.jit
    def _remove(n, inner, span):
        """Flat index without one axis: ``span`` = that axis' size times ``inner``, the elements after it."""
        return (n // span) * inner + n % inner

    @triton.jit
    def _tile(local, G, L, nlb, BG: tl.constexpr, BL: tl.constexpr):
        """Program ``local``'s ``(BG, BL)`` tile of its member: ``BG`` groups, ``BL`` elements of each,
        from block ``nlb``."""
        pid = local.to(tl.int64)
        pl = pid % nlb
        grp = (pid // nlb) * BG + tl.arange(0, BG)
        l = pl * BL + tl.arange(0, BL)
        gmask = grp < G
        mask = gmask[:, None] & (l < L)[None, :]
        n = grp[:, None] * L + l[None, :]
        return pl, grp, gmask, mask, n

    @triton.jit
    def _where_ok(mask, flag_ptr, SKIP: tl.constexpr):
        """``mask`` where this step stores (the flag is down, or non-finite gradients are not skipped).
        The flag is broadcast before the comparison (the interpreter mistypes a scalar mask's ``&``)."""
        if SKIP:
            return mask & ((mask.to(tl.int32) * 0 + tl.load(flag_ptr)) == 0)
        else:
            return mask

    @triton.jit
    def _psum(part_ptr, c: tl.constexpr, q, mask, grp, gmask, G, nlb, pl):
        """Block ``pl``'s sum of ``q`` per group into ``part[c, grp, pl]``."""
        tl.store(_row(part_ptr, c, G * nlb) + grp * nlb + pl, _sum(tl.where(mask, q, 0.0), 1), mask=gmask)

    @triton.jit
    def _channel(h, x, c: tl.constexpr, inv_ptr, G, grp, gmask, net_ptr):
        """``h + (x * inv_c) w_el[c]``: channel ``c`` normalised by its group's RMS, into the first layer."""
        s = tl.load(_row(inv_ptr, c, G) + grp, mask=gmask, other=0.0)
        w = tl.load(net_ptr + _W_EL + c * _H + tl.arange(0, _H))
        return h + (x * s[:, None])[None, :, :] * w[:, None, None]

    @triton.jit
    def _to_bfloat16(x):
        """float32 -> bfloat16 rounded to nearest even, in integer arithmetic (what the GPU's
        conversion does; the interpreter's conversion truncates). Inf stays inf; every NaN bit
        pattern stays NaN (its sign and top payload bits kept, the quiet bit set): rounding would
        carry a NaN's all-ones payload into the sign, 0x7FFFFFFF (the GPUs' NaN) becoming -0.0."""
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        quiet_nan = (bits >> 16) | 0x0040
        return tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    # =============================================================================
    # Member tables
    # =============================================================================
    # Every kernel runs for the members of one group (see the module docstring): program ``pid`` reads its
    # member ``t`` and its program within that member from ``pmap`` (two int32 per program) and every
    # per-member value from row ``t`` of ``tab`` (:data:`FIELDS`, int64: addresses of the operands,
    # offsets into the call's scratch, sizes, and float32 constants as their bit patterns).

    @triton.jit
    def _member(tab_ptr, pmap_ptr):
        """``(member's index in the call, program of that member, its row in the group's table)``."""
        pid = tl.program_id(0)
        r = tl.load(pmap_ptr + 2 * pid)
        local = tl.load(pmap_ptr + 2 * pid + 1)
        row = tab_ptr + r.to(tl.int64) * _W
        return tl.load(row + _T_MEMBER), local, row

    @triton.jit
    def _addr(row, k, DT: tl.constexpr):
        """Field ``k`` of the member's row: an operand's address, as a pointer to ``DT``."""
        return tl.load(row + k).to(tl.pointer_type(DT))

    @triton.jit
    def _f32_field(row, k):
        """Field ``k``: a float32 constant stored as its bit pattern."""
        return tl.load(row + k).to(tl.int32).to(tl.float32, bitcast=True)

    # =============================================================================
    # bfloat16 state: celo2.rule.rounding's counter-based stochastic rounding
    # =============================================================================
    @triton.jit
    def _mix32(x):
        """:func:`celo2.rule.rounding.mix32` on ``uint32`` values (products wrap modulo 2**32)."""
        x = x ^ (x >> _MIX_S0)
        x = x * _MIX_A
        x = x ^ (x >> _MIX_S1)
        x = x * _MIX_B
        x = x ^ (x >> _MIX_S2)
        return x

    @triton.jit
    def _stream_key(row, seed, slot, SBF: tl.constexpr):
        """:func:`celo2.rule.rounding.stream_key` of this member's accumulator ``slot``: the step read from
        the member's device counter (0 for float32 state, where no key is used). ``seed`` and ``slot`` may
        be compile-time constants (an integer argument equal to 1 is one), hence their sums with ``zero``."""
        if SBF:
            step = tl.load(_addr(row, _T_STEP, tl.int64))
            zero = step * 0
            k = _mix32((zero + seed).to(tl.uint32))
            k = _mix32(k ^ step.to(tl.uint32))
            k = _mix32(k ^ tl.load(row + _T_TENSOR).to(tl.uint32))
            return _mix32(k ^ (zero + slot).to(tl.uint32))
        else:
            return tl.load(row + _T_TENSOR).to(tl.uint32) * 0

    @triton.jit
    def _load_state(ptr, idx, mask, other):
        """An accumulator's values at flat index ``idx``, as float32 (float32 or bfloat16 state)."""
        return tl.load(ptr + idx, mask=mask, other=other).to(tl.float32)

    @triton.jit
    def _put(ptr, idx, x, mask, key, SBF: tl.constexpr):
        """Store float32 ``x`` at flat index ``idx`` of an accumulator: as is, or (``SBF``) rounded to
        bfloat16 with the 16 bits of :func:`celo2.rule.rounding.random_bits` of ``key`` and ``idx``, a NaN
        kept NaN with the quiet bit set (:func:`celo2.rule.rounding.round_to_bfloat16`)."""
        if SBF:
            bits = _mix32(key ^ _mix32(idx.to(tl.uint32))) >> 16
            u = x.to(tl.uint32, bitcast=True)
            rounded = (u + bits) >> 16
            quiet_nan = (u >> 16) | _BF16_QUIET
            tl.store(ptr + idx, tl.where(x != x, quiet_nan, rounded).to(tl.uint16).to(tl.bfloat16, bitcast=True),
                     mask=mask)
        else:
            tl.store(ptr + idx, x, mask=mask)

    @triton.jit
    def _update_param(p_ptr, p, n, mask, d, scale, lr_ptr, lr, wd_ptr, wd,
                      LR_T: tl.constexpr, WD_T: tl.constexpr, P_KIND: tl.constexpr):
        """``p <- p (1 - lr wd) - lr scale d`` where ``mask`` (``p`` as loaded, in its dtype): float32
        math, rounded once to nearest even for a bfloat16 (``P_KIND`` 2) or float16 (3) ``p``; float64
        math for a float64 one (1)."""
        if LR_T:
            lr = tl.load(lr_ptr).to(tl.float32)
        if WD_T:
            wd = tl.load(wd_ptr).to(tl.float32)
        if P_KIND == 1:
            one = tl.full([], 1.0, tl.float64)  # promotes lr and wd (float32 scalars) exactly
            new = p * (one - one * lr * wd) - ((d.to(tl.float64) * lr) * scale)
        else:
            new = p.to(tl.float32) * (1.0 - lr * wd) - (lr * scale) * d
            if P_KIND == 2:
                new = _to_bfloat16(new)
            elif P_KIND == 3:
                new = new.to(tl.float16)  # round to nearest even
        tl.store(p_ptr + n, new, mask=mask)

    # =============================================================================
    # Pass 1: gradient statistics and the non-finite flag
    # =============================================================================
    @triton.jit
    def _grad_stats(tab_ptr, pmap_ptr, scr_ptr, flags_ptr, G_DT: tl.constexpr,
                    BH: tl.constexpr, BLL: tl.constexpr, CHECK: tl.constexpr):
        """Program ``(a, block of h, b, c)`` of a member's ``(A, SH, B, SL, C)`` view: the sums of
        ``clip(g)^2`` over ``SL`` (complete) and its block's partial sums over ``SH``."""
        t, pid, row = _member(tab_ptr, pmap_ptr)
        g_ptr = _addr(row, _T_G, G_DT)
        sum_lo_ptr = scr_ptr + tl.load(row + _T_TOT_LO)
        part_hi_ptr = scr_ptr + tl.load(row + _T_TOT_LO + _STAT)
        SH = tl.load(row + _T_SH)
        B = tl.load(row + _T_B)
        SL = tl.load(row + _T_SL)
        C = tl.load(row + _T_C)
        n_hi = tl.load(row + _T_N_LO + _STAT)
        nhb = tl.load(row + _T_NHB)
        pid = pid.to(tl.int64)
        hb = pid % nhb
        q = pid // nhb
        c = q % C
        q = q // C
        b = q % B
        a = q // B
        h = hb * BH + tl.arange(0, BH)
        hmask = h < SH
        base = ((a * SH + h) * B + b) * SL
        acc = tl.full([BH], 0.0, tl.float32)
        bad = tl.full([BH, BLL], 0, tl.int32)
        for l0 in range(0, SL, BLL):
            l = l0 + tl.arange(0, BLL)
            lmask = l < SL
            mask = hmask[:, None] & lmask[None, :]
            graw = tl.load(g_ptr + (base[:, None] + l[None, :]) * C + c, mask=mask, other=0.0)
            if CHECK:
                bad = bad | _nonfinite(graw)
            g = _clip(graw.to(tl.float32), _GRAD_CLIP)
            g2 = g * g
            acc += _sum(g2, 1)
            tl.store(part_hi_ptr + hb * n_hi + ((a * B + b) * SL + l) * C + c, _sum(g2, 0), mask=lmask)
        tl.store(sum_lo_ptr + ((a * SH + h) * B + b) * C + c, acc, mask=hmask)
        if CHECK:
            tl.atomic_max(flags_ptr + t, _max(_max(bad, 1), 0))

    @triton.jit
    def _flag_pass(tab_ptr, pmap_ptr, flags_ptr, G_DT: tl.constexpr, BLOCK: tl.constexpr):
        """A vector's first pass: the non-finite flag only."""
        t, pid, row = _member(tab_ptr, pmap_ptr)
        g_ptr = _addr(row, _T_G, G_DT)
        N = tl.load(row + _T_N)
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        graw = tl.load(g_ptr + i, mask=i < N, other=0.0)
        tl.atomic_max(flags_ptr + t, _max(_nonfinite(graw), 0))

    # =============================================================================
    # Passes 2-3: the factored statistics
    # =============================================================================
    @triton.jit
    def _total(tot_ptr, nparts, ns, i, mask):
        """The sum over ``nparts`` partial rows (``ns`` apart) at ``i``, in order."""
        tot = tl.load(tot_ptr + i, mask=mask, other=0.0)
        for q in range(1, nparts):
            tot += tl.load(tot_ptr + q * ns + i, mask=mask, other=0.0)
        return tot

    @triton.jit
    def _fold(s_ptr, ns, x, i, mask, k: tl.constexpr, wf):
        """Statistic ``k`` folded with the mean ``x`` (``+ FACTORED_EPS``), not stored."""
        s = _load_state(s_ptr + k * ns, i, mask, 1.0)
        return s + wf * (x - s)

    @triton.jit
    def _stat_reduce_one(s_ptr, tot_ptr, nparts, ns, inv_n, out_ptr, out2_ptr, n_out, S, Q, pid,
                         NORM: tl.constexpr, BO: tl.constexpr, BS: tl.constexpr):
        """Over ``j < S`` of the folded statistic seen as ``(n_out / Q, S, Q)``: the mean
        (``NORM`` False) or the inverse RMS of it and of its ``rsqrt(. + eps)`` (``NORM``)."""
        o = pid.to(tl.int64) * BO + tl.arange(0, BO)
        omask = o < n_out
        base = (o // Q) * S * Q + o % Q
        a0 = tl.full([BO, BS], 0.0, tl.float32)
        a1 = tl.full([BO, BS], 0.0, tl.float32)
        a2 = tl.full([BO, BS], 0.0, tl.float32)
        r0 = tl.full([BO, BS], 0.0, tl.float32)
        r1 = tl.full([BO, BS], 0.0, tl.float32)
        r2 = tl.full([BO, BS], 0.0, tl.float32)
        for j0 in range(0, S, BS):
            j = j0 + tl.arange(0, BS)
            mask = omask[:, None] & (j < S)[None, :]
            i = base[:, None] + j[None, :].to(tl.int64) * Q
            x = _total(tot_ptr, nparts, ns, i, mask) * inv_n + _FACTORED_EPS
            x0 = _fold(s_ptr, ns, x, i, mask, 0, _WF0)
            x1 = _fold(s_ptr, ns, x, i, mask, 1, _WF1)
            x2 = _fold(s_ptr, ns, x, i, mask, 2, _WF2)
            if NORM:
                a0 += tl.where(mask, x0 * x0, 0.0)
                a1 += tl.where(mask, x1 * x1, 0.0)
                a2 += tl.where(mask, x2 * x2, 0.0)
                r0 += tl.where(mask, 1.0 / (x0 + _RSQRT_EPS), 0.0)
                r1 += tl.where(mask, 1.0 / (x1 + _RSQRT_EPS), 0.0)
                r2 += tl.where(mask, 1.0 / (x2 + _RSQRT_EPS), 0.0)
            else:
                a0 += tl.where(mask, x0, 0.0)
                a1 += tl.where(mask, x1, 0.0)
                a2 += tl.where(mask, x2, 0.0)
        if NORM:
            tl.store(out_ptr + o, tl.rsqrt(_sum(a0, 1) / S + _INPUT_NORM_EPS), mask=omask)
            tl.store(out_ptr + n_out + o, tl.rsqrt(_sum(a1, 1) / S + _INPUT_NORM_EPS), mask=omask)
            tl.store(out_ptr + n_out + n_out + o, tl.rsqrt(_sum(a2, 1) / S + _INPUT_NORM_EPS), mask=omask)
            tl.store(out2_ptr + o, tl.rsqrt(_sum(r0, 1) / S + _INPUT_NORM_EPS), mask=omask)
            tl.store(out2_ptr + n_out + o, tl.rsqrt(_sum(r1, 1) / S + _INPUT_NORM_EPS), mask=omask)
            tl.store(out2_ptr + n_out + n_out + o, tl.rsqrt(_sum(r2, 1) / S + _INPUT_NORM_EPS), mask=omask)
        else:
            tl.store(out_ptr + o, _sum(a0, 1) / S, mask=omask)
            tl.store(out_ptr + n_out + o, _sum(a1, 1) / S, mask=omask)
            tl.store(out_ptr + n_out + n_out + o, _sum(a2, 1) / S, mask=omask)

    @triton.jit
    def _stat_reduce(tab_ptr, pmap_ptr, scr_ptr, S_DT: tl.constexpr,
                     BO0: tl.constexpr, BS0: tl.constexpr, BO1: tl.constexpr, BS1: tl.constexpr,
                     BO2: tl.constexpr, BS2: tl.constexpr):
        """Axis 1 of the grid: 0 the row statistic's mean over ``d1``, 1 / 2 the lo / hi
        statistic's input normalisation per statistic group."""
        t, pid, row = _member(tab_ptr, pmap_ptr)
        which = tl.program_id(1)
        if which == 0:
            k = (1 - tl.load(row + _T_IS_ROW_LO)) * _STAT  # the row statistic's fields
            _stat_reduce_one(_addr(row, _T_FAC_LO + k, S_DT), scr_ptr + tl.load(row + _T_TOT_LO + k),
                             tl.load(row + _T_PARTS_LO + k), tl.load(row + _T_N_LO + k),
                             _f32_field(row, _T_INV_COUNT_LO + k), scr_ptr + tl.load(row + _T_MEAN), scr_ptr,
                             tl.load(row + _T_N_MEAN), tl.load(row + _T_MEAN_S), tl.load(row + _T_MEAN_Q), pid,
                             False, BO0, BS0)
        elif which == 1:
            _stat_norm(row, 0, scr_ptr, pid, S_DT, BO1, BS1)
        else:
            _stat_norm(row, _STAT, scr_ptr, pid, S_DT, BO2, BS2)

    @triton.jit
    def _stat_norm(row, k: tl.constexpr, scr_ptr, pid, S_DT: tl.constexpr, BO: tl.constexpr, BS: tl.constexpr):
        """:func:`_stat_reduce_one`'s input normalisation of the statistic whose fields start ``k`` columns
        after the lo statistic's (0: lo, ``_STAT``: hi)."""
        _stat_reduce_one(_addr(row, _T_FAC_LO + k, S_DT), scr_ptr + tl.load(row + _T_TOT_LO + k),
                         tl.load(row + _T_PARTS_LO + k), tl.load(row + _T_N_LO + k),
                         _f32_field(row, _T_INV_COUNT_LO + k), scr_ptr + tl.load(row + _T_NORM_LO + k),
                         scr_ptr + tl.load(row + _T_NORMR_LO + k), tl.load(row + _T_NG_LO + k),
                         tl.load(row + _T_LEN_LO + k), 1, pid, True, BO, BS)

    @triton.jit
    def _factor_k(x, k: tl.constexpr, s_ptr, f_ptr, ns, i, mask, store, mean_ptr, n_mean, mi, norm_ptr, normr_ptr,
                  ng, sg, net_ptr, term, is_row, w_off, key, SBF: tl.constexpr):
        """Statistic ``k``: stored folded, its Adafactor factor, and its two channels' share of ``term``."""
        _put(s_ptr, k * ns + i, x, store, key, SBF)
        y = x
        if is_row:
            y = x / (tl.load(mean_ptr + k * n_mean + mi, mask=mask, other=1.0) + _ROW_MEAN_EPS)
        tl.store(f_ptr + k * ns + i, tl.rsqrt(tl.maximum(y, _SAFE_RSQRT_FLOOR)), mask=mask)
        hidx = tl.arange(0, _H)
        a = x * tl.load(norm_ptr + k * ng + sg, mask=mask, other=0.0)
        r = tl.rsqrt(x + _RSQRT_EPS) * tl.load(normr_ptr + k * ng + sg, mask=mask, other=0.0)
        w = tl.load(net_ptr + w_off + k * _H + hidx)
        wr = tl.load(net_ptr + w_off + (3 + k) * _H + hidx)
        return term + a[:, None] * w[None, :] + r[:, None] * wr[None, :]

    @triton.jit(do_not_specialize=["seed"])
    def _factors(tab_ptr, pmap_ptr, scr_ptr, flags_ptr, net_ptr, seed, S_DT: tl.constexpr, SBF: tl.constexpr,
                 SKIP: tl.constexpr, BLOCK: tl.constexpr):
        """Axis 1 of the grid: 0 the lo statistic, 1 the hi statistic (its fields ``_STAT`` columns further
        on): folded in place (unless the flag is up), its Adafactor factors, and the rank-1 channels' share of
        the first layer (with ``b0``)."""
        t, pid, row = _member(tab_ptr, pmap_ptr)
        k = tl.program_id(1) * _STAT  # the statistic's fields: the lo ones, or the hi ones after them
        s_ptr = _addr(row, _T_FAC_LO + k, S_DT)
        tot_ptr = scr_ptr + tl.load(row + _T_TOT_LO + k)
        nparts = tl.load(row + _T_PARTS_LO + k)
        ns = tl.load(row + _T_N_LO + k)
        inv_n = _f32_field(row, _T_INV_COUNT_LO + k)
        f_ptr = scr_ptr + tl.load(row + _T_F_LO + k)
        t_ptr = scr_ptr + tl.load(row + _T_T_LO + k)
        norm_ptr = scr_ptr + tl.load(row + _T_NORM_LO + k)
        normr_ptr = scr_ptr + tl.load(row + _T_NORMR_LO + k)
        len_s = tl.load(row + _T_LEN_LO + k)
        ng = tl.load(row + _T_NG_LO + k)
        is_row = tl.load(row + _T_IS_ROW_LO + k)
        w_off = tl.load(row + _T_W_LO + k)
        slot = tl.load(row + _T_SLOT_LO + k)
        mean_ptr = scr_ptr + tl.load(row + _T_MEAN)
        n_mean = tl.load(row + _T_N_MEAN)
        mean_s = tl.load(row + _T_MEAN_S)
        mean_q = tl.load(row + _T_MEAN_Q)
        key = _stream_key(row, seed, slot, SBF)
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < ns
        store = _where_ok(mask, flags_ptr + t, SKIP)
        x = _total(tot_ptr, nparts, ns, i, mask) * inv_n + _FACTORED_EPS
        mi = (i // (mean_s * mean_q)) * mean_q + i % mean_q
        sg = i // len_s
        hidx = tl.arange(0, _H)
        term = tl.full([BLOCK, _H], 0.0, tl.float32)
        if is_row:
            term += tl.load(net_ptr + _B0 + hidx)[None, :]
        term = _factor_k(_fold(s_ptr, ns, x, i, mask, 0, _WF0), 0, s_ptr, f_ptr, ns, i, mask, store, mean_ptr,
                         n_mean, mi, norm_ptr, normr_ptr, ng, sg, net_ptr, term, is_row, w_off, key, SBF)
        term = _factor_k(_fold(s_ptr, ns, x, i, mask, 1, _WF1), 1, s_ptr, f_ptr, ns, i, mask, store, mean_ptr,
                         n_mean, mi, norm_ptr, normr_ptr, ng, sg, net_ptr, term, is_row, w_off, key, SBF)
        term = _factor_k(_fold(s_ptr, ns, x, i, mask, 2, _WF2), 2, s_ptr, f_ptr, ns, i, mask, store, mean_ptr,
                         n_mean, mi, norm_ptr, normr_ptr, ng, sg, net_ptr, term, is_row, w_off, key, SBF)
        tl.store(t_ptr + hidx[None, :].to(tl.int64) * ns + i[:, None], term, mask=mask[:, None])

    # =============================================================================
    # Passes 4-6: accumulators, input RMS, direction
    # =============================================================================
    @triton.jit
    def _operands(row, n, mask, N, G_DT: tl.constexpr, P_DT: tl.constexpr, S_DT: tl.constexpr):
        """``g`` (clipped), ``p`` as stored and as float32, ``m`` and ``v`` (float32) at ``n``."""
        g = _clip(tl.load(_addr(row, _T_G, G_DT) + n, mask=mask, other=0.0).to(tl.float32), _GRAD_CLIP)
        praw = tl.load(_addr(row, _T_P, P_DT) + n, mask=mask, other=0.0)
        p = praw.to(tl.float32)
        m_ptr = _addr(row, _T_M, S_DT)
        m0 = _load_state(m_ptr, n, mask, 0.0)
        m1 = _load_state(m_ptr, N + n, mask, 0.0)
        m2 = _load_state(m_ptr, N + N + n, mask, 0.0)
        v = _load_state(_addr(row, _T_V, S_DT), n, mask, 0.0)
        return g, praw, p, m0, m1, m2, v

    @triton.jit
    def _stat_factors(row, k: tl.constexpr, scr_ptr, n, mask):
        """The index at ``n`` in the statistic whose fields start ``k`` columns after the lo statistic's,
        and its three factors there."""
        f_ptr = scr_ptr + tl.load(row + _T_F_LO + k)
        ns = tl.load(row + _T_N_LO + k)
        i = _remove(n, tl.load(row + _T_INNER_LO + k), tl.load(row + _T_SPAN_LO + k))
        return (i, tl.load(f_ptr + i, mask=mask, other=0.0), tl.load(f_ptr + ns + i, mask=mask, other=0.0),
                tl.load(f_ptr + ns + ns + i, mask=mask, other=0.0))

    @triton.jit
    def _gather_factors(row, scr_ptr, n, mask):
        """A factored member's three Adafactor factors at ``n`` (products of its lo and hi factors)."""
        ilo, a0, a1, a2 = _stat_factors(row, 0, scr_ptr, n, mask)
        ihi, b0, b1, b2 = _stat_factors(row, _STAT, scr_ptr, n, mask)
        return ilo, ihi, a0 * b0, a1 * b1, a2 * b2

    @triton.jit
    def _vector_factor(a):
        return tl.rsqrt(tl.maximum(a + _VECTOR_FACTOR_EPS, _SAFE_RSQRT_FLOOR))

    @triton.jit(do_not_specialize=["seed"])
    def _accumulate(tab_ptr, pmap_ptr, scr_ptr, flags_ptr, seed, G_DT: tl.constexpr, P_DT: tl.constexpr,
                    S_DT: tl.constexpr, SBF: tl.constexpr, FACTORED: tl.constexpr, SKIP: tl.constexpr,
                    BG: tl.constexpr, BL: tl.constexpr):
        """The per-block sums of squares of the per-element channels, from ``g`` folded into ``m`` and ``v``
        (a vector's ``fac`` too) in registers; the direction pass stores the folded state."""
        t, local, row = _member(tab_ptr, pmap_ptr)
        G = tl.load(row + _T_G_COUNT)
        nlb = tl.load(row + _T_NLB)
        pl, grp, gmask, mask, n = _tile(local, G, tl.load(row + _T_L), nlb, BG, BL)
        _accumulate_tile(row, t, pl, grp, gmask, mask, n, scr_ptr, flags_ptr, seed, G, nlb,
                         G_DT, P_DT, S_DT, SBF, FACTORED, SKIP, False)

    @triton.jit
    def _step_state(row, t, n, mask, scr_ptr, flags_ptr, seed, G_DT: tl.constexpr, P_DT: tl.constexpr,
                    S_DT: tl.constexpr, SBF: tl.constexpr, FACTORED: tl.constexpr, SKIP: tl.constexpr,
                    STORE: tl.constexpr):
        """A tile's operands with ``g`` folded into ``m``, ``v`` (and a vector's ``fac``) in float32, stored
        (``STORE``, unless the flag is up) rounded as the state dtype says, and the three Adafactor factors.
        The direction reads these float32 values, not the stored ones (as every backend does)."""
        N = tl.load(row + _T_N)
        g, praw, p, m0, m1, m2, v = _operands(row, n, mask, N, G_DT, P_DT, S_DT)
        m0 = m0 + _WM0 * (g - m0)
        m1 = m1 + _WM1 * (g - m1)
        m2 = m2 + _WM2 * (g - m2)
        g2 = g * g
        v = _RMS_DECAY * v + _RMS_W * g2
        store = _where_ok(mask, flags_ptr + t, SKIP)
        if STORE:
            m_ptr = _addr(row, _T_M, S_DT)
            key_m = _stream_key(row, seed, _SLOT_M, SBF)
            _put(m_ptr, n, m0, store, key_m, SBF)
            _put(m_ptr, N + n, m1, store, key_m, SBF)
            _put(m_ptr, N + N + n, m2, store, key_m, SBF)
            _put(_addr(row, _T_V, S_DT), n, v, store, _stream_key(row, seed, _SLOT_V, SBF), SBF)
        if FACTORED:
            ilo, ihi, f0, f1, f2 = _gather_factors(row, scr_ptr, n, mask)
        else:
            fac_ptr = _addr(row, _T_FAC_LO, S_DT)
            gsq = g2 + _FACTORED_EPS
            a0 = _load_state(fac_ptr, n, mask, 0.0)
            a1 = _load_state(fac_ptr, N + n, mask, 0.0)
            a2 = _load_state(fac_ptr, N + N + n, mask, 0.0)
            a0 = a0 + _WF0 * (gsq - a0)
            a1 = a1 + _WF1 * (gsq - a1)
            a2 = a2 + _WF2 * (gsq - a2)
            if STORE:
                key_f = _stream_key(row, seed, _SLOT_FAC_R, SBF)
                _put(fac_ptr, n, a0, store, key_f, SBF)
                _put(fac_ptr, N + n, a1, store, key_f, SBF)
                _put(fac_ptr, N + N + n, a2, store, key_f, SBF)
            f0 = _vector_factor(a0)
            f1 = _vector_factor(a1)
            f2 = _vector_factor(a2)
            ilo = n
            ihi = n
        return g, praw, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi

    @triton.jit
    def _accumulate_tile(row, t, pl, grp, gmask, mask, n, scr_ptr, flags_ptr, seed, G, nlb,
                         G_DT: tl.constexpr, P_DT: tl.constexpr, S_DT: tl.constexpr, SBF: tl.constexpr,
                         FACTORED: tl.constexpr, SKIP: tl.constexpr, STORE: tl.constexpr):
        """The channel sums of one tile; returns what the direction reads (state stored with ``STORE``)."""
        g, praw, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi = _step_state(
            row, t, n, mask, scr_ptr, flags_ptr, seed, G_DT, P_DT, S_DT, SBF, FACTORED, SKIP, STORE)
        g2 = g * g
        r = 1.0 / (v + _RSQRT_EPS)
        q0 = m0 * m0
        q1 = m1 * m1
        q2 = m2 * m2
        part_ptr = scr_ptr + tl.load(row + _T_PART)
        _psum(part_ptr, _CH_G, g2, mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_CLIP, tl.minimum(g2, _FEATURE_CLIP_SQ), mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_P, p * p, mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_M, q0, mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_M + 1, q1, mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_M + 2, q2, mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_V, v * v, mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_MRV, q0 * r, mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_MRV + 1, q1 * r, mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_MRV + 2, q2 * r, mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_RV, r, mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_FACG, g2 * (f0 * f0), mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_FACG + 1, g2 * (f1 * f1), mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_FACG + 2, g2 * (f2 * f2), mask, grp, gmask, G, nlb, pl)
        _psum(part_ptr, _CH_GRV, g2 * r, mask, grp, gmask, G, nlb, pl)
        if FACTORED:
            _psum(part_ptr, _CH_FACM, q0 * (f0 * f0), mask, grp, gmask, G, nlb, pl)
            _psum(part_ptr, _CH_FACM + 1, q1 * (f1 * f1), mask, grp, gmask, G, nlb, pl)
            _psum(part_ptr, _CH_FACM + 2, q2 * (f2 * f2), mask, grp, gmask, G, nlb, pl)
        return g, praw, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi

    @triton.jit
    def _reduce_groups(tab_ptr, pmap_ptr, scr_ptr, flags_ptr, oks_ptr, SRC: tl.constexpr, DST: tl.constexpr,
                       NCH: tl.constexpr, EPS: tl.constexpr, SKIP: tl.constexpr, WRITE_OK: tl.constexpr,
                       BGR: tl.constexpr, RB: tl.constexpr):
        """``dst[c, grp] = rsqrt(sum_b src[c, grp, b] / L + EPS)``, the blocks summed in a fixed order;
        with ``WRITE_OK`` each member's program 0 also writes its ``ok`` from its flag."""
        t, pid, row = _member(tab_ptr, pmap_ptr)
        G = tl.load(row + _T_G_COUNT)
        grp = pid.to(tl.int64) * BGR + tl.arange(0, BGR)
        _reduce_rows(scr_ptr + tl.load(row + SRC), scr_ptr + tl.load(row + DST), grp, grp < G, G,
                     tl.load(row + _T_NLB), tl.load(row + _T_L), NCH, EPS, RB)
        if WRITE_OK:
            if pid == 0:
                _write_ok(flags_ptr + t, oks_ptr + t, SKIP)

    @triton.jit
    def _reduce_rows(part_ptr, out_ptr, grp, gmask, G, nlb, L, NCH: tl.constexpr, EPS: tl.constexpr,
                     RB: tl.constexpr):
        for c in tl.static_range(NCH):
            acc = tl.full([grp.shape[0], RB], 0.0, tl.float32)
            for j0 in range(0, nlb, RB):
                j = j0 + tl.arange(0, RB)
                acc += tl.load(part_ptr + c * (G * nlb) + grp[:, None] * nlb + j[None, :],
                               mask=gmask[:, None] & (j < nlb)[None, :], other=0.0)
            tl.store(out_ptr + c * G + grp, tl.rsqrt(_sum(acc, 1) / L + EPS), mask=gmask)

    @triton.jit
    def _write_ok(flag_ptr, ok_ptr, SKIP: tl.constexpr):
        if SKIP:
            tl.store(ok_ptr, 1.0 - (tl.load(flag_ptr) != 0).to(tl.float32))
        else:
            tl.store(ok_ptr, tl.full([], 1.0, tl.float32))

    @triton.jit(do_not_specialize=["seed"])
    def _direction(tab_ptr, pmap_ptr, scr_ptr, flags_ptr, out_ptr, net_ptr, seed, G_DT: tl.constexpr,
                   P_DT: tl.constexpr, S_DT: tl.constexpr, SBF: tl.constexpr, FACTORED: tl.constexpr,
                   SKIP: tl.constexpr, MODE: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr):
        """Fold ``g`` into the state again and store it (unless the flag is up), then channels -> MLP ->
        direction, written to the member's ``out`` (zeros where the flag is up); MODE 1 (``SQUARES``) also
        writes the per-block sums of its squares."""
        t, local, row = _member(tab_ptr, pmap_ptr)
        G = tl.load(row + _T_G_COUNT)
        L = tl.load(row + _T_L)
        nlb = tl.load(row + _T_NLB)
        pl, grp, gmask, mask, n = _tile(local, G, L, nlb, BG, BL)
        g, praw, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi = _step_state(
            row, t, n, mask, scr_ptr, flags_ptr, seed, G_DT, P_DT, S_DT, SBF, FACTORED, SKIP, True)
        d = _direction_tile(row, scr_ptr, grp, gmask, mask, g, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi,
                            net_ptr, G, FACTORED, BG, BL)
        d = tl.where(_where_ok(mask, flags_ptr + t, SKIP), d, 0.0)
        tl.store(out_ptr + tl.load(row + _T_OUT) + n, d, mask=mask)
        if MODE == 1:
            _psum(scr_ptr + tl.load(row + _T_SQ), 0, d * d, mask, grp, gmask, G, nlb, pl)

    @triton.jit
    def _direction_tile(row, scr_ptr, grp, gmask, mask, g, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi,
                        net_ptr, G, FACTORED: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr):
        """The direction of one tile, from its loaded (and updated) values and its groups' input RMS."""
        inv_ptr = scr_ptr + tl.load(row + _T_INV)
        rv = tl.rsqrt(v + _RSQRT_EPS)
        hidx = tl.arange(0, _H)
        # The hidden axis leads ``(H, BG, BL)``: each thread holds every hidden unit of its elements, so the
        # layers' sums over it stay within the thread.
        if FACTORED:
            t_lo = scr_ptr + tl.load(row + _T_T_LO)
            t_hi = scr_ptr + tl.load(row + _T_T_LO + _STAT)
            hoff = hidx[:, None, None].to(tl.int64)
            m3 = mask[None, :, :]
            h = (tl.load(t_lo + hoff * tl.load(row + _T_N_LO) + ilo[None, :, :], mask=m3, other=0.0)
                 + tl.load(t_hi + hoff * tl.load(row + _T_N_LO + _STAT) + ihi[None, :, :], mask=m3, other=0.0))
        else:
            h = tl.full([_H, BG, BL], 0.0, tl.float32) + tl.load(net_ptr + _B0 + hidx)[:, None, None]
        h = _channel(h, g, _CH_G, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, _clip(g, _FEATURE_CLIP), _CH_CLIP, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, p, _CH_P, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, m0, _CH_M, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, m1, _CH_M + 1, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, m2, _CH_M + 2, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, v, _CH_V, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, m0 * rv, _CH_MRV, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, m1 * rv, _CH_MRV + 1, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, m2 * rv, _CH_MRV + 2, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, rv, _CH_RV, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, g * f0, _CH_FACG, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, g * f1, _CH_FACG + 1, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, g * f2, _CH_FACG + 2, inv_ptr, G, grp, gmask, net_ptr)
        h = _channel(h, g * rv, _CH_GRV, inv_ptr, G, grp, gmask, net_ptr)
        if FACTORED:
            h = _channel(h, m0 * f0, _CH_FACM, inv_ptr, G, grp, gmask, net_ptr)
            h = _channel(h, m1 * f1, _CH_FACM + 1, inv_ptr, G, grp, gmask, net_ptr)
            h = _channel(h, m2 * f2, _CH_FACM + 2, inv_ptr, G, grp, gmask, net_ptr)
        h = _relu(h)
        d = tl.full([BG, BL], 0.0, tl.float32) + tl.load(net_ptr + _B2)
        for j in tl.static_range(_H):
            w1 = tl.load(net_ptr + _W1 + hidx * _H + j)  # column j of w1 (in, out)
            u = _relu(tl.load(net_ptr + _B1 + j) + _sum(h * w1[:, None, None], 0))
            d += tl.load(net_ptr + _W2 + j) * u
        return d

    @triton.jit(do_not_specialize=["seed"])
    def _fused(tab_ptr, pmap_ptr, scr_ptr, flags_ptr, oks_ptr, out_ptr, net_ptr, lr_ptr, lr, wd_ptr, wd, seed,
               G_DT: tl.constexpr, P_DT: tl.constexpr, S_DT: tl.constexpr, SBF: tl.constexpr,
               FACTORED: tl.constexpr, SKIP: tl.constexpr, MODE: tl.constexpr, NCH: tl.constexpr,
               LR_T: tl.constexpr, WD_T: tl.constexpr, P_KIND: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr):
        """Accumulate, input RMS and direction in one launch, for members whose groups each fit one tile
        (``L <= BL``): MODE 0 writes the raw direction, MODE 4 applies it with its groups' output RMS. The
        values loaded for the accumulators feed the direction from registers; the tile's channel sums go through ``part``/``inv`` in
        memory, which only this program touches (a barrier between)."""
        t, local, row = _member(tab_ptr, pmap_ptr)
        G = tl.load(row + _T_G_COUNT)
        L = tl.load(row + _T_L)
        pl, grp, gmask, mask, n = _tile(local, G, L, 1, BG, BL)
        g, praw, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi = _accumulate_tile(
            row, t, pl, grp, gmask, mask, n, scr_ptr, flags_ptr, seed, G, 1, G_DT, P_DT, S_DT, SBF, FACTORED, SKIP,
            True)
        tl.debug_barrier()
        _reduce_rows(scr_ptr + tl.load(row + _T_PART), scr_ptr + tl.load(row + _T_INV), grp, gmask, G, 1, L, NCH,
                     _INPUT_NORM_EPS, 1)
        tl.debug_barrier()
        d = _direction_tile(row, scr_ptr, grp, gmask, mask, g, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi,
                            net_ptr, G, FACTORED, BG, BL)
        ok = _where_ok(mask, flags_ptr + t, SKIP)
        if MODE == 0:
            tl.store(out_ptr + tl.load(row + _T_OUT) + n, tl.where(ok, d, 0.0), mask=mask)
        else:
            scale = tl.rsqrt(_sum(tl.where(mask, d * d, 0.0), 1) / L + _OUTPUT_NORM_EPS)[:, None]
            _update_param(_addr(row, _T_P, P_DT), praw, n, ok, d, scale, lr_ptr, lr, wd_ptr, wd,
                          LR_T, WD_T, P_KIND)
        if local == 0:
            _write_ok(flags_ptr + t, oks_ptr + t, SKIP)

    @triton.jit
    def _held(tab_ptr, pmap_ptr, scr_ptr, oks_ptr, out_ptr, lr_ptr, lr, wd_ptr, wd, P_DT: tl.constexpr,
              D_DT: tl.constexpr, HELD: tl.constexpr, MODE: tl.constexpr, LR_T: tl.constexpr,
              WD_T: tl.constexpr, P_KIND: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr):
        """A direction in memory: MODE 1 per-block sums of ``d^2``, MODE 2 the update where ``ok``. With
        ``HELD`` the direction and ``ok`` are the member's own tensors (their addresses in the table);
        else the direction is the member's ``out`` and ``ok`` its entry of ``oks`` (a Celo2-base step)."""
        t, local, row = _member(tab_ptr, pmap_ptr)
        G = tl.load(row + _T_G_COUNT)
        nlb = tl.load(row + _T_NLB)
        pl, grp, gmask, mask, n = _tile(local, G, tl.load(row + _T_L), nlb, BG, BL)
        if HELD:
            d_ptr = _addr(row, _T_D, D_DT)
            ok_ptr = _addr(row, _T_OK, tl.float32)
        else:
            d_ptr = (out_ptr + tl.load(row + _T_OUT)).to(tl.pointer_type(D_DT))
            ok_ptr = oks_ptr + t
        d = tl.load(d_ptr + n, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            _psum(scr_ptr + tl.load(row + _T_SQ), 0, d * d, mask, grp, gmask, G, nlb, pl)
        else:
            scale = tl.load(scr_ptr + tl.load(row + _T_SCALE) + grp, mask=gmask, other=0.0)[:, None]
            ok = mask & ((mask.to(tl.float32) * 0.0 + tl.load(ok_ptr)) != 0)
            p_ptr = _addr(row, _T_P, P_DT)
            p = tl.load(p_ptr + n, mask=mask, other=0.0)
            _update_param(p_ptr, p, n, ok, d, scale, lr_ptr, lr, wd_ptr, wd, LR_T, WD_T, P_KIND)


# =============================================================================
# Host side
# =============================================================================
def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _f32_bits(x: float) -> int:
    """The bit pattern of float32 ``x`` as a signed 32-bit int (how :data:`FIELDS` carry floats)."""
    return int(np.float32(x).view(np.int32))


@dataclass(frozen=True)
class _Geometry:
    """How the kernels see one work shape (see the module docstring); shape only, no tile of a group."""

    shape: tuple[int, ...]
    numel: int
    groups: int  # G
    group_len: int  # L
    factored: bool
    # the (A, SH, B, SL, C) view of a factored tensor
    A: int = 1
    SH: int = 1
    B: int = 1
    SL: int = 1
    C: int = 1
    row_is_lo: bool = True
    n_lo: int = 0
    n_hi: int = 0
    len_lo: int = 1  # statistic-group lengths
    len_hi: int = 1
    mean_s: int = 1  # the row statistic as (n_mean / mean_q, mean_s, mean_q), averaged over mean_s
    mean_q: int = 1

    @property
    def fused(self) -> bool:
        """Whether each group fits one tile: accumulate, input RMS and direction then take one launch."""
        return self.group_len <= TILE

    @property
    def bl(self) -> int:
        """Elements of a group per program of the element passes."""
        return min(_pow2(self.group_len), TILE)

    @property
    def nlb(self) -> int:
        """Blocks per group."""
        return _cdiv(self.group_len, self.bl)

    @property
    def n_mean(self) -> int:
        return self.n_lo // self.mean_s if self.row_is_lo else self.n_hi // self.mean_s


@lru_cache(maxsize=1024)
def _geometry(shape: tuple[int, ...]) -> _Geometry:
    nd = len(shape)
    numel = math.prod(shape)
    L = shape[-2] * shape[-1] if nd >= 3 else numel
    common = dict(shape=shape, numel=numel, groups=numel // L, group_len=L)
    f = factoring(shape)
    if f is None:
        return _Geometry(factored=False, **common)
    hi, lo = min(f.d0, f.d1), max(f.d0, f.d1)
    A, B, C = math.prod(shape[:hi]), math.prod(shape[hi + 1 : lo]), math.prod(shape[lo + 1 :])
    SH, SL = shape[hi], shape[lo]

    def group_len(axis: int) -> int:  # the statistic without ``axis``: its normalisation groups' length
        return L if nd >= 3 and axis < nd - 2 else L // shape[axis]

    row_is_lo = f.d0 == lo
    # The row statistic (without d0) averaged over d1: (A, SH, B C) over SH, or (A B, SL, C) over SL.
    mean_s, mean_q = (SH, B * C) if row_is_lo else (SL, C)
    return _Geometry(factored=True, A=A, SH=SH, B=B, SL=SL, C=C, row_is_lo=row_is_lo, n_lo=numel // SL,
                     n_hi=numel // SH, len_lo=group_len(lo), len_hi=group_len(hi), mean_s=mean_s, mean_q=mean_q,
                     **common)


def _reduce_tile(outputs: int, length: int) -> tuple[int, int]:
    """(rows, columns) of a program of a reduction of ``outputs`` rows of ``length`` values each."""
    bs = min(_pow2(length), 256)
    return min(_pow2(outputs), max(1, TILE // bs)), bs


def _param_kind(dtype: torch.dtype) -> int:
    """How :func:`_update_param` combines: 0 float32, 1 float64, 2 bfloat16, 3 float16."""
    return {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}[dtype]


_TL_DTYPES: dict[torch.dtype, Any] = (
    {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    if AVAILABLE else {})


@lru_cache(maxsize=1024)
def _state_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """:func:`celo2.rule.state.state_shapes`, cached per shape (it is read for every member of every call)."""
    return state_shapes(shape)


# --- groups and their tables --------------------------------------------------------------
_W_ROW, _W_COL = layout.SEGMENT["w_row"].offset, layout.SEGMENT["w_col"].offset
_FACTORS_BLOCK = 256


@dataclass
class _Group:
    """Members of one call that one launch of each pass runs together: one parameter, gradient, state and
    direction dtype, one kind (factored or not, groups within one tile or not) and one element tile."""

    members: list[int]  # indices into the call's lists
    geos: list[_Geometry]
    factored: bool
    fused: bool
    bg: int
    bl: int
    dtypes: dict[str, Any]  # G_DT, P_DT, S_DT / D_DT (Triton dtypes), P_KIND
    tab: torch.Tensor | None = None
    pmaps: dict[str, torch.Tensor] = field(default_factory=dict)
    tiles: dict[str, int] = field(default_factory=dict)

    @property
    def warps(self) -> int:
        """Warps per program of the element passes: two elements of a tile per thread (4 to 16 warps).
        The direction pass holds every hidden unit of its elements in the thread's registers; at two
        elements per thread it needs no more than 128 registers."""
        return max(4, min(16, self.bg * self.bl // 64))


@dataclass
class _Plan:
    """A call's groups with their device tables, and the sizes of its scratch and direction buffers."""

    groups: list[_Group]
    members: int
    scratch: int
    out: int
    out_offsets: list[int]
    staging: list[torch.Tensor]  # the host copies of the tables, alive until their copies are done


class _Layout:
    """Offsets of one call's buffers, handed out in order (float32 elements, 16-element aligned)."""

    def __init__(self) -> None:
        self.size = 0

    def take(self, n: int) -> int:
        at = self.size
        self.size += -(-max(int(n), 1) // 16) * 16
        return at


_PLAN_CACHE: "collections.OrderedDict[tuple, _Plan]" = collections.OrderedDict()
PLAN_CACHE_SIZE: int = 64
"""Plans (device tables of a call's tensors) kept per process, most recently used first."""


ARENA_BYTES: int = 1 << 22
"""Pinned host memory set aside (on the first CUDA call) for tables built while a CUDA graph is captured."""

_ARENA: dict[str, Any] = {"buffer": None, "used": 0}
_PINNED_PLANS: list["_Plan"] = []  # plans a captured graph reads: never dropped


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _to_device(values: np.ndarray, device: torch.device, keep: list) -> torch.Tensor:
    """``values`` on ``device`` without a host synchronisation: on CUDA an asynchronous copy from pinned
    memory (kept alive in ``keep``); while a CUDA graph is captured, from the pinned arena
    (:data:`ARENA_BYTES`), so that the copy is a node of the graph that reads memory nothing reuses.

    Raises:
        RuntimeError: a table is built during a capture before any CUDA call outside one, or the arena is
            full (the message says how to avoid both).
    """
    host = torch.from_numpy(np.ascontiguousarray(values))
    if device.type != "cuda":
        return host.to(device)
    if _capturing(device):
        arena, nbytes = _ARENA["buffer"], host.numel() * host.element_size()
        start = -(-_ARENA["used"] // 64) * 64
        if arena is None or start + nbytes > arena.numel():
            raise RuntimeError(
                "celo2.kernels.triton: the device tables of these tensors must be built while a CUDA graph is "
                "captured, and the pinned arena for that is "
                + ("not set up (run one step outside the capture first)" if arena is None else "full")
                + "; warm up with the same tensors before capturing (docs/cuda_graphs.md) or raise ARENA_BYTES")
        _ARENA["used"] = start + nbytes
        staged = arena[start:start + nbytes].view(host.dtype)
        staged.copy_(host.view(-1))
    else:
        if _ARENA["buffer"] is None:
            _ARENA["buffer"] = torch.empty(ARENA_BYTES, dtype=torch.uint8, pin_memory=True)
        staged = host.pin_memory()
    keep.append(staged)
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    out.copy_(staged.view(host.shape), non_blocking=True)
    return out


def _program_map(counts: list[int], device: torch.device, keep: list) -> torch.Tensor:
    """``(member, program of that member)`` of every program of a launch, as int32 pairs."""
    t = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
    local = np.concatenate([np.arange(c, dtype=np.int32) for c in counts])
    return _to_device(np.stack([t, local], axis=1).reshape(-1), device, keep)


def _group_members(kind: str, shapes: list[tuple[int, ...]], dtypes: list[tuple]) -> dict[tuple, list[int]]:
    """Members by what must be compile-time: their dtypes, kind and element tile (in call order)."""
    groups: dict[tuple, list[int]] = {}
    for i, (shape, dts) in enumerate(zip(shapes, dtypes)):
        geo = _geometry(shape)
        key = (dts, geo.bl) if kind == "held" else (dts, geo.factored, geo.fused, geo.bl)
        groups.setdefault(key, []).append(i)
    return groups


def _build_plan(kind: str, device: torch.device, shapes: list[tuple[int, ...]], dtypes: list[tuple],
                addresses: list[dict[str, int]], tensor_ids: list[int]) -> _Plan:
    """The groups of a call (``kind``: ``"direction"``, ``"apply"`` or ``"held"``) and their tables."""
    lay = _Layout()
    out = _Layout()
    out_offsets = [0] * len(shapes)
    keep: list[torch.Tensor] = []
    groups = []
    for key, idx in _group_members(kind, shapes, dtypes).items():
        geos = [_geometry(shapes[i]) for i in idx]
        g0 = geos[0]
        dts = key[0]
        bl = g0.bl
        bg = min(max(1, TILE // (2 * bl)), _pow2(max(geo.groups for geo in geos)))
        if kind == "held":
            p_dt, d_dt = dts
            grp = _Group(idx, geos, False, False, bg, bl, dict(P_DT=_TL_DTYPES[p_dt], D_DT=_TL_DTYPES[d_dt],
                                                                P_KIND=_param_kind(p_dt)))
        else:
            g_dt, p_dt, s_dt = dts
            grp = _Group(idx, geos, g0.factored, g0.fused, bg, bl,
                         dict(G_DT=_TL_DTYPES[g_dt], P_DT=_TL_DTYPES[p_dt], S_DT=_TL_DTYPES[s_dt],
                              SBF=s_dt == torch.bfloat16, P_KIND=_param_kind(p_dt)))
        tiles = grp.tiles
        rb = min(_pow2(max(geo.nlb for geo in geos)), 256)
        tiles["BGR"] = min(_pow2(max(geo.groups for geo in geos)), max(1, TILE // rb))
        tiles["RB"] = rb
        if grp.factored:
            bll = min(_pow2(max(geo.SL for geo in geos)), 128)
            tiles["BLL"], tiles["BH"] = bll, min(_pow2(max(geo.SH for geo in geos)), max(8, TILE // bll))
            for j, (outputs, length) in enumerate((
                    (max(geo.n_mean for geo in geos), max(geo.mean_s for geo in geos)),
                    (max(geo.n_lo // geo.len_lo for geo in geos), max(geo.len_lo for geo in geos)),
                    (max(geo.n_hi // geo.len_hi for geo in geos), max(geo.len_hi for geo in geos)))):
                tiles[f"BO{j}"], tiles[f"BS{j}"] = _reduce_tile(outputs, length)
        rows = np.zeros((len(idx), len(FIELDS)), dtype=np.int64)
        counts: dict[str, list[int]] = collections.defaultdict(list)
        for r, (i, geo) in enumerate(zip(idx, geos)):
            row = rows[r]

            def put(name: str, value: int, row=row) -> None:  # noqa: ANN001
                row[_FIELD[name]] = value

            for name, value in addresses[i].items():
                put(name, value)
            put("member", i)
            put("tensor", tensor_ids[i])
            N, G, L = geo.numel, geo.groups, geo.group_len
            for name, value in (("n", N), ("g_count", G), ("l", L), ("nlb", geo.nlb)):
                put(name, value)
            nch = layout.MATRIX_CHANNELS if geo.factored else layout.VECTOR_CHANNELS
            counts["elem"].append(_cdiv(G, bg) * geo.nlb)
            counts["red"].append(_cdiv(G, tiles["BGR"]))
            put("sq", lay.take(G * geo.nlb))
            put("scale", lay.take(G))
            if kind == "held":
                continue
            put("part", lay.take(nch * G * geo.nlb))
            put("inv", lay.take(nch * G))
            out_offsets[i] = out.take(N)  # the raw direction (a Celo2-base step's: until it is applied)
            put("out", out_offsets[i])
            counts["flag"].append(_cdiv(N, TILE))
            if not geo.factored:
                continue
            n_lo, n_hi = geo.n_lo, geo.n_hi
            nhb = _cdiv(geo.SH, tiles["BH"])
            ng_lo, ng_hi = n_lo // geo.len_lo, n_hi // geo.len_hi
            lo_inner, hi_inner = geo.C, geo.B * geo.SL * geo.C
            tot_lo, tot_hi, mean = lay.take(n_lo), lay.take(nhb * n_hi), lay.take(3 * geo.n_mean)
            norm_lo, normr_lo = lay.take(3 * ng_lo), lay.take(3 * ng_lo)
            norm_hi, normr_hi = lay.take(3 * ng_hi), lay.take(3 * ng_hi)
            f_lo, t_lo = lay.take(3 * n_lo), lay.take(spec.HIDDEN_SIZE * n_lo)
            f_hi, t_hi = lay.take(3 * n_hi), lay.take(spec.HIDDEN_SIZE * n_hi)
            # The lo statistic sums over SL (complete per program), the hi one over SH (per-block partials).
            stats = {
                "lo": dict(tot=tot_lo, parts=1, n=n_lo, inv_count=_f32_bits(1.0 / geo.SL), f=f_lo, t=t_lo,
                           norm=norm_lo, normr=normr_lo, ng=ng_lo, len=geo.len_lo, is_row=int(geo.row_is_lo),
                           w=_W_ROW if geo.row_is_lo else _W_COL,
                           slot=rounding.SLOTS["fac_r" if geo.row_is_lo else "fac_c"],
                           inner=lo_inner, span=geo.SL * lo_inner),
                "hi": dict(tot=tot_hi, parts=nhb, n=n_hi, inv_count=_f32_bits(1.0 / geo.SH), f=f_hi, t=t_hi,
                           norm=norm_hi, normr=normr_hi, ng=ng_hi, len=geo.len_hi, is_row=int(not geo.row_is_lo),
                           w=_W_COL if geo.row_is_lo else _W_ROW,
                           slot=rounding.SLOTS["fac_c" if geo.row_is_lo else "fac_r"],
                           inner=hi_inner, span=geo.SH * hi_inner),
            }
            for which, values in stats.items():
                for name, value in values.items():
                    put(f"{name}_{which}", value)
            for name, value in (("mean", mean), ("sh", geo.SH), ("b", geo.B), ("sl", geo.SL), ("c", geo.C),
                                ("nhb", nhb), ("n_mean", geo.n_mean), ("mean_s", geo.mean_s),
                                ("mean_q", geo.mean_q)):
                put(name, value)
            counts["stats"].append(geo.A * geo.B * geo.C * nhb)
            counts["sred"].append(max(_cdiv(geo.n_mean, tiles["BO0"]), _cdiv(ng_lo, tiles["BO1"]),
                                      _cdiv(ng_hi, tiles["BO2"])))
            counts["fac"].append(_cdiv(max(n_lo, n_hi), _FACTORS_BLOCK))
        grp.tab = _to_device(rows.reshape(-1), device, keep)
        grp.pmaps = {name: _program_map(c, device, keep) for name, c in counts.items()}
        groups.append(grp)
    return _Plan(groups, len(shapes), lay.size, out.size, out_offsets, keep)


def _plan(kind: str, device: torch.device, shapes: list[tuple[int, ...]], dtypes: list[tuple],
          addresses: list[dict[str, int]], tensor_ids: list[int]) -> _Plan:
    """:func:`_build_plan`, cached on everything its tables hold (a plan is a pure function of its key:
    tensors freed and reallocated at the same addresses with the same shapes reuse it correctly). A plan
    used while a CUDA graph is captured is kept for the life of the process."""
    key = (kind, str(device), tuple(shapes), tuple(dtypes), tuple(tuple(sorted(a.items())) for a in addresses),
           tuple(tensor_ids))
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        plan = _build_plan(kind, device, shapes, dtypes, addresses, tensor_ids)
        _PLAN_CACHE[key] = plan
        while len(_PLAN_CACHE) > PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    else:
        _PLAN_CACHE.move_to_end(key)
    if _capturing(device) and all(p is not plan for p in _PINNED_PLANS):
        _PINNED_PLANS.append(plan)  # a captured graph reads its tables at every replay
    return plan


def supports(param: torch.Tensor) -> bool:
    """Whether these kernels take this tensor; else the front end falls back.

    Args:
        param: the parameter (its device, dtype and size are read, never its values).

    Returns:
        True for a non-empty float32, bfloat16, float16 or float64 tensor of any
        shape on a CUDA device (on the CPU instead when :data:`INTERPRETED`).
    """
    if not AVAILABLE or param.dtype not in PARAM_DTYPES or not 0 < param.numel() < MAX_ELEMENTS:
        return False
    return param.device.type == ("cpu" if INTERPRETED else "cuda")


def pack_net(theta: Mapping[str, Any], device: torch.device | str | None) -> torch.Tensor:
    """The packed weights the kernels read.

    Args:
        theta: a :class:`celo2.rule.theta.Theta` or any mapping with the published keys.
        device: where the kernels run.

    Returns:
        :func:`celo2.rule.layout.pack_theta` of ``theta`` as a float32 ``(layout.NET_SIZE,)`` tensor on ``device``.

    Raises:
        KeyError: a published key is missing from ``theta``.
    """
    return torch.from_numpy(layout.pack_theta(theta)).to(device)


def _require_available(param: torch.Tensor) -> None:
    if not AVAILABLE:
        raise RuntimeError("celo2.kernels.triton needs triton, which is not installed")
    if param.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("celo2.kernels.triton: CPU tensors run only under Triton's interpreter "
                           "(set TRITON_INTERPRET=1 before this module is first imported)")
    if param.dtype not in PARAM_DTYPES:
        raise TypeError(f"celo2.kernels.triton: parameter dtype {param.dtype} is not one of {PARAM_DTYPES}")
    if not 0 < param.numel() < MAX_ELEMENTS:
        raise ValueError(f"celo2.kernels.triton: the parameter has {param.numel()} elements; "
                         f"the kernels take 1 to {MAX_ELEMENTS - 1}")


def _check_operands(net: torch.Tensor, state: Mapping[str, torch.Tensor], grad: torch.Tensor,
                    param: torch.Tensor, state_dtype: torch.dtype = torch.float32) -> None:
    _require_available(param)
    if tuple(net.shape) != (layout.NET_SIZE,) or net.dtype != torch.float32 or net.device != param.device:
        raise ValueError(f"net must be a float32 ({layout.NET_SIZE},) tensor on {param.device} (see pack_net); got "
                         f"{net.dtype} {tuple(net.shape)} on {net.device}")
    if grad.shape != param.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)}, the parameter {tuple(param.shape)}")
    if not grad.is_floating_point() or grad.device != param.device:
        raise ValueError(f"grad must be a floating tensor on {param.device}; got {grad.dtype} on {grad.device}")
    expected = _state_shapes(tuple(param.shape))
    for key in STATE_KEYS:
        want = expected[key]
        if key not in state:
            raise KeyError(f"state has no {key!r} (expected the keys {STATE_KEYS} of celo2.rule.state)")
        t = state[key]
        if tuple(t.shape) != tuple(want) or t.dtype != state_dtype or t.device != param.device:
            raise ValueError(f"state[{key!r}] must be {str(state_dtype).removeprefix('torch.')} {tuple(want)} on "
                             f"{param.device}; got {t.dtype} {tuple(t.shape)} on {t.device}")
        if not t.is_contiguous():
            raise ValueError(f"state[{key!r}] must be contiguous")


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A contiguous flat view of ``t`` (a copy only when ``t`` is not contiguous)."""
    return t.detach().contiguous().view(-1)


def check_scalar(value: Scalar, name: str, device: torch.device) -> None:
    """Refuse an ``lr`` or weight decay the kernels cannot read where they run.

    A 0-d tensor is read by the kernels on the parameter's device; one on another
    device (a CPU tensor for a CUDA parameter included) is refused rather than
    copied: a copy from pageable host memory synchronises with the host every step.

    Args:
        value: a Python number, or a tensor of one element.
        name: what it is, for the message (``"lr"``, ``"weight_decay"``).
        device: the parameter's device.

    Raises:
        ValueError: a tensor of more than one element, or one on another device than ``device``
            (the message names both devices).
    """
    if not isinstance(value, torch.Tensor):
        return
    if value.numel() != 1:
        raise ValueError(f"{name} must be a Python float or a 0-d tensor on {device}; got a tensor of shape "
                         f"{tuple(value.shape)}")
    if value.device != device:
        raise ValueError(f"{name} is a tensor on {value.device} but the parameter is on {device}: pass a Python "
                         f"float or put {name} on the parameter's device ({name}.to({str(device)!r})); the "
                         f"kernels read it there and never copy it from another device, which would synchronise")


def _scalar(x: Scalar, name: str, device: torch.device) -> tuple[torch.Tensor | None, float]:
    """``(pointer, value)`` for a kernel: a 0-d tensor is read on the device, a float passed by value."""
    check_scalar(x, name, device)
    if isinstance(x, torch.Tensor):
        return x.detach().reshape(()), 0.0
    return None, float(x)


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context the kernels launch in, so that they run on the parameter's device.

    Triton launches on the current CUDA device and its current stream; a
    parameter on another GPU of the process makes its device current for the
    launches (and its current stream theirs). Elsewhere (CPU tensors under the
    interpreter) nothing changes.

    Args:
        device: the parameter's device (a CUDA device carries its index).

    Returns:
        ``torch.cuda.device(device)`` for a CUDA device, else a context that does nothing.
    """
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _one_device(params: Sequence[torch.Tensor]) -> torch.device:
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(f"celo2.kernels.triton: one call steps tensors of one device; got {sorted(map(str, devices))}")
    return next(iter(devices))


def _state_dtype(rounding: Any, n: int) -> torch.dtype:
    """The state dtype a call reads and writes: bfloat16 with ``rounding``, else float32."""
    if rounding is None:
        return torch.float32
    if len(rounding.steps) != n or len(rounding.tensors) != n:
        raise ValueError(f"rounding has {len(rounding.steps)} steps and {len(rounding.tensors)} tensor indices "
                         f"for {n} tensors")
    if not 0 <= int(rounding.seed) < 2**32:
        raise ValueError(f"rounding seed {rounding.seed} is not in [0, 2**32)")
    return torch.bfloat16


def _prepared(net: torch.Tensor, states: Sequence[Mapping[str, torch.Tensor]], grads: Sequence[torch.Tensor],
              params: Sequence[torch.Tensor], rounding: Any, writable: bool):
    """Checks every member (nothing is launched before all pass), then the flat operands, the plan's
    per-member keys, and the parameters to copy back (a non-contiguous parameter stepped through a copy)."""
    n = len(params)
    if not (len(grads) == len(states) == n) or n == 0:
        raise ValueError(f"celo2.kernels.triton: {n} parameters, {len(grads)} gradients and {len(states)} states")
    s_dtype = _state_dtype(rounding, n)
    for state, grad, param in zip(states, grads, params):
        _check_operands(net, state, grad, param, s_dtype)
    device = _one_device(params)
    if rounding is not None:
        for step in rounding.steps:
            if not isinstance(step, torch.Tensor) or step.numel() != 1 or step.device != device \
                    or step.dtype != torch.int64:
                raise ValueError(f"rounding steps must be 0-d int64 tensors on {device}; got "
                                 f"{getattr(step, 'dtype', type(step))} on {getattr(step, 'device', None)}")
    shapes, dtypes, addresses, copies, flats = [], [], [], [], []
    for j, (state, grad, param) in enumerate(zip(states, grads, params)):
        shape = work_shape(param.shape)
        geo = _geometry(shape)
        g = _flat(grad)
        if writable and not param.is_contiguous():
            p = param.detach().contiguous().view(-1)
            copies.append((param, p))
        else:
            p = _flat(param)
        flats.append((g, p))
        fac_lo, fac_hi = (state["fac_r"], state["fac_c"]) if geo.row_is_lo else (state["fac_c"], state["fac_r"])
        addresses.append(dict(g=g.data_ptr(), p=p.data_ptr(), m=state["m"].data_ptr(), v=state["v"].data_ptr(),
                              fac_lo=fac_lo.data_ptr(), fac_hi=fac_hi.data_ptr(),
                              step=rounding.steps[j].data_ptr() if rounding is not None else 0))
        shapes.append(shape)
        dtypes.append((g.dtype, p.dtype, s_dtype))
    tensor_ids = [int(x) for x in rounding.tensors] if rounding is not None else [0] * n
    return device, shapes, dtypes, addresses, tensor_ids, flats, copies


def _launch_prefix(grp: _Group, scr: torch.Tensor, flags: torch.Tensor, net: torch.Tensor, seed: int,
                   skip: bool) -> None:
    """Launches 1 to 3 of the module docstring for one group: statistics (or the flag) and factors."""
    dt, tiles = grp.dtypes, grp.tiles
    if grp.factored:
        pm = grp.pmaps
        _grad_stats[(pm["stats"].numel() // 2,)](grp.tab, pm["stats"], scr, flags, G_DT=dt["G_DT"], BH=tiles["BH"],
                                                 BLL=tiles["BLL"], CHECK=skip)
        # Six (BO, BS) accumulators per program: eight warps hold them without a spill.
        _stat_reduce[(pm["sred"].numel() // 2, 3)](grp.tab, pm["sred"], scr, S_DT=dt["S_DT"], num_warps=8,
                                                   **{k: tiles[k] for k in ("BO0", "BS0", "BO1", "BS1", "BO2", "BS2")})
        _factors[(pm["fac"].numel() // 2, 2)](grp.tab, pm["fac"], scr, flags, net, seed, S_DT=dt["S_DT"],
                                              SBF=dt["SBF"], SKIP=skip, BLOCK=_FACTORS_BLOCK)
    elif skip:
        _flag_pass[(grp.pmaps["flag"].numel() // 2,)](grp.tab, grp.pmaps["flag"], flags, G_DT=dt["G_DT"], BLOCK=TILE)


def _reduce(grp: _Group, scr: torch.Tensor, flags: torch.Tensor, oks: torch.Tensor, src: str, dst: str, nch: int,
            eps: float, skip: bool, write_ok: bool) -> None:
    _reduce_groups[(grp.pmaps["red"].numel() // 2,)](
        grp.tab, grp.pmaps["red"], scr, flags, oks, SRC=_FIELD[src], DST=_FIELD[dst], NCH=nch, EPS=_f32(eps),
        SKIP=skip, WRITE_OK=write_ok, BGR=grp.tiles["BGR"], RB=grp.tiles["RB"])


def _run(kind: str, net: torch.Tensor, states, grads, params, lr: Scalar, weight_decay: Scalar, skip: bool,
         rounding: Any):
    """The passes of ``kind`` (``"direction"`` or ``"apply"``) for every member, a launch per pass and group."""
    device, shapes, dtypes, addresses, tensor_ids, flats, copies = _prepared(
        net, states, grads, params, rounding, writable=kind == "apply")
    if kind == "apply":
        check_scalar(lr, "lr", device)
        check_scalar(weight_decay, "weight_decay", device)
    seed = int(rounding.seed) if rounding is not None else 0
    with launch_device(device):
        plan = _plan(kind, device, shapes, dtypes, addresses, tensor_ids)
        f32 = dict(dtype=torch.float32, device=device)
        flags = torch.zeros(plan.members, dtype=torch.int32, device=device)
        oks = torch.empty(plan.members, **f32)
        scr = torch.empty(plan.scratch, **f32)
        out = torch.empty(plan.out, **f32)
        lr_ptr, lr_val = _scalar(lr, "lr", device)
        wd_ptr, wd_val = _scalar(weight_decay, "weight_decay", device)
        lr_t, wd_t = lr_ptr is not None, wd_ptr is not None
        lr_arg, wd_arg = lr_ptr if lr_t else flags, wd_ptr if wd_t else flags
        for grp in plan.groups:
            dt = grp.dtypes
            nch = layout.MATRIX_CHANNELS if grp.factored else layout.VECTOR_CHANNELS
            _launch_prefix(grp, scr, flags, net, seed, skip)
            elem = (grp.pmaps["elem"].numel() // 2,)
            common = dict(G_DT=dt["G_DT"], P_DT=dt["P_DT"], S_DT=dt["S_DT"], SBF=dt["SBF"], FACTORED=grp.factored,
                          SKIP=skip, BG=grp.bg, BL=grp.bl, num_warps=grp.warps)
            if grp.fused:
                _fused[elem](grp.tab, grp.pmaps["elem"], scr, flags, oks, out, net, lr_arg, lr_val, wd_arg, wd_val,
                             seed, MODE=WRITE if kind == "direction" else _APPLY_LOCAL, NCH=nch, LR_T=lr_t, WD_T=wd_t,
                             P_KIND=dt["P_KIND"], **common)
                continue
            _accumulate[elem](grp.tab, grp.pmaps["elem"], scr, flags, seed, **common)
            _reduce(grp, scr, flags, oks, "part", "inv", nch, spec.INPUT_NORM_EPS, skip, True)
            _direction[elem](grp.tab, grp.pmaps["elem"], scr, flags, out, net, seed,
                             MODE=WRITE if kind == "direction" else SQUARES, **common)
            if kind == "apply":
                _reduce(grp, scr, flags, oks, "sq", "scale", 1, spec.OUTPUT_NORM_EPS, skip, False)
                _held[elem](grp.tab, grp.pmaps["elem"], scr, oks, out, lr_arg, lr_val, wd_arg, wd_val,
                            P_DT=dt["P_DT"], D_DT=tl.float32, HELD=False, MODE=APPLY, LR_T=lr_t, WD_T=wd_t,
                            P_KIND=dt["P_KIND"], BG=grp.bg, BL=grp.bl, num_warps=grp.warps)
        for param, flat in copies:
            param.detach().copy_(flat.view(param.shape))
        if kind == "direction":
            return [(out[o:o + math.prod(s)].view(s), oks[i]) for i, (o, s) in enumerate(zip(plan.out_offsets, shapes))]
        return [oks[i] for i in range(plan.members)]


def direction_many(net: torch.Tensor, states: Sequence[dict[str, torch.Tensor]], grads: Sequence[torch.Tensor],
                   params: Sequence[torch.Tensor], *, skip_nonfinite: bool = True,
                   rounding: Any = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fold each gradient into its state in place and return the raw directions, a launch per pass and group.

    Args:
        net: the packed weights (:func:`pack_net`) on the parameters' device.
        states: per tensor, :func:`celo2.rule.state.state_shapes` of its parameter (contiguous; float32, or
            bfloat16 with ``rounding``); updated in place.
        grads: the gradients, their parameters' shapes, any float dtype (a non-contiguous one is copied).
        params: the parameters (read only), all on one device: float32, bfloat16, float16 or float64.
        skip_nonfinite: if True (default) a tensor whose gradient has a NaN or +-inf element keeps its
            state bitwise unchanged, its direction is zeros and its ``ok`` is 0; if False NaN propagates.
        rounding: ``None`` for float32 state; for bfloat16 state, an object with ``seed`` (int), ``steps``
            (per tensor a 0-d int64 tensor on the device: its step count after this step) and ``tensors``
            (per tensor its index in the optimizer's order), such as
            ``celo2.torch.backends.base.StateRounding``: every accumulator is stored rounded as
            :mod:`celo2.rule.rounding` says, the arithmetic staying float32.

    Returns:
        Per tensor ``(d, ok)``: ``d`` the raw direction (float32, contiguous, work shape: the parameter's
        shape, ``(1,)`` for a 0-D one), before Newton-Schulz and before the output RMS normalisation;
        ``ok`` a 0-d float32 tensor on the device, 1.0 when the tensor stepped, else 0.0. The launches
        depend on the groups only (the module docstring), never on the number or sizes of the tensors.

    Raises:
        RuntimeError: Triton is missing, or a CPU tensor outside the interpreter.
        TypeError: an unsupported parameter dtype.
        ValueError: an empty parameter, lists of different lengths, tensors on several devices, or a
            gradient, state entry, ``net`` or ``rounding`` of the wrong shape, dtype, device or layout
            (named in the message); raised before anything is launched.
        KeyError: a state entry is missing.
    """
    return _run("direction", net, states, grads, params, 0.0, 0.0, skip_nonfinite, rounding)


def apply_step_many(net: torch.Tensor, states: Sequence[dict[str, torch.Tensor]], grads: Sequence[torch.Tensor],
                    params: Sequence[torch.Tensor], lr: Scalar, weight_decay: Scalar, *,
                    skip_nonfinite: bool = True, rounding: Any = None) -> list[torch.Tensor]:
    """Celo2-base's whole step on every tensor, a launch per pass and group.

    ``p <- p (1 - lr wd) - lr d / sqrt(mean(d^2 over the last two axes) + OUTPUT_NORM_EPS)``.

    Args:
        net, states, grads, skip_nonfinite, rounding: as in :func:`direction_many` (a skipped step applies
            no weight decay either).
        params: updated in place (float32, bfloat16, float16 or float64; a non-contiguous one is updated
            through a contiguous copy and copied back).
        lr: learning rate, a Python float or a 0-d tensor on the device (never read on the host).
        weight_decay: decoupled weight decay, likewise.

    Returns:
        Per tensor ``ok`` as in :func:`direction_many`.

    Raises:
        As :func:`direction_many`; ValueError also for an ``lr`` or ``weight_decay`` tensor that is not
        a single value on the parameters' device (:func:`check_scalar`), before anything is written.
    """
    return _run("apply", net, states, grads, params, lr, weight_decay, skip_nonfinite, rounding)


_ONES: dict[torch.device, torch.Tensor] = {}


def apply_held_many(params: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
                    oks: Sequence[Optional[torch.Tensor]], lr: Scalar, weight_decay: Scalar) -> None:
    """The finish of held directions (e.g. after Newton-Schulz), 3 launches per group.

    ``p <- p (1 - lr wd) - lr d / sqrt(mean(d^2 over the last two axes) + OUTPUT_NORM_EPS)``
    where ``ok != 0``, else ``p`` is bitwise unchanged.

    Args:
        params: updated in place, all on one device (float32 math for float32, bfloat16 and float16
            parameters, rounded once; float64 math for float64 ones; a non-contiguous one goes through a copy).
        directions: per tensor, float32 or bfloat16, the work shape (the parameter's, ``(1,)`` for 0-D).
        oks: per tensor a 0-d float32 tensor on the device (from :func:`direction_many`), or None (apply).
        lr: learning rate, a Python float or a 0-d tensor on the device.
        weight_decay: decoupled weight decay, likewise.

    Raises:
        RuntimeError, TypeError: as :func:`direction_many`.
        ValueError: a direction, ``ok``, ``lr`` or ``weight_decay`` of the wrong shape, dtype or device
            (named), before anything is written.
    """
    if not (len(params) == len(directions) == len(oks)) or not params:
        raise ValueError(f"celo2.kernels.triton: {len(params)} parameters, {len(directions)} directions and "
                         f"{len(oks)} oks")
    for param, d, ok in zip(params, directions, oks):
        _require_available(param)
        shape = work_shape(param.shape)
        if tuple(d.shape) != shape or d.dtype not in (torch.float32, torch.bfloat16) or d.device != param.device:
            raise ValueError(f"d must be float32 or bfloat16 of shape {shape} on {param.device}; got {d.dtype} "
                             f"{tuple(d.shape)} on {d.device}")
        if ok is not None and (ok.numel() != 1 or ok.device != param.device or ok.dtype != torch.float32):
            raise ValueError(f"ok must be a 0-d float32 tensor on {param.device}; got {ok.dtype} shape "
                             f"{tuple(ok.shape)} on {ok.device}")
    device = _one_device(params)
    lr_ptr, lr_val = _scalar(lr, "lr", device)
    wd_ptr, wd_val = _scalar(weight_decay, "weight_decay", device)
    with launch_device(device):
        if any(ok is None for ok in oks) and device not in _ONES:
            _ONES[device] = torch.ones((), dtype=torch.float32, device=device)
        shapes, dtypes, addresses, copies, keep = [], [], [], [], []
        for param, d, ok in zip(params, directions, oks):
            if param.is_contiguous():
                flat = param.detach().view(-1)
            else:
                flat = param.detach().contiguous().view(-1)
                copies.append((param, flat))
            dflat = _flat(d)
            keep.append(dflat)
            okv = _ONES[device] if ok is None else ok
            shapes.append(work_shape(param.shape))
            dtypes.append((param.dtype, d.dtype))
            addresses.append(dict(p=flat.data_ptr(), d=dflat.data_ptr(), ok=okv.data_ptr()))
        plan = _plan("held", device, shapes, dtypes, addresses, [0] * len(params))
        scr = torch.empty(plan.scratch, dtype=torch.float32, device=device)
        lr_t, wd_t = lr_ptr is not None, wd_ptr is not None
        lr_arg, wd_arg = lr_ptr if lr_t else scr, wd_ptr if wd_t else scr
        for grp in plan.groups:
            elem = (grp.pmaps["elem"].numel() // 2,)
            common = dict(P_DT=grp.dtypes["P_DT"], D_DT=grp.dtypes["D_DT"], HELD=True, BG=grp.bg, BL=grp.bl,
                          num_warps=grp.warps)
            _held[elem](grp.tab, grp.pmaps["elem"], scr, scr, scr, scr, 0.0, scr, 0.0, MODE=SQUARES, LR_T=False,
                        WD_T=False, P_KIND=0, **common)
            _reduce(grp, scr, scr, scr, "sq", "scale", 1, spec.OUTPUT_NORM_EPS, False, False)
            _held[elem](grp.tab, grp.pmaps["elem"], scr, scr, scr, lr_arg, lr_val, wd_arg, wd_val, MODE=APPLY,
                        LR_T=lr_t, WD_T=wd_t, P_KIND=grp.dtypes["P_KIND"], **common)
        for param, flat in copies:
            param.detach().copy_(flat.view(param.shape))


def direction(net: torch.Tensor, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor, *,
              skip_nonfinite: bool = True, rounding: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`direction_many` of one tensor (``rounding`` with one step and one tensor index).

    Returns:
        ``(d, ok)`` as in :func:`direction_many`. 6 launches for a tensor of two or more dims, 4 for a
        vector (4 and 2 when its groups fit one tile; a vector's flag pass only with the skip; see the
        module docstring), plus the flags' zeros.

    Raises:
        As :func:`direction_many`.
    """
    return direction_many(net, [state], [grad], [param], skip_nonfinite=skip_nonfinite, rounding=rounding)[0]


def apply_step(net: torch.Tensor, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
               lr: Scalar, weight_decay: Scalar, *, skip_nonfinite: bool = True, rounding: Any = None) -> torch.Tensor:
    """:func:`apply_step_many` of one tensor; returns its ``ok``.

    Raises:
        As :func:`apply_step_many`.
    """
    return apply_step_many(net, [state], [grad], [param], lr, weight_decay, skip_nonfinite=skip_nonfinite,
                           rounding=rounding)[0]


def apply_held(param: torch.Tensor, d: torch.Tensor, ok: Optional[torch.Tensor], lr: Scalar,
               weight_decay: Scalar) -> None:
    """:func:`apply_held_many` of one tensor (3 launches).

    Raises:
        As :func:`apply_held_many`.
    """
    apply_held_many([param], [d], [ok], lr, weight_decay)
