"""The one description of the Celo2 update rule that both front ends follow.

Everything that defines *what* the rule computes lives here: the feature
groups and their order, the accumulator decays, every epsilon and clip, the
MLP shape and the Newton-Schulz constants. ``celo2.torch`` and ``celo2.optax``
implement the arithmetic in their own idioms but read every number from this
module, so the two cannot drift apart. Values follow the published
implementation (arXiv 2602.19142) and are pinned by the reference steps in
``shared/reference``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

# --- accumulators -----------------------------------------------------------
MOMENTUM_DECAYS: tuple[float, ...] = (0.9, 0.99, 0.999)
"""Decays of the three momenta ``m_k = b m_k + (1 - b) g``."""
RMS_DECAY: float = 0.95
"""Decay of the per-element second moment ``v = b v + (1 - b) g^2``."""
FACTORED_DECAYS: tuple[float, ...] = (0.9, 0.99, 0.999)
"""Decays of the Adafactor-style row/column second moments."""
FACTORED_EPS: float = 1e-30
"""Added to ``g^2`` before it enters the factored accumulators."""
SAFE_RSQRT_FLOOR: float = 1e-9
"""``safe_rsqrt(x) = rsqrt(max(x, floor))`` in the Adafactor factors."""
ROW_MEAN_EPS: float = 1e-9
"""Added to the mean of the row statistic before normalising by it."""
VECTOR_FACTOR_EPS: float = 1e-9
"""Unfactored (vector) tensors: the Adafactor-normalised g is ``g * safe_rsqrt(v_full + eps)``."""

# --- features ---------------------------------------------------------------
GRAD_CLIP: float = 1000.0
"""Gradients are clipped to ``[-GRAD_CLIP, GRAD_CLIP]`` before anything else."""
FEATURE_CLIP: float = 0.1
"""The ``clip(g)`` feature clips to ``[-FEATURE_CLIP, FEATURE_CLIP]``."""
RSQRT_EPS: float = 1e-8
"""Epsilon inside every ``rsqrt(x + eps)`` feature (second moment, row, column)."""
INPUT_NORM_EPS: float = 1e-9
"""Each input channel becomes ``x / sqrt(mean(x^2) + eps)`` over the last two axes."""
OUTPUT_NORM_EPS: float = 1e-9
"""The final direction is normalised to unit RMS with this epsilon."""


@dataclass(frozen=True)
class FeatureGroup:
    """One slice of the MLP's first layer: ``w0__<index>`` reads ``width`` channels."""

    index: int
    name: str
    width: int
    description: str


FEATURE_GROUPS: tuple[FeatureGroup, ...] = (
    FeatureGroup(0, "g", 1, "gradient"),
    FeatureGroup(1, "clip_g", 1, "gradient clipped to +-0.1"),
    FeatureGroup(2, "p", 1, "parameter value"),
    FeatureGroup(3, "m", 3, "momenta (decays 0.9, 0.99, 0.999)"),
    FeatureGroup(4, "v", 1, "second moment (decay 0.95)"),
    FeatureGroup(5, "m_rsqrt_v", 3, "momenta * rsqrt(v + 1e-8)"),
    FeatureGroup(6, "rsqrt_v", 1, "rsqrt(v + 1e-8)"),
    FeatureGroup(7, "fac_g", 3, "Adafactor-normalised gradient"),
    FeatureGroup(8, "g_rsqrt_v", 1, "g * rsqrt(v + 1e-8)"),
    FeatureGroup(9, "row", 3, "factored second moment, row statistic"),
    FeatureGroup(10, "col", 3, "factored second moment, column statistic"),
    FeatureGroup(11, "rsqrt_row", 3, "rsqrt(row statistic + 1e-8)"),
    FeatureGroup(12, "rsqrt_col", 3, "rsqrt(column statistic + 1e-8)"),
    FeatureGroup(13, "fac_m", 3, "momenta * Adafactor row and column factors"),
)
NUM_FEATURES: int = sum(g.width for g in FEATURE_GROUPS)  # 30
VECTOR_GROUPS: int = 9
"""Tensors of fewer than two dimensions use only the first nine groups."""
NUM_VECTOR_FEATURES: int = sum(g.width for g in FEATURE_GROUPS[:VECTOR_GROUPS])  # 15

# --- the MLP ------------------------------------------------------------------
HIDDEN_SIZE: int = 8
HIDDEN_LAYERS: int = 2
NUM_OUTPUTS: int = 3
"""The MLP has three outputs; only output 0 (the direction) is used."""
DIRECTION_OUTPUT: int = 0

# --- orthogonalisation --------------------------------------------------------
NS_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
NS_STEPS: int = 5
NS_EPS: float = 1e-8

# --- harness defaults -----------------------------------------------------------
ADAM_BETAS: tuple[float, float] = (0.9, 0.95)
ADAM_EPS: float = 1e-8
ADAM_LR_MULT: float = 20.0


def factored_dims(shape: Sequence[int]) -> tuple[int, int] | None:
    """The ``(d1, d0)`` axes the factored statistics reduce over, or ``None``.

    ``d0`` is the largest dimension and ``d1`` the second largest; on ties the
    later axis counts as larger (a stable sort of the sizes). The "row"
    statistic is the mean of ``g^2`` over ``d0`` and the "column" statistic the
    mean over ``d1``. Tensors of fewer than two dimensions are not factored.
    """
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    return order[-2], order[-1]


def theta_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of every array of a theta, in the published layout ``(in, out)``."""
    shapes: dict[str, tuple[int, ...]] = {}
    for group in FEATURE_GROUPS:
        shapes[f"w0__{group.index}"] = (group.width, HIDDEN_SIZE)
    shapes["b0"] = (HIDDEN_SIZE,)
    shapes["w1"] = (HIDDEN_SIZE, HIDDEN_SIZE)
    shapes["b1"] = (HIDDEN_SIZE,)
    shapes["w2"] = (HIDDEN_SIZE, NUM_OUTPUTS)
    shapes["b2"] = (NUM_OUTPUTS,)
    return shapes


THETA_KEYS: tuple[str, ...] = tuple(theta_shapes())
NUM_THETA_PARAMS: int = sum(math.prod(s) for s in theta_shapes().values())  # 347

# --- non-finite gradients ---------------------------------------------------------
NONFINITE_POLICIES: tuple[str, ...] = ("skip", "propagate")
"""Values of the optimizers' ``nonfinite`` option (the first is the default).

``"skip"``: a tensor whose gradient holds any NaN or +-inf element keeps its
parameter and all of its optimizer state bitwise unchanged for that step (no
weight decay either), and its counter of skipped steps goes up by one; every
other tensor steps exactly as it would without the check. The AdamW branch of
Celo2 follows the same rule. The decision is per tensor and per step, taken
where the gradient lives (on an accelerator as a device-side flag that gates
the writes, never a host synchronisation).

``"propagate"``: no check; a non-finite gradient flows through the arithmetic
as in AdamW (the rule's per-tensor normalisations then spread it over the
whole tensor and into its accumulators), and the counters stay 0.
"""
NONFINITE_DEFAULT: str = NONFINITE_POLICIES[0]


def check_nonfinite_policy(value: str) -> str:
    """``value`` if it names a policy of :data:`NONFINITE_POLICIES`.

    Args:
        value: The ``nonfinite`` option as given by the user.

    Returns:
        The value unchanged.

    Raises:
        ValueError: If it is not one of :data:`NONFINITE_POLICIES`.
    """
    if value not in NONFINITE_POLICIES:
        raise ValueError(f"invalid nonfinite={value!r}: expected one of {NONFINITE_POLICIES}")
    return value
