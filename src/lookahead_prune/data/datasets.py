"""Load a whole dataset into memory as standardised tensors: :func:`load_dataset`.

Images become float32 ``[N, C, H, W]`` with each channel standardised by the training
set's mean and std (constants in :mod:`.sources`), labels become int64 ``[N]``. The
result is small enough (MNIST: 190 MB as float32) to live on the training device as
one tensor per split, which is what :class:`~.batches.BatchStream` expects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .cifar import read_cifar10_binary, read_cifar10_python
from .errors import corrupt_file_error
from .idx import read_idx_images, read_idx_labels
from .locate import ensure_file, find_local
from .sources import SOURCES, DatasetSource
from .splits import RawSplits
from .tiny_imagenet import load_tiny_imagenet

__all__ = ["DATASETS", "ImageDataset", "load_dataset", "standardise"]

DATASETS: tuple[str, ...] = tuple(SOURCES)
"""Names accepted by :func:`load_dataset`."""


@dataclass
class ImageDataset:
    """A labelled image dataset held in memory: standardised train and test tensors."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    augment: bool = False  # whether training on it crops and flips by default
    pad_value: tuple[float, ...] = ()  # a black pixel per channel, standardised (crop padding)

    def to(self, device: str | torch.device) -> ImageDataset:
        """Return a copy whose four tensors live on ``device`` (self if already there)."""
        moved = {
            field: getattr(self, field).to(device)
            for field in ("train_x", "train_y", "test_x", "test_y")
        }
        return dataclasses.replace(self, **moved)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)``."""
        channels, height, width = self.train_x.shape[1:]
        return (channels, height, width)


def standardise(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Turn uint8 images ``[N, C, H, W]`` into float32 ``(x / 255 - mean) / std`` per channel.

    Uses a 256-entry lookup table per channel, so there is one pass over the pixels.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, C, H, W], got {images.dtype} {images.shape}")
    if not len(mean) == len(std) == images.shape[1]:
        raise ValueError(f"{images.shape[1]} channels but {len(mean)} means, {len(std)} stds")
    levels = np.arange(256, dtype=np.float64) / 255.0
    out = np.empty(images.shape, dtype=np.float32)
    for channel, (m, s) in enumerate(zip(mean, std, strict=True)):
        lut = ((levels - m) / s).astype(np.float32)
        out[:, channel] = lut[images[:, channel]]
    return torch.from_numpy(out)


def _load_idx(
    source: DatasetSource,
    data_dir: str | Path | None,
    download: bool,
    verify: bool,
    subset: int | None,
) -> RawSplits:
    """Read the four IDX files of an MNIST-like dataset; return uint8/int arrays."""
    paths = {
        entry.filename: ensure_file(source, entry, data_dir, download=download, verify=verify)
        for entry in source.files
    }
    splits: list[np.ndarray] = []
    for prefix, limit in (("train", subset), ("t10k", None)):
        image_path = paths[f"{prefix}-images-idx3-ubyte.gz"]
        label_path = paths[f"{prefix}-labels-idx1-ubyte.gz"]
        images = read_idx_images(image_path, limit=limit)
        labels = read_idx_labels(label_path, num_classes=source.num_classes, limit=limit)
        if images.shape[1:] != source.input_shape[1:]:
            raise corrupt_file_error(
                image_path, f"images are {images.shape[1:]}, expected {source.input_shape[1:]}"
            )
        if len(images) != len(labels):
            raise corrupt_file_error(
                label_path, f"{len(labels)} labels for the {len(images)} images of {image_path}"
            )
        splits += [images[:, None], labels]
    return RawSplits(*splits)


def _load_cifar(
    source: DatasetSource,
    data_dir: str | Path | None,
    download: bool,
    verify: bool,
    subset: int | None = None,
) -> RawSplits:
    """Read CIFAR-10 from the binary archive, else the python one, else download binary."""
    binary, python = source.files[0], source.alternatives[0]
    path = find_local(source, binary, data_dir, verify=verify)
    if path is not None:
        return read_cifar10_binary(path)
    path = find_local(source, python, data_dir, verify=verify)
    if path is not None:
        return read_cifar10_python(path)
    path = ensure_file(source, binary, data_dir, download=download, verify=verify)
    return read_cifar10_binary(path)


def _load_tiny_imagenet(
    source: DatasetSource,
    data_dir: str | Path | None,
    download: bool,
    verify: bool,
    subset: int | None = None,
) -> RawSplits:
    """Read Tiny-ImageNet from its decoded cache or its zip archive (see :mod:`.tiny_imagenet`)."""
    return load_tiny_imagenet(source, data_dir, download=download, verify=verify).splits


Reader = Callable[[DatasetSource, str | Path | None, bool, bool, int | None], RawSplits]

_READERS: dict[str, Reader] = {
    "mnist": _load_idx,
    "fashion-mnist": _load_idx,
    "cifar10": _load_cifar,
    "tiny-imagenet": _load_tiny_imagenet,
}
"""How each dataset's files become raw splits: (source, data_dir, download, verify, subset)."""


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    device: str | torch.device = "cpu",
    subset: int | None = None,
    verify: bool = True,
) -> ImageDataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) as standardised tensors on ``device``.

    Files are looked up in ``data_dir`` / ``$LAP_DATA`` / the user cache (MNIST also in
    the bundled copy), MD5-checked unless ``verify=False``, and downloaded when missing
    if ``download``. ``subset=n`` keeps the first ``n`` training examples; the test
    set is always complete.
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    source = SOURCES[name]
    if subset is not None and not 1 <= subset <= source.train_size:
        raise ValueError(
            f"subset must be between 1 and {source.train_size} for {name}, got {subset}"
        )
    raw = _READERS[name](source, data_dir, download, verify, subset)
    train_x = raw.train_x[:subset] if subset is not None else raw.train_x
    train_y = raw.train_y[:subset] if subset is not None else raw.train_y
    dataset = ImageDataset(
        name=name,
        train_x=standardise(train_x, source.mean, source.std),
        train_y=torch.from_numpy(np.asarray(train_y, dtype=np.int64)),
        test_x=standardise(raw.test_x, source.mean, source.std),
        test_y=torch.from_numpy(np.asarray(raw.test_y, dtype=np.int64)),
        num_classes=source.num_classes,
        augment=source.augment,
        pad_value=source.black,
    )
    return dataset.to(device)
