"""Step time and peak extra memory of Celo2 against its peers, PyTorch and JAX.

    python benchmarks/step_time.py --sizes 1m,10m --repeats 7 --out results.json
    python benchmarks/step_time.py --sizes 50m --repeats 5 --out results50.json
    python benchmarks/step_time.py --device cuda --frameworks torch --sizes gpt2-124m,gpt3-xl --train-share gpt2-124m
    python benchmarks/step_time.py --sizes 10m --frameworks torch --state-dtypes float32,bfloat16 --no-memory \
        --threads 1 --clock cpu
    bash benchmarks/gpu_figures.sh      # every GPU figure of issue 15, about 8 minutes on one GPU

Parameter sets are shaped like real models. ``1m`` (d=128, 4 blocks), ``10m``
(d=256, 12 blocks) and ``50m`` (d=512, 15 blocks) are a GPT-style transformer
(token and position embeddings, per block four square attention matrices, a
4x MLP pair, biases and norm gains, a final norm and an untied head) plus a
small conv tower (3x3 kernels, one bias). ``gpt2-124m`` (vocab 50257, context
1024, d=768, 12 layers) and ``gpt3-xl`` (vocab 50257, context 2048, d=2048,
24 layers: 1.3B) are the parameters of :class:`celo2.eval.tasks.GPT` with its
head tied to the token embedding, as in GPT-2 and GPT-3: a fused ``qkv``
matrix ``(3d, d)``, the attention projection ``(d, d)``, the MLP pair
``(4d, d)`` and ``(d, 4d)``, with their biases and the norms' gains and
biases. All float32, gradients fixed random values (the step cost does not
depend on them).

What is compared, per framework, on the same parameters, dtype and threads:

* PyTorch (eager): ``torch.optim.AdamW`` (``foreach=True`` and ``fused=True``),
  ``torch.optim.Muon`` for hidden matrices with AdamW (foreach) for the rest
  (the usual routing: embeddings, head, vectors and conv kernels to AdamW,
  since PyTorch's Muon takes 2-D tensors only), ``Celo2Base`` and ``Celo2``
  with Newton-Schulz in float32 (``celo2_fp32``) and in bfloat16
  (``celo2_bf16``). torch's Muon always multiplies in bfloat16 (``muon``);
  ``muon_fp32`` is the same optimizer with its Newton-Schulz run in float32
  (Celo2's, which has Muon's coefficients and step count), so that each Celo2
  row has a Muon row of its own Newton-Schulz dtype. The table says which
  dtype Celo2's default ``ns_dtype="auto"`` picks on the device.
* JAX (``jax.jit``, parameters and state donated): ``optax.adamw``,
  ``optax.contrib.muon`` (same routing), ``celo2_base`` and ``celo2`` (on
  CPU their matrices go through the Numba kernels, an XLA custom call), and
  ``celo2_base_xla`` / ``celo2_xla``: the same with ``cpu_kernels=False``,
  XLA's own loop.

State dtype (``--state-dtypes``, issue 28): each dtype after ``float32`` adds
a row per Celo2 row, named ``KIND@DTYPE`` (``celo2_base@bfloat16``), the same
optimizer built with ``state_dtype=DTYPE``; its ratio is against its float32
row, timed in the same rotation.

Timing: on the CPU all optimizers of one framework live in one process and are
stepped in rotating order, ``--repeats`` rounds after ``--warmup`` excluded
steps (JAX compiles during warm-up); the median is reported. With ``--device
cuda`` the PyTorch optimizers run one after the other (one state in GPU memory
at a time), each step timed with ``torch.cuda.Event``. Ratios are Celo2Base /
AdamW (foreach on the CPU, fused on a GPU) [JAX: celo2_base / adamw] and Celo2
/ Muon of the same Newton-Schulz dtype.

Training step (``--train-share MODEL``): the forward and backward pass of the
next-token loss of that GPT on random tokens (``--train-batch`` sequences of
its context length; bfloat16 autocast on a GPU), then the optimizer's step,
per PyTorch optimizer on the same initial model; the share is step / (forward
and backward + step).

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
  and reused ones re-enter it.
* PyTorch on CUDA: in the timing process, ``torch.cuda.max_memory_allocated``
  and ``memory_allocated`` play the same roles (exact allocator counts).
* The bound of issue 15: peak extra memory <= state + 25% of the largest
  tensor + Newton-Schulz's workspace ("budget", "peak/bud."). The workspace is
  computed from the shapes: the largest batch Newton-Schulz orthogonalises
  (one matrix for Muon, a shape group's batch for Celo2, see
  :func:`celo2.torch.ns.plan_batches`) in its dtype, plus its Gram matrix and
  polynomial and one more batch-sized product.
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

The CPU memory target of the earlier step-time issue is step transient <= 25%
of the largest parameter tensor (``tr/largest``).

Threads: ``--threads N`` sets the intra-op threads of every optimizer (torch
and XLA). On a CPU shared with other jobs, multi-threaded runs stall at
OpenMP barriers whenever a core is taken away, which penalises optimizers
made of many small operations; ``--threads 1`` gives stable ratios there.
"""

