"""Training problems of the bench: a model, a training loss per step and a validation loss.

A problem's batch at step ``t`` depends only on ``(seed, t)``, so every optimizer and LR sees the
same data in the same order.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from celo2.eval.task_data import ImageData, TaskDataError, batch_indices, load_text


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
