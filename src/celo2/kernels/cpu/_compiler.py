"""How the CPU kernels are compiled: Numba options, LLVM options and the wide-vector pipeline.

The loops (:mod:`celo2.kernels.cpu._loops`) are compiled with :func:`kernel`,
which asks for the code that LLVM vectorises well: no division-by-zero
checks, arrays marked non-aliasing, 512-bit vectors where the CPU has them;
and under :func:`no_interleave`, which keeps the unrolled MLP in registers.
Every function compiled here (loops, pass sequences, the JAX front end's
callbacks) runs its own copy of what it calls, so a process that loads it
from Numba's disk cache computes the bits of the process that compiled it
(:func:`_bind_linked_code_locally`), and a cache entry is used only by the
sources and compile recipe that made it (:data:`RECIPE`). Nothing here knows
what the kernels compute.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

try:  # Numba is optional: without it the PyTorch path runs everywhere.
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

AVAILABLE: bool = numba is not None
"""Whether Numba is installed (else no kernel exists)."""


def _kernel_sources_fingerprint() -> str:
    """The first 16 hex digits of the SHA-256 of this package's Python sources (every ``*.py`` here)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


RECIPE: str = _kernel_sources_fingerprint()
"""What a cached kernel of celo2 was compiled from: the kernels' sources and this module's recipe.

Numba keys a disk-cache entry on the source file of the function it compiled, and nothing else. A
caller holds linked-in copies of its callees (in ``_loops``) and is compiled by the pipelines and
options defined here, so an entry stays valid in Numba's eyes after either changes, and a process
could run object code of two recipes side by side (a caller of one binding to callees of the other).
Every celo2 function's entry is therefore stamped with this fingerprint as well
(:class:`_RecipeStampedLocator`), and an entry of any other recipe is recompiled, never loaded."""

_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the celo2 package: its Numba users are all stamped


class _RecipeStampedLocator:
    """A Numba cache locator for functions defined in the celo2 package: Numba's own choice of
    locator for the file, with the source stamp extended by :data:`RECIPE`.

    Numba asks each locator class in turn (``from_function``); this one answers only for celo2's
    files, so other Numba users in the process are untouched.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def get_source_stamp(self) -> tuple:
        """Numba's stamp of the source file, and the compile recipe."""
        return (self._inner.get_source_stamp(), RECIPE)

    @classmethod
    def from_function(cls, py_func: Any, py_file: str) -> "_RecipeStampedLocator | None":
        """The stamped locator of a celo2 function (``None`` for any other)."""
        try:
            Path(os.path.abspath(py_file)).relative_to(_PACKAGE_ROOT)
        except ValueError:
            return None
        for other in _NUMBA_LOCATORS:
            inner = other.from_function(py_func, py_file)
            if inner is not None:
                return cls(inner)
        return None


def _stamp_cache_entries() -> tuple:
    """Put :class:`_RecipeStampedLocator` first among Numba's cache locators; returns the ones it
    defers to (empty, and nothing changed, if this Numba release keeps its locators elsewhere)."""
    try:
        from numba.core.caching import CacheImpl
    except ImportError:  # pragma: no cover - another Numba layout
        return ()
    locators = getattr(CacheImpl, "_locator_classes", None)
    if not isinstance(locators, list):  # pragma: no cover - another Numba layout
        return ()
    others = tuple(c for c in locators if c is not _RecipeStampedLocator)
    CacheImpl._locator_classes = [_RecipeStampedLocator, *others]
    return others


_NUMBA_LOCATORS: tuple = _stamp_cache_entries() if AVAILABLE else ()


@contextlib.contextmanager
def no_interleave() -> Iterator[None]:
    """Compile what runs inside without LLVM's loop interleaving.

    With LLVM's default of 4 interleaved copies of a vectorised loop, the
    MLP's 26 live vectors per copy spill to the stack on every element. LLVM
    options are process-wide, so the option is set under Numba's compiler
    lock and reset after; no other code is compiled with it.
    """
    import llvmlite.binding as llvm
    from numba.core.compiler_lock import global_compiler_lock

    with global_compiler_lock:
        llvm.set_option("celo2", "-force-vector-interleave=1")
        try:
            yield
        finally:
            llvm.set_option("celo2", "-force-vector-interleave=0")  # 0: LLVM's own choice again


_READY: set = set()


