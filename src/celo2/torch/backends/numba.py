"""The Numba CPU kernels as a PyTorch backend (``backend="numba"``).

Float32 CPU matrices, vectors and conv kernels (4-D, factored over their two
leading axes) take the fused kernels of :mod:`celo2.kernels.cpu` on their
tensors' NumPy views: the same numbers as the chunked path, faster, with no
chunk workspace. A matrix's or a vector's whole pass sequence is one call
(:func:`celo2.kernels.cpu.matrix_step`, :func:`~celo2.kernels.cpu.vector_step`,
shared with the JAX front end's FFI handler), so whole tensors are handed to
threads (:func:`celo2.kernels.cpu.run_tensors`); Celo2-base never holds a
matrix's direction. The front end gives other tensors to the chunked path
(:meth:`NumbaBackend.takes` is false for them).
"""

from __future__ import annotations

from functools import partial
from typing import Optional, Sequence

import numpy as np
import torch

from celo2.kernels import cpu as cpu_kernels
from celo2.rule import layout
from celo2.rule.state import factoring, work_shape
from celo2.torch._state import TorchTheta
from celo2.torch.backends.base import Apply, Options, finish
from celo2.torch.backends import torch as chunked

AVAILABLE: bool = cpu_kernels.AVAILABLE
"""Whether Numba is installed (else this backend takes no tensor)."""


