"""Atomic, safe checkpoints: a crash never leaves a half-written file under the final name,
and loading never runs code hidden in the file (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "UnsafeCheckpointError", "load_checkpoint", "save_checkpoint"]

MapLocation = str | torch.device | Mapping[str, str] | Callable[..., Any] | None


class CheckpointError(RuntimeError):
    """A checkpoint file is truncated, corrupt or not a checkpoint at all."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds arbitrary Python objects, which loading refuses to unpickle."""


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write *state* to *path* atomically: temp file in the same folder, fsync, ``os.replace``.

    Readers see either the old file or the complete new one, never a partial write.
    Keep *state* to tensors, numbers, strings and containers so it loads with weights_only.
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint state must be a mapping, got {type(state).__name__}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint path {path} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise CheckpointError(f"cannot write checkpoints in {path.parent}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(dict(state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes 0600; honour the umask
        os.replace(tmp_name, path)
    except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise CheckpointError(f"could not write checkpoint {path}: {_why(err, path)}") from err
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def _why(err: BaseException, path: Path) -> str:
    """A one-line reason for a failed write, naming a full disk when that is what it was."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return "the disk is full; free space and rerun (finished runs are kept)"
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return f"the disk is full ({free // 2**20} MiB free); free space and rerun"
    return text


def _umask() -> int:
    """The process's umask (reading it means setting it; put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(
    path: str | Path, map_location: MapLocation = None, *, cache: bool = True
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, refusing arbitrary Python objects.

    Raises FileNotFoundError if missing, UnsafeCheckpointError if the file needs more
    than weights-only unpickling, and CheckpointError if it is truncated, corrupt or no
    checkpoint at all. ``cache`` says the file is one the tool wrote and can recompute (a
    sweep's dense model), so the error may advise deleting it; for a file the user gave
    (``cache=False``) it only says what the file is not.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    kind = _foreign_kind(path)
    if kind is not None:
        raise CheckpointError(
            f"{path} is {kind}, not a checkpoint (write one with `lap train --out FILE`)"
        )
    _verify_archive(path, cache)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)  # type: ignore[arg-type]
    except pickle.UnpicklingError as err:
        # A forbidden class or function names itself as an "Unsupported global"; other
        # weights-only failures (unknown opcodes, ...) come from damaged bytes.
        if "unsupported global" in str(err).lower():
            raise UnsafeCheckpointError(
                f"refusing to load checkpoint {path}: it contains Python objects other than "
                "tensors, numbers, strings and containers, and unpickling them could run code"
            ) from err
        raise _corrupt(path, err, cache) from err
    except PermissionError:
        raise
    except Exception as err:  # a damaged file fails in many ways: OSError, EOFError, KeyError...
        raise _corrupt(path, err, cache) from err
    if not isinstance(state, dict):
        advice = "; delete it and rerun" if cache else ""
        raise CheckpointError(
            f"checkpoint {path} holds a {type(state).__name__}, not a dict{advice}"
        )
    return state


def _verify_archive(path: Path, cache: bool) -> None:
    """Check every member of the zip archive against its stored CRC-32 before unpickling.

    ``torch.load`` itself reads damaged tensor bytes without complaint: a flipped bit in a
    dense checkpoint would be retrained and stored as a genuine-looking result. A file that
    is not a zip archive (torch's legacy pickle format, or anything else) is refused too:
    only the zip format can be checked and loaded weights-only by every torch we support.
    """
    if not zipfile.is_zipfile(path):
        with path.open("rb") as handle:
            head = handle.read(2)
        if head[:1] == b"\x80":  # a pickle stream: torch's legacy format
            raise UnsafeCheckpointError(
                f"refusing {path}: it is a legacy pickle checkpoint, not PyTorch's zip "
                "format, so it cannot be verified or loaded safely"
            )
        what = "a truncated zip archive" if head == b"PK" else "not a zip archive"
        raise _corrupt(path, ValueError(what), cache)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise _corrupt(path, err, cache) from err
    if bad is not None:
        raise _corrupt(path, ValueError(f"member {bad!r} fails its CRC-32 check"), cache)


_MAGIC = {
    b"SQLite format 3\x00": "an SQLite database (a results store?)",
    b"\x89PNG": "a PNG image",
    b"%PDF": "a PDF document",
}


def _foreign_kind(path: Path) -> str | None:
    """What ``path`` is when its first bytes name another format, else None."""
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError:
        return None
    for magic, kind in _MAGIC.items():
        if head.startswith(magic):
            return kind
    return None


def _corrupt(path: Path, err: BaseException, cache: bool) -> CheckpointError:
    what = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if cache:
        return CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({what}); "
            "delete the file and rerun to recompute it"
        )
    return CheckpointError(
        f"{path} is not a readable checkpoint ({what}); give a file written by "
        "`lap train --out FILE` or `lap prune --out FILE`"
    )
