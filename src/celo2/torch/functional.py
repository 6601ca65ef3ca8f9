"""The Celo2 rule as functions on lists of tensors, like ``torch.optim.adamw.adamw``.

:func:`celo2` steps a list of parameters with their gradients and states:
each tensor goes to a backend, the matrices that Newton-Schulz orthogonalises
have their raw directions computed a batch at a time and orthogonalised
together (:func:`celo2.torch.ns.newton_schulz_many`: one chain of batched
products per shape group), then finished. :func:`tensor_step` and
:func:`apply_step` are the same on one tensor.

Backends (``backend=``):

* ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton is
  installed, ``"numba"`` for the CPU tensors the Numba kernels take, the
  chunked PyTorch path for every other tensor;
* ``"triton"``: :mod:`celo2.torch._triton` (CUDA; CPU tensors under
  ``TRITON_INTERPRET=1``), the chunked path for tensors it does not take;
* ``"numba"``: :mod:`celo2.torch._numba`, the chunked path for the rest;
* ``"torch"``: the chunked path (:mod:`celo2.torch._chunked`) everywhere;
* ``"reference"``: the formula spelled out (:mod:`celo2.torch._reference`;
  about 30x the tensor in memory, for checking).

The environment variable ``CELO2_CPU_KERNELS=0`` (read at import, deprecated:
use ``backend="torch"``) keeps ``"auto"`` off the Numba kernels.
"""

from __future__ import annotations

import os
import warnings
from functools import partial
from typing import Any, Callable, Optional, Sequence

import torch

from celo2.kernels import cpu as cpu_kernels
from celo2.rule import spec
from celo2.torch import _chunked, _numba, _reference, _triton
from celo2.torch._state import TorchTheta, work_shape
from celo2.torch.ns import NS_BATCH_ELEMENTS, batch_member_limit, newton_schulz, newton_schulz_many, plan_batches, resolve_ns_dtype

BACKENDS: tuple[str, ...] = ("auto", "triton", "numba", "torch", "reference")
"""Values of ``backend=``."""

_ENV = "CELO2_CPU_KERNELS"


def _env_cpu_kernels() -> bool:
    """The deprecated ``CELO2_CPU_KERNELS`` variable: ``False`` when set to ``0``."""
    value = os.environ.get(_ENV)
    if value is None:
        return True
    warnings.warn(f"{_ENV} is deprecated and will be removed in the next release: pass backend='torch' (or "
                  f"backend='numba') to Celo2 / Celo2Base instead", FutureWarning, stacklevel=3)
    return value != "0"


USE_CPU_KERNELS: bool = cpu_kernels.AVAILABLE and _env_cpu_kernels()
"""Whether ``backend="auto"`` gives CPU tensors to the Numba kernels (Numba installed
and ``CELO2_CPU_KERNELS`` not ``0``); deprecated, like the variable."""


def check_backend(backend: str) -> str:
    """``backend`` if it names a backend this installation can run.

    Args:
        backend: One of :data:`BACKENDS`.

    Returns:
        ``backend`` unchanged.

    Raises:
        ValueError: An unknown name, ``"triton"`` without Triton or ``"numba"`` without Numba.
    """
    if backend not in BACKENDS:
        raise ValueError(f"invalid backend={backend!r}: expected one of {BACKENDS}")
    if backend == "triton" and not _triton.available():
        raise ValueError("backend='triton' needs Triton (pip install 'celo2[cuda]'); it is not installed")
    if backend == "numba" and not _numba.AVAILABLE:
        raise ValueError("backend='numba' needs Numba (pip install numba); it is not installed")
    return backend


