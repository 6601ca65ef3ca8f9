"""The chunked PyTorch path (``backend="torch"``): the rule without any full-size channel.

Used for every tensor the fused kernels do not take (accelerators without
Triton, other dtypes, N-D shapes the CPU kernels do not cover, and under
``torch.compile``). Three facts make it possible:

1. The first layer is linear in the normalised channels, so
   ``h = b0 + sum_c (w0[c] / rms_c) x_c``: the per-channel RMS is folded into
   the first-layer weights once the sums of squares are known.
2. The 12 row/column channels are rank-1 broadcasts; their share of ``h``
   is an ``(8, rows)`` plus an ``(8, cols)`` term, computed on the small
   factored statistics.
3. Everything else is per element (18 channels, in the order of
   :mod:`celo2.rule.layout`), so large tensors are processed in chunks of
   leading-axis slices that stay in cache: the chunk's ``(18, chunk)``
   channels feed one small matrix product.

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

Rule variants (:class:`celo2.rule.variant.RuleVariant`) run here too: the
decays are the variant's, the groups it leaves out have zero first-layer
weights (:meth:`celo2.torch._state.ChunkedWeights.of_variant`), the hidden
layers are as wide and as many as it says, and the direction is finished as
its ``output_norm`` and ``outputs`` say (a ``direction+magnitude`` variant
holds its magnitude at full size next to the direction). A variant runs on
whole tensors only: not sharded, and never handing its raw direction over.

bfloat16 state: :func:`run` steps a float32 copy of one tensor's
accumulators (16 bytes per element of that tensor, freed when its step
ends), so the arithmetic and the direction are float32 state's, then stores
each accumulator rounded (:func:`celo2.torch._rounding.store_state`: a block
at a time, each block with its offset into the whole accumulator).
"""

from __future__ import annotations

import math
from typing import Generator, Optional, Protocol, Sequence

import torch

from celo2.rule import layout, spec
from celo2.rule.state import STATE_KEYS, Factoring, factoring, work_shape
from celo2.rule.variant import MAGNITUDE_EXP_MULT, RuleVariant
from celo2.torch._rounding import TensorRounding, store_state, working_copy
from celo2.torch._state import ChunkedWeights, TorchTheta
from celo2.torch.backends.base import Apply, Options, StateRounding, apply_update, finish, group_sumsq, tensor_rounding
from celo2.torch.backends.reference import safe_rsqrt
from celo2.torch.ns import newton_schulz

CHUNK_ELEMENTS: int = 1 << 16
"""Elements per chunk of the fast path (a chunk is whole slices of the leading
axis). Each chunk costs ~60 small operations of fixed Python/dispatch
overhead, so chunks are as large as fits the cache: a chunk's channels
(4.7 MB at this size) stay in L2 + L3. The chunk workspace is
``WS_SIZE * CHUNK_ELEMENTS`` floats (7.3 MB) whatever the tensor size; lower
this to trade speed for memory (see docs/performance.md)."""

COMPILE_CHUNK_ELEMENTS: int = 1 << 20
"""Minimum chunk under ``torch.compile``, where chunk loops are unrolled into the graph."""

_CHANNELS = layout.MATRIX_CHANNELS  # 18 per-element channels of a matrix
_VECTOR_CHANNELS = layout.VECTOR_CHANNELS  # 15
_G, _CLIP, _P, _M, _V, _MRV, _RV, _FACG, _GRV, _FACM = (layout.CHANNEL_OFFSET[k] for k in (
    "g", "clip_g", "p", "m", "v", "m_rsqrt_v", "rsqrt_v", "fac_g", "g_rsqrt_v", "fac_m"))


class Workspace:
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


