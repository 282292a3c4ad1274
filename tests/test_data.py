"""Tests for lookahead_prune.data: checksums, file formats, lookup, download, loading."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import tarfile
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch

from lookahead_prune.data import (
    DATASETS,
    SOURCES,
    DatasetError,
    ImageDataset,
    load_dataset,
    resolve_data_dir,
    standardise,
)
from lookahead_prune.data import locate as locate_module
from lookahead_prune.data.checksum import clear_md5_cache, file_md5, verify_md5
from lookahead_prune.data.cifar import (
    read_cifar10_binary,
    read_cifar10_python,
    restricted_loads,
)
from lookahead_prune.data.download import download_file
from lookahead_prune.data.idx import read_idx, read_idx_images, read_idx_labels
from lookahead_prune.data.locate import BUNDLED_DIR, ensure_file, find_local

MNIST = SOURCES["mnist"]
BUNDLED_MNIST = BUNDLED_DIR / "mnist"
LABELS_FILE = "t10k-labels-idx1-ubyte.gz"


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Keep every test away from the user's real data directory and MD5 cache."""
    monkeypatch.delenv("LAP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    clear_md5_cache()


# ------------------------------------------------------------------ checksums


def test_bundled_mnist_matches_canonical_md5():
    for entry in MNIST.files:
        path = BUNDLED_MNIST / entry.filename
        assert path.stat().st_size == entry.size
        assert md5_of(path) == entry.md5
        verify_md5(path, entry.md5)  # does not raise


def test_md5_mismatch_names_file_and_both_digests(tmp_path):
    good = BUNDLED_MNIST / LABELS_FILE
    bad = tmp_path / LABELS_FILE
    data = bytearray(good.read_bytes())
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    expected = MNIST.file(LABELS_FILE).md5
    with pytest.raises(DatasetError) as info:
        verify_md5(bad, expected)
    message = str(info.value)
    assert str(bad) in message
    assert expected in message
    assert md5_of(bad) in message
    assert "delete" in message


def test_md5_cache_notices_a_changed_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"first")
    assert file_md5(path) == hashlib.md5(b"first").hexdigest()
    path.write_bytes(b"second!")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert file_md5(path) == hashlib.md5(b"second!").hexdigest()


# ------------------------------------------------------------------ IDX format


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload


def write_gz(path: Path, raw: bytes) -> Path:
    path.write_bytes(gzip.compress(raw))
    return path


def test_idx_roundtrip_images_labels_and_limit(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], dtype=np.uint8)
    img = write_gz(tmp_path / "img.gz", idx_bytes(0x803, (5, 4, 3), images.tobytes()))
    lab = write_gz(tmp_path / "lab.gz", idx_bytes(0x801, (5,), labels.tobytes()))
    np.testing.assert_array_equal(read_idx_images(img), images)
    np.testing.assert_array_equal(read_idx_labels(lab, num_classes=10), labels)
    np.testing.assert_array_equal(read_idx_images(img, limit=2), images[:2])
    np.testing.assert_array_equal(read_idx_labels(lab, num_classes=10, limit=9), labels)


def test_idx_reads_big_endian_types_uncompressed(tmp_path):
    values = np.arange(-3, 3, dtype=">i4").reshape(2, 3)
    path = tmp_path / "values.idx"
    path.write_bytes(idx_bytes(0x0C02, (2, 3), values.tobytes()))
    magic, array = read_idx(path)
    assert magic == 0x0C02
    assert array.dtype == np.int32 and array.dtype.isnative
    np.testing.assert_array_equal(array, np.arange(-3, 3).reshape(2, 3))


def assert_corrupt(path: Path, fragment: str, reader, **kwargs) -> None:
    with pytest.raises(DatasetError) as info:
        reader(path, **kwargs)
    message = str(info.value)
    assert str(path) in message
    assert fragment in message
    assert "delete it" in message


