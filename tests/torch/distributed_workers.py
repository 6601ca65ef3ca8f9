"""What each rank runs in tests/torch/test_distributed.py (spawned processes, gloo on the CPU).

Every case has a twin in :func:`oracle_*` that one process computes on plain
tensors: the test compares the ranks' results with it, never the ranks with
each other.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from celo2.torch import Celo2, Celo2Base

STEPS = 5
OPTIONS = dict(lr=1e-2, weight_decay=0.1)
# (name, shape, placement): uneven shards, an empty shard (1 row over 2 ranks), both matrix axes,
# a conv kernel, vectors (the AdamW branch of Celo2) and a replicated matrix.
TENSORS = [
    ("layer.w_rows", (7, 5), "S0"),
    ("layer.w_cols", (5, 9), "S1"),
    ("layer.w_tall", (11, 3), "S1"),
    ("layer.w_one_row", (1, 6), "S0"),
    ("conv.weight", (5, 3, 3, 3), "S0"),
    ("conv.weight_in", (4, 6, 3, 3), "S1"),
    ("layer.bias", (7,), "S0"),
    ("norm.weight", (3,), "R"),
    ("layer.w_repl", (4, 6), "R"),
    ("hsdp.weight", (9, 4), "R,S0"),  # a 2-D (1, world) mesh: replicated over the first dim, HSDP-style
]
NAN_AT = (3, "layer.w_cols", (4, 8))  # step, tensor, element: a NaN in one shard of rank 1 only


def make_optimizer(kind: str, named: Any, state_dtype: str = "float32") -> torch.optim.Optimizer:
    if kind == "celo2":
        return Celo2(named, ns_dtype=torch.float32, state_dtype=state_dtype, **OPTIONS)
    return Celo2Base(named, state_dtype=state_dtype, **OPTIONS)


def state_bits(opt: torch.optim.Optimizer, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every bfloat16 accumulator of ``params`` (whole tensors, gathered from DTensors) as int16 bit patterns,
    keyed ``name/key``."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in params.items():
        for key, t in opt.state[p].items():
            if t.dtype == torch.bfloat16:
                whole = t.full_tensor() if isinstance(t, DTensor) else t
                out[f"{name}/{key}"] = whole.detach().clone().view(torch.int16)
    return out


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape, _ in TENSORS}


def full_grad(name: str, shape: tuple[int, ...], step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + [n for n, _, _ in TENSORS].index(name))
    grad = torch.randn(shape, generator=g)
    if (step, name) == NAN_AT[:2]:
        grad[NAN_AT[2]] = float("nan")
    return grad


def oracle_placements(kind: str, state_dtype: str = "float32") -> dict[str, torch.Tensor]:
    """One process: the tensors of :data:`TENSORS` after :data:`STEPS` steps (with bfloat16 state, its bits
    too)."""
    params = {k: nn.Parameter(v) for k, v in full_tensors().items()}
    opt = make_optimizer(kind, list(params.items()), state_dtype)
    for step in range(STEPS):
        for name, shape, _ in TENSORS:
            params[name].grad = full_grad(name, shape, step)
        opt.step()
    out = {k: v.detach().clone() for k, v in params.items()}
    out["nonfinite_steps"] = torch.tensor(opt.nonfinite_steps()[NAN_AT[1]])
    return {**out, **state_bits(opt, params)}


class Net(nn.Module):
    """The small model of the FSDP2, DDP and checkpoint cases (odd sizes: uneven shards)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 33)
        self.fc2 = nn.Linear(33, 17)
        self.norm = nn.LayerNorm(17)
        self.head = nn.Linear(17, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.fc2(torch.relu(self.fc1(x))))))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int = 0, world: int = 1) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.chunk(world)[rank]), y.chunk(world)[rank]).backward()
        opt.step()


def oracle_net(kind: str, steps: int = STEPS, state_dtype: str = "float32") -> dict[str, torch.Tensor]:
    model = make_net()
    opt = make_optimizer(kind, model.named_parameters(), state_dtype)
    train(model, opt, range(steps))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- in the ranks -----------------------------------------------------------------------------
def _placements(code: str) -> list:
    from torch.distributed.tensor import Replicate, Shard

    return [Replicate() if c == "R" else Shard(int(c[1:])) for c in code.split(",")]


def _mesh_for(code: str, world: int):  # noqa: ANN202
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,) if "," not in code else (1, world))


def _shard(model: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in (model.fc1, model.fc2, model.norm, model.head):
        fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}


