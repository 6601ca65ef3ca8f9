"""The dataset names ``celo2.data`` knows, and their aliases (shared by the readers and the downloader)."""

from __future__ import annotations

#: Datasets read from files under a data root.
FILE_DATASETS = ("mnist", "fashion-mnist", "cifar10", "svhn")
#: Datasets that need nothing but the installed packages.
BUILTIN_DATASETS = ("digits", "synthetic")
DATASETS = FILE_DATASETS + BUILTIN_DATASETS

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}


def canonical_name(name: str) -> str:
    """The dataset's canonical name.

    Args:
        name: A name of :data:`DATASETS`, in any case, or an alias (``fmnist``, ``cifar-10``, ...).

    Returns:
        The name as :data:`DATASETS` spells it.

    Raises:
        ValueError: The name is not a known dataset (the message lists them).
    """
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return key
