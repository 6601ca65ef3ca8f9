"""Compiled meta-training iterations, shared by trainers of equal configurations in one process.

XLA compiles the whole PES iteration before it first runs, which delays a run's start; a resumed run,
or a second trainer in the same process, reuses the first one's executable. Both caches keep the 8
most recent entries.
"""

from __future__ import annotations

import json
from typing import Any, Callable

import numpy as np


#: Config keys that do not change the compiled iteration (bookkeeping, init, data source).
_NOT_COMPILED = ("iterations", "checkpoint_every", "data_dir", "metrics_format", "seed",
                 "theta_init", "preset", "tasks", "shard")
_STEP_CACHE: dict[tuple, Callable] = {}
#: Ahead-of-time compiled executables, keyed by the jitted function and the argument layout.
COMPILED: dict[tuple, Any] = {}


def state_shardings(pes, mesh):
    """A TrainerState of shardings: particles split along the mesh axis, the rest replicated."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from celo2.metatrain.pes import PARTICLE_AXIS

    template = jax.eval_shape(lambda: pes.init(np.zeros(pes.variant.num_theta_params, np.float32), 0))
    part = NamedSharding(mesh, PartitionSpec(PARTICLE_AXIS))
    rep = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree_util.tree_map(lambda _: rep, template)
    return shardings._replace(particles=jax.tree_util.tree_map(lambda _: part, template.particles))


def jitted_iteration(pes, mesh, inner_optimizer) -> Callable:
    """One jitted iteration per computation, shared by trainers of equal configs.

    XLA compiles the whole iteration before it first runs; a resumed run, or
    a second trainer in the same process, reuses the first one's executable.
    """
    import jax

    cfg = pes.config.to_dict()
    key = (
        json.dumps({k: v for k, v in cfg.items() if k not in _NOT_COMPILED}, sort_keys=True),
        pes.num_tasks, pes.in_dim, repr(pes.model), id(inner_optimizer) if inner_optimizer is not None else None,
        None if mesh is None else tuple(d.id for d in mesh.devices.flat),
    )
    if key not in _STEP_CACHE:
        if len(_STEP_CACHE) >= 8:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        kwargs = {}
        if mesh is not None:
            # Pin the output layout to the input layout, so that every iteration
            # runs the same executable (compiled ahead of time).
            from jax.sharding import NamedSharding, PartitionSpec

            kwargs["out_shardings"] = (state_shardings(pes, mesh), NamedSharding(mesh, PartitionSpec()))
        _STEP_CACHE[key] = jax.jit(lambda s, X, y, n: pes.iteration(s, X, y, n, mesh=mesh), **kwargs)
    return _STEP_CACHE[key]
