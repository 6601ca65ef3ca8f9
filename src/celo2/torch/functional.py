"""The Celo2 rule as functions on lists of tensors, like ``torch.optim.adamw.adamw``.

:func:`celo2` steps a list of parameters with their gradients and states: it
picks a backend for each tensor once (:func:`pick`), gates non-finite
gradients where the backend does not, hands each backend the list of tensors
it took, and gathers the matrices that Newton-Schulz orthogonalises: their raw
directions a wave at a time, orthogonalised together
(:func:`celo2.torch.ns.newton_schulz_many`: one chain of batched products per
shape group), then finished by their backends. :func:`tensor_step` and
:func:`apply_step` are the same on one tensor.

Backends (``backend=``), one module each under :mod:`celo2.torch.backends`:

* ``"auto"`` (default): ``"triton"`` for CUDA tensors when Triton is
  installed, ``"numba"`` for the CPU tensors the Numba kernels take, the
  chunked PyTorch path for every other tensor;
* ``"triton"``: :mod:`celo2.torch.backends.triton` (CUDA; CPU tensors under
  ``TRITON_INTERPRET=1``), the chunked path for tensors it does not take;
* ``"numba"``: :mod:`celo2.torch.backends.numba`, the chunked path for the rest;
* ``"torch"``: the chunked path (:mod:`celo2.torch.backends.torch`) everywhere;
* ``"reference"``: the formula spelled out (:mod:`celo2.torch.backends.reference`;
  every channel at full size, for checking).

The environment variable ``CELO2_CPU_KERNELS=0`` (read at import, deprecated:
use ``backend="torch"``) keeps ``"auto"`` off the Numba kernels.

State dtype: a backend steps only tensors whose accumulators are of one of
its ``state_dtypes`` (bfloat16 state with a
:class:`~celo2.torch.backends.base.StateRounding`, float32 without):
``"auto"`` skips the others, and an explicitly named backend whose own
class does not store the dtype is refused (:func:`check_backend`).

Rule variants: a theta of a rule variant other than the published one
(``theta.variant``) steps only on backends whose ``runs_variants`` is true
(the chunked path and the reference formula): ``"auto"`` skips the others,
and an explicitly named backend that runs the published rule only is refused.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import torch

from celo2.hardware import ns_dtype_name
from celo2.kernels import cpu as cpu_kernels
from celo2.rule import spec
from celo2.rule.state import STATE_KEYS, work_shape
from celo2.rule.variant import PUBLISHED, RuleVariant, require_published
from celo2.torch._nonfinite import Gate, count_skipped_many, grad_finite
from celo2.torch._state import TorchTheta
from celo2.torch.backends.base import Backend, Options, StateRounding, finish
from celo2.torch.backends import numba as numba_backend
from celo2.torch.backends import reference as reference_backend
from celo2.torch.backends import torch as chunked
from celo2.torch.backends import triton as triton_backend
from celo2.torch.ns import NS_BATCH_ELEMENTS, batch_member_limit, newton_schulz, newton_schulz_many, plan_batches, \
    resolve_ns_dtype, waves

__all__ = ["BACKENDS", "CPU_WAVE_ELEMENTS", "Gate", "USE_CPU_KERNELS", "apply_step", "candidates", "celo2",
           "check_backend", "checked_on_host", "grad_finite", "pick", "resolve", "tensor_step"]

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

_REQUESTED: dict[str, tuple[Backend, ...]] = {
    "triton": (triton_backend.BACKEND, chunked.BACKEND),
    "numba": (numba_backend.BACKEND, chunked.BACKEND),
    "torch": (chunked.BACKEND,),
    "reference": (reference_backend.BACKEND,),
}
"""Per explicit ``backend=`` value, the backends tried in order (the first that takes a tensor steps it)."""

_INSTALLED: dict[str, Callable[[], bool]] = {"triton": triton_backend.available, "numba": lambda: numba_backend.AVAILABLE}
_MISSING: dict[str, str] = {
    "triton": "backend='triton' needs Triton (pip install 'celo2[cuda]'); it is not installed",
    "numba": "backend='numba' needs Numba (pip install numba); it is not installed",
}


def check_backend(backend: str, state_dtype: torch.dtype = torch.float32, variant: RuleVariant = PUBLISHED) -> str:
    """``backend`` if it names a backend this installation can run with state of ``state_dtype``.

    Args:
        backend: One of :data:`BACKENDS`.
        state_dtype: The accumulators' dtype (``torch.float32`` or ``torch.bfloat16``).
        variant: The theta's rule variant (default the published rule).

    Returns:
        ``backend`` unchanged.

    Raises:
        ValueError: An unknown name, ``"triton"`` without Triton or ``"numba"`` without Numba, or a named
            backend that does not store ``state_dtype`` (naming both).
        celo2.rule.variant.VariantNotSupportedError: A named backend that runs the published rule only,
            with another ``variant`` (naming both).
    """
    if backend not in BACKENDS:
        raise ValueError(f"invalid backend={backend!r}: expected one of {BACKENDS}")
    if not _INSTALLED.get(backend, lambda: True)():
        raise ValueError(_MISSING[backend])
    if backend != "auto" and state_dtype not in _REQUESTED[backend][0].state_dtypes:
        stores = ", ".join(str(d).removeprefix("torch.") for d in _REQUESTED[backend][0].state_dtypes)
        able = [name for name, bs in _REQUESTED.items() if state_dtype in bs[0].state_dtypes]
        raise ValueError(f"backend={backend!r} does not support state_dtype={str(state_dtype).removeprefix('torch.')}"
                         f" (it stores {stores} state): use backend='auto' or one of {able}")
    if backend != "auto" and not _REQUESTED[backend][0].runs_variants:
        require_published(variant, f"backend={backend!r}")
    return backend


_AUTO: dict[tuple[bool, bool], tuple[Backend, ...]] = {
    (cuda, cpu_kernels_on): ((triton_backend.BACKEND,) if cuda else ()) + ((numba_backend.BACKEND,) if cpu_kernels_on
                                                                           else ()) + (chunked.BACKEND,)
    for cuda in (False, True) for cpu_kernels_on in (False, True)}
"""``backend="auto"``'s order by (CUDA tensor, :data:`USE_CPU_KERNELS`): Triton for CUDA tensors, the Numba
kernels while they are on, the chunked path last."""


def candidates(backend: str, param: torch.Tensor) -> tuple[Backend, ...]:
    """The backends tried in order for ``param`` under ``backend=`` (see the module doc).

    Args:
        backend: A value of :data:`BACKENDS`.
        param: The parameter (its device is read).

    Returns:
        The backends, the chunked path (which takes everything) last.
    """
    if backend != "auto":
        return _REQUESTED[backend]
    return _AUTO[(param.device.type == "cuda", USE_CPU_KERNELS)]


def pick(backend: str, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
         variant: RuleVariant = PUBLISHED) -> Backend:
    """The backend that steps this tensor: the first of :func:`candidates` that stores its state's dtype,
    runs the theta's rule variant and takes it.

    Args:
        backend: The requested one (see the module doc).
        state: The tensor's accumulators.
        grad: Its gradient.
        param: The parameter.
        variant: The theta's rule variant (default the published rule).

    Returns:
        A :class:`celo2.torch.backends.Backend`.
    """
    dtype = state["m"].dtype
    for b in candidates(backend, param):
        if dtype in b.state_dtypes and (b.runs_variants or variant.is_published) and b.takes(state, grad, param):
            return b
    raise AssertionError("the chunked path takes every tensor")


def resolve(backend: str, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> str:
    """The name of the backend that steps this tensor: ``"triton"``, ``"numba"``, ``"torch"`` or ``"reference"``.

    Arguments as :func:`pick`.
    """
    return pick(backend, state, grad, param).name


def checked_on_host(backend: str, param: torch.Tensor) -> bool:
    """Whether the non-finite check of ``param``'s gradient is read on the host.

    CPU tensors, outside ``torch.compile``, with the Numba kernels on, unless
    the requested backend is one that runs on devices (``"torch"``,
    ``"triton"``): the kernels read host memory anyway, so there is nothing to
    synchronise. Everywhere else a device-side flag gates the writes
    (:class:`Gate`).

    Args:
        backend: The requested ``backend=`` value.
        param: The parameter.

    Returns:
        Whether to call :func:`grad_finite` rather than open a :class:`Gate`.
    """
    device_backend = backend in ("torch", "triton")
    return param.device.type == "cpu" and not torch.compiler.is_compiling() and not device_backend \
        and USE_CPU_KERNELS


@functools.lru_cache(maxsize=16)
def _ns_dtype_name_cached(ns_dtype: str | torch.dtype) -> str:
    return ns_dtype_name(ns_dtype)


def _checked_ns_dtype(ns_dtype: str | torch.dtype) -> str:
    """:func:`celo2.hardware.ns_dtype_name`, once per hashable value (it is checked on every step)."""
    try:
        return _ns_dtype_name_cached(ns_dtype)
    except TypeError:  # unhashable: checked uncached, and refused there
        return ns_dtype_name(ns_dtype)


def _state_dtype(state: dict[str, torch.Tensor], rounding: Optional[StateRounding], where: str) -> torch.dtype:
    """The dtype of ``state``'s accumulators, checked against ``rounding`` (given exactly for bfloat16)."""
    dtype = state["m"].dtype if "m" in state else torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"{where}: accumulators of dtype {dtype}; state is float32 or bfloat16")
    if (dtype == torch.bfloat16) != (rounding is not None):
        raise ValueError(f"{where}: bfloat16 accumulators need rounding= (a StateRounding) and float32 ones take "
                         f"none; got {dtype} state with rounding={'given' if rounding is not None else None}")
    return dtype


