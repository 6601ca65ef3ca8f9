"""The pass sequences of the CPU kernels: a whole tensor's step as one compiled call.

Each kind of tensor (:func:`celo2.kernels.cpu.kernel_kind`) has its sequence
written once here, and both front ends call it: the PyTorch front end on its
tensors' NumPy views (whole tensors handed to threads by
:func:`celo2.kernels.cpu.run_tensors`), the JAX front end from inside a
compiled step through its XLA FFI handler. The sequences run serially over
the row blocks of :func:`celo2.kernels.cpu.blocks`, so the numbers are those
of any split of the same loops over threads.

* A matrix (:func:`matrix_step`) takes four passes (docs/architecture.md,
  "The passes of a fused step"): the gradient's row and column sums of
  squares; the factored statistics with their factors and rank-1 terms; the
  accumulators with the channels' sums of squares; and the direction. Each
  pass runs over the columns a chunk of :data:`COLUMN_CHUNK` at a time, the
  column factors and rank-1 terms made per chunk, so the scratch along the
  columns stays a few chunks however wide the matrix (a ``(1, n)`` one too).
* A vector (:func:`vector_step`) folds its unfactored statistics in one pass,
  then takes the matrix's direction pass as one row, its factors made from
  the folded statistics a chunk at a time.
* A conv kernel (:func:`conv_step`), seen as ``(O, I, G)`` with ``G = kh kw``
  and normalised per window: the gradient's sums over ``I`` and ``O``, the
  factored statistics per window position, then one fused pass per row of
  windows.

In the direction pass's modes (:class:`celo2.rule.layout.DirectionMode`)
``WRITE`` and ``OVER_GRAD`` leave the raw direction (before Newton-Schulz and
the output RMS) to the caller; ``APPLY`` updates the parameter in place with
the output RMS of the tensor (matrices, vectors) or of each window (conv
kernels), so the direction is never held.
"""

from __future__ import annotations

import numpy as np

from celo2.kernels.cpu._compiler import AVAILABLE, serial
from celo2.kernels.cpu._loops import APPLY, FACTORED_W, MOMENTUM_W, SQUARES
from celo2.kernels.cpu._operands import blocks
from celo2.kernels.cpu._storage import NO_KEYS
from celo2.kernels.cpu._threads import run_blocks
from celo2.rule import layout, spec

if AVAILABLE:
    from celo2.kernels.cpu._storage import store_all, widened
    from celo2.kernels.cpu._loops import (accumulate, direction, factor_terms, fold_statistic, grad_stats,
                                          group_factors, group_grad_stats, grouped, nonfinite_blocks,
                                          normalised_first_layer, statistic_moments, vector_accumulate,
                                          vector_factors)

# Where each array lies in the packed weights (celo2.rule.layout.pack_theta);
# Numba freezes these into the compiled sequences.
_NET = {name: (seg.offset, seg.stop) for name, seg in layout.SEGMENT.items()}
_W_EL, _W_ROW, _W_COL, _B0, _W1, _B1, _W2, _B2 = (_NET[k] for k in ("w_el", "w_row", "w_col", "b0", "w1", "b1", "w2",
                                                                    "b2"))
_CH, _H, _RANK1 = layout.MATRIX_CHANNELS, spec.HIDDEN_SIZE, layout.RANK1_CHANNELS
_VECTOR_CH = layout.VECTOR_CHANNELS
_ONE, _ZERO = np.float32(1.0), np.float32(0.0)

COLUMN_CHUNK = 1 << 16
"""Columns per chunk of the accumulator and direction passes of a matrix or
vector: their column factors and rank-1 terms are made a chunk at a time, so
a wide matrix or a long vector needs about ``12 COLUMN_CHUNK`` float32 of
column scratch, not 12 per column. Narrower tensors take one chunk."""