def resolve(backend: str, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> str:
    """The backend that steps this tensor: ``"triton"``, ``"numba"``, ``"torch"`` or ``"reference"``.

    Args:
        backend: The requested one (see the module doc).
        state: The tensor's accumulators.
        grad: Its gradient.
        param: The parameter.

    Returns:
        The backend, after the fall-backs of the module doc.
    """
    if backend == "reference":
        return "reference"
    if backend in ("auto", "triton") and (backend == "triton" or param.device.type == "cuda") \
            and _triton.supports(param):
        return "triton"
    if backend in ("auto", "numba") and (backend == "numba" or USE_CPU_KERNELS) \
            and _numba.kind(state, grad, param) is not None:
        return "numba"
    return "torch"


def checked_on_host(backend: str, param: torch.Tensor) -> bool:
    """Whether the non-finite check of ``param``'s gradient is read on the host.

    CPU tensors, outside ``torch.compile``, unless the PyTorch path or Triton
    was asked for (or the Numba kernels are off): the kernels read host memory
    anyway, so there is nothing to synchronise. Everywhere else a device-side
    flag gates the writes (:class:`Gate`).
    """
    return (param.device.type == "cpu" and not torch.compiler.is_compiling() and backend not in ("torch", "triton")
            and USE_CPU_KERNELS)


def grad_finite(g: torch.Tensor) -> bool:
    """Host check of a CPU gradient: no NaN or +-inf element."""
    if cpu_kernels.AVAILABLE and g.dtype == torch.float32 and g.is_contiguous():
        return cpu_kernels.all_finite(g.detach().numpy())
    return bool(torch.isfinite(g).all())


class Gate:
    """The device-side non-finite guard of one tensor: ``ok`` (no NaN or
    +-inf in its gradient) is computed where the gradient lives, the tensor
    and its state are copied, and :meth:`close` puts the copies back where
    ``ok`` is false (``torch.where``: bitwise either way, no host
    synchronisation) and counts the skipped step.

    Args:
        p: The parameter (its ``grad`` is checked unless ``ok`` is given).
        state: The tensors to restore with it.
        counter: The 0-d integer counter of skipped steps.
        ok: The flag, when it is computed elsewhere (a sharded tensor's, reduced over its shards).
    """

    def __init__(self, p: torch.Tensor, state: list[torch.Tensor], counter: torch.Tensor,
                 ok: Optional[torch.Tensor] = None) -> None:
        self.ok = torch.isfinite(p.grad).all() if ok is None else ok.to(torch.bool)
        self.tensors = [p.detach(), *state]
        self.saved = [t.clone() for t in self.tensors]
        self.counter = counter

    def close(self) -> None:
        """Restore where the gradient was not finite and count the step."""
        for t, old in zip(self.tensors, self.saved):
            t.copy_(torch.where(self.ok, t, old))
        self.counter.add_(self.ok.logical_not().to(self.counter.dtype))
        self.saved = []


# -- one tensor ----------------------------------------------------------------------------
def _run(backend: str, theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
         orthogonalize: bool, apply: Optional[tuple[Any, Any]], *, raw: bool = False,
         chunk_elements: Optional[int] = None, workspace: Optional[_chunked.Workspace] = None) -> Optional[torch.Tensor]:
    """One tensor's step on a resolved backend other than Triton (see :func:`celo2.torch._chunked.run`)."""
    if backend == "reference":
        d = _reference.reference_tensor_step(theta, state, grad, param, orthogonalize)
        if apply is None:
            return d
        _chunked.apply_update(param, 0, work_shape(param.shape)[0], d.reshape(work_shape(param.shape)), apply, None)
        return None
    if backend == "numba":
        return _numba.run(theta, state, grad, param, orthogonalize, apply, raw=raw)
    return _chunked.run(theta, state, grad, param, orthogonalize, apply, raw=raw, chunk_elements=chunk_elements,
                        workspace=workspace)


def _normalised(d: torch.Tensor) -> torch.Tensor:
    """``d`` at unit RMS over its last two axes (float32, in place where it is float32)."""
    return _chunked._finish_group_normalised(d.to(torch.float32), orthogonalize=False)


def tensor_step(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
                orthogonalize: bool, *, chunk_elements: Optional[int] = None, backend: str = "auto",
                ns_dtype: str | torch.dtype = torch.float32) -> torch.Tensor:
    """One step of the rule on one tensor: update ``state`` in place and return the direction.

    Args:
        theta: The weights on the tensor's device.
        state: Its accumulators (:func:`celo2.torch.rule.init_tensor_state`).
        grad: The gradient (any float dtype, the parameter's shape).
        param: The parameter (read only).
        orthogonalize: Newton-Schulz on tensors of two or more dims.
        chunk_elements: Elements per chunk of the chunked path (tests force tiny chunks).
        backend: See the module doc (default ``"auto"``).
        ns_dtype: Newton-Schulz's dtype (default float32; ``"auto"`` as in :class:`~celo2.torch.Celo2`;
            the reference formula always multiplies in float32).

    Returns:
        The direction: float32, unit RMS over the last two axes, the parameter's shape.
    """
    if param.numel() == 0:
        return torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    b = resolve(check_backend(backend), state, grad, param)
    if b == "triton":
        d, _ = _triton.direction(theta, state, grad, param, False)
        if orthogonalize and d.ndim >= 2:
            d = newton_schulz(d, dtype=resolve_ns_dtype(ns_dtype, param.device), inplace=True)
        return _normalised(d).reshape(param.shape)
    held = orthogonalize and len(work_shape(param.shape)) == 2 and b != "reference"
    if not held:
        return _run(b, theta, state, grad, param, orthogonalize, None, chunk_elements=chunk_elements)
    d = _run(b, theta, state, grad, param, orthogonalize, None, raw=True, chunk_elements=chunk_elements)
    d = newton_schulz(d, dtype=resolve_ns_dtype(ns_dtype, param.device), inplace=True)
    return _normalised(d).reshape(param.shape)


def apply_step(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
               orthogonalize: bool, lr: Any, weight_decay: float, *, chunk_elements: Optional[int] = None,
               workspace: Optional[_chunked.Workspace] = None, backend: str = "auto",
               ns_dtype: str | torch.dtype = torch.float32) -> None:
    """The optimizer's step on one tensor, ``p <- p (1 - lr wd) - lr * direction`` in place.

    Arguments as :func:`tensor_step`, plus ``lr`` (a float or a 0-d tensor),
    ``weight_decay`` and ``workspace`` (chunk scratch reused across tensors).
    No non-finite check here (see :func:`celo2`).
    """
    celo2([param], [grad], [state], theta=theta, lr=lr, weight_decay=weight_decay, orthogonalize=orthogonalize,
          backend=backend, ns_dtype=ns_dtype, nonfinite="propagate", chunk_elements=chunk_elements,
          workspace=workspace)


# -- many tensors ---------------------------------------------------------------------------
def celo2(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict[str, torch.Tensor]],
          *, theta: TorchTheta | Callable[[torch.device], TorchTheta], lr: Any, weight_decay: float,
          orthogonalize: bool, backend: str = "auto", ns_dtype: str | torch.dtype = "auto",
          nonfinite: str = spec.NONFINITE_DEFAULT, counters: Optional[Sequence[torch.Tensor]] = None,
          chunk_elements: Optional[int] = None, workspace: Optional[_chunked.Workspace] = None) -> None:
    """The rule's step on every tensor, in place: ``p <- p (1 - lr wd) - lr * direction``.

    Args:
        params: The parameters (any float dtype, any device), updated in place.
        grads: Their gradients (the parameters' shapes).
        states: Their accumulators (:func:`celo2.torch.rule.init_tensor_state`), updated in place.
        theta: The weights, or a function giving them for a device.
        lr: Learning rate, a float or a 0-d tensor (Triton reads it on the device).
        weight_decay: Decoupled weight decay.
        orthogonalize: Newton-Schulz on the directions of tensors with two or more dims (Celo2).
        backend: See the module doc (default ``"auto"``).
        ns_dtype: Newton-Schulz's matrix products: ``"auto"`` (bfloat16 where the
            hardware multiplies it natively, see
            :func:`celo2.torch.ns.resolve_ns_dtype`), ``torch.float32`` or ``torch.bfloat16``
            (the reference backend always multiplies in float32).
        nonfinite: ``"skip"`` (default): a tensor whose gradient has a NaN or +-inf
            keeps its parameter and state bitwise unchanged and its counter goes
            up; ``"propagate"``: no check (see :data:`celo2.rule.spec.NONFINITE_POLICIES`).
        counters: Per tensor, a 0-d integer tensor counting skipped steps (needed with ``"skip"``).
        chunk_elements: Elements per chunk of the chunked path (default its own).
        workspace: Chunk scratch reused across tensors.

    Raises:
        ValueError: An unknown ``backend``, ``ns_dtype`` or ``nonfinite``, or
            ``counters`` missing under ``"skip"``; raised before anything is written.
    """
    check_backend(backend)
    spec.check_nonfinite_policy(nonfinite)
    skip = nonfinite == "skip"
    if skip and counters is None:
        raise ValueError("celo2(): nonfinite='skip' needs counters (one 0-d integer tensor per parameter)")
    theta_of = theta if callable(theta) else (lambda device: theta)
    apply = (lr, weight_decay)
    tasks: list[tuple[int, Callable[[], None]]] = []
    held: list[tuple[int, str]] = []  # tensors whose raw direction Newton-Schulz takes whole
    gates: list[Gate] = []
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        if p.numel() == 0:
            continue
        b = resolve(backend, st, g, p)
        if skip and b != "triton":
            if checked_on_host(backend, p):
                if not grad_finite(g):
                    counters[i].add_(1)
                    continue
            else:
                gates.append(Gate(p, [st[k] for k in ("m", "v", "fac_r", "fac_c")], counters[i]))
        nd = len(work_shape(p.shape))
        if orthogonalize and b != "reference" and (nd == 2 or (b == "triton" and nd >= 2)):
            held.append((i, b))
        elif b == "triton":
            ok = _triton.apply_step(theta_of(p.device), st, g, p, lr, weight_decay, skip)
            if skip:
                counters[i].add_((ok == 0).to(counters[i].dtype))
        elif b == "numba" and (nd < 2 or not orthogonalize):
            # Kernels only: whole tensors go to threads.
            tasks.append((p.numel(), partial(_numba.run, theta_of(p.device), st, g, p, orthogonalize, apply)))
        else:
            ws = None if torch.compiler.is_compiling() else workspace
            _run(b, theta_of(p.device), st, g, p, orthogonalize, apply, chunk_elements=chunk_elements, workspace=ws)
    if tasks:
        cpu_kernels.run_tensors(tasks)
    if held:
        _held_steps(held, params, grads, states, theta_of, apply, ns_dtype, skip, counters, chunk_elements, workspace)
    for gate in gates:
        gate.close()


