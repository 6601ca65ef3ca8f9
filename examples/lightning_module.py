"""Celo2 in PyTorch Lightning: return it from ``configure_optimizers``.

    pip install lightning
    python examples/lightning_module.py            # 200 steps on generated data
    python examples/lightning_module.py --tiny     # a few steps (what the test suite runs)
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from torch import nn

from celo2.torch import Celo2


class Classifier(L.LightningModule):
    def __init__(self, total_steps: int) -> None:
        super().__init__()
        self.total_steps = total_steps
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU())
        self.head = nn.Linear(64, 4)  # "head": routed to AdamW by name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = Celo2(self.named_parameters(), lr=1e-3, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="run a few steps only")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    steps = 4 if args.tiny else args.steps

    torch.manual_seed(0)
    x = torch.randn(2048, 32)
    y = (x @ torch.randn(32, 4)).argmax(dim=1)  # a learnable stand-in for a real dataset
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)

    model = Classifier(total_steps=steps)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    loss = float(trainer.callback_metrics["train_loss"])
    print(f"final training loss {loss:.4f}")
    return loss


if __name__ == "__main__":
    main()
