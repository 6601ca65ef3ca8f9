"""The JAX front end's CPU fast path: a tensor's step as one XLA custom call.

XLA:CPU compiles the rule's fused elementwise loop (:mod:`celo2.optax._xla`)
without FMAs and at 256 bits, well behind the Numba kernels the PyTorch front
end uses (:mod:`celo2.kernels.cpu`). So on CPU the step of a float32 vector,
matrix or conv kernel goes through XLA's typed FFI into those same kernels'
pass sequences (:func:`celo2.kernels.cpu.matrix_step`,
:func:`~celo2.kernels.cpu.vector_step`, :func:`~celo2.kernels.cpu.conv_step`):
one call does the factored statistics, the accumulators (in place, through
``input_output_aliases``; with donated state there is no copy) and the raw
direction, and XLA does the rest (the output RMS, Newton-Schulz for Celo2,
learning rate and weight decay). The direction is written over the gradient
(aliased too), each row once the kernel has read it: inside a training step,
where the gradient is an intermediate, the step needs no buffer for it; a
gradient the caller still holds (an eager call, a jitted update without
donation) is copied first by XLA, so it is never changed.

The handlers (:mod:`celo2.optax._cpu_ffi_handler`) are Numba C callbacks
(``numba.cfunc``) that read XLA's C call frame (``xla/ffi/api/c_api.h``:
``XLA_FFI_CallFrame``, ``XLA_FFI_Buffer``, the metadata extension); they are
compiled on first use and cached on disk. XLA runs independent custom calls
on its own threads, so a model's tensors spread over the cores. Not
differentiable and not batched natively (under ``vmap`` it loops):
:func:`celo2.optax.scale_by_celo2` uses it only for a fixed theta, and
``cpu_kernels=False`` turns it off. The call needs each tensor whole on one
device, so a tensor that may be split across devices takes XLA's formulation
instead (:func:`celo2.optax.state.may_be_split`). The call is float32 only:
bfloat16 state (:mod:`celo2.optax.rounding`) is widened to float32 before it
and the new state rounded after it in XLA, which stores the bits a rounding
inside the kernels would store (the rounding is a function of the float32
value and the counter alone).
"""

from __future__ import annotations

import re
import sys
import threading
import warnings

import jax
import jax.numpy as jnp

from celo2.kernels import cpu as kernels
from celo2.optax.state import TensorState, ThetaTree
from celo2.rule import layout

TARGET = "celo2_matrix_step"
CONV_TARGET = "celo2_conv_step"
VECTOR_TARGET = "celo2_vector_step"
"""The custom-call target names registered with XLA for the CPU platform."""

#: The jax and jaxlib versions, ``[low, high)``, whose XLA FFI call frames the handlers
#: (:mod:`celo2.optax._cpu_ffi_handler`) read by word offset: the versions the test suite runs on.
#: Outside this range the handlers are not used and XLA's formulation runs instead, with a warning.
SUPPORTED_JAX = ((0, 10, 2), (0, 11, 0))


def _release(version: str) -> tuple[int, ...]:
    """``"0.10.2"`` / ``"0.10.2.dev20260101"`` / ``"0.11.0rc1"`` -> its numeric release ``(0, 10, 2)``."""
    parts = []
    for piece in version.split(".")[:3]:
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts)


def supported_versions(jax_version: str, jaxlib_version: str) -> bool:
    """Whether both versions lie in :data:`SUPPORTED_JAX`.

    Args:
        jax_version: ``jax.__version__``.
        jaxlib_version: ``jaxlib.__version__``.

    Returns:
        ``True`` when the handlers' reading of XLA's call frames is tested for this pair.
    """
    low, high = SUPPORTED_JAX
    return all(low <= _release(v) < high for v in (jax_version, jaxlib_version))


def _jaxlib_version() -> str:
    try:
        import jaxlib

        return str(jaxlib.__version__)
    except (ImportError, AttributeError):
        return "unknown"


VERSIONS_SUPPORTED = supported_versions(jax.__version__, _jaxlib_version())
"""Whether the installed jax and jaxlib are in :data:`SUPPORTED_JAX`."""

AVAILABLE = (kernels.AVAILABLE and hasattr(jax, "ffi") and sys.maxsize > 2**32 and sys.byteorder == "little"
             and VERSIONS_SUPPORTED)
