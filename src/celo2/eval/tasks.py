"""Task registry of the bench: small PyTorch training problems far from the 8x8 meta-training MLPs.

Its pieces: :mod:`~celo2.eval.task_data` (data and caches), :mod:`~celo2.eval.problems` (the
problem interface), :mod:`~celo2.eval.models` (the models), :mod:`~celo2.eval.cartpole` (the RL
task's simulator). Their public names are importable from here too.

A task turns ``(config, seed, data_dir)`` into a :class:`Problem`: a model
initialised from ``torch.manual_seed(seed)``, a training loss for step ``t``
whose batch depends only on ``(seed, t)`` (so every optimizer and LR sees the
same data in the same order), and a validation loss on a fixed held-out set.
Everything is single-process and seeded, so one run is repeatable exactly.

Image tasks read 28x28 Fashion-MNIST (or MNIST) through :mod:`celo2.data`;
when no data folder is given and none is found, they fall back to the
built-in scikit-learn digits upsampled to 28x28 and say so in
``Problem.data_source`` (which the report prints).

Configs are plain dicts of JSON values so that a run's full config can be
hashed and stored; :data:`SUITES` holds each suite's sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from celo2.eval.cartpole import CartPole
from celo2.eval.models import CNN, GPT, MLP, Autoencoder, Block, PolicyMLP, ViT
from celo2.eval.problems import LanguageModel, Problem, SupervisedImages
from celo2.eval.task_data import (
    IMAGE_DATASETS,
    ImageData,
    TaskDataError,
    batch_indices,
    load_image_data,
    load_text,
    resolve_root,
)


# -- registry ----------------------------------------------------------------------


@dataclass(frozen=True)
class TaskInfo:
    name: str
    description: str
    metric: str
    build: Callable[[dict, int, "str | Path | None"], Problem]
    uses_images: bool = False


def _build_mlp(cfg: dict, seed: int, data_dir) -> Problem:
    data = load_image_data(cfg["dataset"], data_dir)
    torch.manual_seed(seed)
    model = MLP([784, *cfg["hidden"], 10])
    return SupervisedImages(model, data, cfg, seed, "ce")


def _build_cnn(cfg: dict, seed: int, data_dir) -> Problem:
    data = load_image_data(cfg["dataset"], data_dir)
    torch.manual_seed(seed)
    model = CNN(cfg["channels"][0], cfg["channels"][1], cfg["hidden"])
    return SupervisedImages(model, data, cfg, seed, "ce")


def _build_vit(cfg: dict, seed: int, data_dir) -> Problem:
    data = load_image_data(cfg["dataset"], data_dir)
    torch.manual_seed(seed)
    model = ViT(cfg["patch"], cfg["dim"], cfg["layers"], cfg["heads"])
    return SupervisedImages(model, data, cfg, seed, "ce")


def _build_autoencoder(cfg: dict, seed: int, data_dir) -> Problem:
    data = load_image_data(cfg["dataset"], data_dir)
    torch.manual_seed(seed)
    model = Autoencoder(cfg["hidden"], cfg["bottleneck"])
    return SupervisedImages(model, data, cfg, seed, "mse")


def _build_gpt(cfg: dict, seed: int, data_dir) -> Problem:
    torch.manual_seed(seed)
    model = GPT(256, cfg["context"], cfg["dim"], cfg["layers"], cfg["heads"])
    return LanguageModel(model, cfg, seed)


def _build_rl(cfg: dict, seed: int, data_dir) -> Problem:
    torch.manual_seed(seed)
    return CartPole(PolicyMLP(cfg["hidden"]), cfg, seed)


TASKS: dict[str, TaskInfo] = {
    t.name: t
    for t in [
        TaskInfo("mlp", "MLP (ReLU hidden layers) classifying 28x28 images", "val cross-entropy (nats)",
                 _build_mlp, True),
        TaskInfo("cnn", "CNN: two 3x3 conv+pool blocks (4-D kernels), a dense layer, a linear head", "val cross-entropy (nats)",
                 _build_cnn, True),
        TaskInfo("gpt", "byte-level GPT (causal transformer LM) on the offline text corpus", "val cross-entropy (nats/byte)",
                 _build_gpt),
        TaskInfo("vit", "vision transformer on 7x7 patches of 28x28 images", "val cross-entropy (nats)",
                 _build_vit, True),
        TaskInfo("autoencoder", "MLP autoencoder 784-hidden-bottleneck-hidden-784, sigmoid output, MSE loss", "val MSE per pixel",
                 _build_autoencoder, True),
        TaskInfo("rl", "REINFORCE policy MLP on CartPole (simulated in torch)", "1 - mean greedy episode length / horizon",
                 _build_rl),
    ]
}

#: Per-suite task configs. ``quick`` keeps every run to a few seconds on one
#: core; ``full`` trains longer on more data; ``smoke`` only checks plumbing.
SUITES: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "mlp": {"dataset": "fashion-mnist", "hidden": [128, 128], "batch_size": 128, "steps": 1000, "val_size": 10000},
        "cnn": {"dataset": "fashion-mnist", "channels": [16, 32], "hidden": 64, "batch_size": 64, "steps": 500, "val_size": 5000},
        "gpt": {"context": 64, "dim": 64, "layers": 2, "heads": 4, "batch_size": 32, "steps": 600, "val_windows": 256},
        "vit": {"dataset": "fashion-mnist", "patch": 7, "dim": 64, "layers": 2, "heads": 4, "batch_size": 64, "steps": 500, "val_size": 5000},
        "autoencoder": {"dataset": "fashion-mnist", "hidden": 128, "bottleneck": 32, "batch_size": 128, "steps": 800, "val_size": 10000},
        "rl": {"hidden": 32, "horizon": 500, "gamma": 0.99, "batch_size": 8, "steps": 60, "val_episodes": 16},
    },
    "quick": {
        "mlp": {"dataset": "fashion-mnist", "hidden": [128, 128], "batch_size": 128, "steps": 200, "val_size": 2000},
        "cnn": {"dataset": "fashion-mnist", "channels": [16, 32], "hidden": 64, "batch_size": 64, "steps": 150, "val_size": 1000},
        "gpt": {"context": 64, "dim": 64, "layers": 2, "heads": 4, "batch_size": 32, "steps": 120, "val_windows": 64},
        "vit": {"dataset": "fashion-mnist", "patch": 7, "dim": 64, "layers": 2, "heads": 4, "batch_size": 64, "steps": 150, "val_size": 1000},
        "autoencoder": {"dataset": "fashion-mnist", "hidden": 128, "bottleneck": 32, "batch_size": 128, "steps": 200, "val_size": 2000},
        "rl": {"hidden": 32, "horizon": 500, "gamma": 0.99, "batch_size": 8, "steps": 60, "val_episodes": 16},
    },
    "smoke": {
        "mlp": {"dataset": "fashion-mnist", "hidden": [32, 32], "batch_size": 32, "steps": 12, "val_size": 256},
        "cnn": {"dataset": "fashion-mnist", "channels": [4, 8], "hidden": 16, "batch_size": 16, "steps": 8, "val_size": 128},
        "gpt": {"context": 16, "dim": 16, "layers": 1, "heads": 2, "batch_size": 8, "steps": 8, "val_windows": 8},
        "vit": {"dataset": "fashion-mnist", "patch": 7, "dim": 16, "layers": 1, "heads": 2, "batch_size": 16, "steps": 8, "val_size": 128},
        "autoencoder": {"dataset": "fashion-mnist", "hidden": 32, "bottleneck": 8, "batch_size": 32, "steps": 12, "val_size": 256},
        "rl": {"hidden": 8, "horizon": 30, "gamma": 0.99, "batch_size": 4, "steps": 4, "val_episodes": 4},
    },
}


def build_problem(task: str, cfg: dict, seed: int, data_dir: "str | Path | None" = None) -> Problem:
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task].build(cfg, seed, data_dir)


__all__ = [
    "IMAGE_DATASETS", "SUITES", "TASKS", "Autoencoder", "Block", "CNN", "CartPole", "GPT", "ImageData",
    "LanguageModel", "MLP", "PolicyMLP", "Problem", "SupervisedImages", "TaskDataError", "TaskInfo", "ViT",
    "batch_indices", "build_problem", "load_image_data", "load_text", "resolve_root",
]