def kind(state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> Optional[str]:
    """Which fused CPU kernels take this tensor (``"vector"``, ``"matrix"``, ``"conv"``), or ``None``.

    They take float32, contiguous CPU tensors (state included) of a shape they
    cover (:func:`celo2.kernels.cpu.kernel_kind`), not traced by
    ``torch.compile``, whose gradient is not the parameter itself.

    Args:
        state: The tensor's accumulators.
        grad: Its gradient.
        param: The parameter.

    Returns:
        The kernel kind, or ``None`` (the kernels do not take it).
    """
    if not (AVAILABLE and param.device.type == "cpu" and not torch.compiler.is_compiling()
            and param.dtype == torch.float32 and grad.dtype == torch.float32
            and grad.is_contiguous() and param.is_contiguous() and state["m"].is_contiguous()
            and state["v"].is_contiguous() and state["fac_r"].is_contiguous() and state["fac_c"].is_contiguous()
            and grad.data_ptr() != param.data_ptr()):
        return None
    return cpu_kernels.kernel_kind(work_shape(param.shape))


def run(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
        orthogonalize: bool, apply: Optional[tuple[object, float]], *, raw: bool = False) -> Optional[torch.Tensor]:
    """One tensor's step through the kernels (``kind(...)`` must be set).

    Args:
        theta: The weights.
        state: The accumulators, updated in place.
        grad: The gradient.
        param: The parameter (non-empty).
        orthogonalize: Newton-Schulz on matrices and conv windows.
        apply: ``(lr, weight_decay)`` to update the parameter in place, or ``None``.
        raw: With ``apply=None``, return a matrix's or vector's raw direction
            (before Newton-Schulz and the output RMS).

    Returns:
        As :func:`celo2.torch.backends.torch.run`.

    Raises:
        ValueError: The state does not fit the tensor (checked before any kernel runs).
    """
    k = kind(state, grad, param)
    shape = work_shape(param.shape)
    g, p = grad.detach().reshape(shape), param.detach().reshape(shape)
    if k == "conv":
        return _conv(theta, state, g, p, param, orthogonalize, apply)
    arrays = {"grad": g.numpy(), "param": p.numpy(), "m": state["m"].numpy(), "v": state["v"].numpy(),
              "fac_r": state["fac_r"].numpy()}
    if k == "vector":
        step = cpu_kernels.vector_step
        args = (arrays["grad"], arrays["param"], arrays["m"], arrays["v"], arrays["fac_r"], theta.net_numpy())
        orthogonalize = False
    else:
        arrays["fac_c"] = state["fac_c"].numpy()
        step = cpu_kernels.matrix_step
        args = (arrays["grad"], arrays["param"], arrays["m"], arrays["v"], arrays["fac_r"], arrays["fac_c"],
                factoring(shape).d0, theta.net_numpy())
    cpu_kernels.check_operands(k, shape, arrays)
    rows, cols = (1, arrays["grad"].size) if k == "vector" else shape
    if apply is not None and not orthogonalize:
        # Celo2-base and vectors: the direction is never held (its squares first, then applied).
        lr, wd = apply
        lr = float(lr)
        full = args + (cpu_kernels.APPLY, 1.0 - lr * wd, lr, np.empty((1, 1), np.float32))
        cpu_kernels.ensure_compiled(step, full)
        step(*full)
        return None
    out = torch.empty((rows, cols), dtype=torch.float32)
    full = args + (cpu_kernels.WRITE, 1.0, 0.0, out.numpy())
    cpu_kernels.ensure_compiled(step, full)
    step(*full)
    out = out.view(shape)
    if raw:
        return out
    d = finish(out, orthogonalize=orthogonalize, param=param, apply=apply)
    return None if d is None else d.reshape(param.shape)


def _rows_cols(pair, rows_first: bool, width: int, rows: int, cols: int,  # noqa: ANN001
               *inner: int) -> tuple[np.ndarray, np.ndarray]:
    """``(row-varying, column-varying)`` NumPy views of a pair of broadcast
    tensors: the first of ``pair`` has a size-1 axis at ``d0``, the second at
    ``d1``; the first varies along the rows when ``d0`` is the column axis
    (``rows_first``). Decided by the axes, not the sizes, which tie when a
    dimension is 1."""
    r, c = pair if rows_first else pair[::-1]
    return r.reshape(width, rows, *inner).numpy(), c.reshape(width, cols, *inner).numpy()


def _conv(theta: TorchTheta, state: dict[str, torch.Tensor], g: torch.Tensor, p: torch.Tensor, param: torch.Tensor,
          orthogonalize: bool, apply: Optional[tuple[object, float]]) -> Optional[torch.Tensor]:
    """The step of one float32 CPU conv kernel (O, I, kh, kw), factored over O
    and I, normalised per (kh, kw) window: a pass for the factored
    statistics, then one fused pass per window (``grouped`` in
    :mod:`celo2.kernels.cpu`)."""
    k = cpu_kernels
    shape = tuple(g.shape)
    f = factoring(shape)
    t = chunked.ChunkedTensor(theta.layout(), state, g, p, f, 1 << 30)
    O, I = shape[:2]  # noqa: E741
    G = shape[2] * shape[3]
    k.check_operands("conv", shape, {"grad": t.g.numpy(), "param": t.p.numpy(), "m": t.m.numpy(),
                                     "v": t.v.numpy(), "fac_r": t.fac_r.numpy(), "fac_c": t.fac_c.numpy()})
    gv, pv = t.g.numpy().reshape(O, I, G), t.p.numpy().reshape(O, I, G)
    m, v = t.m.numpy().reshape(3, O, I, G), t.v.numpy().reshape(O, I, G)
    per, nblk = k.blocks(O)
    row_sum = np.empty((O, G), np.float32)
    col_part = np.empty((nblk, I, G), np.float32)
    k.run_blocks(k.group_grad_stats, nblk, t.numel, gv, per, row_sum, col_part)
    sum_over = {1: torch.from_numpy(row_sum), 0: torch.from_numpy(col_part.sum(0))}
    t.fold_factored(sum_over[f.d0], sum_over[f.d1])
    chunked.run_local(t.prepare())
    rows_first = f.d0 == 1  # the row statistic varies along O when d0 is I
    RF, CF = _rows_cols((t.rf, t.cf), rows_first, 3, O, I, G)
    TR, TC = _rows_cols(t.terms, rows_first, 8, O, I, G)
    net = layout.unpack(theta.net_numpy())
    write = orthogonalize or apply is None
    if write:
        out = torch.empty(shape, dtype=torch.float32)
        dest, decay, step = out.numpy().reshape(O, I, G), 1.0, 0.0
    else:
        lr, wd = apply
        dest, decay, step = np.empty((1, 1, 1), np.float32), 1.0 - float(lr) * wd, -float(lr)
    k.run_blocks(k.grouped, nblk, t.numel, gv, pv, m, v, k.MOMENTUM_W, RF, CF, TR, TC, net["w_el"], net["w1"],
                 net["b1"], net["w2"], net["b2"][0], k.APPLY if not write else k.WRITE, np.float32(decay),
                 np.float32(step), per, dest)
    if not write:
        return None
    d = finish(out, orthogonalize=orthogonalize, param=param, apply=apply)
    return None if d is None else d.reshape(param.shape)


class NumbaBackend:
    """The :class:`celo2.torch.backends.Backend` of the Numba CPU kernels.

    Whole tensors go to threads where no direction is held (Celo2-base, and
    vectors under Celo2), and for raw directions; Newton-Schulz takes a
    matrix's raw direction whole, a conv kernel is orthogonalised here (in
    float32).
    """

    name = "numba"
    gates_nonfinite = False

    def takes(self, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> bool:
        """Whether :func:`kind` names a kernel for this tensor."""
        return kind(state, grad, param) is not None

    def gives_raw(self, ndim: int) -> bool:
        """Matrices only."""
        return ndim == 2

    def apply(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool, apply: Apply, skip: bool,
              options: Options) -> list[Optional[torch.Tensor]]:
        """:func:`run` with ``apply`` on each tensor (see :meth:`celo2.torch.backends.Backend.apply`)."""
        tasks = []
        for p, g, st in zip(params, grads, states):
            if orthogonalize and p.ndim >= 2:
                run(theta, st, g, p, orthogonalize, apply)
            else:
                tasks.append((p.numel(), partial(run, theta, st, g, p, orthogonalize, apply)))
        if tasks:
            cpu_kernels.run_tensors(tasks)
        return [None] * len(params)

    def directions(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool,
                   options: Options) -> list[torch.Tensor]:
        """:func:`run` without ``apply`` on each tensor."""
        return [run(theta, st, g, p, orthogonalize, None) for p, g, st in zip(params, grads, states)]

    def raw(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            states: Sequence[dict[str, torch.Tensor]], *, skip: bool,
            options: Options) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Each matrix's raw direction, whole tensors spread over threads (``ok`` is ``None``)."""
        out: list = [None] * len(params)

        def task(j: int) -> None:
            out[j] = (run(theta, states[j], grads[j], params[j], True, None, raw=True), None)

        cpu_kernels.run_tensors([(p.numel(), partial(task, j)) for j, p in enumerate(params)])
        return out

    def apply_held(self, params: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
                   oks: Sequence[Optional[torch.Tensor]], apply: Apply) -> None:
        """:func:`celo2.torch.backends.finish` with ``apply`` on each."""
        for param, d in zip(params, directions):
            finish(d, param=param, apply=apply)


BACKEND = NumbaBackend()
"""The Numba CPU kernels."""
