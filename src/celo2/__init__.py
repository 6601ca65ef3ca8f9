"""celo2: the Celo2 learned optimizer for PyTorch and JAX/optax.

``celo2.torch`` and ``celo2.optax`` hold the two front ends (imported on
demand, so neither framework is needed to load or convert a theta);
``celo2.load_theta`` / ``celo2.save_theta`` handle the meta-parameters.
"""

from celo2.rule.theta import Theta, ThetaError
from celo2.theta_files import ThetaNotFoundError, default_theta_path, load_theta, save_theta

__version__ = "0.1.0"

__all__ = [
    "Theta", "ThetaError", "ThetaNotFoundError", "default_theta_path", "load_theta", "save_theta", "__version__",
]
