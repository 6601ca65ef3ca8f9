"""A tiny causal transformer on bytes (vocabulary 256), as a meta-training task model.

Pre-LayerNorm blocks (attention, then a GELU MLP), learned position embeddings, an
untied output head; next-byte cross-entropy averaged over every position of every
window. A family's data are windows of ``context`` bytes and the windows shifted by
one (:func:`celo2.data.docstrings.byte_windows`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from celo2.metatrain.task_models import TaskError, TaskModel, softmax_cross_entropy

VOCAB_SIZE = 256


def layer_norm(x, gain, eps: float = 1e-5):
    """LayerNorm over the last axis with a gain and no bias."""
    import jax.numpy as jnp

    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * (gain / jnp.sqrt(var + eps))


@dataclass(frozen=True)
class ByteTransformer(TaskModel):
    """A causal byte-level transformer of ``layers`` blocks, ``width`` wide, over ``context`` bytes.

    Parameters: ``tok_embed`` ``(256, W)``, ``pos_embed`` ``(context, W)``, per block ``l{i}_ln1``,
    ``l{i}_qkv`` ``(W, 3W)``, ``l{i}_proj`` ``(W, W)``, ``l{i}_ln2``, ``l{i}_fc`` ``(W, mlp_ratio*W)``,
    ``l{i}_out`` ``(mlp_ratio*W, W)``, then ``ln_f`` and ``head`` ``(W, 256)``. Routing is the Celo2
    harness's default (the block matrices to the learned rule; embeddings, head and gains to
    AdamW), as in the bench's GPT.

    Attributes:
        width: Model width ``W`` (divisible by ``heads``).
        layers: Number of blocks.
        heads: Attention heads.
        context: Bytes per window.
        mlp_ratio: Hidden width of the MLP over ``W``.
    """

    width: int = 32
    layers: int = 1
    heads: int = 2
    context: int = 32
    mlp_ratio: int = 4

    def __post_init__(self):
        for key in ("width", "layers", "heads", "context", "mlp_ratio"):
            if int(getattr(self, key)) < 1:
                raise TaskError(f"ByteTransformer: {key}={getattr(self, key)}: must be a positive integer")
        if self.width % self.heads:
            raise TaskError(f"ByteTransformer: width={self.width} is not divisible by heads={self.heads}")

    def input_shape(self, config):
        return (self.context,)

    def shapes(self, config, input_shape):
        if tuple(input_shape) != (self.context,):
            raise TaskError(f"ByteTransformer: windows of shape {tuple(input_shape)}, expected ({self.context},)")
        w, hidden = self.width, self.mlp_ratio * self.width
        shapes = {"tok_embed": (VOCAB_SIZE, w), "pos_embed": (self.context, w), "ln_f": (w,), "head": (w, VOCAB_SIZE)}
        for i in range(self.layers):
            shapes.update({f"l{i}_ln1": (w,), f"l{i}_qkv": (w, 3 * w), f"l{i}_proj": (w, w),
                           f"l{i}_ln2": (w,), f"l{i}_fc": (w, hidden), f"l{i}_out": (hidden, w)})
        return shapes

    def leaf_init(self, name, shape):
        if len(shape) == 1:
            return ("ones", 0.0)  # LayerNorm gains
        if name.endswith("embed"):
            return ("normal", 1.0 / math.sqrt(shape[1]))  # unit-RMS rows
        return ("normal", 1.0 / math.sqrt(shape[0]))

    def logits(self, params, x):
        """Next-byte logits ``(B, T, 256)`` of windows ``x`` ``(B, T)``; position ``j`` sees bytes ``<= j`` only."""
        import jax
        import jax.numpy as jnp

        x = x.astype(jnp.int32)
        t, w, nh = x.shape[-1], self.width, self.heads
        hd = w // nh
        h = jnp.take(params["tok_embed"], x, axis=0) + params["pos_embed"][:t]
        causal = jnp.tril(jnp.ones((t, t), bool))
        for i in range(self.layers):
            a = layer_norm(h, params[f"l{i}_ln1"]) @ params[f"l{i}_qkv"]
            q, k, v = (a[..., j * w:(j + 1) * w].reshape(*a.shape[:-1], nh, hd) for j in range(3))
            scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
            att = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
            mixed = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(h.shape)
            h = h + mixed @ params[f"l{i}_proj"]
            m = jax.nn.gelu(layer_norm(h, params[f"l{i}_ln2"]) @ params[f"l{i}_fc"])
            h = h + m @ params[f"l{i}_out"]
        return layer_norm(h, params["ln_f"]) @ params["head"]

    def loss(self, params, x, y):
        return softmax_cross_entropy(self.logits(params, x), y)

    def check_data(self, family, X, y, *, image_size, num_classes):
        X, y = np.asarray(X), np.asarray(y)
        if X.ndim != 2 or X.shape[1] != self.context:
            raise TaskError(f"task family {family!r}: windows have shape {X.shape}, expected (N, {self.context})")
        if y.shape != X.shape:
            raise TaskError(f"task family {family!r}: targets have shape {y.shape}, expected {X.shape}")
        if X.shape[0] == 0:
            raise TaskError(f"task family {family!r}: empty training set")
        for what, a in (("windows", X), ("targets", y)):
            if not np.issubdtype(a.dtype, np.integer) or a.min() < 0 or a.max() >= VOCAB_SIZE:
                raise TaskError(f"task family {family!r}: {what} must be integer bytes in [0, {VOCAB_SIZE}), "
                                f"got dtype {a.dtype} spanning [{a.min()}, {a.max()}]")
        return X.astype(np.uint8), y.astype(np.uint8)


__all__ = ["ByteTransformer", "VOCAB_SIZE", "layer_norm"]
