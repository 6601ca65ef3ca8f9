"""celo2.optax runs the published rule only: a variant theta is refused, never stepped with the wrong rule."""

from __future__ import annotations

import pytest

pytest.importorskip("jax")

from celo2.optax import celo2, celo2_base  # noqa: E402
from celo2.rule.theta import Theta  # noqa: E402
from celo2.rule.variant import RuleVariant, VariantNotSupportedError  # noqa: E402


@pytest.mark.parametrize("make", [celo2, celo2_base])
def test_a_variant_with_the_published_shapes_is_refused_by_name(make):
    variant = RuleVariant(rms_decay=0.999)  # same arrays as the published rule, another update
    theta = Theta.init(0, variant=variant)
    with pytest.raises(VariantNotSupportedError, match="rms_decay"):
        make(learning_rate=1e-3, theta=theta)