def ensure_compiled(kernel: Any, args: tuple) -> None:
    """Compile ``kernel`` for ``args``' types (or load it from Numba's disk
    cache) before its first call with them, under :func:`no_interleave`.

    Each set of argument types is a compilation of its own (float32 and
    bfloat16 state, say), and each is made here, never lazily by a call
    outside the option.

    Args:
        kernel: A Numba dispatcher.
        args: Arguments of the types it will be called with.
    """
    key = (kernel, tuple(_type_key(a) for a in args))
    if key in _READY:
        return
    with no_interleave():
        if key in _READY:
            return
        kernel.compile(tuple(numba.typeof(a) for a in args))
        _READY.add(key)


def _type_key(arg: Any) -> Any:
    """What Numba's type of ``arg`` depends on, cheaply (``numba.typeof`` costs tens of microseconds an
    array, on every step of every tensor)."""
    flags = getattr(arg, "flags", None)
    if flags is not None:  # a NumPy array
        return (arg.dtype.num, arg.ndim, flags.c_contiguous, flags.f_contiguous, flags.writeable, flags.aligned)
    if isinstance(arg, tuple):
        return (tuple, tuple(_type_key(x) for x in arg))
    return type(arg)


def _bind_linked_code_locally(library: Any) -> None:
    """Make the code that ``library`` links in from its callees its own: after the
    library's final module is optimised, every function it took in from another
    library (Numba links them in as ``linkonce_odr``) becomes ``internal``.

    Numba links each callee's optimised IR into its caller and optimises the
    whole module again, so the caller's copy of a loop is not the callee's own
    code (fast-math rewrites and the vectoriser's second look change it), and a
    ``linkonce_odr`` copy is a weak symbol: the JIT binds the caller's calls to
    the first definition of that name in the process. The process that compiles
    a caller has its callees' own code loaded first and runs that; a process
    that loads the caller from the disk cache has only the caller's copies and
    runs those (or another cached caller's, whichever loaded first). Bound
    locally, a caller runs its own copies in every process, and those are in
    the object code the cache holds: the same bits whether compiled or loaded.
    """
    if getattr(library, "_celo2_local", False):
        return
    import llvmlite.binding as llvm

    optimize = library._optimize_final_module

    def optimize_then_bind() -> None:
        optimize()
        for fn in library._final_module.functions:
            if not fn.is_declaration and fn.linkage == llvm.Linkage.linkonce_odr:
                fn.linkage = "internal"

    library._optimize_final_module = optimize_then_bind
    library._celo2_local = True


def _pipelines() -> "tuple[Any, Any]":
    """Numba compiler pipelines for the kernels (wide) and their callers (local): ``(wide, local)``.

    Both bind the code their functions link in locally (:func:`_bind_linked_code_locally`).
    The wide one also asks LLVM for 512-bit vectors: on CPUs with AVX-512,
    LLVM's default tuning keeps loops at 256 bits; the direction kernel is
    bound by its FMAs and by registers (the unrolled MLP keeps 26 vectors
    live), and 512-bit code gives it twice the lanes and the 32 vector
    registers. The request is the function attribute
    ``"prefer-vector-width"="512"`` on our kernels only (the process-wide
    alternative, Numba's ``NUMBA_CPU_FEATURES``, would retune every Numba
    user in the process); without AVX-512 it changes nothing. Built on
    Numba's documented custom-pipeline hook plus its lowering class and code
    library; ``(None, None)`` (plain pipelines) if a Numba release moves those.
    """
    try:
        from llvmlite import ir
        from numba.core import lowering
        from numba.core.compiler import CompilerBase, DefaultPassBuilder
        from numba.core.compiler_machinery import register_pass
        from numba.core.typed_passes import NativeLowering

        from numba.core.codegen import CPUCodeLibrary

        if not (callable(getattr(lowering.Lower, "lower", None))
                and callable(getattr(CPUCodeLibrary, "_optimize_final_module", None))):
            raise RuntimeError("no Lower.lower or CodeLibrary._optimize_final_module to hook")

        class WideAttributes(ir.values.FunctionAttributes):
            def __bool__(self) -> bool:  # printed even when no other attribute is set
                return True

            def _to_list(self, ret_type):  # noqa: ANN001, ANN202
                return [*super()._to_list(ret_type), '"prefer-vector-width"="512"']

        class LocalLower(lowering.Lower):
            def lower(self):  # noqa: ANN202
                _bind_linked_code_locally(self.library)
                super().lower()

        class WideLower(LocalLower):
            def setup_function(self, fndesc):  # noqa: ANN001, ANN202
                super().setup_function(fndesc)
                attrs = WideAttributes()
                for name in self.function.attributes:
                    attrs.add(name)
                self.function.attributes = attrs

        def compiler_with(name: str, lower_class: Any) -> Any:
            @register_pass(mutates_CFG=True, analysis_only=False)
            class Lowering(NativeLowering):
                _name = name

                @property
                def lowering_class(self):  # noqa: ANN202
                    return lower_class

            class Compiler(CompilerBase):
                def define_pipelines(self):  # noqa: ANN202
                    pm = DefaultPassBuilder.define_nopython_pipeline(self.state)
                    if not any(p is NativeLowering for p, _ in pm.passes):
                        raise RuntimeError("no NativeLowering pass to replace")
                    pm.passes = [(Lowering if p is NativeLowering else p, d) for p, d in pm.passes]
                    pm.finalize()
                    return [pm]

            return Compiler

        return (compiler_with("celo2_wide_native_lowering", WideLower),
                compiler_with("celo2_local_native_lowering", LocalLower))
    except Exception:  # noqa: BLE001 - any Numba layout change: the plain pipelines
        return None, None


