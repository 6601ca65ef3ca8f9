"""Persistent Evolution Strategies over vectorised inner runs (spec section 3).

Layout. Every inner run ("particle") is one slot of arrays with a leading
particle axis of size ``P = tasks x pairs x 2``, ordered ``(task, pair, sign)``
with the sign innermost, so a ``+``/``-`` pair sits side by side and the axis
can be split over devices (``NamedSharding`` on a 1-D mesh) without
separating a pair. ``+`` and ``-`` runs of a pair draw identical data,
resets, reparametrisation scales and lengths, because they are drawn from the
same pair key; only theta differs (``theta +- eps``).

One outer iteration is a single jitted function: draw perturbations, draw one
fresh inner run per pair (used by any run that ends during this truncation;
``min_unroll_length >= truncation_length`` guarantees at most one reset per
truncation), ``lax.scan`` over the truncation's steps with every particle
stepped by ``vmap``, then the PES estimate and the outer AdamW step. A run
whose step count reaches its length is replaced at the start of the next step,
so every step of a truncation contributes a training loss (of the old or of
the new run).

All randomness is derived from the key in the state and the iteration
number, so a run restored from a checkpoint continues bit for bit.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from celo2.metatrain.config import MetaTrainConfig
from celo2.metatrain.task_models import ImageMLP, TaskModel
from celo2.metatrain.tasks import model_of_families
from celo2.rule import spec
from celo2.rule.variant import PUBLISHED, RuleVariant

PARTICLE_AXIS = "particles"
"""Name of the mesh axis the particle arrays are split over."""

InnerOptimizerFactory = Callable[[Any], optax.GradientTransformation]
"""``factory(theta_tree) -> optax.GradientTransformation``; must be jit/vmap friendly."""


class Particles(NamedTuple):
    """Inner-run state, each leaf with a leading particle axis."""

    params: dict  # stored (reparametrised) weights: the loss sees params * scale
    opt_state: Any
    scale: dict  # reparametrisation scale per leaf: shape () or the leaf's shape
    step: jax.Array  # int32: steps done in the current run
    length: jax.Array  # int32: length of the current run


class TrainerState(NamedTuple):
    """Everything a resumed run needs: theta, outer optimiser, inner runs, PES sums, key."""

    iteration: jax.Array  # int32 scalar: outer iterations done
    theta: jax.Array  # float32[n], the variant's theta keys in order (Theta.to_flat); 347 published
    outer_state: Any
    particles: Particles
    accumulator: jax.Array  # (num_pairs, n): per pair, the sum of eps since its run began
    key: jax.Array  # uint32[2]: root key; iteration keys are fold_in(key, iteration)


def unflatten_theta(flat: jax.Array, variant: RuleVariant = PUBLISHED) -> dict:
    """A flat theta (``Theta.to_flat`` order) as the dict of arrays the rule reads.

    Args:
        flat: The values in ``variant.theta_keys`` order (may be traced).
        variant: The rule variant (default the published rule).

    Returns:
        Theta key -> array of the variant's shape.
    """
    out, offset = {}, 0
    for key, shape in variant.theta_shapes().items():
        n = math.prod(shape)
        out[key] = flat[offset:offset + n].reshape(shape)
        offset += n
    return out


# --- meta-loss ------------------------------------------------------------------
def clip_meta_loss(loss: jax.Array, clip: float) -> jax.Array:
    """Each per-step loss clipped to ``[0, clip]``; non-finite values count as ``clip``."""
    return jnp.where(jnp.isfinite(loss), jnp.clip(loss, 0.0, clip), clip)


def zero_nonfinite(tree: Any) -> Any:
    return jax.tree_util.tree_map(lambda g: jnp.where(jnp.isfinite(g), g, 0.0), tree)


def pes_pair_gradient(
    delta_before: jax.Array,
    delta_after: jax.Array,
    eps: Any,
    accumulator: Any,
    reset: jax.Array,
    std: float,
) -> tuple[Any, Any]:
    """Per-pair PES estimate and the new accumulator (``eps``/``accumulator``: arrays
    or pytrees with a leading pair axis).

    ``delta_before`` / ``delta_after``: per pair, the ``+`` minus ``-`` meta-loss
    summed over the truncation's steps before / after a reset of the inner run
    (already divided by the number of steps). Losses before a reset depend on
    every perturbation since the run began (``accumulator + eps``); losses after
    it only on this truncation's ``eps``. The accumulator restarts from ``eps``
    when the run was reset, and keeps growing otherwise.
    """
    scale = 1.0 / (2.0 * std * std)

    def per_leaf(e, a):
        shape = (-1,) + (1,) * (e.ndim - 1)
        return scale * (delta_before.reshape(shape) * (a + e) + delta_after.reshape(shape) * e)

    grad = jax.tree_util.tree_map(per_leaf, eps, accumulator)

    def new_acc(e, a):
        return jnp.where(reset.reshape((-1,) + (1,) * (e.ndim - 1)), e, a + e)

    return grad, jax.tree_util.tree_map(new_acc, eps, accumulator)


def particle_mesh(devices: list, groups: int) -> "jax.sharding.Mesh | None":
    """A 1-D mesh (axis ``"particles"``) over as many of ``devices`` as divide
    ``groups`` (the units that must stay on one device, e.g. the +/- pairs);
    ``None`` when that is fewer than two."""
    from jax.sharding import Mesh

    n = max((d for d in range(1, len(devices) + 1) if groups % d == 0), default=1)
    return Mesh(np.asarray(devices[:n]), (PARTICLE_AXIS,)) if n >= 2 else None


# --- inner optimisers -------------------------------------------------------------
def default_inner_optimizer(config: MetaTrainConfig, model: TaskModel | None = None) -> InnerOptimizerFactory:
    """The inner optimiser of the config as a function of (perturbed) theta.

    ``celo2`` and ``celo2-base`` are the JAX front end (:mod:`celo2.optax`),
    called with a traced theta inside the vectorised unroll; ``celo2`` routes
    parameters by ``model.param_labels`` (default: the image MLP's, every
    weight matrix to the learned rule, as in the published meta-training).
    Every rule variant (``config.variant``) runs there, on XLA's formulation.

    Args:
        config: The run's configuration (``inner_optimizer``, ``inner_lr``, ...).
        model: The task model whose parameters are stepped.

    Returns:
        ``factory(theta_tree) -> optax.GradientTransformation``.
    """
    labels = (model if model is not None else ImageMLP()).param_labels
    name = config.inner_optimizer
    lr, wd, mult = config.inner_lr, config.inner_weight_decay, config.adam_lr_mult
    if name == "adam":
        # Ignores theta: a baseline to check the pipeline (its PES gradient is zero).
        return lambda theta: optax.adamw(lr, b1=spec.ADAM_BETAS[0], b2=spec.ADAM_BETAS[1], eps=spec.ADAM_EPS,
                                             weight_decay=wd)
    variant = config.variant
    import celo2.optax as co

    if name == "celo2-base":
        # The spec's Celo2-base: the learned rule without Newton-Schulz on every tensor.
        return lambda theta: co.celo2_base(lr, weight_decay=wd, theta=theta, cpu_kernels=False, variant=variant)
    # XLA's formulation (cpu_kernels=False): it batches over the particles under vmap,
    # where a custom call would run once per particle.
    return lambda theta: co.celo2(lr, weight_decay=wd, adam_lr_mult=mult, theta=theta,
                                  orthogonalize=True, param_labels=labels, cpu_kernels=False, variant=variant)


# --- the engine ---------------------------------------------------------------------
class PES:
    """Pure functions of one meta-training configuration: ``init`` and ``iteration``.

    Args:
        config: The run's configuration.
        num_tasks: Task families of the run.
        inner_optimizer: ``theta_tree -> optax.GradientTransformation`` in place of the config's.
        in_dim: Length of one (flat) input example (default: the model's, from the config).
        model: The task model (default: that of ``config.tasks``' families).
        input_shape: Shape of one input example, for models of non-flat inputs (overrides ``in_dim``).
    """

    def __init__(self, config: MetaTrainConfig, num_tasks: int,
                 inner_optimizer: InnerOptimizerFactory | None = None,
                 in_dim: int | None = None, *, model: TaskModel | None = None,
                 input_shape: tuple[int, ...] | None = None):
        self.config = config
        self.variant = config.variant
        self.num_tasks = num_tasks
        self.K = config.pairs_per_task
        self.num_pairs = num_tasks * self.K
        self.P = 2 * self.num_pairs
        self.model = model if model is not None else model_of_families(config.tasks)
        if input_shape is None:
            input_shape = (in_dim,) if in_dim else self.model.input_shape(config)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.in_dim = math.prod(self.input_shape)
        self.shapes = self.model.shapes(config, self.input_shape)
        self.factory = inner_optimizer or default_inner_optimizer(config, self.model)
        self.outer = optax.adamw(
            config.outer_lr, b1=config.outer_b1, b2=config.outer_b2,
            eps=config.outer_eps, weight_decay=config.outer_weight_decay,
        )
        # Task of each particle and sign (+1, -1) of its perturbation.
        self.particle_task = np.repeat(np.arange(num_tasks), 2 * self.K).astype(np.int32)
        self.particle_sign = np.tile(np.asarray([1.0, -1.0], np.float32), self.num_pairs)

    # -- random draws shared by the two runs of a pair ----------------------------
    def _draw_run(self, key: jax.Array, theta: jax.Array) -> Particles:
        """A fresh inner run: init weights, reparametrisation scale, length; step 0.

        All of it comes from one block of uniforms (one random call compiles
        much faster than many).
        """
        c = self.config
        names = sorted(self.shapes)
        n_w = self.model.num_init_uniforms(self.shapes)
        if c.augmentation == "parameter":
            scale_sizes = [int(np.prod(self.shapes[n])) for n in names]
        elif c.augmentation == "tensor":
            scale_sizes = [1] * len(names)
        elif c.augmentation == "global":
            scale_sizes = [1]
        else:
            scale_sizes = []
        n_s = sum(scale_sizes)
        u = jax.random.uniform(key, (n_w + n_s + 1,), jnp.float32)
        weights = self.model.init_from_uniform(u[:n_w], self.shapes)
        lo, hi = math.log(c.reparam_scale_min), math.log(c.reparam_scale_max)
        s = jnp.exp(lo + (hi - lo) * u[n_w:n_w + n_s])
        if c.augmentation == "none":
            scale = {n: jnp.ones((), jnp.float32) for n in names}
        elif c.augmentation == "global":
            scale = {n: s[0] for n in names}
        else:
            scale, offset = {}, 0
            for n, size in zip(names, scale_sizes):
                shape = () if c.augmentation == "tensor" else self.shapes[n]
                scale[n] = s[offset:offset + size].reshape(shape)
                offset += size
        params = {n: weights[n] / scale[n] for n in names}
        length = self._length_from_uniform(u[-1])
        opt_state = self.factory(unflatten_theta(theta, self.variant)).init(params)
        return Particles(params, opt_state, scale, jnp.zeros((), jnp.int32), length)

    def _length_from_uniform(self, u: jax.Array) -> jax.Array:
        """Log-uniform integer in ``[min_unroll_length, max_unroll_length]``."""
        c = self.config
        lo, hi = math.log(c.min_unroll_length), math.log(c.max_unroll_length + 1)
        n = jnp.floor(jnp.exp(lo + (hi - lo) * u))
        return jnp.clip(n, c.min_unroll_length, c.max_unroll_length).astype(jnp.int32)

    def _pair_to_particles(self, tree: Any) -> Any:
        return jax.tree_util.tree_map(lambda x: jnp.repeat(x, 2, axis=0), tree)

    def _perturbed(self, theta: jax.Array, eps: jax.Array) -> jax.Array:
        """``theta + eps`` and ``theta - eps`` for every pair, as ``(P, n)``."""
        sign = jnp.asarray(self.particle_sign)[:, None]
        return theta[None] + sign * self._pair_to_particles(eps)

    # -- init ---------------------------------------------------------------------------
    def init(self, theta: jax.Array, seed: int) -> TrainerState:
        """Initial state: fresh runs at random step offsets, zero accumulators.

        ``theta`` is flat (``Theta.to_flat()`` order); it stays flat in the
        state so that perturbations, accumulators and the outer AdamW are
        single arrays (the dict form costs seconds of compile time per key).
        """
        c = self.config
        theta = jnp.asarray(theta, jnp.float32).reshape(-1)
        n = self.variant.num_theta_params
        if theta.shape != (n,):
            of = "" if self.variant.is_published else f" for rule variant {self.variant.label}"
            raise ValueError(f"theta must have {n} values{of}, got {theta.shape}")
        key = jax.random.PRNGKey(seed)
        k_runs, k_off = jax.random.split(jax.random.fold_in(key, 0x5EED))
        pair_keys = jax.random.split(k_runs, self.num_pairs)
        # As in the published PES, the first runs are drawn with the unperturbed theta.
        runs = jax.vmap(lambda k: self._draw_run(k, theta))(pair_keys)
        if c.initial_offset_max > 0:
            offsets = jax.random.randint(k_off, (self.num_pairs,), 0, c.initial_offset_max, jnp.int32)
            runs = runs._replace(step=offsets)
        return TrainerState(
            iteration=jnp.zeros((), jnp.int32),
            theta=theta,
            outer_state=self.outer.init(theta),
            particles=self._pair_to_particles(runs),
            accumulator=jnp.zeros((self.num_pairs, theta.shape[0]), jnp.float32),
            key=key,
        )

    # -- one outer iteration -------------------------------------------------------------
    def _unroll(self, theta_p, particles, fresh_keys, data_keys, task, X, y, sizes):
        """One truncation of the given particles (any leading size): no cross-particle work.

        Returns the new particles, the per-step losses ``(T, n)`` and whether a
        particle's run was reset at or before each step ``(T, n)``.
        """
        c = self.config
        T, B = c.truncation_length, c.batch_size
        model, factory = self.model, self.factory
        fresh = jax.vmap(self._draw_run)(fresh_keys, theta_p)
        idx = jax.vmap(lambda k, n: jax.random.randint(k, (T, B), 0, n))(data_keys, sizes[task])
        idx = jnp.swapaxes(idx, 0, 1)  # (T, n, B): scanned over T

        def one_particle(th, run: Particles, new: Particles, t_idx, b_idx):
            th = unflatten_theta(th, self.variant)
            done = run.step >= run.length
            opt = factory(th)
            run = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), new, run)
            xb, yb = X[t_idx, b_idx], y[t_idx, b_idx]

            def loss_fn(stored):
                return model.loss({n: stored[n] * run.scale[n] for n in stored}, xb, yb)

            loss, grad = jax.value_and_grad(loss_fn)(run.params)
            updates, opt_state = opt.update(grad, run.opt_state, run.params)
            params = optax.apply_updates(run.params, updates)
            return run._replace(params=params, opt_state=opt_state, step=run.step + 1), loss, done

        stepped = jax.vmap(one_particle)

        def body(carry, b_idx):
            runs, was_reset = carry
            runs, loss, done = stepped(theta_p, runs, fresh, task, b_idx)
            was_reset = was_reset | done
            return (runs, was_reset), (loss, was_reset)

        # zeros_like keeps the particle axis "varying" under shard_map, as scan's carry requires.
        (particles, _), (losses, after) = jax.lax.scan(
            body, (particles, jnp.zeros_like(particles.step, dtype=bool)), idx)
        return particles, losses, after

    def iteration(self, state: TrainerState, X: jax.Array, y: jax.Array, sizes: jax.Array,
                  mesh: "jax.sharding.Mesh | None" = None) -> tuple[TrainerState, dict]:
        """Unroll every particle one truncation, estimate the gradient, step theta.

        With a ``mesh`` (1-D, axis ``"particles"``) the unroll runs under
        ``shard_map``: each device steps its own slice of particles; only the
        per-step losses meet for the gradient.
        """
        c = self.config
        # One split for all of the iteration's keys (every random call costs compile time).
        keys = jax.random.split(jax.random.fold_in(state.key, state.iteration), 1 + 2 * self.num_pairs)
        k_eps = keys[0]

        theta = state.theta
        eps = c.perturbation_std * jax.random.normal(k_eps, (self.num_pairs,) + theta.shape, jnp.float32)
        theta_p = self._perturbed(theta, eps)
        fresh_keys = self._pair_to_particles(keys[1:1 + self.num_pairs])
        data_keys = self._pair_to_particles(keys[1 + self.num_pairs:])
        task = jnp.asarray(self.particle_task)

        unroll = self._unroll
        if mesh is not None and mesh.size > 1:
            from jax.sharding import PartitionSpec as PS

            part, rep = PS(PARTICLE_AXIS), PS()
            unroll = jax.shard_map(
                self._unroll, mesh=mesh,
                in_specs=(part, part, part, part, part, rep, rep, rep),
                out_specs=(part, PS(None, PARTICLE_AXIS), PS(None, PARTICLE_AXIS)),
            )
        particles, losses, after = unroll(
            theta_p, state.particles, fresh_keys, data_keys, task, X, y, sizes)

        T = c.truncation_length
        clipped = clip_meta_loss(losses, c.meta_loss_clip)  # (T, P)
        before_sum = jnp.sum(jnp.where(after, 0.0, clipped), axis=0) / T
        after_sum = jnp.sum(jnp.where(after, clipped, 0.0), axis=0) / T
        d_before = before_sum[0::2] - before_sum[1::2]
        d_after = after_sum[0::2] - after_sum[1::2]
        reset = after[-1]
        grads, accumulator = pes_pair_gradient(
            d_before, d_after, eps, state.accumulator, reset[0::2], c.perturbation_std)
        grad = zero_nonfinite(jnp.mean(grads, axis=0))

        updates, outer_state = self.outer.update(grad, state.outer_state, theta)
        new_theta = optax.apply_updates(theta, updates)

        metrics = {
            "meta_loss": jnp.mean(clipped),
            "grad_norm": jnp.sqrt(jnp.sum(jnp.square(grad))),
            "resets": jnp.sum(reset) // 2,
            "nonfinite_losses": jnp.sum(~jnp.isfinite(losses)),
        }
        new_state = TrainerState(
            iteration=state.iteration + 1,
            theta=new_theta,
            outer_state=outer_state,
            particles=particles,
            accumulator=accumulator,
            key=state.key,
        )
        return new_state, metrics


__all__ = [
    "InnerOptimizerFactory", "PARTICLE_AXIS", "PES", "Particles", "TrainerState", "clip_meta_loss",
    "default_inner_optimizer", "particle_mesh", "pes_pair_gradient", "unflatten_theta", "zero_nonfinite",
]
