"""The model half of a task family: what PES trains on a family's data, in JAX.

A :class:`TaskModel` says what a family's data must look like (:meth:`~TaskModel.check_data`),
which parameters the model has (:meth:`~TaskModel.shapes`), how to draw them
(:meth:`~TaskModel.init_from_uniform`, from one block of uniforms because every separate
random call costs XLA seconds of compile time), its training loss on a batch
(:meth:`~TaskModel.loss`), and which parameters the learned rule steps and which AdamW
(:meth:`~TaskModel.param_labels`). PES vectorises over the inner runs of one run, so all
families of a run share one model (equal models compare equal); the model of a run is
that of its families.

Models here: :class:`ImageMLP` (spec section 3: 64 -> 32 -> 10, ReLU; the published
meta-training task and every family's default). The conv net and the transformer live in
:mod:`celo2.metatrain.image_convnet` and :mod:`celo2.metatrain.byte_transformer`.
Models are frozen dataclasses: their ``repr`` names them completely, and the compiled
iteration cache keys on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

_TRUNCATED_NORMAL_STD = 0.87962566
"""Standard deviation of a standard normal truncated to [-2, 2]."""


class TaskError(ValueError):
    """An unknown task family, families of different models in one run, or data that do not fit the model."""


def truncated_normal_from_uniform(u, shape: tuple[int, ...], std: float):
    """A normal of standard deviation ``std`` truncated at 2 std, from ``prod(shape)`` uniforms in ``[0, 1)``.

    Drawn by the inverse CDF, so that a whole model's weights come from one random call.

    Args:
        u: The uniforms (a JAX array of ``prod(shape)`` values).
        shape: The output's shape.
        std: The wanted standard deviation.

    Returns:
        A float32 JAX array of ``shape``.
    """
    import jax
    import jax.numpy as jnp

    hi = math.erf(2.0 / math.sqrt(2.0))
    z = np.sqrt(2.0) * jax.scipy.special.erfinv(-hi + 2.0 * hi * u)
    return ((std / _TRUNCATED_NORMAL_STD) * jnp.clip(z, -2.0, 2.0)).reshape(shape).astype(jnp.float32)


class TaskModel:
    """The interface PES uses to train a task family's model (subclass it as a frozen dataclass).

    Subclasses define :meth:`shapes`, :meth:`leaf_init` (or :meth:`init_from_uniform`),
    :meth:`loss` and :meth:`check_data`; :meth:`param_labels` defaults to the Celo2 harness's
    routing (:func:`celo2.optax.default_param_labels`: vectors, embeddings and heads to AdamW,
    other matrices and conv kernels to the learned rule).
    """

    def shapes(self, config: Any, input_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """Parameter shapes by name.

        Args:
            config: The run's :class:`~celo2.metatrain.config.MetaTrainConfig`.
            input_shape: The shape of one input example (the data's ``X.shape[2:]``).

        Returns:
            ``{name: shape}``.
        """
        raise NotImplementedError

    def input_shape(self, config: Any) -> tuple[int, ...]:
        """The shape of one input example under ``config`` (default: a flat ``image_size**2`` image)."""
        return (config.image_size ** 2,)

    def leaf_init(self, name: str, shape: tuple[int, ...]) -> tuple[str, float]:
        """How one parameter starts: ``("normal", std)`` (truncated at 2 std), ``("zeros", 0)`` or ``("ones", 0)``."""
        return ("zeros", 0.0) if len(shape) < 2 else ("normal", 1.0 / math.sqrt(math.prod(shape[:-1])))

    def num_init_uniforms(self, shapes: dict[str, tuple[int, ...]]) -> int:
        """How many uniforms :meth:`init_from_uniform` reads."""
        return int(sum(math.prod(s) for n, s in shapes.items() if self.leaf_init(n, s)[0] == "normal"))

    def init_from_uniform(self, u, shapes: dict[str, tuple[int, ...]]) -> dict:
        """Initial parameters from :meth:`num_init_uniforms` uniforms in ``[0, 1)``, leaves in sorted order.

        Args:
            u: A JAX array of at least ``num_init_uniforms(shapes)`` uniforms.
            shapes: From :meth:`shapes`.

        Returns:
            ``{name: float32 array}``.
        """
        import jax.numpy as jnp

        params, offset = {}, 0
        for name, shape in sorted(shapes.items()):
            kind, std = self.leaf_init(name, shape)
            if kind == "normal":
                n = math.prod(shape)
                params[name] = truncated_normal_from_uniform(u[offset:offset + n], shape, std)
                offset += n
            else:
                params[name] = (jnp.ones if kind == "ones" else jnp.zeros)(shape, jnp.float32)
        return params

    def init(self, key, shapes: dict[str, tuple[int, ...]]) -> dict:
        """Initial parameters from a JAX key (see :meth:`init_from_uniform`)."""
        import jax

        return self.init_from_uniform(jax.random.uniform(key, (max(1, self.num_init_uniforms(shapes)),)), shapes)

    def loss(self, params: dict, x, y):
        """Mean training loss of ``params`` on a batch ``x`` (``(B, *input_shape)``), ``y``."""
        raise NotImplementedError

    def param_labels(self, params: dict) -> dict:
        """``{name: "celo2" | "adam"}``: which parameters the learned rule steps."""
        from celo2.optax import default_param_labels

        return default_param_labels()(params)

    def check_data(self, family: str, X: np.ndarray, y: np.ndarray, *, image_size: int,
                   num_classes: int) -> tuple[np.ndarray, np.ndarray]:
        """``(X, y)`` checked and cast for this model, or :class:`TaskError` naming ``family``.

        Args:
            family: The family's name, for messages.
            X, y: What the family's loader returned.
            image_size: The run's ``image_size``.
            num_classes: The run's ``num_classes``.
        """
        raise NotImplementedError


def check_image_classification(family: str, X: np.ndarray, y: np.ndarray, image_size: int,
                               num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat images ``(N, image_size**2)`` with finite float32 values and labels in ``[0, num_classes)``.

    Returns:
        ``(X as float32, y as int32)``.

    Raises:
        TaskError: naming ``family`` and what is wrong.
    """
    dim = image_size * image_size
    X = np.asarray(X, np.float32)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[1] != dim:
        raise TaskError(f"task family {family!r}: images have shape {X.shape}, expected (N, {dim})")
    if y.shape != (X.shape[0],):
        raise TaskError(f"task family {family!r}: labels have shape {y.shape}, expected ({X.shape[0]},)")
    if X.shape[0] == 0:
        raise TaskError(f"task family {family!r}: empty training set")
    if not np.all(np.isfinite(X)):
        raise TaskError(f"task family {family!r}: images hold non-finite values")
    if y.min() < 0 or y.max() >= num_classes:
        raise TaskError(f"task family {family!r}: labels span [{y.min()}, {y.max()}], expected [0, {num_classes})")
    return X, y.astype(np.int32)


def softmax_cross_entropy(logits, labels):
    """Mean cross-entropy of integer ``labels`` under ``logits`` (classes on the last axis)."""
    import jax
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels.astype(jnp.int32)[..., None], axis=-1))