def _waves(items: list, limit: int, numel: Callable[[Any], int] = lambda batch: batch.numel) -> list[list]:
    """Consecutive items (Newton-Schulz batches by default) gathered until they hold ``limit`` elements
    (``numel`` of each; a larger item is a wave alone)."""
    waves, cur, size = [], [], 0
    for item in items:
        if cur and size + numel(item) > limit:
            waves.append(cur)
            cur, size = [], 0
        cur.append(item)
        size += numel(item)
    return waves + ([cur] if cur else [])


def _wave_elements(device: torch.device, batches: list) -> int:  # noqa: ANN001
    """How many elements of raw directions a wave holds: on the CPU at least as many of the largest
    batch as there are threads (each thread computes whole tensors' directions) and
    :data:`CPU_WAVE_ELEMENTS`; elsewhere :data:`~celo2.torch.ns.NS_BATCH_ELEMENTS`."""
    if device.type != "cpu" or torch.compiler.is_compiling():  # traced: no Numba threads, the compiler plans
        return NS_BATCH_ELEMENTS
    return max(CPU_WAVE_ELEMENTS, torch.get_num_threads() * max(b.numel for b in batches))


CPU_WAVE_ELEMENTS: int = 1 << 22
"""The raw directions a wave of held tensors holds at least on the CPU (16 MiB): fewer waves keep
the threads busy between Newton-Schulz batches, at the cost of holding more directions at once."""


