"""Registers, spills and shared memory of every Triton kernel configuration the optimizers launch, compiled for GPUs.

No GPU is needed: Triton compiles ahead of time for a named target
(``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(...))``)
and ``cuobjdump --dump-resource-usage`` (shipped in the Triton wheel) reads the
cubin. Nothing here runs a kernel on a GPU.

1. **Record.** Real ``Celo2`` and ``Celo2Base`` steps (``backend="triton"``)
   run on CPU tensors with the kernels' module in interpreter mode; every launch
   is intercepted (and not executed: the host code never reads a tensor value,
   so the launches a step makes do not depend on what the kernels compute).
   Triton's own argument binder turns each launch's real arguments into what a
   GPU launch would compile: the signature (pointer dtypes, integer widths), the
   constexprs (integers equal to 1 included) and the attributes (pointers and
   integers divisible by 16). The steps cover float32, bfloat16 and float16
   parameters, 0-D tensors, vectors, matrices with widths that are not multiples
   of 16, groups across several tiles, conv kernels, float and 0-d tensor ``lr``
   and weight decay, and both non-finite policies. The tiles the host code picks
   for GPT-2 124M and GPT-3 XL matrices are recorded from calls on ``meta``
   tensors (tagged ``gpt``).
2. **Compile** each distinct configuration for each target and read its
   registers per thread, spills (local memory, stack) and shared memory;
   occupancy by registers is the share of an SM's (or SIMD's) warp slots that
   the register file allows.

Results are cached (JSON, one file per configuration and target) under the
system's temporary folder, keyed by the Triton version, the kernel's
``cache_key`` (its source and that of everything it calls, with the constant
values it reads), the configuration and the target: a changed kernel is
compiled afresh.

Usage::

    python benchmarks/triton_resources.py                  # the whole table, every target Triton supports here
    python benchmarks/triton_resources.py --quick          # a representative set, sm_80 and sm_90 (CI)
    python benchmarks/triton_resources.py --json out.json --targets sm_90

Exit status 1 when a configuration fails to compile, spills, uses more shared
memory than its target has, or (``gpt``-tagged factored direction passes) more
than :data:`GPT_DIRECTION_MAX_REGISTERS` registers per thread.
"""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET when a function is decorated. Its own helpers (the reductions' combine
# functions the kernels pass) are decorated for compilation, as the compiled copy needs them; the
# kernels' module, imported later, runs interpreted (it calls no Triton helper itself, so it can).
os.environ["TRITON_INTERPRET"] = "0"
import triton  # noqa: E402

os.environ["TRITON_INTERPRET"] = "1"

import argparse
import hashlib
import importlib.util
import json
import math
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import torch

GPT_DIRECTION_MAX_REGISTERS = 128
"""Registers per thread allowed to the factored direction passes at GPT shapes (at least 25% occupancy)."""

GPT2_SHAPES = [(768, 2304), (2304, 768), (768, 768), (768, 3072), (3072, 768), (50257, 768), (1024, 768), (768,)]
GPT3_XL_SHAPES = [(2048, 6144), (6144, 2048), (2048, 2048), (2048, 8192), (8192, 2048), (50257, 2048), (2048,)]

# sm: (registers per SM, most resident warps per SM, shared memory a block may opt in to, bytes)
NVIDIA = {"sm_80": (65536, 64, 163 * 1024), "sm_90": (65536, 64, 227 * 1024), "sm_100": (65536, 64, 227 * 1024)}
# gfx942 (MI300): 512 VGPRs per lane of a SIMD, at most 8 waves per SIMD, 64 KB of LDS per workgroup.
AMD = {"gfx942": (512, 8, 64 * 1024)}

CACHE_DIR = Path(tempfile.gettempdir()) / "celo2-triton-resources"

KERNELS = ("_grad_stats", "_flag_pass", "_stat_reduce", "_factors", "_accumulate", "_reduce_groups", "_direction",
           "_fused", "_held")


def _load_compiled_copy() -> ModuleType:
    """A copy of ``celo2.kernels.triton`` decorated for compilation (``TRITON_INTERPRET=0`` during its import)."""
    import celo2.kernels

    name = "celo2_kernels_triton_compiled"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(celo2.kernels.__file__).with_name("triton.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        os.environ["TRITON_INTERPRET"] = "1"
    return module


@dataclass
class Launch:
    """One distinct launch configuration: the kernel, what a GPU compile specialises on, and tags."""

    kernel: str
    signature: dict[str, str]
    constexprs: dict[tuple, Any]  # Triton's form: argument index paths
    attrs: dict[tuple, list]
    num_warps: int
    declared: dict[str, Any] = field(default_factory=dict)  # the kernel's own constexpr parameters
    ones: tuple[str, ...] = ()  # integer arguments equal to 1 (compiled as constants)
    div16: tuple[str, ...] = ()  # integer arguments divisible by 16
    tags: set[str] = field(default_factory=set)
    args: tuple = ()  # stand-in arguments (one-element CPU tensors in place of tensors) for other binders
    kwargs: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, sorted(map(str, self.constexprs.items())),
                           sorted(map(str, self.attrs.items())), self.num_warps])

    @property
    def factored_direction(self) -> bool:
        """A direction pass (alone or fused) of a factored tensor."""
        return self.kernel in ("_direction", "_fused") and bool(self.declared.get("FACTORED"))

    def describe(self) -> str:
        text = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in self.declared.items())
        if self.ones:
            text += " =1:" + ",".join(self.ones)
        if self.div16:
            text += " %16:" + ",".join(self.div16)
        return f"w{self.num_warps} {text}"