# --- the image MLP ----------------------------------------------------------------------
def mlp_shapes(in_dim: int, hidden: tuple[int, ...], num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes ``w{i}`` ``(in, out)`` and ``b{i}`` of the task MLP."""
    sizes = (in_dim, *hidden, num_classes)
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"w{i}"] = (a, b)
        shapes[f"b{i}"] = (b,)
    return shapes


def mlp_num_weights(shapes: dict[str, tuple[int, ...]]) -> int:
    """Number of weight-matrix entries (the uniforms :func:`mlp_init_from_uniform` reads)."""
    return int(sum(np.prod(s) for n, s in shapes.items() if n.startswith("w")))


def mlp_init_from_uniform(u, shapes: dict[str, tuple[int, ...]]):
    """Weights from ``mlp_num_weights(shapes)`` uniforms in ``[0, 1)``: truncated normals
    (cut at 2 std) with std ``1/sqrt(fan_in)``; zero biases."""
    return ImageMLP().init_from_uniform(u, shapes)


def mlp_init(key, shapes: dict[str, tuple[int, ...]]):
    """Initial MLP weights from a key (see :func:`mlp_init_from_uniform`)."""
    return ImageMLP().init(key, shapes)


def mlp_loss(params, x, y, num_layers: int):
    """Mean softmax cross-entropy of the ReLU MLP on a batch."""
    import jax

    h = x
    for i in range(num_layers):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < num_layers - 1:
            h = jax.nn.relu(h)
    return softmax_cross_entropy(h, y)


@dataclass(frozen=True)
class ImageMLP(TaskModel):
    """The published meta-training task: a ReLU MLP on flat images, ``config.hidden_sizes`` wide.

    Every weight matrix (the output layer included) gets the learned rule and the biases
    AdamW, as in the published meta-training.
    """

    def shapes(self, config, input_shape):
        return mlp_shapes(int(np.prod(input_shape)), tuple(config.hidden_sizes), config.num_classes)

    def leaf_init(self, name, shape):
        return ("normal", 1.0 / math.sqrt(shape[0])) if name.startswith("w") else ("zeros", 0.0)

    def loss(self, params, x, y):
        return mlp_loss(params, x, y, sum(1 for n in params if n.startswith("w")))

    def param_labels(self, params):
        return {k: ("celo2" if k.startswith("w") else "adam") for k in params}

    def check_data(self, family, X, y, *, image_size, num_classes):
        return check_image_classification(family, X, y, image_size, num_classes)


__all__ = [
    "ImageMLP", "TaskError", "TaskModel", "check_image_classification", "mlp_init", "mlp_init_from_uniform",
    "mlp_loss", "mlp_num_weights", "mlp_shapes", "softmax_cross_entropy", "truncated_normal_from_uniform",
]
