"""Download one file from a list of mirrors, safely.

The file is streamed to a temporary file next to its destination with a tqdm progress
bar, its MD5 is checked, and only then is it moved into place with an atomic rename,
so an interrupted or corrupted download never leaves a file that looks valid. Any URL
scheme urllib understands works, ``file://`` included (which is how the tests run
without a network).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from .errors import DatasetError

__all__ = ["download_file"]

_CHUNK = 1 << 20


def _fetch(url: str, handle: BinaryIO, *, timeout: float, progress: bool) -> str:
    """Stream ``url`` into the open binary ``handle`` and return the MD5 of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    received = 0
    with urllib.request.urlopen(url, timeout=timeout) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=url.rsplit("/", 1)[-1],
            disable=not progress,
            leave=False,
        ) as bar:
            while chunk := response.read(_CHUNK):
                handle.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if total is not None and received != total:
            raise OSError(f"connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def download_file(
    urls: Sequence[str],
    dest: str | Path,
    md5: str | None,
    *,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download the first of ``urls`` that works to ``dest`` and return ``dest``.

    Each mirror is tried in turn; a mirror whose bytes do not have MD5 ``md5`` counts
    as failed. When every mirror fails, :class:`DatasetError` lists each failure and
    says where to put the file by hand.
    """
    dest = Path(dest)
    if not urls:
        raise ValueError("download_file needs at least one URL")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DatasetError(f"cannot create the data directory {dest.parent}: {err}") from err
    failures: list[str] = []
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as handle:
                actual = _fetch(url, handle, timeout=timeout, progress=progress)
            if md5 is not None and actual != md5.lower():
                failures.append(f"{url}: MD5 mismatch (expected {md5}, got {actual})")
                continue
            os.replace(tmp, dest)
            return dest
        except (OSError, urllib.error.URLError, ValueError) as err:
            failures.append(f"{url}: {err}")
        finally:
            tmp.unlink(missing_ok=True)
    tried = "\n  ".join(failures)
    checksum = f" (MD5 {md5})" if md5 else ""
    raise DatasetError(
        f"could not download {dest.name}; tried:\n  {tried}\n"
        f"If this machine is offline, copy {dest.name}{checksum} to {dest} by hand, "
        "or point LAP_DATA (or data_dir) at a directory that holds it."
    )
