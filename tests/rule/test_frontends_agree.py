"""The PyTorch and JAX front ends compute the same rule beyond the reference shapes."""

from __future__ import annotations

import numpy as np
import pytest

from frontends import JaxRule, TorchRule

SHAPES = [(), (7,), (1,), (24, 6), (6, 24), (12, 12), (3, 5, 6), (4, 3, 3, 3), (2, 3, 4, 5)]


@pytest.mark.parametrize("orthogonalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)) or "scalar")
def test_front_ends_agree_over_20_steps(published_theta, shape, orthogonalize):
    rng = np.random.default_rng(abs(hash((shape, orthogonalize))) % 2**32)
    jx, th = JaxRule(published_theta), TorchRule(published_theta)
    param = rng.standard_normal(shape).astype(np.float32) * 0.5
    sj, st = jx.init(param), th.init(param)
    worst = 0.0
    for t in range(20):
        # Gradients of varied scale, some entries clipped by the 1000 limit.
        grad = (rng.standard_normal(shape) * 10.0 ** rng.uniform(-4, 1)).astype(np.float32)
        if t == 5 and grad.size:
            grad.reshape(-1)[0] = 5000.0
        dj, sj = jx.step(sj, grad, param, orthogonalize)
        dt, st = th.step(st, grad, param, orthogonalize)
        assert dj.shape == dt.shape == param.shape
        assert np.all(np.isfinite(dj))
        err = float(np.max(np.abs(dj - dt)))
        worst = max(worst, err)
        assert err < 2e-4, f"step {t}: |jax - torch| = {err:.2e}"
        param = param - 0.01 * dj
    # The directions have unit RMS over the last two axes.
    axes = tuple(range(max(0, dj.ndim - 2), dj.ndim))
    if dj.ndim:
        np.testing.assert_allclose(np.sqrt(np.mean(dj**2, axis=axes)), 1.0, atol=1e-3)
