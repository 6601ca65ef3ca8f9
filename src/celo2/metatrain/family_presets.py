"""Meta-training presets for the task families beyond the image MLP (merged into the config's presets).

Each entry is a set of :class:`~celo2.metatrain.config.MetaTrainConfig` overrides, like the
entries of :data:`celo2.metatrain.config.PRESETS`. One run trains one model, so each preset
holds families of one model. Costs on 2 cores are in ``benchmarks/results/task-families/``.
"""

from __future__ import annotations

import math
from typing import Any

BYTE_META_LOSS_CLIP = 1.5 * math.log(256.0)
"""The meta-loss clip for next-byte prediction: 1.5 times the loss of a uniform guess over 256 bytes,
as the default ``1.5 ln 10`` is for 10 classes (a byte model starts at ``ln 256 = 5.5``, above
``1.5 ln 10 = 3.5``, where every loss would be clipped and PES would see no signal)."""

FAMILY_PRESETS: dict[str, dict[str, Any]] = {
    # The tiny causal byte transformer on the standard library's docstrings, one family:
    # 1 x 4 x 2 x 50 = 400 inner steps per iteration. Batches of 8 windows of 32 bytes keep an
    # inner step near 3-4 ms of one core; 2,000 iterations take about an hour on 2 busy cores.
    "cpu-text": {
        "tasks": ("text-docstrings",),
        "batch_size": 8,
        "pairs_per_task": 4,
        "meta_loss_clip": BYTE_META_LOSS_CLIP,
        "iterations": 2_000,
        "outer_lr": 3e-4,
        "checkpoint_every": 250,
    },
    # The small conv net on images the bench never evaluates: 3 x 4 x 2 x 50 = 1,200 inner steps
    # per iteration. The photo families need scikit-image (pip install 'celo2[photos]').
    "cpu-conv": {
        "tasks": ("conv-synthetic", "conv-photo-patches", "conv-photo-faces"),
        "pairs_per_task": 4,
        "iterations": 5_000,
        "outer_lr": 3e-4,
        "checkpoint_every": 500,
    },
}

__all__ = ["BYTE_META_LOSS_CLIP", "FAMILY_PRESETS"]
