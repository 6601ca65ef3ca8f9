"""A plain PyTorch training loop with Celo2: a small CNN on generated images.

    python examples/torch_loop.py            # a few hundred steps, under a minute on a laptop CPU
    python examples/torch_loop.py --tiny     # a few steps (what the test suite runs)
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from celo2.torch import Celo2


def make_data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of 4 classes: a bright quadrant on noise (stand-ins for a real dataset)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.3 * torch.randn(n, 1, 16, 16, generator=g)
    for k in range(4):
        r, c = divmod(k, 2)
        x[y == k, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8] += 1.0
    return x, y


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="run a few steps only")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    steps = 5 if args.tiny else args.steps
    torch.manual_seed(0)

    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 4),
    )
    x_train, y_train = make_data(2048, seed=0)
    x_val, y_val = make_data(512, seed=1)

    opt = Celo2(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    warmup = max(1, steps // 20)  # 5% linear warmup, then cosine decay to zero (the bench's schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup))))
    print(opt.routing_table())

    for step in range(steps):
        idx = torch.randint(0, len(x_train), (64,))
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  train loss {loss.item():.4f}")

    with torch.no_grad():
        val = nn.functional.cross_entropy(model(x_val), y_val).item()
    print(f"validation loss {val:.4f}")
    return val


if __name__ == "__main__":
    main()