class Recorder:
    """Intercepts the interpreter's launches and binds their arguments as a GPU launch would."""

    def __init__(self, compiled: ModuleType) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature

        self.compiled = compiled
        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.binders = {name: create_function_from_signature(getattr(compiled, name).signature,
                                                             getattr(compiled, name).params, self.backend)
                        for name in KERNELS}
        self.launches: dict[str, Launch] = {}
        self.tags: set[str] = set()
        self._stand_ins: dict[torch.dtype, torch.Tensor] = {}

    def _stand_in(self, x: Any) -> Any:
        """A one-element CPU tensor of ``x``'s dtype (16-byte aligned, as device allocations are)."""
        if isinstance(x, torch.Tensor):
            if x.dtype not in self._stand_ins:
                self._stand_ins[x.dtype] = torch.empty(16, dtype=x.dtype)
            return self._stand_ins[x.dtype]
        return x

    def record(self, name: str, args: tuple, kwargs: dict) -> None:
        args = tuple(self._stand_in(a) for a in args)
        kwargs = {k: self._stand_in(v) for k, v in kwargs.items()}
        launch = bind(self.compiled, self.backend, self.binders[name], name, args, kwargs)
        known = self.launches.setdefault(launch.key, launch)
        known.tags |= self.tags

    def __enter__(self) -> "Recorder":
        import triton.runtime.interpreter as interpreter

        recorder = self
        self._real_run = interpreter.InterpretedFunction.run

        def run(fn, *args, grid, warmup, **kwargs):  # noqa: ANN001, ANN202
            recorder.record(fn.fn.__name__, args, kwargs)  # not executed: the step never reads its results

        interpreter.InterpretedFunction.run = run
        return self

    def __exit__(self, *exc: object) -> None:
        import triton.runtime.interpreter as interpreter

        interpreter.InterpretedFunction.run = self._real_run


