"""The Celo2 update rule, independent of any framework: its constants and its theta."""

from celo2.rule import spec
from celo2.rule.theta import (
    Theta,
    ThetaError,
    ThetaNotFoundError,
    default_theta_path,
    load_theta,
    save_theta,
)

__all__ = [
    "spec",
    "Theta",
    "ThetaError",
    "ThetaNotFoundError",
    "default_theta_path",
    "load_theta",
    "save_theta",
]
