"""MD5 verification of dataset files, cached in-process.

Hashing the 10-170 MB distribution files is cheap but not free, and a sweep loads the
same dataset many times, so digests are remembered per (path, size, mtime): a file
that is replaced or touched is hashed again.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

from .errors import DatasetError

__all__ = ["clear_md5_cache", "file_md5", "verify_md5"]

_CACHE: dict[tuple[str, int, int], str] = {}
_CACHE_LOCK = threading.Lock()
_CACHE_MAX = 256


def _new_md5() -> hashlib._Hash:  # MD5 is an integrity check here, not security.
    return hashlib.md5(usedforsecurity=False)


def file_md5(path: str | Path) -> str:
    """Return the hex MD5 of ``path``, reusing an earlier result if the file is unchanged."""
    path = Path(path)
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        with _CACHE_LOCK:
            cached = _CACHE.get(key)
        if cached is not None:
            return cached
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, _new_md5).hexdigest()
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the file to check its MD5: {err}") from err
    with _CACHE_LOCK:
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = digest
    return digest


def verify_md5(path: str | Path, expected: str, *, hint: str = "") -> None:
    """Raise :class:`DatasetError` unless ``path`` has MD5 ``expected``.

    The message names the file with the expected and actual digests and sizes;
    ``hint`` is appended to say where a good copy can be had.
    """
    actual = file_md5(path)
    if actual != expected.lower():
        size = os.path.getsize(path)
        message = (
            f"{path}: MD5 mismatch: expected {expected}, got {actual} ({size} bytes). "
            "The file is corrupt, incomplete or not the canonical release: delete it and "
            "load the dataset again to re-download it"
        )
        raise DatasetError(message + (f"; {hint}" if hint else "."))


def clear_md5_cache() -> None:
    """Forget all remembered digests (for tests, or after editing files in place)."""
    with _CACHE_LOCK:
        _CACHE.clear()