def _selected(rounding: Optional[StateRounding], indices: Sequence[int]) -> Optional[StateRounding]:
    """The ``rounding=`` of a backend call on the tensors at ``indices`` (``None`` for float32 state)."""
    return None if rounding is None else rounding.select(indices)


def _is_held(b: Backend, param: torch.Tensor, orthogonalize: bool, variant: RuleVariant = PUBLISHED) -> bool:
    """Whether Newton-Schulz takes this tensor's raw direction whole (batched with others): never for a rule
    variant other than the published one, whose backend finishes its own directions."""
    ndim = len(work_shape(param.shape))
    return orthogonalize and ndim >= 2 and variant.is_published and b.gives_raw(ndim)


# -- one tensor ----------------------------------------------------------------------------
def tensor_step(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
                orthogonalize: bool, *, chunk_elements: Optional[int] = None, backend: str = "auto",
                ns_dtype: str | torch.dtype = torch.float32,
                rounding: Optional[StateRounding] = None) -> torch.Tensor:
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
        rounding: For bfloat16 accumulators, the tensor's rounding (lists of one); ``None`` for float32.

    Returns:
        The direction: float32, unit RMS over the last two axes, the parameter's shape.

    Raises:
        ValueError: An unknown ``backend`` or ``ns_dtype``, or ``rounding`` that does not fit the state's
            dtype (before ``state`` is written).
    """
    check_backend(backend, _state_dtype(state, rounding, "tensor_step()"), theta.variant)
    _checked_ns_dtype(ns_dtype)
    if param.numel() == 0:
        return torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    b = pick(backend, state, grad, param, theta.variant)
    options = Options(chunk_elements)
    if not _is_held(b, param, orthogonalize, theta.variant):
        return b.directions(theta, [param], [grad], [state], orthogonalize=orthogonalize, options=options,
                            rounding=rounding)[0]
    d, _ = b.raw(theta, [param], [grad], [state], skip=False, options=options, rounding=rounding)[0]
    d = newton_schulz(d, dtype=resolve_ns_dtype(ns_dtype, param.device), inplace=True)
    return finish(d).reshape(param.shape)


def apply_step(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
               orthogonalize: bool, lr: Any, weight_decay: float, *, chunk_elements: Optional[int] = None,
               workspace: Optional[chunked.Workspace] = None, backend: str = "auto",
               ns_dtype: str | torch.dtype = torch.float32, rounding: Optional[StateRounding] = None) -> None:
    """The optimizer's step on one tensor, ``p <- p (1 - lr wd) - lr * direction`` in place.

    Arguments as :func:`tensor_step`, plus ``lr`` (a float or a 0-d tensor),
    ``weight_decay`` and ``workspace`` (chunk scratch reused across tensors).
    No non-finite check here (see :func:`celo2`).
    """
    celo2([param], [grad], [state], theta=theta, lr=lr, weight_decay=weight_decay, orthogonalize=orthogonalize,
          backend=backend, ns_dtype=ns_dtype, nonfinite="propagate", chunk_elements=chunk_elements,
          workspace=workspace, rounding=rounding)


# -- many tensors ---------------------------------------------------------------------------
def celo2(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict[str, torch.Tensor]],
          *, theta: TorchTheta | Callable[[torch.device], TorchTheta], lr: Any, weight_decay: float,
          orthogonalize: bool, backend: str = "auto", ns_dtype: str | torch.dtype = "auto",
          nonfinite: str = spec.NONFINITE_DEFAULT, counters: Optional[Sequence[torch.Tensor]] = None,
          chunk_elements: Optional[int] = None, workspace: Optional[chunked.Workspace] = None,
          rounding: Optional[StateRounding] = None) -> None:
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
        rounding: With bfloat16 accumulators (every state's), how each write is rounded (lists parallel to
            ``params``); ``None`` for float32 accumulators.

    Raises:
        ValueError: An unknown ``backend``, ``ns_dtype`` or ``nonfinite``, a backend that does not store
            the state's dtype, accumulators of mixed or other dtypes, ``rounding`` given for float32 state
            or missing for bfloat16, or ``counters`` missing under ``"skip"``; raised before anything is
            written.
    """
    live = [st for p, st in zip(params, states) if p.numel()]
    dtypes = {st["m"].dtype for st in live}
    if len(dtypes) > 1:
        raise ValueError(f"celo2(): the states' accumulators mix dtypes {sorted(map(str, dtypes))}: one call "
                         f"steps one state dtype")
    theta_of = theta if callable(theta) else (lambda device: theta)
    variant = theta_of(params[0].device).variant if params else PUBLISHED
    check_backend(backend, _state_dtype(live[0], rounding, "celo2()") if live else torch.float32, variant)
    spec.check_nonfinite_policy(nonfinite)
    _checked_ns_dtype(ns_dtype)
    skip = nonfinite == "skip"
    if skip and counters is None:
        raise ValueError("celo2(): nonfinite='skip' needs counters (one 0-d integer tensor per parameter)")
    apply = (lr, weight_decay)
    options = Options(chunk_elements, None if torch.compiler.is_compiling() else workspace)
    stepped: dict[tuple[Backend, torch.device], list[int]] = {}  # stepped whole by their backend
    held: list[tuple[int, Backend]] = []  # raw directions that Newton-Schulz takes whole
    gates: list[Gate] = []
    for i, (p, g, st) in enumerate(zip(params, grads, states)):
        if p.numel() == 0:
            continue
        b = pick(backend, st, g, p, variant)
        if skip and not b.gates_nonfinite:
            if checked_on_host(backend, p):
                if not grad_finite(g):
                    counters[i].add_(1)
                    continue
            else:
                gates.append(Gate(p, [st[k] for k in STATE_KEYS], counters[i]))
        if _is_held(b, p, orthogonalize, variant):
            held.append((i, b))
        else:
            stepped.setdefault((b, p.device), []).append(i)
    for (b, device), idx in stepped.items():
        oks = b.apply(theta_of(device), [params[i] for i in idx], [grads[i] for i in idx],
                      [states[i] for i in idx], orthogonalize=orthogonalize, apply=apply, skip=skip,
                      options=options, rounding=_selected(rounding, idx))
        if skip and b.gates_nonfinite:
            count_skipped_many([counters[i] for i in idx], oks)
    if held:
        _held_steps(held, params, grads, states, theta_of, apply, ns_dtype, skip, counters, options, rounding)
    for gate in gates:
        gate.close()


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