if AVAILABLE:
    blocks_jit = serial(blocks)

    @serial
    def fill_columns(stat, moments, w, b0, is_row, is_vector, j0, j1, B, TC):  # noqa: ANN001, ANN202
        """Columns ``j0:j1``'s factors into ``B`` and rank-1 terms into ``TC``:
        a vector's from its full second moments ``stat`` (``TC`` stays zero:
        vectors have no rank-1 channels), a matrix's from its column
        statistic ``stat`` with its ``moments`` (:func:`factor_terms`)."""
        if is_vector:
            vector_factors(stat, j0, j1, B)
        else:
            factor_terms(stat, j0, j1, moments, w, b0, is_row, B, TC)

    @serial
    def finish(g, p, m, v, A, TR, B, TC, filled, columns, W, net, mode, decay, lr, out, keys):  # noqa: ANN001, ANN202
        """The direction pass of a matrix or vector (one, or for ``APPLY`` the
        squares first, then the scaled application), a chunk of
        :data:`COLUMN_CHUNK` columns at a time; ``columns``, the arguments of
        :func:`fill_columns` before the range, fill each chunk's factors ``B``
        and rank-1 terms ``TC``, which already hold the chunk starting at
        column ``filled``. Bfloat16 ``m`` / ``v`` are stored (rounded with
        ``keys``) by the last pass. Returns the sum of the direction's
        squares."""
        R, C = g.shape
        per, nblk = blocks_jit(R)
        # Contiguous copies (a slice types as any-layout, which the loops index more slowly).
        W1 = net[_W1[0]:_W1[1]].copy().reshape(_H, _H)
        b1 = net[_B1[0]:_B1[1]].copy()
        w2 = net[_W2[0]:_W2[1]].copy()
        b2 = net[_B2[0]]
        sq_part = np.empty(nblk, np.float64)
        sq = 0.0
        step = _ZERO
        for pass_index in range(2 if mode == APPLY else 1):
            pass_mode = mode if mode != APPLY else (SQUARES if pass_index == 0 else APPLY)
            if pass_mode == APPLY:
                scale = 1.0 / np.sqrt(sq / g.size + spec.OUTPUT_NORM_EPS)
                step = np.float32(-lr * scale)
            pass_decay = np.float32(decay) if pass_mode == APPLY else _ONE
            total = 0.0
            for j0 in range(0, C, COLUMN_CHUNK):
                j1 = min(C, j0 + COLUMN_CHUNK)
                if j0 != filled:
                    fill_columns(columns[0], columns[1], columns[2], columns[3], columns[4], columns[5], j0, j1, B,
                                 TC)
                    filled = j0
                direction(0, nblk, g, p, m, v, MOMENTUM_W, A, B, TR, TC, W, W1, b1, w2, b2, pass_mode, pass_decay,
                          step, j0, j1, per, out, sq_part, keys, pass_mode != SQUARES)
                total += sq_part.sum()
            if pass_mode != APPLY:
                sq = total
        return sq

    @serial
    def matrix_step(g, p, m, v, fac_r, fac_c, rows_first, net, mode, decay, lr, out, keys=NO_KEYS):  # noqa: ANN001, ANN202
        """One matrix's step, serially: the four passes (gradient sums,
        factors, accumulators, direction) over the blocks of :func:`blocks`,
        the accumulator and direction passes a chunk of :data:`COLUMN_CHUNK`
        columns at a time (the column factors and rank-1 terms are made per
        chunk, so a wide matrix needs no scratch as large as itself).

        Args: ``g``, ``p`` (R, C); ``m`` (3, R, C) and ``v`` (R, C), updated in
        place; ``fac_r``, ``fac_c`` (3, L), the factored statistics, updated in
        place; ``rows_first``, whether the row statistic holds one value per
        row (:func:`celo2.kernels.cpu.rows_first`; the axis ``d0`` it averages
        over, 1 or 0, reads the same); ``net``, the packed weights
        (:func:`celo2.rule.layout.pack_theta`); ``mode`` of the direction pass:
        ``WRITE`` into ``out`` (R, C), ``OVER_GRAD`` into ``g``, or ``APPLY``
        (its squares first, then ``p <- decay p - lr d / rms(d)``); ``decay``
        and ``lr`` (float64), read by ``APPLY`` only; ``keys``, the rounding
        keys ``(m, v, fac_r, fac_c)`` of this step
        (:func:`celo2.rule.rounding.stream_key`), read where the state is
        bfloat16.

        The state is float32 (updated in place), or bfloat16 bit patterns
        (``uint16`` arrays, all four): read as float32, every value computed
        in float32 exactly as for float32 state, each stored rounded
        stochastically (:mod:`celo2.kernels.cpu._storage`).

        Returns: the sum of the direction's squares (float64)."""
        R, C = g.shape
        per, nblk = blocks_jit(R)
        width = min(C, COLUMN_CHUNK)
        w_row = net[_W_ROW[0]:_W_ROW[1]].copy().reshape(_RANK1, _H)
        w_col = net[_W_COL[0]:_W_COL[1]].copy().reshape(_RANK1, _H)
        b0 = net[_B0[0]:_B0[1]].copy()
        # The factored statistics are small: bfloat16 ones are folded in
        # float32 copies, then stored rounded.
        stat_r = widened(fac_r)
        stat_c = widened(fac_c)
        # The row statistic (fac_r) averages over the columns (one value per
        # row) when rows_first, else over the rows; the other one runs along
        # the columns and is folded a chunk of columns at a time.
        along_cols = stat_c if rows_first else stat_r
        along_rows = stat_r if rows_first else stat_c
        row_sum = np.zeros(R, np.float32)
        col_part = np.empty((nblk, width), np.float32)
        parts_cols = np.zeros((3, 3), np.float64)
        parts_rows = np.zeros((3, 3), np.float64)
        for j0 in range(0, C, COLUMN_CHUNK):
            j1 = min(C, j0 + COLUMN_CHUNK)
            grad_stats(0, nblk, g, j0, j1, per, row_sum, col_part)
            col_sum = col_part[0] if nblk == 1 else col_part.sum(0)
            fold_statistic(along_cols, col_sum, j0, j1, R, FACTORED_W, parts_cols)
        fold_statistic(along_rows, row_sum, 0, R, C, FACTORED_W, parts_rows)
        store_all(fac_r, stat_r, keys[2])
        store_all(fac_c, stat_c, keys[3])
        moments_cols = np.empty((3, 3), np.float32)
        moments_rows = np.empty((3, 3), np.float32)
        statistic_moments(parts_cols, C, moments_cols)
        statistic_moments(parts_rows, R, moments_rows)
        A = np.empty((3, R), np.float32)
        TR = np.empty((_H, R), np.float32)
        if rows_first:
            factor_terms(stat_r, 0, R, moments_rows, w_row, b0, True, A, TR)
            columns = (stat_c, moments_cols, w_col, b0, False, False)
        else:
            factor_terms(stat_c, 0, R, moments_rows, w_col, b0, False, A, TR)
            columns = (stat_r, moments_cols, w_row, b0, True, False)
        A2 = A * A
        B = np.empty((3, width), np.float32)
        TC = np.empty((_H, width), np.float32)
        B2 = np.empty((3, width), np.float32)
        sums_part = np.empty((nblk, _CH), np.float64)
        sums = np.zeros(_CH, np.float64)
        j0 = 0
        for j0 in range(0, C, COLUMN_CHUNK):
            j1 = min(C, j0 + COLUMN_CHUNK)
            fill_columns(columns[0], columns[1], columns[2], columns[3], columns[4], columns[5], j0, j1, B, TC)
            for k in range(3):
                for j in range(j1 - j0):
                    B2[k, j] = B[k, j] * B[k, j]
            accumulate(0, nblk, g, p, m, v, MOMENTUM_W, A2, B2, j0, j1, per, sums_part)
            sums += sums_part.sum(0)
        W = normalised_first_layer(net[_W_EL[0]:_W_EL[1]].copy().reshape(_CH, _H), sums, R * C)
        return finish(g, p, m, v, A, TR, B, TC, j0, columns, W, net, mode, decay, lr, out, keys)

    @serial
    def vector_step(g, p, m, v, fac, net, mode, decay, lr, out, keys=NO_KEYS):  # noqa: ANN001, ANN202
        """One vector's step, serially: the accumulator pass (its
        full-size statistic folded), then the matrix direction pass on it as
        one row, its factors made a chunk of :data:`COLUMN_CHUNK` entries at a
        time (:func:`celo2.kernels.cpu._loops.vector_factors`). Arguments as :func:`matrix_step`, with
        ``g``, ``p``, ``v`` (n,), ``m`` and ``fac`` (3, n), ``out`` (1, n);
        ``fac`` is the vector's ``fac_r`` (its ``keys`` entry).

        Bfloat16 state (vectors are small next to the matrices) is stepped
        in float32 copies, then stored rounded.

        Returns: the sum of the direction's squares (float64)."""
        n = g.shape[0]
        held_m = m
        held_v = v
        held_fac = fac
        m = widened(held_m)
        v = widened(held_v)
        fac = widened(held_fac)
        sums = np.empty(_VECTOR_CH, np.float64)
        vector_accumulate(g, p, m, v, fac, MOMENTUM_W, FACTORED_W, sums)
        # Rows of fac_m stay zero in W: vectors lack those channels.
        W = normalised_first_layer(net[_W_EL[0]:_W_EL[1]].copy().reshape(_CH, _H), sums, n)
        A = np.ones((3, 1), np.float32)
        TR = net[_B0[0]:_B0[1]].copy().reshape(_H, 1)
        width = min(n, COLUMN_CHUNK)
        B = np.empty((3, width), np.float32)
        TC = np.zeros((_H, width), np.float32)
        unused = np.empty((3, 3), np.float32)
        columns = (fac, unused, unused, TR[:, 0].copy(), False, True)
        sq = finish(g.reshape(1, n), p.reshape(1, n), m.reshape(3, 1, n), v.reshape(1, n), A, TR, B, TC, -1,
                    columns, W, net, mode, decay, lr, out, NO_KEYS)
        store_all(held_m, m, keys[0])
        store_all(held_v, v, keys[1])
        store_all(held_fac, fac, keys[2])
        return sq

    @serial
    def conv_step(g, p, m, v, fac_r, fac_c, rows_first, net, mode, decay, lr, out, keys=NO_KEYS):  # noqa: ANN001, ANN202
        """One conv kernel's step, serially, seen as ``(O, I, G)``
        (``G = kh kw``, the same memory) and normalised per (o, i) window:
        the sums of ``clip(g)^2`` over ``I`` and over ``O``, the factored
        statistics with their factors and rank-1 terms per window position,
        then one fused pass per row of windows (accumulators, channels, MLP,
        direction) over the blocks of :func:`blocks`.

        Args: ``g``, ``p`` (O, I, G); ``m`` (3, O, I, G) and ``v`` (O, I, G),
        updated in place; ``fac_r``, ``fac_c`` (3, L, G), the factored
        statistics, updated in place (``L`` is ``O`` for the statistic that
        averages over ``I``); ``rows_first``, whether ``fac_r`` runs along
        ``O`` (:func:`celo2.kernels.cpu.rows_first`; ``d0``, 1 or 0, reads the
        same); ``net``, the packed weights; ``mode``: ``WRITE`` the raw
        direction into ``out`` (O, I, G), ``OVER_GRAD`` into ``g``, or
        ``APPLY`` ``p <- decay p - lr d / rms(d)`` with each window's RMS;
        ``decay`` and ``lr`` (float64), read by ``APPLY`` only; ``keys`` and
        bfloat16 state as :func:`matrix_step`.

        Returns: 0.0 (float64; the normalisation is per window, so there is
        no tensor-wide sum of squares to return)."""
        O, I, G = g.shape  # noqa: E741
        per, nblk = blocks_jit(O)
        sum_over_i = np.empty((O, G), np.float32)
        col_part = np.empty((nblk, I, G), np.float32)
        group_grad_stats(0, nblk, g, per, sum_over_i, col_part)
        sum_over_o = col_part.sum(0)
        stat_r = widened(fac_r)
        stat_c = widened(fac_c)
        rf = np.empty(fac_r.shape, np.float32)
        cf = np.empty(fac_c.shape, np.float32)
        term_r = np.empty((_H, fac_r.shape[1], G), np.float32)
        term_c = np.empty((_H, fac_c.shape[1], G), np.float32)
        w_row = net[_W_ROW[0]:_W_ROW[1]].copy().reshape(_RANK1, _H)
        w_col = net[_W_COL[0]:_W_COL[1]].copy().reshape(_RANK1, _H)
        b0 = net[_B0[0]:_B0[1]].copy()
        if rows_first:  # the row statistic averages over I and runs along O
            group_factors(stat_r, stat_c, sum_over_i, sum_over_o, I, O, FACTORED_W, w_row, w_col, b0, rf, cf, term_r,
                          term_c)
            RF, CF, TR, TC = rf, cf, term_r, term_c
        else:
            group_factors(stat_r, stat_c, sum_over_o, sum_over_i, O, I, FACTORED_W, w_row, w_col, b0, rf, cf, term_r,
                          term_c)
            RF, CF, TR, TC = cf, rf, term_c, term_r
        store_all(fac_r, stat_r, keys[2])
        store_all(fac_c, stat_c, keys[3])
        W = net[_W_EL[0]:_W_EL[1]].copy().reshape(_CH, _H)
        W1 = net[_W1[0]:_W1[1]].copy().reshape(_H, _H)
        b1 = net[_B1[0]:_B1[1]].copy()
        w2 = net[_W2[0]:_W2[1]].copy()
        grouped(0, nblk, g, p, m, v, MOMENTUM_W, RF, CF, TR, TC, W, W1, b1, w2, net[_B2[0]], mode, np.float32(decay),
                np.float32(-lr), per, out, keys)
        return 0.0


NONFINITE_BLOCK = 1 << 16
"""Elements per block of :func:`all_finite`."""


def all_finite(x: np.ndarray, threads: "int | None" = None) -> bool:
    """Whether a C-contiguous float32 array holds no NaN or +-inf (one read,
    split over threads like the kernels; a host check, for CPU arrays).

    Args:
        x: The array (a gradient's NumPy view).
        threads: At most this many threads (default :func:`celo2.kernels.cpu.default_threads`).

    Returns:
        ``True`` when every element is finite.

    Raises:
        ValueError: If ``x`` is not a C-contiguous float32 array.
    """
    if np.dtype(x.dtype) != np.float32 or not x.flags.c_contiguous:
        raise ValueError(f"all_finite: expected a C-contiguous float32 array, got {x.dtype} (shape {x.shape})")
    bits = x.reshape(-1).view(np.uint32)
    nblk = -(-bits.shape[0] // NONFINITE_BLOCK)
    if nblk == 0:
        return True
    out = np.empty(nblk, np.int64)
    run_blocks(nonfinite_blocks, nblk, bits.shape[0], bits, NONFINITE_BLOCK, out, threads=threads)
    return not out.any()
