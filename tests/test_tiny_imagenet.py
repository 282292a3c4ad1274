"""Tiny-ImageNet: the reader of the official archive layout, checksums, download and the cache.

Every test writes its own small archive (three classes, a few 64x64 images) in a temporary
folder. Most images are PNG data under ``.JPEG`` names, so pixels can be compared exactly;
one is a real grayscale JPEG. Tests that write images skip when Pillow is absent.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lookahead_prune.data import SOURCES, DatasetError, load_dataset
from lookahead_prune.data.checksum import clear_md5_cache
from lookahead_prune.data.npz_cache import load_splits, save_splits
from lookahead_prune.data.splits import RawSplits
from lookahead_prune.data.tiny_imagenet import CACHE_NAME, read_tiny_imagenet

SOURCE = SOURCES["tiny-imagenet"]
ARCHIVE = "tiny-imagenet-200.zip"
WNIDS = ("n03000000", "n01000000", "n02000000")  # wnids.txt order; labels follow sorted order
PER_CLASS = 3
VAL = (("val_0.JPEG", "n02000000"), ("val_1.JPEG", "n03000000"), ("val_2.JPEG", "n01000000"))
GRAY = "train/n02000000/images/n02000000_1.JPEG"  # the one real (grayscale) JPEG


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """Keep every test away from the user's real data directory and MD5 cache."""
    monkeypatch.delenv("LAP_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    clear_md5_cache()


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def fake_files(seed: int = 0) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
    """A small Tiny-ImageNet's files (relative to its top folder) and their pixels [H, W, 3]."""
    pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(seed)
    files: dict[str, bytes] = {
        "wnids.txt": "\n".join(WNIDS).encode() + b"\n",
        "words.txt": b"".join(f"{w}\tthing {i}\n".encode() for i, w in enumerate(WNIDS)),
        "test/images/test_0.JPEG": _encode(np.zeros((64, 64, 3), np.uint8), "JPEG"),
    }
    pixels: dict[str, np.ndarray] = {}
    for wnid in WNIDS:
        files[f"train/{wnid}/{wnid}_boxes.txt"] = b""
        for i in range(PER_CLASS):
            name = f"train/{wnid}/images/{wnid}_{i}.JPEG"
            pixels[name] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name, _ in VAL:
        pixels[f"val/images/{name}"] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name, image in pixels.items():
        files[name] = _encode(image, "PNG")
    gray = np.full((64, 64), 77, dtype=np.uint8)
    files[GRAY] = _encode(gray, "JPEG")
    pixels[GRAY] = np.repeat(gray[:, :, None], 3, axis=2)
    files["val/val_annotations.txt"] = b"".join(
        f"{name}\t{wnid}\t0\t0\t63\t63\n".encode() for name, wnid in VAL
    )
    return files, pixels


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    """Write ``files`` under ``tiny-imagenet-200/`` into a zip, as the official archive has them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(f"tiny-imagenet-200/{name}", data)
    return path


def with_md5(monkeypatch, path: Path, **changes) -> None:
    """Make ``path`` the canonical archive for this test (its MD5 replaces the real one)."""
    entry = dataclasses.replace(SOURCE.files[0], md5=md5_of(path))
    source = dataclasses.replace(SOURCE, files=(entry,), **changes)
    monkeypatch.setitem(SOURCES, "tiny-imagenet", source)


def expected_train() -> list[tuple[str, int]]:
    """Training members and labels in the reader's order: round-robin over sorted classes."""
    return [
        (f"train/{w}/images/{w}_{i}.JPEG", label)
        for i in range(PER_CLASS)
        for label, w in enumerate(sorted(WNIDS))
    ]


def test_reader_gives_labels_shapes_and_pixels(tmp_path):
    files, pixels = fake_files()
    data = read_tiny_imagenet(write_zip(tmp_path / ARCHIVE, files))
    assert data.wnids == tuple(sorted(WNIDS))
    train_x, train_y, test_x, test_y = data.splits
    assert train_x.shape == (9, 3, 64, 64) and train_x.dtype == np.uint8
    members = expected_train()
    assert train_y.tolist() == [label for _, label in members] == [0, 1, 2] * PER_CLASS
    for got, (name, _) in zip(train_x, members, strict=True):
        if name == GRAY:  # a real JPEG, lossy: three equal channels near the gray level
            assert (got == got[0]).all() and np.abs(got.astype(int) - 77).max() <= 2
        else:
            np.testing.assert_array_equal(got, pixels[name].transpose(2, 0, 1))
    assert test_x.shape == (3, 3, 64, 64)
    assert test_y.tolist() == [1, 2, 0]  # n02, n03, n01 in sorted order
    np.testing.assert_array_equal(test_x[1], pixels["val/images/val_1.JPEG"].transpose(2, 0, 1))


def test_reader_reads_the_extracted_folder_like_the_zip(tmp_path):
    files, _ = fake_files(seed=1)
    archive = write_zip(tmp_path / ARCHIVE, files)
    with zipfile.ZipFile(archive) as handle:
        handle.extractall(tmp_path / "out")
    from_zip = read_tiny_imagenet(archive)
    for folder in (tmp_path / "out", tmp_path / "out" / "tiny-imagenet-200"):
        from_dir = read_tiny_imagenet(folder)
        assert from_dir.wnids == from_zip.wnids
        for a, b in zip(from_dir.splits, from_zip.splits, strict=True):
            np.testing.assert_array_equal(a, b)


def test_load_dataset_checks_md5_standardises_and_caches(monkeypatch, tmp_path):
    files, pixels = fake_files(seed=2)
    archive = write_zip(tmp_path / "tiny-imagenet" / ARCHIVE, files)
    with_md5(monkeypatch, archive)
    data = load_dataset("tiny-imagenet", tmp_path, download=False)
    assert data.input_shape == (3, 64, 64) and data.num_classes == 200
    assert data.train_x.shape == (9, 3, 64, 64) and data.test_y.tolist() == [1, 2, 0]
    first = pixels[f"train/{sorted(WNIDS)[0]}/images/{sorted(WNIDS)[0]}_0.JPEG"]
    mean, std = SOURCE.mean[2], SOURCE.std[2]
    want = (first[5, 7, 2] / 255 - mean) / std
    assert data.train_x[0, 2, 5, 7].item() == pytest.approx(want, abs=1e-5)
    assert (tmp_path / "tiny-imagenet" / CACHE_NAME).is_file()
    archive.unlink()  # the cache alone now serves, as it was made from the canonical archive
    again = load_dataset("tiny-imagenet", tmp_path, download=False, subset=3)
    assert again.train_y.tolist() == [0, 1, 2]  # round-robin order: the first n are balanced
    assert np.array_equal(again.train_x.numpy(), data.train_x[:3].numpy())


def test_corrupted_archive_fails_its_checksum(monkeypatch, tmp_path):
    files, _ = fake_files(seed=3)
    archive = write_zip(tmp_path / "tiny-imagenet" / ARCHIVE, files)
    with pytest.raises(DatasetError, match=SOURCE.files[0].md5) as info:
        load_dataset("tiny-imagenet", tmp_path, download=False)  # not the canonical archive
    assert str(archive) in str(info.value)
    with_md5(monkeypatch, archive)
    blob = bytearray(archive.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    archive.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match="MD5 mismatch"):
        load_dataset("tiny-imagenet", tmp_path, download=False)
    assert not (tmp_path / "tiny-imagenet" / CACHE_NAME).exists()


def test_truncated_archive_and_missing_members_are_clear_errors(tmp_path):
    files, _ = fake_files(seed=4)
    archive = write_zip(tmp_path / ARCHIVE, files)
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DatasetError, match="not a readable zip archive"):
        read_tiny_imagenet(truncated)
    no_annotations = {k: v for k, v in files.items() if k != "val/val_annotations.txt"}
    with pytest.raises(DatasetError, match=r"val/val_annotations\.txt is missing"):
        read_tiny_imagenet(write_zip(tmp_path / "a.zip", no_annotations))
    bad_image = dict(files)
    bad_image[GRAY] = files[GRAY][:100]  # a JPEG cut short
    with pytest.raises(DatasetError, match=f"cannot decode {GRAY}"):
        read_tiny_imagenet(write_zip(tmp_path / "b.zip", bad_image))
    unknown = dict(files)
    unknown["val/val_annotations.txt"] = b"val_0.JPEG\tn09999999\t0\t0\t1\t1\n"
    with pytest.raises(DatasetError, match="line 1: no known class id"):
        read_tiny_imagenet(write_zip(tmp_path / "c.zip", unknown))
    with pytest.raises(DatasetError, match="no such file"):
        read_tiny_imagenet(tmp_path / "absent.zip")