"""Whether this fast path can run: Numba installed, a JAX with ``jax.ffi`` in
:data:`SUPPORTED_JAX`, and a 64-bit little-endian process (the handlers read
XLA's structs by word)."""

_WARNED = False


def unavailable_reason() -> str:
    """Why :data:`AVAILABLE` is false, for messages (``""`` when it is true)."""
    if AVAILABLE:
        return ""
    if not VERSIONS_SUPPORTED:
        low, high = (".".join(map(str, v)) for v in SUPPORTED_JAX)
        return (f"cannot run: jax {jax.__version__} / jaxlib {_jaxlib_version()} is outside the range the CPU "
                f"kernels' XLA FFI handler supports (>={low}, <{high})")
    return "needs Numba (pip install numba, or celo2[jax]) and a 64-bit JAX with jax.ffi"


def warn_unsupported_once() -> None:
    """Warn, once per process, that an unsupported jax/jaxlib makes the CPU step fall back to XLA."""
    global _WARNED
    if _WARNED or VERSIONS_SUPPORTED or not kernels.AVAILABLE:
        return
    _WARNED = True
    warnings.warn(f"celo2: the CPU kernels {unavailable_reason()}; the optax CPU step uses XLA's formulation instead "
                  "(same numbers, slower). Pass cpu_kernels=False to silence this.", RuntimeWarning, stacklevel=3)


NET_SIZE = layout.NET_SIZE
"""Length of the packed network operand (:data:`celo2.rule.layout.PACKED`)."""

_LOCK = threading.Lock()
_REGISTERED = False


def pack_theta(theta: ThetaTree) -> jax.Array:
    """The weights the kernels read, as one float32 vector in :data:`celo2.rule.layout.PACKED`
    order: :func:`celo2.rule.layout.pack_theta` for a theta that may be traced (PES
    perturbs it inside ``jit``), so in ``jnp``.

    Args:
        theta: Theta key -> array (``w0__0`` ... ``b2``), concrete or traced.

    Returns:
        A ``(NET_SIZE,)`` float32 array.
    """
    return layout.pack_theta(theta, xp=jnp)


def kind(shape: tuple[int, ...], *dtypes) -> str | None:  # noqa: ANN002
    """Which custom call a tensor takes.

    Args:
        shape: The parameter's shape.
        dtypes: The dtypes of its parameter and gradient.

    Returns:
        ``"vector"`` (float32, 0-D or 1-D), ``"matrix"`` (float32, 2-D),
        ``"conv"`` (float32, 4-D, factored over its two leading axes, both
        longer than 1: :func:`celo2.kernels.cpu.kernel_kind`), or ``None``
        (XLA's formulation).
    """
    if not AVAILABLE or not all(jnp.dtype(d) == jnp.float32 for d in dtypes):
        return None
    return kernels.kernel_kind(shape)


def _step_call(target: str, grad: jax.Array, param: jax.Array, state: "tuple[jax.Array, ...]", flags: list[int],
               net: jax.Array) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
    """One tensor's pass sequence as one custom call: operands ``grad, param,
    *state, flags (int32), net``; results ``direction, *state, sum of
    squares`` with the direction in the gradient's buffer and the state in
    its own (``input_output_aliases``)."""
    f32 = jnp.float32
    results = [jax.ShapeDtypeStruct(grad.shape, f32)] + [jax.ShapeDtypeStruct(x.shape, f32) for x in state]
    results.append(jax.ShapeDtypeStruct((1,), f32))
    aliases = {0: 0, **{2 + i: 1 + i for i in range(len(state))}}
    call = jax.ffi.ffi_call(target, results, input_output_aliases=aliases, vmap_method="sequential")
    d, *new_state, sq = call(grad, param, *state, jnp.asarray(flags, jnp.int32), net)
    return d, sq[0], new_state


