"""Step time and peak extra memory of Celo2 against its peers, PyTorch and JAX.

    python benchmarks/step_time.py --sizes 1m,10m --repeats 7 --out results.json
    python benchmarks/step_time.py --sizes 50m --repeats 5 --out results50.json

Parameter sets are shaped like real models: a GPT-style transformer (token and
position embeddings, per block four square attention matrices, a 4x MLP
pair, biases and norm gains, a final norm and an untied head) plus a small
conv tower (3x3 kernels, one bias). Sizes: ``1m`` (d=128, 4 blocks), ``10m``
(d=256, 12 blocks), ``50m`` (d=512, 15 blocks). All float32, gradients fixed
random values (the step cost does not depend on them).

What is compared, per framework, on the same parameters, dtype and threads:

* PyTorch (eager): ``torch.optim.AdamW`` (``foreach=True`` and ``fused=True``),
  ``torch.optim.Muon`` for hidden matrices with AdamW (foreach) for the rest
  (the usual routing: embeddings, head, vectors and conv kernels to AdamW,
  since PyTorch's Muon takes 2-D tensors only), ``Celo2Base`` and ``Celo2``.
* JAX (``jax.jit``, parameters and state donated): ``optax.adamw``,
  ``optax.contrib.muon`` (same routing), ``celo2_base`` and ``celo2`` (on
  CPU their matrices go through the Numba kernels, an XLA custom call), and
  ``celo2_base_xla`` / ``celo2_xla``: the same with ``cpu_kernels=False``,
  XLA's own loop.

Timing: all optimizers of one framework live in one process and are stepped
in rotating order, ``--repeats`` rounds after ``--warmup`` excluded steps (JAX
compiles during warm-up); the median is reported. Ratios are Celo2Base /
AdamW(foreach) [JAX: celo2_base / adamw] and Celo2 / Muon.

Memory: what the optimizer adds on top of parameters and gradients.

* PyTorch on CPU: a fresh subprocess per (size, optimizer); parameters and
  gradients are allocated first (without temporaries), the optimizer code is
  warmed on a tiny copy of the model, the kernel's resident-set high-water
  mark is reset (``/proc/self/clear_refs``), then the optimizer is built and
  stepped three times. "1st peak+" = VmHWM over the first step - VmRSS
  before (state tensors, the Python objects holding them, worker threads);
  "step tr." (step transient) = for steps 2 and 3, the high-water mark over
  the step minus the resident set the step starts with (the mark is reset
  before each): the scratch a step needs beyond what the optimizer keeps.
  glibc is told to serve every allocation of 64 KiB or more by ``mmap``
  (``MALLOC_MMAP_THRESHOLD_``) so that freed buffers leave the resident set
  and reused ones re-enter it. On CUDA, ``torch.cuda.max_memory_allocated``
  and ``memory_allocated`` play the same roles.
* JAX: the compiled step's own accounting (``memory_analysis()``): state
  bytes, and ``temp_size_in_bytes`` (scratch beyond the donated inputs) as
  the step transient; the gradients are live inputs of the step, as when a
  jitted update is called with them.
  The update is also compiled inside a training step whose gradients are
  made in the step by backpropagation (through one matrix product,
  convolution or batch sum per tensor: intermediates, which the optimizer
  may overwrite): "train+" is the scratch that step needs over the same
  step with ``optax.sgd``, i.e. what the optimizer adds beyond parameters,
  gradients and state. There the CPU
  kernels' custom calls return each direction in its gradient's buffer; with
  the gradients as live inputs XLA first copies each one.
  XLA:CPU's default scheduler favours concurrency and keeps the scratch of
  all tensors alive together (with the CPU kernels, each tensor's raw
  direction, a custom-call output). "mem-ord." is the same step compiled in
  a separate process with
  ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``, the
  schedule that frees each tensor's scratch before the next tensor's step
  (``compiler_options`` on ``compile()`` does not reach this flag).

The issue's memory target is step transient <= 25% of the largest parameter
tensor.

Threads: ``--threads N`` sets the intra-op threads of every optimizer (torch
and XLA). On a CPU shared with other jobs, multi-threaded runs stall at
OpenMP barriers whenever a core is taken away, which penalises optimizers
made of many small operations; ``--threads 1`` gives stable ratios there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SIZES = {
    # name: (d_model, blocks, vocab, conv channels)
    "1m": (128, 4, 512, 32),
    "10m": (256, 12, 1024, 64),
    "50m": (512, 15, 2048, 128),
    "tiny": (16, 1, 32, 4),  # seconds; for the test that keeps this script working
}
TORCH_OPTS = ("adamw_foreach", "adamw_fused", "muon", "celo2_base", "celo2")
JAX_OPTS = ("adamw", "muon", "celo2_base", "celo2", "celo2_base_xla", "celo2_xla")
LR = 1e-3


def _load_theta(path: str | None):  # noqa: ANN202
    """The given theta; else the published one beside the repo; else a fresh
    random theta (the step cost does not depend on theta's values)."""
    import celo2

    if path:
        return celo2.load_theta(path)
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "celo2_official_theta.state"
    return celo2.load_theta(shared) if shared.exists() else celo2.Theta.init(seed=0)


def model_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Named parameter shapes of the benchmark model."""
    d, blocks, vocab, c = SIZES[size]
    out: list[tuple[str, tuple[int, ...]]] = [("embed.weight", (vocab, d)), ("pos_embed.weight", (256, d))]
    for i in range(blocks):
        b = f"blocks.{i}"
        out += [(f"{b}.ln1.weight", (d,)), (f"{b}.ln1.bias", (d,))]
        out += [(f"{b}.attn.{n}.weight", (d, d)) for n in ("q", "k", "v", "o")]
        out += [(f"{b}.attn.o.bias", (d,)), (f"{b}.ln2.weight", (d,)), (f"{b}.ln2.bias", (d,))]
        out += [(f"{b}.mlp.fc.weight", (4 * d, d)), (f"{b}.mlp.fc.bias", (4 * d,))]
        out += [(f"{b}.mlp.proj.weight", (d, 4 * d)), (f"{b}.mlp.proj.bias", (d,))]
    out += [("ln_f.weight", (d,)), ("lm_head.weight", (vocab, d))]
    out += [("conv.0.weight", (c, 3, 3, 3)), ("conv.1.weight", (c, c, 3, 3)),
            ("conv.2.weight", (2 * c, c, 3, 3)), ("conv.3.weight", (2 * c, 2 * c, 3, 3)), ("conv.3.bias", (2 * c,))]
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _is_muon(name: str, shape: tuple[int, ...]) -> bool:
    from celo2.rule import routing

    return len(shape) == 2 and routing.route(name, shape) == routing.LEARNED


# =============================================================================
# PyTorch
# =============================================================================
def _torch_params(size: str, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    params = []
    for name, shape in model_shapes(size):
        p = torch.nn.Parameter(torch.empty(shape).normal_(0.0, 0.02, generator=g))
        p.grad = torch.empty(shape).normal_(0.0, 1e-3, generator=g)
        params.append((name, p))
    return params


class _MuonWithAdamW:
    """torch.optim.Muon on hidden matrices, AdamW (foreach) on the rest."""

    def __init__(self, named) -> None:  # noqa: ANN001
        import torch

        mats = [p for n, p in named if _is_muon(n, tuple(p.shape))]
        rest = [p for n, p in named if not _is_muon(n, tuple(p.shape))]
        self.opts = [torch.optim.Muon(mats, lr=LR), torch.optim.AdamW(rest, lr=LR, foreach=True)]
        self.state = {k: v for o in self.opts for k, v in o.state.items()}

    def step(self) -> None:
        for o in self.opts:
            o.step()

    def state_tensors(self):
        for o in self.opts:
            for st in o.state.values():
                yield from (v for v in st.values() if hasattr(v, "nbytes"))


def _torch_optimizer(kind: str, named, theta):  # noqa: ANN001
    import torch

    from celo2.torch import Celo2, Celo2Base

    ps = [p for _, p in named]
    if kind == "adamw_foreach":
        return torch.optim.AdamW(ps, lr=LR, foreach=True)
    if kind == "adamw_fused":
        return torch.optim.AdamW(ps, lr=LR, fused=True)
    if kind == "muon":
        return _MuonWithAdamW(named)
    if kind == "celo2_base":
        return Celo2Base(named, lr=LR, theta=theta)
    if kind == "celo2":
        return Celo2(named, lr=LR, theta=theta)
    raise ValueError(kind)


def _state_bytes(opt) -> int:  # noqa: ANN001
    if isinstance(opt, _MuonWithAdamW):
        return sum(t.nbytes for t in opt.state_tensors())
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if hasattr(v, "nbytes"))


def torch_timing(size: str, kinds: list[str], repeats: int, warmup: int, theta_path: str | None) -> dict[str, Any]:
    import torch

    theta = _load_theta(theta_path)
    base = _torch_params(size)
    opts = {}
    for kind in kinds:
        named = []
        for name, p in base:
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad  # shared, never modified by the optimizers
            named.append((name, q))
        opts[kind] = _torch_optimizer(kind, named, theta)
    for opt in opts.values():
        for _ in range(warmup):
            opt.step()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(repeats):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
        for kind in order:
            t0 = time.perf_counter()
            opts[kind].step()
            times[kind].append(time.perf_counter() - t0)
    return {k: {"median_s": statistics.median(v), "all_s": v, "state_bytes": _state_bytes(opts[k])}
            for k, v in times.items()}


def _proc_status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def torch_memory_worker(size: str, kind: str, theta_path: str | None, device: str) -> dict[str, Any]:
    """Runs in its own process: peak extra memory of one optimizer (see module doc)."""
    import gc

    import torch

    theta = _load_theta(theta_path)
    params = _torch_params(size)
    if device != "cpu":
        for i, (n, p) in enumerate(params):
            q = torch.nn.Parameter(p.detach().to(device))
            q.grad = p.grad.to(device)
            params[i] = (n, q)
    # Warm the code paths (lazy imports, theta upload) on a tiny model.
    tiny = [(n, torch.nn.Parameter(torch.zeros([min(s, 4) for s in p.shape], device=device))) for n, p in params]
    for _, p in tiny:
        p.grad = torch.ones_like(p)
    _torch_optimizer(kind, tiny, theta).step()
    del tiny
    gc.collect()

    def current() -> int:
        if device == "cpu":
            return _proc_status("VmRSS")
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()

    def peak_then_reset() -> int:
        """The high-water mark since the last reset; then reset it to now."""
        if device == "cpu":
            peak = _proc_status("VmHWM")
            Path("/proc/self/clear_refs").write_text("5")
        else:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        return peak

    peak_then_reset()
    before = current()
    opt = _torch_optimizer(kind, params, theta)
    opt.step()
    first_peak = peak_then_reset()
    after_first = current()
    transients = []
    for _ in range(2):  # steps 2 and 3: the peak over what each step starts with
        start = current()
        opt.step()
        transients.append(peak_then_reset() - start)
    largest = max(p.numel() * p.element_size() for _, p in params)
    return {"peak_extra_bytes": first_peak - before, "state_bytes": _state_bytes(opt), "largest_param_bytes": largest,
            "kept_after_first_bytes": after_first - before, "step_transient_bytes": max(transients)}


# =============================================================================
# JAX
# =============================================================================
def _jax_setup(size: str):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    params, grads = {}, {}
    for name, shape in model_shapes(size):
        params[name] = jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 0.02)
        grads[name] = jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * 1e-3)
    return params, grads


def _jax_optimizer(kind: str, theta, shapes):  # noqa: ANN001
    import optax

    import celo2.optax as co

    if kind == "adamw":
        return optax.adamw(LR)
    if kind == "muon":
        dims = {n: (optax.contrib.MuonDimensionNumbers() if _is_muon(n, s) else None) for n, s in shapes}
        return optax.contrib.muon(LR, muon_weight_dimension_numbers=dims)
    if kind in ("celo2_base", "celo2_base_xla"):
        return co.celo2_base(LR, theta=theta, cpu_kernels=False if kind.endswith("_xla") else None)
    if kind in ("celo2", "celo2_xla"):
        return co.celo2(LR, theta=theta, cpu_kernels=False if kind.endswith("_xla") else None)
    raise ValueError(kind)


def _jax_step_fn(opt):  # noqa: ANN001
    import jax
    import optax

    def step(params, state, grads):  # noqa: ANN001, ANN202
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


TRAIN_STEP_RANK = 8
"""Batch dimension of the products that make the gradients of the train-step
memory measurement (see :func:`_jax_train_step_temp`)."""


def _jax_train_step_temp(opt, params) -> int | None:  # noqa: ANN001
    """Scratch (``temp_size_in_bytes``) of a compiled training step whose
    gradients come out of backpropagation inside it, as in a model: the loss
    is a sum of one term per tensor, ``<x W, y>`` for a matrix, ``<conv(x,
    W), y>`` for a conv kernel, ``<tanh(x + w), y>`` over a batch for a
    vector, so each gradient is the output of a matrix product, a
    convolution or a sum over the batch, which no optimizer fuses into its
    own loops. Compiled, never run."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    rng = np.random.default_rng(1)
    k = TRAIN_STEP_RANK

    def normal(*shape: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))

    data = {}
    for name, x in params.items():
        if x.ndim == 2:
            data[name] = (normal(k, x.shape[0]), normal(k, x.shape[1]))
        elif x.ndim == 4:
            O, I, kh, kw = x.shape  # noqa: E741
            data[name] = (normal(2, I, 4 * kh, 4 * kw), normal(2, O, 4 * kh, 4 * kw))
        else:  # a bias or a norm's gain: its gradient sums the batch
            data[name] = (normal(k, *x.shape), normal(k, *x.shape))

    def term(w: jax.Array, a: jax.Array, b: jax.Array) -> jax.Array:
        if w.ndim == 2:
            return jnp.sum((a @ w) * b)
        if w.ndim == 4:
            return jnp.sum(jax.lax.conv(a, w, (1, 1), "SAME") * b)
        return jnp.sum(jnp.tanh(a + w) * b)

    def train_step(params, state, data):  # noqa: ANN001, ANN202
        grads = jax.grad(lambda p: sum(term(p[n], *data[n]) for n in p))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    mem = jax.jit(train_step, donate_argnums=(0, 1)).lower(params, opt.init(params), data).compile().memory_analysis()
    return None if mem is None else int(mem.temp_size_in_bytes)


