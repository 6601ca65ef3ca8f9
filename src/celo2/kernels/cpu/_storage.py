"""How the loops read and write the rule's accumulators: float32, or bfloat16 with stochastic rounding.

An accumulator array (``m``, ``v``, ``fac_r``, ``fac_c``) is either float32
or ``uint16`` holding bfloat16 bit patterns (a ``torch.bfloat16`` tensor's
memory seen as integers). The loops are written once against the helpers
below, which Numba specialises on the array's dtype when it compiles them
and inlines into its IR before lowering: on float32 arrays they are plain
loads and stores (the code, the speed and the bits of float32 state are
those of loops written without them; a call left for LLVM to inline would
change how its fast-math rewrites order a loop's sums); on ``uint16``
arrays :func:`load` widens a pattern to float32 (exactly) and :func:`encode`
rounds a float32 value to bfloat16 stochastically, exactly as
:mod:`celo2.rule.rounding` describes: its 16 random bits are
``mix32(key ^ mix32(index)) >> 16``, with the accumulator's key of this step
(:func:`celo2.rule.rounding.stream_key`, computed on the host) and the
element's flat C-order index in the whole accumulator. Arithmetic is float32
either way; only what is stored differs.

The helpers use integer operations only (bit patterns, an integer NaN test),
so the loops' fast-math flags cannot change them.
"""

from __future__ import annotations

import numpy as np

from celo2.kernels.cpu._compiler import AVAILABLE
from celo2.rule import rounding

NO_KEYS: tuple[int, int, int, int] = (0, 0, 0, 0)
"""The rounding keys of float32 state (read by no loop): ``(m, v, fac_r, fac_c)``."""

_A, _B = (np.uint32(k) for k in rounding.MIX_MULTIPLIERS)
_S0, _S1, _S2 = rounding.MIX_SHIFTS
_QUIET = np.uint32(rounding.BFLOAT16_QUIET_BIT)
_ABS = np.uint32(0x7FFFFFFF)
_INF = np.uint32(0x7F800000)