class Reduction(Protocol):
    """How a sharded tensor's whole-tensor statistics are completed across ranks.

    The chunked path then runs on one rank's local block of the tensor (a
    slice along one axis of the work shape) and, wherever a mean or a sum of
    squares spans that axis, adds up the ranks' partial sums with
    :meth:`sum_` (small tensors: per-channel sums, a factored statistic)
    instead of gathering the tensor. :class:`celo2.torch._sharded.Sharding`
    implements it.

    Attributes:
        axis: The sharded axis of the work shape.
        global_shape: The whole tensor's work shape.
    """

    axis: int
    global_shape: tuple[int, ...]

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks in place (every rank gets the total) and return it."""


Partials = Generator[torch.Tensor, None, None]
"""A step written as a generator: it yields each partial sum to be completed across ranks (summed in
place by whoever drives it, before it resumes); :func:`steps` puts its result in a box. (Results do not
travel as generator return values: ``torch.compile`` traces a plain ``for`` over the generator, which
yields nothing for an unsharded tensor.)"""


# Per-chunk scratch layout, in multiples of the chunk size c.
_WS_X = 0  # channels (18c); pass-1 scratch (6c) and the second hidden layer (9c) reuse it
_WS_H = 18  # first hidden layer (9c, last row ones)
_WS_D = 27  # direction of one chunk (c), for tensors finished chunk by chunk
WS_SIZE: int = 28
"""Floats of chunk workspace per element of a chunk (the published rule; see :func:`workspace_layout`)."""


def workspace_layout(lay: ChunkedWeights) -> tuple[int, int, int]:
    """Where the hidden layer and the direction sit in a chunk's workspace, and its size, in multiples of
    the chunk size: ``(hidden, direction, size)``.

    The channels' region also holds every other hidden layer (``width + 1`` rows each), so it is at
    least that long; a ``direction+magnitude`` variant's magnitude follows the direction.
    Published: ``(_WS_H, _WS_D, WS_SIZE)``.
    """
    rows = lay.width + 1
    hidden = max(_WS_H, rows)
    direction = hidden + rows
    return hidden, direction, direction + 1 + (lay.w2.shape[0] - 1)


class ChunkedTensor:
    """One tensor's step on the chunked path: views of its gradient, parameter
    and state in the work shape, and the quantities shared by all chunks.

    Its passes (:meth:`update`, :meth:`prepare`, :meth:`build`, :meth:`mlp`)
    are also the pieces the Numba backend's conv step reuses.

    Args:
        lay: The weights as the chunked path multiplies them.
        state: The accumulators (views in the work shape).
        grad: The gradient.
        param: The parameter.
        factored: How the (whole) tensor is factored, or ``None`` for a vector.
        chunk_elements: Elements per chunk.
        shard: The cross-rank reduction of a sharded tensor (see :class:`Reduction`).
    """

    def __init__(self, lay: ChunkedWeights, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
                 factored: Optional[Factoring], chunk_elements: int, shard: Optional[Reduction] = None) -> None:
        self.lay = lay
        shape = work_shape(param.shape)
        self.shape = shape  # this rank's block (the whole tensor unless sharded)
        self.shard = shard
        self.global_shape = shape if shard is None else tuple(shard.global_shape)
        self.g = grad.detach().reshape(shape)
        self.p = param.detach().reshape(shape)
        self.m, self.v = state["m"], state["v"]
        self.fac_r, self.fac_c = state["fac_r"], state["fac_c"]
        self.factored = factored
        self.nd = len(shape)
        self.channels = _VECTOR_CHANNELS if factored is None else _CHANNELS
        inner = 1
        for s in shape[1:]:
            inner *= s
        self.inner = inner  # elements per leading-axis slice
        self.rows = max(1, min(shape[0], chunk_elements // max(inner, 1)))
        self.numel = math.prod(self.global_shape)  # the normalisation group's size (matrices, vectors)
        self.device = param.device

    def sharded_along(self, axes) -> bool:  # noqa: ANN001
        """Whether a statistic over ``axes`` (of the work shape) spans the sharded axis."""
        return self.shard is not None and self.shard.axis in tuple(axes)

    def chunks(self):
        for a in range(0, self.shape[0], self.rows):
            yield a, min(a + self.rows, self.shape[0])

    def num_chunks(self) -> int:
        return -(-self.shape[0] // self.rows)

    # -- pass 1: accumulators (and, for whole-tensor groups, most sums of squares) --
    def update(self, ws: torch.Tensor, sums: Optional[torch.Tensor] = None) -> Partials:
        """Fold the clipped gradient into every accumulator, chunk by chunk.

        With ``sums`` (a ``(chunks, 18)`` buffer), also write each chunk's sums
        of squares of the channels that need no Adafactor factor, computed from
        the values already in cache rather than from built channels.
        """
        lay, shape, nd = self.lay, self.shape, self.nd
        wm = lay.momentum_w.view(3, *([1] * nd))
        if self.factored is None:
            wf = lay.factored_w.view(3, *([1] * nd))
        else:
            d1, d0 = self.factored.d1, self.factored.d0
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
            self.v[a:b].mul_(lay.rms_decay).add_(g2, alpha=1.0 - lay.rms_decay)
            if sums is not None:
                self._chunk_sums(sums[i], a, b, g2.view(c), ws[2 * c : 6 * c])
            if self.factored is None:
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
        if self.factored is None:
            return
        if self.sharded_along((d0,)):
            yield sum_r
        if self.sharded_along((d1,)):
            yield sum_c
        self.fold_factored(sum_r, sum_c)

    def fold_factored(self, sum_d0: torch.Tensor, sum_d1: torch.Tensor) -> None:
        """Fold the sums of ``clip(g)^2`` over ``d0`` and over ``d1`` (any shape
        holding the tensor's shape without that axis) into the factored
        statistics, as their means plus ``FACTORED_EPS``."""
        d1, d0 = self.factored.d1, self.factored.d0
        wf = self.lay.factored_w.view(3, *([1] * (self.nd - 1)))
        for fac, total, axis in ((self.fac_r, sum_d0, d0), (self.fac_c, sum_d1, d1)):
            fac.lerp_(total.reshape(fac.shape[1:]) * (1.0 / self.global_shape[axis]) + spec.FACTORED_EPS, wf)

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
    def prepare(self) -> Partials:
        """Adafactor factors and the rank-1 (row / column) share of the first layer."""
        if self.factored is None:
            return
        lay, nd = self.lay, self.nd
        d1, d0 = self.factored.d1, self.factored.d0
        reduced_d1 = d1 - 1 if d1 > d0 else d1
        if self.sharded_along((d1,)):  # the mean over d1, completed across ranks
            row_mean = self.fac_r.sum(dim=1 + reduced_d1, keepdim=True)
            yield row_mean
            row_mean = row_mean.mul_(1.0 / self.global_shape[d1])
        else:
            row_mean = self.fac_r.mean(dim=1 + reduced_d1, keepdim=True)
        rf = safe_rsqrt(self.fac_r / (row_mean + spec.ROW_MEAN_EPS)).unsqueeze(1 + d0)
        cf = safe_rsqrt(self.fac_c).unsqueeze(1 + d1)
        self.rf, self.cf = rf, cf  # (3, *S with 1 at d0 / d1)
        last2 = (nd - 1, nd)  # last two axes of (channel, *S)
        terms = []
        for stat, axis, w in ((self.fac_r, d0, lay.w_row), (self.fac_c, d1, lay.w_col)):
            x = torch.cat([stat, torch.rsqrt(stat + spec.RSQRT_EPS)]).unsqueeze(1 + axis)
            # RMS over the last two axes of the broadcast equals that of the
            # un-broadcast statistic: broadcasting repeats values evenly.
            spans = [a for a in (nd - 2, nd - 1) if a != axis]  # tensor axes the statistic varies along
            if self.sharded_along(spans):
                count = math.prod(self.global_shape[a] for a in spans)
                ms = x.square().sum(dim=last2, keepdim=True)
                yield ms
                ms = ms.mul_(1.0 / count)
            else:
                ms = x.square().mean(dim=last2, keepdim=True)
            x = x * torch.rsqrt(ms + spec.INPUT_NORM_EPS)
            terms.append(torch.tensordot(w, x, dims=([0], [0])))  # (8, *S with 1 at axis)
        # Kept apart: their sum would be a full (8, *S) tensor.
        self.terms = (terms[0] + lay.b0.view(lay.width, *([1] * nd)), terms[1])

    def factor_sums(self, ws: torch.Tensor, sums: torch.Tensor) -> None:
        """Matrices: sums of squares of the six factored channels (fac_g, fac_m) into ``sums``.

        With ``F_k = A_k(row) B_k(col)``, ``sum (x F_k)^2 = sum_i A_k(i)^2
        sum_j x_ij^2 B_k(j)^2``: one matrix-vector product per chunk instead of
        building the channels.
        """
        R, C = self.shape
        # rf is broadcast along d0, so it varies along the rows when d0 is the column axis.
        rows_first = self.factored.rows_first
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
        if self.factored is None:
            torch.add(self.fac_r[:, a:b], spec.VECTOR_FACTOR_EPS, out=fac_g)
            fac_g.clamp_min_(spec.SAFE_RSQRT_FLOOR).rsqrt_().mul_(X[_G])
        else:
            fac_m = X[_FACM:_FACM + 3]
            torch.mul(_slice0(self.rf, a, b, 1), _slice0(self.cf, a, b, 1), out=fac_m)
            torch.mul(fac_m, X[_G], out=fac_g)
            fac_m.mul_(X[_M:_M + 3])

    def mlp(self, ws: torch.Tensor, c: int, out: torch.Tensor, w_t: torch.Tensor, a: int, b: int,
            magnitude: Optional[torch.Tensor] = None) -> None:
        """Hidden layers and the direction output of one chunk into ``out`` (and, for a
        ``direction+magnitude`` variant, the magnitude output into ``magnitude``).

        The chunk's channels are at ``ws[_WS_X]``, already normalised or with
        the normalisation carried by ``w_t``; biases of the later layers ride
        on a row of ones appended to the hidden activations, which alternate
        between the hidden region and the (consumed) channels' region.
        """
        lay = self.lay
        h = lay.width
        at = workspace_layout(lay)[0]
        X = ws[_WS_X * c : (_WS_X + self.channels) * c].view(self.channels, c)
        H = ws[at * c : (at + h + 1) * c].view(h + 1, c)
        torch.mm(w_t, X, out=H[:h])
        if self.factored is None:
            H[:h].add_(lay.b0.view(h, 1))
        else:
            Hv = H[:h].view(h, b - a, *self.shape[1:])
            Hv.add_(_slice0(self.terms[0], a, b, 1)).add_(_slice0(self.terms[1], a, b, 1))
        H[:h].relu_()
        H[h].fill_(1.0)
        other = ws[_WS_X * c : (_WS_X + h + 1) * c].view(h + 1, c)  # X is consumed
        for w in lay.hidden:
            torch.mm(w, H, out=other[:h])
            other[:h].relu_()
            other[h].fill_(1.0)
            H, other = other, H
        torch.mm(lay.w2[:1], H, out=out.view(1, c))
        if magnitude is not None:
            torch.mm(lay.w2[1:2], H, out=magnitude.view(1, c))


def finish_variant(d: torch.Tensor, magnitude: Optional[torch.Tensor], variant: RuleVariant, *,
                   orthogonalize: bool = False, param: Optional[torch.Tensor] = None,
                   apply: Optional[Apply] = None, rows: Optional[tuple[int, int]] = None,
                   count: Optional[int] = None) -> Optional[torch.Tensor]:
    """:func:`celo2.torch.backends.base.finish` for a rule variant other than the published one.

    Newton-Schulz (optional, float32), the output RMS where ``variant.output_norm`` is ``"rms"``,
    the factor ``exp(MAGNITUDE_EXP_MULT * magnitude)`` where there is a magnitude, then return or apply.

    Args:
        d: The raw direction in the work shape (float32; scratch, changed in place).
        magnitude: The magnitude output, ``d``'s shape (scratch), or ``None``.
        variant: The rule variant.
        orthogonalize: Newton-Schulz first, on tensors of two or more dims.
        param: The parameter to update (with ``apply``).
        apply: ``(lr, weight_decay)``: update ``param`` and return ``None``; ``None``: return the direction.
        rows: ``d`` holds only rows ``a:b`` of the work shape's leading axis (default: all).
        count: The number of elements of a normalisation group (default: the last two axes of ``d``).

    Returns:
        With ``apply``, ``None``; else the finished direction (float32).
    """
    if orthogonalize and d.ndim >= 2:
        d = newton_schulz(d, inplace=True)
    d = d.to(torch.float32)
    if variant.output_norm == "rms":
        if count is None:
            count = d.shape[-1] * (d.shape[-2] if d.ndim >= 2 else 1)
        d.mul_(group_sumsq(d).mul_(1.0 / count).add_(spec.OUTPUT_NORM_EPS).rsqrt_())
    if magnitude is not None:
        d.mul_(magnitude.mul_(MAGNITUDE_EXP_MULT).exp_())
    if apply is None:
        return d
    a, b = rows if rows is not None else (0, work_shape(param.shape)[0])
    apply_update(param, a, b, d, apply, None)
    return None


def run(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
        orthogonalize: bool, apply: Optional[tuple[object, float]], *, raw: bool = False,
        chunk_elements: Optional[int] = None, workspace: Optional[Workspace] = None,
        factored: Optional[Factoring] = None, top: bool = True,
        shard: Optional[Reduction] = None,
        rounding: Optional[TensorRounding] = None) -> Optional[torch.Tensor]:
    """One tensor's step on the chunked path (:func:`steps`, its partial sums completed by ``shard.sum_``).

    Arguments as :func:`steps`, and ``rounding``: with bfloat16 accumulators (a whole tensor's, not a
    shard's), their seed, step and index; the step runs on float32 copies and stores them rounded.

    Returns:
        The direction (float32, the parameter's shape), the raw direction, or ``None``.
    """
    if rounding is not None:
        work = working_copy(state, STATE_KEYS)
        out = run(theta, work, grad, param, orthogonalize, apply, raw=raw, chunk_elements=chunk_elements,
                  workspace=workspace, factored=factored, top=top, shard=shard)
        store_state(state, work, rounding, STATE_KEYS)
        return out
    box: dict = {}
    for partial in steps(theta, state, grad, param, orthogonalize, apply, raw=raw, chunk_elements=chunk_elements,
                         workspace=workspace, factored=factored, top=top, shard=shard, box=box):
        shard.sum_(partial)
    return box.get("result")


def run_local(gen: Partials) -> None:
    """Run a pass of an unsharded tensor, which yields no partial sums."""
    for _ in gen:
        raise RuntimeError("an unsharded tensor's pass yielded a partial sum to complete across ranks")


def run_together(gens: list[Partials], sum_flat) -> None:  # noqa: ANN001
    """Drive several :func:`steps` generators in lock step, completing each round's partial sums with one
    ``sum_flat`` call on their concatenation (float32), so that ``k`` tensors cost one collective per round
    instead of ``k``. Every rank must drive the same tensors in the same order.

    Args:
        gens: The steps of the tensors of one shard group (their results land in their boxes).
        sum_flat: Sums a flat float32 tensor across the ranks in place.
    """
    live = list(gens)
    while live:
        pending = [(gen, next(gen, None)) for gen in live]
        pending = [(gen, p) for gen, p in pending if p is not None]
        if pending:
            parts = [p for _, p in pending]
            flat = sum_flat(torch.cat([p.reshape(-1).to(torch.float32) for p in parts]))
            for p, total in zip(parts, flat.split([p.numel() for p in parts])):
                p.copy_(total.view(p.shape))
        live = [gen for gen, _ in pending]


def steps(theta: TorchTheta, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor,
          orthogonalize: bool, apply: Optional[tuple[object, float]], *, raw: bool = False,
          chunk_elements: Optional[int] = None, workspace: Optional[Workspace] = None,
          factored: Optional[Factoring] = None, top: bool = True,
          shard: Optional[Reduction] = None, box: Optional[dict] = None) -> Partials:
    """One tensor's step on the chunked path, as a generator of the partial sums a sharded tensor needs
    completed (none without ``shard``; see :data:`Partials`).

    Args:
        theta: The weights on the tensor's device.
        state: Its accumulators, updated in place.
        grad: Its gradient (any float dtype, the parameter's shape).
        param: The parameter (non-empty).
        orthogonalize: Newton-Schulz on tensors of two or more dims.
        apply: ``(lr, weight_decay)``: update the parameter in place,
            ``p <- p (1 - lr wd) - lr direction``, and return ``None``; ``None``:
            return the direction.
        raw: With ``apply=None`` and a matrix or vector, return the raw
            direction (float32, work shape: before Newton-Schulz and the
            output RMS) for the caller to finish.
        chunk_elements: Elements per chunk (default :data:`CHUNK_ELEMENTS`).
        workspace: Chunk scratch reused across tensors (default: a fresh one).
        factored: How the tensor is factored (internal: slices recurse with
            the axes shifted; with ``shard``, that of the whole tensor).
        top: Whether this is the whole tensor (internal).
        shard: ``param``, ``grad`` and ``state`` are one rank's block of a
            tensor sharded along ``shard.axis``; the statistics spanning that
            axis are yielded as partial sums (see :class:`Reduction`).
            The raw direction (``raw=True``) is then this rank's block of it.
            Tensors of three or more dims may be sharded along any axis but
            the last two.
        box: Receives the result under ``"result"``: the direction (float32,
            the parameter's shape), the raw direction, or ``None``.

    Yields:
        The partial sums to complete across ranks (none without ``shard``).
    """
    box = {} if box is None else box
    chunk_elements = chunk_elements or CHUNK_ELEMENTS
    if torch.compiler.is_compiling():
        # Traced: every chunk becomes graph nodes, so fewer, larger chunks
        # keep compile time in check; the compiler plans the scratch.
        chunk_elements = max(chunk_elements, COMPILE_CHUNK_ELEMENTS)
        workspace = None
    shape = work_shape(param.shape)
    variant = theta.variant
    if not variant.is_published and (raw or shard is not None):
        raise ValueError(f"the chunked path runs rule variant {variant.label} on whole tensors only: "
                         "not sharded and without handing over its raw direction")
    if shard is not None:
        nd = len(shard.global_shape)
        if nd >= 2 and shard.axis >= nd - 2 and (nd >= 3 or (orthogonalize and not raw)):
            raise ValueError(f"the chunked path cannot finish a block sharded along axis {shard.axis} of a "
                             f"{tuple(shard.global_shape)} tensor on one rank (its normalisation groups or "
                             f"Newton-Schulz span that axis): take the raw direction")
    if top:
        factored = factoring(shape if shard is None else shard.global_shape)
    if shard is None and len(shape) >= 3 and 0 not in (factored.d1, factored.d0) \
            and math.prod(shape[1:]) > chunk_elements:
        # A leading slice alone exceeds a chunk and the factored axes lie inside
        # it: each slice is an independent (n-1)-D problem (its own groups,
        # factors and Newton-Schulz), so recurse with the axes shifted.
        box["result"] = _run_slices(theta, state, grad, param, orthogonalize, chunk_elements, workspace, apply,
                                    factored)
        return
    lay = theta.layout()
    t = ChunkedTensor(lay, state, grad, param, factored, chunk_elements, shard)
    _, at_d, ws_size = workspace_layout(lay)
    with_magnitude = lay.w2.shape[0] > 1
    size = ws_size * t.rows * t.inner
    ws = workspace.get(size, t.device) if workspace is not None else \
        torch.empty(size, dtype=torch.float32, device=t.device)
    ch = t.channels

    if t.nd >= 3:
        # Normalisation groups (last two axes) sit inside a chunk: one pass
        # after the accumulators, each chunk finished on its own.
        yield from t.update(ws)
        yield from t.prepare()
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
            d = ws[at_d * c : (at_d + 1) * c].view(cs) if out is None else out[a:b]
            if variant.is_published:
                t.mlp(ws, c, d, w_t, a, b)
                d = finish(d, orthogonalize=orthogonalize, param=param, apply=apply, rows=(a, b))
            else:
                mag = ws[(at_d + 1) * c : (at_d + 2) * c].view(cs) if with_magnitude else None
                t.mlp(ws, c, d, w_t, a, b, mag)
                d = finish_variant(d, mag, variant, orthogonalize=orthogonalize, param=param, apply=apply,
                                   rows=(a, b))
            if d is not None and (d.data_ptr() != out[a:b].data_ptr() or d.stride() != out[a:b].stride()):
                out[a:b].copy_(d)
        box["result"] = None if apply is not None else out.reshape(param.shape)
        return

    # Matrices and vectors: the groups span the tensor. Sums of squares first
    # (pass 1, plus a light pass for the factored channels of a matrix), then
    # the channels are built once more, chunk by chunk, for the MLP.
    partial = torch.empty(t.num_chunks(), _CHANNELS, device=t.device)
    yield from t.update(ws, partial)
    yield from t.prepare()
    sums = partial.sum(0)
    if t.factored is not None:
        t.factor_sums(ws, sums)
    if shard is not None:
        yield sums
    inv = torch.rsqrt(sums[:ch] * (1.0 / t.numel) + spec.INPUT_NORM_EPS)
    w_t = (lay.w_el[:ch] * inv.view(ch, 1)).t().contiguous()
    out = torch.empty(shape, dtype=torch.float32, device=t.device)
    mag = torch.empty(shape, dtype=torch.float32, device=t.device) if with_magnitude else None
    for a, b in t.chunks():
        c = (b - a) * t.inner
        t.build(ws[: ch * c].view(ch, b - a, *shape[1:]), a, b)
        t.mlp(ws, c, out[a:b], w_t, a, b, None if mag is None else mag[a:b])
    if raw:
        box["result"] = out
        return
    if orthogonalize and t.nd == 2:
        out = newton_schulz(out, inplace=True)
    if not variant.is_published:
        d = finish_variant(out, mag, variant, param=param, apply=apply, count=t.numel)
        box["result"] = None if d is None else d.reshape(param.shape)
        return
    sumsq = group_sumsq(out)
    if shard is not None:
        yield sumsq
    d = finish(out, param=param, apply=apply, sumsq=sumsq, count=t.numel)
    box["result"] = None if d is None else d.reshape(param.shape)


def _run_slices(theta, state, grad, param, orthogonalize, chunk_elements, workspace, apply, factored):  # noqa: ANN001
    shape = work_shape(param.shape)
    g, p = grad.reshape(shape), param.reshape(shape)
    inner = Factoring(d1=factored.d1 - 1, d0=factored.d0 - 1, ndim=factored.ndim - 1)
    out = None if apply is not None else torch.empty(shape, dtype=torch.float32, device=param.device)
    for e in range(shape[0]):
        sub = {"m": state["m"][:, e], "v": state["v"][e], "fac_r": state["fac_r"][:, e], "fac_c": state["fac_c"][:, e]}
        r = run(theta, sub, g[e], p[e], orthogonalize, apply, chunk_elements=chunk_elements, workspace=workspace,
                factored=inner, top=False)
        if out is not None:
            out[e].copy_(r)
    return None if out is None else out.reshape(param.shape)


class TorchBackend:
    """The :class:`celo2.torch.backends.Backend` of the chunked PyTorch path (``backend="torch"``).

    It takes every tensor, on any device and in any float dtype, one at a
    time. Newton-Schulz takes a matrix's raw direction whole; a tensor of
    three or more dims is orthogonalised chunk by chunk here (in float32).
    """

    name = "torch"
    gates_nonfinite = False
    state_dtypes = (torch.float32, torch.bfloat16)
    runs_variants = True

    def takes(self, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> bool:
        """Every tensor."""
        return True

    def gives_raw(self, ndim: int) -> bool:
        """Matrices only."""
        return ndim == 2

    def apply(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool, apply: Apply, skip: bool,
              options: Options, rounding: Optional[StateRounding] = None) -> list[Optional[torch.Tensor]]:
        """:func:`run` with ``apply`` on each tensor (see :meth:`celo2.torch.backends.Backend.apply`)."""
        for j, (p, g, st) in enumerate(zip(params, grads, states)):
            run(theta, st, g, p, orthogonalize, apply, chunk_elements=options.chunk_elements,
                workspace=options.workspace, rounding=tensor_rounding(rounding, j))
        return [None] * len(params)

    def directions(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool,
                   options: Options, rounding: Optional[StateRounding] = None) -> list[torch.Tensor]:
        """:func:`run` without ``apply`` on each tensor."""
        return [run(theta, st, g, p, orthogonalize, None, chunk_elements=options.chunk_elements,
                    workspace=options.workspace, rounding=tensor_rounding(rounding, j))
                for j, (p, g, st) in enumerate(zip(params, grads, states))]

    def raw(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
            states: Sequence[dict[str, torch.Tensor]], *, skip: bool,
            options: Options, rounding: Optional[StateRounding] = None,
            ) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """Each matrix's raw direction (``ok`` is ``None``: the caller gates)."""
        return [(run(theta, st, g, p, True, None, raw=True, chunk_elements=options.chunk_elements,
                     workspace=options.workspace, rounding=tensor_rounding(rounding, j)), None)
                for j, (p, g, st) in enumerate(zip(params, grads, states))]

    def apply_held(self, params: Sequence[torch.Tensor], directions: Sequence[torch.Tensor],
                   oks: Sequence[Optional[torch.Tensor]], apply: Apply) -> None:
        """:func:`celo2.torch.backends.finish` with ``apply`` on each."""
        for param, d in zip(params, directions):
            finish(d, param=param, apply=apply)


BACKEND = TorchBackend()
"""The chunked PyTorch path."""
