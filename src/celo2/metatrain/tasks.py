"""Task families for meta-training, and the image-MLP task they all train.

A *task family* is just a named data source: it returns a training set
``(X, y)`` with ``X`` float32 of shape ``(N, image_size**2)`` in ``[0, 1]`` and
integer labels in ``[0, num_classes)``. Every family of one run trains the same
MLP (spec section 3: 64 -> 32 -> 10, ReLU, softmax cross-entropy, batch 64), so
that all inner problems share shapes and PES can vectorise over them.

Adding a family::

    from celo2.metatrain import TaskFamily, register_task_family

    def load_my_data(data_root, size):          # data_root: str | None
        X, y = ...                               # (N, size*size) float32, int labels
        return X, y

    register_task_family(TaskFamily("my-data", load_my_data, needs_data_root=False,
                                    description="my own 8x8 images"))

after which ``--tasks my-data`` (or ``tasks=("my-data", ...)``) uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Callable

import numpy as np


class TaskError(ValueError):
    """An unknown task family or a family whose data do not fit the task."""


@dataclass(frozen=True)
class TaskFamily:
    """A named source of training images for the shared image-MLP task."""

    name: str
    load: Callable[[str | None, int], tuple[np.ndarray, np.ndarray]]
    """``load(data_root, image_size) -> (X, y)``."""
    needs_data_root: bool = False
    description: str = ""


_REGISTRY: dict[str, TaskFamily] = {}


def register_task_family(family: TaskFamily, *, replace: bool = False) -> TaskFamily:
    """Make ``family`` available by name; refuses to shadow one unless ``replace``."""
    if family.name in _REGISTRY and not replace:
        raise TaskError(f"task family {family.name!r} is already registered (pass replace=True)")
    _REGISTRY[family.name] = family
    return family


def task_families() -> dict[str, TaskFamily]:
    return dict(_REGISTRY)


def get_task_family(name: str) -> TaskFamily:
    if name not in _REGISTRY:
        raise TaskError(
            f"unknown task family {name!r}; known: {', '.join(sorted(_REGISTRY))} "
            "(add one with celo2.metatrain.register_task_family)"
        )
    return _REGISTRY[name]


def _celo2_data_loader(dataset: str) -> Callable[[str | None, int], tuple[np.ndarray, np.ndarray]]:
    def load(data_root: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
        from celo2 import data  # imported late: the loaders pull in scipy/sklearn

        return data.load_task_images(dataset, split="train", root=data_root, size=size)

    return load


for _name, _needs, _desc in (
    ("mnist", True, "MNIST digits (IDX files), bilinear 8x8"),
    ("fashion-mnist", True, "Fashion-MNIST (IDX files), bilinear 8x8"),
    ("cifar10", True, "CIFAR-10 python batches, greyscale, bilinear 8x8"),
    ("svhn", True, "SVHN cropped digits (.mat), greyscale, bilinear 8x8"),
    ("digits", False, "scikit-learn's bundled 8x8 digits (no download)"),
    ("synthetic", False, "generated 8x8 images (no download)"),
):
    register_task_family(TaskFamily(_name, _celo2_data_loader(_name), _needs, _desc))


def _photo_loader(family: str) -> Callable[[str | None, int], tuple[np.ndarray, np.ndarray]]:
    def load(data_root: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
        from celo2.data import photos  # imported late: needs scikit-image

        return photos.load_photo_family(family, split="train", size=size)

    return load


for _name, _desc in (
    ("photo-patches", "which of ten scikit-image photographs an 8x8 patch comes from (CIFAR-10 stand-in)"),
    ("photo-faces", "where an LFW face sits in a photograph's clutter, or none (SVHN stand-in)"),
):
    register_task_family(TaskFamily(_name, _photo_loader(_name), False, _desc + "; needs scikit-image"))


@dataclass(frozen=True)
class TaskData:
    """The training sets of a run's task families, padded and stacked for vectorised sampling."""

    names: tuple[str, ...]
    X: np.ndarray  # (T, N_max, D) float32
    y: np.ndarray  # (T, N_max) int32
    sizes: np.ndarray  # (T,) int32: valid rows of each task

    def summary(self) -> dict[str, int]:
        return {n: int(s) for n, s in zip(self.names, self.sizes)}