def _own_block(full: torch.Tensor, mesh, code: str):  # noqa: ANN001, ANN202
    """A DTensor from this rank's own copy of ``full`` (distribute_tensor would take rank 0's)."""
    from torch.distributed.tensor import DTensor

    block = full
    for mesh_dim, c in enumerate(code.split(",")):
        if c != "R":
            dim, n, r = int(c[1:]), full.shape[int(c[1:])], mesh.get_local_rank(mesh_dim)
            rows = -(-n // mesh.size(mesh_dim))  # torch.chunk's split, as Shard(dim) lays blocks out
            block = full.narrow(dim, min(r * rows, n), max(0, min(rows, n - r * rows)))
    return DTensor.from_local(block.contiguous(), mesh, _placements(code), run_check=False, shape=full.shape,
                              stride=full.stride())


def rank_placements(kind: str, world: int, state_dtype: str = "float32") -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import distribute_tensor

    by_shape = {shape: _mesh_for(shape, world) for shape in ("R", "R,R")}  # a 1-D and a (1, world) mesh
    meshes = {code: by_shape["R,R" if "," in code else "R"] for _, _, code in TENSORS}
    params = {name: nn.Parameter(distribute_tensor(full_tensors()[name], meshes[code], _placements(code)))
              for name, _, code in TENSORS}
    opt = make_optimizer(kind, list(params.items()), state_dtype)
    rank = dist.get_rank()
    for step in range(STEPS):
        for name, shape, code in TENSORS:
            grad = full_grad(name, shape, step)
            if (step, name) == NAN_AT[:2] and rank != 1:
                grad[NAN_AT[2]] = 0.0  # the NaN lies in rank 1's block only
            params[name].grad = _own_block(grad, meshes[code], code)
        opt.step()
    out = {k: v.detach().full_tensor() for k, v in params.items()}
    out["nonfinite_steps"] = torch.tensor(opt.nonfinite_steps()[NAN_AT[1]])
    return {**out, **state_bits(opt, params)}


def rank_fsdp(kind: str, world: int) -> dict[str, torch.Tensor]:
    model = _shard(make_net(), world)
    opt = make_optimizer(kind, model.named_parameters())
    train(model, opt, range(STEPS), dist.get_rank(), world)
    return _full_state(model)


def rank_ddp(kind: str, world: int) -> dict[str, torch.Tensor]:
    model = nn.parallel.DistributedDataParallel(make_net())
    opt = make_optimizer(kind, model.module.named_parameters())
    train(model, opt, range(STEPS), dist.get_rank(), world)
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()}


def rank_checkpoint(kind: str, world: int, folder: str, load: bool, steps: range,
                    state_dtype: str = "float32") -> dict[str, torch.Tensor]:
    """Train ``steps`` under FSDP2 on ``world`` ranks, loading the checkpoint in ``folder`` first
    (``load``) or saving one there after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _shard(make_net(), world)
    opt = make_optimizer(kind, model.named_parameters(), state_dtype)
    if load:
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=folder)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(model, opt, steps, dist.get_rank(), world)
    if not load:
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=folder)
    out = _full_state(model)
    if state_dtype == "bfloat16":  # the loaded state kept its dtype and its step counters
        kept = all(t.dtype == torch.bfloat16 for st in opt.state.values() for k, t in st.items()
                   if k in ("m", "v", "fac_r", "fac_c", "exp_avg", "exp_avg_sq"))
        counts = {int(st["rounding_step"]) for st in opt.state.values()}
        out["bfloat16_kept"] = torch.tensor(kept)
        out["rounding_steps"] = torch.tensor(sorted(counts))
    return out


def run_rank(rank: int, world: int, store: str, out: str, cases: list[tuple[str, tuple]]) -> None:
    """Process entry point: run ``cases`` (function name, args) in order and save their results (rank 0)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        results = {}
        for name, args in cases:
            results[f"{name}{args}"] = globals()[name](*args)
        if rank == 0:
            torch.save(results, os.path.join(out, "results.pt"))
        # Every rank is done with the group before any rank tears it down.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def rank_bad_layouts(world: int) -> dict[str, str]:
    """The errors for layouts the optimizer cannot step, and whether anything changed before them."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    mesh2 = init_device_mesh("cpu", (world, 1), mesh_dim_names=("dp", "tp"))
    messages = {}
    cases = {
        "partial": DTensor.from_local(torch.ones(4, 6), mesh, [Partial()], run_check=False),
        "two_mesh_dims": distribute_tensor(torch.ones(4, 6), mesh2, [Shard(0), Shard(1)]),
        "conv_last_axes": distribute_tensor(torch.ones(4, 3, 6, 6), mesh, [Shard(2)]),
    }
    for name, t in cases.items():
        try:
            Celo2([(f"model.{name}", nn.Parameter(t))])
        except ValueError as e:
            messages[name] = str(e)
    # A gradient laid out unlike its parameter: refused at step(), before any tensor is written.
    good = nn.Parameter(distribute_tensor(torch.ones(6, 4), mesh, [Shard(0)]))
    other = nn.Parameter(distribute_tensor(torch.ones(5, 4), mesh, [Shard(0)]))
    opt = Celo2([("model.other", other), ("model.good", good)], lr=0.1)
    other.grad = distribute_tensor(torch.ones(5, 4), mesh, [Shard(0)])
    good.grad = distribute_tensor(torch.ones(6, 4), mesh, [Replicate()])
    before = other.detach().full_tensor().clone()
    try:
        opt.step()
    except RuntimeError as e:
        messages["grad_layout"] = str(e)
    messages["unchanged"] = str(bool(torch.equal(other.detach().full_tensor(), before)) and not opt.state)
    return messages