def test_truncated_gzip_is_reported(tmp_path):
    data = (BUNDLED_MNIST / LABELS_FILE).read_bytes()
    path = tmp_path / LABELS_FILE
    path.write_bytes(data[: len(data) // 2])
    assert_corrupt(path, "gzip", read_idx_labels, num_classes=10)


def test_not_gzip_is_reported(tmp_path):
    path = tmp_path / "labels.gz"
    path.write_bytes(idx_bytes(0x801, (2,), b"\x01\x02"))  # valid IDX, but not compressed
    assert_corrupt(path, "gzip", read_idx_labels, num_classes=10)


def test_bad_magic_is_reported(tmp_path):
    path = write_gz(tmp_path / "bad.gz", idx_bytes(0x12345678, (2,), b"\x01\x02"))
    assert_corrupt(path, "magic", read_idx)
    images = write_gz(tmp_path / "images.gz", idx_bytes(0x803, (1, 2, 2), bytes(4)))
    assert_corrupt(images, "0x00000803", read_idx_labels, num_classes=10)


def test_wrong_length_is_reported(tmp_path):
    short = write_gz(tmp_path / "short.gz", idx_bytes(0x803, (3, 2, 2), bytes(11)))
    assert_corrupt(short, "wrong size", read_idx_images)
    long = write_gz(tmp_path / "long.gz", idx_bytes(0x803, (3, 2, 2), bytes(13)))
    assert_corrupt(long, "wrong size", read_idx_images)
    header = write_gz(tmp_path / "header.gz", struct.pack(">I", 0x803) + b"\0\0\0\1")
    assert_corrupt(header, "dimensions", read_idx_images)


def test_label_out_of_range_is_reported(tmp_path):
    path = write_gz(tmp_path / "labels.gz", idx_bytes(0x801, (3,), bytes([1, 10, 2])))
    assert_corrupt(path, "label 10 out of range", read_idx_labels, num_classes=10)


# ------------------------------------------------------------------ MNIST (real data)


def test_mnist_loads_from_bundled_copy(tmp_path):
    data = load_dataset("mnist", tmp_path / "empty", download=False)  # speed: benchmarks, not here
    assert data.name == "mnist" and data.num_classes == 10
    assert data.train_x.shape == (60000, 1, 28, 28)
    assert data.test_x.shape == (10000, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert data.input_shape == (1, 28, 28)
    assert data.train_y[:8].tolist() == [5, 0, 4, 1, 9, 2, 1, 3]  # the famous first digits
    assert data.test_y[:4].tolist() == [7, 2, 1, 0]
    assert torch.bincount(data.train_y).tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]
    assert abs(data.train_x.mean().item()) < 1e-4
    assert abs(data.train_x.std().item() - 1.0) < 1e-4
    background = (0.0 - MNIST.mean[0]) / MNIST.std[0]
    assert data.train_x.min().item() == pytest.approx(background, abs=1e-6)


def test_subset_keeps_first_training_examples(tmp_path):
    data = load_dataset("mnist", download=False, subset=100)
    labels = read_idx_labels(BUNDLED_MNIST / "train-labels-idx1-ubyte.gz", num_classes=10)
    assert data.train_x.shape == (100, 1, 28, 28)
    assert data.train_y.tolist() == labels[:100].tolist()
    assert data.test_x.shape[0] == 10000
    for bad in (0, 60001):
        with pytest.raises(ValueError, match="subset"):
            load_dataset("mnist", download=False, subset=bad)


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet")
    for name in DATASETS:
        assert name in str(info.value)
    assert set(DATASETS) == {"mnist", "fashion-mnist", "cifar10", "tiny-imagenet"}


def test_dataset_to_device_and_shape():
    x = torch.zeros(4, 3, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    data = ImageDataset("toy", x, y, x[:2], y[:2], num_classes=2)
    moved = data.to("meta")
    assert moved is not data and moved.train_x.is_meta and moved.test_y.is_meta
    assert not data.train_x.is_meta
    assert moved.input_shape == (3, 8, 8) and moved.name == "toy"


def test_standardise_uses_channel_constants():
    images = np.array([0, 255, 51], dtype=np.uint8).reshape(1, 3, 1, 1)
    out = standardise(images, (0.5, 0.5, 0.1), (0.5, 0.25, 0.1))
    assert out.flatten().tolist() == pytest.approx([-1.0, 2.0, 1.0], abs=1e-6)
    with pytest.raises(ValueError, match="channels"):
        standardise(images, (0.5,), (0.5,))


# ------------------------------------------------------------------ lookup


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_data_dir() == tmp_path / "xdg" / "lookahead-prune"
    monkeypatch.setenv("LAP_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.delenv("LAP_DATA")
    assert resolve_data_dir() == Path.home() / ".cache" / "lookahead-prune"


def test_lap_data_copy_takes_precedence_over_bundled(monkeypatch, tmp_path):
    monkeypatch.setenv("LAP_DATA", str(tmp_path))
    entry = MNIST.file(LABELS_FILE)
    assert find_local(MNIST, entry) == BUNDLED_MNIST / LABELS_FILE
    (tmp_path / "mnist").mkdir()
    local = tmp_path / "mnist" / LABELS_FILE
    shutil.copyfile(BUNDLED_MNIST / LABELS_FILE, local)
    assert find_local(MNIST, entry) == local
    local.write_bytes(b"garbage")  # a corrupt copy is reported, never skipped
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist")
    assert str(local) in str(info.value) and entry.md5 in str(info.value)


def test_missing_file_without_download_says_where_to_put_it(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("fashion-mnist", tmp_path, download=False)
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert str(tmp_path / "fashion-mnist") in message
    assert SOURCES["fashion-mnist"].mirrors[0] in message


# ------------------------------------------------------------------ download


def test_download_file_from_file_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    dest = tmp_path / "out" / "file.bin"
    got = download_file([src.as_uri()], dest, md5_of(src), progress=False)
    assert got == dest and dest.read_bytes() == src.read_bytes()


def test_download_falls_back_to_next_mirror_and_checks_md5(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    wrong = tmp_path / "wrong.bin"
    wrong.write_bytes(b"tampered")
    dest = tmp_path / "out" / "file.bin"
    urls = [(tmp_path / "missing.bin").as_uri(), wrong.as_uri(), src.as_uri()]
    download_file(urls, dest, md5_of(src), progress=False)
    assert dest.read_bytes() == b"payload"
    dest.unlink()
    with pytest.raises(DatasetError) as info:
        download_file(urls[:2], dest, md5_of(src), progress=False)
    message = str(info.value)
    assert urls[0] in message and urls[1] in message and "MD5 mismatch" in message
    assert str(dest) in message
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []  # no temporary files left behind


def test_load_dataset_downloads_missing_files(monkeypatch, tmp_path):
    empty = tmp_path / "no-bundle"
    empty.mkdir()
    monkeypatch.setattr(locate_module, "BUNDLED_DIR", empty)
    mirror = BUNDLED_MNIST.as_uri() + "/"
    monkeypatch.setitem(SOURCES, "mnist", dataclasses.replace(MNIST, mirrors=(mirror,)))
    data_dir = tmp_path / "data"
    data = load_dataset("mnist", data_dir, subset=10)
    assert data.train_y.tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    for entry in MNIST.files:
        assert md5_of(data_dir / "mnist" / entry.filename) == entry.md5


def test_offline_download_failure_is_clear(monkeypatch, tmp_path):
    monkeypatch.setattr(locate_module, "BUNDLED_DIR", tmp_path / "no-bundle")
    dead = (tmp_path / "no-mirror").as_uri() + "/"
    source = dataclasses.replace(MNIST, mirrors=(dead,))
    with pytest.raises(DatasetError) as info:
        ensure_file(source, source.file(LABELS_FILE), tmp_path / "data", progress=False)
    message = str(info.value)
    assert LABELS_FILE in message and str(tmp_path / "data" / "mnist" / LABELS_FILE) in message


# ------------------------------------------------------------------ CIFAR-10

CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
PER_BATCH = 3


def cifar_batches(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tiny CIFAR-like batches: uint8 images [3, 3072] and labels, distinct per batch."""
    rng = np.random.default_rng(seed)
    return {
        name: (
            rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
            (np.arange(PER_BATCH) + 3 * i) % 10,
        )
        for i, name in enumerate([*CIFAR_TRAIN, "test_batch"])
    }


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def binary_records(images: np.ndarray, labels: np.ndarray) -> bytes:
    return np.concatenate([labels.astype(np.uint8)[:, None], images], axis=1).tobytes()


def write_cifar_binary(path: Path, batches) -> Path:
    members = {"cifar-10-batches-bin/batches.meta.txt": b"airplane\n"}
    for name, (images, labels) in batches.items():
        members[f"cifar-10-batches-bin/{name}.bin"] = binary_records(images, labels)
    return write_tar(path, members)


class Py2Pickler(pickle._Pickler):
    """Writes pickles the way Python 2 wrote CIFAR-10's: bytes as str, old numpy path."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    data = buffer.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"numpy.core.multiarray\n_reconstruct" in data and b"_codecs" not in data
    return data


def write_cifar_python(path: Path, batches, *, py2: bool = True) -> Path:
    members = {}
    for name, (images, labels) in batches.items():
        batch = {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": [int(v) for v in labels],
            b"data": images,
            b"filenames": [b"x.png"] * len(labels),
        }
        data = (
            py2_pickle(batch)
            if py2
            else pickle.dumps({k.decode(): v for k, v in batch.items()}, protocol=4)
        )
        members[f"cifar-10-batches-py/{name}"] = data
    return write_tar(path, members)


def assert_matches_batches(arrays, batches) -> None:
    train_images = np.concatenate([batches[n][0] for n in CIFAR_TRAIN]).reshape(-1, 3, 32, 32)
    np.testing.assert_array_equal(arrays.train_x, train_images)
    assert arrays.train_y.tolist() == [int(v) for n in CIFAR_TRAIN for v in batches[n][1]]
    np.testing.assert_array_equal(arrays.test_x, batches["test_batch"][0].reshape(-1, 3, 32, 32))
    assert arrays.train_y.dtype == np.int64


def test_cifar_binary_reader(tmp_path):
    batches = cifar_batches()
    arrays = read_cifar10_binary(write_cifar_binary(tmp_path / "c.tar.gz", batches))
    assert arrays.train_x.shape == (15, 3, 32, 32) and arrays.test_x.shape == (3, 3, 32, 32)
    assert_matches_batches(arrays, batches)
    first = batches["data_batch_1"][0][0]  # channel planes: 1024 red, then green, then blue
    assert arrays.train_x[0, 1, 0, 5] == first[1024 + 5]
    assert arrays.train_x[0, 2, 31, 31] == first[3071]


def test_cifar_binary_corruption(tmp_path):
    batches = cifar_batches()
    good = {f"{n}.bin": binary_records(*b) for n, b in batches.items()}
    missing = write_tar(
        tmp_path / "missing.tar.gz", {k: v for k, v in good.items() if "3" not in k}
    )
    assert_corrupt(missing, "data_batch_3.bin", read_cifar10_binary)
    ragged = write_tar(tmp_path / "ragged.tar.gz", {**good, "test_batch.bin": bytes(3073 + 7)})
    assert_corrupt(ragged, "3073-byte records", read_cifar10_binary)
    bad_label = binary_records(batches["test_batch"][0], np.array([0, 10, 1]))
    wrong = write_tar(tmp_path / "label.tar.gz", {**good, "test_batch.bin": bad_label})
    assert_corrupt(wrong, "label 10 out of range", read_cifar10_binary)
    not_tar = tmp_path / "not.tar.gz"
    not_tar.write_bytes(b"this is not an archive")
    assert_corrupt(not_tar, "tar.gz", read_cifar10_binary)


@pytest.mark.parametrize("py2", [True, False], ids=["python2-pickles", "protocol4-pickles"])
def test_cifar_python_reader(tmp_path, py2):
    batches = cifar_batches(seed=1)
    arrays = read_cifar10_python(write_cifar_python(tmp_path / "p.tar.gz", batches, py2=py2))
    assert_matches_batches(arrays, batches)


class Plain:
    """An ordinary class: harmless, but not something a CIFAR-10 pickle may hold."""

    def __init__(self) -> None:
        self.value = 1


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"data": Evil(marker)}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os|nt)\.system"):
        restricted_loads(payload)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load collections\.OrderedDict"):
        restricted_loads(pickle.dumps({"data": __import__("collections").OrderedDict()}))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load \S*Plain"):
        restricted_loads(pickle.dumps(Plain(), protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="Python objects"):
        restricted_loads(pickle.dumps(np.array([1, "x"], dtype=object), protocol=4))
    ok = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(restricted_loads(py2_pickle({b"data": ok}))["data"], ok)


def test_cifar_python_archive_with_evil_pickle_is_refused(tmp_path):
    batches = cifar_batches()
    path = write_cifar_python(tmp_path / "p.tar.gz", batches)
    members = {}
    with tarfile.open(path) as archive:
        for member in archive:
            members[member.name] = archive.extractfile(member).read()
    marker = tmp_path / "pwned"
    members["cifar-10-batches-py/test_batch"] = pickle.dumps(Evil(marker), protocol=2)
    evil = write_tar(tmp_path / "evil.tar.gz", members)
    with pytest.raises(DatasetError) as info:
        read_cifar10_python(evil)
    assert str(evil) in str(info.value) and "refusing" in str(info.value)
    assert not marker.exists()


def test_load_cifar10_checks_md5_then_loads(tmp_path):
    batches = cifar_batches()
    folder = tmp_path / "cifar-10"
    folder.mkdir()
    archive = write_cifar_binary(folder / "cifar-10-binary.tar.gz", batches)
    with pytest.raises(DatasetError) as info:
        load_dataset("cifar10", tmp_path, download=False)
    assert str(archive) in str(info.value)
    assert SOURCES["cifar10"].files[0].md5 in str(info.value)
    data = load_dataset("cifar10", tmp_path, download=False, verify=False, subset=4)
    assert data.train_x.shape == (4, 3, 32, 32) and data.test_x.shape == (3, 3, 32, 32)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    pixel = int(batches["data_batch_1"][0][0][2048])  # first blue pixel
    mean, std = SOURCES["cifar10"].mean[2], SOURCES["cifar10"].std[2]
    assert data.train_x[0, 2, 0, 0].item() == pytest.approx((pixel / 255 - mean) / std, abs=1e-5)


def test_load_cifar10_python_version_when_binary_absent(tmp_path):
    batches = cifar_batches(seed=2)
    folder = tmp_path / "cifar-10"
    folder.mkdir()
    write_cifar_python(folder / "cifar-10-python.tar.gz", batches)
    data = load_dataset("cifar10", tmp_path, download=False, verify=False)
    assert data.train_y.tolist() == [int(v) for n in CIFAR_TRAIN for v in batches[n][1]]
    with pytest.raises(DatasetError, match="c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", tmp_path, download=False)
