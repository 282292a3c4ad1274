"""The working folder of a sweep: every checkpoint's name, saving and loading, cleaning.

Beside a results database ``NAME.sqlite`` lives ``NAME-checkpoints/`` (:func:`default_workdir`)
with one ``dense-KEY.pt`` per dense model (``KEY``: the hash of
:meth:`~lookahead_prune.protocol.Protocol.dense_config`) and, for iterative pruning, one
``iter-KEY.pt`` per level of a chain (``KEY``: the run's key). Checkpoints are written
atomically (a ``.NAME.*.tmp`` file renamed into place) and loaded with ``weights_only=True``.
Every file name is made here, so cleaning and loading can never disagree about one.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .claims import live_claims
from .data import ImageDataset
from .pipeline import DenseModel, Protocol, train_dense
from .store import RunStore, config_hash

__all__ = [
    "STALE_TEMP_S",
    "chain_path",
    "check_writable",
    "clean_checkpoints",
    "default_workdir",
    "dense_path",
    "get_dense",
    "load_dense",
    "load_pruned",
    "remove_stale_temporaries",
    "save_pruned",
]

DENSE_GLOB = "dense-*.pt"
CHAIN_GLOB = "iter-*.pt"
TEMP_GLOB = ".*.tmp"
STALE_TEMP_S = 600.0
"""A checkpoint's temporary file older than this is left over from a killed writer."""


def default_workdir(db: str | Path, workdir: str | Path | None = None) -> Path:
    """``workdir`` if given, else the folder beside the database: ``NAME-checkpoints``."""
    if workdir is not None:
        return Path(workdir)
    db = Path(db)
    return db.with_name(db.stem + "-checkpoints")


def dense_path(folder: Path, protocol: Protocol) -> Path:
    """Where the dense model of ``protocol`` is kept in ``folder``."""
    return folder / f"dense-{config_hash(protocol.dense_config())}.pt"


def chain_path(folder: Path, key: str) -> Path:
    """Where the model after the iterative run ``key`` is kept in ``folder``."""
    return folder / f"iter-{key}.pt"


def load_dense(path: Path) -> DenseModel:
    """A dense model from its checkpoint (older ones, with one ``rewind`` state, too)."""
    try:
        return DenseModel.from_state(load_checkpoint(path))
    except ValueError as error:
        raise CheckpointError(
            f"dense checkpoint {path}: {error} (written by another version?); delete the file "
            "and rerun to retrain it"
        ) from None


def get_dense(
    protocol: Protocol, data: ImageDataset, workdir: Path, *, progress: bool = False,
    snapshot_steps: Sequence[int] = (),
) -> tuple[DenseModel, bool]:  # fmt: skip
    """The trained dense model from its checkpoint, training (and saving) it if missing.

    A checkpoint that lacks a wanted snapshot (a rewind step no earlier sweep needed) is
    trained again with every snapshot; training is deterministic on CPU, so the final weights
    must come out as stored (else ``CheckpointError``), and the richer checkpoint replaces it.
    """
    path = dense_path(workdir, protocol)
    wanted = {0, protocol.rewind_key, *snapshot_steps}
    old = load_dense(path) if path.exists() else None
    if old is not None and wanted <= set(old.snapshots):
        return old, False
    steps = wanted | set(old.snapshots if old else ())
    dense = train_dense(protocol, data, progress=progress, snapshot_steps=sorted(steps))
    if old is not None:
        if any(not torch.equal(old.state[k], v) for k, v in dense.state.items()):
            raise CheckpointError(
                f"retraining dense model {path.name} to add snapshots at steps "
                f"{sorted(wanted - set(old.snapshots))} gave other weights than it holds "
                "(another device or torch version?); sweep with the rewind steps it has, "
                "or delete it and every run that used it"
            )
        dense.wall_time = old.wall_time
    save_checkpoint(path, asdict(dense))
    return dense, True


def save_pruned(path: Path, model: nn.Module) -> None:
    """A pruned model's state, masks as bool (1 byte per weight instead of 4)."""
    state = {
        k: (v.bool() if k.endswith("_mask") else v).cpu() for k, v in model.state_dict().items()
    }
    save_checkpoint(path, {"state": state})


def load_pruned(path: Path, model: nn.Module) -> nn.Module:
    """Restore a pruned model: re-create its masks, then load weights and masks."""
    state = load_checkpoint(path)["state"]
    for name, module in model.named_modules():
        mask = state.get(f"{name}.weight_mask" if name else "weight_mask")
        if mask is not None:
            mask = mask.to(module.weight.device, module.weight.dtype)
            torch_prune.custom_from_mask(module, "weight", mask)
    own = model.state_dict()
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
    return model


def check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a checkpoint can be written there, or raise one line."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".probe-", suffix=".tmp")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        raise CheckpointError(
            f"cannot write checkpoints in {folder}: {err.strerror or err}; choose a writable "
            "folder (--db elsewhere) before any training starts"
        ) from err


def remove_stale_temporaries(workdir: Path) -> int:
    """Delete ``.NAME.*.tmp`` files that a killed checkpoint write left behind; their count.

    Only old ones: a concurrent sweep may be writing a fresh one right now.
    """
    removed = 0
    now = time.time()
    for tmp in workdir.glob(TEMP_GLOB):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def clean_checkpoints(
    db: str | Path, workdir: str | Path | None = None, *, dense: bool = False,
    dry_run: bool = False, log: Callable[[str], Any] | None = None,
) -> list[Path]:  # fmt: skip
    """Delete checkpoints that no resume can need; the paths removed (or, dry, removable).

    An iterative level's model is needed only to continue its chain: once the next level of
    the same chain is stored, it goes. The last stored level of a chain stays, so a sweep
    with more levels can still continue it. Dense models stay unless ``dense`` (a new sweep
    over the same protocol would retrain them), and even then stay while any live claim is on
    the database (a running sweep may need them; ``log`` says so). Stale temporaries always go.
    """
    folder = default_workdir(db, workdir)
    if not folder.is_dir():
        return []
    with RunStore(Path(db), read_only=True) as store:
        configs = [(k, c) for k, c in store.configs() if c.get("mode") == "iterative"]
    chains: dict[str, list[tuple[list[int], str]]] = {}
    for key, config in configs:
        chain = {k: v for k, v in config.items() if k not in ("level", "path")}
        chains.setdefault(repr(sorted(chain.items())), []).append((config.get("path", []), key))
    removable = []
    for members in chains.values():
        for path, key in members:
            extended = any(p[: len(path)] == path and len(p) > len(path) for p, _ in members)
            ckpt = chain_path(folder, key)
            if extended and ckpt.exists():
                removable.append(ckpt)
    if dense:
        live = live_claims(db)
        if live:  # claims name runs, not their dense models: a running sweep keeps them all
            if log is not None:
                log(
                    f"kept the dense models: {len(live)} live claim(s) on {db} (a sweep is "
                    "running and may need them); clean --dense again once it has ended"
                )
        else:
            removable += sorted(folder.glob(DENSE_GLOB))
    now = time.time()
    for tmp in folder.glob(TEMP_GLOB):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                removable.append(tmp)
        except FileNotFoundError:  # renamed into place (or removed) since the glob
            continue
    if not dry_run:
        for stale in removable:
            stale.unlink(missing_ok=True)
    return removable