def _by_backend(members: Sequence[tuple[int, Backend]]) -> dict[Backend, list[int]]:
    """The members' indices grouped by backend, each group in order."""
    groups: dict[Backend, list[int]] = {}
    for i, b in members:
        groups.setdefault(b, []).append(i)
    return groups


def _held_steps(held, params, grads, states, theta_of, apply, ns_dtype, skip, counters,  # noqa: ANN001
                options, rounding) -> None:  # noqa: ANN001
    """Raw directions a wave at a time (:func:`_wave_elements`; each backend given the wave's tensors it
    steps), Newton-Schulz on each batch of the wave (:func:`~celo2.torch.ns.plan_batches`, per device and
    dtype), then each tensor finished by its backend."""
    by_device: dict[torch.device, list[tuple[int, Backend]]] = {}
    for i, b in held:
        by_device.setdefault(params[i].device, []).append((i, b))
    for device, items in by_device.items():
        dtype = resolve_ns_dtype(ns_dtype, device)
        limit = batch_member_limit(device)
        batches = plan_batches([work_shape(params[i].shape) for i, _ in items], max_member=limit)
        theta = theta_of(device)
        for wave in waves(batches, _wave_elements(device, batches)):
            members = [[items[j] for j in batch.members] for batch in wave]
            dirs: dict[int, torch.Tensor] = {}
            oks: dict[int, Optional[torch.Tensor]] = {}
            for b, idx in _by_backend([m for batch in members for m in batch]).items():
                raws = b.raw(theta, [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx],
                             skip=skip, options=options, rounding=_selected(rounding, idx))
                for i, (d, ok) in zip(idx, raws):
                    dirs[i], oks[i] = d, ok
            for batch_members in members:
                outs = newton_schulz_many([dirs.pop(i) for i, _ in batch_members], dtype=dtype, inplace=True,
                                          max_member=limit)
                done = dict(zip((i for i, _ in batch_members), outs))
                for b, idx in _by_backend(batch_members).items():
                    b.apply_held([params[i] for i in idx], [done[i] for i in idx], [oks[i] for i in idx], apply)
                    if skip and b.gates_nonfinite:
                        count_skipped_many([counters[i] for i in idx], [oks[i] for i in idx])
