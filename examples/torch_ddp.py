"""Celo2 under DistributedDataParallel: plain data parallel, each rank on its share of the batch.

    python examples/torch_ddp.py            # 2 CPU processes (gloo), 50 steps
    python examples/torch_ddp.py --tiny     # 5 steps (what the test suite runs)

DDP averages the gradients over the ranks, then every rank takes the same optimizer step on the same
parameters, so Celo2 needs nothing special. The script checks that the two ranks end where one process
training on the whole batch ends. (For sharded parameters, see examples/fsdp2_gpt.py.) With GPUs, use the "nccl" backend and one device per rank.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from celo2.torch import Celo2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    opt = Celo2(model.named_parameters(), lr=1e-3, weight_decay=0.1)  # the "module." prefix changes no routing
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def rank_main(rank: int, world: int, store: str, steps: int, out: str) -> None:
    # A file rendezvous: no TCP port to pick, so no race with another job for it.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        x, y = make_batch()
        train(model, x.chunk(world)[rank], y.chunk(world)[rank], steps)
        if rank == 0:
            torch.save(model.module.state_dict(), out)
        # Every rank is done with the group before any rank tears it down.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="run a few steps only")
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args(argv)
    steps = 5 if args.tiny else args.steps

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ddp.pt")
        mp.spawn(rank_main, args=(2, os.path.join(tmp, "store"), steps, out), nprocs=2)
        ddp_weights = torch.load(out)
    single = make_model()
    train(single, *make_batch(), steps)
    diff = max((ddp_weights[k] - v).abs().max().item() for k, v in single.state_dict().items())
    print(f"after {steps} steps, max |DDP - single process| = {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit(f"DDP and a single process disagree by {diff:.2e}")
    return diff


if __name__ == "__main__":
    main()