_WIDE_PIPELINE, _LOCAL_PIPELINE = _pipelines() if AVAILABLE else (None, None)
WIDE: bool = _WIDE_PIPELINE is not None
"""Whether the kernels ask for 512-bit vectors, and every compiled function binds the code it links
in locally (see :func:`_pipelines`)."""


def _noalias_hook(dispatcher: Any) -> "Callable[[Any], Any] | None":
    """Numba's per-dispatcher flag hook, where this Numba release has it (a private name of Numba's)."""
    return getattr(getattr(dispatcher, "_compiler", None), "_customize_flags", None)


def _has_noalias_hook() -> bool:
    if not AVAILABLE:
        return False

    def probe(x):  # noqa: ANN001, ANN202
        return x

    return _noalias_hook(numba.njit(probe)) is not None


NOALIAS: bool = _has_noalias_hook()
"""Whether the kernels are compiled with their arrays marked non-aliasing (see :func:`kernel`)."""


def kernel(fn: Callable, cache: bool = True) -> Any:
    """Compile ``fn`` the way the loops vectorise.

    ``error_model="numpy"`` drops the division-by-zero checks whose early
    exits stop LLVM's vectoriser; marking the array arguments ``noalias`` (as
    Numba does for its own parallel loops, through a compiler flag its public
    API does not expose) spares the runtime overlap checks that LLVM gives up
    on past a handful of arrays. Without the flag the kernels stay correct,
    and slower. No kernel is ever given overlapping arrays.

    Args:
        fn: The Python function of a loop.
        cache: Cache the compiled code on disk (default ``True``).

    Returns:
        Its Numba dispatcher (compiled lazily, on first call or by :func:`ensure_compiled`).
    """
    options = {"pipeline_class": _WIDE_PIPELINE} if WIDE else {}
    dispatcher = numba.njit(fastmath=True, cache=cache, nogil=True, error_model="numpy", **options)(fn)
    customize = _noalias_hook(dispatcher)
    if customize is not None:
        def with_noalias(flags):  # noqa: ANN001, ANN202
            flags = customize(flags)
            flags.noalias = True
            return flags

        dispatcher._compiler._customize_flags = with_noalias
    return dispatcher


def serial(fn: Callable) -> Any:
    """Compile a pass sequence (a function that calls the loops): cached, releasing the GIL, the
    loops' code it links in bound locally (:func:`_bind_linked_code_locally`).

    Args:
        fn: The Python function.

    Returns:
        Its Numba dispatcher.
    """
    options = {"pipeline_class": _LOCAL_PIPELINE} if WIDE else {}
    return numba.njit(cache=True, nogil=True, **options)(fn)


def entry_point(signature: Any) -> Callable[[Callable], Any]:
    """Compile a C callback (a ``numba.cfunc`` of ``signature``, cached) that calls the pass
    sequences, binding the code it links in locally as :func:`serial` does.

    Args:
        signature: The callback's Numba signature.

    Returns:
        A decorator that takes the Python function and returns its ``numba.cfunc``.
    """
    options = {"pipeline_class": _LOCAL_PIPELINE} if WIDE else {}
    return numba.cfunc(signature, cache=True, **options)
