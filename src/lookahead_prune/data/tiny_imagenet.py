"""Reader for Tiny-ImageNet (200 classes of 64x64 images) in its official archive layout.

``tiny-imagenet-200.zip`` holds one folder ``tiny-imagenet-200/`` with::

    wnids.txt                              the 200 class ids (WordNet ids), one a line
    words.txt                              ids -> names for all of WordNet (not needed)
    train/<wnid>/images/<wnid>_<i>.JPEG    500 training images per class
    train/<wnid>/<wnid>_boxes.txt          bounding boxes (not needed)
    val/images/val_<i>.JPEG                10,000 validation images
    val/val_annotations.txt                <file> TAB <wnid> TAB box, one a line
    test/images/*.JPEG                     unlabelled (not read)

The labelled validation set serves as the test set, as in the official LAP code. A label is
the index of its wnid in *sorted* order, which is what the official code's
``torchvision.datasets.ImageFolder`` assigns. Training images are ordered round-robin over
the classes (image 0 of every class, then image 1, ...), so the first ``n`` are balanced.

:func:`read_tiny_imagenet` works on the zip (read in place, never extracted) or on an
extracted ``tiny-imagenet-200`` folder, and on archives of any size (the tests write small
ones); it checks structure, not checksums. :func:`load_tiny_imagenet` (what ``load_dataset``
calls) finds the archive through :mod:`.locate` (MD5-checked, downloaded when allowed) and
decodes it once into a uint8 ``.npz`` beside it (:mod:`.npz_cache`), which later loads read
instead. JPEG decoding needs Pillow (``pip install 'lookahead-prune[tiny-imagenet]'``);
grayscale images are made RGB.
"""

from __future__ import annotations

import io
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from tqdm import tqdm

from .checksum import file_md5
from .errors import DatasetError, corrupt_file_error
from .locate import ensure_file, resolve_data_dir
from .npz_cache import load_splits, save_splits
from .sources import DatasetSource
from .splits import RawSplits

__all__ = [
    "CACHE_NAME",
    "IMAGE_SHAPE",
    "ROOT",
    "TinyImageNet",
    "load_tiny_imagenet",
    "read_tiny_imagenet",
]

ROOT = "tiny-imagenet-200"
"""The archive's top folder."""
IMAGE_SHAPE = (3, 64, 64)
CACHE_NAME = "tiny-imagenet-200.npz"
"""The decoded dataset, written beside the archive on first load (:mod:`.npz_cache`)."""
_CACHE_VERSION = 1
_WNIDS = "wnids.txt"
_VAL_ANNOTATIONS = "val/val_annotations.txt"


@dataclass(frozen=True)
class TinyImageNet:
    """Decoded Tiny-ImageNet: uint8 splits ``[N, 3, 64, 64]`` and the class ids by label."""

    splits: RawSplits
    wnids: tuple[str, ...]


def _pillow() -> Any:
    """Return ``PIL.Image``, or say how to install it."""
    try:
        from PIL import Image
    except ImportError as err:
        raise DatasetError(
            "reading Tiny-ImageNet's JPEG files needs Pillow: "
            "pip install 'lookahead-prune[tiny-imagenet]' (or pip install pillow)"
        ) from err
    return Image