def load_task_data(names: tuple[str, ...] | list[str], data_root: str | None,
                   image_size: int = 8, num_classes: int = 10) -> TaskData:
    """Load every family's training set and check it fits the shared MLP task."""
    xs, ys = [], []
    dim = image_size * image_size
    for name in names:
        family = get_task_family(name)
        X, y = family.load(data_root, image_size)
        X = np.asarray(X, np.float32)
        y = np.asarray(y)
        if X.ndim != 2 or X.shape[1] != dim:
            raise TaskError(f"task family {name!r}: images have shape {X.shape}, expected (N, {dim})")
        if y.shape != (X.shape[0],):
            raise TaskError(f"task family {name!r}: labels have shape {y.shape}, expected ({X.shape[0]},)")
        if X.shape[0] == 0:
            raise TaskError(f"task family {name!r}: empty training set")
        if not np.all(np.isfinite(X)):
            raise TaskError(f"task family {name!r}: images hold non-finite values")
        if y.min() < 0 or y.max() >= num_classes:
            raise TaskError(
                f"task family {name!r}: labels span [{y.min()}, {y.max()}], expected [0, {num_classes})"
            )
        xs.append(X)
        ys.append(y.astype(np.int32))
    n_max = max(x.shape[0] for x in xs)
    X_all = np.zeros((len(xs), n_max, dim), np.float32)
    y_all = np.zeros((len(xs), n_max), np.int32)
    for i, (X, y) in enumerate(zip(xs, ys)):
        X_all[i, : X.shape[0]] = X
        y_all[i, : y.shape[0]] = y
    return TaskData(tuple(names), X_all, y_all, np.asarray([x.shape[0] for x in xs], np.int32))


# --- the image MLP ------------------------------------------------------------------
def mlp_shapes(in_dim: int, hidden: tuple[int, ...], num_classes: int) -> dict[str, tuple[int, ...]]:
    """Parameter shapes ``w{i}`` ``(in, out)`` and ``b{i}`` of the task MLP."""
    sizes = (in_dim, *hidden, num_classes)
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        shapes[f"w{i}"] = (a, b)
        shapes[f"b{i}"] = (b,)
    return shapes


def mlp_num_weights(shapes: dict[str, tuple[int, ...]]) -> int:
    return int(sum(np.prod(s) for n, s in shapes.items() if n.startswith("w")))


def mlp_init_from_uniform(u, shapes: dict[str, tuple[int, ...]]):
    """Weights from ``mlp_num_weights(shapes)`` uniforms in ``[0, 1)``: truncated normals
    (cut at 2 std) with std ``1/sqrt(fan_in)``; zero biases.

    The truncated normal is drawn by its inverse CDF from one block of
    uniforms, because each separate random call costs XLA seconds of compile time.
    """
    import jax
    import jax.numpy as jnp

    hi = math.erf(2.0 / math.sqrt(2.0))
    lo = -hi
    params, offset = {}, 0
    for name, shape in sorted(shapes.items()):
        if name.startswith("b"):
            params[name] = jnp.zeros(shape, jnp.float32)
            continue
        n = int(np.prod(shape))
        z = np.sqrt(2.0) * jax.scipy.special.erfinv(lo + (hi - lo) * u[offset:offset + n])
        # truncated_normal(-2, 2) has std 0.8796; rescale to std 1/sqrt(fan_in).
        std = 1.0 / np.sqrt(shape[0]) / 0.87962566
        params[name] = (std * jnp.clip(z, -2.0, 2.0)).reshape(shape).astype(jnp.float32)
        offset += n
    return params


def mlp_init(key, shapes: dict[str, tuple[int, ...]]):
    """Initial MLP weights from a key (see :func:`mlp_init_from_uniform`)."""
    import jax

    return mlp_init_from_uniform(jax.random.uniform(key, (mlp_num_weights(shapes),)), shapes)


def mlp_loss(params, x, y, num_layers: int):
    """Mean softmax cross-entropy of the ReLU MLP on a batch."""
    import jax
    import jax.numpy as jnp

    h = x
    for i in range(num_layers):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < num_layers - 1:
            h = jax.nn.relu(h)
    logp = jax.nn.log_softmax(h)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


__all__ = [
    "TaskData", "TaskError", "TaskFamily", "get_task_family", "load_task_data",
    "mlp_init", "mlp_init_from_uniform", "mlp_loss", "mlp_num_weights", "mlp_shapes", "register_task_family", "task_families",
]
