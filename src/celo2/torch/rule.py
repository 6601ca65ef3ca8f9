"""The Celo2 rule on one tensor, in PyTorch.

The arithmetic mirrors :mod:`celo2.optax.rule`; every constant and the
feature order come from :mod:`celo2.rule.spec`. Accumulators are float32
whatever the parameter dtype, with the decay index as the leading axis.

Two implementations live here:

* :func:`reference_tensor_step` spells the rule out as the paper states it:
  all 30 channels built at full size, normalised, then the MLP. It is short,
  obviously right, and costs about 30x the tensor in memory.
* :func:`tensor_step` (used by the optimizers) computes the same numbers
  without ever building a full-size channel. Three facts make that possible:

  1. The first layer is linear in the normalised channels, so
     ``h = b0 + sum_c (w0[c] / rms_c) x_c``: the per-channel RMS is folded into
     the first-layer weights once the sums of squares are known.
  2. The 12 row/column channels are rank-1 broadcasts; their share of ``h``
     is an ``(8, rows)`` plus an ``(8, cols)`` term, computed on the small
     factored statistics.
  3. Everything else is per element (18 channels), so large tensors are
     processed in chunks of leading-axis slices that stay in cache: the
     chunk's ``(18, chunk)`` channels feed one small matrix product.

  For tensors with three or more dims the normalisation groups (last two
  axes) lie inside a chunk, so one pass after the accumulator update does all
  of it. For matrices and vectors the groups span the tensor: the accumulator
  pass also takes the sums of squares of the 12 channels that need no
  Adafactor factor (dot products on values already in cache), a light pass
  takes those of the 6 factored channels as matrix-vector products
  (``sum_ij x_ij^2 A_i^2 B_j^2``), and a last pass builds the channels of
  each chunk and runs the MLP. A matrix's direction is held whole until its
  RMS (and Newton-Schulz) is known; nothing else of full size is allocated.

The step never moves a value to the host (no ``.item()``, no data-dependent
Python branch), so it runs asynchronously on accelerators and traces under
``torch.compile``.

On the CPU, float32 matrices, vectors and conv kernels (4-D, factored over
their two leading axes) take the fused kernels of
:mod:`celo2.kernels.cpu` instead (when Numba is installed, and not under
``torch.compile``): the same numbers, faster, with no chunk workspace, and
Celo2-base no longer holds a matrix's direction. Other N-D tensors, other
dtypes and accelerators stay on the PyTorch path described above.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from celo2.rule import spec
from celo2.rule.theta import Theta
from celo2.kernels import cpu as cpu_kernels

USE_CPU_KERNELS: bool = cpu_kernels.AVAILABLE and os.environ.get("CELO2_CPU_KERNELS", "1") != "0"
"""Run float32 CPU tensors (matrices, vectors, conv kernels) through the fused
kernels of :mod:`celo2.kernels.cpu` (when Numba is installed). Set the environment
variable ``CELO2_CPU_KERNELS=0`` (or this flag) to use the PyTorch path."""

CHUNK_ELEMENTS: int = 1 << 16
"""Elements per chunk of the fast path (a chunk is whole slices of the leading
axis). Each chunk costs ~60 small operations of fixed Python/dispatch
overhead; measured on a 2-core Xeon, 64K-element chunks ran 10-25% faster
than 16K ones (the chunk's channels, 4.7 MB, still sit in L2 + L3) and
parallelise better. The chunk workspace is ``28 * CHUNK_ELEMENTS`` floats
(7.3 MB) whatever the tensor size; lower this to trade speed for memory."""

COMPILE_CHUNK_ELEMENTS: int = 1 << 20
"""Minimum chunk under ``torch.compile``, where chunk loops are unrolled into the graph."""

_CHANNELS = 18  # per-element channels of a matrix: groups 0-8 (15) + fac_m (3)
_VECTOR_CHANNELS = spec.NUM_VECTOR_FEATURES  # 15


def _group_rows() -> dict[str, list[int]]:
    """Rows of the (30, 8) first layer, by feature-group name."""
    rows, start = {}, 0
    for group in spec.FEATURE_GROUPS:
        rows[group.name] = list(range(start, start + group.width))
        start += group.width
    return rows


_ROWS = _group_rows()
# Channel order of the per-element work buffer: the 15 vector channels in
# spec order, then fac_m. The offsets below index that buffer.
_ELEMENT_ROWS = [r for g in spec.FEATURE_GROUPS[: spec.VECTOR_GROUPS] for r in _ROWS[g.name]] + _ROWS["fac_m"]
_RANK1_ROW_ROWS = _ROWS["row"] + _ROWS["rsqrt_row"]
_RANK1_COL_ROWS = _ROWS["col"] + _ROWS["rsqrt_col"]
_G, _CLIP, _P, _M, _V, _MRV, _RV, _FACG, _GRV, _FACM = 0, 1, 2, 3, 6, 7, 10, 11, 14, 15


@dataclass
class TorchTheta:
    """Theta as tensors on one device, laid out for the step."""

    w0: torch.Tensor  # (30, 8): first layer, groups concatenated in spec order
    b0: torch.Tensor  # (8,)
    w1: torch.Tensor  # (8, 8)
    b1: torch.Tensor  # (8,)
    w2: torch.Tensor  # (8,): the direction column of the last layer
    b2: torch.Tensor  # (): the direction bias

    @classmethod
    def from_theta(cls, theta: Theta, device: torch.device | str | None = None) -> "TorchTheta":
        def t(x):  # noqa: ANN001 - numpy in, tensor out
            return torch.as_tensor(x, dtype=torch.float32, device=device).contiguous()

        return cls(
            w0=t(theta.first_layer()),
            b0=t(theta["b0"]),
            w1=t(theta["w1"]),
            b1=t(theta["b1"]),
            w2=t(theta["w2"][:, spec.DIRECTION_OUTPUT]),
            b2=t(theta["b2"][spec.DIRECTION_OUTPUT]),
        )

    def layout(self) -> "_Layout":
        """The weights re-sliced for the fast path (computed once; theta is
        treated as read-only after construction)."""
        cached = self.__dict__.get("_layout")
        if cached is None or cached.w0 is not self.w0:
            cached = _Layout.build(self)
            self.__dict__["_layout"] = cached
        return cached


@dataclass
class _Layout:
    w0: torch.Tensor  # the TorchTheta.w0 this was built from (cache key)
    w_el: torch.Tensor  # (18, 8) first-layer rows of the per-element channels
    w_row: torch.Tensor  # (6, 8) rows of the row-statistic channels
    w_col: torch.Tensor  # (6, 8) rows of the column-statistic channels
    b0: torch.Tensor  # (8,)
    w1: torch.Tensor  # (8, 9) = [w1.T | b1]: the bias rides on a row of ones
    w2: torch.Tensor  # (1, 9) = [w2 | b2]
    momentum_w: torch.Tensor  # (3,) 1 - decay
    factored_w: torch.Tensor  # (3,) 1 - decay

    @classmethod
    def build(cls, th: TorchTheta) -> "_Layout":
        dev = th.w0.device
        idx = lambda rows: torch.as_tensor(rows, device=dev)  # noqa: E731
        return cls(
            w0=th.w0,
            w_el=th.w0.index_select(0, idx(_ELEMENT_ROWS)).contiguous(),
            w_row=th.w0.index_select(0, idx(_RANK1_ROW_ROWS)).contiguous(),
            w_col=th.w0.index_select(0, idx(_RANK1_COL_ROWS)).contiguous(),
            b0=th.b0,
            w1=torch.cat([th.w1.t(), th.b1.reshape(-1, 1)], dim=1).contiguous(),
            w2=torch.cat([th.w2.reshape(1, -1), th.b2.reshape(1, 1)], dim=1).contiguous(),
            momentum_w=1.0 - torch.tensor(spec.MOMENTUM_DECAYS, dtype=torch.float32, device=dev),
            factored_w=1.0 - torch.tensor(spec.FACTORED_DECAYS, dtype=torch.float32, device=dev),
        )

    def numpy(self) -> "_NumpyLayout":
        """The weights as float32 NumPy arrays for the CPU kernels (built once)."""
        cached = self.__dict__.get("_numpy")
        if cached is None:
            w1 = self.w1.detach().cpu().numpy()  # (8, 9) = [w1.T | b1]
            w2 = self.w2.detach().cpu().numpy()  # (1, 9) = [w2 | b2]
            cached = _NumpyLayout(
                w_el=self.w_el.detach().cpu().numpy().astype(np.float64),
                w1=np.ascontiguousarray(w1[:, :8].T),
                b1=np.ascontiguousarray(w1[:, 8]),
                w2=np.ascontiguousarray(w2[0, :8]),
                b2=np.float32(w2[0, 8]),
                b0=self.b0.detach().cpu().numpy(),
                momentum_w=self.momentum_w.detach().cpu().numpy(),
                factored_w=self.factored_w.detach().cpu().numpy(),
                w_row=self.w_row.detach().cpu().numpy(),
                w_col=self.w_col.detach().cpu().numpy(),
            )
            self.__dict__["_numpy"] = cached
        return cached


@dataclass
class _NumpyLayout:
    w_el: np.ndarray  # (18, 8) float64: scaled by the input RMS each step, then cast
    w1: np.ndarray  # (8, 8) (in, out)
    b1: np.ndarray  # (8,)
    w2: np.ndarray  # (8,)
    b2: np.float32
    b0: np.ndarray  # (8,)
    momentum_w: np.ndarray  # (3,) 1 - decay
    factored_w: np.ndarray  # (3,) 1 - decay
    w_row: np.ndarray  # (6, 8) first-layer rows of the row-statistic channels
    w_col: np.ndarray  # (6, 8) first-layer rows of the column-statistic channels


def work_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, ...]:
    """0-D tensors are treated as shape ``(1,)``."""
    return tuple(shape) if len(shape) else (1,)


def state_shapes(shape: torch.Size | tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The shape of each accumulator of a parameter of ``shape`` (all float32).

    Args:
        shape: The parameter's shape.

    Returns:
        ``{"m", "v", "fac_r", "fac_c"}`` -> shape, as :func:`init_tensor_state` makes them.
    """
    shape = work_shape(shape)
    k = len(spec.FACTORED_DECAYS)
    dims = spec.factored_dims(shape)
    if dims is None:
        fac_r, fac_c = (k, *shape), (k, 0)
    else:
        d1, d0 = dims
        fac_r = (k, *[s for i, s in enumerate(shape) if i != d0])
        fac_c = (k, *[s for i, s in enumerate(shape) if i != d1])
    return {"m": (len(spec.MOMENTUM_DECAYS), *shape), "v": shape, "fac_r": fac_r, "fac_c": fac_c}


def init_tensor_state(param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Zeroed accumulators for one parameter (see :class:`celo2.optax.rule.TensorState`)."""
    return {key: torch.zeros(s, dtype=torch.float32, device=param.device)
            for key, s in state_shapes(param.shape).items()}


# =============================================================================
# The straightforward formula (reference)
# =============================================================================
def _decays(values: tuple[float, ...], ndim: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).reshape((-1,) + (1,) * ndim)


def _safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    return torch.rsqrt(torch.clamp_min(x, spec.SAFE_RSQRT_FLOOR))


def _rms_normalise(x: torch.Tensor, eps: float, dims: tuple[int, ...]) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + eps)


def _adafactor_factors(
    fac_r: torch.Tensor, fac_c: torch.Tensor, dims: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column factors broadcastable against ``(3, *S)``."""
    d1, d0 = dims
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_mean = fac_r.mean(dim=1 + reduced_d1, keepdim=True)
    row_factor = _safe_rsqrt(fac_r / (row_mean + spec.ROW_MEAN_EPS))
    col_factor = _safe_rsqrt(fac_c)
    return row_factor.unsqueeze(1 + d0), col_factor.unsqueeze(1 + d1)


def update_accumulators(state: dict[str, torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """Reference: fold ``g`` into the accumulators in place; return the
    Adafactor-normalised ``g`` at full size."""
    nd = g.ndim
    state["m"].lerp_(g.unsqueeze(0).expand_as(state["m"]), 1.0 - _decays(spec.MOMENTUM_DECAYS, nd, g))
    g2 = g.square()
    state["v"].mul_(spec.RMS_DECAY).add_(g2, alpha=1.0 - spec.RMS_DECAY)
    gsq = g2 + spec.FACTORED_EPS
    dims = spec.factored_dims(g.shape)
    if dims is None:
        w = 1.0 - _decays(spec.FACTORED_DECAYS, nd, g)
        state["fac_r"].lerp_(gsq.unsqueeze(0).expand_as(state["fac_r"]), w)
        return g.unsqueeze(0) * _safe_rsqrt(state["fac_r"] + spec.VECTOR_FACTOR_EPS)
    d1, d0 = dims
    w = 1.0 - _decays(spec.FACTORED_DECAYS, nd - 1, g)
    state["fac_r"].lerp_(gsq.mean(dim=d0).unsqueeze(0).expand_as(state["fac_r"]), w)
    state["fac_c"].lerp_(gsq.mean(dim=d1).unsqueeze(0).expand_as(state["fac_c"]), w)
    row_factor, col_factor = _adafactor_factors(state["fac_r"], state["fac_c"], dims)
    return g.unsqueeze(0) * row_factor * col_factor


def features(state: dict[str, torch.Tensor], g: torch.Tensor, p: torch.Tensor, fac_g: torch.Tensor) -> list[torch.Tensor]:
    """Reference: the input channels, one full-size ``(width, *S)`` tensor per
    feature group, in spec order."""
    m, v = state["m"], state["v"]
    rsqrt_v = torch.rsqrt(v + spec.RSQRT_EPS)
    groups = [
        g.unsqueeze(0),
        g.clamp(-spec.FEATURE_CLIP, spec.FEATURE_CLIP).unsqueeze(0),
        p.unsqueeze(0),
        m,
        v.unsqueeze(0),
        m * rsqrt_v,
        rsqrt_v.unsqueeze(0),
        fac_g,
        (g * rsqrt_v).unsqueeze(0),
    ]
    dims = spec.factored_dims(g.shape)
    if dims is None:
        return groups
    d1, d0 = dims
    full = (m.shape[0], *g.shape)
    row = state["fac_r"].unsqueeze(1 + d0).expand(full)
    col = state["fac_c"].unsqueeze(1 + d1).expand(full)
    row_factor, col_factor = _adafactor_factors(state["fac_r"], state["fac_c"], dims)
    groups += [
        row,
        col,
        torch.rsqrt(row + spec.RSQRT_EPS),
        torch.rsqrt(col + spec.RSQRT_EPS),
        m * row_factor * col_factor,
    ]
    return groups


def reference_tensor_step(
    theta: TorchTheta,
    state: dict[str, torch.Tensor],
    grad: torch.Tensor,
    param: torch.Tensor,
    orthogonalize: bool,
) -> torch.Tensor:
    """The rule exactly as the spec states it (full-size channels); the fast
    :func:`tensor_step` is tested against this."""
    shape = param.shape
    work = work_shape(shape)
    g = grad.detach().to(torch.float32).reshape(work).clamp(-spec.GRAD_CLIP, spec.GRAD_CLIP)
    p = param.detach().to(torch.float32).reshape(work)
    fac_g = update_accumulators(state, g)
    groups = features(state, g, p, fac_g)
    dims = tuple(range(max(1, g.ndim - 1), g.ndim + 1))  # last two axes of (width, *S)
    channels = torch.cat([_rms_normalise(x, spec.INPUT_NORM_EPS, dims) for x in groups], dim=0)
    w0 = theta.w0[: channels.shape[0]]
    hidden = torch.relu(torch.tensordot(channels, w0, dims=([0], [0])) + theta.b0)
    hidden = torch.relu(hidden @ theta.w1 + theta.b1)
    direction = hidden @ theta.w2 + theta.b2
    if orthogonalize and g.ndim >= 2:
        direction = _reference_newton_schulz(direction)
    out_dims = tuple(range(max(0, g.ndim - 2), g.ndim))
    direction = _rms_normalise(direction, spec.OUTPUT_NORM_EPS, out_dims)
    return direction.reshape(shape)


def _reference_newton_schulz(x: torch.Tensor) -> torch.Tensor:
    a, b, c = spec.NS_COEFFS
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = x.mT
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + spec.NS_EPS)
    for _ in range(spec.NS_STEPS):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if transpose else x


# =============================================================================
# Newton-Schulz
# =============================================================================
NS_INPLACE_MIN = 1 << 16
"""Matrices above this many elements are orthogonalised in place, by column blocks."""


def newton_schulz(x: torch.Tensor, *, inplace: bool = False) -> torch.Tensor:
    """Approximately orthogonalise the last two axes (batched over leading axes).

    Each iteration is two fused multiply-adds (``addmm``/``baddbmm``), so the
    peak is two copies of ``x`` plus two Gram-sized matrices. ``inplace``
    lets the Frobenius pre-scaling reuse ``x``'s storage and, for a large
    matrix outside ``torch.compile``, the update too: column ``j`` of
    ``poly @ x`` depends on column ``j`` of ``x`` only, so ``x`` is updated
    a quarter of its columns at a time and the peak drops to ``x``, two
    Gram-sized matrices and a quarter of ``x`` (eighths measured 9% slower).
    """
    a, b, c = spec.NS_COEFFS
    transpose = x.shape[-2] > x.shape[-1]
    if transpose:
        x = x.mT
    scale = 1.0 / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + spec.NS_EPS)
    x = x.mul_(scale) if inplace else x * scale
    if x.ndim == 2:
        rows, cols = x.shape
        step = -(-cols // 4) if inplace and x.numel() > NS_INPLACE_MIN and not torch.compiler.is_compiling() else 0
        scratch = torch.empty(rows * step, dtype=x.dtype, device=x.device) if step else None
        for _ in range(spec.NS_STEPS):
            gram = x @ x.mT
            poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            if not step:
                x = torch.addmm(x, poly, x, beta=a)
                continue
            for j in range(0, cols, step):
                part = x[:, j : j + step]
                out = scratch[: rows * part.shape[1]].view(rows, part.shape[1])
                part.copy_(torch.addmm(part, poly, part, beta=a, out=out))
    else:
        lead = x.shape[:-2]
        x = x.reshape(-1, *x.shape[-2:])
        for _ in range(spec.NS_STEPS):
            gram = torch.bmm(x, x.mT)
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
        x = x.reshape(*lead, *x.shape[-2:])
    return x.mT if transpose else x


# =============================================================================
# The fast path
# =============================================================================
class _Workspace:
    """Flat float32 scratch reused across chunks (and, held by an optimizer,
    across tensors and steps, which spares the allocator's page faults)."""

    def __init__(self) -> None:
        self.buf: Optional[torch.Tensor] = None

    def get(self, numel: int, device: torch.device) -> torch.Tensor:
        if self.buf is None or self.buf.numel() < numel or self.buf.device != device:
            self.buf = None  # free the old one first
            self.buf = torch.empty(numel, dtype=torch.float32, device=device)
        return self.buf[:numel]


def _slice0(t: torch.Tensor, a: int, b: int, axis: int) -> torch.Tensor:
    """Rows ``a:b`` of ``axis`` unless ``t`` is broadcast (size 1) there."""
    return t if t.shape[axis] == 1 else t.narrow(axis, a, b - a)


def _clamp_grad_into(out: torch.Tensor, g: torch.Tensor) -> None:
    if g.dtype == torch.float32:
        torch.clamp(g, -spec.GRAD_CLIP, spec.GRAD_CLIP, out=out)
    else:
        out.copy_(g).clamp_(-spec.GRAD_CLIP, spec.GRAD_CLIP)


def _dot_into(out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
    """``out[k] = sum(x[k] * y[k])`` for ``(k, n)`` operands (``vecdot``: a
    batched ``bmm`` of 1 x n by n x 1 is many times slower on CPU)."""
    torch.linalg.vecdot(x, y, dim=-1, out=out)


# Per-chunk scratch layout, in multiples of the chunk size c.
_WS_X = 0  # channels (18c); pass-1 scratch (6c) and the second hidden layer (9c) reuse it
_WS_H = 18  # first hidden layer (9c, last row ones)
_WS_D = 27  # direction of one chunk (c), for tensors finished chunk by chunk
_WS_SIZE = 28


class _Tensor:
    """One tensor's step: views of its gradient, parameter and state in the
    work shape, and the quantities shared by all chunks."""

    def __init__(self, lay: _Layout, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
                 dims: Optional[tuple[int, int]], chunk_elements: int) -> None:
        self.lay = lay
        shape = work_shape(param.shape)
        self.shape = shape
        self.g = grad.detach().reshape(shape)
        self.p = param.detach().reshape(shape)
        self.m, self.v = state["m"], state["v"]
        self.fac_r, self.fac_c = state["fac_r"], state["fac_c"]
        self.dims = dims
        self.nd = len(shape)
        self.channels = _VECTOR_CHANNELS if dims is None else _CHANNELS
        inner = 1
        for s in shape[1:]:
            inner *= s
        self.inner = inner  # elements per leading-axis slice
        self.rows = max(1, min(shape[0], chunk_elements // max(inner, 1)))
        self.numel = shape[0] * inner
        self.device = param.device

    def chunks(self):
        for a in range(0, self.shape[0], self.rows):
            yield a, min(a + self.rows, self.shape[0])

    def num_chunks(self) -> int:
        return -(-self.shape[0] // self.rows)

    # -- pass 1: accumulators (and, for whole-tensor groups, most sums of squares) --
    def update(self, ws: torch.Tensor, sums: Optional[torch.Tensor] = None) -> None:
        """Fold the clipped gradient into every accumulator, chunk by chunk.

        With ``sums`` (a ``(chunks, 18)`` buffer), also write each chunk's sums
        of squares of the channels that need no Adafactor factor, computed from
        the values already in cache rather than from built channels.
        """
        lay, shape, nd = self.lay, self.shape, self.nd
        wm = lay.momentum_w.view(3, *([1] * nd))
        if self.dims is None:
            wf = lay.factored_w.view(3, *([1] * nd))
        else:
            d1, d0 = self.dims
            # Sums of g^2 over d0 / d1, kept with a size-1 axis there.
            sum_r = torch.zeros([1 if i == d0 else s for i, s in enumerate(shape)], device=self.device)
            sum_c = torch.zeros([1 if i == d1 else s for i, s in enumerate(shape)], device=self.device)
        for i, (a, b) in enumerate(self.chunks()):
            cs = (b - a, *shape[1:])
            c = (b - a) * self.inner
            g = ws[:c].view(cs)
            g2 = ws[c : 2 * c].view(cs)
            _clamp_grad_into(g, self.g[a:b])
            self.m[:, a:b].lerp_(g, wm)
            torch.mul(g, g, out=g2)
            self.v[a:b].mul_(spec.RMS_DECAY).add_(g2, alpha=1.0 - spec.RMS_DECAY)
            if sums is not None:
                self._chunk_sums(sums[i], a, b, g2.view(c), ws[2 * c : 6 * c])
            if self.dims is None:
                self.fac_r[:, a:b].lerp_(torch.add(g2, spec.FACTORED_EPS, out=ws[2 * c : 3 * c].view(cs)), wf)
                if sums is not None:
                    t3 = ws[3 * c : 6 * c].view(3, c)
                    torch.add(self.fac_r[:, a:b].reshape(3, c), spec.VECTOR_FACTOR_EPS, out=t3)
                    t3.clamp_min_(spec.SAFE_RSQRT_FLOOR).reciprocal_()
                    _dot_into(sums[i, _FACG:_FACG + 3], t3, g2.view(1, c).expand(3, c))
                continue
            for acc, axis in ((sum_r, d0), (sum_c, d1)):
                if axis == 0:
                    acc.add_(g2.sum(dim=0, keepdim=True))
                else:
                    torch.sum(g2, dim=axis, keepdim=True, out=acc[a:b])
        if self.dims is None:
            return
        self.fold_factored(sum_r, sum_c)

    def fold_factored(self, sum_d0: torch.Tensor, sum_d1: torch.Tensor) -> None:
        """Fold the sums of ``clip(g)^2`` over ``d0`` and over ``d1`` (any shape
        holding the tensor's shape without that axis) into the factored
        statistics, as their means plus ``FACTORED_EPS``."""
        d1, d0 = self.dims
        wf = self.lay.factored_w.view(3, *([1] * (self.nd - 1)))
        for fac, total, axis in ((self.fac_r, sum_d0, d0), (self.fac_c, sum_d1, d1)):
            fac.lerp_(total.reshape(fac.shape[1:]) * (1.0 / self.shape[axis]) + spec.FACTORED_EPS, wf)

    def _chunk_sums(self, out: torch.Tensor, a: int, b: int, g2: torch.Tensor, scratch: torch.Tensor) -> None:
        """Sums of squares of g, clip(g), p, m, v, m rsqrt(v), rsqrt(v), g rsqrt(v) over rows ``a:b``."""
        c = g2.numel()
        m = self.m[:, a:b].reshape(3, c)
        v = self.v[a:b].reshape(c)
        p = self.p[a:b].reshape(c)
        r, t3 = scratch[:c], scratch[c : 4 * c].view(3, c)
        torch.sum(g2, dim=0, out=out[_G])
        # clip(g)^2 = min(g^2, clip^2)
        torch.sum(torch.clamp(g2, max=spec.FEATURE_CLIP**2, out=r), dim=0, out=out[_CLIP])
        if p.dtype != torch.float32:
            p = r.copy_(p)
        torch.dot(p, p, out=out[_P])
        _dot_into(out[_M:_M + 3], m, m)
        torch.dot(v, v, out=out[_V])
        torch.add(v, spec.RSQRT_EPS, out=r).reciprocal_()  # rsqrt(v + eps)^2
        torch.sum(r, dim=0, out=out[_RV])
        torch.dot(g2, r, out=out[_GRV])
        torch.mul(m, r, out=t3)
        _dot_into(out[_MRV:_MRV + 3], t3, m)

    # -- shared per-tensor quantities ------------------------------------------------
    def prepare(self) -> None:
        """Adafactor factors and the rank-1 (row / column) share of the first layer."""
        if self.dims is None:
            return
        lay, nd = self.lay, self.nd
        d1, d0 = self.dims
        reduced_d1 = d1 - 1 if d1 > d0 else d1
        row_mean = self.fac_r.mean(dim=1 + reduced_d1, keepdim=True)
        rf = _safe_rsqrt(self.fac_r / (row_mean + spec.ROW_MEAN_EPS)).unsqueeze(1 + d0)
        cf = _safe_rsqrt(self.fac_c).unsqueeze(1 + d1)
        self.rf, self.cf = rf, cf  # (3, *S with 1 at d0 / d1)
        last2 = (nd - 1, nd)  # last two axes of (channel, *S)
        terms = []
        for stat, axis, w in ((self.fac_r, d0, lay.w_row), (self.fac_c, d1, lay.w_col)):
            x = torch.cat([stat, torch.rsqrt(stat + spec.RSQRT_EPS)]).unsqueeze(1 + axis)
            # RMS over the last two axes of the broadcast equals that of the
            # un-broadcast statistic: broadcasting repeats values evenly.
            x = x * torch.rsqrt(x.square().mean(dim=last2, keepdim=True) + spec.INPUT_NORM_EPS)
            terms.append(torch.tensordot(w, x, dims=([0], [0])))  # (8, *S with 1 at axis)
        # Kept apart: their sum would be a full (8, *S) tensor.
        self.terms = (terms[0] + lay.b0.view(8, *([1] * nd)), terms[1])

    def factor_sums(self, ws: torch.Tensor, sums: torch.Tensor) -> None:
        """Matrices: sums of squares of the six factored channels (fac_g, fac_m) into ``sums``.

        With ``F_k = A_k(row) B_k(col)``, ``sum (x F_k)^2 = sum_i A_k(i)^2
        sum_j x_ij^2 B_k(j)^2``: one matrix-vector product per chunk instead of
        building the channels.
        """
        R, C = self.shape
        # rf is broadcast along d0, so it varies along the rows when d0 is the
        # column axis (decided by the axes: sizes tie when a dimension is 1).
        rows_first = self.dims[1] == 1
        A = (self.rf if rows_first else self.cf).reshape(3, R)
        B = (self.cf if rows_first else self.rf).reshape(3, C)
        A2, B2 = A.square(), B.square()
        B2t = B2.t().contiguous()
        tg = torch.empty(R, 3, device=self.device)
        tm = torch.empty(3, R, 1, device=self.device)
        for a, b in self.chunks():
            c = (b - a) * C
            g = ws[:c].view(b - a, C)
            _clamp_grad_into(g, self.g[a:b])
            g.square_()
            torch.mm(g, B2t, out=tg[a:b])
            m2 = ws[c : 4 * c].view(3, b - a, C)
            torch.mul(self.m[:, a:b], self.m[:, a:b], out=m2)
            torch.bmm(m2, B2.view(3, C, 1), out=tm[:, a:b])
        sums[_FACG:_FACG + 3] = (tg * A2.t()).sum(0)
        sums[_FACM:_FACM + 3] = (tm.view(3, R) * A2).sum(1)

    # -- channels ------------------------------------------------------------------------
    def build(self, X: torch.Tensor, a: int, b: int) -> None:
        """The per-element channels of rows ``a:b`` into ``X`` (channels, *chunk)."""
        m, v = self.m[:, a:b], self.v[a:b]
        _clamp_grad_into(X[_G], self.g[a:b])
        torch.clamp(X[_G], -spec.FEATURE_CLIP, spec.FEATURE_CLIP, out=X[_CLIP])
        X[_P].copy_(self.p[a:b])
        X[_M:_M + 3].copy_(m)
        X[_V].copy_(v)
        rv = X[_RV]
        torch.add(v, spec.RSQRT_EPS, out=rv).rsqrt_()
        torch.mul(X[_M:_M + 3], rv, out=X[_MRV:_MRV + 3])
        torch.mul(X[_G], rv, out=X[_GRV])
        fac_g = X[_FACG:_FACG + 3]
        if self.dims is None:
            torch.add(self.fac_r[:, a:b], spec.VECTOR_FACTOR_EPS, out=fac_g)
            fac_g.clamp_min_(spec.SAFE_RSQRT_FLOOR).rsqrt_().mul_(X[_G])
        else:
            fac_m = X[_FACM:_FACM + 3]
            torch.mul(_slice0(self.rf, a, b, 1), _slice0(self.cf, a, b, 1), out=fac_m)
            torch.mul(fac_m, X[_G], out=fac_g)
            fac_m.mul_(X[_M:_M + 3])

    def mlp(self, ws: torch.Tensor, c: int, out: torch.Tensor, w_t: torch.Tensor, a: int, b: int) -> None:
        """Hidden layers and the direction output of one chunk into ``out``.

        The chunk's channels are at ``ws[_WS_X]``, already normalised or with
        the normalisation carried by ``w_t``; biases of the second and third
        layers ride on a row of ones appended to the hidden activations.
        """
        lay = self.lay
        X = ws[_WS_X * c : (_WS_X + self.channels) * c].view(self.channels, c)
        H = ws[_WS_H * c : (_WS_H + 9) * c].view(9, c)
        torch.mm(w_t, X, out=H[:8])
        if self.dims is None:
            H[:8].add_(lay.b0.view(8, 1))
        else:
            Hv = H[:8].view(8, b - a, *self.shape[1:])
            Hv.add_(_slice0(self.terms[0], a, b, 1)).add_(_slice0(self.terms[1], a, b, 1))
        H[:8].relu_()
        H[8].fill_(1.0)
        H2 = ws[_WS_X * c : (_WS_X + 9) * c].view(9, c)  # X is consumed
        torch.mm(lay.w1, H, out=H2[:8])
        H2[:8].relu_()
        H2[8].fill_(1.0)
        torch.mm(lay.w2, H2, out=out.view(1, c))


def _finish_group_normalised(d: torch.Tensor, orthogonalize: bool) -> torch.Tensor:
    """Newton-Schulz (optional) and unit RMS over the last two axes, in place where possible."""
    if orthogonalize and d.ndim >= 2:
        d = newton_schulz(d, inplace=True)
    axes = tuple(range(max(0, d.ndim - 2), d.ndim))
    ms = torch.linalg.vector_norm(d, dim=axes, keepdim=True).square_().mul_(1.0 / _numel_of(d, axes))
    return d.mul_(ms.add_(spec.OUTPUT_NORM_EPS).rsqrt_())


def _numel_of(x: torch.Tensor, axes: tuple[int, ...]) -> int:
    n = 1
    for a in axes:
        n *= x.shape[a]
    return n


def _run(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
         orthogonalize: bool, chunk_elements: Optional[int], workspace: Optional[_Workspace],
         apply: Optional[tuple[object, float]], dims: Optional[tuple[int, int]] = None,
         top: bool = True) -> Optional[torch.Tensor]:
    """The fast step. With ``apply=(lr, weight_decay)`` the parameter is updated
    in place (``p <- p (1 - lr wd) - lr direction``) and nothing is returned;
    otherwise the float32 direction is returned."""
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    if torch.compiler.is_compiling():
        # Traced: every chunk becomes graph nodes, so fewer, larger chunks
        # keep compile time in check; the compiler plans the scratch.
        chunk_elements = max(chunk_elements, COMPILE_CHUNK_ELEMENTS)
        workspace = None
    shape = work_shape(param.shape)
    if top:
        dims = spec.factored_dims(shape)
    if len(shape) >= 3 and 0 not in dims and math.prod(shape[1:]) > chunk_elements:
        # A leading slice alone exceeds a chunk and the factored axes lie inside
        # it: each slice is an independent (n-1)-D problem (its own groups,
        # factors and Newton-Schulz), so recurse with the axes shifted.
        return _run_slices(theta, state, grad, param, orthogonalize, chunk_elements, workspace, apply, dims)
    lay = theta.layout()
    t = _Tensor(lay, state, grad, param, dims, chunk_elements)
    kind = _cpu_kernel_kind(state, t.g, param, shape)
    if kind == "vector":
        return _run_vector_cpu(t, apply, param)
    if kind == "matrix":
        return _run_matrix_cpu(t, orthogonalize, apply, param)
    if kind == "conv":
        return _run_conv_cpu(t, orthogonalize, apply, param)
    size = _WS_SIZE * t.rows * t.inner
    ws = workspace.get(size, t.device) if workspace is not None else \
        torch.empty(size, dtype=torch.float32, device=t.device)
    ch = t.channels

    if t.nd >= 3:
        # Normalisation groups (last two axes) sit inside a chunk: one pass
        # after the accumulators, each chunk finished on its own.
        t.update(ws)
        t.prepare()
        out = None if apply is not None else torch.empty(shape, dtype=torch.float32, device=t.device)
        group = shape[-2] * shape[-1]
        w_t = lay.w_el.t()
        for a, b in t.chunks():
            c = (b - a) * t.inner
            cs = (b - a, *shape[1:])
            X = ws[: ch * c].view(ch, *cs)
            t.build(X, a, b)
            inv = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True).square_()
            X.mul_(inv.mul_(1.0 / group).add_(spec.INPUT_NORM_EPS).rsqrt_())
            d = ws[_WS_D * c : (_WS_D + 1) * c].view(cs) if out is None else out[a:b]
            t.mlp(ws, c, d, w_t, a, b)
            d = _finish_group_normalised(d, orthogonalize)
            if apply is not None:
                _apply_update(param, a, b, d, apply, None)
            elif d.data_ptr() != out[a:b].data_ptr() or d.stride() != out[a:b].stride():
                out[a:b].copy_(d)
        return None if apply is not None else out.reshape(param.shape)

    # Matrices and vectors: the groups span the tensor. Sums of squares first
    # (pass 1, plus a light pass for the factored channels of a matrix), then
    # the channels are built once more, chunk by chunk, for the MLP.
    partial = torch.empty(t.num_chunks(), _CHANNELS, device=t.device)
    t.update(ws, partial)
    t.prepare()
    sums = partial.sum(0)
    if t.dims is not None:
        t.factor_sums(ws, sums)
    inv = torch.rsqrt(sums[:ch] * (1.0 / t.numel) + spec.INPUT_NORM_EPS)
    w_t = (lay.w_el[:ch] * inv.view(ch, 1)).t().contiguous()
    out = torch.empty(shape, dtype=torch.float32, device=t.device)
    for a, b in t.chunks():
        c = (b - a) * t.inner
        t.build(ws[: ch * c].view(ch, b - a, *shape[1:]), a, b)
        t.mlp(ws, c, out[a:b], w_t, a, b)
    if orthogonalize and t.nd == 2:
        out = newton_schulz(out, inplace=True)
    ms = torch.linalg.vector_norm(out).square_().mul_(1.0 / t.numel).add_(spec.OUTPUT_NORM_EPS)
    if apply is None:
        return out.mul_(ms.rsqrt_()).reshape(param.shape)
    _apply_update(param, 0, shape[0], out, apply, ms.rsqrt_())
    return None


def _cpu_kernel_kind(state: dict[str, torch.Tensor], g: torch.Tensor, param: torch.Tensor,
                     shape: tuple[int, ...]) -> Optional[str]:
    """Which fused CPU kernels take this tensor (``"vector"``, ``"matrix"``,
    ``"conv"``), or ``None`` for the PyTorch path: float32 everywhere,
    contiguous, on the CPU, not traced by ``torch.compile``, and a shape the
    kernels cover (:func:`celo2.kernels.cpu.kernel_kind`)."""
    if not (USE_CPU_KERNELS and param.device.type == "cpu" and not torch.compiler.is_compiling()
            and param.dtype == torch.float32 and g.dtype == torch.float32
            and g.is_contiguous() and param.is_contiguous() and state["m"].is_contiguous()
            and state["v"].is_contiguous() and state["fac_r"].is_contiguous() and state["fac_c"].is_contiguous()
            and g.data_ptr() != param.data_ptr()):
        return None
    return cpu_kernels.kernel_kind(shape)


def runs_on_one_thread(state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
                       orthogonalize: bool) -> bool:
    """Whether :func:`apply_step` on this tensor is fused CPU kernels only
    (no multi-threaded PyTorch operation, no Newton-Schulz), so that whole
    tensors can be handed to threads (:func:`celo2.kernels.cpu.run_tensors`)."""
    shape = work_shape(param.shape)
    if param.numel() == 0 or grad.shape != param.shape:
        return False
    kind = _cpu_kernel_kind(state, grad, param, shape)
    return kind == "vector" or (kind is not None and not orthogonalize)


def _rows_cols(pair, rows_first: bool, width: int, rows: int, cols: int,  # noqa: ANN001
               *inner: int) -> tuple[np.ndarray, np.ndarray]:
    """``(row-varying, column-varying)`` NumPy views of a pair of broadcast
    tensors: the first of ``pair`` has a size-1 axis at ``d0``, the second at
    ``d1``; the first varies along the rows when ``d0`` is the column axis
    (``rows_first``). Decided by the axes, not the sizes, which tie when a
    dimension is 1."""
    r, c = pair if rows_first else pair[::-1]
    return r.reshape(width, rows, *inner).numpy(), c.reshape(width, cols, *inner).numpy()


def _run_matrix_cpu(t: "_Tensor", orthogonalize: bool, apply, param: torch.Tensor) -> Optional[torch.Tensor]:  # noqa: ANN001
    """The step of one float32 CPU matrix: three fused passes over it and one
    call on its row and column statistics (see :mod:`celo2.kernels.cpu`);
    same contract as :func:`_run`."""
    lay, k = t.lay, cpu_kernels
    R, C = t.shape
    g, p, m, v = t.g.numpy(), t.p.numpy(), t.m.numpy(), t.v.numpy()
    fac_r, fac_c = t.fac_r.numpy(), t.fac_c.numpy()
    k.check_operands("matrix", t.shape, {"grad": g, "param": p, "m": m, "v": v, "fac_r": fac_r, "fac_c": fac_c})
    per, nblk = k.blocks(R)
    row_sum = np.empty(R, np.float32)
    col_part = np.empty((nblk, C), np.float32)
    k.run_blocks(k.grad_stats, nblk, t.numel, g, per, row_sum, col_part)
    # The row statistic averages over d0, the column statistic over d1; the
    # first varies along the rows when d0 is the column axis (decided by the
    # axes: sizes tie when a dimension is 1).
    sum_over = {1: row_sum, 0: col_part.sum(0)}
    d1, d0 = t.dims
    nl = lay.numpy()
    rf, cf = np.empty_like(fac_r), np.empty_like(fac_c)
    term_r = np.empty((8, fac_r.shape[1]), np.float32)
    term_c = np.empty((8, fac_c.shape[1]), np.float32)
    args = (fac_r, fac_c, sum_over[d0], sum_over[d1], t.shape[d0], t.shape[d1], nl.factored_w, nl.w_row,
            nl.w_col, nl.b0, rf, cf, term_r, term_c)
    k.ensure_compiled(k.factors, args)
    k.factors(*args)
    A, B, TR, TC = (rf, cf, term_r, term_c) if d0 == 1 else (cf, rf, term_c, term_r)
    sums_part = np.empty((nblk, _CHANNELS), np.float64)
    k.run_blocks(k.accumulate, nblk, t.numel, g, p, m, v, nl.momentum_w, A * A, B * B, per, sums_part)
    W = k.normalised_first_layer(nl.w_el, sums_part.sum(0), t.numel)
    return _direction_cpu(t, apply, param, (g, p, m, v), A, B, TR, TC, W, orthogonalize)


def _direction_cpu(t: "_Tensor", apply, param: torch.Tensor, arrays, A, B, TR, TC, W,  # noqa: ANN001
                   orthogonalize: bool) -> Optional[torch.Tensor]:
    """Pass 3 of the CPU kernels and the finish: written out when returned or
    orthogonalised, else (Celo2-base) squared, then applied without being held."""
    k, nl = cpu_kernels, t.lay.numpy()
    g, p, m, v = arrays
    R, C = g.shape
    per, nblk = k.blocks(R)
    sq_part = np.empty(nblk, np.float64)

    def run(mode: int, out: np.ndarray, decay: float = 1.0, step: float = 0.0) -> float:
        k.run_blocks(k.direction, nblk, t.numel, g, p, m, v, A, B, TR, TC, W, nl.w1, nl.b1, nl.w2, nl.b2,
                     mode, np.float32(decay), np.float32(step), per, out, sq_part)
        return float(sq_part.sum())

    if orthogonalize or apply is None:
        out = torch.empty((R, C), dtype=torch.float32)
        run(k.WRITE, out.numpy())
        if orthogonalize:
            out = newton_schulz(out, inplace=True)
        ms = torch.linalg.vector_norm(out).square_().mul_(1.0 / t.numel).add_(spec.OUTPUT_NORM_EPS)
        if apply is None:
            return out.mul_(ms.rsqrt_()).reshape(param.shape)
        _apply_update(param, 0, t.shape[0], out.view(t.shape), apply, ms.rsqrt_())
        return None
    # Celo2-base: the direction is never held; its squares first, then applied.
    lr, wd = apply
    lr = float(lr)
    unused = np.empty((1, 1), np.float32)  # ``out`` is not touched in these modes
    scale = 1.0 / math.sqrt(run(k.SQUARES, unused) / t.numel + spec.OUTPUT_NORM_EPS)
    run(k.APPLY, unused, 1.0 - lr * wd, -lr * scale)
    return None


def _run_conv_cpu(t: "_Tensor", orthogonalize: bool, apply, param: torch.Tensor) -> Optional[torch.Tensor]:  # noqa: ANN001
    """The step of one float32 CPU conv kernel (O, I, kh, kw), factored over O
    and I, normalised per (kh, kw) window: a pass for the factored
    statistics, then one fused pass per window (see ``grouped`` in
    :mod:`celo2.kernels.cpu`); same contract as :func:`_run`."""
    k, lay = cpu_kernels, t.lay
    O, I = t.shape[:2]
    G = t.shape[2] * t.shape[3]
    k.check_operands("conv", t.shape, {"grad": t.g.numpy(), "param": t.p.numpy(), "m": t.m.numpy(),
                                       "v": t.v.numpy(), "fac_r": t.fac_r.numpy(), "fac_c": t.fac_c.numpy()})
    g, p = t.g.numpy().reshape(O, I, G), t.p.numpy().reshape(O, I, G)
    m, v = t.m.numpy().reshape(3, O, I, G), t.v.numpy().reshape(O, I, G)
    per, nblk = k.blocks(O)
    row_sum = np.empty((O, G), np.float32)
    col_part = np.empty((nblk, I, G), np.float32)
    k.run_blocks(k.group_grad_stats, nblk, t.numel, g, per, row_sum, col_part)
    sum_over = {1: torch.from_numpy(row_sum), 0: torch.from_numpy(col_part.sum(0))}
    d1, d0 = t.dims
    t.fold_factored(sum_over[d0], sum_over[d1])
    t.prepare()
    RF, CF = _rows_cols((t.rf, t.cf), d0 == 1, 3, O, I, G)
    TR, TC = _rows_cols(t.terms, d0 == 1, 8, O, I, G)
    nl = lay.numpy()
    W = nl.w_el.astype(np.float32)
    write = orthogonalize or apply is None
    if write:
        out = torch.empty(t.shape, dtype=torch.float32)
        dest, decay, step = out.numpy().reshape(O, I, G), 1.0, 0.0
    else:
        lr, wd = apply
        dest, decay, step = np.empty((1, 1, 1), np.float32), 1.0 - float(lr) * wd, -float(lr)
    k.run_blocks(k.grouped, nblk, t.numel, g, p, m, v, nl.momentum_w, RF, CF, TR, TC, W, nl.w1, nl.b1, nl.w2,
                 nl.b2, k.APPLY if not write else k.WRITE, np.float32(decay), np.float32(step), per, dest)
    if not write:
        return None
    d = _finish_group_normalised(out, orthogonalize)
    if apply is None:
        return d.reshape(param.shape)
    _apply_update(param, 0, O, d, apply, None)
    return None


def _run_vector_cpu(t: "_Tensor", apply, param: torch.Tensor) -> Optional[torch.Tensor]:  # noqa: ANN001
    """The step of one float32 CPU vector (or scalar): the accumulator pass,
    then the matrix direction kernel on it as one row; same contract as :func:`_run`."""
    k, nl, n = cpu_kernels, t.lay.numpy(), t.numel
    g, p, m, v, fac = t.g.numpy(), t.p.numpy(), t.m.numpy(), t.v.numpy(), t.fac_r.numpy()
    k.check_operands("vector", t.shape, {"grad": g, "param": p, "m": m, "v": v, "fac_r": fac})
    factor = np.empty((3, n), np.float32)
    sums = np.empty(_VECTOR_CHANNELS, np.float64)
    args = (g, p, m, v, fac, nl.momentum_w, nl.factored_w, factor, sums)
    k.ensure_compiled(k.vector_accumulate, args)
    k.vector_accumulate(*args)
    W = k.normalised_first_layer(nl.w_el, sums, n)  # rows of fac_m stay zero: vectors lack them
    return _direction_cpu(t, apply, param, (g.reshape(1, n), p.reshape(1, n), m.reshape(3, 1, n), v.reshape(1, n)),
                          np.ones((3, 1), np.float32), factor, nl.b0.reshape(8, 1), np.zeros((8, n), np.float32), W,
                          False)


def _run_slices(theta, state, grad, param, orthogonalize, chunk_elements, workspace, apply, dims):  # noqa: ANN001
    shape = work_shape(param.shape)
    g, p = grad.reshape(shape), param.reshape(shape)
    d1, d0 = dims
    out = None if apply is not None else torch.empty(shape, dtype=torch.float32, device=param.device)
    for e in range(shape[0]):
        sub = {"m": state["m"][:, e], "v": state["v"][e], "fac_r": state["fac_r"][:, e], "fac_c": state["fac_c"][:, e]}
        r = _run(theta, sub, g[e], p[e], orthogonalize, chunk_elements, workspace, apply, (d1 - 1, d0 - 1), top=False)
        if out is not None:
            out[e].copy_(r)
    return None if out is None else out.reshape(param.shape)


def _apply_update(param: torch.Tensor, a: int, b: int, d: torch.Tensor, apply, scale) -> None:  # noqa: ANN001
    """``p[a:b] <- p[a:b] (1 - lr wd) - lr * scale * d`` with ``d`` float32 scratch."""
    lr, wd = apply
    p = param.detach().reshape(work_shape(param.shape))[a:b]
    step = -lr if scale is None else scale * (-lr)
    if p.dtype in (torch.float32, torch.float64):
        # In the parameter's own dtype: float64 is never rounded through float32.
        if wd:
            p.mul_(1.0 - lr * wd)
        if p.dtype != d.dtype:
            p.add_(d.to(p.dtype).mul_(step))
        elif isinstance(step, torch.Tensor):
            p.addcmul_(d, step)
        else:
            p.add_(d, alpha=step)
    else:
        # Low-precision parameters: combine in float32 (in d's storage), round once.
        d.mul_(step).add_(p.to(torch.float32).mul_(1.0 - lr * wd) if wd else p.to(torch.float32))
        p.copy_(d)


def tensor_step(
    theta: TorchTheta,
    state: dict[str, torch.Tensor],
    grad: torch.Tensor,
    param: torch.Tensor,
    orthogonalize: bool,
    *,
    chunk_elements: Optional[int] = None,
) -> torch.Tensor:
    """One step of the rule on one tensor: update ``state`` in place, return the
    float32 direction (unit RMS over the last two axes, the parameter's shape).

    ``chunk_elements`` overrides :data:`CHUNK_ELEMENTS` (tests force tiny chunks).
    """
    if param.numel() == 0:
        return torch.zeros(param.shape, dtype=torch.float32, device=param.device)
    return _run(theta, state, grad, param, orthogonalize, chunk_elements, None, None)


def apply_step(
    theta: TorchTheta,
    state: dict[str, torch.Tensor],
    grad: torch.Tensor,
    param: torch.Tensor,
    orthogonalize: bool,
    lr,  # noqa: ANN001 - float or 0-d tensor
    weight_decay: float,
    *,
    chunk_elements: Optional[int] = None,
    workspace: Optional[_Workspace] = None,
) -> None:
    """The optimizer's step on one tensor: ``p <- p (1 - lr wd) - lr * direction``
    in place; tensors of three or more dims never hold their direction whole."""
    if param.numel() == 0:
        return
    _run(theta, state, grad, param, orthogonalize, chunk_elements, workspace, (lr, weight_decay))