class _Tree:
    """The files under the dataset's top folder, in a zip archive or an extracted folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._root: Path | None = None
        self._prefix = ""
        if path.is_dir():
            self._root = path if (path / _WNIDS).is_file() else path / ROOT
            if not (self._root / _WNIDS).is_file():
                raise DatasetError(f"{path}: no {_WNIDS} here or in {ROOT}/; not Tiny-ImageNet")
            files = (p for p in self._root.rglob("*") if p.is_file())
            self.names = {p.relative_to(self._root).as_posix() for p in files}
            return
        try:
            self._zip = zipfile.ZipFile(path)
            members = self._zip.namelist()
        except FileNotFoundError as err:
            raise DatasetError(f"{path}: no such file or folder") from err
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise corrupt_file_error(path, f"not a readable zip archive ({err})") from err
        roots = [m[: -len(_WNIDS)] for m in members if PurePosixPath(m).name == _WNIDS]
        if len(roots) != 1:
            self.close()
            raise corrupt_file_error(path, f"expected one {_WNIDS}, found {len(roots)}")
        self._prefix = roots[0]
        self.names = {m[len(self._prefix) :] for m in members if m.startswith(self._prefix)}

    def read(self, name: str) -> bytes:
        """The bytes of ``name`` (relative to the top folder); a clear error if unreadable."""
        if name not in self.names:
            raise corrupt_file_error(self.path, f"{ROOT}/{name} is missing")
        try:
            if self._zip is not None:
                return self._zip.read(self._prefix + name)
            assert self._root is not None
            return (self._root / name).read_bytes()
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise corrupt_file_error(self.path, f"cannot read {ROOT}/{name} ({err})") from err

    def text(self, name: str) -> list[str]:
        """The non-empty lines of text file ``name``."""
        try:
            text = self.read(name).decode("utf-8")
        except UnicodeDecodeError as err:
            raise corrupt_file_error(self.path, f"{ROOT}/{name} is not UTF-8 text") from err
        return [line.strip() for line in text.splitlines() if line.strip()]

    def close(self) -> None:
        """Close the archive, if any."""
        if self._zip is not None:
            self._zip.close()


def _wnids(tree: _Tree) -> tuple[str, ...]:
    """The class ids of ``wnids.txt``, checked unique, in sorted (label) order."""
    wnids = tree.text(_WNIDS)
    if not wnids:
        raise corrupt_file_error(tree.path, f"{_WNIDS} lists no classes")
    if len(set(wnids)) != len(wnids) or any("/" in w or " " in w for w in wnids):
        raise corrupt_file_error(tree.path, f"{_WNIDS} has repeated or malformed class ids")
    return tuple(sorted(wnids))


def _train_members(tree: _Tree, wnids: tuple[str, ...]) -> list[tuple[str, int]]:
    """(member, label) of every training image, round-robin over the classes."""
    by_class: dict[str, list[str]] = {wnid: [] for wnid in wnids}
    for name in tree.names:
        parts = name.split("/")  # train/<wnid>/images/<wnid>_<i>.JPEG
        if (
            len(parts) == 4
            and (parts[0], parts[2]) == ("train", "images")
            and parts[1] in by_class
            and parts[3].upper().endswith(".JPEG")
        ):
            by_class[parts[1]].append(name)
    for wnid, names in by_class.items():
        if not names:
            raise corrupt_file_error(tree.path, f"no images in {ROOT}/train/{wnid}/images/")
        names.sort()
    per_class = list(by_class.values())
    longest = max(len(names) for names in per_class)
    return [
        (names[i], label)
        for i in range(longest)
        for label, names in enumerate(per_class)
        if i < len(names)
    ]


def _val_members(tree: _Tree, wnids: tuple[str, ...]) -> list[tuple[str, int]]:
    """(member, label) of every validation image, in the order of ``val_annotations.txt``."""
    label_of = {wnid: i for i, wnid in enumerate(wnids)}
    members: list[tuple[str, int]] = []
    for number, line in enumerate(tree.text(_VAL_ANNOTATIONS), start=1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise corrupt_file_error(
                tree.path, f"{_VAL_ANNOTATIONS} line {number}: no known class id in {line!r}"
            )
        members.append((f"val/images/{fields[0]}", label_of[fields[1]]))
    if not members:
        raise corrupt_file_error(tree.path, f"{_VAL_ANNOTATIONS} lists no images")
    return members


def _decode(
    tree: _Tree, members: list[tuple[str, int]], what: str, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``members`` into uint8 ``[N, 3, 64, 64]`` and int64 labels ``[N]``."""
    image_module = _pillow()
    images = np.empty((len(members), *IMAGE_SHAPE), dtype=np.uint8)
    labels = np.fromiter((label for _, label in members), dtype=np.int64, count=len(members))
    for i, (name, _) in enumerate(tqdm(members, desc=what, disable=not progress, leave=False)):
        data = tree.read(name)
        try:
            with image_module.open(io.BytesIO(data)) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for bad image data
            raise corrupt_file_error(tree.path, f"cannot decode {name} ({err})") from err
        if pixels.shape != (*IMAGE_SHAPE[1:], 3):
            raise corrupt_file_error(
                tree.path, f"{name} is {pixels.shape[1]}x{pixels.shape[0]}, not 64x64"
            )
        images[i] = pixels.transpose(2, 0, 1)
    return images, labels