from __future__ import annotations

import argparse
import contextlib
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
GPT_SIZES = {
    # name: (vocab, context, d_model, layers, heads) of celo2.eval.tasks.GPT with its head tied to the embedding
    "gpt2-124m": (50257, 1024, 768, 12, 12),
    "gpt3-xl": (50257, 2048, 2048, 24, 16),
    "gpt-tiny": (64, 16, 16, 1, 2),  # the CPU smoke test's stand-in
}
TORCH_OPTS = ("adamw_foreach", "adamw_fused", "muon", "muon_fp32", "celo2_base", "celo2_fp32", "celo2_bf16")
TORCH_NS_DTYPES = {"muon": "bfloat16", "muon_fp32": "float32", "celo2_fp32": "float32", "celo2_bf16": "bfloat16"}
"""The Newton-Schulz dtype of each orthogonalising row (torch.optim.Muon always multiplies in bfloat16;
``muon_fp32`` is the same optimizer with its Newton-Schulz run in float32 by :func:`celo2.torch.ns.newton_schulz`)."""
JAX_OPTS = ("adamw", "muon", "celo2_base", "celo2", "celo2_base_xla", "celo2_xla")
STATE_DTYPES = ("float32", "bfloat16")
"""The state dtypes of ``--state-dtypes``; rows of another than float32 are ``KIND@DTYPE`` (Celo2 rows only)."""
LR = 1e-3


def _load_theta(path: str | None):  # noqa: ANN202
    """The given theta; else the published one beside the repo; else a fresh
    random theta (the step cost does not depend on theta's values)."""
    import celo2

    if path:
        return celo2.load_theta(path)
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "celo2_official_theta.state"
    return celo2.load_theta(shared) if shared.exists() else celo2.Theta.init(seed=0)


def gpt_model(size: str, device: Any = None):  # noqa: ANN201
    """The GPT of a ``GPT_SIZES`` entry: :class:`celo2.eval.tasks.GPT` (fused qkv, biases, pre-norm
    blocks) with its output head's weight tied to the token embedding, as GPT-2 and GPT-3 have it."""
    import torch

    from celo2.eval.tasks import GPT

    vocab, context, d, layers, heads = GPT_SIZES[size]
    with torch.device(device or "cpu"):
        model = GPT(vocab, context, d, layers, heads)
    model.head.weight = model.tok_embed.weight
    return model


def model_shapes(size: str) -> list[tuple[str, tuple[int, ...]]]:
    """Named parameter shapes of the benchmark model."""
    if size in GPT_SIZES:
        return [(n, tuple(p.shape)) for n, p in gpt_model(size, "meta").named_parameters()]
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
def _torch_params(size: str, seed: int = 0, device: str = "cpu"):
    import torch

    g = torch.Generator(device).manual_seed(seed)
    params = []
    for name, shape in model_shapes(size):
        p = torch.nn.Parameter(torch.empty(shape, device=device).normal_(0.0, 0.02, generator=g))
        p.grad = torch.empty(shape, device=device).normal_(0.0, 1e-3, generator=g)
        params.append((name, p))
    return params


