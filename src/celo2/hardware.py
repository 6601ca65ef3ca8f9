"""What the machine computes natively, for the choices the front ends make from it.

Framework-neutral: the PyTorch and JAX front ends both resolve their
``ns_dtype="auto"`` (the dtype of Newton-Schulz's matrix products) from here.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

NS_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16")
"""Names ``ns_dtype`` accepts (the front ends also take their framework's dtype objects)."""

BF16_CPU_FLAGS: frozenset[str] = frozenset({"amx_bf16", "avx512_bf16"})
"""``/proc/cpuinfo`` flags of CPUs whose matrix units multiply bfloat16 natively
(Intel AMX, AVX512-BF16): there oneDNN's bfloat16 products run on the matrix
units and outpace float32, while elsewhere bfloat16 is emulated and costs more
than float32."""


@functools.lru_cache(maxsize=None)
def cpu_multiplies_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX-BF16 or AVX512-BF16).

    Read once from the kernel's CPU flags and cached; ``False`` where they
    cannot be read (not Linux), which keeps float32.

    Args:
        cpuinfo: the file listing the CPU flags (default ``/proc/cpuinfo``).

    Returns:
        ``True`` when a ``flags`` line names one of :data:`BF16_CPU_FLAGS`.
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            return not BF16_CPU_FLAGS.isdisjoint(line.split(":", 1)[-1].split())
    return False


def ns_dtype_name(ns_dtype: object) -> str:
    """The canonical name of an ``ns_dtype`` argument.

    Args:
        ns_dtype: ``"auto"``, ``"float32"``, ``"bfloat16"`` (also ``"fp32"``,
            ``"bf16"``), or a framework dtype whose name is one of those
            (``torch.float32``, ``jnp.bfloat16``, ``np.dtype("float32")``).

    Returns:
        One of :data:`NS_DTYPES`.

    Raises:
        ValueError: ``ns_dtype`` names another dtype or nothing known.
    """
    if isinstance(ns_dtype, str):
        name = ns_dtype
    else:
        try:  # NumPy and JAX dtypes (bfloat16 through ml_dtypes)
            name = np.dtype(ns_dtype).name
        except TypeError:  # torch.float32 and the like
            name = str(ns_dtype)
    name = name.removeprefix("torch.").lower()
    name = {"fp32": "float32", "bf16": "bfloat16"}.get(name, name)
    if name not in NS_DTYPES:
        raise ValueError(f"ns_dtype={ns_dtype!r}: expected 'auto', float32 or bfloat16")
    return name


def resolve_ns_dtype_name(ns_dtype: object, platform: str) -> str:
    """``"float32"`` or ``"bfloat16"``: what ``ns_dtype`` means on a platform.

    ``"auto"`` is bfloat16 where the hardware multiplies it natively (CUDA,
    CPUs with AMX or AVX512-BF16) and float32 elsewhere; a forced dtype is
    kept.

    Args:
        ns_dtype: anything :func:`ns_dtype_name` accepts.
        platform: ``"cpu"``, ``"cuda"`` (or ``"gpu"``), or another device type
            (float32 for ``"auto"``).

    Returns:
        ``"float32"`` or ``"bfloat16"``.

    Raises:
        ValueError: ``ns_dtype`` is not a known name.
    """
    name = ns_dtype_name(ns_dtype)
    if name != "auto":
        return name
    if platform in ("cuda", "gpu"):
        return "bfloat16"
    if platform == "cpu" and cpu_multiplies_bf16():
        return "bfloat16"
    return "float32"
