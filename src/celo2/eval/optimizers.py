"""Optimizer registry of the bench: name -> factory building a PyTorch optimizer.

Every factory has the signature ``factory(model, lr, weight_decay, theta=None)``
and returns either a ``torch.optim.Optimizer`` or a :class:`Composite` (several
optimizers stepped together). The bench schedules every optimizer the same way
(:func:`warmup_cosine`), so one swept peak LR is the only knob that differs.

Routing ("the usual way", as in the Celo2 harness): matrices go to the
structured rule (Muon or Celo2), while vectors (biases, norm gains),
embeddings and output heads go to AdamW with betas (0.9, 0.95). Muon uses the
same rule as Celo2 (:func:`celo2.rule.routing.route`: fewer than 2 dims, or a
name such as ``tok_embed``/``pos_embed``/``head``), plus any ``nn.Embedding``,
so that both structured optimizers see exactly the same matrices.

Muon is ``torch.optim.Muon`` itself, with ``adjust_lr_fn="match_rms_adamw"`` so
that its matrix updates have AdamW's RMS and the same peak LR serves both
branches. ``torch.optim.Muon`` only accepts 2-D tensors, so a conv kernel
``(out, in, kh, kw)`` is handed to it as a 2-D ``(out, in*kh*kw)`` view that
shares storage with the kernel (the common practice of flattening filters);
gradients are viewed the same way before each step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from celo2.rule import spec
from celo2.rule.routing import LEARNED, route

#: Betas of every AdamW/Adam in the bench, equal to the Celo2 harness's AdamW branch.
ADAM_BETAS = spec.ADAM_BETAS
ADAM_EPS = spec.ADAM_EPS
SGD_MOMENTUM = 0.9
WARMUP_FRACTION = 0.05


class Composite:
    """Several optimizers stepped as one (each owns a disjoint set of tensors)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], before_step: Callable[[], None] | None = None):
        self.optimizers = optimizers
        self._before_step = before_step

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        if self._before_step is not None:
            self._before_step()
        for o in self.optimizers:
            o.step()


def sub_optimizers(opt: "torch.optim.Optimizer | Composite") -> list[torch.optim.Optimizer]:
    """The plain torch optimizers inside ``opt`` (for one scheduler each)."""
    return list(opt.optimizers) if isinstance(opt, Composite) else [opt]


