"""Every rule variant's step, written out from the spec in NumPy (float64): the one formula both front
ends' variant tests (tests/optax/test_variants.py, tests/torch/test_variants.py) and meta-training's
inner step (tests/metatrain/test_variant_rule.py) are checked against.

It is deliberately independent of the code under test: constants are typed in, not imported from
:mod:`celo2.rule.spec`.
"""

from __future__ import annotations

import numpy as np

from celo2 import Theta
from celo2.rule.variant import PUBLISHED, RuleVariant

SMALL = RuleVariant(hidden_width=4, hidden_layers=3, rms_decay=0.999, feature_groups=("m", "g", "row", "fac_m"),
                    output_norm="none", outputs="direction+magnitude")
VARIANTS = [
    PUBLISHED,
    RuleVariant(hidden_width=4),
    RuleVariant(hidden_width=16),
    RuleVariant(hidden_layers=1),
    RuleVariant(hidden_layers=3),
    RuleVariant(rms_decay=0.999),
    RuleVariant(momentum_decays=(0.5, 0.9, 0.95), factored_decays=(0.8, 0.9, 0.99)),
    RuleVariant(feature_groups=("g", "m", "v", "col", "fac_m")),
    RuleVariant(output_norm="none"),
    RuleVariant(outputs="direction+magnitude"),
    SMALL,
]
"""The variants the tests run: the paper's ablations (widths 4 and 16, second-moment decay 0.999, no
output normalisation, direction plus magnitude), feature groups left out, other depths and decays,
and all of it at once."""


def ns(x):
    """Newton-Schulz, five steps of the quintic (the spec's coefficients)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.sqrt(np.sum(x * x)) + 1e-8)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def rsqrt(x):
    return 1.0 / np.sqrt(x)


def formula_step(variant, theta, state, grad, param, orthogonalize):
    """One step of ``variant`` on a vector or a matrix: ``(direction, new state)``.

    Args:
        variant: The rule variant.
        theta: Its arrays (float64), keyed like ``variant.theta_shapes()``.
        state: dict ``m`` (3, *S), ``v`` S, ``r`` (the row statistic, or a vector's full second
            moment), ``c`` (the column statistic).
        grad: The gradient.
        param: The parameter.
        orthogonalize: Newton-Schulz on a matrix's direction.

    Returns:
        The direction (before ``-lr``) and the new state.
    """
    g = np.clip(grad, -1000.0, 1000.0)
    bm = np.asarray(variant.momentum_decays).reshape((3,) + (1,) * g.ndim)
    bf = np.asarray(variant.factored_decays)
    m = bm * state["m"] + (1 - bm) * g
    v = variant.rms_decay * state["v"] + (1 - variant.rms_decay) * g * g
    gsq = g * g + 1e-30
    feats = {"g": g[None], "clip_g": np.clip(g, -0.1, 0.1)[None], "p": param[None], "m": m, "v": v[None],
             "m_rsqrt_v": m * rsqrt(v + 1e-8), "rsqrt_v": rsqrt(v + 1e-8)[None],
             "g_rsqrt_v": (g * rsqrt(v + 1e-8))[None]}
    if g.ndim == 1:
        r = bf[:, None] * state["r"] + (1 - bf[:, None]) * gsq
        c = state["c"]
        feats["fac_g"] = g * rsqrt(np.maximum(r + 1e-9, 1e-9))
        groups = variant.vector_groups
        axes = (1,)
    else:
        rows, cols = g.shape
        d0, d1 = (0, 1) if rows > cols else (1, 0)  # d0: the larger axis (the later one on a tie)
        r = bf[:, None] * state["r"] + (1 - bf[:, None]) * gsq.mean(axis=d0)
        c = bf[:, None] * state["c"] + (1 - bf[:, None]) * gsq.mean(axis=d1)
        row = np.expand_dims(r, 1 + d0)  # varies along d1
        col = np.expand_dims(c, 1 + d1)
        row_factor = rsqrt(np.maximum(row / (r.mean(axis=1, keepdims=True)[..., None] + 1e-9), 1e-9))
        col_factor = rsqrt(np.maximum(col, 1e-9))
        full = (3,) + g.shape
        feats.update({"fac_g": g * row_factor * col_factor,
                      "row": np.broadcast_to(row, full), "col": np.broadcast_to(col, full),
                      "rsqrt_row": np.broadcast_to(rsqrt(row + 1e-8), full),
                      "rsqrt_col": np.broadcast_to(rsqrt(col + 1e-8), full),
                      "fac_m": m * row_factor * col_factor})
        groups = variant.groups
        axes = (1, 2)
    hidden = theta["b0"]
    for group in groups:
        x = feats[group.name]
        x = x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + 1e-9)
        hidden = hidden + np.einsum("c...,ch->...h", x, theta[f"w0__{group.index}"])
    hidden = np.maximum(hidden, 0)
    for k in range(1, variant.hidden_layers):
        hidden = np.maximum(hidden @ theta[f"w{k}"] + theta[f"b{k}"], 0)
    out = hidden @ theta[f"w{variant.hidden_layers}"] + theta[f"b{variant.hidden_layers}"]
    d = out[..., 0]
    if orthogonalize and d.ndim == 2:
        d = ns(d)
    if variant.output_norm == "rms":
        d = d / np.sqrt(np.mean(d * d) + 1e-9)
    if variant.outputs == "direction+magnitude":
        d = d * np.exp(1e-3 * out[..., 1])
    return d, {"m": m, "v": v, "r": r, "c": c}


def zero_state(shape):
    """The formula's state of zeros for a vector or matrix of ``shape``."""
    if len(shape) == 1:
        return {"m": np.zeros((3, *shape)), "v": np.zeros(shape), "r": np.zeros((3, *shape)), "c": np.zeros((3, 0))}
    rows, cols = shape
    d0, d1 = (0, 1) if rows > cols else (1, 0)
    return {"m": np.zeros((3, *shape)), "v": np.zeros(shape),
            "r": np.zeros((3, shape[d1])), "c": np.zeros((3, shape[d0]))}


def theta_of(variant, seed=0):
    """A theta of ``variant`` whose biases are far from zero and whose magnitude output is large
    (``exp(0.4)``: visible), as a :class:`celo2.Theta` (float32 arrays: what the front ends get)."""
    theta = Theta.init(seed, variant)
    arrays = dict(theta.arrays)
    rng = np.random.default_rng(seed + 1)
    for key in arrays:
        if key.startswith("b"):
            arrays[key] = (rng.normal(size=arrays[key].shape) * 0.3).astype(np.float32)
    arrays[f"b{variant.hidden_layers}"][1] = 400.0
    return Theta(arrays, variant=variant)


def float64_arrays(theta):
    """``theta``'s arrays in float64, for :func:`formula_step`."""
    return {k: np.asarray(v, np.float64) for k, v in theta.arrays.items()}