def read_tiny_imagenet(path: str | Path, *, progress: bool = False) -> TinyImageNet:
    """Read ``tiny-imagenet-200.zip`` (or its extracted folder) into uint8 arrays and labels.

    Train comes from ``train/<wnid>/images``, test from ``val/images`` with the labels of
    ``val_annotations.txt``; labels index the sorted class ids, returned as ``wnids``.
    """
    tree = _Tree(Path(path))
    try:
        wnids = _wnids(tree)
        train = _decode(tree, _train_members(tree, wnids), "train images", progress)
        test = _decode(tree, _val_members(tree, wnids), "val images", progress)
    finally:
        tree.close()
    return TinyImageNet(RawSplits(*train, *test), wnids)


def _read_cache(path: Path, num_classes: int) -> tuple[TinyImageNet, str] | None:
    """The cached dataset and the MD5 of the archive it came from; None for an old format."""
    splits, meta = load_splits(path)
    try:
        if int(meta["version"]) != _CACHE_VERSION:
            return None  # written by another version of this reader: decode again
        made_from = str(meta["archive_md5"])
        wnids = tuple(str(w) for w in meta["wnids"])
    except (KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{path}: not a Tiny-ImageNet cache ({err}); delete it") from err
    problem = None
    for x, y in ((splits.train_x, splits.train_y), (splits.test_x, splits.test_y)):
        if x.dtype != np.uint8 or x.shape[1:] != IMAGE_SHAPE or y.shape != (len(x),):
            problem = f"arrays of shape {x.shape} {x.dtype} and {y.shape}"
        elif y.dtype != np.int64 or (y.size and not 0 <= y.min() <= y.max() < len(wnids)):
            problem = f"labels outside 0..{len(wnids) - 1}"
    if len(wnids) > num_classes:
        problem = f"{len(wnids)} classes, more than {num_classes}"
    if problem:
        raise DatasetError(f"{path}: bad Tiny-ImageNet cache: {problem}; delete it")
    return TinyImageNet(splits, wnids), made_from


def _cache_is_current(made_from: str, canonical: str, archive: Path, verify: bool) -> bool:
    """Whether a cache decoded from an archive with MD5 ``made_from`` may be used now."""
    if verify:
        return made_from == canonical.lower()
    return not archive.is_file() or made_from == file_md5(archive)


def load_tiny_imagenet(
    source: DatasetSource,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    verify: bool = True,
    progress: bool = True,
) -> TinyImageNet:
    """Tiny-ImageNet from its cache, else from the checksummed archive (downloaded if allowed).

    The first load decodes ``<data dir>/<subdir>/tiny-imagenet-200.zip`` and writes
    :data:`CACHE_NAME` beside it, recording the archive's MD5. A cache is used when it was made
    from the canonical archive (``verify``), or, with ``verify=False``, from the archive now
    there (or there is none); otherwise the archive is decoded again and the cache replaced.
    """
    entry = source.files[0]
    folder = resolve_data_dir(data_dir) / source.subdir
    cache, archive = folder / CACHE_NAME, folder / entry.filename
    cached = _read_cache(cache, source.num_classes) if cache.is_file() else None
    if cached is not None and _cache_is_current(cached[1], entry.md5, archive, verify):
        return cached[0]
    path = ensure_file(source, entry, data_dir, download=download, verify=verify)
    data = read_tiny_imagenet(path, progress=progress)
    if len(data.wnids) > source.num_classes:
        raise corrupt_file_error(path, f"{len(data.wnids)} classes, more than {source.num_classes}")
    meta = {
        "version": _CACHE_VERSION,
        "archive_md5": entry.md5 if verify else file_md5(path),
        "wnids": np.array(data.wnids),
    }
    try:
        save_splits(cache, data.splits, meta)
    except OSError as err:
        warnings.warn(
            f"could not write the Tiny-ImageNet cache {cache} ({err}); "
            "the archive will be decoded again on the next load",
            stacklevel=2,
        )
    return data
