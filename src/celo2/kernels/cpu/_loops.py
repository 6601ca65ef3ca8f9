"""The loops of the CPU kernels: each a pass over a tensor, compiled by Numba and vectorised by LLVM.

Each loop reads or writes a tensor once: every element's channels, both
hidden layers and the direction are computed in registers, and the loop over
a row is vectorised (the MLP then runs at the CPU's FMA peak). The loops that
split a tensor take ``(lo, hi, ...)``, the row blocks they cover, and keep
their partial sums per block (:func:`celo2.kernels.cpu.blocks`), so results
do not depend on how blocks are spread over threads. Which loops a tensor
takes, in which order, is :mod:`celo2.kernels.cpu._passes`.

Every constant comes from :mod:`celo2.rule.spec` and is frozen into the code
by Numba; the channel order of the 18 per-element channels (``x0`` ...
``x17`` below) and the packed weights are :mod:`celo2.rule.layout`'s. The MLP
is written out unit by unit, once in :func:`direction` and once in
:func:`grouped`: called as a function, or over arrays of hidden units, it
left LLVM's vectoriser with stores it would not vectorise. Both copies are
pinned to the layout's description by ``tests/kernels/test_cpu_mlp.py``.
"""

from __future__ import annotations

import numpy as np

from celo2.kernels.cpu._compiler import AVAILABLE, kernel
from celo2.rule import layout, spec

if AVAILABLE:
    import numba
    from numba.core import types
    from numba.extending import intrinsic

    from celo2.kernels.cpu._storage import encode, float_row, load, rounds, store_unrounded

_F = np.float32
_GRAD_CLIP = _F(spec.GRAD_CLIP)
_FEATURE_CLIP = _F(spec.FEATURE_CLIP)
_FEATURE_CLIP_SQ = _F(spec.FEATURE_CLIP**2)
_RSQRT_EPS = _F(spec.RSQRT_EPS)
_RMS_DECAY = _F(spec.RMS_DECAY)
_RMS_W = _F(1.0 - spec.RMS_DECAY)
_FACTORED_EPS = _F(spec.FACTORED_EPS)
_VECTOR_FACTOR_EPS = _F(spec.VECTOR_FACTOR_EPS)
_SAFE_RSQRT_FLOOR = _F(spec.SAFE_RSQRT_FLOOR)
_INPUT_NORM_EPS = _F(spec.INPUT_NORM_EPS)
_ROW_MEAN_EPS = _F(spec.ROW_MEAN_EPS)
_OUTPUT_NORM_EPS = _F(spec.OUTPUT_NORM_EPS)
_ZERO = _F(0.0)
_ONE = _F(1.0)

WRITE, SQUARES, APPLY, OVER_GRAD = (int(m) for m in (layout.DirectionMode.WRITE, layout.DirectionMode.SQUARES,
                                                    layout.DirectionMode.APPLY, layout.DirectionMode.OVER_GRAD))
"""Modes of the direction loops (:class:`celo2.rule.layout.DirectionMode`):
write it out, only sum its squares, apply it, or write it over the gradient
(each row once that row is read: the JAX front end's custom calls return the
direction in the gradient's buffer)."""

MOMENTUM_W = (1.0 - np.asarray(spec.MOMENTUM_DECAYS, np.float32)).astype(np.float32)
FACTORED_W = (1.0 - np.asarray(spec.FACTORED_DECAYS, np.float32)).astype(np.float32)
"""``1 - decay`` of the momenta and of the factored statistics, as the loops take them."""