def test_missing_archive_without_download_says_where_to_get_it(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_dataset("tiny-imagenet", tmp_path, download=False)
    message = str(info.value)
    assert ARCHIVE in message and "cs231n.stanford.edu" in message
    assert SOURCE.files[0].md5 in message and str(tmp_path / "tiny-imagenet") in message


def test_download_from_a_mirror_then_load(monkeypatch, tmp_path):
    files, _ = fake_files(seed=5)
    mirror = write_zip(tmp_path / "mirror" / ARCHIVE, files)
    with_md5(monkeypatch, mirror, mirrors=((tmp_path / "mirror").as_uri() + "/",))
    data = load_dataset("tiny-imagenet", tmp_path / "data")
    assert data.train_y.tolist() == [0, 1, 2] * PER_CLASS
    assert md5_of(tmp_path / "data" / "tiny-imagenet" / ARCHIVE) == md5_of(mirror)


def test_damaged_cache_is_refused_and_a_stale_one_rebuilt(monkeypatch, tmp_path):
    folder = tmp_path / "tiny-imagenet"
    files, _ = fake_files(seed=6)
    archive = write_zip(folder / ARCHIVE, files)
    first = load_dataset("tiny-imagenet", tmp_path, download=False, verify=False)
    cache = folder / CACHE_NAME
    # A different archive put in place: with verify=False the cache must follow it.
    other_files, _ = fake_files(seed=7)
    write_zip(archive, other_files)
    clear_md5_cache()
    second = load_dataset("tiny-imagenet", tmp_path, download=False, verify=False)
    assert not np.array_equal(first.train_x.numpy(), second.train_x.numpy())
    # Made from a non-canonical archive, the cache is not trusted with verify=True.
    with pytest.raises(DatasetError, match="MD5 mismatch"):
        load_dataset("tiny-imagenet", tmp_path, download=False)
    blob = bytearray(cache.read_bytes())
    blob[len(blob) // 3] ^= 0xFF
    cache.write_bytes(bytes(blob))
    with pytest.raises(DatasetError, match="corrupt or incomplete cache"):
        load_dataset("tiny-imagenet", tmp_path, download=False, verify=False)


def test_missing_pillow_is_a_clear_error(monkeypatch, tmp_path):
    archive = tmp_path / ARCHIVE
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("tiny-imagenet-200/wnids.txt", "n01000000\n")
        handle.writestr("tiny-imagenet-200/train/n01000000/images/n01000000_0.JPEG", b"x")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DatasetError, match=r"lookahead-prune\[tiny-imagenet\]"):
        read_tiny_imagenet(archive)


def test_cache_of_another_format_version_is_rebuilt(tmp_path):
    folder = tmp_path / "tiny-imagenet"
    files, _ = fake_files(seed=8)
    write_zip(folder / ARCHIVE, files)
    empty = np.zeros((0, 3, 64, 64), np.uint8)
    old = RawSplits(empty, np.zeros(0, np.int64), empty, np.zeros(0, np.int64))
    save_splits(folder / CACHE_NAME, old, {"version": 0})
    data = load_dataset("tiny-imagenet", tmp_path, download=False, verify=False)
    assert data.train_x.shape == (9, 3, 64, 64)
    _, meta = load_splits(folder / CACHE_NAME)
    assert int(meta["version"]) == 1 and meta["archive_md5"] == md5_of(folder / ARCHIVE)
    assert tuple(meta["wnids"]) == tuple(sorted(WNIDS))


def test_cli_trains_and_prunes_an_official_64x64_model(monkeypatch, tmp_path, capsys):
    from lookahead_prune import cli

    files, _ = fake_files(seed=9)
    with_md5(monkeypatch, write_zip(tmp_path / "tiny-imagenet" / ARCHIVE, files))
    dense, pruned = tmp_path / "dense.pt", tmp_path / "pruned.pt"
    common = ["--data-dir", str(tmp_path), "--device", "cpu"]
    train = ["train", "--model", "wrn-16-8-64", "--dataset", "tiny-imagenet", "--quiet"]
    train += ["--train-steps", "1", "--batch-size", "4", "--out", str(dense)]
    assert cli.main(train + common) == 0
    prune = ["prune", str(dense), "--method", "lap", "--keep", "0.1", "--out", str(pruned)]
    assert cli.main(prune + common) == 0
    out = capsys.readouterr().out
    assert "layer3.1.conv2" in out and "200x512" in out and pruned.is_file()
