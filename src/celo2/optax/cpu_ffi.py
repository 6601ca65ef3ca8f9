"""The JAX front end's CPU fast path: a tensor's step as one XLA custom call.

XLA:CPU compiles the rule's fused elementwise loop (:func:`celo2.optax.rule.
tensor_step`) without FMAs and at 256 bits; on the CPU measured it ran about
3x slower than the Numba kernels the PyTorch front end uses
(:mod:`celo2.kernels.cpu`), and conv kernels about 5x. So on CPU the step of a
float32 vector, matrix or conv kernel goes through XLA's typed FFI into those
same kernels: one call does the accumulators (in place, through
``input_output_aliases``; with donated state there is no copy), the factored
statistics (conv kernels: their sums in a call of their own, the rest by
XLA, it is small) and the raw direction, and XLA does the rest (the output
RMS, Newton-Schulz for Celo2, learning rate and weight decay). The direction is written over the gradient
(aliased too), each row once the kernel has read it: inside a training step,
where the gradient is an intermediate, the step needs no buffer for it; a
gradient the caller still holds (an eager call, a jitted update without
donation) is copied first by XLA, so it is never changed.

The handlers are Numba C callbacks (``numba.cfunc``) that read XLA's C call frame
(``xla/ffi/api/c_api.h``: ``XLA_FFI_CallFrame``, ``XLA_FFI_Buffer``, the
metadata extension); they are compiled on first use and cached on disk. XLA
runs independent custom calls on its own threads, so a model's tensors spread
over the cores. Not differentiable and not batched natively (under ``vmap``
it loops): :func:`celo2.optax.scale_by_celo2` uses it only for a fixed theta,
and ``cpu_kernels=False`` turns it off. The call needs each tensor whole on
one device, so a tensor that may be split across devices takes XLA's
formulation instead, which the partitioner splits like the parameter (decided
at trace time: :func:`celo2.optax.rule.may_be_split`).
"""

from __future__ import annotations

import re
import sys
import threading
import warnings

import jax
import jax.numpy as jnp

from celo2.kernels import cpu as kernels
from celo2.rule import layout, spec

TARGET = "celo2_matrix_step"
CONV_TARGET = "celo2_conv_step"
VECTOR_TARGET = "celo2_vector_step"
CONV_STATS_TARGET = "celo2_conv_stats"
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


def pack_theta(theta) -> jax.Array:  # noqa: ANN001
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
    """Which custom call a tensor takes: ``"vector"`` (float32, 0-D or 1-D),
    ``"matrix"`` (float32, 2-D),
    ``"conv"`` (float32, 4-D, factored over its two leading axes, both longer
    than 1: the shapes the PyTorch front end's conv kernel takes), or ``None``
    (XLA's formulation)."""
    if not AVAILABLE or not all(jnp.dtype(d) == jnp.float32 for d in dtypes):
        return None
    return kernels.kernel_kind(shape)


def matrix_step(net: jax.Array, state, grad: jax.Array, param: jax.Array, skip: bool = False):  # noqa: ANN001, ANN201
    """One float32 matrix through the kernels: ``(raw direction, sum of its
    squares, new state)``. ``grad`` is unclipped (the kernels clip it);
    ``state`` is a :class:`celo2.optax.rule.TensorState` and is updated in
    place when XLA may reuse its buffers. ``skip``: policy ``"skip"``, checked
    inside the call (a check in XLA would read the gradient beside the call
    that writes over it, and XLA would copy it): on a NaN or +-inf gradient
    the direction is zero, the state unchanged and the sum of squares -1."""
    from celo2.optax.rule import TensorState

    ensure_registered()
    R, C = grad.shape
    d1, d0 = spec.factored_dims((R, C))
    _check("matrix", grad, {"param": param, "m": state.m, "v": state.v, "fac_r": state.fac_r, "fac_c": state.fac_c})
    f32 = jnp.float32
    shapes = [jax.ShapeDtypeStruct(grad.shape, f32)] + [jax.ShapeDtypeStruct(x.shape, f32) for x in state]
    shapes.append(jax.ShapeDtypeStruct((1,), f32))
    call = jax.ffi.ffi_call(TARGET, shapes, input_output_aliases={0: 0, 2: 1, 3: 2, 4: 3, 5: 4},
                            vmap_method="sequential")
    d, m, v, fac_r, fac_c, sq = call(grad, param, *state, jnp.asarray([d0, int(skip)], jnp.int32), net)
    return d, sq[0], TensorState(m, v, fac_r, fac_c)