def warmup_cosine(total_steps: int, warmup_fraction: float = WARMUP_FRACTION) -> Callable[[int], float]:
    """LR factor for step ``t``: linear warmup over 5% of steps, then cosine to 0.

    Warmup reaches 1 at its last step so the peak LR is actually used; the
    cosine reaches 0 at step ``total_steps`` (one past the last step).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    warmup = max(1, int(round(warmup_fraction * total_steps)))

    def factor(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (t - warmup) / max(1, total_steps - warmup))))

    return factor


def make_schedulers(opt: "torch.optim.Optimizer | Composite", total_steps: int) -> list[torch.optim.lr_scheduler.LambdaLR]:
    """One ``LambdaLR`` per underlying optimizer, all with the same warmup-cosine factor."""
    f = warmup_cosine(total_steps)
    return [torch.optim.lr_scheduler.LambdaLR(o, f) for o in sub_optimizers(opt)]


# -- routing -------------------------------------------------------------------


def _embedding_param_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def split_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """``(matrices, others)``: tensors for the structured rule vs for AdamW."""
    emb = _embedding_param_ids(model)
    matrices, others = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) not in emb and route(name, tuple(p.shape)) == LEARNED:
            matrices.append((name, p))
        else:
            others.append((name, p))
    return matrices, others


# -- factories -------------------------------------------------------------------


def _params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_adamw(model: nn.Module, lr: float, weight_decay: float, theta: Any = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(_params(model), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)


def make_adam(model: nn.Module, lr: float, weight_decay: float, theta: Any = None) -> torch.optim.Optimizer:
    # Adam's weight decay is L2 added to the gradient; the bench passes 0 by default.
    return torch.optim.Adam(_params(model), lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)


def make_sgd(model: nn.Module, lr: float, weight_decay: float, theta: Any = None) -> torch.optim.Optimizer:
    return torch.optim.SGD(_params(model), lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)


def make_muon(model: nn.Module, lr: float, weight_decay: float, theta: Any = None) -> Composite:
    matrices, others = split_params(model)
    flat_pairs: list[tuple[nn.Parameter, nn.Parameter]] = []
    muon_params: list[nn.Parameter] = []
    for _, p in matrices:
        if p.ndim == 2:
            muon_params.append(p)
        else:
            # A 2-D Parameter sharing storage with the kernel: Muon's in-place
            # updates of the view are updates of the kernel.
            view = nn.Parameter(p.data.view(p.shape[0], -1))
            flat_pairs.append((p, view))
            muon_params.append(view)
    opts: list[torch.optim.Optimizer] = []
    if muon_params:
        opts.append(
            torch.optim.Muon(muon_params, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        )
    if others:
        opts.append(
            torch.optim.AdamW([p for _, p in others], lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=weight_decay)
        )

    def sync_grads() -> None:
        for p, view in flat_pairs:
            view.grad = None if p.grad is None else p.grad.view(view.shape)

    return Composite(opts, before_step=sync_grads if flat_pairs else None)


def make_celo2(model: nn.Module, lr: float, weight_decay: float, theta: Any = None,
               adam_lr_mult: float = spec.ADAM_LR_MULT, state_dtype: str = "float32") -> torch.optim.Optimizer:
    from celo2.torch import Celo2

    return Celo2(model.named_parameters(), lr=lr, weight_decay=weight_decay, theta=theta, adam_lr_mult=adam_lr_mult,
                 state_dtype=state_dtype)


def make_celo2_base(model: nn.Module, lr: float, weight_decay: float, theta: Any = None,
                    state_dtype: str = "float32") -> torch.optim.Optimizer:
    from celo2.torch import Celo2Base

    return Celo2Base(model.named_parameters(), lr=lr, weight_decay=weight_decay, theta=theta, state_dtype=state_dtype)


def make_celo2_bf16(model: nn.Module, lr: float, weight_decay: float, theta: Any = None,
                    adam_lr_mult: float = spec.ADAM_LR_MULT) -> torch.optim.Optimizer:
    """Celo2 with bfloat16 state (stochastic rounding): the same rule, half the state memory."""
    return make_celo2(model, lr, weight_decay, theta, adam_lr_mult, state_dtype="bfloat16")


def make_celo2_base_bf16(model: nn.Module, lr: float, weight_decay: float, theta: Any = None) -> torch.optim.Optimizer:
    """Celo2Base with bfloat16 state (stochastic rounding)."""
    return make_celo2_base(model, lr, weight_decay, theta, state_dtype="bfloat16")


def make_celo2_int8(model: nn.Module, lr: float, weight_decay: float, theta: Any = None,
                    adam_lr_mult: float = spec.ADAM_LR_MULT) -> torch.optim.Optimizer:
    """Celo2 with 8-bit blockwise state (stochastic rounding): the same rule, about a quarter of the state
    memory."""
    return make_celo2(model, lr, weight_decay, theta, adam_lr_mult, state_dtype="int8")


def make_celo2_base_int8(model: nn.Module, lr: float, weight_decay: float, theta: Any = None) -> torch.optim.Optimizer:
    """Celo2Base with 8-bit blockwise state (stochastic rounding)."""
    return make_celo2_base(model, lr, weight_decay, theta, state_dtype="int8")


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer kind: its factory, default LR grid, default weight decay and weight-decay grid."""

    name: str
    factory: Callable[..., Any]
    lr_grid: tuple[float, float]  # log-spaced default range [lo, hi]
    default_weight_decay: float
    uses_theta: bool
    description: str
    wd_grid: tuple[float, ...] = ()  # the weight decays a 2-D LR x WD search tries (see WD_GRID_*)
    in_default_suites: bool = True  # False: run only when named (--optimizers), e.g. a state-dtype variant


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` log-spaced values from ``lo`` to ``hi`` (both included), rounded to 3 digits."""
    if n < 1:
        raise ValueError(f"a grid needs at least 1 value, got {n}")
    if not (0 < lo <= hi):
        raise ValueError(f"a grid needs 0 < lo <= hi, got lo={lo}, hi={hi}")
    if n == 1:
        return [float(f"{math.sqrt(lo * hi):.3g}")]
    r = (math.log(hi) - math.log(lo)) / (n - 1)
    return [float(f"{math.exp(math.log(lo) + i * r):.3g}") for i in range(n)]


#: Weight-decay grid of the optimizers with decoupled decay scaled by the LR
#: (``p <- p - lr * wd * p``: torch's AdamW and Muon, Celo2's two branches):
#: the per-step shrink is ``lr * wd``, so at these tasks' LRs (1e-3 to 1e-2, 5%
#: warmup + cosine over ~1000 steps) 0.01 barely shrinks the weights, 0.1 (the
#: bench's fixed default) shrinks them by a few percent to ~40%, 1 by up to
#: e^-5. Decades, so that one edge flag says which way to extend.
WD_GRID_DECOUPLED = (0.0, 0.01, 0.1, 1.0)
#: Weight-decay grid of the optimizers whose decay is an L2 term added to the
#: gradient (torch's Adam and SGD): ``wd * p`` competes with the gradient, so
#: the useful values are far smaller (SGD's classic 5e-4 sits inside).
WD_GRID_L2 = (0.0, 1e-4, 1e-3, 1e-2)

#: The bench's optimizers. Default LR ranges are centred on where each optimizer
#: works for CPU-sized models (wider and higher than the paper's [1e-5, 1e-3],
#: which was set for 30M-1.3B parameter models); the report flags a best LR at
#: either end of its grid.
OPTIMIZERS: dict[str, OptimizerInfo] = {
    info.name: info
    for info in [
        OptimizerInfo("celo2", make_celo2, (1e-4, 1e-1), 0.1, True,
                      f"Celo2: learned rule + Newton-Schulz on matrices, AdamW ({spec.ADAM_LR_MULT:g}x LR) on vectors/embeddings/heads",
                      wd_grid=WD_GRID_DECOUPLED),
        OptimizerInfo("celo2-base", make_celo2_base, (1e-4, 1e-1), 0.1, True,
                      "Celo2-base: learned rule on every tensor, no orthogonalisation, no AdamW",
                      wd_grid=WD_GRID_DECOUPLED),
        OptimizerInfo("celo2-bf16", make_celo2_bf16, (1e-4, 1e-1), 0.1, True,
                      "Celo2 with bfloat16 state (stochastic rounding): the learned rule's accumulators and the "
                      "AdamW branch's moments", wd_grid=WD_GRID_DECOUPLED, in_default_suites=False),
        OptimizerInfo("celo2-base-bf16", make_celo2_base_bf16, (1e-4, 1e-1), 0.1, True,
                      "Celo2-base with bfloat16 state (stochastic rounding)", wd_grid=WD_GRID_DECOUPLED,
                      in_default_suites=False),
        OptimizerInfo("celo2-int8", make_celo2_int8, (1e-4, 1e-1), 0.1, True,
                      "Celo2 with 8-bit blockwise state (256-element blocks, stochastic rounding): the learned "
                      "rule's accumulators and the AdamW branch's moments", wd_grid=WD_GRID_DECOUPLED,
                      in_default_suites=False),
        OptimizerInfo("celo2-base-int8", make_celo2_base_int8, (1e-4, 1e-1), 0.1, True,
                      "Celo2-base with 8-bit blockwise state (stochastic rounding)", wd_grid=WD_GRID_DECOUPLED,
                      in_default_suites=False),
        OptimizerInfo("adamw", make_adamw, (1e-4, 1e-1), 0.1, False,
                      f"torch.optim.AdamW, betas {ADAM_BETAS}, decoupled weight decay", wd_grid=WD_GRID_DECOUPLED),
        OptimizerInfo("adam", make_adam, (1e-4, 1e-1), 0.0, False,
                      f"torch.optim.Adam, betas {ADAM_BETAS}, no weight decay", wd_grid=WD_GRID_L2),
        OptimizerInfo("sgd", make_sgd, (1e-3, 1.0), 0.0, False,
                      "torch.optim.SGD, momentum 0.9, no weight decay", wd_grid=WD_GRID_L2),
        OptimizerInfo("muon", make_muon, (10**-3.5, 10**-0.5), 0.1, False,
                      "torch.optim.Muon (match_rms_adamw, conv kernels flattened) + AdamW on vectors/embeddings/heads",
                      wd_grid=WD_GRID_DECOUPLED),
    ]
}


DEFAULT_SUITE_OPTIMIZERS: list[str] = [k for k, v in OPTIMIZERS.items() if v.in_default_suites]
"""The kinds a suite runs when no ``--optimizers`` is given."""


def optimizer_kind(name: str) -> str:
    """``"celo2[published]"`` -> ``"celo2"``; other names unchanged."""
    return name.split("[", 1)[0]


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, theta: Any = None, **options: Any):
    """Build optimizer ``name`` (a kind or ``kind[theta-label]``) for ``model``.

    Args:
        name: The optimizer kind, or ``kind[theta-label]``.
        model: The model whose parameters it steps.
        lr: Peak learning rate.
        weight_decay: Weight decay, in the optimizer's own convention.
        theta: The learned optimizer's theta (Celo2 kinds only).
        **options: Further keyword arguments of the kind's factory (``adam_lr_mult`` for ``celo2``).

    Returns:
        A ``torch.optim.Optimizer`` or a :class:`Composite`.

    Raises:
        KeyError: An unknown kind.
    """
    kind = optimizer_kind(name)
    if kind not in OPTIMIZERS:
        raise KeyError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[kind].factory(model, lr=lr, weight_decay=weight_decay, theta=theta, **options)


def all_params(opt: "torch.optim.Optimizer | Composite") -> Iterable[torch.Tensor]:
    for g in opt.param_groups:
        yield from g["params"]
