"""Readers for the two CIFAR-10 distributions, straight from their ``.tar.gz`` archives.

* Binary version (``cifar-10-binary.tar.gz``): ``data_batch_1.bin`` ... ``data_batch_5.bin``
  and ``test_batch.bin``, each a run of 3073-byte records (one label byte, then
  1024 red, 1024 green and 1024 blue pixel bytes, rows in order). Preferred: no
  unpickling at all.
* Python version (``cifar-10-python.tar.gz``): the same batches as Python 2 pickles of
  ``{"data": uint8 array [N, 3072], "labels": [int] * N, ...}``. These are read only
  through :class:`RestrictedUnpickler`, which can build numpy arrays and nothing else,
  so a tampered archive cannot run code.

Archives are streamed once and never extracted to disk. Readers do not check MD5s
(the caller does, see :mod:`.locate`), so they also work on small test archives.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from .errors import DatasetError, corrupt_file_error
from .splits import RawSplits

__all__ = [
    "RestrictedUnpickler",
    "read_cifar10_binary",
    "read_cifar10_python",
    "restricted_loads",
]

NUM_CLASSES = 10
IMAGE_SHAPE = (3, 32, 32)
_PIXELS = 3 * 32 * 32
_RECORD = 1 + _PIXELS
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"


# ---------------------------------------------------------------- restricted unpickling

_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's array reconstructor, whatever its module


def _plain_dtype(*args: Any) -> np.dtype:
    """Rebuild a dtype as ``numpy.dtype`` would, refusing dtypes that can hold objects."""
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError(f"refusing a numpy dtype that holds Python objects: {dtype}")
    return dtype


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only numpy array reconstruction; every other global is refused.

    Plain containers, numbers and strings need no globals. Allowed: numpy's
    ``_reconstruct`` (old and new module path), ``numpy.ndarray`` and ``numpy.dtype``
    (object dtypes excluded). Anything else, ``os.system`` say, raises
    :class:`pickle.UnpicklingError` before it is even imported.
    """

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed global, or refuse with a message naming it."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: CIFAR-10 pickles may only contain numpy "
                "arrays, lists, dicts, numbers and strings"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        """Refuse persistent ids, which CIFAR-10 pickles never use."""
        raise pickle.UnpicklingError(f"refusing persistent id {pid!r}")


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (Python 2 strings read as latin-1)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


# ---------------------------------------------------------------- archives


def _read_members(path: Path, names: Iterable[str]) -> dict[str, bytes]:
    """Stream the tar.gz at ``path`` once and return the bytes of members with these basenames."""
    wanted = set(names)
    found: dict[str, bytes] = {}
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                base = PurePosixPath(member.name).name
                if base not in wanted or not member.isfile():
                    continue
                if base in found:
                    raise corrupt_file_error(path, f"archive holds {base} twice")
                handle = archive.extractfile(member)
                if handle is not None:  # always the case for regular files
                    found[base] = handle.read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise corrupt_file_error(path, f"not a readable tar.gz archive ({err})") from err
    except OSError as err:
        raise DatasetError(f"{path}: cannot read the file: {err}") from err
    missing = sorted(wanted - found.keys())
    if missing:
        raise corrupt_file_error(path, f"archive lacks {', '.join(missing)}")
    return found


def _check_labels(path: Path, member: str, labels: np.ndarray) -> np.ndarray:
    """Return ``labels`` as int64 after checking they lie in 0..9."""
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = labels[(labels < 0) | (labels >= NUM_CLASSES)][0]
        raise corrupt_file_error(
            path, f"{member}: label {bad} out of range for {NUM_CLASSES} classes"
        )
    return labels


def _parse_binary(path: Path, member: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Split one binary batch into images ``[N, 3, 32, 32]`` and labels ``[N]``."""
    if not data or len(data) % _RECORD:
        raise corrupt_file_error(
            path, f"{member} is {len(data)} bytes, not a whole number of {_RECORD}-byte records"
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, _RECORD)
    labels = _check_labels(path, member, records[:, 0])
    return records[:, 1:].reshape(-1, *IMAGE_SHAPE), labels


def _get(batch: dict, key: str) -> Any:
    """Look up ``key`` in an unpickled batch whose keys may be str or bytes."""
    if key in batch:
        return batch[key]
    return batch.get(key.encode())


def _parse_python(path: Path, member: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Unpickle one python batch safely and check it is what CIFAR-10 batches hold."""
    try:
        batch = restricted_loads(data)
    except pickle.UnpicklingError as err:
        raise DatasetError(f"{path}: {member}: unsafe or invalid pickle: {err}") from err
    except Exception as err:  # a malformed pickle can fail in many ways
        raise corrupt_file_error(path, f"{member} is not a valid pickle ({err!r})") from err
    if not isinstance(batch, dict):
        raise corrupt_file_error(path, f"{member} holds {type(batch).__name__}, not a dict")
    images, labels = _get(batch, "data"), _get(batch, "labels")
    if (
        not isinstance(images, np.ndarray)
        or images.dtype != np.uint8
        or images.ndim != 2
        or images.shape[1] != _PIXELS
    ):
        raise corrupt_file_error(path, f"{member}: 'data' is not a uint8 array [N, {_PIXELS}]")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError) as err:
        raise corrupt_file_error(path, f"{member}: 'labels' is not a list of ints") from err
    if labels.shape != (len(images),) or labels.dtype.kind not in "iu":
        raise corrupt_file_error(
            path, f"{member}: 'labels' is not {len(images)} integers (got {labels.shape})"
        )
    return images.reshape(-1, *IMAGE_SHAPE), _check_labels(path, member, labels)


def _assemble(path: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> RawSplits:
    """Concatenate the five training batches in order and pair them with the test batch."""
    train = [batches[name] for name in TRAIN_BATCHES]
    test_x, test_y = batches[TEST_BATCH]
    return RawSplits(
        train_x=np.concatenate([x for x, _ in train]),
        train_y=np.concatenate([y for _, y in train]),
        test_x=np.ascontiguousarray(test_x),
        test_y=test_y,
    )


def read_cifar10_binary(path: str | Path) -> RawSplits:
    """Read ``cifar-10-binary.tar.gz`` into uint8 images ``[N, 3, 32, 32]``, int64 labels.

    Batches may hold any number of records (the real ones hold 10000).
    """
    path = Path(path)
    names = {f"{name}.bin": name for name in (*TRAIN_BATCHES, TEST_BATCH)}
    members = _read_members(path, names)
    return _assemble(path, {names[m]: _parse_binary(path, m, data) for m, data in members.items()})


def read_cifar10_python(path: str | Path) -> RawSplits:
    """Read ``cifar-10-python.tar.gz`` through the restricted unpickler, like the binary one."""
    path = Path(path)
    names = (*TRAIN_BATCHES, TEST_BATCH)
    members = _read_members(path, names)
    return _assemble(path, {m: _parse_python(path, m, data) for m, data in members.items()})
