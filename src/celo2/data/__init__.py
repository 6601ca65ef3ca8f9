"""Datasets of the Celo2 tasks: image classification (8x8 grey task view) and a byte-level text corpus.

Readers for the published formats (MNIST/Fashion-MNIST IDX, CIFAR-10 python
batches, SVHN ``.mat``), built-in datasets that need no download
(``digits``, ``synthetic``) and an offline English corpus (``python-docs``).
Nothing is downloaded unless :func:`download_dataset` is called.
"""

from celo2.data.download import download_dataset
from celo2.data.errors import DatasetFormatError, DatasetNotFoundError, DownloadError
from celo2.data.images import (
    BUILTIN_DATASETS,
    DATA_ENV_VAR,
    DATASETS,
    FILE_DATASETS,
    clear_cache,
    load_images,
    load_task_images,
    resolve_data_root,
)
from celo2.data.text import VOCAB_SIZE, load_text_corpus
from celo2.data.transforms import resize_bilinear, to_grey

__all__ = [
    "BUILTIN_DATASETS",
    "DATASETS",
    "DATA_ENV_VAR",
    "FILE_DATASETS",
    "VOCAB_SIZE",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "DownloadError",
    "clear_cache",
    "download_dataset",
    "load_images",
    "load_task_images",
    "load_text_corpus",
    "resize_bilinear",
    "resolve_data_root",
    "to_grey",
]