def _held_steps(held, params, grads, states, theta_of, apply, ns_dtype, skip, counters,  # noqa: ANN001
                chunk_elements, workspace) -> None:  # noqa: ANN001
    """Raw directions a wave at a time (:func:`_wave_elements`; the Numba ones spread over threads as
    whole tensors), Newton-Schulz on each batch of the wave
    (:func:`~celo2.torch.ns.plan_batches`, per device and dtype), then each tensor finished."""
    by_device: dict[torch.device, list[tuple[int, str]]] = {}
    for i, b in held:
        by_device.setdefault(params[i].device, []).append((i, b))
    for device, items in by_device.items():
        dtype = resolve_ns_dtype(ns_dtype, device)
        limit = batch_member_limit(device)
        batches = plan_batches([work_shape(params[i].shape) for i, _ in items], max_member=limit)
        for wave in _waves(batches, _wave_elements(device, batches)):
            members = [[items[j] for j in batch.members] for batch in wave]
            dirs: dict[int, torch.Tensor] = {}
            oks: dict[int, torch.Tensor] = {}
            tasks = []
            theta = theta_of(device)
            for i, b in (m for batch in members for m in batch):
                if b == "triton":
                    dirs[i], oks[i] = _triton.direction(theta, states[i], grads[i], params[i], skip)
                elif b == "numba":
                    def task(i=i) -> None:  # noqa: ANN001
                        dirs[i] = _numba.run(theta, states[i], grads[i], params[i], True, None, raw=True)
                    tasks.append((params[i].numel(), task))
                else:
                    ws = None if torch.compiler.is_compiling() else workspace
                    dirs[i] = _run(b, theta, states[i], grads[i], params[i], True, None, raw=True,
                                   chunk_elements=chunk_elements, workspace=ws)
            if tasks:
                cpu_kernels.run_tensors(tasks)
            for batch_members in members:
                outs = newton_schulz_many([dirs.pop(i) for i, _ in batch_members], dtype=dtype, inplace=True,
                                          max_member=limit)
                for (i, b), d in zip(batch_members, outs):
                    _finish_held(params[i], d, oks.get(i), apply, counters[i] if skip else None)


def _finish_held(param: torch.Tensor, d: torch.Tensor, ok: Optional[torch.Tensor], apply: tuple[Any, Any],
                 counter: Optional[torch.Tensor]) -> None:
    """``p <- p (1 - lr wd) - lr d / rms(d)`` (RMS over the last two axes) for an orthogonalised ``d``;
    with ``ok`` (Triton) only where it is 1, counting a skipped step in ``counter``."""
    if ok is not None:
        _triton.apply_held(param, d, ok, *apply)
        if counter is not None:
            counter.add_((ok == 0).to(counter.dtype))
        return
    shape = work_shape(param.shape)
    axes = tuple(range(max(0, d.ndim - 2), d.ndim))
    ms = torch.linalg.vector_norm(d, dim=axes, keepdim=True, dtype=torch.float32).square_()
    ms = ms.mul_(1.0 / (shape[-1] * shape[-2])).add_(spec.OUTPUT_NORM_EPS).rsqrt_()
    _chunked.apply_update(param, 0, shape[0], d, apply, ms)
