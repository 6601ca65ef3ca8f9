"""Celo2 in Hugging Face Transformers' ``Trainer``: ``optimizers=(Celo2(...), scheduler)``.

    pip install transformers accelerate
    python examples/hf_trainer.py            # a tiny GPT-2 from scratch on generated tokens, 200 steps
    python examples/hf_trainer.py --tiny     # a few steps (what the test suite runs)

Nothing is downloaded: the model is built from a config and the data are generated.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, get_cosine_schedule_with_warmup

from celo2.torch import Celo2


class CountingTokens(torch.utils.data.Dataset):
    """Sequences that count up from a random start modulo the vocabulary: a learnable stand-in."""

    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, vocab, (n, 1), generator=g)
        self.ids = (starts + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="run a few steps only")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    steps = 4 if args.tiny else args.steps

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    # named_parameters(): "wte", "wpe" and "lm_head" are routed to AdamW by name.
    optimizer = Celo2(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=max(1, steps // 20),
                                                num_training_steps=steps)
    print(optimizer.routing_table())

    with tempfile.TemporaryDirectory() as out:
        training_args = TrainingArguments(
            output_dir=out, max_steps=steps, per_device_train_batch_size=16, logging_steps=max(1, steps // 10),
            save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=training_args, train_dataset=CountingTokens(512, 32, 64),
                          optimizers=(optimizer, scheduler))
        result = trainer.train()
    print(f"final training loss {result.training_loss:.4f}")
    return result.training_loss


if __name__ == "__main__":
    main()