def _muon_newton_schulz_fp32(grad, ns_coefficients, ns_steps, eps):  # noqa: ANN001, ANN202
    """Stands in for torch.optim.Muon's bfloat16 Newton-Schulz: the same iteration in float32."""
    import torch

    from celo2.rule import spec
    from celo2.torch.ns import newton_schulz

    if tuple(ns_coefficients) != spec.NS_COEFFS or ns_steps != spec.NS_STEPS:
        raise ValueError(f"muon_fp32 runs Celo2's Newton-Schulz ({spec.NS_COEFFS}, {spec.NS_STEPS} steps); "
                         f"Muon asked for {tuple(ns_coefficients)}, {ns_steps} steps")
    return newton_schulz(grad, dtype=torch.float32)


class _MuonWithAdamW:
    """torch.optim.Muon on hidden matrices, AdamW (foreach) on the rest; ``ns_fp32`` runs Muon's
    Newton-Schulz in float32 (torch's own multiplies in bfloat16)."""

    def __init__(self, named, ns_fp32: bool = False) -> None:  # noqa: ANN001
        import torch

        mats = [p for n, p in named if _is_muon(n, tuple(p.shape))]
        rest = [p for n, p in named if not _is_muon(n, tuple(p.shape))]
        self.opts = [torch.optim.Muon(mats, lr=LR), torch.optim.AdamW(rest, lr=LR, foreach=True)]
        self.ns_fp32 = ns_fp32

    def step(self) -> None:
        from unittest import mock

        with mock.patch("torch.optim._muon._zeropower_via_newtonschulz", _muon_newton_schulz_fp32) \
                if self.ns_fp32 else contextlib.nullcontext():
            for o in self.opts:
                o.step()

    def state_tensors(self):
        for o in self.opts:
            for st in o.state.values():
                yield from (v for v in st.values() if hasattr(v, "nbytes"))


def split_kind(kind: str) -> tuple[str, str]:
    """``"celo2_base@bfloat16"`` -> ``("celo2_base", "bfloat16")``; a kind without ``@`` has float32 state."""
    base, _, dtype = kind.partition("@")
    return base, dtype or "float32"


def with_state_dtypes(kinds: list[str], dtypes: list[str]) -> list[str]:
    """``kinds`` followed, per dtype other than float32, by each Celo2 kind's ``KIND@DTYPE`` row."""
    return kinds + [f"{k}@{d}" for d in dtypes if d != "float32" for k in kinds if k.startswith("celo2")]


def _torch_optimizer(kind: str, named, theta):  # noqa: ANN001
    import torch

    from celo2.torch import Celo2, Celo2Base

    kind, state_dtype = split_kind(kind)
    # Only a non-default state dtype is passed, so float32 rows run on any front end.
    state = {} if state_dtype == "float32" else {"state_dtype": state_dtype}
    if state and not kind.startswith("celo2"):
        raise ValueError(f"{kind}: only Celo2 rows take a state dtype (got {state_dtype})")
    ps = [p for _, p in named]
    if kind == "adamw_foreach":
        return torch.optim.AdamW(ps, lr=LR, foreach=True)
    if kind == "adamw_fused":
        return torch.optim.AdamW(ps, lr=LR, fused=True)
    if kind in ("muon", "muon_fp32"):
        return _MuonWithAdamW(named, ns_fp32=kind == "muon_fp32")
    if kind == "celo2_base":
        return Celo2Base(named, lr=LR, theta=theta, **state)
    if kind in ("celo2_fp32", "celo2_bf16"):
        return Celo2(named, lr=LR, theta=theta, ns_dtype=TORCH_NS_DTYPES[kind], **state)
    raise ValueError(f"unknown torch optimizer {kind!r}; expected one of {TORCH_OPTS}")


def _state_bytes(opt) -> int:  # noqa: ANN001
    if isinstance(opt, _MuonWithAdamW):
        return sum(t.nbytes for t in opt.state_tensors())
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if hasattr(v, "nbytes"))