def _jax_compiled(kind: str, theta, params0, grads, size: str, sgd_train_temp: int | None = None):  # noqa: ANN001, ANN202
    """One optimizer's compiled step, its fresh parameters and state, and its
    memory figures; with ``sgd_train_temp`` (plain SGD's train-step scratch),
    also the train-step scratch it adds over SGD's."""
    import jax

    opt = _jax_optimizer(kind, theta, model_shapes(size))
    params = jax.tree_util.tree_map(lambda x: x + 0, params0)
    state = opt.init(params)
    t0 = time.perf_counter()
    compiled = _jax_step_fn(opt).lower(params, state, grads).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    state_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))
    temp = int(mem.temp_size_in_bytes) if mem is not None else None
    info = {"compile_s": compile_s, "state_bytes": state_bytes, "temp_bytes": temp,
            "peak_extra_bytes": None if temp is None else state_bytes + temp}
    if sgd_train_temp is not None:
        train = _jax_train_step_temp(opt, params0)
        info["train_temp_over_sgd_bytes"] = None if train is None else train - sgd_train_temp
    return compiled, params, state, info


def _sgd_train_temp(params0) -> int | None:  # noqa: ANN001
    import optax

    return _jax_train_step_temp(optax.sgd(LR), params0)


def jax_memory_ordered(size: str, kinds: list[str], theta_path: str | None) -> dict[str, Any]:
    """The compiled steps' scratch when XLA:CPU schedules for memory (run in a
    process started with ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false``:
    the flag is read once per process, and ``compiler_options`` does not reach it)."""
    theta = _load_theta(theta_path)
    params0, grads = _jax_setup(size)
    sgd = _sgd_train_temp(params0)
    out = {}
    for k in kinds:
        info = _jax_compiled(k, theta, params0, grads, size, sgd)[3]
        out[k] = {"temp_bytes_memory_ordered": info["temp_bytes"],
                  "train_temp_over_sgd_bytes_memory_ordered": info["train_temp_over_sgd_bytes"]}
    return out


