"""The rule on DTensor parameters: FSDP2's ``fully_shard``, tensor-parallel placements, replicas.

A parameter sharded along one axis (``Shard(d)`` on one mesh dimension,
``Replicate()`` on any others; shards may be uneven or empty) is stepped on
each rank's local block, so that every rank ends with its block of the update
one process would compute for the whole tensor:

* The accumulators are elementwise: each rank updates its own block. The
  factored statistics that reduce over the sharded axis are replicated; the
  others are sharded with the tensor.
* The statistics spanning a whole tensor (the channels' sums of squares for
  the input RMS, the factored row and column means, the output RMS) are
  completed across ranks as small partial sums
  (:class:`celo2.torch.backends.torch.Reduction`); the tensor is never gathered
  for them.
* Newton-Schulz needs whole matrices. Each matrix gets an owner rank
  (:func:`plan_owners`: largest first, to the least-loaded rank); one
  ``all_to_all`` sends every block of a matrix to its owner, the owner
  orthogonalises its matrices (batched by shape) and normalises them, and a
  second ``all_to_all`` sends each rank its block back. Matrices go a wave
  at a time (:data:`WAVE_ELEMENTS`), so a rank holds, beyond its shards,
  only the whole matrices it owns in the current wave.
* Under ``nonfinite="skip"`` the finite flag is reduced across the shards,
  so that every rank skips the same tensors.
* bfloat16 state: each rank steps a float32 copy of its blocks and stores
  them rounded with its elements' flat indices in the whole accumulators
  (:meth:`Sharding.block_origin`), so that sharded and unsharded runs store
  the same bits.

No step moves a value to the host: the plans depend on shapes only, and the
collectives take device tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # a PyTorch build without torch.distributed: no parameter is a DTensor
    class DTensor(torch.Tensor):  # type: ignore[no-redef]
        """Stands in for ``torch.distributed.tensor.DTensor``, which this PyTorch build lacks."""

    Replicate = Shard = None  # type: ignore[assignment,misc]

from celo2.rule.state import STATE_KEYS, factoring, state_shapes, work_shape
from celo2.torch import _rounding
from celo2.torch._nonfinite import Gate
from celo2.torch._state import TorchTheta
from celo2.torch.backends.base import StateRounding, apply_update, finish
from celo2.torch.backends import torch as chunked
from celo2.torch.comm import COMM
from celo2.torch.ns import batch_member_limit, newton_schulz_many, resolve_ns_dtype, waves

WAVE_ELEMENTS: int = 1 << 24
"""Elements of whole matrices exchanged for Newton-Schulz in one wave, over all
ranks of a group (64 MiB of float32): bounds what a rank holds beyond its shards."""


def _placement_text(p: DTensor) -> str:
    return f"placements {tuple(p.placements)} on a mesh of shape {tuple(p.device_mesh.shape)}"


@dataclass
class Sharding:
    """How one DTensor parameter lies across ranks, and the reductions over its shards.

    Attributes:
        mesh: The parameter's device mesh.
        placements: Its placements.
        mesh_dim: The mesh dimension it is sharded over (``None``: replicated everywhere).
        axis: The tensor axis (of the work shape) that is sharded, or ``None``.
        global_shape: The whole tensor's work shape.
        group: The process group of ``mesh_dim``.
        group_rank: This rank's index in it.
        group_size: Its size.
        sizes: Each group rank's block length along ``axis``.
    """

    mesh: Any
    placements: tuple
    mesh_dim: Optional[int]
    axis: Optional[int]
    global_shape: tuple[int, ...]
    group: Any = None
    group_rank: int = 0
    group_size: int = 1
    sizes: tuple[int, ...] = ()
    offsets: tuple[int, ...] = field(default=())

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` (sum) over the shard group in place; return it."""
        if self.group_size > 1:
            dist.all_reduce(t, group=self.group)
            COMM.all_reduces += 1
            COMM.all_reduce_bytes += 2 * (self.group_size - 1) * t.numel() * t.element_size() // self.group_size
        return t

    def min_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` (minimum) over the shard group in place; return it."""
        if self.group_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
            COMM.all_reduces += 1
            COMM.all_reduce_bytes += 2 * (self.group_size - 1) * t.numel() * t.element_size() // self.group_size
        return t

    def block_shape(self, rank: int) -> tuple[int, ...]:
        """The work shape of group rank ``rank``'s block."""
        shape = list(self.global_shape)
        if self.axis is not None:
            shape[self.axis] = self.sizes[rank]
        return tuple(shape)

    def state_axis(self, key: str) -> Optional[int]:
        """The sharded axis of accumulator ``key`` (``None``: replicated)."""
        a = self.axis
        if a is None:
            return None
        if key == "m":
            return a + 1
        if key in ("v", "exp_avg", "exp_avg_sq"):
            return a
        f = factoring(self.global_shape)
        if f is None:
            return a + 1 if key == "fac_r" else None
        reduced = f.d0 if key == "fac_r" else f.d1
        return None if a == reduced else 1 + (a if a < reduced else a - 1)

    def state_placements(self, key: str) -> tuple:
        """The placements of accumulator ``key``: the parameter's, with its shard moved to the state's axis."""
        axis = self.state_axis(key)
        return tuple(Shard(axis) if (i == self.mesh_dim and axis is not None) else Replicate()
                     for i in range(len(self.placements)))

    def new_state(self, key: str, global_shape: tuple[int, ...], device: torch.device,
                  dtype: torch.dtype = torch.float32) -> DTensor:
        """Zeros of ``dtype`` for accumulator ``key`` as a DTensor laid out by :meth:`state_placements`."""
        axis = self.state_axis(key)
        local = list(global_shape)
        if axis is not None:
            local[axis] = self.sizes[self.group_rank]
        return DTensor.from_local(torch.zeros(local, dtype=dtype, device=device), self.mesh,
                                  self.state_placements(key), run_check=False, shape=torch.Size(global_shape),
                                  stride=contiguous_strides(global_shape))

    def block_origin(self, key: str, block: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Where this rank's block of accumulator ``key`` lies: the whole accumulator's shape and the block's
        first index on each axis (a :data:`celo2.torch._rounding.Layout`; the AdamW branch's moments are laid
        out like the parameter).

        Args:
            key: A rule accumulator (:data:`celo2.rule.state.STATE_KEYS`), ``"exp_avg"`` or ``"exp_avg_sq"``.
            block: This rank's block of it.

        Returns:
            ``(whole shape, starts)``.
        """
        axis = self.state_axis(key)
        if axis is None:
            return tuple(block.shape), (0,) * block.ndim
        whole = list(block.shape)
        whole[axis] = sum(self.sizes)
        starts = [0] * block.ndim
        starts[axis] = self.offsets[self.group_rank]
        return tuple(whole), tuple(starts)

    def local_block(self, key: str, full: torch.Tensor) -> torch.Tensor:
        """This rank's block of a whole (unsharded) accumulator ``key``."""
        axis = self.state_axis(key)
        if axis is None:
            return full
        r = self.group_rank
        return full.narrow(axis, self.offsets[r], self.sizes[r])


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a contiguous tensor of ``shape`` (size-0 axes counted as 1, as PyTorch does).

    Args:
        shape: A tensor shape.

    Returns:
        Its row-major strides, in elements.
    """
    strides, acc = [], 1
    for s in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(strides))


def _chunk_sizes(n: int, parts: int) -> tuple[int, ...]:
    """DTensor's ``Shard`` split of ``n`` into ``parts`` blocks (``torch.chunk``: full blocks first)."""
    block = -(-n // parts) if n else 0
    return tuple(max(0, min(block, n - r * block)) for r in range(parts))


def describe(p: DTensor, label: str) -> Sharding:
    """How ``p`` is sharded, or a clear error for a layout the optimizer cannot step.

    Args:
        p: A DTensor parameter.
        label: Its name (for errors).

    Returns:
        Its :class:`Sharding`.

    Raises:
        ValueError: Naming the parameter and its placements, for partial
            placements, strided shards (FSDP2 on top of tensor parallelism),
            or shards along more than one mesh dimension.
    """
    shards = []
    for i, pl in enumerate(p.placements):
        if isinstance(pl, Replicate):
            continue
        if type(pl) is not Shard:
            raise ValueError(f"{label}: a DTensor with {_placement_text(p)}: placement {pl!r} is not supported "
                             f"(Shard(dim) on one mesh dimension and Replicate() on the others are); redistribute "
                             f"the parameter or leave it out of this optimizer")
        shards.append((i, pl))
    if len(shards) > 1:
        raise ValueError(f"{label}: a DTensor with {_placement_text(p)} is sharded over {len(shards)} mesh "
                         f"dimensions; the optimizer supports one (Shard(dim) on one mesh dimension, Replicate() "
                         f"on the others)")
    shape = work_shape(p.shape)
    mesh = p.device_mesh
    if not shards:
        return Sharding(mesh, tuple(p.placements), None, None, shape)
    mesh_dim, pl = shards[0]
    axis = pl.dim % p.ndim
    size = mesh.size(mesh_dim)
    rank = mesh.get_local_rank(mesh_dim)
    sizes = _chunk_sizes(shape[axis], size)
    offsets = tuple(sum(sizes[:r]) for r in range(size))
    local = p.to_local()
    if tuple(local.shape) != tuple(shape[:axis]) + (sizes[rank],) + tuple(shape[axis + 1:]):
        raise ValueError(f"{label}: a DTensor with {_placement_text(p)} has a local block of shape "
                         f"{tuple(local.shape)} on this rank, not the {sizes[rank]} rows along dim {axis} that "
                         f"Shard({axis}) gives; the optimizer cannot tell where it lies")
    return Sharding(mesh, tuple(p.placements), mesh_dim, axis, shape, mesh.get_group(mesh_dim), rank, size, sizes,
                    offsets)


def check_learned(sharding: Sharding, label: str, p: DTensor, orthogonalize: bool) -> None:
    """Refuse a sharding the learned rule cannot step.

    Tensors of three or more dims normalise over their last two axes, inside
    a rank's block: they may be sharded along any other axis.

    Raises:
        ValueError: Naming the parameter and its placements.
    """
    nd = len(sharding.global_shape)
    if sharding.axis is not None and nd >= 3 and sharding.axis >= nd - 2:
        raise ValueError(f"{label}: a {tuple(p.shape)} DTensor with {_placement_text(p)}: the learned rule "
                         f"normalises (and orthogonalises) the last two axes of a tensor of {nd} dims, so it can "
                         f"be sharded along dims 0..{nd - 3} only; shard another dim or route it to AdamW "
                         f"(a param group with branch='adam')")


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (aliasing its storage), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def init_state(p: DTensor, sharding: Sharding, dtype: torch.dtype = torch.float32) -> dict[str, DTensor]:
    """Zeroed accumulators (of ``dtype``) of the learned rule for a DTensor parameter, laid out with it."""
    return {key: sharding.new_state(key, shape, p.device, dtype) for key, shape in state_shapes(p.shape).items()}


def finite_flags(grads: Sequence[torch.Tensor], sharding: Sharding) -> list[torch.Tensor]:
    """Per gradient, 1 where every shard of it is finite, else 0 (0-d int32 tensors, the same on every
    rank); one collective for all of them.

    Args:
        grads: Gradients sharded over ``sharding``'s group.
        sharding: Any of their shardings (for the group).
    """
    if not grads:
        return []
    oks = torch.stack([torch.isfinite(local(g)).all() for g in grads]).to(torch.int32)
    return list(sharding.min_(oks).unbind())


def plan_owners(sizes: Sequence[int], ranks: int) -> list[int]:
    """An owner rank per matrix for Newton-Schulz: largest first, each to the rank with the least so far.

    Decided by the sizes only (ties to the lower rank, then the earlier
    matrix), so every rank computes the same plan.

    Args:
        sizes: Elements of each matrix.
        ranks: The group's size.

    Returns:
        The owner of each matrix, in input order.
    """
    load = [0] * ranks
    owners = [0] * len(sizes)
    for j in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        r = min(range(ranks), key=lambda r: (load[r], r))
        owners[j] = r
        load[r] += sizes[j]
    return owners


def _all_to_all(chunks: list[torch.Tensor], recv_sizes: list[int], sharding: Sharding,
                device: torch.device) -> list[torch.Tensor]:
    """Send ``chunks[r]`` (flat float32) to group rank ``r``; return what each rank sent here."""
    me = sharding.group_rank
    if sharding.group_size == 1:
        return chunks
    send = torch.cat(chunks) if chunks else torch.empty(0, device=device)
    recv = torch.empty(sum(recv_sizes), dtype=torch.float32, device=device)
    in_splits = [c.numel() for c in chunks]
    dist.all_to_all_single(recv, send, recv_sizes, in_splits, group=sharding.group)
    COMM.all_to_alls += 1
    COMM.all_to_all_bytes += 4 * (sum(in_splits) - in_splits[me])
    return list(recv.split(recv_sizes))


def _orthogonalise_owned(shardings: list[Sharding], raws: dict[int, torch.Tensor], wave: list[int],
                         device: torch.device, dtype: torch.dtype) -> list[torch.Tensor]:
    """Newton-Schulz and the output RMS on the whole matrices of ``wave``; each rank gets its blocks back.

    Args:
        shardings: Per matrix of the step (all of one group).
        raws: This rank's block of each raw direction (float32, work shape).
        wave: The matrices of this wave (indices into the above).
        device: Where the blocks live.
        dtype: Newton-Schulz's dtype.

    Returns:
        This rank's block of each finished direction of the wave (float32, unit RMS over the whole matrix).
    """
    ref = shardings[wave[0]]
    size, me = ref.group_size, ref.group_rank
    owners = plan_owners([math.prod(shardings[j].global_shape) for j in wave], size)
    mine = [j for j, o in zip(wave, owners) if o == me]
    # Out: every block to its matrix's owner.
    chunks = [[] for _ in range(size)]
    for j, o in zip(wave, owners):
        chunks[o].append(raws[j].reshape(-1))
    flat = [torch.cat(c) if c else torch.empty(0, device=device) for c in chunks]
    recv_sizes = [sum(math.prod(shardings[j].block_shape(r)) for j in mine) for r in range(size)]
    pieces = _all_to_all(flat, recv_sizes, ref, device)
    whole = {}
    for r, piece in enumerate(pieces):
        parts = piece.split([math.prod(shardings[j].block_shape(r)) for j in mine])
        for j, part in zip(mine, parts):
            whole.setdefault(j, []).append(part.view(shardings[j].block_shape(r)))
    mats = [torch.cat(whole[j], dim=shardings[j].axis) for j in mine]
    COMM.whole_bytes_peak = max(COMM.whole_bytes_peak, sum(m.numel() * m.element_size() for m in mats))
    outs = newton_schulz_many(mats, dtype=dtype, inplace=True, max_member=batch_member_limit(device))
    finished = {}
    for j, d in zip(mine, outs):
        finished[j] = finish(d)
    # Back: each rank's block of every matrix this rank owns.
    back = [[] for _ in range(size)]
    for j in mine:
        sh = shardings[j]
        for r in range(size):
            back[r].append(finished[j].narrow(sh.axis, sh.offsets[r], sh.sizes[r]).reshape(-1))
    flat = [torch.cat(c) if c else torch.empty(0, device=device) for c in back]
    recv_sizes = [sum(math.prod(shardings[j].block_shape(me)) for j, o in zip(wave, owners) if o == r)
                  for r in range(size)]
    pieces = _all_to_all(flat, recv_sizes, ref, device)
    blocks = {}
    for r, piece in enumerate(pieces):
        owned = [j for j, o in zip(wave, owners) if o == r]
        for j, part in zip(owned, piece.split([math.prod(shardings[j].block_shape(me)) for j in owned])):
            blocks[j] = part.view(shardings[j].block_shape(me))
    return [blocks[j] for j in wave]


def celo2(params: Sequence[DTensor], grads: Sequence[DTensor], states: Sequence[dict[str, DTensor]],
          shardings: Sequence[Sharding], *, theta: Callable[[torch.device], TorchTheta], lr: Any,
          weight_decay: float, orthogonalize: bool, ns_dtype: str | torch.dtype, skip: bool,
          counters: Sequence[torch.Tensor], workspace: Optional[chunked.Workspace] = None,
          chunk_elements: Optional[int] = None, rounding: Optional[StateRounding] = None) -> None:
    """The rule's step on sharded DTensor parameters, in place (see the module doc).

    Every rank of each parameter's shard group must call this with the same
    parameters in the same order (as an optimizer's ``step`` does).

    Args:
        params: Parameters sharded along one axis (:func:`describe`).
        grads: Their gradients, laid out like them.
        states: Their accumulators (:func:`init_state`).
        shardings: :func:`describe` of each.
        theta: The weights for a device.
        lr: Learning rate (float or 0-d tensor).
        weight_decay: Decoupled weight decay.
        orthogonalize: Newton-Schulz on matrices (Celo2).
        ns_dtype: Newton-Schulz's dtype (as :class:`~celo2.torch.Celo2`'s).
        skip: Skip tensors whose gradient is not finite anywhere (``nonfinite="skip"``).
        counters: Per parameter, its count of skipped steps.
        workspace: Chunk scratch.
        chunk_elements: Elements per chunk of the chunked path.
        rounding: With bfloat16 accumulators, how each write is rounded (lists parallel to ``params``);
            ``None`` for float32.
    """
    apply = (lr, weight_decay)
    groups: dict[Any, list[int]] = {}  # shard group -> its tensors (each group's collectives go together)
    for i, p in enumerate(params):
        if p.numel():
            groups.setdefault(shardings[i].group, []).append(i)

    def locals_of(i: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        return local(params[i]), local(grads[i]), {k: local(states[i][k]) for k in STATE_KEYS}

    def steps_of(i: int, raw: bool, box: Optional[dict] = None) -> chunked.Partials:
        p_loc, g_loc, st_loc = locals_of(i)
        work = st_loc if rounding is None else _rounding.working_copy(st_loc, STATE_KEYS)
        yield from chunked.steps(theta(p_loc.device), work, g_loc, p_loc, orthogonalize or raw,
                                 None if raw else apply, raw=raw, shard=shardings[i], chunk_elements=chunk_elements,
                                 workspace=workspace, box=box)
        if rounding is not None:
            _rounding.store_state(st_loc, work, rounding.tensor(i), STATE_KEYS, shardings[i].block_origin)

    gates = []
    for members in groups.values():
        ref = shardings[members[0]]
        if skip:
            oks = finite_flags([grads[i] for i in members], ref)
            for i, ok in zip(members, oks):
                p_loc, _, st_loc = locals_of(i)
                gates.append(Gate(p_loc, list(st_loc.values()), counters[i], ok=ok))
        held = [i for i in members if orthogonalize and len(shardings[i].global_shape) == 2]
        rest = [i for i in members if i not in set(held)]
        if rest:
            chunked.run_together([steps_of(i, raw=False) for i in rest], ref.sum_)
        if not held:
            continue
        device = local(params[held[0]]).device
        dtype = resolve_ns_dtype(ns_dtype, device)
        group_shardings = [shardings[i] for i in held]
        numels = [math.prod(s.global_shape) for s in group_shardings]
        for wave in waves(list(range(len(held))), WAVE_ELEMENTS, numel=numels.__getitem__):
            # This rank's blocks of the wave's raw directions, their partial sums completed together.
            boxes = {j: {} for j in wave}
            chunked.run_together([steps_of(held[j], raw=True, box=boxes[j]) for j in wave], ref.sum_)
            raws = {j: boxes[j]["result"] for j in wave}
            blocks = _orthogonalise_owned(group_shardings, raws, wave, device, dtype)
            for j, d in zip(wave, blocks):
                p_loc = local(params[held[j]])
                del raws[j]
                apply_update(p_loc, 0, work_shape(p_loc.shape)[0], d, apply, None)
    for gate in gates:
        gate.close()