def ns_workspace_bytes(kind: str, size: str, device: str = "cpu") -> int:
    """The scratch Newton-Schulz needs at its peak, by the shapes alone: the largest batch (one matrix for
    Muon, a shape group's batch for Celo2) in its dtype, its Gram matrix and polynomial, and one more
    batch-sized product; 0 for the rows that do not orthogonalise."""
    from celo2.rule import routing
    from celo2.torch.ns import batch_member_limit, plan_batches

    kind = split_kind(kind)[0]
    if kind not in TORCH_NS_DTYPES:
        return 0
    item = 2 if TORCH_NS_DTYPES[kind] == "bfloat16" else 4
    if kind.startswith("muon"):
        mats = [s for n, s in model_shapes(size) if _is_muon(n, s)]
        batches = [(1, min(s), max(s)) for s in mats]
    else:
        mats = [s for n, s in model_shapes(size) if len(s) >= 2 and routing.route(n, s) == routing.LEARNED]
        batches = [(sum(b.counts), *b.shape) for b in plan_batches(mats, max_member=batch_member_limit(device))]
    return max((item * n * (2 * r * c + 2 * r * r) for n, r, c in batches), default=0)


def _clock(device: str, cpu_time: bool = False):  # noqa: ANN202
    """A function timing ``fn()`` in seconds: CUDA events on a GPU; on the CPU the wall clock, or with
    ``cpu_time`` the CPU time of the whole process (``time.process_time``: every thread's, none of the time
    the process waits for a core, so that a CPU shared with other jobs still gives stable figures)."""
    import torch

    if device == "cpu":
        now = time.process_time if cpu_time else time.perf_counter

        def timed(fn) -> float:  # noqa: ANN001
            t0 = now()
            fn()
            return now() - t0
        return timed

    def timed_cuda(fn) -> float:  # noqa: ANN001
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    return timed_cuda


def _fresh_copies(base):  # noqa: ANN001, ANN202
    import torch

    named = []
    for name, p in base:
        q = torch.nn.Parameter(p.detach().clone())
        q.grad = p.grad  # shared, never modified by the optimizers
        named.append((name, q))
    return named


def torch_timing(size: str, kinds: list[str], repeats: int, warmup: int, theta_path: str | None,
                 device: str = "cpu", cpu_time: bool = False) -> dict[str, Any]:
    """Median step times. On the CPU every optimizer lives in one process and they step in rotating
    order; on a GPU they run one after the other (one optimizer's state in memory at a time), timed with
    CUDA events, and each one's memory is measured there too (``torch.cuda.max_memory_allocated``)."""
    theta = _load_theta(theta_path)
    base = _torch_params(size, device=device)
    if device != "cpu":
        return {k: _torch_cuda_row(k, base, theta, repeats, warmup, size) for k in kinds}
    timed = _clock(device, cpu_time)
    opts = {kind: _torch_optimizer(kind, _fresh_copies(base), theta) for kind in kinds}
    for opt in opts.values():
        for _ in range(warmup):
            opt.step()
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(repeats):
        order = kinds[r % len(kinds):] + kinds[: r % len(kinds)]
        for kind in order:
            times[kind].append(timed(opts[kind].step))
    return {k: {"median_s": statistics.median(v), "all_s": v, "state_bytes": _state_bytes(opts[k])}
            for k, v in times.items()}


def _torch_cuda_row(kind: str, base, theta, repeats: int, warmup: int, size: str) -> dict[str, Any]:  # noqa: ANN001
    """One optimizer on the GPU: its step times and the memory it adds (see the module doc)."""
    import gc

    import torch

    timed = _clock("cuda")
    named = _fresh_copies(base)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt = _torch_optimizer(kind, named, theta)
    opt.step()
    torch.cuda.synchronize()
    first_peak, kept = torch.cuda.max_memory_allocated() - before, torch.cuda.memory_allocated() - before
    for _ in range(max(0, warmup - 1)):
        opt.step()
    times = [timed(opt.step) for _ in range(repeats)]
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    transient = torch.cuda.max_memory_allocated() - start
    row = {"median_s": statistics.median(times), "all_s": times, "state_bytes": _state_bytes(opt),
           "peak_extra_bytes": first_peak, "kept_after_first_bytes": kept, "step_transient_bytes": transient,
           "largest_param_bytes": max(p.numel() * p.element_size() for _, p in base),
           "ns_workspace_bytes": ns_workspace_bytes(kind, size, "cuda")}
    del opt, named
    gc.collect()
    torch.cuda.empty_cache()
    return row


