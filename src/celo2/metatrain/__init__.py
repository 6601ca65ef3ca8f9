"""Meta-training the Celo2 theta with Persistent Evolution Strategies (spec section 3), in JAX.

Python API::

    from celo2.metatrain import preset, meta_train
    result = meta_train(preset("smoke"), "runs/smoke")      # or preset("cpu"), preset("paper")
    result.theta                                             # a celo2.Theta

Pieces: :mod:`~celo2.metatrain.config` (settings, presets),
:mod:`~celo2.metatrain.tasks` (task families and the image-MLP task),
:mod:`~celo2.metatrain.pes` (the vectorised PES engine),
:mod:`~celo2.metatrain.trainer` (the loop; with :mod:`~celo2.metatrain.run_folder`,
:mod:`~celo2.metatrain.checkpoint`, :mod:`~celo2.metatrain.metrics` and
:mod:`~celo2.metatrain.compile_cache`),
:mod:`~celo2.metatrain.plot` (meta-loss curve),
:mod:`~celo2.metatrain.score` (thetas compared on the meta-loss). The config's ``variant``
(:class:`celo2.rule.variant.RuleVariant`) runs in :mod:`celo2.optax`. JAX is imported on first use.
"""

from celo2.metatrain.config import (
    AUGMENTATIONS,
    INNER_OPTIMIZERS,
    PRESETS,
    ConfigError,
    MetaTrainConfig,
    override,
    parse_set,
    preset,
)
from celo2.metatrain.tasks import (
    TaskData,
    TaskError,
    TaskFamily,
    get_task_family,
    load_task_data,
    register_task_family,
    task_families,
)

_LAZY = {
    "MetaTrainer": "trainer",
    "MetaTrainResult": "trainer",
    "meta_train": "trainer",
    "read_metrics": "trainer",
    "CheckpointError": "trainer",
    "RunDirError": "trainer",
    "plot_run": "plot",
    "plot_runs": "plot",
    "PES": "pes",
    "score_thetas": "score",
    "MetaLossScores": "score",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"celo2.metatrain.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'celo2.metatrain' has no attribute {name!r}")


__all__ = [
    "AUGMENTATIONS", "ConfigError", "INNER_OPTIMIZERS", "MetaTrainConfig", "PRESETS", "TaskData",
    "TaskError", "TaskFamily", "get_task_family", "load_task_data", "override", "parse_set",
    "preset", "register_task_family", "task_families", *_LAZY,
]
