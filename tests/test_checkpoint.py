"""Tests for atomic, weights-only checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lookahead_prune import checkpoint
from lookahead_prune.checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    load_checkpoint,
    save_checkpoint,
)


def sample_state() -> dict:
    torch.manual_seed(0)
    return {
        "model": {"0.weight": torch.randn(4, 3), "0.bias": torch.zeros(4)},
        "masks": {"0": torch.rand(4, 3) > 0.5},
        "step": 17,
        "lr": 0.1,
        "method": "lap",
        "history": [0.5, 0.75],
    }


def assert_same(a: object, b: object) -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict)
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        assert a.dtype == b.dtype
        assert torch.equal(a, b)
    else:
        assert a == b


def test_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ckpt.pt"  # parent folder is created
    state = sample_state()
    save_checkpoint(path, state)
    loaded = load_checkpoint(path, map_location="cpu")
    assert_same(state, loaded)
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp file left


def test_overwrite_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(1000)})
    save_checkpoint(path, {"step": 2})
    assert load_checkpoint(path) == {"step": 2}


def test_crash_before_replace_leaves_old_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1})

    def crash(src: str, dst: str) -> None:
        assert Path(src).stat().st_size > 0  # the full temp file was written first
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(CheckpointError, match="simulated crash"):
        save_checkpoint(path, {"step": 2, "w": torch.ones(100)})
    with pytest.raises(CheckpointError, match="simulated crash"):
        save_checkpoint(tmp_path / "new.pt", {"step": 3})
    monkeypatch.undo()

    assert load_checkpoint(path) == {"step": 1}  # old content, not a partial new one
    assert not (tmp_path / "new.pt").exists()  # nothing under the final name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # temp files cleaned


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_corrupt_file_raises_checkpoint_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, sample_state())
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(random.Random(0).randbytes(len(data)))
    with pytest.raises(CheckpointError, match="delete") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not isinstance(info.value, UnsafeCheckpointError)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "absent.pt")


MARKER_NAME = "code-was-executed"


def touch(path: str) -> None:
    """Called by unpickling `Sneaky`; if it runs, loading executed code from the file."""
    Path(path).touch()


class Sneaky:
    """An arbitrary Python object that runs `touch` when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (touch, (str(self.marker),))


class Plain:
    """A harmless custom class: still not weights-only, so still refused."""

    def __init__(self) -> None:
        self.x = 1


@pytest.mark.parametrize("make", [lambda marker: Sneaky(marker), lambda marker: Plain()])
def test_arbitrary_objects_are_refused(tmp_path: Path, make) -> None:
    marker = tmp_path / MARKER_NAME
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "payload": make(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match="refusing") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_non_dict_checkpoint_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="not a dict"):
        load_checkpoint(path)


def test_save_rejects_non_mapping(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="mapping"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(IsADirectoryError):
        save_checkpoint(tmp_path, {"a": 1})


def test_a_flipped_bit_is_caught_before_anything_uses_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "dense.pt"
    save_checkpoint(path, {"state": {"w": torch.randn(300, 300)}, "test_acc": 0.98})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40  # inside the tensor bytes: torch.load alone would accept it
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="CRC-32") as info:
        load_checkpoint(path)
    assert "delete the file" in str(info.value)  # a cache file the sweep can recompute
    with pytest.raises(CheckpointError, match="CRC-32") as info:
        load_checkpoint(path, cache=False)
    assert "delete" not in str(info.value)  # a user's file: say what is wrong, nothing more


def test_a_legacy_pickle_checkpoint_is_refused_as_unsafe_not_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="legacy pickle") as info:
        load_checkpoint(path)
    assert "weights_only=False" not in str(info.value) and "corrupt" not in str(info.value)