if AVAILABLE:
    @intrinsic
    def fma(typingctx, a, b, c):  # noqa: ANN001, ANN202
        """``a b + c`` (float32) rounded once, an instruction no fast-math
        rewrite changes (it carries no fast-math flags)."""
        sig = types.float32(types.float32, types.float32, types.float32)

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return builder.fma(*args)

        return sig, codegen

    @numba.njit(inline="always")
    def fold_momentum(old, w, g):  # noqa: ANN001, ANN201
        """A momentum's new value, ``old + w (g - old)``, with one rounding
        order wherever it is computed: :func:`direction` computes again, bit
        for bit, what :func:`accumulate` computed."""
        return fma(w, g - old, old)

    @numba.njit(inline="always")
    def fold_second_moment(old, g2):  # noqa: ANN001, ANN201
        """``v``'s new value, ``RMS_DECAY old + (1 - RMS_DECAY) g^2``, with one
        rounding order (as :func:`fold_momentum`)."""
        return fma(_RMS_DECAY, old, _RMS_W * g2)

    @numba.njit(cache=True)
    def normalised_first_layer(w_el, sums, n):  # noqa: ANN001
        """The per-element channels' first-layer rows ``w_el`` (18, 8) scaled
        by each channel's input RMS (``sums``: sums of squares over the ``n``
        elements, in float64), cast to float32; channels beyond ``len(sums)``
        (the three a vector lacks) get zero rows."""
        W = np.zeros((18, 8), np.float32)
        for c in range(sums.shape[0]):
            inv = 1.0 / np.sqrt(sums[c] / n + spec.INPUT_NORM_EPS)
            for h in range(8):
                W[c, h] = np.float32(np.float64(w_el[c, h]) * inv)
        return W

    @kernel
    def nonfinite_blocks(lo, hi, bits, per, out):  # noqa: ANN001
        """Blocks ``lo:hi`` (``per`` elements each) of a float32 array seen as
        ``uint32`` ``bits``: ``out[blk]`` is 1 when one of its elements is NaN or
        +-inf (exponent bits all set), else 0. Integer arithmetic, so fast-math
        cannot assume the check away; a running maximum of the exponent bits
        vectorises (a count did not)."""
        n = bits.shape[0]
        mask = np.uint32(0x7F800000)
        for blk in range(lo, hi):
            e = np.uint32(0)
            for j in range(blk * per, min(n, (blk + 1) * per)):
                e = max(e, bits[j] & mask)
            out[blk] = 1 if e == mask else 0

    @kernel
    def grad_stats(lo, hi, graw, j0, j1, per, row_sum, col_part):  # noqa: ANN001
        """Pass 1 on blocks ``lo:hi``, columns ``j0:j1``: adds the rows' sums of
        ``clip(g)^2`` over those columns to ``row_sum`` and writes each
        block's column sums into ``col_part[blk, :j1 - j0]``."""
        R = graw.shape[0]
        C = j1 - j0
        for blk in range(lo, hi):
            cp = col_part[blk]
            cp[:] = _ZERO
            for i in range(blk * per, min(R, (blk + 1) * per)):
                rs = _ZERO
                gr = graw[i, j0:j1]
                for j in range(C):
                    g = min(max(gr[j], -_GRAD_CLIP), _GRAD_CLIP)
                    g2 = g * g
                    rs += g2
                    cp[j] += g2
                row_sum[i] += rs

    @kernel
    def fold_statistic(stat, total, j0, j1, n, wf, parts):  # noqa: ANN001
        """Fold the sums of ``clip(g)^2`` ``total`` (>= j1 - j0,), over the
        ``n`` entries each value of a factored statistic averages, into
        entries ``j0:j1`` of ``stat`` (3, L) in place, and add, per row ``k``,
        the sums of the folded values, of their squares and of their
        ``1 / (. + eps)`` to ``parts`` (3, 3) float64 (:func:`statistic_moments`
        makes them the moments :func:`factor_terms` reads)."""
        inv_n = _ONE / _F(n)
        for k in range(3):
            s = stat[k, j0:j1]
            acc = 0.0
            sq = 0.0
            sq_r = 0.0
            for i in range(j1 - j0):
                x = s[i] + wf[k] * ((total[i] * inv_n + _FACTORED_EPS) - s[i])
                s[i] = x
                acc += x
                sq += x * x
                sq_r += _ONE / (x + _RSQRT_EPS)
            parts[k, 0] += acc
            parts[k, 1] += sq
            parts[k, 2] += sq_r

    @kernel
    def statistic_moments(parts, L, moments):  # noqa: ANN001
        """A folded statistic's moments (3, 3) float32 from the sums ``parts``
        of :func:`fold_statistic` over its ``L`` entries, per row ``k``: its
        mean, the inverse RMS of the statistic and of its ``rsqrt(. + eps)``."""
        for k in range(3):
            moments[k, 0] = _F(parts[k, 0] / L)
            moments[k, 1] = _F(1.0 / np.sqrt(parts[k, 1] / L + _INPUT_NORM_EPS))
            moments[k, 2] = _F(1.0 / np.sqrt(parts[k, 2] / L + _INPUT_NORM_EPS))

    @kernel
    def factor_terms(stat, j0, j1, moments, w, b0, is_row, factor, term):  # noqa: ANN001
        """What the passes read from entries ``j0:j1`` of a folded factored
        statistic ``stat`` (3, L) with its ``moments`` (:func:`fold_statistic`):
        the Adafactor factors into ``factor[:, :j1 - j0]`` (the row statistic
        over its mean when ``is_row``, else the statistic, through
        ``safe_rsqrt``) and the share of the first layer of its 6 rank-1
        channels (each statistic and its ``rsqrt(. + eps)`` at unit RMS, rows
        ``w`` (6, 8)) into ``term[:, :j1 - j0]`` (8, .), with ``b0`` added when
        ``is_row``. A range of entries at a time, so a long statistic needs no
        full-length scratch."""
        width = j1 - j0
        term[:, :width] = _ZERO
        for k in range(3):
            s = stat[k, j0:j1]
            mean = moments[k, 0]
            norm = moments[k, 1]
            norm_r = moments[k, 2]
            f = factor[k]
            for i in range(width):
                x = s[i]
                # rf: safe_rsqrt of the statistic over its mean; cf: of the statistic.
                y = x / (mean + _ROW_MEAN_EPS) if is_row else x
                f[i] = _ONE / np.sqrt(max(y, _SAFE_RSQRT_FLOOR))
                a = x * norm
                r = norm_r / np.sqrt(x + _RSQRT_EPS)
                for h in range(8):
                    term[h, i] += w[k, h] * a + w[3 + k, h] * r
        if is_row:
            for h in range(8):
                term[h, :width] += b0[h]

    @kernel
    def vector_factors(fac, j0, j1, factor):  # noqa: ANN001
        """A vector's Adafactor-style factors ``rsqrt(fac + eps)`` of entries
        ``j0:j1`` of its full second moments ``fac`` (3, n) into
        ``factor[:, :j1 - j0]``, as :func:`vector_accumulate` takes them."""
        for k in range(3):
            a = fac[k, j0:j1]
            f = factor[k]
            for j in range(j1 - j0):
                f[j] = _ONE / np.sqrt(max(a[j] + _VECTOR_FACTOR_EPS, _SAFE_RSQRT_FLOOR))

    @kernel
    def accumulate(lo, hi, graw, p, m, v, wm, A2, B2, j0, j1, per, sums_part):  # noqa: ANN001
        """Pass 2 on blocks ``lo:hi``, columns ``j0:j1``: fold ``g`` into ``m``
        (3, R, C) and ``v`` (R, C) and take the sums of squares of all 18
        per-element channels over those columns, in fast-path order; ``A2``
        (3, R) / ``B2`` (3, >= j1 - j0) are the squared Adafactor factors (``B2``
        of those columns). Float32 ``m`` and ``v`` are updated in place;
        bfloat16 ones are left as they are, for :func:`direction` to fold
        and store rounded (it needs the float32 values, and they are
        computed again there bit for bit)."""
        R = graw.shape[0]
        C = j1 - j0
        Q0 = B2[0]; Q1 = B2[1]; Q2 = B2[2]  # noqa: E702
        for blk in range(lo, hi):
            s = np.zeros(18, np.float64)
            for i in range(blk * per, min(R, (blk + 1) * per)):
                s0 = _ZERO; s1 = _ZERO; s2 = _ZERO; s3 = _ZERO; s4 = _ZERO; s5 = _ZERO  # noqa: E702
                s6 = _ZERO; s7 = _ZERO; s8 = _ZERO; s9 = _ZERO; s10 = _ZERO; s11 = _ZERO  # noqa: E702
                t0 = _ZERO; t1 = _ZERO; t2 = _ZERO; u0 = _ZERO; u1 = _ZERO; u2 = _ZERO  # noqa: E702
                gr = graw[i, j0:j1]; vr = v[i, j0:j1]; pr = p[i, j0:j1]  # noqa: E702
                m0r = m[0, i, j0:j1]; m1r = m[1, i, j0:j1]; m2r = m[2, i, j0:j1]  # noqa: E702
                for j in range(C):
                    g = min(max(gr[j], -_GRAD_CLIP), _GRAD_CLIP)
                    m0 = fold_momentum(load(m0r[j]), wm[0], g)
                    m1 = fold_momentum(load(m1r[j]), wm[1], g)
                    m2 = fold_momentum(load(m2r[j]), wm[2], g)
                    store_unrounded(m0r, j, m0)
                    store_unrounded(m1r, j, m1)
                    store_unrounded(m2r, j, m2)
                    g2 = g * g
                    vv = fold_second_moment(load(vr[j]), g2)
                    store_unrounded(vr, j, vv)
                    r = _ONE / (vv + _RSQRT_EPS)
                    pp = pr[j]
                    q0 = m0 * m0; q1 = m1 * m1; q2 = m2 * m2  # noqa: E702
                    s0 += g2
                    s1 += min(g2, _FEATURE_CLIP_SQ)
                    s2 += pp * pp
                    s3 += q0
                    s4 += q1
                    s5 += q2
                    s6 += vv * vv
                    s7 += q0 * r
                    s8 += q1 * r
                    s9 += q2 * r
                    s10 += r
                    s11 += g2 * r
                    t0 += g2 * Q0[j]; t1 += g2 * Q1[j]; t2 += g2 * Q2[j]  # noqa: E702
                    u0 += q0 * Q0[j]; u1 += q1 * Q1[j]; u2 += q2 * Q2[j]  # noqa: E702
                s[0] += s0; s[1] += s1; s[2] += s2; s[3] += s3; s[4] += s4; s[5] += s5  # noqa: E702
                s[6] += s6; s[7] += s7; s[8] += s8; s[9] += s9; s[10] += s10; s[14] += s11  # noqa: E702
                s[11] += t0 * A2[0, i]; s[12] += t1 * A2[1, i]; s[13] += t2 * A2[2, i]  # noqa: E702
                s[15] += u0 * A2[0, i]; s[16] += u1 * A2[1, i]; s[17] += u2 * A2[2, i]  # noqa: E702
            sums_part[blk] = s

    @kernel
    def direction(lo, hi, graw, p, m, v, wm, A, B, TR, TC, W, W1, b1, w2, b2, mode, decay, step, j0, j1, per,  # noqa: ANN001
                  out, sq_part, keys, store):
        """Pass 3 on blocks ``lo:hi``, columns ``j0:j1``. ``W`` (18, 8): first
        layer with the input RMS folded in, rows in fast-path channel order;
        ``A`` (3, R) / ``B`` (3, >= j1 - j0): Adafactor factors along rows /
        of those columns; ``TR`` (8, R) (with ``b0``) / ``TC`` (8, >= j1 - j0):
        the rank-1 channels' share of the first layer.
        ``W1`` (8, 8) is ``(in, out)``. Mode WRITE: ``out = d``; APPLY: ``p =
        decay p + step d``; OVER_GRAD: ``graw = d`` (``out`` unused). Every
        mode leaves the per-block sums of ``d^2`` in ``sq_part``.

        Float32 ``m`` and ``v`` hold this step's values already
        (:func:`accumulate`). Bfloat16 ones (``uint16`` patterns) still hold
        the last step's: a row's are folded with ``g`` again into float32
        row buffers first (``wm`` as :func:`accumulate`, the same values bit
        for bit), which the MLP loop then reads as it reads float32 rows (so
        that LLVM compiles that loop, and its fast-math rewrites, the same
        way for both), and with ``store`` set (the last direction pass of
        the step) they are stored rounded with ``keys`` (``m``'s and ``v``'s
        first) at their flat indices in the whole accumulators.

        The MLP is written out unit by unit so that it stays in registers, and
        each row's directions go to a row buffer before the mode's store: a
        helper function or a store under a branch in the hot loop stopped
        LLVM's vectoriser."""
        R = graw.shape[0]
        C = j1 - j0
        row = np.empty(C, np.float32)
        width = graw.shape[1]
        plane = graw.shape[0] * width  # elements of one momentum
        fresh = np.empty((4, C if rounds(m) else 0), np.float32)  # a row's new m0, m1, m2, v, to round
        N0 = fresh[0]; N1 = fresh[1]; N2 = fresh[2]; NV = fresh[3]  # noqa: E702
        # 1-D rows: indexing them lets LLVM see unit strides (2-D and 3-D
        # indexing left it gathering element by element).
        B0 = B[0]; B1 = B[1]; B2 = B[2]  # noqa: E702
        C0 = TC[0]; C1 = TC[1]; C2 = TC[2]; C3 = TC[3]; C4 = TC[4]; C5 = TC[5]; C6 = TC[6]; C7 = TC[7]  # noqa: E702
        for blk in range(lo, hi):
            sq = 0.0
            for i in range(blk * per, min(R, (blk + 1) * per)):
                a0 = A[0, i]; a1 = A[1, i]; a2 = A[2, i]  # noqa: E702
                t0 = TR[0, i]; t1 = TR[1, i]; t2 = TR[2, i]; t3 = TR[3, i]  # noqa: E702
                t4 = TR[4, i]; t5 = TR[5, i]; t6 = TR[6, i]; t7 = TR[7, i]  # noqa: E702
                gr = graw[i, j0:j1]; vr = v[i, j0:j1]; pr = p[i, j0:j1]  # noqa: E702
                m0r = m[0, i, j0:j1]; m1r = m[1, i, j0:j1]; m2r = m[2, i, j0:j1]  # noqa: E702
                if rounds(m):  # a compile-time constant: the last step's values, folded as accumulate does
                    for j in range(C):
                        g = min(max(gr[j], -_GRAD_CLIP), _GRAD_CLIP)
                        N0[j] = fold_momentum(load(m0r[j]), wm[0], g)
                        N1[j] = fold_momentum(load(m1r[j]), wm[1], g)
                        N2[j] = fold_momentum(load(m2r[j]), wm[2], g)
                        NV[j] = fold_second_moment(load(vr[j]), g * g)
                vs = float_row(vr, NV); m0s = float_row(m0r, N0)  # noqa: E702
                m1s = float_row(m1r, N1); m2s = float_row(m2r, N2)  # noqa: E702
                row_sq = _ZERO
                for j in range(C):
                    g = min(max(gr[j], -_GRAD_CLIP), _GRAD_CLIP)
                    vv = vs[j]
                    rv = _ONE / np.sqrt(vv + _RSQRT_EPS)
                    m0 = m0s[j]; m1 = m1s[j]; m2 = m2s[j]  # noqa: E702
                    f0 = a0 * B0[j]; f1 = a1 * B1[j]; f2 = a2 * B2[j]  # noqa: E702
                    pp = pr[j]
                    x1 = min(max(g, -_FEATURE_CLIP), _FEATURE_CLIP)
                    x7 = m0 * rv; x8 = m1 * rv; x9 = m2 * rv  # noqa: E702
                    x11 = g * f0; x12 = g * f1; x13 = g * f2  # noqa: E702
                    x14 = g * rv
                    x15 = m0 * f0; x16 = m1 * f1; x17 = m2 * f2  # noqa: E702
                    h0 = max(t0 + C0[j] + W[0, 0] * g + W[1, 0] * x1 + W[2, 0] * pp + W[3, 0] * m0 + W[4, 0] * m1
                             + W[5, 0] * m2 + W[6, 0] * vv + W[7, 0] * x7 + W[8, 0] * x8 + W[9, 0] * x9 + W[10, 0] * rv
                             + W[11, 0] * x11 + W[12, 0] * x12 + W[13, 0] * x13 + W[14, 0] * x14 + W[15, 0] * x15
                             + W[16, 0] * x16 + W[17, 0] * x17, _ZERO)
                    h1 = max(t1 + C1[j] + W[0, 1] * g + W[1, 1] * x1 + W[2, 1] * pp + W[3, 1] * m0 + W[4, 1] * m1
                             + W[5, 1] * m2 + W[6, 1] * vv + W[7, 1] * x7 + W[8, 1] * x8 + W[9, 1] * x9 + W[10, 1] * rv
                             + W[11, 1] * x11 + W[12, 1] * x12 + W[13, 1] * x13 + W[14, 1] * x14 + W[15, 1] * x15
                             + W[16, 1] * x16 + W[17, 1] * x17, _ZERO)
                    h2 = max(t2 + C2[j] + W[0, 2] * g + W[1, 2] * x1 + W[2, 2] * pp + W[3, 2] * m0 + W[4, 2] * m1
                             + W[5, 2] * m2 + W[6, 2] * vv + W[7, 2] * x7 + W[8, 2] * x8 + W[9, 2] * x9 + W[10, 2] * rv
                             + W[11, 2] * x11 + W[12, 2] * x12 + W[13, 2] * x13 + W[14, 2] * x14 + W[15, 2] * x15
                             + W[16, 2] * x16 + W[17, 2] * x17, _ZERO)
                    h3 = max(t3 + C3[j] + W[0, 3] * g + W[1, 3] * x1 + W[2, 3] * pp + W[3, 3] * m0 + W[4, 3] * m1
                             + W[5, 3] * m2 + W[6, 3] * vv + W[7, 3] * x7 + W[8, 3] * x8 + W[9, 3] * x9 + W[10, 3] * rv
                             + W[11, 3] * x11 + W[12, 3] * x12 + W[13, 3] * x13 + W[14, 3] * x14 + W[15, 3] * x15
                             + W[16, 3] * x16 + W[17, 3] * x17, _ZERO)
                    h4 = max(t4 + C4[j] + W[0, 4] * g + W[1, 4] * x1 + W[2, 4] * pp + W[3, 4] * m0 + W[4, 4] * m1
                             + W[5, 4] * m2 + W[6, 4] * vv + W[7, 4] * x7 + W[8, 4] * x8 + W[9, 4] * x9 + W[10, 4] * rv
                             + W[11, 4] * x11 + W[12, 4] * x12 + W[13, 4] * x13 + W[14, 4] * x14 + W[15, 4] * x15
                             + W[16, 4] * x16 + W[17, 4] * x17, _ZERO)
                    h5 = max(t5 + C5[j] + W[0, 5] * g + W[1, 5] * x1 + W[2, 5] * pp + W[3, 5] * m0 + W[4, 5] * m1
                             + W[5, 5] * m2 + W[6, 5] * vv + W[7, 5] * x7 + W[8, 5] * x8 + W[9, 5] * x9 + W[10, 5] * rv
                             + W[11, 5] * x11 + W[12, 5] * x12 + W[13, 5] * x13 + W[14, 5] * x14 + W[15, 5] * x15
                             + W[16, 5] * x16 + W[17, 5] * x17, _ZERO)
                    h6 = max(t6 + C6[j] + W[0, 6] * g + W[1, 6] * x1 + W[2, 6] * pp + W[3, 6] * m0 + W[4, 6] * m1
                             + W[5, 6] * m2 + W[6, 6] * vv + W[7, 6] * x7 + W[8, 6] * x8 + W[9, 6] * x9 + W[10, 6] * rv
                             + W[11, 6] * x11 + W[12, 6] * x12 + W[13, 6] * x13 + W[14, 6] * x14 + W[15, 6] * x15
                             + W[16, 6] * x16 + W[17, 6] * x17, _ZERO)
                    h7 = max(t7 + C7[j] + W[0, 7] * g + W[1, 7] * x1 + W[2, 7] * pp + W[3, 7] * m0 + W[4, 7] * m1
                             + W[5, 7] * m2 + W[6, 7] * vv + W[7, 7] * x7 + W[8, 7] * x8 + W[9, 7] * x9 + W[10, 7] * rv
                             + W[11, 7] * x11 + W[12, 7] * x12 + W[13, 7] * x13 + W[14, 7] * x14 + W[15, 7] * x15
                             + W[16, 7] * x16 + W[17, 7] * x17, _ZERO)
                    u0 = max(b1[0] + W1[0, 0] * h0 + W1[1, 0] * h1 + W1[2, 0] * h2 + W1[3, 0] * h3
                             + W1[4, 0] * h4 + W1[5, 0] * h5 + W1[6, 0] * h6 + W1[7, 0] * h7, _ZERO)
                    u1 = max(b1[1] + W1[0, 1] * h0 + W1[1, 1] * h1 + W1[2, 1] * h2 + W1[3, 1] * h3
                             + W1[4, 1] * h4 + W1[5, 1] * h5 + W1[6, 1] * h6 + W1[7, 1] * h7, _ZERO)
                    u2 = max(b1[2] + W1[0, 2] * h0 + W1[1, 2] * h1 + W1[2, 2] * h2 + W1[3, 2] * h3
                             + W1[4, 2] * h4 + W1[5, 2] * h5 + W1[6, 2] * h6 + W1[7, 2] * h7, _ZERO)
                    u3 = max(b1[3] + W1[0, 3] * h0 + W1[1, 3] * h1 + W1[2, 3] * h2 + W1[3, 3] * h3
                             + W1[4, 3] * h4 + W1[5, 3] * h5 + W1[6, 3] * h6 + W1[7, 3] * h7, _ZERO)
                    u4 = max(b1[4] + W1[0, 4] * h0 + W1[1, 4] * h1 + W1[2, 4] * h2 + W1[3, 4] * h3
                             + W1[4, 4] * h4 + W1[5, 4] * h5 + W1[6, 4] * h6 + W1[7, 4] * h7, _ZERO)
                    u5 = max(b1[5] + W1[0, 5] * h0 + W1[1, 5] * h1 + W1[2, 5] * h2 + W1[3, 5] * h3
                             + W1[4, 5] * h4 + W1[5, 5] * h5 + W1[6, 5] * h6 + W1[7, 5] * h7, _ZERO)
                    u6 = max(b1[6] + W1[0, 6] * h0 + W1[1, 6] * h1 + W1[2, 6] * h2 + W1[3, 6] * h3
                             + W1[4, 6] * h4 + W1[5, 6] * h5 + W1[6, 6] * h6 + W1[7, 6] * h7, _ZERO)
                    u7 = max(b1[7] + W1[0, 7] * h0 + W1[1, 7] * h1 + W1[2, 7] * h2 + W1[3, 7] * h3
                             + W1[4, 7] * h4 + W1[5, 7] * h5 + W1[6, 7] * h6 + W1[7, 7] * h7, _ZERO)
                    d = (b2 + w2[0] * u0 + w2[1] * u1 + w2[2] * u2 + w2[3] * u3
                         + w2[4] * u4 + w2[5] * u5 + w2[6] * u6 + w2[7] * u7)
                    row[j] = d
                    row_sq += d * d
                sq += row_sq
                if mode == WRITE:
                    o = out[i, j0:j1]
                    for j in range(C):
                        o[j] = row[j]
                elif mode == APPLY:
                    for j in range(C):
                        pr[j] = decay * pr[j] + step * row[j]
                elif mode == OVER_GRAD:
                    for j in range(C):
                        gr[j] = row[j]
                if store and rounds(m):
                    at = i * width + j0  # flat index of (i, j0) in v and in m's first momentum
                    for j in range(C):  # v and m's first momentum share mix32(index)
                        m0r[j] = encode(m0r, N0[j], keys[0], at + j)
                        m1r[j] = encode(m1r, N1[j], keys[0], plane + at + j)
                        m2r[j] = encode(m2r, N2[j], keys[0], 2 * plane + at + j)
                        vr[j] = encode(vr, NV[j], keys[1], at + j)
            sq_part[blk] = sq

    @kernel
    def vector_accumulate(graw, p, m, v, fac, wm, wf, sums):  # noqa: ANN001
        """A vector's accumulators (``m``, ``v`` and the full second moments
        ``fac``, each ``(3, n)`` or ``(n,)``) in place and the sums of squares
        of its 15 channels into ``sums``. Its direction is then
        :func:`direction` on the ``(1, n)`` matrix with its factors
        (:func:`vector_factors`) as the column factors, unit row factors and
        zero weights for the three channels vectors lack."""
        s = np.zeros(15, np.float64)
        for j in range(graw.shape[0]):
            g = min(max(graw[j], -_GRAD_CLIP), _GRAD_CLIP)
            g2 = g * g
            m0 = m[0, j] + wm[0] * (g - m[0, j])
            m1 = m[1, j] + wm[1] * (g - m[1, j])
            m2 = m[2, j] + wm[2] * (g - m[2, j])
            m[0, j] = m0
            m[1, j] = m1
            m[2, j] = m2
            vv = _RMS_DECAY * v[j] + _RMS_W * g2
            v[j] = vv
            gsq = g2 + _FACTORED_EPS
            a0 = fac[0, j] + wf[0] * (gsq - fac[0, j])
            a1 = fac[1, j] + wf[1] * (gsq - fac[1, j])
            a2 = fac[2, j] + wf[2] * (gsq - fac[2, j])
            fac[0, j] = a0
            fac[1, j] = a1
            fac[2, j] = a2
            r = _ONE / (vv + _RSQRT_EPS)
            pp = p[j]
            s[0] += g2
            s[1] += min(g2, _FEATURE_CLIP_SQ)
            s[2] += pp * pp
            s[3] += m0 * m0
            s[4] += m1 * m1
            s[5] += m2 * m2
            s[6] += vv * vv
            s[7] += m0 * m0 * r
            s[8] += m1 * m1 * r
            s[9] += m2 * m2 * r
            s[10] += r
            f0 = _ONE / np.sqrt(max(a0 + _VECTOR_FACTOR_EPS, _SAFE_RSQRT_FLOOR))
            f1 = _ONE / np.sqrt(max(a1 + _VECTOR_FACTOR_EPS, _SAFE_RSQRT_FLOOR))
            f2 = _ONE / np.sqrt(max(a2 + _VECTOR_FACTOR_EPS, _SAFE_RSQRT_FLOOR))
            s[11] += g2 * f0 * f0
            s[12] += g2 * f1 * f1
            s[13] += g2 * f2 * f2
            s[14] += g2 * r
        sums[:] = s

    @kernel
    def group_grad_stats(lo, hi, graw, per, row_sum, col_part):  # noqa: ANN001
        """For an (O, I, G) tensor (a conv kernel with its window flattened):
        ``row_sum`` (O, G) = sums of ``clip(g)^2`` over I, and per-block
        partials (blocks of O) of the sums over O in ``col_part``."""
        O, I, G = graw.shape
        for blk in range(lo, hi):
            cp = col_part[blk]
            cp[:, :] = _ZERO
            for o in range(blk * per, min(O, (blk + 1) * per)):
                rs = row_sum[o]
                rs[:] = _ZERO
                for i in range(I):
                    gr = graw[o, i]
                    ci = cp[i]
                    for e in range(G):
                        g = min(max(gr[e], -_GRAD_CLIP), _GRAD_CLIP)
                        g2 = g * g
                        rs[e] += g2
                        ci[e] += g2

    @kernel
    def group_factors(fac_r, fac_c, sum_r, sum_c, n_r, n_c, wf, w_row, w_col, b0, rf, cf, term_r, term_c):  # noqa: ANN001
        """:func:`factors` for a tensor normalised per window of ``G`` elements
        (a conv kernel seen as (O, I, G)): the statistics ``fac_r`` / ``fac_c``
        are (3, L, G) and their sums of ``clip(g)^2`` ``sum_r`` / ``sum_c`` (L,
        G). The row factor divides the row statistic by its mean over ``L`` at
        each window position; the rank-1 channels are normalised to unit RMS
        over each window's ``G`` elements. Writes ``rf`` / ``cf`` (3, L, G)
        and ``term_r`` (8, L, G, with ``b0``) / ``term_c`` (8, L, G)."""
        for stat, total, n, w, factor, term, is_row in ((fac_r, sum_r, n_r, w_row, rf, term_r, True),
                                                        (fac_c, sum_c, n_c, w_col, cf, term_c, False)):
            L = stat.shape[1]
            G = stat.shape[2]
            inv_n = _ONE / _F(n)
            term[:, :, :] = _ZERO
            for k in range(3):
                s = stat[k]
                acc = np.zeros(G, np.float64)
                for i in range(L):
                    for e in range(G):
                        x = s[i, e] + wf[k] * ((total[i, e] * inv_n + _FACTORED_EPS) - s[i, e])
                        s[i, e] = x
                        acc[e] += x
                f = factor[k]
                for i in range(L):
                    sq = 0.0
                    sq_r = 0.0
                    for e in range(G):
                        x = s[i, e]
                        sq += x * x
                        sq_r += _ONE / (x + _RSQRT_EPS)
                    norm = _F(1.0 / np.sqrt(sq / G + _INPUT_NORM_EPS))
                    norm_r = _F(1.0 / np.sqrt(sq_r / G + _INPUT_NORM_EPS))
                    for e in range(G):
                        x = s[i, e]
                        # rf: safe_rsqrt of the statistic over its mean; cf: of the statistic.
                        y = x / (_F(acc[e] / L) + _ROW_MEAN_EPS) if is_row else x
                        f[i, e] = _ONE / np.sqrt(max(y, _SAFE_RSQRT_FLOOR))
                        a = x * norm
                        r = norm_r / np.sqrt(x + _RSQRT_EPS)
                        for h in range(8):
                            term[h, i, e] += w[k, h] * a + w[3 + k, h] * r
            if is_row:
                for h in range(8):
                    term[h] += b0[h]

    @kernel
    def grouped(lo, hi, graw, p, m, v, wm, RF, CF, TR, TC, W, W1, b1, w2, b2, mode, decay, step, per, out,  # noqa: ANN001
                keys):
        """The rule on an (O, I, G) tensor whose normalisation groups are its
        (o, i) windows of G elements (a conv kernel, factored over O and I).
        Per row ``o``: fold ``g`` into ``m`` / ``v`` and build the 18 channels
        of all its windows, normalise each window's channels to unit RMS, run
        the MLP over the row, then per window either write the raw
        direction (mode WRITE, or OVER_GRAD into ``graw``; the caller finishes
        it) or apply it with the window's output RMS (mode APPLY). ``RF`` (3,
        O, G) / ``CF`` (3, I, G) are the Adafactor factors, ``TR`` (8, O, G, with ``b0``) / ``TC``
        (8, I, G) the rank-1 channels' share of the first layer, ``W`` (18, 8)
        the first layer in fast-path channel order. Bfloat16 ``m`` / ``v``
        (``uint16`` patterns) are stored rounded with ``keys`` (``m``'s and
        ``v``'s first) at their flat indices; the row's channels take the
        float32 values."""
        O, I, G = graw.shape
        n = I * G
        plane = O * n  # elements of one momentum
        # Each row o as one run of n = I G elements (all arrays are C-contiguous):
        # the channel loop then has unit strides and vectorises.
        g_rows = graw.reshape(O, n)
        p_rows = p.reshape(O, n)
        m_rows = m.reshape(3, O, n)
        v_rows = v.reshape(O, n)
        CF_flat = CF.reshape(3, n)  # CF[k, i, e] sits at j = i G + e
        TC_flat = TC.reshape(8, n)
        X = np.empty((18, n), np.float32)
        T = np.empty((8, n), np.float32)
        D = np.empty(n, np.float32)
        FR = np.empty((3, n), np.float32)  # RF[k, o, e] repeated over the windows of row o
        FR0 = FR[0]; FR1 = FR[1]; FR2 = FR[2]; CF0 = CF_flat[0]; CF1 = CF_flat[1]; CF2 = CF_flat[2]  # noqa: E702
        X0 = X[0]; X1 = X[1]; X2 = X[2]; X3 = X[3]; X4 = X[4]; X5 = X[5]  # noqa: E702
        X6 = X[6]; X7 = X[7]; X8 = X[8]; X9 = X[9]; X10 = X[10]; X11 = X[11]  # noqa: E702
        X12 = X[12]; X13 = X[13]; X14 = X[14]; X15 = X[15]; X16 = X[16]; X17 = X[17]  # noqa: E702
        T0 = T[0]; T1 = T[1]; T2 = T[2]; T3 = T[3]; T4 = T[4]; T5 = T[5]; T6 = T[6]; T7 = T[7]  # noqa: E702
        for blk in range(lo, hi):
            for o in range(blk * per, min(O, (blk + 1) * per)):
                for i in range(I):
                    for e in range(G):
                        j = i * G + e
                        FR0[j] = RF[0, o, e]
                        FR1[j] = RF[1, o, e]
                        FR2[j] = RF[2, o, e]
                        for k in range(8):
                            T[k, j] = TR[k, o, e] + TC_flat[k, j]
                gr = g_rows[o]; pr = p_rows[o]; vr = v_rows[o]; m0r = m_rows[0, o]; m1r = m_rows[1, o]; m2r = m_rows[2, o]  # noqa: E702, E501
                for j in range(n):
                    g = min(max(gr[j], -_GRAD_CLIP), _GRAD_CLIP)
                    old0 = load(m0r[j]); old1 = load(m1r[j]); old2 = load(m2r[j])  # noqa: E702
                    m0 = old0 + wm[0] * (g - old0)
                    m1 = old1 + wm[1] * (g - old1)
                    m2 = old2 + wm[2] * (g - old2)
                    at = o * n + j  # flat index in v and in m's first momentum
                    m0r[j] = encode(m0r, m0, keys[0], at)
                    m1r[j] = encode(m1r, m1, keys[0], plane + at)
                    m2r[j] = encode(m2r, m2, keys[0], 2 * plane + at)
                    vv = _RMS_DECAY * load(vr[j]) + _RMS_W * g * g
                    vr[j] = encode(vr, vv, keys[1], at)
                    rv = _ONE / np.sqrt(vv + _RSQRT_EPS)
                    f0 = FR0[j] * CF0[j]
                    f1 = FR1[j] * CF1[j]
                    f2 = FR2[j] * CF2[j]
                    X0[j] = g
                    X1[j] = min(max(g, -_FEATURE_CLIP), _FEATURE_CLIP)
                    X2[j] = pr[j]
                    X3[j] = m0
                    X4[j] = m1
                    X5[j] = m2
                    X6[j] = vv
                    X7[j] = m0 * rv
                    X8[j] = m1 * rv
                    X9[j] = m2 * rv
                    X10[j] = rv
                    X11[j] = g * f0
                    X12[j] = g * f1
                    X13[j] = g * f2
                    X14[j] = g * rv
                    X15[j] = m0 * f0
                    X16[j] = m1 * f1
                    X17[j] = m2 * f2
                # Each window's channels to unit RMS over its G elements.
                for c in range(18):
                    xc = X[c]
                    for i in range(I):
                        ss = _ZERO
                        for e in range(G):
                            x = xc[i * G + e]
                            ss += x * x
                        inv = _ONE / np.sqrt(ss / G + _INPUT_NORM_EPS)
                        for e in range(G):
                            xc[i * G + e] *= inv
                # The MLP over the row, unrolled and inline, as in ``direction``:
                # called as a function it leaves LLVM's vectoriser stores it
                # does not vectorise (see the module docstring).
                for j in range(n):
                    g = X0[j]; x1 = X1[j]; pp = X2[j]; m0 = X3[j]; m1 = X4[j]; m2 = X5[j]  # noqa: E702
                    vv = X6[j]; x7 = X7[j]; x8 = X8[j]; x9 = X9[j]; rv = X10[j]; x11 = X11[j]  # noqa: E702
                    x12 = X12[j]; x13 = X13[j]; x14 = X14[j]; x15 = X15[j]; x16 = X16[j]; x17 = X17[j]  # noqa: E702
                    h0 = max(T0[j] + W[0, 0] * g + W[1, 0] * x1 + W[2, 0] * pp + W[3, 0] * m0 + W[4, 0] * m1
                             + W[5, 0] * m2 + W[6, 0] * vv + W[7, 0] * x7 + W[8, 0] * x8 + W[9, 0] * x9 + W[10, 0] * rv
                             + W[11, 0] * x11 + W[12, 0] * x12 + W[13, 0] * x13 + W[14, 0] * x14 + W[15, 0] * x15
                             + W[16, 0] * x16 + W[17, 0] * x17, _ZERO)
                    h1 = max(T1[j] + W[0, 1] * g + W[1, 1] * x1 + W[2, 1] * pp + W[3, 1] * m0 + W[4, 1] * m1
                             + W[5, 1] * m2 + W[6, 1] * vv + W[7, 1] * x7 + W[8, 1] * x8 + W[9, 1] * x9 + W[10, 1] * rv
                             + W[11, 1] * x11 + W[12, 1] * x12 + W[13, 1] * x13 + W[14, 1] * x14 + W[15, 1] * x15
                             + W[16, 1] * x16 + W[17, 1] * x17, _ZERO)
                    h2 = max(T2[j] + W[0, 2] * g + W[1, 2] * x1 + W[2, 2] * pp + W[3, 2] * m0 + W[4, 2] * m1
                             + W[5, 2] * m2 + W[6, 2] * vv + W[7, 2] * x7 + W[8, 2] * x8 + W[9, 2] * x9 + W[10, 2] * rv
                             + W[11, 2] * x11 + W[12, 2] * x12 + W[13, 2] * x13 + W[14, 2] * x14 + W[15, 2] * x15
                             + W[16, 2] * x16 + W[17, 2] * x17, _ZERO)
                    h3 = max(T3[j] + W[0, 3] * g + W[1, 3] * x1 + W[2, 3] * pp + W[3, 3] * m0 + W[4, 3] * m1
                             + W[5, 3] * m2 + W[6, 3] * vv + W[7, 3] * x7 + W[8, 3] * x8 + W[9, 3] * x9 + W[10, 3] * rv
                             + W[11, 3] * x11 + W[12, 3] * x12 + W[13, 3] * x13 + W[14, 3] * x14 + W[15, 3] * x15
                             + W[16, 3] * x16 + W[17, 3] * x17, _ZERO)
                    h4 = max(T4[j] + W[0, 4] * g + W[1, 4] * x1 + W[2, 4] * pp + W[3, 4] * m0 + W[4, 4] * m1
                             + W[5, 4] * m2 + W[6, 4] * vv + W[7, 4] * x7 + W[8, 4] * x8 + W[9, 4] * x9 + W[10, 4] * rv
                             + W[11, 4] * x11 + W[12, 4] * x12 + W[13, 4] * x13 + W[14, 4] * x14 + W[15, 4] * x15
                             + W[16, 4] * x16 + W[17, 4] * x17, _ZERO)
                    h5 = max(T5[j] + W[0, 5] * g + W[1, 5] * x1 + W[2, 5] * pp + W[3, 5] * m0 + W[4, 5] * m1
                             + W[5, 5] * m2 + W[6, 5] * vv + W[7, 5] * x7 + W[8, 5] * x8 + W[9, 5] * x9 + W[10, 5] * rv
                             + W[11, 5] * x11 + W[12, 5] * x12 + W[13, 5] * x13 + W[14, 5] * x14 + W[15, 5] * x15
                             + W[16, 5] * x16 + W[17, 5] * x17, _ZERO)
                    h6 = max(T6[j] + W[0, 6] * g + W[1, 6] * x1 + W[2, 6] * pp + W[3, 6] * m0 + W[4, 6] * m1
                             + W[5, 6] * m2 + W[6, 6] * vv + W[7, 6] * x7 + W[8, 6] * x8 + W[9, 6] * x9 + W[10, 6] * rv
                             + W[11, 6] * x11 + W[12, 6] * x12 + W[13, 6] * x13 + W[14, 6] * x14 + W[15, 6] * x15
                             + W[16, 6] * x16 + W[17, 6] * x17, _ZERO)
                    h7 = max(T7[j] + W[0, 7] * g + W[1, 7] * x1 + W[2, 7] * pp + W[3, 7] * m0 + W[4, 7] * m1
                             + W[5, 7] * m2 + W[6, 7] * vv + W[7, 7] * x7 + W[8, 7] * x8 + W[9, 7] * x9 + W[10, 7] * rv
                             + W[11, 7] * x11 + W[12, 7] * x12 + W[13, 7] * x13 + W[14, 7] * x14 + W[15, 7] * x15
                             + W[16, 7] * x16 + W[17, 7] * x17, _ZERO)
                    u0 = max(b1[0] + W1[0, 0] * h0 + W1[1, 0] * h1 + W1[2, 0] * h2 + W1[3, 0] * h3
                             + W1[4, 0] * h4 + W1[5, 0] * h5 + W1[6, 0] * h6 + W1[7, 0] * h7, _ZERO)
                    u1 = max(b1[1] + W1[0, 1] * h0 + W1[1, 1] * h1 + W1[2, 1] * h2 + W1[3, 1] * h3
                             + W1[4, 1] * h4 + W1[5, 1] * h5 + W1[6, 1] * h6 + W1[7, 1] * h7, _ZERO)
                    u2 = max(b1[2] + W1[0, 2] * h0 + W1[1, 2] * h1 + W1[2, 2] * h2 + W1[3, 2] * h3
                             + W1[4, 2] * h4 + W1[5, 2] * h5 + W1[6, 2] * h6 + W1[7, 2] * h7, _ZERO)
                    u3 = max(b1[3] + W1[0, 3] * h0 + W1[1, 3] * h1 + W1[2, 3] * h2 + W1[3, 3] * h3
                             + W1[4, 3] * h4 + W1[5, 3] * h5 + W1[6, 3] * h6 + W1[7, 3] * h7, _ZERO)
                    u4 = max(b1[4] + W1[0, 4] * h0 + W1[1, 4] * h1 + W1[2, 4] * h2 + W1[3, 4] * h3
                             + W1[4, 4] * h4 + W1[5, 4] * h5 + W1[6, 4] * h6 + W1[7, 4] * h7, _ZERO)
                    u5 = max(b1[5] + W1[0, 5] * h0 + W1[1, 5] * h1 + W1[2, 5] * h2 + W1[3, 5] * h3
                             + W1[4, 5] * h4 + W1[5, 5] * h5 + W1[6, 5] * h6 + W1[7, 5] * h7, _ZERO)
                    u6 = max(b1[6] + W1[0, 6] * h0 + W1[1, 6] * h1 + W1[2, 6] * h2 + W1[3, 6] * h3
                             + W1[4, 6] * h4 + W1[5, 6] * h5 + W1[6, 6] * h6 + W1[7, 6] * h7, _ZERO)
                    u7 = max(b1[7] + W1[0, 7] * h0 + W1[1, 7] * h1 + W1[2, 7] * h2 + W1[3, 7] * h3
                             + W1[4, 7] * h4 + W1[5, 7] * h5 + W1[6, 7] * h6 + W1[7, 7] * h7, _ZERO)
                    d = (b2 + w2[0] * u0 + w2[1] * u1 + w2[2] * u2 + w2[3] * u3
                         + w2[4] * u4 + w2[5] * u5 + w2[6] * u6 + w2[7] * u7)
                    D[j] = d
                for i in range(I):
                    if mode == WRITE:
                        for e in range(G):
                            out[o, i, e] = D[i * G + e]
                    elif mode == OVER_GRAD:
                        for e in range(G):
                            graw[o, i, e] = D[i * G + e]
                    else:
                        dsq = _ZERO
                        for e in range(G):
                            dsq += D[i * G + e] * D[i * G + e]
                        s = step / np.sqrt(dsq / G + _OUTPUT_NORM_EPS)
                        for e in range(G):
                            p[o, i, e] = decay * p[o, i, e] + s * D[i * G + e]
