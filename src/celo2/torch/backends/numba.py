"""The Numba CPU kernels as a PyTorch backend (``backend="numba"``).

Float32 CPU matrices, vectors and conv kernels (4-D, factored over their two
leading axes) take the fused kernels of :mod:`celo2.kernels.cpu` on their
tensors' NumPy views: the same numbers as the chunked path, faster, with no
chunk workspace. Their state is float32, or bfloat16 (handed to the kernels
as its bit patterns, ``uint16``; each step computes in float32 and stores
with the stochastic rounding of :mod:`celo2.rule.rounding`, its keys made
here from the step's :class:`~celo2.torch.backends.base.StateRounding`).
A matrix's or a vector's whole pass sequence is one call
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
from celo2.rule.rounding import SLOTS, mix32
from celo2.rule.state import STATE_KEYS, factoring, work_shape
from celo2.torch._state import TorchTheta
from celo2.torch.backends.base import Apply, Options, StateRounding, finish

AVAILABLE: bool = cpu_kernels.AVAILABLE
"""Whether Numba is installed (else this backend takes no tensor)."""


def kind(state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> Optional[str]:
    """Which fused CPU kernels take this tensor (``"vector"``, ``"matrix"``, ``"conv"``), or ``None``.

    They take float32, contiguous CPU tensors with contiguous float32 or
    bfloat16 state (all of it one dtype) of a shape they cover
    (:func:`celo2.kernels.cpu.kernel_kind`), not traced by
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
            and grad.is_contiguous() and param.is_contiguous()
            and all(state[key].is_contiguous() and state[key].dtype == state["m"].dtype for key in STATE_KEYS)
            and state["m"].dtype in NumbaBackend.state_dtypes and grad.data_ptr() != param.data_ptr()):
        return None
    return cpu_kernels.kernel_kind(work_shape(param.shape))


def state_array(t: torch.Tensor) -> np.ndarray:
    """A state tensor's memory as the kernels take it: float32, or a bfloat16 tensor's bit patterns (``uint16``)."""
    if t.dtype == torch.bfloat16:
        return t.detach().view(torch.int16).numpy().view(np.uint16)
    return t.detach().numpy()


def rounding_keys(states: Sequence[dict[str, torch.Tensor]],
                  rounding: Optional[StateRounding]) -> list[Optional[tuple[int, ...]]]:
    """Per tensor, the rounding keys of this step for the kernels, checked against the state's dtype.

    Args:
        states: The tensors' accumulators.
        rounding: How bfloat16 state is stored (``None``: the state is float32).

    Returns:
        Per tensor ``None`` (float32 state) or the keys ``(m, v, fac_r, fac_c)``
        (:func:`celo2.rule.rounding.stream_key` of the seed, the tensor's step count after this step, its
        index and each accumulator's slot; made for all tensors at once, the same composition of
        :func:`celo2.rule.rounding.mix32` on arrays, since one call per key costs more than a small
        tensor's step).

    Raises:
        ValueError: A bfloat16 state without ``rounding``, or ``rounding`` for float32 state (checked for
            every tensor before any is stepped).
    """
    if rounding is not None and len(rounding.steps) != len(states):
        raise ValueError(f"numba backend: rounding has {len(rounding.steps)} step counters for "
                         f"{len(states)} tensors")
    for j, st in enumerate(states):
        bfloat16 = st["m"].dtype == torch.bfloat16
        if bfloat16 != (rounding is not None):
            raise ValueError(f"numba backend: tensor {j} has {st['m'].dtype} state, "
                             f"{'but no rounding= was given' if bfloat16 else 'but rounding= was given'} "
                             f"(rounding= comes with bfloat16 state, and only with it)")
    if rounding is None:
        return [None] * len(states)
    mask = 0xFFFFFFFF
    steps = np.array([int(s) & mask for s in rounding.steps], dtype=np.uint64)
    tensors = np.array([int(t) & mask for t in rounding.tensors], dtype=np.uint64)
    slots = np.array([SLOTS[key] for key in STATE_KEYS], dtype=np.uint64)
    per_tensor = mix32(mix32(mix32(int(rounding.seed) & mask) ^ steps) ^ tensors)
    keys = mix32(per_tensor[:, None] ^ slots[None, :])
    return [tuple(int(k) for k in row) for row in keys]


