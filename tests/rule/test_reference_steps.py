"""Both front ends reproduce the published implementation's reference steps."""

from __future__ import annotations

import numpy as np
import pytest

from frontends import FRONTENDS

TOLERANCE = 1e-4


@pytest.mark.parametrize("frontend", sorted(FRONTENDS))
@pytest.mark.parametrize("variant", ["orth", "base"])
def test_reference_steps(reference_dir, published_theta, frontend, variant):
    data = np.load(reference_dir / f"celo2_{variant}_shared.npz")
    assert bool(data["orthogonalize"]) == (variant == "orth")
    rule = FRONTENDS[frontend](published_theta)
    worst = 0.0
    shapes = [tuple(int(x) for x in s.strip("()").split(",") if x.strip()) for s in data["shapes"]]
    assert len(shapes) == 4
    for k, shape in enumerate(shapes):
        param = data[f"p{k}/param0"]
        assert param.shape == shape
        state = rule.init(param)
        for t in range(int(data["nsteps"])):
            step, state = rule.step(state, data[f"p{k}/grad{t}"], param, variant == "orth")
            expected = data[f"p{k}/step{t}"]
            assert step.shape == expected.shape
            err = float(np.max(np.abs(step - expected)))
            assert err <= TOLERANCE, f"p{k} {shape} step {t}: max |diff| {err:.2e}"
            worst = max(worst, err)
            param = param - 0.01 * expected
    print(f"\n[{frontend}/{variant}] largest deviation from the reference steps: {worst:.2e}")
