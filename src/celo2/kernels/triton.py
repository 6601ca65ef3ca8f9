"""Fused Triton kernels for the rule on one tensor of any shape (GPU; CPU under the interpreter).

The PyTorch front end calls these for accelerator tensors (``backend="triton"``)
instead of its chunked path, whose dispatch count
grows with the tensor's size. Here every tensor takes a fixed number of kernel
launches whatever its size, never synchronises with the host and never reads
a tensor value on the host, so a step can be captured in a CUDA graph.

**One view of every shape.** A tensor (work shape ``S``: a 0-D tensor counts as
``(1,)``) is ``G`` normalisation groups of ``L`` contiguous elements: the whole
tensor for 0-D, 1-D and 2-D tensors, each leading index for ``N >= 3`` dims
(the input and output RMS are taken over the last two axes). A factored tensor
(two or more dims) is also viewed as the contiguous 5-D block
``(A, SH, B, SL, C)``, where ``SH`` and ``SL`` are the two factored axes of
:func:`celo2.rule.state.factoring` (``SH`` the earlier one). Its two
factored statistics are the tensor without ``SL`` (the "lo" statistic) and
without ``SH`` (the "hi" statistic); which of them is the row statistic (the
one without ``d0``) is a host-side choice of pointers and weights, so every
shape (conv kernels ``(O, I, kh, kw)`` as much as ``(3, 3, 4, 8)`` or a
column) runs the same kernels. An element's statistic indices follow from its
flat index by integer division.

**Passes** (docs/architecture.md, "The passes of a fused step": the four
passes, with the reductions between them that the GPU launches apart). A
factored tensor's direction takes 7 launches:

1. a zeroed ``int32`` non-finite flag (``torch.zeros``);
2. ``_grad_stats``: reads ``g`` once; sums of ``clip(g)^2`` over ``SL``
   (complete per program) and per-block partial sums over ``SH``; raises the
   flag (``atomic_max`` on an integer: order-independent, hence deterministic)
   where ``g`` has a NaN or +-inf element;
3. ``_stat_reduce``: on the statistics folded on the fly, the row statistic's
   mean over ``d1`` and, per statistic group, the RMS of each statistic and of
   its ``rsqrt(. + eps)`` (the rank-1 channels' input normalisation);
4. ``_factors``: folds the statistics in place (unless the flag is up), writes
   the Adafactor factors and the rank-1 channels' share of the first layer
   (with ``b0``) per statistic element;
5. ``_accumulate``: folds ``g`` into ``m`` and ``v`` (unless the flag is up)
   and writes per-block partial sums of squares of the 18 per-element channels;
6. ``_reduce_groups``: the partials, summed in a fixed order, as each group's
   inverse input RMS per channel, and ``ok``;
7. ``_direction``: channels -> MLP -> the raw direction (written).

A vector (15 channels, unfactored) takes 5: the flag, ``_flag_pass``,
``_accumulate`` (which also folds its full-size statistic), ``_reduce_groups``,
``_direction``. :func:`apply_step` runs the direction pass twice (``SQUARES``:
per-block sums of ``d^2``; then ``APPLY``) with a ``_reduce_groups`` between:
9 launches for a factored tensor, 7 for a vector. :func:`apply_held` takes 3.

When every normalisation group fits one tile (``L <= TILE``: conv kernels and
other N-D tensors with small trailing axes, matrices and vectors of up to
``TILE`` elements), passes 5-7 are one launch, ``_fused``, which also applies
the direction with its groups' output RMS; then ``direction`` and
``apply_step`` both take 5 launches for a factored tensor and 3 for a vector,
and read the full-size operands once after ``_grad_stats``. So the count
depends on the shape's kind only, never on its size.

Block sizes are fixed or chosen from the shape on the host. The full-size
streams per element of a step follow from these passes (a matrix's
``apply_step`` reads ``g`` four times and ``p``, ``m``, ``v`` three times, and
writes ``p``, ``m``, ``v`` once); ``benchmarks/triton_traffic.py`` counts them
from the kernels' loads and stores.

**Determinism.** Every float reduction is a per-block partial reduced in a
fixed order by a later launch (or inside one program), so results do not
depend on scheduling; the only atomic is the integer flag's maximum.

**Non-finite gradients.** The first pass that reads ``g`` raises the flag in
device memory; every later pass reads it: with ``skip_nonfinite`` the state
and parameter stores are masked off (state and parameter bitwise unchanged),
the written direction is zeros and ``ok`` is 0. A clean step stores exactly
what it would without the flag.

**Dtypes and layouts.** Gradients of any float dtype and parameters in
float32, bfloat16, float16 or float64 are loaded and cast to float32
explicitly; state is float32. Parameter updates combine in float32 and round
once (float64 parameters combine in float64). The kernels index contiguous
operands only: a non-contiguous gradient or parameter is copied to a
contiguous one first (an extra copy launch), and a non-contiguous parameter
is updated through that copy and copied back; state must be contiguous, shaped
by :func:`celo2.rule.state.state_shapes` (as the front end's ``init_tensor_state`` makes it). Element indices are
64-bit; a tensor has fewer than :data:`MAX_ELEMENTS` elements.

**Devices.** Every launch runs on the parameter's device (:func:`launch_device`
makes it the current CUDA device around the launches); ``lr`` and weight decay
are Python floats or 0-d tensors on that device (:func:`check_scalar`).

Every constant comes from :mod:`celo2.rule.spec` and every offset from
:mod:`celo2.rule.layout` (as ``tl.constexpr`` module values). Triton reads
``TRITON_INTERPRET`` when a kernel is decorated, so the interpreter mode is
fixed when this module is first imported (:data:`INTERPRETED`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Union

import numpy as np
import torch

from celo2.rule import layout, spec
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
    _INF = _C(float("inf"))

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
    def _tile(G, L, nlb, BG: tl.constexpr, BL: tl.constexpr):
        """This program's ``(BG, BL)`` tile: ``BG`` groups, ``BL`` elements of each, from block ``nlb``."""
        pid = tl.program_id(0).to(tl.int64)
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
    def _total(tot_ptr, nparts, ns, i, mask):
        """The sum over ``nparts`` partial rows (``ns`` apart) at ``i``, in order."""
        tot = tl.load(tot_ptr + i, mask=mask, other=0.0)
        for q in range(1, nparts):
            tot += tl.load(tot_ptr + q * ns + i, mask=mask, other=0.0)
        return tot

    @triton.jit
    def _fold(s_ptr, ns, x, i, mask, k: tl.constexpr, wf):
        """Statistic ``k`` folded with the mean ``x`` (``+ FACTORED_EPS``), not stored."""
        s = tl.load(_row(s_ptr, k, ns) + i, mask=mask, other=1.0)
        return s + wf * (x - s)

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
    def _grad_stats(g_ptr, sum_lo_ptr, part_hi_ptr, flag_ptr, SH, B, SL, C, n_hi,
                    BH: tl.constexpr, BLL: tl.constexpr, CHECK: tl.constexpr):
        """Program ``(a, block of h, b, c)`` of the ``(A, SH, B, SL, C)`` view: the sums of
        ``clip(g)^2`` over ``SL`` (complete) and its block's partial sums over ``SH``."""
        pid = tl.program_id(0).to(tl.int64)
        nhb = (SH + BH - 1) // BH
        hb = pid % nhb
        t = pid // nhb
        c = t % C
        t = t // C
        b = t % B
        a = t // B
        h = hb * BH + tl.arange(0, BH)
        hmask = h < SH
        row = ((a * SH + h) * B + b) * SL
        acc = tl.full([BH], 0.0, tl.float32)
        bad = tl.full([BH, BLL], 0, tl.int32)
        for l0 in range(0, SL, BLL):
            l = l0 + tl.arange(0, BLL)
            lmask = l < SL
            mask = hmask[:, None] & lmask[None, :]
            graw = tl.load(g_ptr + (row[:, None] + l[None, :]) * C + c, mask=mask, other=0.0)
            if CHECK:
                bad = bad | _nonfinite(graw)
            g = _clip(graw.to(tl.float32), _GRAD_CLIP)
            g2 = g * g
            acc += _sum(g2, 1)
            tl.store(part_hi_ptr + hb * n_hi + ((a * B + b) * SL + l) * C + c, _sum(g2, 0), mask=lmask)
        tl.store(sum_lo_ptr + ((a * SH + h) * B + b) * C + c, acc, mask=hmask)
        if CHECK:
            tl.atomic_max(flag_ptr, _max(_max(bad, 1), 0))

    @triton.jit
    def _flag_pass(g_ptr, flag_ptr, N, BLOCK: tl.constexpr):
        """A vector's first pass: the non-finite flag only."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        graw = tl.load(g_ptr + i, mask=i < N, other=0.0)
        tl.atomic_max(flag_ptr, _max(_nonfinite(graw), 0))

    # =============================================================================
    # Passes 2-3: the factored statistics
    # =============================================================================
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
    def _stat_reduce(lo_ptr, lo_tot, lo_parts, n_lo, lo_inv, hi_ptr, hi_tot, hi_parts, n_hi, hi_inv,
                     mean_ptr, n_mean, mean_s, mean_q, norm_lo, normr_lo, ng_lo, len_lo,
                     norm_hi, normr_hi, ng_hi, len_hi, ROW_IS_LO: tl.constexpr,
                     BO0: tl.constexpr, BS0: tl.constexpr, BO1: tl.constexpr, BS1: tl.constexpr,
                     BO2: tl.constexpr, BS2: tl.constexpr):
        """Axis 1 of the grid: 0 the row statistic's mean over ``d1``, 1 / 2 the lo / hi
        statistic's input normalisation per statistic group."""
        pid = tl.program_id(0)
        which = tl.program_id(1)
        if which == 0:
            if ROW_IS_LO:
                _stat_reduce_one(lo_ptr, lo_tot, lo_parts, n_lo, lo_inv, mean_ptr, mean_ptr, n_mean, mean_s, mean_q,
                                 pid, False, BO0, BS0)
            else:
                _stat_reduce_one(hi_ptr, hi_tot, hi_parts, n_hi, hi_inv, mean_ptr, mean_ptr, n_mean, mean_s, mean_q,
                                 pid, False, BO0, BS0)
        elif which == 1:
            _stat_reduce_one(lo_ptr, lo_tot, lo_parts, n_lo, lo_inv, norm_lo, normr_lo, ng_lo, len_lo, 1,
                             pid, True, BO1, BS1)
        else:
            _stat_reduce_one(hi_ptr, hi_tot, hi_parts, n_hi, hi_inv, norm_hi, normr_hi, ng_hi, len_hi, 1,
                             pid, True, BO2, BS2)

    @triton.jit
    def _factor_k(x, k: tl.constexpr, s_ptr, f_ptr, ns, i, mask, store, mean_ptr, n_mean, mi, norm_ptr, normr_ptr,
                  ng, sg, net_ptr, term, IS_ROW: tl.constexpr, W_OFF: tl.constexpr):
        """Statistic ``k``: stored folded, its Adafactor factor, and its two channels' share of ``term``."""
        tl.store(_row(s_ptr, k, ns) + i, x, mask=store)
        if IS_ROW:
            y = x / (tl.load(_row(mean_ptr, k, n_mean) + mi, mask=mask, other=1.0) + _ROW_MEAN_EPS)
        else:
            y = x
        tl.store(_row(f_ptr, k, ns) + i, tl.rsqrt(tl.maximum(y, _SAFE_RSQRT_FLOOR)), mask=mask)
        hidx = tl.arange(0, _H)
        a = x * tl.load(_row(norm_ptr, k, ng) + sg, mask=mask, other=0.0)
        r = tl.rsqrt(x + _RSQRT_EPS) * tl.load(_row(normr_ptr, k, ng) + sg, mask=mask, other=0.0)
        w = tl.load(net_ptr + W_OFF + k * _H + hidx)
        wr = tl.load(net_ptr + W_OFF + (3 + k) * _H + hidx)
        return term + a[:, None] * w[None, :] + r[:, None] * wr[None, :]

    @triton.jit
    def _factors_one(s_ptr, tot_ptr, nparts, ns, inv_n, f_ptr, t_ptr, mean_ptr, n_mean, mean_s, mean_q,
                     norm_ptr, normr_ptr, ng, len_s, net_ptr, flag_ptr, pid,
                     IS_ROW: tl.constexpr, W_OFF: tl.constexpr, SKIP: tl.constexpr, BLOCK: tl.constexpr):
        i = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < ns
        store = _where_ok(mask, flag_ptr, SKIP)
        x = _total(tot_ptr, nparts, ns, i, mask) * inv_n + _FACTORED_EPS
        mi = (i // (mean_s * mean_q)) * mean_q + i % mean_q
        sg = i // len_s
        hidx = tl.arange(0, _H)
        term = tl.full([BLOCK, _H], 0.0, tl.float32)
        if IS_ROW:
            term += tl.load(net_ptr + _B0 + hidx)[None, :]
        term = _factor_k(_fold(s_ptr, ns, x, i, mask, 0, _WF0), 0, s_ptr, f_ptr, ns, i, mask, store, mean_ptr,
                         n_mean, mi, norm_ptr, normr_ptr, ng, sg, net_ptr, term, IS_ROW, W_OFF)
        term = _factor_k(_fold(s_ptr, ns, x, i, mask, 1, _WF1), 1, s_ptr, f_ptr, ns, i, mask, store, mean_ptr,
                         n_mean, mi, norm_ptr, normr_ptr, ng, sg, net_ptr, term, IS_ROW, W_OFF)
        term = _factor_k(_fold(s_ptr, ns, x, i, mask, 2, _WF2), 2, s_ptr, f_ptr, ns, i, mask, store, mean_ptr,
                         n_mean, mi, norm_ptr, normr_ptr, ng, sg, net_ptr, term, IS_ROW, W_OFF)
        tl.store(t_ptr + hidx[None, :].to(tl.int64) * ns + i[:, None], term, mask=mask[:, None])

    @triton.jit
    def _factors(lo_ptr, lo_tot, lo_parts, n_lo, lo_inv, f_lo, t_lo, hi_ptr, hi_tot, hi_parts, n_hi, hi_inv, f_hi,
                 t_hi, mean_ptr, n_mean, mean_s, mean_q, norm_lo, normr_lo, ng_lo, len_lo,
                 norm_hi, normr_hi, ng_hi, len_hi, net_ptr, flag_ptr,
                 LO_IS_ROW: tl.constexpr, HI_IS_ROW: tl.constexpr, W_LO: tl.constexpr, W_HI: tl.constexpr,
                 SKIP: tl.constexpr, BLOCK: tl.constexpr):
        """Axis 1 of the grid: 0 the lo statistic, 1 the hi statistic (``W_LO`` / ``W_HI``: their
        first-layer rows in the packed weights)."""
        pid = tl.program_id(0)
        if tl.program_id(1) == 0:
            _factors_one(lo_ptr, lo_tot, lo_parts, n_lo, lo_inv, f_lo, t_lo, mean_ptr, n_mean, mean_s, mean_q,
                         norm_lo, normr_lo, ng_lo, len_lo, net_ptr, flag_ptr, pid,
                         LO_IS_ROW, W_LO, SKIP, BLOCK)
        else:
            _factors_one(hi_ptr, hi_tot, hi_parts, n_hi, hi_inv, f_hi, t_hi, mean_ptr, n_mean, mean_s, mean_q,
                         norm_hi, normr_hi, ng_hi, len_hi, net_ptr, flag_ptr, pid,
                         HI_IS_ROW, W_HI, SKIP, BLOCK)

    # =============================================================================
    # Passes 4-6: accumulators, input RMS, direction
    # =============================================================================
    @triton.jit
    def _load_state(g_ptr, p_ptr, m_ptr, v_ptr, N, n, mask):
        """``g`` (clipped), ``p`` as stored and as float32, ``m`` and ``v`` at ``n``."""
        g = _clip(tl.load(g_ptr + n, mask=mask, other=0.0).to(tl.float32), _GRAD_CLIP)
        praw = tl.load(p_ptr + n, mask=mask, other=0.0)
        p = praw.to(tl.float32)
        m0 = tl.load(m_ptr + n, mask=mask, other=0.0)
        m1 = tl.load(m_ptr + N + n, mask=mask, other=0.0)
        m2 = tl.load(m_ptr + N + N + n, mask=mask, other=0.0)
        v = tl.load(v_ptr + n, mask=mask, other=0.0)
        return g, praw, p, m0, m1, m2, v

    @triton.jit
    def _gather_factors(f_lo, f_hi, n, mask, lo_inner, lo_span, n_lo, hi_inner, hi_span, n_hi):
        ilo = _remove(n, lo_inner, lo_span)
        ihi = _remove(n, hi_inner, hi_span)
        f0 = tl.load(f_lo + ilo, mask=mask, other=0.0) * tl.load(f_hi + ihi, mask=mask, other=0.0)
        f1 = tl.load(f_lo + n_lo + ilo, mask=mask, other=0.0) * tl.load(f_hi + n_hi + ihi, mask=mask, other=0.0)
        f2 = (tl.load(f_lo + n_lo + n_lo + ilo, mask=mask, other=0.0)
              * tl.load(f_hi + n_hi + n_hi + ihi, mask=mask, other=0.0))
        return ilo, ihi, f0, f1, f2

    @triton.jit
    def _vector_factor(a):
        return tl.rsqrt(tl.maximum(a + _VECTOR_FACTOR_EPS, _SAFE_RSQRT_FLOOR))

    @triton.jit
    def _accumulate(g_ptr, p_ptr, m_ptr, v_ptr, fac_ptr, f_lo, f_hi, flag_ptr, part_ptr,
                    N, G, L, nlb, lo_inner, lo_span, n_lo, hi_inner, hi_span, n_hi,
                    FACTORED: tl.constexpr, SKIP: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr):
        """Fold ``g`` into ``m`` and ``v`` (a vector's ``fac`` too) and write the per-block sums of
        squares of the per-element channels."""
        pl, grp, gmask, mask, n = _tile(G, L, nlb, BG, BL)
        _accumulate_tile(pl, grp, gmask, mask, n, g_ptr, p_ptr, m_ptr, v_ptr, fac_ptr, f_lo, f_hi, flag_ptr,
                         part_ptr, N, G, nlb, lo_inner, lo_span, n_lo, hi_inner, hi_span, n_hi, FACTORED, SKIP)

    @triton.jit
    def _accumulate_tile(pl, grp, gmask, mask, n, g_ptr, p_ptr, m_ptr, v_ptr, fac_ptr, f_lo, f_hi, flag_ptr,
                         part_ptr, N, G, nlb, lo_inner, lo_span, n_lo, hi_inner, hi_span, n_hi,
                         FACTORED: tl.constexpr, SKIP: tl.constexpr):
        """The accumulate pass on one tile; returns what the direction pass reads (state updated)."""
        store = _where_ok(mask, flag_ptr, SKIP)
        g, praw, p, m0, m1, m2, v = _load_state(g_ptr, p_ptr, m_ptr, v_ptr, N, n, mask)
        m0 = m0 + _WM0 * (g - m0)
        m1 = m1 + _WM1 * (g - m1)
        m2 = m2 + _WM2 * (g - m2)
        g2 = g * g
        v = _RMS_DECAY * v + _RMS_W * g2
        tl.store(m_ptr + n, m0, mask=store)
        tl.store(m_ptr + N + n, m1, mask=store)
        tl.store(m_ptr + N + N + n, m2, mask=store)
        tl.store(v_ptr + n, v, mask=store)
        if FACTORED:
            ilo, ihi, f0, f1, f2 = _gather_factors(f_lo, f_hi, n, mask, lo_inner, lo_span, n_lo, hi_inner, hi_span,
                                                   n_hi)
        else:
            gsq = g2 + _FACTORED_EPS
            a0 = tl.load(fac_ptr + n, mask=mask, other=0.0)
            a1 = tl.load(fac_ptr + N + n, mask=mask, other=0.0)
            a2 = tl.load(fac_ptr + N + N + n, mask=mask, other=0.0)
            a0 = a0 + _WF0 * (gsq - a0)
            a1 = a1 + _WF1 * (gsq - a1)
            a2 = a2 + _WF2 * (gsq - a2)
            tl.store(fac_ptr + n, a0, mask=store)
            tl.store(fac_ptr + N + n, a1, mask=store)
            tl.store(fac_ptr + N + N + n, a2, mask=store)
            f0 = _vector_factor(a0)
            f1 = _vector_factor(a1)
            f2 = _vector_factor(a2)
            ilo = n
            ihi = n
        r = 1.0 / (v + _RSQRT_EPS)
        q0 = m0 * m0
        q1 = m1 * m1
        q2 = m2 * m2
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
    def _reduce_groups(part_ptr, out_ptr, G, nlb, L, flag_ptr, ok_ptr, NCH: tl.constexpr, EPS: tl.constexpr,
                       SKIP: tl.constexpr, WRITE_OK: tl.constexpr, BGR: tl.constexpr, RB: tl.constexpr):
        """``out[c, grp] = rsqrt(sum_b part[c, grp, b] / L + EPS)``, the blocks summed in a fixed order;
        with ``WRITE_OK`` program 0 also writes ``ok`` from the flag."""
        pid = tl.program_id(0)
        grp = pid.to(tl.int64) * BGR + tl.arange(0, BGR)
        _reduce_rows(part_ptr, out_ptr, grp, grp < G, G, nlb, L, NCH, EPS, RB)
        if WRITE_OK:
            if pid == 0:
                _write_ok(flag_ptr, ok_ptr, SKIP)

    @triton.jit
    def _reduce_rows(part_ptr, out_ptr, grp, gmask, G, nlb, L, NCH: tl.constexpr, EPS: tl.constexpr,
                     RB: tl.constexpr):
        for c in tl.static_range(NCH):
            acc = tl.full([grp.shape[0], RB], 0.0, tl.float32)
            for j0 in range(0, nlb, RB):
                j = j0 + tl.arange(0, RB)
                acc += tl.load(_row(part_ptr, c, G * nlb) + grp[:, None] * nlb + j[None, :],
                               mask=gmask[:, None] & (j < nlb)[None, :], other=0.0)
            tl.store(_row(out_ptr, c, G) + grp, tl.rsqrt(_sum(acc, 1) / L + EPS), mask=gmask)

    @triton.jit
    def _write_ok(flag_ptr, ok_ptr, SKIP: tl.constexpr):
        if SKIP:
            tl.store(ok_ptr, 1.0 - (tl.load(flag_ptr) != 0).to(tl.float32))
        else:
            tl.store(ok_ptr, tl.full([], 1.0, tl.float32))

    @triton.jit
    def _direction(g_ptr, p_ptr, m_ptr, v_ptr, fac_ptr, f_lo, f_hi, t_lo, t_hi, inv_ptr, net_ptr, flag_ptr,
                   out_ptr, sq_ptr, scale_ptr, lr_ptr, lr, wd_ptr, wd,
                   N, G, L, nlb, lo_inner, lo_span, n_lo, hi_inner, hi_span, n_hi,
                   FACTORED: tl.constexpr, SKIP: tl.constexpr, MODE: tl.constexpr, LR_T: tl.constexpr,
                   WD_T: tl.constexpr, P_KIND: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr):
        """Channels -> MLP -> direction; MODE 0 writes it (zeros when the flag is up), 1 writes
        per-block sums of its squares, 2 applies it with each group's ``scale``."""
        pl, grp, gmask, mask, n = _tile(G, L, nlb, BG, BL)
        g, praw, p, m0, m1, m2, v = _load_state(g_ptr, p_ptr, m_ptr, v_ptr, N, n, mask)
        if FACTORED:
            ilo, ihi, f0, f1, f2 = _gather_factors(f_lo, f_hi, n, mask, lo_inner, lo_span, n_lo, hi_inner, hi_span,
                                                   n_hi)
        else:
            f0 = _vector_factor(tl.load(fac_ptr + n, mask=mask, other=1.0))
            f1 = _vector_factor(tl.load(fac_ptr + N + n, mask=mask, other=1.0))
            f2 = _vector_factor(tl.load(fac_ptr + N + N + n, mask=mask, other=1.0))
            ilo = n
            ihi = n
        _direction_tile(pl, grp, gmask, mask, n, g, praw, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi, t_lo, t_hi,
                        inv_ptr, net_ptr, flag_ptr, p_ptr, out_ptr, sq_ptr, scale_ptr, lr_ptr, lr, wd_ptr, wd,
                        G, L, nlb, n_lo, n_hi, FACTORED, SKIP, MODE, LR_T, WD_T, P_KIND, BG, BL)

    @triton.jit
    def _direction_tile(pl, grp, gmask, mask, n, g, praw, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi, t_lo, t_hi,
                        inv_ptr, net_ptr, flag_ptr, p_ptr, out_ptr, sq_ptr, scale_ptr, lr_ptr, lr, wd_ptr, wd,
                        G, L, nlb, n_lo, n_hi, FACTORED: tl.constexpr, SKIP: tl.constexpr, MODE: tl.constexpr,
                        LR_T: tl.constexpr, WD_T: tl.constexpr, P_KIND: tl.constexpr, BG: tl.constexpr,
                        BL: tl.constexpr):
        """The direction pass on one tile, from its loaded (and updated) values; MODE 4 (``_APPLY_LOCAL``)
        applies it with the output RMS of the tile's groups (each group whole in the tile)."""
        rv = tl.rsqrt(v + _RSQRT_EPS)
        hidx = tl.arange(0, _H)
        # The hidden axis leads ``(H, BG, BL)``: each thread holds every hidden unit of its elements, so the
        # layers' sums over it stay within the thread.
        if FACTORED:
            hoff = hidx[:, None, None].to(tl.int64)
            m3 = mask[None, :, :]
            h = (tl.load(t_lo + hoff * n_lo + ilo[None, :, :], mask=m3, other=0.0)
                 + tl.load(t_hi + hoff * n_hi + ihi[None, :, :], mask=m3, other=0.0))
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
        if MODE == 0:
            tl.store(out_ptr + n, tl.where(_where_ok(mask, flag_ptr, SKIP), d, 0.0), mask=mask)
        elif MODE == 1:
            _psum(sq_ptr, 0, d * d, mask, grp, gmask, G, nlb, pl)
        else:
            if MODE == 2:
                scale = tl.load(scale_ptr + grp, mask=gmask, other=0.0)[:, None]
            else:
                scale = tl.rsqrt(_sum(tl.where(mask, d * d, 0.0), 1) / L + _OUTPUT_NORM_EPS)[:, None]
            _update_param(p_ptr, praw, n, _where_ok(mask, flag_ptr, SKIP), d, scale, lr_ptr, lr, wd_ptr, wd,
                          LR_T, WD_T, P_KIND)

    @triton.jit
    def _fused(g_ptr, p_ptr, m_ptr, v_ptr, fac_ptr, f_lo, f_hi, t_lo, t_hi, part_ptr, inv_ptr, net_ptr, flag_ptr,
               ok_ptr, out_ptr, lr_ptr, lr, wd_ptr, wd, N, G, L, lo_inner, lo_span, n_lo, hi_inner, hi_span, n_hi,
               FACTORED: tl.constexpr, SKIP: tl.constexpr, MODE: tl.constexpr, NCH: tl.constexpr,
               LR_T: tl.constexpr, WD_T: tl.constexpr, P_KIND: tl.constexpr, BG: tl.constexpr, BL: tl.constexpr):
        """Accumulate, input RMS and direction in one launch, for tensors whose groups each fit one tile
        (``L <= BL``): MODE 0 writes the raw direction, MODE 4 applies it. The values loaded for the
        accumulators feed the direction from registers; the tile's channel sums go through
        ``part``/``inv`` in memory, which only this program touches (a barrier between)."""
        pl, grp, gmask, mask, n = _tile(G, L, 1, BG, BL)
        g, praw, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi = _accumulate_tile(
            pl, grp, gmask, mask, n, g_ptr, p_ptr, m_ptr, v_ptr, fac_ptr, f_lo, f_hi, flag_ptr, part_ptr,
            N, G, 1, lo_inner, lo_span, n_lo, hi_inner, hi_span, n_hi, FACTORED, SKIP)
        tl.debug_barrier()
        _reduce_rows(part_ptr, inv_ptr, grp, gmask, G, 1, L, NCH, _INPUT_NORM_EPS, 1)
        tl.debug_barrier()
        _direction_tile(pl, grp, gmask, mask, n, g, praw, p, m0, m1, m2, v, f0, f1, f2, ilo, ihi, t_lo, t_hi,
                        inv_ptr, net_ptr, flag_ptr, p_ptr, out_ptr, out_ptr, out_ptr, lr_ptr, lr, wd_ptr, wd,
                        G, L, 1, n_lo, n_hi, FACTORED, SKIP, MODE, LR_T, WD_T, P_KIND, BG, BL)
        if tl.program_id(0) == 0:
            _write_ok(flag_ptr, ok_ptr, SKIP)

    @triton.jit
    def _held(d_ptr, p_ptr, sq_ptr, scale_ptr, ok_ptr, lr_ptr, lr, wd_ptr, wd, G, L, nlb,
              MODE: tl.constexpr, LR_T: tl.constexpr, WD_T: tl.constexpr, P_KIND: tl.constexpr,
              BG: tl.constexpr, BL: tl.constexpr):
        """A held direction: MODE 1 per-block sums of ``d^2``, MODE 2 the update where ``ok``."""
        pl, grp, gmask, mask, n = _tile(G, L, nlb, BG, BL)
        d = tl.load(d_ptr + n, mask=mask, other=0.0).to(tl.float32)
        if MODE == 1:
            _psum(sq_ptr, 0, d * d, mask, grp, gmask, G, nlb, pl)
        else:
            scale = tl.load(scale_ptr + grp, mask=gmask, other=0.0)[:, None]
            ok = mask & ((mask.to(tl.float32) * 0.0 + tl.load(ok_ptr)) != 0)
            p = tl.load(p_ptr + n, mask=mask, other=0.0)
            _update_param(p_ptr, p, n, ok, d, scale, lr_ptr, lr, wd_ptr, wd, LR_T, WD_T, P_KIND)


# =============================================================================
# Host side
# =============================================================================
def _pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@dataclass(frozen=True)
class _Geometry:
    """How the kernels see one work shape (see the module docstring); shape only."""

    shape: tuple[int, ...]
    numel: int
    groups: int  # G
    group_len: int  # L
    factored: bool
    # element tiles
    bg: int
    bl: int
    nlb: int  # blocks per group
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
    bh: int = 1  # grad_stats tile
    bll: int = 1

    @property
    def fused(self) -> bool:
        """Whether each group fits one tile: accumulate, input RMS and direction then take one launch."""
        return self.nlb == 1

    @property
    def warps(self) -> int:
        """Warps per program of the element passes: two elements of a tile per thread (4 to 16 warps).
        The direction pass holds every hidden unit of its elements in the thread's registers; at two
        elements per thread it needs no more than 128 registers (four spilled at 255)."""
        return max(4, min(16, self.bg * self.bl // 64))

    @property
    def programs(self) -> int:
        return -(-self.groups // self.bg) * self.nlb

    @property
    def nhb(self) -> int:
        return -(-self.SH // self.bh)

    @property
    def n_mean(self) -> int:
        return self.n_lo // self.mean_s if self.row_is_lo else self.n_hi // self.mean_s


@lru_cache(maxsize=256)
def _geometry(shape: tuple[int, ...]) -> _Geometry:
    nd = len(shape)
    numel = math.prod(shape)
    L = shape[-2] * shape[-1] if nd >= 3 else numel
    G = numel // L
    bl = min(_pow2(L), TILE)
    # A tile of several groups holds half as many elements: its per-group sums and scales take registers
    # of their own, and at TILE elements the direction pass would spill.
    bg = min(max(1, TILE // (2 * bl)), _pow2(G))
    common = dict(shape=shape, numel=numel, groups=G, group_len=L, bg=bg, bl=bl, nlb=-(-L // bl))
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
    bll = min(_pow2(SL), 128)
    bh = min(_pow2(SH), max(8, TILE // bll))
    return _Geometry(factored=True, A=A, SH=SH, B=B, SL=SL, C=C, row_is_lo=row_is_lo, n_lo=numel // SL,
                     n_hi=numel // SH, len_lo=group_len(lo), len_hi=group_len(hi), mean_s=mean_s, mean_q=mean_q,
                     bh=bh, bll=bll, **common)


def _reduce_tile(outputs: int, length: int) -> tuple[int, int, int]:
    """(rows, columns, programs) of a reduction of ``outputs`` rows of ``length`` values each."""
    bs = min(_pow2(length), 256)
    bo = min(_pow2(outputs), max(1, TILE // bs))
    return bo, bs, -(-outputs // bo)


def _param_kind(dtype: torch.dtype) -> int:
    """How :func:`_update_param` combines: 0 float32, 1 float64, 2 bfloat16, 3 float16."""
    return {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}[dtype]


@lru_cache(maxsize=256)
def _state_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """:func:`celo2.rule.state.state_shapes`, cached per shape (it is read on every launch)."""
    return state_shapes(shape)


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
                    param: torch.Tensor) -> None:
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
        if tuple(t.shape) != tuple(want) or t.dtype != torch.float32 or t.device != param.device:
            raise ValueError(f"state[{key!r}] must be float32 {tuple(want)} on {param.device}; got {t.dtype} "
                             f"{tuple(t.shape)} on {t.device}")
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


@dataclass
class _Prepared:
    """One tensor's step up to its direction pass: what that pass reads."""

    geo: _Geometry
    args: tuple  # the direction kernel's leading pointer arguments
    ints: tuple  # its integer arguments
    flag: torch.Tensor
    ok: torch.Tensor
    skip: bool
    part: torch.Tensor  # per-block channel sums
    nch: int  # per-element channels


def _prepare(net: torch.Tensor, state: Mapping[str, torch.Tensor], g: torch.Tensor, p: torch.Tensor,
             geo: _Geometry, skip: bool) -> _Prepared:
    """Launches 1 to 6 of the module docstring (1 to 4 for a vector)."""
    dev = p.device
    f32 = dict(dtype=torch.float32, device=dev)
    N, G, L, nlb = geo.numel, geo.groups, geo.group_len, geo.nlb
    m, v = state["m"].view(-1), state["v"].view(-1)
    flag = torch.zeros((), dtype=torch.int32, device=dev)
    ok = torch.empty((), **f32)
    nch = layout.MATRIX_CHANNELS if geo.factored else layout.VECTOR_CHANNELS
    part = torch.empty(nch * G * nlb, **f32)
    inv = torch.empty(nch * G, **f32)
    if geo.factored:
        fac_lo, fac_hi = (state["fac_r"], state["fac_c"]) if geo.row_is_lo else (state["fac_c"], state["fac_r"])
        fac_lo, fac_hi = fac_lo.view(-1), fac_hi.view(-1)
        n_lo, n_hi = geo.n_lo, geo.n_hi
        sum_lo = torch.empty(n_lo, **f32)
        part_hi = torch.empty(geo.nhb * n_hi, **f32)
        _grad_stats[(geo.A * geo.B * geo.C * geo.nhb,)](
            g, sum_lo, part_hi, flag, geo.SH, geo.B, geo.SL, geo.C, n_hi, BH=geo.bh, BLL=geo.bll, CHECK=skip)
        lo = (fac_lo, sum_lo, 1, n_lo, 1.0 / geo.SL)
        hi = (fac_hi, part_hi, geo.nhb, n_hi, 1.0 / geo.SH)
        n_mean, ng_lo, ng_hi = geo.n_mean, n_lo // geo.len_lo, n_hi // geo.len_hi
        mean = torch.empty(3 * n_mean, **f32)
        norm_lo, normr_lo = torch.empty(3 * ng_lo, **f32), torch.empty(3 * ng_lo, **f32)
        norm_hi, normr_hi = torch.empty(3 * ng_hi, **f32), torch.empty(3 * ng_hi, **f32)
        t0, t1, t2 = _reduce_tile(n_mean, geo.mean_s), _reduce_tile(ng_lo, geo.len_lo), _reduce_tile(ng_hi, geo.len_hi)
        _stat_reduce[(max(t0[2], t1[2], t2[2]), 3)](
            *lo, *hi, mean, n_mean, geo.mean_s, geo.mean_q, norm_lo, normr_lo, ng_lo, geo.len_lo,
            norm_hi, normr_hi, ng_hi, geo.len_hi, ROW_IS_LO=geo.row_is_lo,
            BO0=t0[0], BS0=t0[1], BO1=t1[0], BS1=t1[1], BO2=t2[0], BS2=t2[1])
        f_lo, t_lo = torch.empty(3 * n_lo, **f32), torch.empty(spec.HIDDEN_SIZE * n_lo, **f32)
        f_hi, t_hi = torch.empty(3 * n_hi, **f32), torch.empty(spec.HIDDEN_SIZE * n_hi, **f32)
        block = 256
        w_row, w_col = layout.SEGMENT["w_row"].offset, layout.SEGMENT["w_col"].offset
        _factors[(-(-max(n_lo, n_hi) // block), 2)](
            *lo, f_lo, t_lo, *hi, f_hi, t_hi, mean, n_mean, geo.mean_s, geo.mean_q,
            norm_lo, normr_lo, ng_lo, geo.len_lo, norm_hi, normr_hi, ng_hi, geo.len_hi, net, flag,
            LO_IS_ROW=geo.row_is_lo, HI_IS_ROW=not geo.row_is_lo, W_LO=w_row if geo.row_is_lo else w_col,
            W_HI=w_col if geo.row_is_lo else w_row, SKIP=skip, BLOCK=block)
        fac = f_lo  # unused by factored kernels
        ints = (N, G, L, nlb, geo.C, geo.SL * geo.C, n_lo, geo.B * geo.SL * geo.C, geo.SH * geo.B * geo.SL * geo.C,
                n_hi)
    else:
        _flag_pass[(-(-N // TILE),)](g, flag, N, BLOCK=TILE)
        fac = state["fac_r"].view(-1)
        f_lo = f_hi = t_lo = t_hi = fac  # unused by vector kernels
        ints = (N, G, L, nlb, 1, 1, 1, 1, 1, 1)
    if not geo.fused:
        _accumulate[(geo.programs,)](g, p, m, v, fac, f_lo, f_hi, flag, part, *ints,
                                     FACTORED=geo.factored, SKIP=skip, BG=geo.bg, BL=geo.bl, num_warps=geo.warps)
        _launch_reduce(part, inv, G, nlb, L, flag, ok, nch, spec.INPUT_NORM_EPS, skip, True)
    return _Prepared(geo, (g, p, m, v, fac, f_lo, f_hi, t_lo, t_hi, inv, net, flag), ints, flag, ok, skip, part, nch)


def _fused_pass(prep: _Prepared, mode: int, out: torch.Tensor, lr: Scalar = 0.0, weight_decay: Scalar = 0.0) -> None:
    """Accumulate, input RMS and the direction pass in one launch (``geo.fused``): MODE ``WRITE`` or
    ``_APPLY_LOCAL``."""
    geo, args = prep.geo, prep.args
    p = args[1]
    lr_ptr, lr_val = _scalar(lr, "lr", p.device)
    wd_ptr, wd_val = _scalar(weight_decay, "weight_decay", p.device)
    ints = prep.ints[:3] + prep.ints[4:]  # without nlb (1)
    _fused[(geo.programs,)](
        *args[:9], prep.part, *args[9:], prep.ok, out, prep.flag if lr_ptr is None else lr_ptr, lr_val,
        prep.flag if wd_ptr is None else wd_ptr, wd_val, *ints,
        FACTORED=geo.factored, SKIP=prep.skip, MODE=mode, NCH=prep.nch, LR_T=lr_ptr is not None,
        WD_T=wd_ptr is not None, P_KIND=_param_kind(p.dtype), BG=geo.bg, BL=geo.bl, num_warps=geo.warps)


def _launch_reduce(part: torch.Tensor, out: torch.Tensor, G: int, nlb: int, L: int, flag: torch.Tensor,
                   ok: torch.Tensor, nch: int, eps: float, skip: bool, write_ok: bool) -> None:
    bgr, rb, programs = _reduce_tile(G, nlb)
    _reduce_groups[(programs,)](part, out, G, nlb, L, flag, ok, NCH=nch, EPS=_f32(eps), SKIP=skip,
                                WRITE_OK=write_ok, BGR=bgr, RB=rb)


def _direction_pass(prep: _Prepared, mode: int, out: torch.Tensor, sq: torch.Tensor, scale: torch.Tensor,
                    lr: Scalar = 0.0, weight_decay: Scalar = 0.0) -> None:
    geo = prep.geo
    p = prep.args[1]
    lr_ptr, lr_val = _scalar(lr, "lr", p.device)
    wd_ptr, wd_val = _scalar(weight_decay, "weight_decay", p.device)
    _direction[(geo.programs,)](
        *prep.args, out, sq, scale, prep.flag if lr_ptr is None else lr_ptr, lr_val,
        prep.flag if wd_ptr is None else wd_ptr, wd_val, *prep.ints,
        FACTORED=geo.factored, SKIP=prep.skip, MODE=mode, LR_T=lr_ptr is not None, WD_T=wd_ptr is not None,
        P_KIND=_param_kind(p.dtype), BG=geo.bg, BL=geo.bl, num_warps=geo.warps)


def direction(net: torch.Tensor, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor, *,
              skip_nonfinite: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold ``grad`` into ``state`` in place and return the raw direction.

    Args:
        net: the packed weights (:func:`pack_net`) on the parameter's device.
        state: :func:`celo2.rule.state.state_shapes` of ``param`` (float32, contiguous); updated in place.
        grad: the gradient, the parameter's shape, any float dtype (a non-contiguous one is copied).
        param: the parameter (read only): float32, bfloat16, float16 or float64.
        skip_nonfinite: if True (default) a gradient with a NaN or +-inf element leaves ``state``
            bitwise unchanged, the direction is zeros and ``ok`` is 0; if False NaN propagates.

    Returns:
        ``(d, ok)``: ``d`` the raw direction (float32, contiguous, work shape: the
        parameter's shape, ``(1,)`` for a 0-D one), before Newton-Schulz and
        before the output RMS normalisation; ``ok`` a 0-d float32 tensor on the
        device, 1.0 when the tensor stepped, else 0.0. 7 launches for a tensor of
        two or more dims, 5 for a vector; 5 and 3 when its groups fit one tile (see the
        module docstring); plus a copy for a non-contiguous operand.

    Raises:
        RuntimeError: Triton is missing, or a CPU tensor outside the interpreter.
        TypeError: an unsupported parameter dtype.
        ValueError: an empty parameter, or a gradient, state entry or ``net`` of the wrong shape,
            dtype, device or layout (named in the message).
        KeyError: a state entry is missing.
    """
    _check_operands(net, state, grad, param)
    with launch_device(param.device):
        geo = _geometry(work_shape(param.shape))
        prep = _prepare(net, state, _flat(grad), _flat(param), geo, skip_nonfinite)
        out = torch.empty(geo.shape, dtype=torch.float32, device=param.device)
        if geo.fused:
            _fused_pass(prep, WRITE, out)
        else:
            _direction_pass(prep, WRITE, out, prep.ok, prep.ok)
        return out, prep.ok


def _writable_flat(param: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """A contiguous flat view of ``param`` to update, and whether it is a copy to write back."""
    if param.is_contiguous():
        return param.detach().view(-1), False
    return param.detach().contiguous().view(-1), True


def apply_step(net: torch.Tensor, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
               lr: Scalar, weight_decay: Scalar, *, skip_nonfinite: bool = True) -> torch.Tensor:
    """Celo2-base's whole step on one tensor, never holding its direction.

    ``p <- p (1 - lr wd) - lr d / sqrt(mean(d^2 over the last two axes) + OUTPUT_NORM_EPS)``:
    the direction pass runs twice (sums of squares per group, then the update).

    Args:
        net: the packed weights (:func:`pack_net`) on the parameter's device.
        state: :func:`celo2.rule.state.state_shapes` of ``param`` (float32, contiguous); updated in place.
        grad: the gradient (parameter's shape, any float dtype).
        param: updated in place (float32, bfloat16, float16 or float64; a non-contiguous one
            is updated through a contiguous copy and copied back).
        lr: learning rate, a Python float or a 0-d float32 tensor on the device (never read on the host).
        weight_decay: decoupled weight decay, likewise.
        skip_nonfinite: as in :func:`direction` (a skipped step applies no weight decay either).

    Returns:
        ``ok`` as in :func:`direction`. 9 launches for a tensor of two or more dims, 7 for a vector;
        5 and 3 when its groups fit one tile.

    Raises:
        As :func:`direction`; ValueError also for an ``lr`` or ``weight_decay`` tensor that is not
        a single value on the parameter's device (:func:`check_scalar`), before anything is written.
    """
    _check_operands(net, state, grad, param)
    check_scalar(lr, "lr", param.device)
    check_scalar(weight_decay, "weight_decay", param.device)
    with launch_device(param.device):
        geo = _geometry(work_shape(param.shape))
        flat, copied = _writable_flat(param)
        prep = _prepare(net, state, _flat(grad), flat, geo, skip_nonfinite)
        if geo.fused:
            _fused_pass(prep, _APPLY_LOCAL, prep.ok, lr, weight_decay)
            if copied:
                param.detach().copy_(flat.view(param.shape))
            return prep.ok
        sq = torch.empty(geo.groups * geo.nlb, dtype=torch.float32, device=param.device)
        scale = torch.empty(geo.groups, dtype=torch.float32, device=param.device)
        _direction_pass(prep, SQUARES, sq, sq, sq)
        _launch_reduce(sq, scale, geo.groups, geo.nlb, geo.group_len, prep.flag, prep.ok, 1, spec.OUTPUT_NORM_EPS,
                       skip_nonfinite, False)
        _direction_pass(prep, APPLY, sq, sq, scale, lr, weight_decay)
        if copied:
            param.detach().copy_(flat.view(param.shape))
        return prep.ok


def apply_held(param: torch.Tensor, d: torch.Tensor, ok: torch.Tensor, lr: Scalar, weight_decay: Scalar) -> None:
    """The finish of a held direction (e.g. after Newton-Schulz), in 3 launches.

    ``p <- p (1 - lr wd) - lr d / sqrt(mean(d^2 over the last two axes) + OUTPUT_NORM_EPS)``
    where ``ok != 0``, else ``p`` is bitwise unchanged.

    Args:
        param: updated in place (float32 math for float32, bfloat16 and float16 parameters, rounded
            once; float64 math for float64 ones; a non-contiguous one goes through a copy).
        d: the direction, float32 or bfloat16, the work shape (the parameter's, ``(1,)`` for 0-D).
        ok: 0-d float32 tensor on the device (from :func:`direction`).
        lr: learning rate, a Python float or a 0-d tensor on the device.
        weight_decay: decoupled weight decay, likewise.

    Raises:
        RuntimeError, TypeError: as :func:`direction`.
        ValueError: ``d``, ``ok``, ``lr`` or ``weight_decay`` of the wrong shape, dtype or device.
    """
    _require_available(param)
    shape = work_shape(param.shape)
    if tuple(d.shape) != shape or d.dtype not in (torch.float32, torch.bfloat16) or d.device != param.device:
        raise ValueError(f"d must be float32 or bfloat16 of shape {shape} on {param.device}; got {d.dtype} "
                         f"{tuple(d.shape)} on {d.device}")
    if ok.numel() != 1 or ok.device != param.device:
        raise ValueError(f"ok must be a 0-d tensor on {param.device}; got shape {tuple(ok.shape)} on {ok.device}")
    lr_ptr, lr_val = _scalar(lr, "lr", param.device)
    wd_ptr, wd_val = _scalar(weight_decay, "weight_decay", param.device)
    with launch_device(param.device):
        geo = _geometry(shape)
        flat, copied = _writable_flat(param)
        dflat = _flat(d)
        sq = torch.empty(geo.groups * geo.nlb, dtype=torch.float32, device=param.device)
        scale = torch.empty(geo.groups, dtype=torch.float32, device=param.device)
        okv = ok.detach().reshape(())
        common = dict(BG=geo.bg, BL=geo.bl, num_warps=geo.warps)
        _held[(geo.programs,)](dflat, flat, sq, scale, okv, okv, 0.0, okv, 0.0, geo.groups, geo.group_len, geo.nlb,
                               MODE=SQUARES, LR_T=False, WD_T=False, P_KIND=0, **common)
        _launch_reduce(sq, scale, geo.groups, geo.nlb, geo.group_len, okv, okv, 1, spec.OUTPUT_NORM_EPS, False, False)
        _held[(geo.programs,)](dflat, flat, sq, scale, okv, okv if lr_ptr is None else lr_ptr, lr_val,
                               okv if wd_ptr is None else wd_ptr, wd_val, geo.groups, geo.group_len, geo.nlb,
                               MODE=APPLY, LR_T=lr_ptr is not None, WD_T=wd_ptr is not None,
                               P_KIND=_param_kind(param.dtype), **common)
        if copied:
            param.detach().copy_(flat.view(param.shape))