if AVAILABLE:
    import numba
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic, overload

    _I32 = ir.IntType(32)

    def _mix32_ir(builder, x):  # noqa: ANN001, ANN202
        """:func:`celo2.rule.rounding.mix32` as 32-bit LLVM instructions (each wraps modulo 2**32)."""
        x = builder.xor(x, builder.lshr(x, ir.Constant(_I32, _S0)))
        x = builder.mul(x, ir.Constant(_I32, int(_A)))
        x = builder.xor(x, builder.lshr(x, ir.Constant(_I32, _S1)))
        x = builder.mul(x, ir.Constant(_I32, int(_B)))
        return builder.xor(x, builder.lshr(x, ir.Constant(_I32, _S2)))

    @intrinsic
    def mix32(typingctx, x):  # noqa: ANN001, ANN202
        """:func:`celo2.rule.rounding.mix32` of a ``uint32``."""
        sig = types.uint32(types.uint32)

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            return _mix32_ir(builder, args[0])

        return sig, codegen

    @intrinsic
    def _widen(typingctx, pattern):  # noqa: ANN001, ANN202
        """The float32 value of a bfloat16 bit pattern (``uint16``): the pattern as the top half."""
        sig = types.float32(types.uint16)

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            top = builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16))
            return builder.bitcast(top, ir.FloatType())

        return sig, codegen

    @intrinsic
    def round_bits(typingctx, x, key, index):  # noqa: ANN001, ANN202
        """The bfloat16 pattern (``uint16``) of float32 ``x`` at flat ``index`` (``uint32``) rounded with
        ``key`` (``uint32``), as :func:`celo2.rule.rounding.round_to_bfloat16` with the bits of
        :func:`celo2.rule.rounding.random_bits`: 32-bit integer instructions only (the compiler vectorises
        them 16 to a 512-bit register; Numba's integer typing would widen them to 64 bits)."""
        sig = types.uint16(types.float32, types.uint32, types.uint32)

        def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202
            value, k, i = args
            u = builder.bitcast(value, _I32)
            bits = builder.lshr(_mix32_ir(builder, builder.xor(k, _mix32_ir(builder, i))), ir.Constant(_I32, 16))
            rounded = builder.lshr(builder.add(u, bits), ir.Constant(_I32, 16))
            quiet = builder.or_(builder.lshr(u, ir.Constant(_I32, 16)), ir.Constant(_I32, int(_QUIET)))
            nan = builder.icmp_unsigned(">", builder.and_(u, ir.Constant(_I32, int(_ABS))),
                                        ir.Constant(_I32, int(_INF)))
            return builder.trunc(builder.select(nan, quiet, rounded), ir.IntType(16))

        return sig, codegen

    def rounds(array):  # noqa: ANN001, ANN201
        """Whether ``array`` holds bfloat16 patterns (stores into it round), a constant per compiled type."""

    @overload(rounds, inline="always")
    def _rounds(array):  # noqa: ANN001, ANN202
        value = isinstance(array, types.Array) and array.dtype == types.uint16
        return lambda array: value

    def load(x):  # noqa: ANN001, ANN201
        """An accumulator's element ``x`` (float32, or a bfloat16 pattern) as float32 (exact)."""

    @overload(load, inline="always")
    def _load(x):  # noqa: ANN001, ANN202
        if x == types.uint16:
            return lambda x: _widen(x)
        return lambda x: x

    def encode(array, x, key, index):  # noqa: ANN001, ANN201
        """The value ``array`` stores for float32 ``x`` at flat ``index`` of its accumulator: ``x`` itself
        (float32 ``array``), or ``x`` rounded stochastically with ``key`` (a ``uint16`` array)."""

    @overload(encode, inline="always")
    def _encode(array, x, key, index):  # noqa: ANN001, ANN202
        if array.dtype == types.uint16:
            def impl(array, x, key, index):  # noqa: ANN001, ANN202
                return round_bits(x, np.uint32(key), np.uint32(index))

            return impl
        return lambda array, x, key, index: x

    def store_unrounded(row, j, x):  # noqa: ANN001, ANN201
        """``row[j] = x`` where ``row`` is float32; nothing where it holds bfloat16 (a later pass, which has
        the same float32 value, stores it rounded)."""

    @overload(store_unrounded, inline="always")
    def _store_unrounded(row, j, x):  # noqa: ANN001, ANN202
        if row.dtype == types.uint16:
            return lambda row, j, x: None

        def impl(row, j, x):  # noqa: ANN001, ANN202
            row[j] = x

        return impl

    def float_row(row, values):  # noqa: ANN001, ANN201
        """A row of state as float32: ``row`` itself where it is float32, else ``values`` (float32, which the
        caller filled from it)."""

    @overload(float_row, inline="always")
    def _float_row(row, values):  # noqa: ANN001, ANN202
        if row.dtype == types.uint16:
            return lambda row, values: values
        return lambda row, values: row

    def widened(array):  # noqa: ANN001, ANN201
        """A float32 array of ``array``'s values: ``array`` itself when it is float32 (so that writing the
        result writes the accumulator), else a new C-contiguous array (write it back with
        :func:`store_all`)."""

    @overload(widened)
    def _widened(array):  # noqa: ANN001, ANN202
        if array.dtype != types.uint16:
            return lambda array: array

        def impl(array):  # noqa: ANN001, ANN202
            out = np.empty(array.shape, np.float32)
            flat_in = array.reshape(-1)
            flat_out = out.reshape(-1)
            for j in range(flat_in.size):
                flat_out[j] = load(flat_in[j])
            return out

        return impl

    def store_all(array, values, key):  # noqa: ANN001, ANN201
        """Store float32 ``values`` (from :func:`widened`) into the accumulator ``array`` of the same shape
        (C-contiguous), rounding with ``key`` where it holds bfloat16 (nothing to do where ``values`` is
        ``array``)."""

    @overload(store_all)
    def _store_all(array, values, key):  # noqa: ANN001, ANN202
        if array.dtype != types.uint16:
            return lambda array, values, key: None

        def impl(array, values, key):  # noqa: ANN001, ANN202
            flat_in = values.reshape(-1)
            flat_out = array.reshape(-1)
            for j in range(flat_in.size):
                flat_out[j] = encode(array, flat_in[j], key, j)

        return impl
