"""A decoded dataset cached as one uncompressed ``.npz`` of uint8 arrays, written once.

Decoding 110,000 JPEGs takes a minute; reading them back from this cache takes a second.
The file is written to a temporary name and renamed into place, so a crash never leaves a
half-written cache under the real name. It is read with ``allow_pickle=False`` (arrays of
plain numbers and strings only, never code), and every member carries the zip format's
CRC-32, which ``numpy.load`` checks as it reads, so a damaged cache is refused.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from .errors import DatasetError
from .splits import RawSplits

__all__ = ["load_splits", "save_splits"]

_ARRAYS = RawSplits._fields
_META_PREFIX = "meta_"


def save_splits(path: str | Path, splits: RawSplits, meta: Mapping[str, object]) -> Path:
    """Write ``splits`` and string/array ``meta`` to ``path`` atomically; return ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(getattr(splits, name)) for name in _ARRAYS}
    arrays.update({_META_PREFIX + key: np.asarray(value) for key, value in meta.items()})
    if any(a.dtype.hasobject for a in arrays.values()):
        raise ValueError("the cache holds plain arrays only, not Python objects")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.savez(handle, **arrays)  # type: ignore[arg-type]
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def load_splits(path: str | Path) -> tuple[RawSplits, dict[str, np.ndarray]]:
    """Read a cache written by :func:`save_splits`: the splits and the ``meta`` arrays."""
    path = Path(path)
    hint = "delete it and load the dataset again to rebuild it from the archive"
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [name for name in _ARRAYS if name not in npz.files]
            if missing:
                raise DatasetError(f"{path}: cache lacks {', '.join(missing)}; {hint}")
            arrays = {name: npz[name] for name in npz.files}
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DatasetError(f"{path}: corrupt or incomplete cache ({err}); {hint}") from err
    splits = RawSplits(*(arrays.pop(name) for name in _ARRAYS))
    meta = {k.removeprefix(_META_PREFIX): v for k, v in arrays.items()}
    return splits, meta