def run(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
        orthogonalize: bool, apply: Optional[tuple[object, float]], *, raw: bool = False,
        keys: Optional[tuple[int, ...]] = None) -> Optional[torch.Tensor]:
    """One tensor's step through the kernels (``kind(...)`` must be set).

    Args:
        theta: The weights.
        state: The accumulators, updated in place.
        grad: The gradient.
        param: The parameter (non-empty).
        orthogonalize: Newton-Schulz on matrices and conv windows.
        apply: ``(lr, weight_decay)`` to update the parameter in place, or ``None``.
        raw: With ``apply=None``, return the raw direction (before Newton-Schulz and the
            output RMS).
        keys: For bfloat16 state, this step's rounding keys (:func:`rounding_keys`); ``None`` for float32.

    Returns:
        As :func:`celo2.torch.backends.torch.run`.

    Raises:
        ValueError: The state does not fit the tensor (checked before any kernel runs).
    """
    k = kind(state, grad, param)
    shape = work_shape(param.shape)
    g, p = grad.detach().reshape(shape), param.detach().reshape(shape)
    arrays = {"grad": g.numpy(), "param": p.numpy(), "m": state_array(state["m"]), "v": state_array(state["v"]),
              "fac_r": state_array(state["fac_r"])}
    if k != "vector":
        arrays["fac_c"] = state_array(state["fac_c"])
    cpu_kernels.check_operands(k, shape, arrays)  # before any view of them is taken
    if (arrays["m"].dtype == np.uint16) != (keys is not None):
        raise ValueError(f"numba backend: {arrays['m'].dtype} state (a tensor of shape {tuple(param.shape)}) "
                         f"with rounding keys {keys}: bfloat16 state needs them, float32 state takes none")
    keys = cpu_kernels.NO_KEYS if keys is None else keys
    if k == "vector":
        step = cpu_kernels.vector_step
        args = (arrays["grad"], arrays["param"], arrays["m"], arrays["v"], arrays["fac_r"], theta.net_numpy())
        orthogonalize = False
        kernel_shape = (1, arrays["grad"].size)
    else:
        args = (arrays["grad"], arrays["param"], arrays["m"], arrays["v"], arrays["fac_r"], arrays["fac_c"],
                factoring(shape).d0, theta.net_numpy())
        if k == "matrix":
            step, kernel_shape = cpu_kernels.matrix_step, shape
        else:  # a conv kernel (O, I, kh, kw), seen as (O, I, kh kw): the same memory
            step = cpu_kernels.conv_step
            O, I, G = shape[0], shape[1], shape[2] * shape[3]  # noqa: E741
            args = (args[0].reshape(O, I, G), args[1].reshape(O, I, G), args[2].reshape(3, O, I, G),
                    args[3].reshape(O, I, G), args[4].reshape(3, -1, G), args[5].reshape(3, -1, G), *args[6:])
            kernel_shape = (O, I, G)
    if apply is not None and not orthogonalize:
        # Celo2-base and vectors: the direction is never held (its squares first, then applied).
        lr, wd = apply
        lr = float(lr)
        full = args + (cpu_kernels.APPLY, 1.0 - lr * wd, lr, np.empty((1,) * len(kernel_shape), np.float32), keys)
        cpu_kernels.ensure_compiled(step, full)
        step(*full)
        return None
    out = torch.empty(kernel_shape, dtype=torch.float32)
    full = args + (cpu_kernels.WRITE, 1.0, 0.0, out.numpy(), keys)
    cpu_kernels.ensure_compiled(step, full)
    step(*full)
    out = out.view(shape)
    if raw:
        return out
    d = finish(out, orthogonalize=orthogonalize, param=param, apply=apply)
    return None if d is None else d.reshape(param.shape)


def _raw_into(box: list, theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor,
              param: torch.Tensor, keys: Optional[tuple[int, ...]]) -> None:
    """A tensor's raw direction appended to ``box`` (a task for a worker thread)."""
    box.append(run(theta, state, grad, param, True, None, raw=True, keys=keys))


class NumbaBackend:
    """The :class:`celo2.torch.backends.Backend` of the Numba CPU kernels.

    Whole tensors go to threads where no direction is held (Celo2-base, and
    vectors under Celo2), and for raw directions; Newton-Schulz takes a
    matrix's raw direction whole, a conv kernel is orthogonalised here (in
    float32).
    """

    name = "numba"
    gates_nonfinite = False
    state_dtypes = (torch.float32, torch.bfloat16)
    runs_variants = False

    def takes(self, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> bool:
        """Whether :func:`kind` names a kernel for this tensor."""
        return kind(state, grad, param) is not None

    def gives_raw(self, ndim: int) -> bool:
        """Matrices only."""
        return ndim == 2

    def apply(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool, apply: Apply, skip: bool,
              options: Options, rounding: Optional[StateRounding] = None) -> list[Optional[torch.Tensor]]:
        """:func:`run` with ``apply`` on each tensor (see :meth:`celo2.torch.backends.Backend.apply`)."""
        keys = rounding_keys(states, rounding)
        tasks = []
        held: list[tuple[torch.Tensor, list]] = []  # conv kernels under Celo2: Newton-Schulz on this thread
        for p, g, st, key in zip(params, grads, states, keys):
            if orthogonalize and p.ndim >= 2:
                box: list = []
                tasks.append((p.numel(), partial(_raw_into, box, theta, st, g, p, key)))
                held.append((p, box))
            else:
                tasks.append((p.numel(), partial(run, theta, st, g, p, orthogonalize, apply, keys=key)))
        if tasks:
            cpu_kernels.run_tensors(tasks, threads=torch.get_num_threads())
        for p, box in held:
            finish(box[0], orthogonalize=True, param=p, apply=apply)
        return [None] * len(params)

    def directions(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool,
                   options: Options, rounding: Optional[StateRounding] = None) -> list[torch.Tensor]:
        """:func:`run` without ``apply`` on each tensor."""
        keys = rounding_keys(states, rounding)
        return [run(theta, st, g, p, orthogonalize, None, keys=key)
                for p, g, st, key in zip(params, grads, states, keys)]

    def raw(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            states: Sequence[dict[str, torch.Tensor]], *, skip: bool,
            options: Options, rounding: Optional[StateRounding] = None,
            ) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Each matrix's raw direction, whole tensors spread over threads (``ok`` is ``None``)."""
        keys = rounding_keys(states, rounding)
        out: list = [None] * len(params)

        def task(j: int) -> None:
            out[j] = (run(theta, states[j], grads[j], params[j], True, None, raw=True, keys=keys[j]), None)

        cpu_kernels.run_tensors([(p.numel(), partial(task, j)) for j, p in enumerate(params)],
                                threads=torch.get_num_threads())
        return out

    def apply_held(self, params: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
                   oks: Sequence[Optional[torch.Tensor]], apply: Apply) -> None:
        """:func:`celo2.torch.backends.finish` with ``apply`` on each."""
        for param, d in zip(params, directions):
            finish(d, param=param, apply=apply)


BACKEND = NumbaBackend()
"""The Numba CPU kernels."""