def vector_step(net: jax.Array, state, grad: jax.Array, param: jax.Array, skip: bool = False):  # noqa: ANN001, ANN201
    """A float32 vector ``(n,)`` through the kernels: ``(raw direction, sum of
    its squares, new state)``, like :func:`matrix_step` (``skip`` too)."""
    from celo2.optax.rule import TensorState

    ensure_registered()
    (n,) = grad.shape
    _check("vector", grad, {"param": param, "m": state.m, "v": state.v, "fac_r": state.fac_r})
    f32 = jnp.float32
    shapes = [jax.ShapeDtypeStruct((n,), f32), jax.ShapeDtypeStruct((3, n), f32), jax.ShapeDtypeStruct((n,), f32),
              jax.ShapeDtypeStruct((3, n), f32), jax.ShapeDtypeStruct((1,), f32)]
    call = jax.ffi.ffi_call(VECTOR_TARGET, shapes, input_output_aliases={0: 0, 2: 1, 3: 2, 4: 3},
                            vmap_method="sequential")
    d, m, v, fac, sq = call(grad, param, state.m, state.v, state.fac_r, jnp.asarray([int(skip)], jnp.int32), net)
    return d, sq[0], TensorState(m, v, fac, state.fac_c)


def conv_step(net: jax.Array, m: jax.Array, v: jax.Array, grad: jax.Array, param: jax.Array, rf: jax.Array,
              cf: jax.Array, term_r: jax.Array, term_c: jax.Array, ok: jax.Array | None = None):  # noqa: ANN201
    """The per-element work of a conv kernel ``(O, I, kh, kw)``, seen by the
    kernel as ``(O, I, G)`` (``G`` = kh kw, the same memory): fold ``grad``
    into ``m`` (3, O, I, kh, kw) and ``v`` (in place when XLA may reuse them)
    and return ``(raw direction, m, v)``; each (o, i) window's channels are
    normalised over its ``G`` elements. ``rf`` (3, O, G) / ``cf`` (3, I, G):
    Adafactor factors; ``term_r`` (8, O, G, with ``b0``) / ``term_c`` (8, I,
    G): the rank-1 channels' share of the first layer. The tensors keep their
    own 4-D shapes here: a reshaped operand that aliases a result made XLA
    copy the state in and out of every call. ``ok`` (a bool scalar, default
    true): false for a tensor skipped under policy ``"skip"``, which gets a
    zero direction and keeps ``m`` and ``v``."""
    ensure_registered()
    _check("conv", grad, {"param": param, "m": m, "v": v, "rf": rf, "cf": cf, "term_r": term_r, "term_c": term_c})
    f32 = jnp.float32
    shapes = [jax.ShapeDtypeStruct(grad.shape, f32), jax.ShapeDtypeStruct(m.shape, f32),
              jax.ShapeDtypeStruct(v.shape, f32)]
    call = jax.ffi.ffi_call(CONV_TARGET, shapes, input_output_aliases={0: 0, 2: 1, 3: 2}, vmap_method="sequential")
    flag = jnp.ones((1,), jnp.int32) if ok is None else jnp.asarray(ok, jnp.int32).reshape(1)
    return call(grad, param, m, v, rf, cf, term_r, term_c, flag, net)


def conv_stats(grad: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A float32 conv kernel's gradient ``(O, I, kh, kw)``: ``(grad, sums of
    clip(g)^2 over I (O, kh, kw), over O (I, kh, kw))``, in one pass of the
    kernels (XLA would hold ``g^2`` whole to reduce it along two axes). The
    gradient comes back unchanged in its own buffer (aliased): handing that
    to :func:`conv_step` leaves the gradient a single reader before the call
    that writes over it, so XLA need not copy it."""
    ensure_registered()
    O, I, kh, kw = grad.shape  # noqa: E741
    _check("conv", grad, {})
    f32 = jnp.float32
    shapes = [jax.ShapeDtypeStruct(grad.shape, f32), jax.ShapeDtypeStruct((O, kh, kw), f32),
              jax.ShapeDtypeStruct((I, kh, kw), f32)]
    call = jax.ffi.ffi_call(CONV_STATS_TARGET, shapes, input_output_aliases={0: 0}, vmap_method="sequential")
    return call(grad)


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
                                  (VECTOR_TARGET, _cpu_ffi_handler.vector_handler),
                                  (CONV_STATS_TARGET, _cpu_ffi_handler.conv_stats_handler)):
                jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler.address), platform="cpu")
            _REGISTERED = True
