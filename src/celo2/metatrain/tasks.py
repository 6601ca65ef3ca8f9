"""Task families for meta-training: named data sources, each with the model PES trains on them.

A *task family* names its data (a loader returning a training set ``(X, y)``) and its
model (a :class:`~celo2.metatrain.task_models.TaskModel`: parameter shapes, initial
weights, loss, which parameters the learned rule steps). PES vectorises over the inner
runs of one run, so every family of a run must share one model; the run's model is
theirs. The default model is the published image MLP (spec section 3: 64 -> 32 -> 10,
ReLU, softmax cross-entropy, batch 64) on ``X`` float32 of shape ``(N, image_size**2)``
in ``[0, 1]`` with integer labels in ``[0, num_classes)``.

Built-in families: the image families (``mnist``, ``fashion-mnist``, ``cifar10``,
``svhn``, ``digits``, ``synthetic``, ``photo-patches``, ``photo-faces``) on the image
MLP; those of them the bench never evaluates on also on a small conv net (``conv-cifar10``,
``conv-svhn``, ``conv-synthetic``, ``conv-photo-patches``, ``conv-photo-faces``;
:class:`~celo2.metatrain.image_convnet.ImageConvNet`); and ``text-docstrings``, a tiny
causal byte transformer (:class:`~celo2.metatrain.byte_transformer.ByteTransformer`) on
the standard library's docstrings (:mod:`celo2.data.docstrings`).

Adding a family::

    from celo2.metatrain import TaskFamily, register_task_family

    def load_my_data(data_root, size):          # data_root: str | None
        X, y = ...                               # (N, size*size) float32, int labels
        return X, y

    register_task_family(TaskFamily("my-data", load_my_data, needs_data_root=False,
                                    description="my own 8x8 images"))

after which ``--tasks my-data`` (or ``tasks=("my-data", ...)``) uses it; pass
``model=...`` to train another model on it (``docs/meta-training.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from celo2.metatrain.byte_transformer import ByteTransformer
from celo2.metatrain.image_convnet import ImageConvNet
from celo2.metatrain.task_models import (
    ImageMLP,
    TaskError,
    TaskModel,
    mlp_init,
    mlp_init_from_uniform,
    mlp_loss,
    mlp_num_weights,
    mlp_shapes,
)

Loader = Callable[[str | None, int], tuple[np.ndarray, np.ndarray]]
"""``load(data_root, image_size) -> (X, y)``."""


@dataclass(frozen=True)
class TaskFamily:
    """A named source of training data and the model PES trains on it.

    Attributes:
        name: What ``tasks=`` / ``--tasks`` call it.
        load: ``load(data_root, image_size) -> (X, y)``, checked by ``model.check_data``.
        needs_data_root: The loader reads files from ``--data-dir``.
        description: One line for listings.
        model: The model trained on the data (default: the published image MLP).
    """

    name: str
    load: Loader
    needs_data_root: bool = False
    description: str = ""
    model: TaskModel = field(default_factory=ImageMLP)


_REGISTRY: dict[str, TaskFamily] = {}


def register_task_family(family: TaskFamily, *, replace: bool = False) -> TaskFamily:
    """Make ``family`` available by name; refuses to shadow one unless ``replace``."""
    if family.name in _REGISTRY and not replace:
        raise TaskError(f"task family {family.name!r} is already registered (pass replace=True)")
    _REGISTRY[family.name] = family
    return family


def task_families() -> dict[str, TaskFamily]:
    """Every registered family by name."""
    return dict(_REGISTRY)


def get_task_family(name: str) -> TaskFamily:
    """The family registered as ``name``, or :class:`TaskError` listing the known ones."""
    if name not in _REGISTRY:
        raise TaskError(
            f"unknown task family {name!r}; known: {', '.join(sorted(_REGISTRY))} "
            "(add one with celo2.metatrain.register_task_family)"
        )
    return _REGISTRY[name]


def _celo2_data_loader(dataset: str) -> Loader:
    def load(data_root: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
        from celo2 import data  # imported late: the loaders pull in scipy/sklearn

        return data.load_task_images(dataset, split="train", root=data_root, size=size)

    return load


_IMAGE_FAMILIES = (
    ("mnist", True, "MNIST digits (IDX files), bilinear 8x8"),
    ("fashion-mnist", True, "Fashion-MNIST (IDX files), bilinear 8x8"),
    ("cifar10", True, "CIFAR-10 python batches, greyscale, bilinear 8x8"),
    ("svhn", True, "SVHN cropped digits (.mat), greyscale, bilinear 8x8"),
    ("digits", False, "scikit-learn's bundled 8x8 digits (no download)"),
    ("synthetic", False, "generated 8x8 images (no download)"),
)
for _name, _needs, _desc in _IMAGE_FAMILIES:
    register_task_family(TaskFamily(_name, _celo2_data_loader(_name), _needs, _desc))


def _photo_loader(family: str) -> Loader:
    def load(data_root: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
        from celo2.data import photos  # imported late: needs scikit-image

        return photos.load_photo_family(family, split="train", size=size)

    return load


_PHOTO_FAMILIES = (
    ("photo-patches", "which of ten scikit-image photographs an 8x8 patch comes from (CIFAR-10 stand-in)"),
    ("photo-faces", "where an LFW face sits in a photograph's clutter, or none (SVHN stand-in)"),
)
for _name, _desc in _PHOTO_FAMILIES:
    register_task_family(TaskFamily(_name, _photo_loader(_name), False, _desc + "; needs scikit-image"))


CONV_NET = ImageConvNet()
"""The conv net of the ``conv-<image family>`` families."""
CONV_FAMILY_IMAGES = ("cifar10", "svhn", "synthetic", "photo-patches", "photo-faces")
"""The image families that also come as ``conv-<name>``: those whose images the bench never evaluates
on (it trains on MNIST and Fashion-MNIST, or the scikit-learn digits without a data folder)."""

for _name, _needs, _desc in _IMAGE_FAMILIES:
    if _name not in CONV_FAMILY_IMAGES:
        continue
    register_task_family(TaskFamily(f"conv-{_name}", _celo2_data_loader(_name), _needs,
                                    f"{_desc}; small conv net", CONV_NET))
for _name, _desc in _PHOTO_FAMILIES:
    register_task_family(TaskFamily(f"conv-{_name}", _photo_loader(_name), False,
                                    f"{_desc}; needs scikit-image; small conv net", CONV_NET))

DOCSTRING_TRANSFORMER = ByteTransformer(width=32, layers=1, heads=2, context=32)
"""The model of the ``text-docstrings`` family."""
DOCSTRING_WINDOW_STRIDE = 8
"""Bytes between the starts of consecutive ``text-docstrings`` windows."""


def docstring_loader(model: ByteTransformer, stride: int = DOCSTRING_WINDOW_STRIDE,
                     max_bytes: int | None = None, split: str = "train") -> Loader:
    """A loader of next-byte windows of the standard library's docstrings for ``model``.

    Args:
        model: Its ``context`` sets the window length.
        stride: Bytes between window starts.
        max_bytes: Corpus budget (default :data:`celo2.data.docstrings.DEFAULT_MAX_BYTES`).
        split: ``"train"``, or ``"selection"`` for a family kept to choose checkpoints on.

    Returns:
        ``load(data_root, image_size) -> (windows, next bytes)``, both ``(N, context)`` uint8;
        the arguments are unused.
    """

    def load(data_root: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
        from celo2.data import docstrings

        budget = docstrings.DEFAULT_MAX_BYTES if max_bytes is None else max_bytes
        return docstrings.byte_windows(docstrings.load_docstring_corpus(split, budget), model.context, stride)

    return load


register_task_family(TaskFamily(
    "text-docstrings", docstring_loader(DOCSTRING_TRANSFORMER), False,
    "next byte of the Python standard library's docstrings (no download; disjoint from the bench's corpus); "
    "tiny causal transformer", DOCSTRING_TRANSFORMER))


def model_of_families(names: tuple[str, ...] | list[str]) -> TaskModel:
    """The one model that every family in ``names`` trains.

    Raises:
        TaskError: an unknown family, no family, or families of different models.
    """
    families = [get_task_family(n) for n in names]
    if not families:
        raise TaskError("no task family given")
    model = families[0].model
    for family in families[1:]:
        if family.model != model:
            raise TaskError(
                f"task families {families[0].name!r} ({model!r}) and {family.name!r} ({family.model!r}) "
                "train different models; one run vectorises over a single model, so meta-train them in "
                "separate runs")
    return model


@dataclass(frozen=True)
class TaskData:
    """The training sets of a run's task families, padded and stacked for vectorised sampling."""

    names: tuple[str, ...]
    X: np.ndarray  # (T, N_max, *input_shape): float32 images, uint8 byte windows, ...
    y: np.ndarray  # (T, N_max, *target_shape): int32 labels, uint8 next bytes, ...
    sizes: np.ndarray  # (T,) int32: valid rows of each task

    def summary(self) -> dict[str, int]:
        """Training examples per family."""
        return {n: int(s) for n, s in zip(self.names, self.sizes)}


