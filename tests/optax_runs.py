"""Parameter trees, gradients and short training runs for the state-format tests of the JAX front end
(``tests/optax/test_state_dtype.py``, ``tests/optax/test_int8_state.py``).

The test modules import it by name with this folder on ``sys.path`` (pytest runs with
``--import-mode=importlib``, which does not add a test's folder)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from celo2.optax import celo2, celo2_base


def tree(seed: int = 0, width: int = 24) -> dict:
    """A small parameter tree with a leaf of every kind: an embedding, a dense kernel and bias, a conv
    kernel, an ``lm_head`` and a scalar. ``celo2``'s default labels route ``embed``, the bias, ``lm_head``
    and ``scale`` to AdamW.

    Args:
        seed: The NumPy seed of the values.
        width: The dense layer's output width. The 8-bit tests take 300, so that the kernel fills blocks of
            256 elements and leaves a partial one; the bfloat16 tests keep 24, where the XLA and CPU-kernel
            paths reduce to the same float32 bits.

    Returns:
        The tree of float32 arrays (values of scale 0.3).
    """
    rng = np.random.default_rng(seed)
    shapes = {"embed": (12, 6), "dense": {"kernel": (6, width), "bias": (width,)}, "conv": (4, 3, 3, 3),
              "lm_head": {"kernel": (24, 5)}, "scale": ()}
    return jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.3), shapes,
                                  is_leaf=lambda x: isinstance(x, tuple))


def grads(params: Any, t: int) -> Any:
    """Step ``t``'s gradients for ``params``: a cosine of the flat index, its magnitude cycling through 0.1, 1
    and 10 with the step (so that stored accumulators see several scales).

    Args:
        params: The parameter tree.
        t: The step.

    Returns:
        A tree like ``params``.
    """
    return jax.tree_util.tree_map(
        lambda p: jnp.cos(jnp.arange(p.size, dtype=jnp.float32) * (t + 1.3)).reshape(p.shape) * 10.0 ** (t % 3 - 1),
        params)


def run(opt: optax.GradientTransformation, params: Any, steps: int, state: Any = None, start: int = 0,
        nan_leaf: Optional[str] = None) -> tuple[Any, Any]:
    """Apply ``steps`` jitted updates of :func:`grads` (steps ``start`` to ``start + steps - 1``).

    Args:
        opt: The optimizer.
        params: The parameters to start from.
        steps: How many updates.
        state: The state to start from; ``None``: ``opt.init(params)``.
        start: The first step's number (which picks its gradients).
        nan_leaf: A top-level key of ``params`` whose gradient gets a NaN (its first element) in the last
            step; ``None``: none.

    Returns:
        ``(params, state)`` after the updates.
    """
    state = opt.init(params) if state is None else state
    step = jax.jit(lambda p, s, g: (lambda u, s: (optax.apply_updates(p, u), s))(*opt.update(g, s, p)))
    for t in range(start, start + steps):
        g = grads(params, t)
        if nan_leaf is not None and t == start + steps - 1:
            g = dict(g, **{nan_leaf: g[nan_leaf].at[0].set(jnp.nan)})
        params, state = step(params, state, g)
    return params, state


def make(name: str, **kw: Any) -> Callable[[Any], optax.GradientTransformation]:
    """A builder of ``celo2`` (Newton-Schulz in float32) or ``celo2_base`` with learning rate 1e-2 and weight
    decay 0.1, from a theta.

    Args:
        name: ``"celo2"`` or ``"celo2_base"``.
        **kw: Further keyword arguments of the optimizer (``state_dtype``, ``cpu_kernels``, ...).

    Returns:
        ``theta -> optimizer``.
    """
    if name == "celo2":
        return lambda th: celo2(1e-2, weight_decay=0.1, theta=th, ns_dtype="float32", **kw)
    return lambda th: celo2_base(1e-2, weight_decay=0.1, theta=th, **kw)


def gpt_shapes(vocab: int, context: int, dim: int, layers: int) -> dict:
    """The parameter shapes of a GPT, named as :class:`celo2.eval.models.GPT` names them.

    Args:
        vocab: The vocabulary size.
        context: The context length.
        dim: The model width.
        layers: The number of blocks.

    Returns:
        A tree of ``jax.ShapeDtypeStruct`` (float32), for ``jax.eval_shape``.
    """
    s, f32 = jax.ShapeDtypeStruct, jnp.float32
    block = lambda: {  # noqa: E731
        "ln1": {"weight": s((dim,), f32), "bias": s((dim,), f32)},
        "qkv": {"weight": s((3 * dim, dim), f32), "bias": s((3 * dim,), f32)},
        "proj": {"weight": s((dim, dim), f32), "bias": s((dim,), f32)},
        "ln2": {"weight": s((dim,), f32), "bias": s((dim,), f32)},
        "fc1": {"weight": s((4 * dim, dim), f32), "bias": s((4 * dim,), f32)},
        "fc2": {"weight": s((dim, 4 * dim), f32), "bias": s((dim,), f32)},
    }
    return {"tok_embed": {"weight": s((vocab, dim), f32)}, "pos_embed": s((context, dim), f32),
            "blocks": [block() for _ in range(layers)], "ln_f": {"weight": s((dim,), f32), "bias": s((dim,), f32)},
            "head": {"weight": s((vocab, dim), f32), "bias": s((vocab,), f32)}}


def state_bytes_per_parameter(opt: optax.GradientTransformation, params: Any) -> float:
    """Bytes of every array in the optimizer's state over the number of parameters (shapes only).

    Args:
        opt: The optimizer.
        params: Its parameters, arrays or ``jax.ShapeDtypeStruct``.

    Returns:
        The bytes per parameter.
    """
    state = jax.eval_shape(opt.init, params)
    nbytes = sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(state))
    return nbytes / sum(x.size for x in jax.tree_util.tree_leaves(params))
