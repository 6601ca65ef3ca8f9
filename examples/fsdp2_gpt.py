"""Train the bench's byte-level GPT with FSDP2 (``fully_shard``) and Celo2, launched by torchrun.

    torchrun --nproc-per-node 2 examples/fsdp2_gpt.py                 # CPUs: gloo
    torchrun --nproc-per-node 8 examples/fsdp2_gpt.py --dim 512 --layers 8 --heads 8   # GPUs: NCCL
    torchrun --nproc-per-node 2 examples/fsdp2_gpt.py --tiny --check  # what the test suite runs

Every block and the whole model are sharded with ``fully_shard``; their parameters become DTensors
sharded along dim 0 (unevenly where the size does not divide) and Celo2 steps them where they lie:
the statistics spanning a matrix are summed across ranks, and Newton-Schulz runs on whole matrices on
owner ranks (see the "Distributed training" page of the docs). ``--checkpoint DIR`` saves the model and
optimizer with torch.distributed.checkpoint every ``--save-every`` steps and resumes from the latest
save, on any number of ranks. Each save goes to a new folder ``DIR/step-NNNNNN``; once every rank has
finished it, rank 0 points ``DIR/latest`` at it (a rename, atomic) and removes the older saves. A rank
killed during a save (a preemption) leaves the pointer on the previous save, so a rerun loses at most
the steps since then. ``--check`` ends by training the same model in one process on rank 0 and
printing the largest parameter difference (and fails above 1e-5). It trains in float64: the key part of
the attention's ``qkv`` bias has an exactly zero gradient (softmax ignores a shift of the keys), so its
float32 rounding noise, which differs between one and two processes, is scaled up to full steps by
AdamW's normalisation (AdamW alone shows 5e-4 there in float32); in float64 that noise is far below
AdamW's epsilon. Celo2's own arithmetic stays float32 either way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from celo2.data.text import load_text_corpus
from celo2.eval.models import GPT
from celo2.torch import Celo2
from celo2.torch.comm import COMM


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per step, over all ranks")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=("celo2", "adamw"), default="celo2")
    parser.add_argument("--checkpoint", help="folder for torch.distributed.checkpoint saves (resumes from it)")
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--tiny", action="store_true", help="a few steps of a tiny model")
    parser.add_argument("--check", action="store_true", help="compare with one process at the end (rank 0)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.steps, args.dim, args.layers, args.heads, args.context, args.batch_size = 5, 24, 1, 2, 16, 8
    return args


def make_model(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(0)
    model = GPT(256, args.context, args.dim, args.layers, args.heads)
    return model.double() if args.check else model


def make_optimizer(model: nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    if args.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    # float32 Newton-Schulz keeps --check within 1e-5; drop ns_dtype for bfloat16 on GPUs.
    return Celo2(model.named_parameters(), lr=args.lr, weight_decay=args.weight_decay, ns_dtype=torch.float32)


def batch(tokens: np.ndarray, step: int, args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's sequences (the same on every rank; each rank then takes its share)."""
    rng = np.random.default_rng(step)
    starts = rng.integers(0, len(tokens) - args.context - 1, size=args.batch_size)
    seq = torch.from_numpy(np.stack([tokens[s:s + args.context + 1] for s in starts]).astype(np.int64))
    return seq[:, :-1], seq[:, 1:]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())


def one_process(args: argparse.Namespace, tokens: np.ndarray) -> dict[str, torch.Tensor]:
    model = make_model(args)
    opt = make_optimizer(model, args)
    for step in range(args.steps):
        opt.zero_grad()
        loss_of(model, *batch(tokens, step, args)).backward()
        opt.step()
    return model.state_dict()


LATEST = "latest"


def latest_save(root: str) -> str | None:
    """The folder of the last complete save under ``root`` (what ``root/latest`` names), or None."""
    try:
        with open(os.path.join(root, LATEST), encoding="utf-8") as f:
            name = f.read().strip()
    except FileNotFoundError:
        return None
    return os.path.join(root, name)


def save_checkpoint(state: dict, root: str, step: int, rank: int) -> None:
    """Save ``state`` into a new folder under ``root``, then switch ``root/latest`` to it.

    Every rank calls this (``dcp.save`` is collective). The pointer moves only after every rank
    has finished writing, so a kill at any moment leaves ``latest`` naming a complete save.
    """
    import torch.distributed.checkpoint as dcp

    name = f"step-{step:06d}"
    dcp.save(state, checkpoint_id=os.path.join(root, name))
    dist.barrier()  # every rank's files are written before the pointer moves
    if rank == 0:
        tmp = os.path.join(root, f".{LATEST}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(root, LATEST))
        for old in os.listdir(root):  # earlier saves, and any left half-written by a kill
            if old.startswith("step-") and old != name:
                shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    import torch.distributed.checkpoint as dcp

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} does not split over {world} ranks")
    tokens, _ = load_text_corpus()
    mesh = init_device_mesh(device.type, (world,))
    model = make_model(args).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = make_optimizer(model, args)

    start = 0
    saved = latest_save(args.checkpoint) if args.checkpoint else None
    if saved is not None:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=saved)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from {saved} at step {start} (saved on any number of ranks)")

    t0, shown = time.perf_counter(), start
    for step in range(start, args.steps):
        x, y = (t.chunk(world)[rank].to(device) for t in batch(tokens, step, args))
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        COMM.reset()
        opt.step()
        if args.checkpoint and ((step + 1) % args.save_every == 0 or step + 1 == args.steps):
            model_sd, optim_sd = get_state_dict(model, opt)
            save_checkpoint({"model": model_sd, "optim": optim_sd, "step": torch.tensor(step + 1)},
                            args.checkpoint, step + 1, rank)
        if rank == 0 and (step + 1 == args.steps or step % 20 == 0):
            rate = (step + 1 - shown) / max(time.perf_counter() - t0, 1e-9)
            eta = (args.steps - step - 1) / max(rate, 1e-9)
            mem = f", peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB" if cuda else ""
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  {rate:.2f} it/s  ETA {eta:.0f}s  "
                  f"optimizer sent {COMM.total_bytes / 1024:.1f} KiB this step{mem}", flush=True)

    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    # Every rank is done with the group before any rank tears it down (rank 0's check below runs alone).
    dist.barrier()
    if args.check and rank == 0:
        want = one_process(args, tokens)
        diffs = {k: (full[k].cpu() - v).abs().max().item() for k, v in want.items()}
        diff = max(diffs.values())
        print("largest differences:", sorted(diffs.items(), key=lambda kv: -kv[1])[:3])
        print(f"after {args.steps} steps on {world} ranks, max |FSDP2 - one process| = {diff:.2e}")
        if diff > 1e-5:
            raise SystemExit(f"FSDP2 training left one process's by {diff:.2e} (> 1e-5)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
