"""Fused CPU kernels for the rule on float32 matrices, vectors and conv kernels (Numba), float32 or bfloat16 state.

Shared by both front ends: the PyTorch optimizer calls them on its tensors'
NumPy views, the JAX front end from inside a compiled step through an XLA
custom call (:mod:`celo2.optax.cpu_ffi`). A tensor's step is many
element-wise passes in a framework, and first-layer products too small for
BLAS; here each pass over a tensor is one compiled loop. The package has one
module per job:

* :mod:`~celo2.kernels.cpu._loops`: the loops, one pass over a tensor each;
* :mod:`~celo2.kernels.cpu._passes`: the pass sequence of each kind of tensor
  (:func:`matrix_step`, :func:`vector_step`, :func:`conv_step`), what both
  front ends call, and :func:`all_finite`;
* :mod:`~celo2.kernels.cpu._operands`: which tensors the kernels take
  (:func:`kernel_kind`), the shapes of their operands, their row blocks;
* :mod:`~celo2.kernels.cpu._storage`: how the loops read and write state,
  float32 or bfloat16 rounded stochastically (:data:`NO_KEYS`: the rounding
  keys float32 state takes);
* :mod:`~celo2.kernels.cpu._threads`: the thread pool (:func:`run_tensors`,
  :func:`run_blocks`; the thread count is the caller's);
* :mod:`~celo2.kernels.cpu._compiler`: Numba and LLVM options
  (:func:`ensure_compiled`, :func:`no_interleave`).

Compiled code is cached on disk, so only the first use after an install pays
the compile. Nothing here imports a framework.
"""

from celo2.kernels.cpu._compiler import AVAILABLE, NOALIAS, WIDE, ensure_compiled, entry_point, no_interleave
from celo2.kernels.cpu._compiler import kernel as _kernel  # noqa: F401 - tests compile a probe the kernels' way
from celo2.kernels.cpu._loops import APPLY, FACTORED_W, MOMENTUM_W, OVER_GRAD, SQUARES, WRITE
from celo2.kernels.cpu._operands import (KINDS, STATE_OPERANDS, blocks, check_operands, kernel_kind, operand_shapes,
                                         rows_first)
from celo2.kernels.cpu._storage import NO_KEYS
from celo2.kernels.cpu._passes import COLUMN_CHUNK, NONFINITE_BLOCK, all_finite
from celo2.kernels.cpu._threads import PARALLEL_MIN_ELEMENTS, THREADS_ENV, default_threads, run_blocks, run_tensors

if AVAILABLE:
    from celo2.kernels.cpu._loops import group_grad_stats, grouped, nonfinite_blocks
    from celo2.kernels.cpu._passes import blocks_jit, conv_step, matrix_step, vector_step

__all__ = [
    "AVAILABLE", "NOALIAS", "WIDE", "ensure_compiled", "entry_point", "no_interleave",
    "WRITE", "SQUARES", "APPLY", "OVER_GRAD", "MOMENTUM_W", "FACTORED_W",
    "KINDS", "STATE_OPERANDS", "kernel_kind", "rows_first", "operand_shapes", "check_operands", "blocks", "NO_KEYS",
    "COLUMN_CHUNK", "NONFINITE_BLOCK", "all_finite",
    "PARALLEL_MIN_ELEMENTS", "THREADS_ENV", "default_threads", "run_blocks", "run_tensors",
]
if AVAILABLE:
    __all__ += ["matrix_step", "vector_step", "conv_step", "blocks_jit", "group_grad_stats", "grouped",
                "nonfinite_blocks"]