def jax_timing(size: str, kinds: list[str], repeats: int, warmup: int, theta_path: str | None) -> dict[str, Any]:
    import jax

    theta = _load_theta(theta_path)
    params0, grads = _jax_setup(size)
    runs, info = {}, {}
    sgd = _sgd_train_temp(params0)
    for kind in kinds:
        compiled, params, state, info[kind] = _jax_compiled(kind, theta, params0, grads, size, sgd)
        runs[kind] = [compiled, params, state]
    for kind in kinds:
        for _ in range(warmup):
            c, p, s = runs[kind]
            p, s = c(p, s, grads)
            jax.block_until_ready(p)
            runs[kind][1:] = [p, s]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(repeats):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
        for kind in order:
            c, p, s = runs[kind]
            t0 = time.perf_counter()
            p, s = c(p, s, grads)
            jax.block_until_ready((p, s))
            times[kind].append(time.perf_counter() - t0)
            runs[kind][1:] = [p, s]
    largest = max(x.nbytes for x in params0.values())
    return {k: {"median_s": statistics.median(v), "all_s": v, "largest_param_bytes": largest, **info[k]}
            for k, v in times.items()}


# =============================================================================
# Driver
# =============================================================================
MEMORY_ORDERED_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _worker_env(threads: int | None, memory: bool, jax_memory_ordered: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    if jax_memory_ordered:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + MEMORY_ORDERED_FLAG).strip()
    if memory:
        # Memory workers only: every allocation >= 64 KiB is its own mapping,
        # so freed buffers leave the resident set. Timing workers keep glibc's
        # defaults (heap reuse), which is what users run.
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        env["MALLOC_TRIM_THRESHOLD_"] = "65536"
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
        if threads == 1:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                                "intra_op_parallelism_threads=1").strip()
    return env


