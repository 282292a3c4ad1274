"""Where each dataset comes from: file names, canonical MD5s, mirrors and constants.

This module is the single table of facts about the supported datasets, in the spirit
of a string-keyed registry: every other module of :mod:`lookahead_prune.data` looks
things up here. The MD5 values are the canonical ones (the same values torchvision
checks); the per-channel means and standard deviations are those of the *training*
set, with pixels scaled to [0, 1]:

=============  ==============================  ==============================
dataset        mean                            std
=============  ==============================  ==============================
mnist          0.13066048                      0.30810780
fashion-mnist  0.28604060                      0.35302424
cifar10        0.49139968 0.48215841 0.44653091 0.24703223 0.24348513 0.26158784
tiny-imagenet  0.485 0.456 0.406               0.229 0.224 0.225
=============  ==============================  ==============================

The MNIST and Fashion-MNIST values were computed here from the canonical training
files (population std over all 60000 x 784 pixels); the CIFAR-10 values are the
widely used ones computed the same way over its 50000 training images. Tiny-ImageNet
uses ImageNet's statistics, as the official LAP code normalises it.

Tiny-ImageNet's archive MD5 and size are those published with public readers of it
(the same values in several independent code bases), not computed here: no copy of
the 248 MB archive was at hand. A download is checked against them like any other.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SOURCES", "DatasetSource", "FileSource"]


@dataclass(frozen=True)
class FileSource:
    """One distribution file: its name on the mirrors, canonical MD5 and size in bytes."""

    filename: str
    md5: str
    size: int | None = None


@dataclass(frozen=True)
class DatasetSource:
    """Everything needed to find, fetch, verify and standardise one dataset.

    ``files`` are all needed; ``alternatives`` are other distributions of the same
    data, used only when the first of ``files`` is absent locally (CIFAR-10's python
    pickles next to its preferred binary version).
    """

    name: str
    subdir: str
    mirrors: tuple[str, ...]
    files: tuple[FileSource, ...]
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_size: int
    test_size: int
    alternatives: tuple[FileSource, ...] = ()
    bundled: bool = False
    augment: bool = False  # the official code crops (pad 4) and flips CIFAR and Tiny-ImageNet

    @property
    def black(self) -> tuple[float, ...]:
        """A black pixel after standardisation, per channel: what crops are padded with."""
        return tuple(-m / s for m, s in zip(self.mean, self.std, strict=True))

    def file(self, filename: str) -> FileSource:
        """Return the entry for ``filename`` (a required file or an alternative)."""
        for entry in self.files + self.alternatives:
            if entry.filename == filename:
                return entry
        known = ", ".join(f.filename for f in self.files + self.alternatives)
        raise KeyError(f"{self.name} has no file {filename!r}; its files are: {known}")

    def urls(self, filename: str) -> list[str]:
        """Candidate download URLs for ``filename``, in the order to try them."""
        return [mirror + filename for mirror in self.mirrors]


_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

SOURCES: dict[str, DatasetSource] = {
    "mnist": DatasetSource(
        name="mnist",
        subdir="mnist",
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
        files=tuple(
            FileSource(name, md5, size)
            for name, md5, size in zip(
                _IDX_FILES,
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
                (9912422, 28881, 1648877, 4542),
                strict=True,
            )
        ),
        num_classes=10,
        input_shape=(1, 28, 28),
        mean=(0.13066048,),
        std=(0.30810780,),
        train_size=60000,
        test_size=10000,
        bundled=True,
    ),
    "fashion-mnist": DatasetSource(
        name="fashion-mnist",
        subdir="fashion-mnist",
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=tuple(
            FileSource(name, md5, size)
            for name, md5, size in zip(
                _IDX_FILES,
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
                (26421880, 29515, 4422102, 5148),
                strict=True,
            )
        ),
        num_classes=10,
        input_shape=(1, 28, 28),
        mean=(0.28604060,),
        std=(0.35302424,),
        train_size=60000,
        test_size=10000,
    ),
    "cifar10": DatasetSource(
        name="cifar10",
        subdir="cifar-10",
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files=(FileSource("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530"),),
        alternatives=(FileSource("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        num_classes=10,
        input_shape=(3, 32, 32),
        mean=(0.49139968, 0.48215841, 0.44653091),
        std=(0.24703223, 0.24348513, 0.26158784),
        train_size=50000,
        test_size=10000,
        augment=True,
    ),
    "tiny-imagenet": DatasetSource(
        name="tiny-imagenet",
        subdir="tiny-imagenet",
        mirrors=("http://cs231n.stanford.edu/",),
        files=(FileSource("tiny-imagenet-200.zip", "90528d7ca1a48142e341f4ef8d21d0de", 248100043),),
        num_classes=200,
        input_shape=(3, 64, 64),
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        train_size=100000,
        test_size=10000,
        augment=True,
    ),
}