def torch_train_share(size: str, kinds: list[str], repeats: int, warmup: int, theta_path: str | None,
                      device: str, batch: int) -> dict[str, Any]:
    """The optimizer's share of a full training step of :func:`gpt_model` (forward and backward of the
    next-token loss on random tokens, bfloat16 autocast on a GPU, then the optimizer's step), each
    optimizer on the same initial model in turn."""
    import torch
    import torch.nn.functional as F

    theta = _load_theta(theta_path)
    vocab, context = GPT_SIZES[size][:2]
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in gpt_model(size, device).state_dict().items()}
    g = torch.Generator(device).manual_seed(1)
    tokens = torch.randint(vocab, (batch, context + 1), device=device, generator=g)
    timed = _clock(device)
    out = {}
    for kind in kinds:
        model = gpt_model(size, device)
        model.load_state_dict(init)
        opt = _torch_optimizer(kind, list(model.named_parameters()), theta)

        def forward_backward() -> None:
            with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=device != "cpu"):
                logits = model(tokens[:, :-1])
            F.cross_entropy(logits.float().reshape(-1, vocab), tokens[:, 1:].reshape(-1)).backward()

        fb, st = [], []
        for i in range(warmup + repeats):
            t_fb = timed(forward_backward)
            t_st = timed(opt.step)
            model.zero_grad(set_to_none=True)
            if i >= warmup:
                fb.append(t_fb)
                st.append(t_st)
        f, s = statistics.median(fb), statistics.median(st)
        out[kind] = {"forward_backward_s": f, "step_s": s, "share": s / (f + s), "all_step_s": st}
        del opt, model
    return {"model": size, "batch": batch, "tokens_per_step": batch * context,
            "num_params": sum(_numel(s) for _, s in model_shapes(size)), "rows": out}


def _proc_status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024


def torch_memory_worker(size: str, kind: str, theta_path: str | None) -> dict[str, Any]:
    """Runs in its own process: peak extra memory of one optimizer on the CPU (see module doc)."""
    import gc

    import torch

    theta = _load_theta(theta_path)
    params = _torch_params(size)
    # Warm the code paths (lazy imports, theta upload) on a tiny model.
    tiny = [(n, torch.nn.Parameter(torch.zeros([min(s, 4) for s in p.shape]))) for n, p in params]
    for _, p in tiny:
        p.grad = torch.ones_like(p)
    _torch_optimizer(kind, tiny, theta).step()
    del tiny
    gc.collect()

    def peak_then_reset() -> int:
        """The high-water mark since the last reset; then reset it to now."""
        peak = _proc_status("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")
        return peak

    peak_then_reset()
    before = _proc_status("VmRSS")
    opt = _torch_optimizer(kind, params, theta)
    opt.step()
    first_peak = peak_then_reset()
    after_first = _proc_status("VmRSS")
    transients = []
    for _ in range(2):  # steps 2 and 3: the peak over what each step starts with
        start = _proc_status("VmRSS")
        opt.step()
        transients.append(peak_then_reset() - start)
    largest = max(p.numel() * p.element_size() for _, p in params)
    return {"peak_extra_bytes": first_peak - before, "state_bytes": _state_bytes(opt), "largest_param_bytes": largest,
            "kept_after_first_bytes": after_first - before, "step_transient_bytes": max(transients),
            "ns_workspace_bytes": ns_workspace_bytes(kind, size)}


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
           "--device", opts.device, "--train-batch", str(opts.train_batch)]
    if opts.theta:
        cmd += ["--theta", opts.theta]
    if threads:
        cmd += ["--threads", str(threads)]
    if opts.clock != "wall":
        cmd += ["--clock", opts.clock]
    cmd += ["--_worker", *args]
    env = _worker_env(threads, args[0] == "torch-mem", args[0] == "jax-mem")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _mb(x: float | None) -> str:
    return f"{'-':>10s}" if x is None else f"{x / 2**20:10.1f}"