def _run_worker(args: list[str], opts: argparse.Namespace) -> Any:
    threads = opts.threads
    cmd = [sys.executable, os.path.abspath(__file__), "--repeats", str(opts.repeats), "--warmup", str(opts.warmup),
           "--device", opts.device]
    if opts.theta:
        cmd += ["--theta", opts.theta]
    if threads:
        cmd += ["--threads", str(threads)]
    cmd += ["--_worker", *args]
    env = _worker_env(threads, args[0] == "torch-mem", args[0] == "jax-mem")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _mb(x: float | None) -> str:
    return f"{'-':>10s}" if x is None else f"{x / 2**20:10.1f}"


def format_table(results: dict[str, Any]) -> str:
    lines = []
    for size, per in results["sizes"].items():
        n = per["num_params"]
        largest = per["largest_param_bytes"]
        lines.append(f"\n== {size}: {n:,} parameters, {len(model_shapes(size))} tensors, "
                     f"largest tensor {largest / 2**20:.2f} MiB (25% = {largest / 4 / 2**20:.2f} MiB) ==")
        for fw, base_ref, orth_ref in (("torch", "adamw_foreach", "muon"), ("jax", "adamw", "muon")):
            rows = per.get(fw)
            if not rows:
                continue
            # The JAX scratch columns that were measured (the memory-ordered ones come from their own process).
            heads = {"temp_bytes_memory_ordered": "mem-ord.", "train_temp_over_sgd_bytes": "train+",
                     "train_temp_over_sgd_bytes_memory_ordered": "train+ m-o"}
            keys = [k for k in heads if any(k in r for r in rows.values())]
            lines.append(f"[{fw}]  {'optimizer':14s} {'median ms':>10s} {'ratio':>14s} "
                         f"{'state MiB':>10s} {'1st peak+':>10s} {'step tr.':>10s} {'tr/largest':>10s}"
                         + "".join(f" {heads[k]:>10s} {'/largest':>8s}" for k in keys))
            for kind, r in rows.items():
                t = r["median_s"] * 1e3
                ratio = ""
                if kind.startswith("celo2_base"):
                    ratio = f"{r['median_s'] / rows[base_ref]['median_s']:.2f}x {base_ref.split('_')[0]}"
                elif kind.startswith("celo2"):
                    ratio = f"{r['median_s'] / rows[orth_ref]['median_s']:.2f}x muon"
                state, peak = r.get("state_bytes"), r.get("peak_extra_bytes")
                trans = r.get("step_transient_bytes", r.get("temp_bytes"))
                rel = "-" if trans is None else f"{trans / largest:.2f}"
                line = f"       {kind:14s} {t:10.1f} {ratio:>14s} {_mb(state)}{_mb(peak)}{_mb(trans)} {rel:>10s}"
                for key in keys:
                    x = r.get(key)
                    line += f" {_mb(x)} {'-' if x is None else f'{x / largest:.2f}':>8s}"
                lines.append(line)
    lines.append("\n1st peak+: torch: resident memory added by building the optimizer and its first step (state, "
                 "Python objects, threads); JAX: state + scratch.\nstep tr.: the most a later step adds on top of "
                 "what it starts with (torch), or the compiled step's scratch (JAX).\nmem-ord. (JAX): that scratch "
                 "when XLA schedules for memory (XLA_FLAGS=" + MEMORY_ORDERED_FLAG + ").\ntrain+ (JAX): "
                 "the scratch a training step whose gradients are made inside it needs over the same step with "
                 "optax.sgd; m-o: with the memory-ordered schedule.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1m,10m")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--frameworks", default="torch,jax")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for every optimizer (default: library default)")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the memory subprocesses (torch: per optimizer; JAX: the memory-ordered compile)")
    ap.add_argument("--device", default="cpu", help="torch device for the memory measurement")
    ap.add_argument("--theta", default=None, help="theta file (default: the shipped theta)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--_worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        try:
            import torch

            torch.set_num_threads(args.threads)
        except ImportError:
            pass
    if args._worker:
        mode, size, *rest = args._worker
        if mode == "torch-time":
            out = torch_timing(size, rest[0].split(","), args.repeats, args.warmup, args.theta)
        elif mode == "jax-time":
            out = jax_timing(size, rest[0].split(","), args.repeats, args.warmup, args.theta)
        elif mode == "jax-mem":
            out = jax_memory_ordered(size, rest[0].split(","), args.theta)
        elif mode == "torch-mem":
            out = torch_memory_worker(size, rest[0], args.theta, args.device)
        else:
            raise SystemExit(f"unknown worker mode {mode}")
        print(json.dumps(out))
        return 0

    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads, "loadavg_start": os.getloadavg()},
        "sizes": {},
    }
    frameworks = args.frameworks.split(",")
    for size in args.sizes.split(","):
        shapes = model_shapes(size)
        per: dict[str, Any] = {"num_params": sum(_numel(s) for _, s in shapes),
                               "largest_param_bytes": max(4 * _numel(s) for _, s in shapes)}
        if "torch" in frameworks:
            t0 = time.time()
            rows = _run_worker(["torch-time", size, ",".join(TORCH_OPTS)], args)
            if not args.no_memory:
                for kind in TORCH_OPTS:
                    rows[kind].update(_run_worker(["torch-mem", size, kind], args))
            per["torch"] = rows
            print(f"[{size}] torch done in {time.time() - t0:.0f}s", file=sys.stderr)
        if "jax" in frameworks:
            t0 = time.time()
            per["jax"] = _run_worker(["jax-time", size, ",".join(JAX_OPTS)], args)
            if not args.no_memory:
                for kind, extra in _run_worker(["jax-mem", size, ",".join(JAX_OPTS)], args).items():
                    per["jax"][kind].update(extra)
            print(f"[{size}] jax done in {time.time() - t0:.0f}s", file=sys.stderr)
        results["sizes"][size] = per
    results["machine"]["loadavg_end"] = os.getloadavg()
    table = format_table(results)
    results["table"] = table
    print(table)
    print(f"\nload average (1, 5, 15 min) at start {results['machine']['loadavg_start']}, "
          f"at end {results['machine']['loadavg_end']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
