"""CartPole for the bench's reinforcement-learning task: the classic dynamics in batched torch, no gym."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from celo2.eval.problems import Problem


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