def load_task_data(names: tuple[str, ...] | list[str], data_root: str | None,
                   image_size: int = 8, num_classes: int = 10) -> TaskData:
    """Load every family's training set, check it fits the families' shared model, and stack them.

    Args:
        names: The families.
        data_root: Passed to the loaders (``--data-dir``).
        image_size: The run's image side.
        num_classes: The run's number of classes.

    Returns:
        The padded, stacked :class:`TaskData`.

    Raises:
        TaskError: an unknown family, families of different models, or data that do not fit
            (naming the family).
    """
    model = model_of_families(names)
    xs, ys = [], []
    for name in names:
        X, y = get_task_family(name).load(data_root, image_size)
        X, y = model.check_data(name, X, y, image_size=image_size, num_classes=num_classes)
        if xs and (X.shape[1:], X.dtype, y.shape[1:], y.dtype) != (xs[0].shape[1:], xs[0].dtype,
                                                                   ys[0].shape[1:], ys[0].dtype):
            raise TaskError(f"task family {name!r}: examples {X.shape[1:]} {X.dtype} / targets {y.shape[1:]} "
                            f"{y.dtype} differ from {names[0]!r}'s {xs[0].shape[1:]} {xs[0].dtype} / "
                            f"{ys[0].shape[1:]} {ys[0].dtype}")
        xs.append(X)
        ys.append(y)
    n_max = max(x.shape[0] for x in xs)
    X_all = np.zeros((len(xs), n_max, *xs[0].shape[1:]), xs[0].dtype)
    y_all = np.zeros((len(xs), n_max, *ys[0].shape[1:]), ys[0].dtype)
    for i, (X, y) in enumerate(zip(xs, ys)):
        X_all[i, : X.shape[0]] = X
        y_all[i, : y.shape[0]] = y
    return TaskData(tuple(names), X_all, y_all, np.asarray([x.shape[0] for x in xs], np.int32))


__all__ = [
    "CONV_FAMILY_IMAGES", "CONV_NET", "DOCSTRING_TRANSFORMER", "DOCSTRING_WINDOW_STRIDE", "Loader", "TaskData", "TaskError",
    "TaskFamily", "TaskModel", "docstring_loader", "get_task_family", "load_task_data", "mlp_init",
    "mlp_init_from_uniform", "mlp_loss", "mlp_num_weights", "mlp_shapes", "model_of_families",
    "register_task_family", "task_families",
]
