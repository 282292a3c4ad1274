"""Find a dataset file on disk, falling back to the bundled copy or a download.

The data directory is, in order: the ``data_dir`` argument, the ``LAP_DATA``
environment variable, then the user cache (``$XDG_CACHE_HOME/lookahead-prune`` or
``~/.cache/lookahead-prune``). Inside it each dataset has its own folder::

    <dir>/mnist/train-images-idx3-ubyte.gz ...
    <dir>/fashion-mnist/train-images-idx3-ubyte.gz ...
    <dir>/cifar-10/cifar-10-binary.tar.gz  (or cifar-10-python.tar.gz)
    <dir>/tiny-imagenet/tiny-imagenet-200.zip  (and its decoded cache tiny-imagenet-200.npz)

MNIST also ships inside the package (``data/bundled/mnist``) so that everything runs
offline from a fresh clone; a copy in the data directory takes precedence over it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .checksum import verify_md5
from .download import download_file
from .errors import DatasetError
from .sources import DatasetSource, FileSource

__all__ = ["BUNDLED_DIR", "ensure_file", "find_local", "resolve_data_dir"]

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
"""Folder of the dataset files shipped with the package (``<BUNDLED_DIR>/mnist/...``)."""


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """Return the data directory: ``data_dir``, else ``$LAP_DATA``, else the user cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("LAP_DATA")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "lookahead-prune"


def _hint(source: DatasetSource, entry: FileSource, folder: Path) -> str:
    """Say where a good copy of ``entry`` can be had and where it should go."""
    urls = " or ".join(source.urls(entry.filename))
    return f"a good copy is at {urls}; put it in {folder}/"


def find_local(
    source: DatasetSource,
    entry: FileSource,
    data_dir: str | Path | None = None,
    *,
    verify: bool = True,
) -> Path | None:
    """Return the local copy of ``entry`` (data directory first, then bundled), or None.

    A copy that exists but fails its MD5 check raises :class:`DatasetError` rather
    than being skipped, so a corrupt file is never silently shadowed.
    """
    folder = resolve_data_dir(data_dir) / source.subdir
    candidates = [folder / entry.filename]
    if source.bundled:
        candidates.append(BUNDLED_DIR / source.subdir / entry.filename)
    for path in candidates:
        if path.is_file():
            if verify:
                verify_md5(path, entry.md5, hint=_hint(source, entry, folder))
            return path
    return None


def ensure_file(
    source: DatasetSource,
    entry: FileSource,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    verify: bool = True,
    progress: bool = True,
) -> Path:
    """Return a verified local path for ``entry``, downloading it when allowed.

    Downloads go to ``<data dir>/<subdir>/<filename>`` and are always MD5-checked.
    When the file is absent and ``download`` is False (or fails), the error says
    which file to put where.
    """
    found = find_local(source, entry, data_dir, verify=verify)
    if found is not None:
        return found
    folder = resolve_data_dir(data_dir) / source.subdir
    dest = folder / entry.filename
    if not download:
        raise DatasetError(
            f"{source.name}: {entry.filename} not found in {folder}/. "
            f"Download it from {' or '.join(source.urls(entry.filename))} "
            f"(MD5 {entry.md5}) into {folder}/, point LAP_DATA or data_dir at a directory "
            f"holding {source.subdir}/{entry.filename}, or load with download=True."
        )
    return download_file(source.urls(entry.filename), dest, entry.md5, progress=progress)