def matrix_step(net: jax.Array, state: TensorState, grad: jax.Array, param: jax.Array, skip: bool = False,
                ) -> tuple[jax.Array, jax.Array, TensorState]:
    """One float32 matrix through :func:`celo2.kernels.cpu.matrix_step`.

    ``grad`` is unclipped (the kernels clip it); ``state`` is updated in
    place when XLA may reuse its buffers. ``skip``: policy ``"skip"``, checked
    inside the call (a check in XLA would read the gradient beside the call
    that writes over it, and XLA would copy it): on a NaN or +-inf gradient
    the direction is zero, the state unchanged and the sum of squares -1.

    Args:
        net: The packed weights (:func:`pack_theta`).
        state: The tensor's accumulators.
        grad: Its gradient ``(R, C)``.
        param: The parameter ``(R, C)``.
        skip: Policy ``"skip"``.

    Returns:
        ``(raw direction, sum of its squares, new state)``.
    """
    ensure_registered()
    _check("matrix", grad, {"param": param, **state._asdict()})
    d, sq, new = _step_call(TARGET, grad, param, state, [int(kernels.rows_first(grad.shape)), int(skip)], net)
    return d, sq, TensorState(*new)


def vector_step(net: jax.Array, state: TensorState, grad: jax.Array, param: jax.Array, skip: bool = False,
                ) -> tuple[jax.Array, jax.Array, TensorState]:
    """A float32 vector ``(n,)`` through :func:`celo2.kernels.cpu.vector_step`, like :func:`matrix_step`.

    Args:
        net: The packed weights.
        state: The tensor's accumulators (``fac_c`` empty, passed through).
        grad: Its gradient ``(n,)``.
        param: The parameter ``(n,)``.
        skip: Policy ``"skip"``.

    Returns:
        ``(raw direction, sum of its squares, new state)``.
    """
    ensure_registered()
    _check("vector", grad, {"param": param, "m": state.m, "v": state.v, "fac_r": state.fac_r})
    d, sq, new = _step_call(VECTOR_TARGET, grad, param, (state.m, state.v, state.fac_r), [int(skip)], net)
    return d, sq, TensorState(*new, state.fac_c)


def conv_step(net: jax.Array, state: TensorState, grad: jax.Array, param: jax.Array, skip: bool = False,
              ) -> tuple[jax.Array, jax.Array, TensorState]:
    """A float32 conv kernel ``(O, I, kh, kw)`` through :func:`celo2.kernels.cpu.conv_step`.

    The kernels view it as ``(O, I, G)`` (``G = kh kw``, the same memory) and
    normalise each (o, i) window's channels over its ``G`` elements; the
    raw direction comes back for Newton-Schulz and the output RMS per window.
    The tensors keep their own 4-D shapes here: a reshaped operand that
    aliases a result made XLA copy the state in and out of every call.

    Args:
        net: The packed weights.
        state: The tensor's accumulators.
        grad: Its gradient ``(O, I, kh, kw)``.
        param: The parameter.
        skip: Policy ``"skip"``, as in :func:`matrix_step`.

    Returns:
        ``(raw direction, 0 or -1 for a skipped tensor, new state)``.
    """
    ensure_registered()
    _check("conv", grad, {"param": param, **state._asdict()})
    d, flag, new = _step_call(CONV_TARGET, grad, param, state, [int(kernels.rows_first(grad.shape)), int(skip)], net)
    return d, flag, TensorState(*new)


def _check(kind: str, grad: jax.Array, arrays: dict) -> None:
    """The kernels index raw memory: the gradient and every operand must have
    exactly the shape and dtype they assume (:func:`celo2.kernels.cpu.
    operand_shapes`); a mismatched state raises here, at trace time."""
    kernels.check_operands(kind, tuple(grad.shape), {"grad": grad, **arrays}, contiguous=False)


def ensure_registered() -> None:
    """Compile the handler (or load it from Numba's cache) and register it with XLA, once."""
    global _REGISTERED
    if _REGISTERED:
        return
    if not AVAILABLE:
        raise RuntimeError(f"the CPU kernels {unavailable_reason()}")
    with _LOCK:
        if not _REGISTERED:
            from celo2.optax import _cpu_ffi_handler  # compiles, or loads from Numba's cache

            for name, handler in ((TARGET, _cpu_ffi_handler.matrix_handler),
                                  (CONV_TARGET, _cpu_ffi_handler.conv_handler),
                                  (VECTOR_TARGET, _cpu_ffi_handler.vector_handler)):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.address), platform="cpu")
            _REGISTERED = True