ORTH_REFERENCE = {"celo2_fp32": "muon_fp32", "celo2_bf16": "muon", "celo2": "muon", "celo2_xla": "muon"}
"""The Muon row each Celo2 row is compared with (the same Newton-Schulz dtype)."""


def memory_budget_bytes(row: dict[str, Any]) -> int | None:
    """The issue's bound on peak extra memory: state + 25% of the largest tensor + Newton-Schulz's workspace."""
    if row.get("state_bytes") is None or row.get("largest_param_bytes") is None:
        return None
    return row["state_bytes"] + row["largest_param_bytes"] // 4 + row.get("ns_workspace_bytes", 0)


def format_table(results: dict[str, Any]) -> str:
    lines = []
    for size, per in results["sizes"].items():
        n = per["num_params"]
        largest = per["largest_param_bytes"]
        lines.append(f"\n== {size}: {n:,} parameters, {len(model_shapes(size))} tensors, "
                     f"largest tensor {largest / 2**20:.2f} MiB (25% = {largest / 4 / 2**20:.2f} MiB) ==")
        for fw, base_ref in (("torch", "adamw_foreach"), ("jax", "adamw")):
            rows = per.get(fw)
            if not rows:
                continue
            if fw == "torch" and results.get("device", "cpu") != "cpu":
                base_ref = "adamw_fused"  # the GPU target is against fused AdamW
            # The JAX scratch columns that were measured (the memory-ordered ones come from their own process).
            heads = {"temp_bytes_memory_ordered": "mem-ord.", "train_temp_over_sgd_bytes": "train+",
                     "train_temp_over_sgd_bytes_memory_ordered": "train+ m-o"}
            keys = [k for k in heads if any(k in r for r in rows.values())]
            budget = fw == "torch" and any("peak_extra_bytes" in r for r in rows.values())
            lines.append(f"[{fw}]  {'optimizer':19s} {'median ms':>10s} {'ratio':>22s} "
                         f"{'state MiB':>10s} {'1st peak+':>10s} {'step tr.':>10s} {'tr/largest':>10s}"
                         + (f" {'budget':>10s} {'peak/bud.':>9s}" if budget else "")
                         + "".join(f" {heads[k]:>10s} {'/largest':>8s}" for k in keys))
            for kind, r in rows.items():
                t = r["median_s"] * 1e3
                if "@" in kind:  # another state dtype: against the same optimizer's float32 row
                    ref = split_kind(kind)[0]
                else:
                    ref = base_ref if kind.startswith("celo2_base") else ORTH_REFERENCE.get(kind)
                ratio = f"{r['median_s'] / rows[ref]['median_s']:.2f}x {ref}" if ref in rows else ""
                state, peak = r.get("state_bytes"), r.get("peak_extra_bytes")
                trans = r.get("step_transient_bytes", r.get("temp_bytes"))
                rel = "-" if trans is None else f"{trans / largest:.2f}"
                line = f"       {kind:19s} {t:10.1f} {ratio:>22s} {_mb(state)}{_mb(peak)}{_mb(trans)} {rel:>10s}"
                if budget:
                    bud = memory_budget_bytes(r)
                    line += f"{_mb(bud)} {'-' if bud is None or peak is None else f'{peak / bud:.2f}':>9s}"
                for key in keys:
                    x = r.get(key)
                    line += f" {_mb(x)} {'-' if x is None else f'{x / largest:.2f}':>8s}"
                lines.append(line)
    share = results.get("train_share")
    if share:
        lines.append(f"\n== training step of {share['model']} ({share['num_params']:,} parameters, batch "
                     f"{share['batch']} x {share['tokens_per_step'] // share['batch']} tokens) ==")
        lines.append(f"       {'optimizer':19s} {'fwd+bwd ms':>10s} {'step ms':>10s} {'share':>8s}")
        for kind, r in share["rows"].items():
            lines.append(f"       {kind:19s} {r['forward_backward_s'] * 1e3:10.1f} {r['step_s'] * 1e3:10.1f} "
                         f"{100 * r['share']:7.1f}%")
    lines.append("\nNewton-Schulz dtypes: " + ", ".join(f"{k} {v}" for k, v in TORCH_NS_DTYPES.items())
                 + f"; Celo2's ns_dtype='auto' is {results.get('torch_ns_dtype_auto', '?')} on this device.")
    lines.append("1st peak+: torch: memory added by building the optimizer and its first step (CPU: resident set, "
                 "with Python objects and threads; GPU: allocated bytes); JAX: state + scratch.\nstep tr.: the most a "
                 "later step adds on top of what it starts with (torch), or the compiled step's scratch (JAX).\n"
                 "budget: state + 25% of the largest tensor + Newton-Schulz workspace (largest batch, its Gram "
                 "matrices and one more product).\nmem-ord. (JAX): that scratch "
                 "when XLA schedules for memory (XLA_FLAGS=" + MEMORY_ORDERED_FLAG + ").\ntrain+ (JAX): "
                 "the scratch a training step whose gradients are made inside it needs over the same step with "
                 "optax.sgd; m-o: with the memory-ordered schedule.")
    return "\n".join(lines)


