"""Datasets as tensors and device-side batching for the train -> prune -> retrain pipeline.

``load_dataset("mnist")`` reads checksummed distribution files (MNIST is bundled, the
others are downloaded when online) into standardised tensors; :class:`BatchStream`
draws shuffled, optionally augmented minibatches from them on the training device.

Modules: :mod:`.sources` (file names, MD5s, mirrors, constants), :mod:`.locate` (data
directory lookup), :mod:`.checksum`, :mod:`.download`, :mod:`.idx`, :mod:`.cifar` and
:mod:`.tiny_imagenet` (file formats), :mod:`.npz_cache` (decoded datasets kept as uint8
``.npz``), :mod:`.datasets` (:func:`load_dataset`), :mod:`.batches`.
"""

from .batches import BatchStream, crop_flip, iterate_eval
from .datasets import DATASETS, ImageDataset, load_dataset, standardise
from .errors import DatasetError
from .locate import resolve_data_dir
from .sources import SOURCES

__all__ = [
    "DATASETS",
    "SOURCES",
    "BatchStream",
    "DatasetError",
    "ImageDataset",
    "crop_flip",
    "iterate_eval",
    "load_dataset",
    "resolve_data_dir",
    "standardise",
]
