"""Celo2 under FSDP2 against AdamW under FSDP2: bytes each rank sends per step, memory, parity, step time.

    python benchmarks/distributed_step.py                       # 2 CPU ranks (gloo), the bench's GPT
    python benchmarks/distributed_step.py --dim 256 --layers 4 --heads 4 --world 4
    python benchmarks/distributed_step.py --device cuda --world 8 --dim 2048 --layers 24 --heads 16

Each configuration trains the bench's byte-level GPT (``celo2.eval.models.GPT``) sharded with
``fully_shard`` (every block, then the model) for ``--steps`` steps and reports, per rank and per step
(medians over the steps after the first):

* bytes sent: every collective FSDP2 and the optimizer call, counted where ``torch.distributed`` is
  called (all-gathers and reduce-scatters count ``(W - 1) / W`` of the whole buffer, all-reduces twice
  that, all-to-alls the bytes to other ranks), and the optimizer's own share
  (:data:`celo2.torch.comm.COMM`);
* memory: the optimizer state per rank, the largest whole matrices a rank held at once for
  Newton-Schulz, and on CUDA the allocator's peak;
* parity: the largest parameter difference from one process training the same model on the whole
  batch (float64 parameters, float32 Newton-Schulz: see ``examples/fsdp2_gpt.py`` for why float64);
* the optimizer step's wall time (median), beside AdamW's.

Writes ``results.json`` and ``README.md`` into ``--out`` (default benchmarks/results/distributed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from celo2.eval.models import GPT
from celo2.torch import Celo2
from celo2.torch.comm import COMM

_WIRE = {"bytes": 0}


def _count(name: str, fn):  # noqa: ANN001, ANN202
    """Wrap a torch.distributed collective to add the bytes this rank sends to ``_WIRE``."""
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        group = kwargs.get("group")
        w = dist.get_world_size(group)
        if name in ("all_gather_into_tensor", "all_gather_single"):
            t = args[0] if args else kwargs["output_tensor"]
            _WIRE["bytes"] += t.numel() * t.element_size() * (w - 1) // w
        elif name in ("reduce_scatter_tensor", "reduce_scatter_single"):
            t = args[1] if len(args) > 1 else kwargs["input"]
            _WIRE["bytes"] += t.numel() * t.element_size() * (w - 1) // w
        elif name == "all_reduce":
            t = args[0] if args else kwargs["tensor"]
            _WIRE["bytes"] += 2 * t.numel() * t.element_size() * (w - 1) // w
        elif name == "all_to_all_single":
            t = args[1] if len(args) > 1 else kwargs["input"]
            splits = args[3] if len(args) > 3 else kwargs.get("input_split_sizes")
            per = t.numel() // max(t.shape[0], 1) if t.ndim else 1
            rows = list(splits) if splits else [t.shape[0] // w] * w
            rank = dist.get_rank(group)
            _WIRE["bytes"] += sum(r * per for i, r in enumerate(rows) if i != rank) * t.element_size()
        return fn(*args, **kwargs)
    return wrapper


def _patch() -> None:
    for name in ("all_gather_into_tensor", "all_gather_single", "reduce_scatter_tensor", "reduce_scatter_single",
                 "all_reduce", "all_to_all_single"):
        if hasattr(dist, name):
            setattr(dist, name, _count(name, getattr(dist, name)))


def make_model(cfg: dict, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return GPT(256, cfg["context"], cfg["dim"], cfg["layers"], cfg["heads"]).to(dtype)


def make_optimizer(name: str, model: nn.Module, cfg: dict) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    return Celo2(model.named_parameters(), lr=cfg["lr"], ns_dtype=torch.float32)


def batch(cfg: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    seq = torch.randint(0, 256, (cfg["batch"], cfg["context"] + 1), generator=g)
    return seq[:, :-1], seq[:, 1:]


def state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for st in opt.state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor):
                t = t.to_local() if hasattr(t, "to_local") else t
                total += t.numel() * t.element_size()
    return total


def rank_main(rank: int, world: int, store: str, cfg: dict, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cuda = cfg["device"] == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, cfg["threads"]))
    _patch()
    results = {}
    try:
        mesh = init_device_mesh(device.type, (world,))
        for name in ("adamw", "celo2"):
            for dtype in ((torch.float64, torch.float32) if cfg["parity"] else (torch.float32,)):
                model = make_model(cfg, dtype).to(device)
                for block in model.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(model, mesh=mesh)
                opt = make_optimizer(name, model, cfg)
                sent, sent_opt, step_s, held, calls = [], [], [], [], []
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                for step in range(cfg["steps"]):
                    x, y = (t.chunk(world)[rank].to(device) for t in batch(cfg, step))
                    _WIRE["bytes"] = 0
                    opt.zero_grad()
                    nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
                    COMM.reset()
                    if cuda:
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    opt.step()
                    if cuda:
                        torch.cuda.synchronize(device)
                    step_s.append(time.perf_counter() - t0)
                    sent.append(_WIRE["bytes"])
                    sent_opt.append(COMM.total_bytes)
                    held.append(COMM.whole_bytes_peak)
                    calls.append(COMM.all_reduces + COMM.all_to_alls)
                row = {
                    "bytes_per_step": statistics.median(sent[1:]),
                    "optimizer_bytes_per_step": statistics.median(sent_opt[1:]),
                    "optimizer_step_ms": 1e3 * statistics.median(step_s[1:]),
                    "optimizer_collectives_per_step": statistics.median(calls[1:]),
                    "state_bytes": state_bytes(opt),
                    "whole_matrix_bytes_peak": max(held),
                    "cuda_peak_bytes": torch.cuda.max_memory_allocated(device) if cuda else None,
                }
                full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                        for k, v in model.state_dict().items()}
                results[f"{name}/{str(dtype).removeprefix('torch.')}"] = (row, full)
        if rank == 0:
            torch.save(results, out)
        # Every rank is done with the group before any rank tears it down.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def one_process(cfg: dict, name: str, dtype: torch.dtype = torch.float64) -> tuple[dict[str, torch.Tensor], float]:
    """The same training in this process on plain tensors: the final parameters and the median step (ms)."""
    torch.set_num_threads(max(1, cfg["threads"]))
    model = make_model(cfg, dtype)
    opt = make_optimizer(name, model, cfg)
    times = []
    for step in range(cfg["steps"]):
        x, y = batch(cfg, step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return model.state_dict(), 1e3 * statistics.median(times[1:])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    parser.add_argument("--no-parity", dest="parity", action="store_false",
                        help="skip the float64 runs and the one-process comparison")
    parser.add_argument("--out", default="benchmarks/results/distributed")
    parser.add_argument("--tiny", action="store_true", help="a tiny model, 3 steps, no files (the test suite)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.dim, args.layers, args.heads, args.context, args.batch, args.steps = 16, 1, 2, 8, 4, 3
    cfg = {k: getattr(args, k) for k in ("device", "dim", "layers", "heads", "context", "batch", "steps", "lr",
                                         "threads", "parity")}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.pt")
        mp.spawn(rank_main, args=(args.world, os.path.join(tmp, "store"), cfg, path), nprocs=args.world)
        results = torch.load(path)
    n_params = sum(v.numel() for v in results["adamw/float32"][1].values())
    rows = {}
    for key, (row, full) in results.items():
        name, dtype = key.split("/")
        if dtype == "float64":
            want, _ = one_process(cfg, name)
            row["parity_vs_one_process"] = max((full[k] - v).abs().max().item() for k, v in want.items())
        elif args.device == "cpu":
            row["one_process_step_ms"] = one_process(cfg, name, torch.float32)[1]
        rows[key] = row
    print(f"GPT {args.dim}x{args.layers} ({n_params:,} parameters), {args.world} ranks, {args.device}, "
          f"{args.steps} steps; per rank, per step (median):")
    header = f"{'optimizer':<16} {'sent KiB':>10} {'by optimizer KiB':>17} {'step ms':>9} {'state KiB':>10} " \
             f"{'whole NS KiB':>13} {'parity':>9} {'1-process ms':>13} {'collectives':>12}"
    print(header)
    for key, row in rows.items():
        parity = rows.get(key.replace("float32", "float64"), {}).get("parity_vs_one_process")
        if key.endswith("float64"):
            continue
        print(f"{key:<16} {row['bytes_per_step'] / 1024:>10.1f} {row['optimizer_bytes_per_step'] / 1024:>17.1f} "
              f"{row['optimizer_step_ms']:>9.2f} {row['state_bytes'] / 1024:>10.1f} "
              f"{row['whole_matrix_bytes_peak'] / 1024:>13.1f} "
              f"{'' if parity is None else f'{parity:.1e}':>9} {row.get('one_process_step_ms', float('nan')):>13.2f} "
              f"{row['optimizer_collectives_per_step']:>12.0f}")
    record = {"config": cfg, "world": args.world, "parameters": n_params, "rows": rows,
              "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                          "torch": torch.__version__, "python": sys.version.split()[0]}}
    if not args.tiny:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(record, indent=1))
        print(f"wrote {out / 'results.json'}")
    return record


if __name__ == "__main__":
    main()
