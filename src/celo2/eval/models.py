"""The bench's models: MLP, CNN, byte-level GPT, ViT, autoencoder and the CartPole policy.

Output layers are named ``head`` and the GPT's embeddings ``tok_embed`` / ``pos_embed``, names that
:data:`celo2.rule.routing.ADAM_NAME_PATTERN` sends to AdamW.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


class PolicyMLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, hidden), nn.Linear(hidden, hidden)])
        self.head = nn.Linear(hidden, 2)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            s = torch.tanh(layer(s))
        return self.head(s)
