"""The Celo2 update rule, independent of any framework: its constants and its weights.

Reading and writing theta files, the shipped theta and ``hf://`` downloads
live one layer up, in :mod:`celo2.theta_files`.
"""

from celo2.rule import spec
from celo2.rule.theta import Theta, ThetaError
from celo2.rule.variant import PUBLISHED, RuleVariant, VariantError

__all__ = [
    "spec",
    "Theta",
    "ThetaError",
    "RuleVariant",
    "PUBLISHED",
    "VariantError",
]
