"""The XLA FFI handler of :mod:`celo2.optax.cpu_ffi`, as a Numba ``cfunc``.

Imported on first use only: Numba compiles it the first time after an
install, the longest part of a first CPU step, then loads it from its disk cache. It reads XLA's C
structs by word offset; the layouts are those of ``xla/ffi/api/c_api.h``
(API 0.1 and later) on a 64-bit ABI. The operands' shapes and dtypes are
checked on the Python side (:mod:`celo2.optax.cpu_ffi`) before any call.

Numba keys this file's cache on this file alone: after editing the kernels
in :mod:`celo2.kernels.cpu` in a source checkout, touch this file (an
install writes both anew). The handlers only read XLA's buffers and call the
kernels' pass sequences; the sequences themselves are the PyTorch front
end's too.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import carray, types
from numba.core import cgutils
from numba.extending import intrinsic

from celo2.kernels import cpu as kernels
from celo2.rule import layout


@intrinsic
def as_pointer(typingctx, address):  # noqa: ANN001, ANN201, ARG001
    """An int64 address as a ``void*`` (what ``numba.carray`` takes)."""
    def codegen(context, builder, signature, args):  # noqa: ANN001, ANN202, ARG001
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return types.voidptr(types.int64), codegen


# Word (int64) offsets. XLA_FFI_CallFrame: struct_size, extension_start, api,
# ctx, stage, args {struct_size, extension_start, size, types, args},
# rets {struct_size, extension_start, size, types, rets}, attrs, future.
FRAME_EXTENSION, FRAME_STAGE, FRAME_ARGS, FRAME_RETS = 1, 4, 9, 14
# XLA_FFI_Buffer: struct_size, extension_start, dtype, data, rank, dims.
BUFFER_DATA, BUFFER_DIMS = 3, 5
EXTENSION_METADATA = 1  # XLA_FFI_Extension_Metadata
STAGE_EXECUTE = 3  # XLA_FFI_ExecutionStage_EXECUTE
API_VERSION_STRUCT_SIZE = 32  # XLA_FFI_Api_Version: 2 words, 2 ints
API_MINOR = 1  # everything read here exists since FFI API 0.1

OVER_GRAD = kernels.OVER_GRAD
NET_SIZE = layout.NET_SIZE
matrix_step, vector_step, conv_step = kernels.matrix_step, kernels.vector_step, kernels.conv_step
nonfinite_blocks = kernels.nonfinite_blocks


@numba.njit(cache=True)
def words(address, n):  # noqa: ANN001, ANN201
    return carray(as_pointer(address), (n,), np.int64)


@numba.njit(cache=True)
def buffer_data(buffer_address):  # noqa: ANN001, ANN201
    return as_pointer(words(buffer_address, 6)[BUFFER_DATA])


@numba.njit(cache=True)
def write_metadata(extension):  # noqa: ANN001, ANN201
    """Answer XLA's metadata query: the FFI API version we were written for, no traits, no state.

    XLA_FFI_Metadata_Extension: base {struct_size, type, next}, metadata*;
    XLA_FFI_Metadata: struct_size, api_version {struct_size, extension_start,
    int major, int minor}, uint32 traits, state_type_id."""
    address = words(extension, 4)[3]
    meta = words(address, 6)
    meta[1] = API_VERSION_STRUCT_SIZE
    meta[2] = 0
    ints = carray(as_pointer(address), (12,), np.int32)
    ints[6] = 0
    ints[7] = API_MINOR
    ints[8] = 0
    meta[5] = 0


@numba.njit(cache=True)
def call_buffers(frame_address, n_args, n_rets):  # noqa: ANN001, ANN201
    """The argument and result buffer addresses of an execute call; empty
    after answering a metadata query or at another stage (nothing to do)."""
    frame = carray(frame_address, (16,), np.int64)
    extension = frame[FRAME_EXTENSION]
    if extension != 0 or (frame[FRAME_STAGE] & 0xFFFFFFFF) != STAGE_EXECUTE:
        if extension != 0 and (words(extension, 2)[1] & 0xFFFFFFFF) == EXTENSION_METADATA:
            write_metadata(extension)
        empty = np.empty(0, np.int64)
        return empty, empty
    return words(frame[FRAME_ARGS], n_args), words(frame[FRAME_RETS], n_rets)


@numba.njit(cache=True)
def dims(buffer_address, rank):  # noqa: ANN001, ANN201
    return words(words(buffer_address, 6)[BUFFER_DIMS], rank)


@numba.njit(cache=True)
def window_dims(buffer_address):  # noqa: ANN001, ANN201
    """A conv kernel (O, I, kh, kw) as the kernels view it: (O, I, G = kh kw)."""
    shape = dims(buffer_address, 4)
    return shape[0], shape[1], shape[2] * shape[3]


@numba.njit(cache=True)
def skipped(g, skip):  # noqa: ANN001, ANN201
    """Policy ``"skip"`` (``skip`` nonzero) and a NaN or +-inf in ``g``: zero
    ``g`` (the direction's buffer) and say so; the caller then writes nothing else."""
    if skip == 0:
        return False
    flat = g.reshape(-1)
    count = np.zeros(1, np.int64)
    nonfinite_blocks(0, 1, flat.view(np.uint32), flat.size, count)
    if count[0] == 0:
        return False
    flat[:] = np.float32(0.0)
    return True


def _matrix(frame_address):  # noqa: ANN001, ANN202
    """Operands: grad, param, m, v, fac_r, fac_c, [rows_first, skip] (int32), the packed net;
    results: raw direction, m, v, fac_r, fac_c (aliasing grad and the state
    operands), sum of squares of the direction (1,). The pass sequence is
    :func:`celo2.kernels.cpu.matrix_step`, with the direction written over
    the gradient, row by row. With ``skip`` set and a non-finite gradient: a
    zero direction, the state untouched and a sum of squares of -1 (the
    caller's flag)."""
    args, rets = call_buffers(frame_address, 8, 6)
    if args.size == 0:
        return as_pointer(0)
    shape = dims(args[0], 2)
    R = shape[0]
    C = shape[1]
    g = carray(buffer_data(rets[0]), (R, C), np.float32)  # grad's buffer, where the direction goes
    p = carray(buffer_data(args[1]), (R, C), np.float32)
    flags = carray(buffer_data(args[6]), (2,), np.int32)
    rows_first = flags[0] != 0
    net = carray(buffer_data(args[7]), (NET_SIZE,), np.float32)
    m = carray(buffer_data(rets[1]), (3, R, C), np.float32)
    v = carray(buffer_data(rets[2]), (R, C), np.float32)
    LR = R if rows_first else C
    LC = C if rows_first else R
    fac_r = carray(buffer_data(rets[3]), (3, LR), np.float32)
    fac_c = carray(buffer_data(rets[4]), (3, LC), np.float32)
    sq_out = carray(buffer_data(rets[5]), (1,), np.float32)
    if skipped(g, flags[1]):
        sq_out[0] = np.float32(-1.0)
        return as_pointer(0)
    sq = matrix_step(g, p, m, v, fac_r, fac_c, rows_first, net, OVER_GRAD, 1.0, 0.0,
                     np.empty((1, 1), np.float32))  # ``out`` is unused in mode OVER_GRAD
    sq_out[0] = np.float32(sq)
    return as_pointer(0)


def _conv(frame_address):  # noqa: ANN001, ANN202
    """Operands: grad, param (O, I, kh, kw), m (3, O, I, kh, kw), v, fac_r,
    fac_c (3, L, kh, kw), [rows_first, skip] (int32), the packed net;
    results: raw direction (O, I, kh, kw), m, v, fac_r, fac_c (aliasing grad
    and the state operands), and 0 (1,). The pass sequence is
    :func:`celo2.kernels.cpu.conv_step` on the row-major tensors viewed as
    (O, I, G = kh kw), with the direction written over the gradient. ``skip``
    as in :func:`_matrix` (the last result then -1)."""
    args, rets = call_buffers(frame_address, 8, 6)
    if args.size == 0:
        return as_pointer(0)
    O, I, G = window_dims(args[0])  # noqa: E741
    g = carray(buffer_data(rets[0]), (O, I, G), np.float32)  # grad's buffer, where the direction goes
    p = carray(buffer_data(args[1]), (O, I, G), np.float32)
    flags = carray(buffer_data(args[6]), (2,), np.int32)
    rows_first = flags[0] != 0
    net = carray(buffer_data(args[7]), (NET_SIZE,), np.float32)
    m = carray(buffer_data(rets[1]), (3, O, I, G), np.float32)
    v = carray(buffer_data(rets[2]), (O, I, G), np.float32)
    LR = O if rows_first else I
    LC = I if rows_first else O
    fac_r = carray(buffer_data(rets[3]), (3, LR, G), np.float32)
    fac_c = carray(buffer_data(rets[4]), (3, LC, G), np.float32)
    flag_out = carray(buffer_data(rets[5]), (1,), np.float32)
    if skipped(g, flags[1]):
        flag_out[0] = np.float32(-1.0)
        return as_pointer(0)
    conv_step(g, p, m, v, fac_r, fac_c, rows_first, net, OVER_GRAD, 1.0, 0.0,
              np.empty((1, 1, 1), np.float32))  # ``out`` is unused in mode OVER_GRAD
    flag_out[0] = np.float32(0.0)
    return as_pointer(0)


def _vector(frame_address):  # noqa: ANN001, ANN202
    """Operands: grad, param (n,), m (3, n), v (n,), fac (3, n), [skip]
    (int32), the packed net; results: raw direction (n,), m, v, fac (aliasing
    grad and the state operands), sum of squares of the direction (1,). The
    pass sequence is :func:`celo2.kernels.cpu.vector_step`. ``skip`` as in
    :func:`_matrix`."""
    args, rets = call_buffers(frame_address, 7, 5)
    if args.size == 0:
        return as_pointer(0)
    n = dims(args[0], 1)[0]
    g = carray(buffer_data(rets[0]), (n,), np.float32)  # grad's buffer, where the direction goes
    p = carray(buffer_data(args[1]), (n,), np.float32)
    net = carray(buffer_data(args[6]), (NET_SIZE,), np.float32)
    m = carray(buffer_data(rets[1]), (3, n), np.float32)
    v = carray(buffer_data(rets[2]), (n,), np.float32)
    fac = carray(buffer_data(rets[3]), (3, n), np.float32)
    sq_out = carray(buffer_data(rets[4]), (1,), np.float32)
    if skipped(g, carray(buffer_data(args[5]), (1,), np.int32)[0]):
        sq_out[0] = np.float32(-1.0)
        return as_pointer(0)
    sq = vector_step(g, p, m, v, fac, net, OVER_GRAD, 1.0, 0.0, np.empty((1, 1), np.float32))
    sq_out[0] = np.float32(sq)
    return as_pointer(0)


with kernels.no_interleave():  # the kernels' loops compile as ensure_compiled compiles them
    matrix_handler = kernels.entry_point(types.voidptr(types.voidptr))(_matrix)
    conv_handler = kernels.entry_point(types.voidptr(types.voidptr))(_conv)
    vector_handler = kernels.entry_point(types.voidptr(types.voidptr))(_vector)