def bind(compiled: ModuleType, backend: Any, binder: Callable, name: str, args: tuple, kwargs: dict) -> Launch:
    """Triton's binder on real arguments: the signature, constexprs and attributes a launch compiles."""
    fn = getattr(compiled, name)
    bound, specialization, options = binder(*args, **kwargs)
    opts, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs), bound, specialization, options)
    names = list(signature)
    declared = {p.name: constexprs[(p.num,)] for p in fn.params if p.is_constexpr}
    ones = tuple(names[k[0]] for k in constexprs if not fn.params[k[0]].is_constexpr)
    div16 = tuple(names[k[0]] for k, v in attrs.items() if v and not signature[names[k[0]]].startswith("*"))
    return Launch(name, signature, constexprs, attrs, opts.num_warps, declared, ones, div16, args=args,
                  kwargs=kwargs)


def record_steps(recorder: Recorder, full: bool) -> None:
    """Steps of both optimizers on CPU tensors (interpreter mode) and the tiles of GPT shapes on ``meta``."""
    import torch.nn as nn

    from celo2.kernels import triton as kernels
    from celo2.rule.theta import Theta
    from celo2.torch import Celo2, Celo2Base

    assert kernels.INTERPRETED, "celo2.kernels.triton was imported before TRITON_INTERPRET=1 was set"
    theta = Theta.init(seed=0)
    shapes = [(), (37,), (1500,), (24, 7), (64, 12), (96, 20), (40, 30), (70, 40), (300, 3), (5, 3, 3, 3),
              (16, 12, 3, 3), (3, 2, 40, 36)]
    if full:
        shapes += [(768,), (1, 7), (7, 1), (37, 61), (96, 160), (9, 10, 3), (6, 5, 3, 3), (64, 3, 7, 7)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16] + ([torch.float64] if full else [])
    lrs: list[tuple[Any, Any]] = [(1e-3, 0.1), (torch.tensor(1e-3), torch.tensor(0.1))]
    recorder.tags = {"steps"}
    for dtype in dtypes:
        params = [nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        for cls in (Celo2, Celo2Base):
            for lr, wd in lrs:
                for nonfinite in ("skip", "propagate"):
                    if nonfinite == "propagate" and not full and dtype != torch.float32:
                        continue
                    groups = [{"params": params, "branch": "celo2"}] if cls is Celo2 else params
                    opt = cls(groups, lr=lr, weight_decay=wd, theta=theta, backend="triton", nonfinite=nonfinite)
                    opt.step()
    # bfloat16 state (issue 28), through the kernels' own entry points: every kind of tensor in one call
    from celo2.torch import rule

    net_cpu = kernels.pack_net(theta, "cpu")
    for dtype in (torch.float32, torch.bfloat16):
        params = [torch.randn(s).to(dtype) for s in shapes]
        states = [{k: v.to(torch.bfloat16) for k, v in rule.init_tensor_state(p).items()} for p in params]
        grads = [torch.randn_like(p) for p in params]
        rounding = _Rounding(7, [torch.tensor(1) for _ in params], list(range(len(params))))
        kernels.direction_many(net_cpu, states, grads, params, rounding=rounding)
        kernels.apply_step_many(net_cpu, states, grads, params, torch.tensor(1e-3), torch.tensor(0.1),
                                rounding=rounding)
    recorder.tags = {"gpt"}
    net = torch.empty(kernels.pack_net(theta, "cpu").shape, device="meta")
    from celo2.rule.state import state_shapes

    for shape in GPT2_SHAPES + GPT3_XL_SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            param = torch.empty(shape, dtype=dtype, device="meta")
            state = {k: torch.empty(s, device="meta") for k, s in state_shapes(shape).items()}
            grad = torch.empty(shape, dtype=dtype, device="meta")
            d, ok = kernels.direction(net, state, grad, param)
            kernels.apply_held(param, d, ok, 1e-3, 0.1)
            kernels.apply_step(net, state, grad, param, torch.tensor(1e-3, device="meta"), 0.1)
            # bfloat16 state: every accumulator store rounded stochastically (issue 28)
            state16 = {k: torch.empty(s, dtype=torch.bfloat16, device="meta") for k, s in state_shapes(shape).items()}
            rounding = _Rounding(12345, [torch.empty((), dtype=torch.int64, device="meta")], [0])
            kernels.direction(net, state16, grad, param, rounding=rounding)
            kernels.apply_step(net, state16, grad, param, torch.tensor(1e-3, device="meta"), 0.1, rounding=rounding)


@dataclass
class _Rounding:
    """What the kernels read of ``celo2.torch.backends.base.StateRounding`` (bfloat16 state)."""

    seed: int
    steps: list
    tensors: list


@dataclass
class Usage:
    """A configuration compiled for one target."""

    kernel: str
    config: str
    target: str
    tags: list[str]
    registers: int = 0
    spill_bytes: int = 0  # local memory per thread (NVIDIA), scratch per lane (AMD)
    stack_bytes: int = 0
    shared_bytes: int = 0
    occupancy: float = 0.0  # by registers alone
    seconds: float = 0.0
    error: str = ""
    factored_direction: bool = False

    def problems(self, shared_limit: int) -> list[str]:
        found = []
        if self.error:
            found.append(f"does not compile: {self.error}")
        if self.spill_bytes or self.stack_bytes:
            found.append(f"spills ({self.spill_bytes} B local, {self.stack_bytes} B stack per thread)")
        if self.shared_bytes > shared_limit:
            found.append(f"{self.shared_bytes} B of shared memory (the target has {shared_limit})")
        if "gpt" in self.tags and self.factored_direction and self.registers > GPT_DIRECTION_MAX_REGISTERS:
            found.append(f"{self.registers} registers per thread at a GPT shape (at most "
                         f"{GPT_DIRECTION_MAX_REGISTERS})")
        return found


def _target(name: str) -> Any:
    from triton.backends.compiler import GPUTarget

    if name.startswith("sm_"):
        return GPUTarget("cuda", int(name[3:]), 32)
    return GPUTarget("hip", name, 64)


def supported_targets() -> list[str]:
    """The targets the installed Triton compiles for (gfx942 needs its AMD backend)."""
    from triton.backends import backends

    names = ["sm_80", "sm_90"]
    if "nvidia" in backends:
        names.append("sm_100")
    if "amd" in backends:
        names.append("gfx942")
    return names


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _nvidia_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {"registers": int(fields.get("REG", 0)), "stack_bytes": int(fields.get("STACK", 0)),
            "spill_bytes": int(fields.get("LOCAL", 0)), "shared_bytes": int(fields.get("SHARED", 0))}


def _amd_usage(amdgcn: str) -> dict[str, int]:
    def first(pattern: str) -> int:
        m = re.search(pattern, amdgcn)
        return int(m.group(1)) if m else 0

    return {"registers": first(r"\.vgpr_count:\s+(\d+)"), "stack_bytes": 0,
            "spill_bytes": first(r"\.vgpr_spill_count:\s+(\d+)") * 4 + first(r"\.sgpr_spill_count:\s+(\d+)") * 4,
            "shared_bytes": 0}


def _occupancy(target: str, registers: int, num_warps: int) -> float:
    if target in NVIDIA:
        per_sm, max_warps, _ = NVIDIA[target]
        per_warp = -(-max(registers, 1) * 32 // 256) * 256  # allocated per warp in units of 256
        blocks = per_sm // (per_warp * num_warps)
        return min(blocks * num_warps, max_warps) / max_warps
    per_lane, max_waves, _ = AMD[target]
    waves = per_lane // (-(-max(registers, 1) // 8) * 8)
    return min(waves, max_waves) / max_waves


def compile_usage(compiled: ModuleType, launch: Launch, target: str, cache: bool = True) -> Usage:
    """Compile ``launch`` for ``target`` (or read the cached result) and read its resources."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = getattr(compiled, launch.kernel)
    tgt = _target(target)
    if target in AMD:  # the AMD backend specialises and reads options its own way
        backend = make_backend(tgt)
        launch_t = bind(compiled, backend, create_function_from_signature(fn.signature, fn.params, backend),
                        launch.kernel, launch.args, launch.kwargs)
        launch_t.tags = launch.tags
    else:
        launch_t = launch
    usage = Usage(launch.kernel, launch.describe(), target, sorted(launch.tags),
                  factored_direction=launch.factored_direction)
    key = hashlib.sha256(json.dumps([triton.__version__, fn.cache_key, launch_t.key, target]).encode()).hexdigest()
    path = CACHE_DIR / f"{key}.json"
    if cache and path.exists():
        stored = json.loads(path.read_text())
        for k in ("registers", "spill_bytes", "stack_bytes", "shared_bytes", "occupancy", "error", "seconds"):
            setattr(usage, k, stored[k])
        return usage
    start = time.perf_counter()
    try:
        backend = make_backend(tgt)
        options = backend.parse_options({"num_warps": launch_t.num_warps})
        kernel = triton.compile(ASTSource(fn, launch_t.signature, launch_t.constexprs, launch_t.attrs),
                                target=tgt, options=options.__dict__)
        found = _nvidia_usage(kernel.asm["cubin"]) if target in NVIDIA else _amd_usage(kernel.asm["amdgcn"])
        found["shared_bytes"] = max(found["shared_bytes"], int(kernel.metadata.shared))
        for k, v in found.items():
            setattr(usage, k, v)
        usage.occupancy = _occupancy(target, usage.registers, launch_t.num_warps)
    except Exception as exc:  # noqa: BLE001 - a compile error is a result, reported and failed on
        usage.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    usage.seconds = time.perf_counter() - start
    if cache and not usage.error:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(usage)))
        tmp.replace(path)
    return usage


TILE_CONSTEXPRS = ("BG", "BL", "BH", "BLL", "BLOCK", "BGR", "RB", "BO0", "BS0", "BO1", "BS1", "BO2", "BS2")
"""The constexpr parameters that size a program's tile (what register and shared memory use follow)."""


LIGHT_KERNELS = ("_grad_stats", "_flag_pass", "_stat_reduce", "_reduce_groups", "_held")
"""Kernels with a few values per element: their register use grows with the tile alone."""


def _tile_elements(launch: Launch) -> int:
    tiles = [v for k, v in launch.declared.items() if k in TILE_CONSTEXPRS]
    return max(1, math.prod(tiles)) if tiles else 1


def _weight(launch: Launch) -> tuple:
    """How hard a configuration is on the compiler: storing bfloat16 state (stochastic rounding), applying
    with a device-side ``lr`` and weight decay to a bfloat16 parameter under the skip, with the fewest
    integers folded, counts as hardest (for the light kernels, the largest tile first)."""
    d = launch.declared
    hard = (bool(d.get("SBF", 0)), d.get("MODE", 0) in (2, 4), d.get("P_KIND", 0) == 2,
            d.get("LR_T", 0) + d.get("WD_T", 0), bool(d.get("SKIP", d.get("CHECK", 0))),
            -len(launch.ones) - len(launch.div16))
    return ((_tile_elements(launch),) if launch.kernel in LIGHT_KERNELS else ()) + hard


def representative(launches: list[Launch]) -> list[Launch]:
    """A small set for CI, the hardest configuration (:func:`_weight`) of each group: a light kernel
    (:data:`LIGHT_KERNELS`) is one group; the others are grouped by kind of tensor (factored or not)
    and tile; the factored direction passes recorded at GPT shapes form groups of their own."""
    chosen: dict[str, Launch] = {}
    for launch in launches:
        tiles = {k: v for k, v in launch.declared.items() if k in TILE_CONSTEXPRS}
        if launch.kernel in LIGHT_KERNELS:
            group = launch.kernel
        else:
            gpt = "gpt" in launch.tags and launch.factored_direction
            if "gpt" in launch.tags and not gpt and "steps" not in launch.tags:
                continue
            group = json.dumps([launch.kernel, bool(launch.declared.get("FACTORED")), tiles, gpt], sort_keys=True)
        if group not in chosen or _weight(launch) > _weight(chosen[group]):
            chosen[group] = launch
    return list(chosen.values())


def run(targets: list[str], quick: bool, max_compiles: int | None, cache: bool,
        log: Callable[[str], None] = print,
        kernels: tuple[str, ...] = KERNELS) -> tuple[list[Usage], list[str], list[Launch]]:
    """Record, compile and check; returns every result, the problems found and every launch recorded."""
    compiled = _load_compiled_copy()
    with Recorder(compiled) as recorder:
        record_steps(recorder, full=not quick)
    recorded = launches = list(recorder.launches.values())
    log(f"{len(launches)} distinct launch configurations recorded")
    if quick:
        launches = representative(launches)
        log(f"{len(launches)} representative configurations compiled")
    launches.sort(key=lambda l: (l.kernel, l.describe()))
    launches = [l for l in launches if l.kernel in kernels]
    if max_compiles is not None:
        launches = launches[:max_compiles]
    results, problems = [], []
    for target in targets:
        limit = NVIDIA[target][2] if target in NVIDIA else AMD[target][2]
        for launch in launches:
            usage = compile_usage(compiled, launch, target, cache)
            results.append(usage)
            for problem in usage.problems(limit):
                problems.append(f"{target} {usage.kernel} [{usage.config}] ({','.join(usage.tags)}): {problem}")
    return results, problems, recorded


def table(results: list[Usage]) -> Iterator[str]:
    yield f"{'target':7} {'kernel':15} {'regs':>4} {'spill':>5} {'stack':>5} {'shared':>6} {'occ':>5}  tags   config"
    for u in results:
        if u.error:
            yield f"{u.target:7} {u.kernel:15} ERROR {u.error}  [{u.config}]"
            continue
        yield (f"{u.target:7} {u.kernel:15} {u.registers:4d} {u.spill_bytes:5d} {u.stack_bytes:5d} "
               f"{u.shared_bytes:6d} {u.occupancy:5.0%}  {','.join(u.tags):6} {u.config}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a representative set for sm_80 and sm_90 (CI)")
    parser.add_argument("--targets", nargs="+", default=None,
                        help="sm_80 sm_90 sm_100 gfx942 (default: all supported; --quick: sm_80 sm_90)")
    parser.add_argument("--max-compiles", type=int, default=None, help="compile at most this many configurations")
    parser.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=KERNELS,
                        help="compile these kernels only (default: all)")
    parser.add_argument("--no-cache", action="store_true", help="compile afresh, ignoring cached results")
    parser.add_argument("--json", type=Path, default=None, help="write every result here")
    args = parser.parse_args(argv)
    available = supported_targets()
    targets = args.targets or (["sm_80", "sm_90"] if args.quick else available)
    unknown = [t for t in targets if t not in available]
    if unknown:
        parser.error(f"--targets: {unknown} not supported by this Triton (it compiles for {available})")
    start = time.perf_counter()
    results, problems, recorded = run(targets, args.quick, args.max_compiles, not args.no_cache,
                                      kernels=tuple(args.kernels))
    for line in table(results):
        print(line)
    worst = {}
    for u in results:
        if u.factored_direction and "gpt" in u.tags:
            worst[u.target] = max(worst.get(u.target, 0), u.registers)
    print(f"\n{len(results)} compiles in {time.perf_counter() - start:.0f} s; factored direction passes at GPT "
          f"shapes, most registers per thread: {worst}; spills: "
          f"{sum(1 for u in results if u.spill_bytes or u.stack_bytes)}")
    if args.json:
        args.json.write_text(json.dumps({
            "results": [asdict(u) for u in results], "problems": problems,
            "recorded": [{"kernel": l.kernel, "config": l.describe(), "declared": l.declared,
                          "tags": sorted(l.tags)} for l in recorded]}, indent=1, default=str))
    for problem in problems:
        print("PROBLEM", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
