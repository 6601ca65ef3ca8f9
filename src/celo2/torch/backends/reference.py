"""The rule exactly as the spec states it, in PyTorch (``backend="reference"``).

All 30 channels are built at full size, normalised, then fed to the MLP. It
is short, obviously right, and holds every channel and hidden unit as a
full-size tensor, dozens of copies of the parameter in memory; every
fused backend is tested against it. It takes every tensor, orthogonalises
its own directions (always in float32) and never gates non-finite values.
With bfloat16 state it steps a float32 copy of the accumulators and stores
them rounded (:mod:`celo2.torch._rounding`). It runs every rule variant
(:class:`celo2.rule.variant.RuleVariant`: the theta's decays, feature groups,
MLP size and output handling).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from celo2.rule import spec
from celo2.rule.state import STATE_KEYS, factoring, work_shape
from celo2.rule.variant import MAGNITUDE_EXP_MULT, MAGNITUDE_OUTPUT, PUBLISHED, RuleVariant
from celo2.torch._rounding import TensorRounding, store_state, working_copy
from celo2.torch._state import TorchTheta
from celo2.torch.backends.base import Apply, Options, StateRounding, apply_update, tensor_rounding


def _decays(values: tuple[float, ...], ndim: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).reshape((-1,) + (1,) * ndim)


def safe_rsqrt(x: torch.Tensor) -> torch.Tensor:
    """``rsqrt(max(x, SAFE_RSQRT_FLOOR))``: the rule's reciprocal square root of a statistic that may be 0."""
    return torch.rsqrt(torch.clamp_min(x, spec.SAFE_RSQRT_FLOOR))


def _rms_normalise(x: torch.Tensor, eps: float, dims: tuple[int, ...]) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(dim=dims, keepdim=True) + eps)


