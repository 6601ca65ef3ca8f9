"""Task registry of the bench: small PyTorch training problems far from the 8x8 meta-training MLPs.

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

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGE_DATASETS = ("fashion-mnist", "mnist")


class TaskDataError(RuntimeError):
    """A task's data could not be loaded (the message says which and where)."""


# -- data ------------------------------------------------------------------------


@dataclass
class ImageData:
    train_x: torch.Tensor  # (N, 28, 28) float32 in [0, 1]
    train_y: torch.Tensor  # (N,) int64
    val_x: torch.Tensor
    val_y: torch.Tensor
    source: str


_IMAGE_CACHE: dict[tuple[str, str | None], ImageData] = {}
_TEXT_CACHE: dict[str, tuple[np.ndarray, np.ndarray, str]] = {}


def _upsample28(images: np.ndarray) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(images, np.float32))[:, None]
    return F.interpolate(t, size=(28, 28), mode="bilinear", align_corners=False)[:, 0].clamp_(0, 1).numpy()


def resolve_root(data_dir: "str | Path | None") -> "str | None":
    """The data folder actually used: ``data_dir``, else ``$CELO2_DATA_DIR``, else None."""
    from celo2.data import resolve_data_root

    root = resolve_data_root(data_dir)
    return None if root is None else str(Path(root).resolve())


def load_image_data(dataset: str, data_dir: "str | Path | None") -> ImageData:
    """28x28 train/validation images of ``dataset``, cached per process.

    With no data folder at all the task falls back to the built-in digits
    (upsampled); with a folder that lacks the dataset it is an error, so a
    typo in ``--data-dir`` never silently benchmarks on other data.
    """
    if dataset not in IMAGE_DATASETS:
        raise TaskDataError(f"unknown image dataset {dataset!r}; choose one of {', '.join(IMAGE_DATASETS)}")
    key = (dataset, None if data_dir is None else str(data_dir))
    if key in _IMAGE_CACHE:
        return _IMAGE_CACHE[key]
    from celo2.data import load_images

    root = resolve_root(data_dir)
    try:
        tx, ty = load_images(dataset, split="train", root=root)
        vx, vy = load_images(dataset, split="test", root=root)
        source = f"{dataset} 28x28 ({len(ty)} train / {len(vy)} test images) from {root}"
    except FileNotFoundError as exc:
        if root is not None:
            raise TaskDataError(f"data folder {root}: no {dataset} there ({exc})") from exc
        tx, ty = load_images("digits", split="train")
        vx, vy = load_images("digits", split="test")
        tx, vx = _upsample28(tx), _upsample28(vx)
        source = (
            f"BUILT-IN FALLBACK: no data folder given (--data-dir or $CELO2_DATA_DIR), so instead of "
            f"{dataset}: scikit-learn digits (8x8) upsampled bilinearly to 28x28 "
            f"({len(ty)} train / {len(vy)} test)"
        )
    if tuple(tx.shape[1:]) != (28, 28):
        raise TaskDataError(f"{dataset}: expected 28x28 images, got {tuple(tx.shape[1:])}")
    data = ImageData(
        torch.from_numpy(np.ascontiguousarray(tx, np.float32)),
        torch.from_numpy(np.asarray(ty, np.int64)),
        torch.from_numpy(np.ascontiguousarray(vx, np.float32)),
        torch.from_numpy(np.asarray(vy, np.int64)),
        source,
    )
    _IMAGE_CACHE[key] = data
    return data


