"""Reader for the IDX format of MNIST and Fashion-MNIST (gzip-compressed or raw).

An IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values in C order. Image
files have magic 0x00000803 (uint8, 3 dims), label files 0x00000801 (uint8, 1 dim).
Every inconsistency (bad gzip stream, bad magic, a size that disagrees with the
header, a label out of range) raises :class:`DatasetError` naming the file.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from math import prod
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DatasetError, corrupt_file_error

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "read_idx", "read_idx_images", "read_idx_labels"]

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _parse(path: Path, handle: BinaryIO, limit: int | None) -> tuple[int, np.ndarray]:
    """Parse an open IDX stream; return its magic number and (the first ``limit``) items."""
    magic_bytes = handle.read(4)
    if len(magic_bytes) < 4:
        raise corrupt_file_error(path, "too short to hold an IDX header")
    (magic,) = struct.unpack(">I", magic_bytes)
    zero, code, ndim = magic >> 16, (magic >> 8) & 0xFF, magic & 0xFF
    if zero != 0 or code not in _DTYPES or ndim == 0:
        raise corrupt_file_error(path, f"bad IDX magic number 0x{magic:08x}")
    dims_bytes = handle.read(4 * ndim)
    if len(dims_bytes) < 4 * ndim:
        raise corrupt_file_error(path, f"header ends before its {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", dims_bytes)
    dtype = _DTYPES[code]
    count = dims[0] if limit is None else min(limit, dims[0])
    item_bytes = prod(dims[1:]) * dtype.itemsize
    want = count * item_bytes
    data = handle.read(want)
    if len(data) < want:
        total = dims[0] * item_bytes
        raise corrupt_file_error(
            path,
            f"wrong size: the header promises {dims[0]} items of shape {dims[1:]} "
            f"({total} data bytes) but the data ends after {len(data)} bytes",
        )
    if limit is None and handle.read(1):
        raise corrupt_file_error(
            path, f"wrong size: data continues past the {want} bytes the header promises"
        )
    array = np.frombuffer(data, dtype=dtype).reshape((count, *dims[1:]))
    if dtype.itemsize > 1:
        array = array.astype(dtype.newbyteorder("="))
    return magic, array


def read_idx(path: str | Path, *, limit: int | None = None) -> tuple[int, np.ndarray]:
    """Read an IDX file (``.gz`` is decompressed); return ``(magic, array)``.

    ``limit`` reads only the first ``limit`` items along the first dimension, which
    for a gzip file also stops decompression early. The array is read-only when the
    values are single bytes (no copy is made).
    """
    path = Path(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                return _parse(path, handle, limit)  # type: ignore[arg-type]
        with open(path, "rb") as handle:
            return _parse(path, handle, limit)
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise corrupt_file_error(path, f"bad or truncated gzip stream ({err})") from err
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the file: {err}") from err


def _expect_magic(path: Path, magic: int, expected: int, kind: str) -> None:
    """Raise unless ``magic`` is the one for ``kind`` files."""
    if magic != expected:
        raise corrupt_file_error(
            path, f"bad IDX magic number 0x{magic:08x} for {kind} (expected 0x{expected:08x})"
        )


def read_idx_images(path: str | Path, *, limit: int | None = None) -> np.ndarray:
    """Read an IDX image file (magic 0x803) as uint8 ``[N, H, W]``."""
    path = Path(path)
    magic, images = read_idx(path, limit=limit)
    _expect_magic(path, magic, IDX_IMAGES_MAGIC, "images")
    return images


def read_idx_labels(path: str | Path, *, num_classes: int, limit: int | None = None) -> np.ndarray:
    """Read an IDX label file (magic 0x801) as uint8 ``[N]``, checking labels < ``num_classes``."""
    path = Path(path)
    magic, labels = read_idx(path, limit=limit)
    _expect_magic(path, magic, IDX_LABELS_MAGIC, "labels")
    if labels.size and int(labels.max()) >= num_classes:
        raise corrupt_file_error(
            path, f"label {int(labels.max())} out of range for {num_classes} classes"
        )
    return labels