def with_ns_dtype_auto(result: Any, device: str) -> dict[str, Any]:
    """A PyTorch worker's ``result`` with the Newton-Schulz dtype Celo2's ``ns_dtype="auto"`` picks on
    ``device``: the table names it, and the worker has torch loaded already (no process of its own)."""
    from celo2.torch.ns import resolve_ns_dtype

    return {"result": result, "ns_dtype_auto": str(resolve_ns_dtype("auto", device)).removeprefix("torch.")}


def _jax_kinds(kinds: tuple[str, ...]) -> list[str]:
    """``_xla`` rows only where the CPU kernels exist to be compared with (the JAX CPU backend)."""
    import jax

    cpu = jax.default_backend() == "cpu"
    return [k for k in kinds if cpu or not k.endswith("_xla")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1m,10m", help=f"comma-separated, of {sorted(SIZES) + sorted(GPT_SIZES)}")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--frameworks", default="torch,jax")
    ap.add_argument("--torch-optimizers", default=",".join(TORCH_OPTS), help=f"subset of {TORCH_OPTS}")
    ap.add_argument("--jax-optimizers", default=",".join(JAX_OPTS), help=f"subset of {JAX_OPTS}")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads for every optimizer (default: library default)")
    ap.add_argument("--no-memory", action="store_true",
                    help="skip the memory subprocesses (torch on CPU: per optimizer; JAX: the memory-ordered compile)")
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda (GPU rows are timed with CUDA events, "
                    "their memory from torch.cuda.max_memory_allocated)")
    ap.add_argument("--train-share", default=None, metavar="MODEL",
                    help=f"also time a full training step of this GPT ({sorted(GPT_SIZES)}) with each torch optimizer")
    ap.add_argument("--train-batch", type=int, default=8, help="sequences per training step of --train-share")
    ap.add_argument("--state-dtypes", default="float32",
                    help=f"comma-separated, of {STATE_DTYPES}: each one after float32 adds a KIND@DTYPE row per torch "
                    "Celo2 row (state_dtype=DTYPE), timed beside its float32 row")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="torch CPU timing: wall clock (default) or the process's CPU time (all threads; stable on "
                    "a CPU shared with other jobs)")
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
            out = with_ns_dtype_auto(torch_timing(size, rest[0].split(","), args.repeats, args.warmup, args.theta,
                                                  args.device, args.clock == "cpu"), args.device)
        elif mode == "torch-train":
            out = with_ns_dtype_auto(torch_train_share(size, rest[0].split(","), args.repeats, args.warmup,
                                                       args.theta, args.device, args.train_batch), args.device)
        elif mode == "jax-time":
            out = jax_timing(size, _jax_kinds(tuple(rest[0].split(","))), args.repeats, args.warmup, args.theta)
        elif mode == "jax-mem":
            out = jax_memory_ordered(size, _jax_kinds(tuple(rest[0].split(","))), args.theta)
        elif mode == "torch-mem":
            out = torch_memory_worker(size, rest[0], args.theta)
        else:
            raise SystemExit(f"unknown worker mode {mode}")
        print(json.dumps(out))
        return 0

    unknown = sorted(set(args.sizes.split(",")) - set(SIZES) - set(GPT_SIZES))
    if unknown:
        ap.error(f"--sizes: unknown {unknown}; expected some of {sorted(SIZES) + sorted(GPT_SIZES)}")
    if args.train_share and args.train_share not in GPT_SIZES:
        ap.error(f"--train-share {args.train_share!r}: expected one of {sorted(GPT_SIZES)}")
    def optimizer_list(flag: str, value: str, known: tuple[str, ...]) -> list[str]:
        kinds = value.split(",")
        if set(kinds) - set(known):
            ap.error(f"{flag}: unknown {sorted(set(kinds) - set(known))}; expected {known}")
        return kinds

    torch_kinds = optimizer_list("--torch-optimizers", args.torch_optimizers, TORCH_OPTS)
    state_dtypes = args.state_dtypes.split(",")
    if set(state_dtypes) - set(STATE_DTYPES):
        ap.error(f"--state-dtypes: unknown {sorted(set(state_dtypes) - set(STATE_DTYPES))}; expected {STATE_DTYPES}")
    torch_kinds = with_state_dtypes(torch_kinds, state_dtypes)
    jax_kinds = optimizer_list("--jax-optimizers", args.jax_optimizers, JAX_OPTS)
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_model": cpu_model(),
                    "cpus": os.cpu_count(), "threads": args.threads, "loadavg_start": os.getloadavg()},
        "device": args.device,
        "clock": args.clock,
        "sizes": {},
    }
    frameworks = args.frameworks.split(",")

    def torch_worker(worker_args: list[str]) -> Any:
        """A PyTorch worker's measurement; the Newton-Schulz dtype it reports is kept for the table."""
        out = _run_worker(worker_args, args)
        results["torch_ns_dtype_auto"] = out["ns_dtype_auto"]
        return out["result"]

    for size in args.sizes.split(","):
        shapes = model_shapes(size)
        per: dict[str, Any] = {"num_params": sum(_numel(s) for _, s in shapes),
                               "largest_param_bytes": max(4 * _numel(s) for _, s in shapes)}
        if "torch" in frameworks:
            t0 = time.time()
            rows = torch_worker(["torch-time", size, ",".join(torch_kinds)])
            if not args.no_memory and args.device == "cpu":  # on a GPU the timing worker measured memory
                for kind in torch_kinds:
                    rows[kind].update(_run_worker(["torch-mem", size, kind], args))
            per["torch"] = rows
            print(f"[{size}] torch done in {time.time() - t0:.0f}s", file=sys.stderr)
        if "jax" in frameworks:
            t0 = time.time()
            per["jax"] = _run_worker(["jax-time", size, ",".join(jax_kinds)], args)
            if not args.no_memory:
                for kind, extra in _run_worker(["jax-mem", size, ",".join(jax_kinds)], args).items():
                    per["jax"][kind].update(extra)
            print(f"[{size}] jax done in {time.time() - t0:.0f}s", file=sys.stderr)
        results["sizes"][size] = per
    if args.train_share:
        t0 = time.time()
        results["train_share"] = torch_worker(["torch-train", args.train_share, ",".join(torch_kinds)])
        print(f"[{args.train_share}] training step done in {time.time() - t0:.0f}s", file=sys.stderr)
    results["machine"]["loadavg_end"] = os.getloadavg()
    table = format_table(results)
    results["table"] = table
    print(table)
    print(f"\nCPU: {results['machine']['cpu_model']}, {results['machine']['cpus']} CPUs; "
          f"load average (1, 5, 15 min) at start {results['machine']['loadavg_start']}, "
          f"at end {results['machine']['loadavg_end']}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
