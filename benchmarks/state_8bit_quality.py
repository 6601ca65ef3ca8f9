"""What 8-bit blockwise optimizer state would cost in quality: a simulation on the bench (issue 28).

    python benchmarks/state_8bit_quality.py --task mlp --lr 0.001 --weight-decay 0 --data-dir DATA \
        --out benchmarks/results/state-dtype/8bit-sim/mlp

Runs the bench kind ``celo2-8bit-sim``: ``Celo2`` whose accumulators (the rule's ``m``, ``v``,
``fac_r``, ``fac_c`` and the AdamW branch's two moments) are quantised after every step to 8 bits in
blocks of :data:`BLOCK` elements with one float32 scale per block (the block's largest magnitude),
with stochastic rounding, and dequantised in place: the values the step reads are exactly what an
8-bit store would hold. Signed tensors use the codes -127..127; tensors with no negative element
(second moments) 0..255; ``--second-moments sqrt`` quantises the square roots of the second moments. Only the quality is simulated (the state stays float32 in memory); it is a
measurement, not an option of the library. The scheme this simulation found to hold the bar
(``--second-moments sqrt-floor``) is the library's option ``state_dtype="int8"``
(:mod:`celo2.rule.blockwise8`; bench kinds ``celo2-int8`` and ``celo2-base-int8``). Compare with ``celo2`` at the same cell and seeds
(``benchmarks/results/state-dtype/``): the same seed gives the same initialisation and data order.
"""

from __future__ import annotations

import argparse

import torch

from celo2.eval import optimizers as registry
from celo2.eval.bench import SUITE_DEFAULTS, BenchOptions, run_bench
from celo2.torch import Celo2

BLOCK = 256
"""Elements per block sharing one float32 scale."""

QUANTISED_KEYS = ("m", "v", "fac_r", "fac_c", "exp_avg", "exp_avg_sq")
"""The accumulators quantised after every step."""

SECOND_MOMENTS = ("v", "fac_r", "fac_c", "exp_avg_sq")
"""Accumulators of squares: ``--second-moments sqrt`` quantises their square roots (a code per
magnitude, not per square, so that small entries of a block do not round to zero)."""


def _block_scales(t: torch.Tensor) -> torch.Tensor:
    """Per element, the unsigned code step of its block (the block's largest value / 255)."""
    flat = t.reshape(-1)
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, (-n) % BLOCK)).view(-1, BLOCK)
    step = blocks.amax(dim=1, keepdim=True) / 255.0
    return step.expand_as(blocks).reshape(-1)[:n].reshape(t.shape)


def quantise_blockwise_(t: torch.Tensor, generator: torch.Generator, sqrt_domain: bool = False,
                        floor_code: bool = False) -> None:
    """Quantise ``t`` to 8 bits per element in blocks of :data:`BLOCK` (stochastic rounding) and back, in place.

    With ``sqrt_domain`` (non-negative ``t``) the codes hold ``sqrt(t)``, squared back after dequantising;
    with ``floor_code`` too, a positive value never becomes 0 (it keeps the smallest code).
    """
    if sqrt_domain:
        root = t.detach().clamp(min=0).sqrt()
        positive = root > 0
        quantise_blockwise_(root, generator)
        if floor_code:  # a positive second moment keeps at least the block's smallest code: never 0
            scale = _block_scales(t.detach().clamp(min=0).sqrt())
            root = torch.where(positive & (root == 0), scale, root)
        t.detach().copy_(root.square_())
        return
    flat = t.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        return
    pad = (-n) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
    unsigned = bool((flat >= 0).all())
    levels = 255.0 if unsigned else 127.0
    scale = blocks.abs().amax(dim=1, keepdim=True) / levels
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    noise = torch.rand(blocks.shape, generator=generator, dtype=blocks.dtype)
    codes = torch.floor(blocks / scale + noise).clamp_(0.0 if unsigned else -levels, levels)
    flat.copy_((codes * scale).reshape(-1)[:n])


class Celo2EightBitSimulated(Celo2):
    """``Celo2`` with every accumulator quantised to 8-bit blocks after each step (a simulation)."""

    sqrt_second_moments = False
    floor_code = False

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self._generator = torch.Generator().manual_seed(0)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = super().step(closure)
        for state in self.state.values():
            for key in QUANTISED_KEYS:
                if key in state and state[key].is_floating_point():
                    sqrt_domain = self.sqrt_second_moments and key in SECOND_MOMENTS
                    quantise_blockwise_(state[key], self._generator, sqrt_domain, self.floor_code)
        return loss


def make_celo2_8bit_sim(model, lr, weight_decay, theta=None):  # noqa: ANN001, ANN201
    return Celo2EightBitSimulated(model.named_parameters(), lr=lr, weight_decay=weight_decay, theta=theta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--weight-decay", type=float, required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="override the task's steps (smoke tests)")
    parser.add_argument("--suite", default="full")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--second-moments", choices=("linear", "sqrt", "sqrt-floor"), default="linear",
                        help="quantise second moments linearly (as the momenta), their square roots, or their "
                             "square roots with no positive value rounded to 0")
    args = parser.parse_args()
    Celo2EightBitSimulated.sqrt_second_moments = args.second_moments != "linear"
    Celo2EightBitSimulated.floor_code = args.second_moments == "sqrt-floor"
    name = "celo2-8bit-sim"
    registry.OPTIMIZERS[name] = registry.OptimizerInfo(
        name, make_celo2_8bit_sim, (1e-4, 1e-1), 0.1, True,
        f"Celo2 with 8-bit blockwise state simulated ({BLOCK}-element blocks, stochastic rounding)",
        wd_grid=registry.WD_GRID_DECOUPLED, in_default_suites=False)
    for defaults in SUITE_DEFAULTS.values():  # the suites' default grids (unused: --lr is the grid)
        defaults["grids"][name] = (args.lr, args.lr, 1)
    run_bench(BenchOptions(suite=args.suite, tasks=[args.task], optimizers=[name], lrs=[args.lr],
                           seeds=list(range(args.seeds)), steps=args.steps, weight_decays={"*": args.weight_decay},
                           out=args.out, data_dir=args.data_dir, jobs=1, progress=False))


if __name__ == "__main__":
    main()
