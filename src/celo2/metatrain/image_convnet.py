"""A small conv net on flat square images, as a meta-training task model.

The images are those of the image families (``(N, image_size**2)`` in ``[0, 1]``), so any
image data a family loads for the MLP can train the conv net instead. Convolutions are
written as patch extraction plus one matrix product: under ``vmap`` over PES's inner
runs that is a batched matrix product, which XLA's CPU backend runs far faster than a
batched (grouped) convolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from celo2.metatrain.task_models import TaskError, TaskModel, check_image_classification, softmax_cross_entropy


def conv2d_same(x, kernel, stride: int):
    """A 2-D convolution of ``x`` ``(B, H, W, C)`` with ``kernel`` ``(k, k, C, D)``, zero-padded by ``k // 2``
    on every side (PyTorch's ``padding=k // 2``; with stride 1 the output keeps the input's size).

    Args:
        x: The input, channels last.
        kernel: Square, odd side ``k``.
        stride: Step between output positions (both axes).

    Returns:
        ``(B, ceil(H / stride), ceil(W / stride), D)``.
    """
    import jax.numpy as jnp

    k = kernel.shape[0]
    pad = k // 2
    h, w = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    patches = [xp[:, i:i + h:stride, j:j + w:stride, :] for i in range(k) for j in range(k)]
    cols = jnp.concatenate(patches, axis=-1)  # (B, H', W', k*k*C), offsets major, channels minor
    return cols @ kernel.reshape(-1, kernel.shape[-1])


@dataclass(frozen=True)
class ImageConvNet(TaskModel):
    """ReLU conv layers (3x3, padded by 1, each with its stride), global average pooling, a linear head.

    Parameters ``conv{i}`` ``(k, k, C_in, C_out)`` with biases ``conv{i}_b``, then ``head``
    ``(C_last, num_classes)`` and ``head_b``. Routing is the Celo2 harness's default (conv
    kernels to the learned rule; biases and the head to AdamW), as the rule meets a CNN at use.

    Attributes:
        channels: Output channels of each conv layer.
        strides: Stride of each conv layer (same length as ``channels``).
        kernel: Side of the square kernels (odd).
    """

    channels: tuple[int, ...] = (8, 16)
    strides: tuple[int, ...] = (2, 2)
    kernel: int = 3

    def __post_init__(self):
        if len(self.channels) != len(self.strides) or not self.channels:
            raise TaskError(f"ImageConvNet: channels {self.channels} and strides {self.strides} "
                            "must be non-empty and of equal length")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise TaskError(f"ImageConvNet: kernel={self.kernel}: must be odd and positive")

    def shapes(self, config, input_shape):
        side = math.isqrt(int(math.prod(input_shape)))
        if side * side != int(math.prod(input_shape)):
            raise TaskError(f"ImageConvNet: inputs of shape {input_shape} are not flat square images")
        shapes, c_in = {}, 1
        for i, c in enumerate(self.channels):
            shapes[f"conv{i}"] = (self.kernel, self.kernel, c_in, c)
            shapes[f"conv{i}_b"] = (c,)
            c_in = c
        shapes["head"] = (c_in, config.num_classes)
        shapes["head_b"] = (config.num_classes,)
        return shapes

    def loss(self, params, x, y):
        import jax

        side = math.isqrt(x.shape[-1])
        h = x.reshape(x.shape[0], side, side, 1)
        for i, stride in enumerate(self.strides):
            h = jax.nn.relu(conv2d_same(h, params[f"conv{i}"], stride) + params[f"conv{i}_b"])
        logits = h.mean(axis=(1, 2)) @ params["head"] + params["head_b"]
        return softmax_cross_entropy(logits, y)

    def check_data(self, family, X, y, *, image_size, num_classes):
        return check_image_classification(family, X, y, image_size, num_classes)


__all__ = ["ImageConvNet", "conv2d_same"]