def load_text() -> tuple[np.ndarray, np.ndarray, str]:
    """The project's offline byte-level corpus (train, val, description)."""
    if "text" not in _TEXT_CACHE:
        from celo2.data import load_text_corpus

        train, val = load_text_corpus()
        train = np.asarray(train, np.uint8)
        val = np.asarray(val, np.uint8)
        desc = f"celo2.data.load_text_corpus(): byte-level, {len(train):,} train / {len(val):,} val bytes"
        _TEXT_CACHE["text"] = (train, val, desc)
    return _TEXT_CACHE["text"]


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` example indices: epochs of seeded permutations, fixed by ``seed``."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xDA7A]))
    need = steps * batch_size
    chunks, have = [], 0
    while have < need:
        chunks.append(rng.permutation(n))
        have += n
    return np.concatenate(chunks)[:need].reshape(steps, batch_size)


# -- problems ------------------------------------------------------------------


class Problem:
    """One training problem instance: model, per-step loss, validation loss."""

    model: nn.Module
    data_source: str = ""

    def train_loss(self, step: int) -> tuple[torch.Tensor, float]:
        """``(loss to backpropagate, value to record)`` for training step ``step``."""
        raise NotImplementedError

    @torch.no_grad()
    def val_loss(self) -> float:
        raise NotImplementedError


class SupervisedImages(Problem):
    """Classification (or reconstruction) on 28x28 images with a fixed data order."""

    def __init__(self, model: nn.Module, data: ImageData, cfg: dict, seed: int, loss: str):
        self.model = model
        self.data = data
        self.loss_kind = loss
        self.idx = torch.from_numpy(batch_indices(len(data.train_y), cfg["batch_size"], cfg["steps"], seed))
        n_val = min(int(cfg["val_size"]), len(data.val_y))
        self.vx, self.vy = data.val_x[:n_val], data.val_y[:n_val]
        self.data_source = data.source

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "ce":
            return F.cross_entropy(self.model(x), y)
        return F.mse_loss(torch.sigmoid(self.model(x)), x.reshape(len(x), -1))

    def train_loss(self, step: int) -> tuple[torch.Tensor, float]:
        i = self.idx[step]
        loss = self._loss(self.data.train_x[i], self.data.train_y[i])
        return loss, float(loss.detach())

    @torch.no_grad()
    def val_loss(self) -> float:
        self.model.eval()
        total, n = 0.0, 0
        for s in range(0, len(self.vy), 1000):
            x, y = self.vx[s : s + 1000], self.vy[s : s + 1000]
            total += float(self._loss(x, y)) * len(y)
            n += len(y)
        self.model.train()
        return total / n


class LanguageModel(Problem):
    """Next-byte prediction on the offline corpus; random windows fixed by the seed."""

    def __init__(self, model: nn.Module, cfg: dict, seed: int):
        train, val, desc = load_text()
        self.model = model
        self.ctx = int(cfg["context"])
        if len(train) <= self.ctx + 1 or len(val) <= self.ctx + 1:
            raise TaskDataError(f"text corpus too short for context {self.ctx}")
        self.train = torch.from_numpy(train.astype(np.int64))
        rng = np.random.default_rng(np.random.SeedSequence([seed, 0x7E47]))
        self.starts = torch.from_numpy(
            rng.integers(0, len(train) - self.ctx - 1, size=(cfg["steps"], cfg["batch_size"]))
        )
        # Validation: fixed, evenly spaced windows (independent of the seed).
        n_val = int(cfg["val_windows"])
        vstarts = np.linspace(0, len(val) - self.ctx - 1, n_val).astype(np.int64)
        v = torch.from_numpy(val.astype(np.int64))
        win = torch.from_numpy(vstarts)[:, None] + torch.arange(self.ctx + 1)
        self.val_windows = v[win]
        self.data_source = desc

    def _loss(self, windows: torch.Tensor) -> torch.Tensor:
        logits = self.model(windows[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))

    def train_loss(self, step: int) -> tuple[torch.Tensor, float]:
        win = self.starts[step][:, None] + torch.arange(self.ctx + 1)
        loss = self._loss(self.train[win])
        return loss, float(loss.detach())

    @torch.no_grad()
    def val_loss(self) -> float:
        self.model.eval()
        total = 0.0
        for s in range(0, len(self.val_windows), 64):
            w = self.val_windows[s : s + 64]
            total += float(self._loss(w)) * len(w)
        self.model.train()
        return total / len(self.val_windows)


# -- models ----------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, sizes: list[int]):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-2], sizes[1:-1]))
        self.head = nn.Linear(sizes[-2], sizes[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.head(x)


class CNN(nn.Module):
    """Two 3x3 conv blocks (4-D kernels), one hidden dense layer, a linear head."""

    def __init__(self, c1: int, c2: int, hidden: int, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 7 * 7, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x[:, None])), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(F.relu(self.fc(x.flatten(1))))


class Block(nn.Module):
    """Pre-norm transformer block (causal or not)."""

    def __init__(self, dim: int, heads: int, causal: bool):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Byte-level GPT: token and position embeddings, causal blocks, untied head."""

    def __init__(self, vocab: int, context: int, dim: int, layers: int, heads: int):
        super().__init__()
        self.tok_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(torch.randn(context, dim) * 0.02)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, causal=True) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok_embed(idx) + self.pos_embed[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


class ViT(nn.Module):
    """Vision transformer on 7x7 patches of 28x28 images; mean-pooled tokens, linear head.

    The patch projection is a plain matrix (``patch_proj``) and goes to the
    structured optimizers; the position embedding goes to AdamW.
    """

    def __init__(self, patch: int, dim: int, layers: int, heads: int, classes: int = 10):
        super().__init__()
        self.patch = patch
        n = (28 // patch) ** 2
        self.patch_proj = nn.Linear(patch * patch, dim)
        self.pos_embed = nn.Parameter(torch.randn(n, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, causal=False) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.patch
        b = len(x)
        x = x.reshape(b, 28 // p, p, 28 // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        x = self.patch_proj(x) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x).mean(1))


class Autoencoder(nn.Module):
    """784 -> ... -> bottleneck -> ... -> 784 MLP; the output layer is the ``head``."""

    def __init__(self, hidden: int, bottleneck: int):
        super().__init__()
        self.layers = nn.ModuleList(
            [nn.Linear(784, hidden), nn.Linear(hidden, bottleneck), nn.Linear(bottleneck, hidden)]
        )
        self.head = nn.Linear(hidden, 784)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(len(x), -1)
        x = F.relu(self.layers[0](x))
        x = self.layers[1](x)  # linear bottleneck
        x = F.relu(self.layers[2](x))
        return self.head(x)


# -- reinforcement learning ----------------------------------------------------------


class CartPole(Problem):
    """REINFORCE on a batched CartPole (classic dynamics, written here in torch).

    Recorded loss (train and validation): ``1 - mean episode length / horizon``,
    in [0, 1], lower is better, so it sits in the same tables as the other
    tasks. Training episodes sample actions from a generator seeded by
    ``(seed, step)``; validation runs the greedy policy from fixed start states.
    """

    GRAVITY, M_CART, M_POLE, HALF_LEN, FORCE, TAU = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    X_LIMIT, ANGLE_LIMIT = 2.4, 12 * 2 * math.pi / 360

    def __init__(self, model: nn.Module, cfg: dict, seed: int):
        self.model = model
        self.horizon = int(cfg["horizon"])
        self.episodes = int(cfg["batch_size"])
        self.gamma = float(cfg["gamma"])
        self.seed = seed
        g = torch.Generator().manual_seed(123_457)
        self.val_starts = torch.rand(int(cfg["val_episodes"]), 4, generator=g) * 0.1 - 0.05
        self.data_source = "CartPole dynamics simulated in torch (no gym), horizon %d" % self.horizon

    def _step(self, s: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x, xd, th, thd = s.unbind(1)
        force = (a.to(s.dtype) * 2 - 1) * self.FORCE
        cos, sin = torch.cos(th), torch.sin(th)
        total = self.M_CART + self.M_POLE
        pml = self.M_POLE * self.HALF_LEN
        temp = (force + pml * thd**2 * sin) / total
        thacc = (self.GRAVITY * sin - cos * temp) / (self.HALF_LEN * (4.0 / 3.0 - self.M_POLE * cos**2 / total))
        xacc = temp - pml * thacc * cos / total
        return torch.stack(
            [x + self.TAU * xd, xd + self.TAU * xacc, th + self.TAU * thd, thd + self.TAU * thacc], 1
        )

    def _failed(self, s: torch.Tensor) -> torch.Tensor:
        return (s[:, 0].abs() > self.X_LIMIT) | (s[:, 2].abs() > self.ANGLE_LIMIT)

    def train_loss(self, step: int) -> tuple[torch.Tensor, float]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        s = torch.rand(self.episodes, 4, generator=g) * 0.1 - 0.05
        alive = torch.ones(self.episodes, dtype=torch.bool)
        logps, masks = [], []
        for _ in range(self.horizon):
            logits = self.model(s)
            logp_all = F.log_softmax(logits, -1)
            a = torch.multinomial(logp_all.detach().exp(), 1, generator=g)[:, 0]
            logps.append(logp_all.gather(1, a[:, None])[:, 0])
            masks.append(alive.clone())
            s = self._step(s, a)
            alive = alive & ~self._failed(s)
            if not alive.any():
                break
        mask = torch.stack(masks, 1).float()  # (E, T): 1 while the episode runs (reward 1 each)
        lengths = mask.sum(1)
        # Discounted returns-to-go of a reward of 1 per live step.
        rtg = torch.zeros_like(mask)
        running = torch.zeros(self.episodes)
        for t in range(mask.shape[1] - 1, -1, -1):
            running = mask[:, t] * (1.0 + self.gamma * running)
            rtg[:, t] = running
        adv = (rtg - rtg.mean(0, keepdim=True)) / (rtg.std(0, keepdim=True, unbiased=False) + 1e-6)
        loss = -(torch.stack(logps, 1) * adv * mask).sum() / mask.sum()
        return loss, 1.0 - float(lengths.mean()) / self.horizon

    @torch.no_grad()
    def val_loss(self) -> float:
        s = self.val_starts.clone()
        alive = torch.ones(len(s), dtype=torch.bool)
        lengths = torch.zeros(len(s))
        for _ in range(self.horizon):
            lengths += alive.float()
            s = self._step(s, self.model(s).argmax(-1))
            alive = alive & ~self._failed(s)
            if not alive.any():
                break
        return 1.0 - float(lengths.mean()) / self.horizon


class PolicyMLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, hidden), nn.Linear(hidden, hidden)])
        self.head = nn.Linear(hidden, 2)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            s = torch.tanh(layer(s))
        return self.head(s)


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