def _adafactor_factors(fac_r: torch.Tensor, fac_c: torch.Tensor, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column factors broadcastable against ``(3, *shape)``."""
    f = factoring(shape)
    d1, d0 = f.d1, f.d0
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_mean = fac_r.mean(dim=1 + reduced_d1, keepdim=True)
    row_factor = safe_rsqrt(fac_r / (row_mean + spec.ROW_MEAN_EPS))
    col_factor = safe_rsqrt(fac_c)
    return row_factor.unsqueeze(1 + d0), col_factor.unsqueeze(1 + d1)


def update_accumulators(state: dict[str, torch.Tensor], g: torch.Tensor,
                        variant: RuleVariant = PUBLISHED) -> torch.Tensor:
    """Reference: fold ``g`` into the accumulators in place (with ``variant``'s decays); return the
    Adafactor-normalised ``g`` at full size."""
    nd = g.ndim
    state["m"].lerp_(g.unsqueeze(0).expand_as(state["m"]), 1.0 - _decays(variant.momentum_decays, nd, g))
    g2 = g.square()
    state["v"].mul_(variant.rms_decay).add_(g2, alpha=1.0 - variant.rms_decay)
    gsq = g2 + spec.FACTORED_EPS
    f = factoring(g.shape)
    if f is None:
        w = 1.0 - _decays(variant.factored_decays, nd, g)
        state["fac_r"].lerp_(gsq.unsqueeze(0).expand_as(state["fac_r"]), w)
        return g.unsqueeze(0) * safe_rsqrt(state["fac_r"] + spec.VECTOR_FACTOR_EPS)
    w = 1.0 - _decays(variant.factored_decays, nd - 1, g)
    state["fac_r"].lerp_(gsq.mean(dim=f.d0).unsqueeze(0).expand_as(state["fac_r"]), w)
    state["fac_c"].lerp_(gsq.mean(dim=f.d1).unsqueeze(0).expand_as(state["fac_c"]), w)
    row_factor, col_factor = _adafactor_factors(state["fac_r"], state["fac_c"], tuple(g.shape))
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
    f = factoring(g.shape)
    if f is None:
        return groups
    full = (m.shape[0], *g.shape)
    row = state["fac_r"].unsqueeze(1 + f.d0).expand(full)
    col = state["fac_c"].unsqueeze(1 + f.d1).expand(full)
    row_factor, col_factor = _adafactor_factors(state["fac_r"], state["fac_c"], tuple(g.shape))
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
    rounding: Optional[TensorRounding] = None,
) -> torch.Tensor:
    """The rule exactly as the spec states it (full-size channels): update
    ``state`` in place and return the direction (unit RMS over the last two
    axes, float32, the parameter's shape); the fused backends are tested
    against this.

    Args:
        theta: The weights on the parameter's device.
        state: The tensor's accumulators (:func:`celo2.torch.rule.init_tensor_state`).
        grad: The gradient (any float dtype, the parameter's shape).
        param: The parameter.
        orthogonalize: Newton-Schulz on tensors of two or more dims.
        rounding: With bfloat16 accumulators, their seed, step and index: the step runs on float32 copies
            (its direction is float32 state's) and stores them rounded; ``None`` for float32 state.

    Returns:
        The direction.
    """
    if rounding is not None:
        work = working_copy(state, STATE_KEYS)
        direction = reference_tensor_step(theta, work, grad, param, orthogonalize)
        store_state(state, work, rounding, STATE_KEYS)
        return direction
    shape = param.shape
    work = work_shape(shape)
    g = grad.detach().to(torch.float32).reshape(work).clamp(-spec.GRAD_CLIP, spec.GRAD_CLIP)
    p = param.detach().to(torch.float32).reshape(work)
    variant = theta.variant
    fac_g = update_accumulators(state, g, variant)
    groups = features(state, g, p, fac_g)
    used = variant.groups if len(groups) > spec.VECTOR_GROUPS else variant.vector_groups
    dims = tuple(range(max(1, g.ndim - 1), g.ndim + 1))  # last two axes of (width, *S)
    channels = torch.cat([_rms_normalise(groups[group.index], spec.INPUT_NORM_EPS, dims) for group in used], dim=0)
    w0 = theta.w0[: channels.shape[0]]  # a vector's groups are the first of the matrix's
    hidden = torch.relu(torch.tensordot(channels, w0, dims=([0], [0])) + theta.b0)
    for w, b in theta.layers:
        hidden = torch.relu(hidden @ w + b)
    direction = hidden @ theta.w2 + theta.b2
    if orthogonalize and g.ndim >= 2:
        direction = reference_newton_schulz(direction)
    if variant.output_norm == "rms":
        out_dims = tuple(range(max(0, g.ndim - 2), g.ndim))
        direction = _rms_normalise(direction, spec.OUTPUT_NORM_EPS, out_dims)
    if variant.outputs == "direction+magnitude":
        magnitude = hidden @ theta.w_out[:, MAGNITUDE_OUTPUT] + theta.b_out[MAGNITUDE_OUTPUT]
        direction = direction * torch.exp(MAGNITUDE_EXP_MULT * magnitude)
    return direction.reshape(shape)


def reference_newton_schulz(x: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz as the spec states it (float32, batched over leading axes), for checking.

    Args:
        x: Matrices in the last two axes.

    Returns:
        Their orthogonalised versions (a new tensor).
    """
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



class ReferenceBackend:
    """The :class:`celo2.torch.backends.Backend` of the spelled-out formula."""

    name = "reference"
    gates_nonfinite = False
    state_dtypes = (torch.float32, torch.bfloat16)
    runs_variants = True

    def takes(self, state: dict[str, torch.Tensor], grad: torch.Tensor, param: torch.Tensor) -> bool:
        """Every tensor."""
        return True

    def gives_raw(self, ndim: int) -> bool:
        """Never: the formula orthogonalises its own directions (in float32)."""
        return False

    def apply(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
              states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool, apply: Apply, skip: bool,
              options: Options, rounding: Optional[StateRounding] = None) -> list[Optional[torch.Tensor]]:
        """Each direction, applied (see :meth:`celo2.torch.backends.Backend.apply`)."""
        for d, param in zip(self.directions(theta, params, grads, states, orthogonalize=orthogonalize,
                                            options=options, rounding=rounding), params):
            shape = work_shape(param.shape)
            apply_update(param, 0, shape[0], d.reshape(shape), apply, None)
        return [None] * len(params)

    def directions(self, theta: TorchTheta, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   states: Sequence[dict[str, torch.Tensor]], *, orthogonalize: bool,
                   options: Options, rounding: Optional[StateRounding] = None) -> list[torch.Tensor]:
        """:func:`reference_tensor_step` of each tensor."""
        return [reference_tensor_step(theta, st, g, p, orthogonalize, tensor_rounding(rounding, j))
                for j, (p, g, st) in enumerate(zip(params, grads, states))]

    def raw(self, theta, params, grads, states, *, skip, options, rounding=None):  # noqa: ANN001, ANN201
        """Not offered (:meth:`gives_raw` is false)."""
        raise NotImplementedError("the reference backend finishes its own directions")

    def apply_held(self, params, directions, oks, apply) -> None:  # noqa: ANN001
        """Not offered (:meth:`gives_raw` is false)."""
        raise NotImplementedError("the reference backend finishes its own directions")


BACKEND = ReferenceBackend()
"""The reference backend."""
