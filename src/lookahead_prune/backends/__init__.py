"""Backends: who runs a sweep's work, behind one interface.

A backend gets one :class:`SweepRun` (the grid, the open results store and claims, the
working folder, the progress bar, the counters) and runs every missing run of the grid:
``local`` in this process, ``ray`` as tasks on a Ray cluster. Whatever runs the work, the
driver alone writes the store, through :meth:`SweepRun.store_run` with a row made by
:func:`result_row`; an iterative chain resumes through :func:`replay_chain`. A new backend is
one class with ``run(work)`` and one entry in :data:`BACKENDS`.
"""

from __future__ import annotations

import importlib
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from typing import Protocol as Interface

import torch
from torch import nn

from ..claims import Claims
from ..data import ImageDataset
from ..mlp_chain import mlp_chain_or_none
from ..models import build_model
from ..pipeline import DenseModel, LevelResult, Protocol, dense_model, prune_and_retrain
from ..progress import progress_bar
from ..store import RunStore, code_version, config_hash
from ..sweep import Sweep, run_config
from ..workdir import check_writable, default_workdir, load_pruned, save_pruned

__all__ = [
    "BACKENDS",
    "Backend",
    "SweepRun",
    "SweepStats",
    "get_backend",
    "group_size",
    "replay_chain",
    "result_row",
    "run_sweep",
]

BACKENDS = {
    "local": "lookahead_prune.backends.local:LocalBackend",
    "ray": "lookahead_prune.backends.ray:RayBackend",
}
"""Backend name -> ``module:class``, imported when chosen (Ray is an optional dependency)."""


@dataclass
class SweepStats:
    """What a sweep call did."""

    done: int = 0
    skipped: int = 0
    dense_trained: int = 0
    wall_time: float = 0.0
    keys: list[str] = field(default_factory=list)
    failed: list[tuple[Any, ...]] = field(default_factory=list)  # (config, jobs, error)


@dataclass
class SweepRun:
    """Everything a backend is given: the grid, where it goes, and what it reports to."""

    sweep: Sweep
    store: RunStore
    claims: Claims
    workdir: Path
    bar: Any
    stats: SweepStats
    data_dir: str | None = None
    device: str | None = None
    progress: bool = False
    log: Callable[[str], Any] = print
    batch_models: int | None = None
    version: str = field(default_factory=code_version)

    @property
    def levels(self) -> list[int]:
        return sorted(self.sweep.levels)

    def config(self, protocol: Protocol, method: str, level: int) -> dict[str, Any]:
        """A run's stored configuration (iterative runs record the levels they went through)."""
        return run_config(protocol, method, level, self.levels)

    def key(self, protocol: Protocol, method: str, level: int) -> str:
        return config_hash(self.config(protocol, method, level))

    def store_run(
        self, protocol: Protocol, method: str, level: int, row: dict[str, Any], wall: float
    ) -> str:
        """Store one finished run (one committed transaction), count it; its key.

        A run another sweep stored first (``put`` gives False: the row stays theirs) counts
        as already stored, not as done by this sweep.
        """
        config = self.config(protocol, method, level)
        inserted = self.store.put(config, row, wall_time=wall, code_version=self.version)
        key = config_hash(config)
        if inserted:
            self.stats.done += 1
            self.stats.keys.append(key)
        else:
            self.stats.skipped += 1
        self.bar.update(1)
        return key


class Backend(Interface):
    """What a backend is: one method that runs every missing run of ``work.sweep``."""

    def run(self, work: SweepRun) -> None: ...


def result_row(
    result: LevelResult | dict[str, Any], dense: tuple[float, float], device: str
) -> dict[str, Any]:
    """The stored row of one run: its result, the dense model's (test, train) accuracy and
    what computed it."""
    values = asdict(result) if isinstance(result, LevelResult) else dict(result)
    return values | {"dense_test_acc": dense[0], "dense_train_acc": dense[1], "device": device}


def replay_chain(
    protocol: Protocol, dense: DenseModel, data: ImageDataset, method: str,
    levels: Sequence[int], *, done: Callable[[int], bool],
    checkpoint: Callable[[int], Path | None],
) -> tuple[nn.Module, list[int]]:  # fmt: skip
    """The model after an iterative chain's leading ``done`` levels, and the levels left.

    It starts from the latest of those levels whose checkpoint (``checkpoint(level)``, None:
    none kept) exists; done levels past it whose checkpoints are gone (cleaned, lost) are
    recomputed and checkpointed again, never stored again (they are deterministic on CPU), so
    a chain is never stuck behind rows it cannot continue from.
    """
    levels = sorted(levels)
    stored = list(itertools.takewhile(done, levels))
    model, start = dense_model(protocol, dense, data), 0
    for i in range(len(stored) - 1, -1, -1):
        path = checkpoint(stored[i])
        if path is not None and path.exists():
            model, start = load_pruned(path, dense_model(protocol, dense, data)), i + 1
            break
    for level in stored[start:]:
        prune_and_retrain(protocol, model, dense, data, method, level)
        if (path := checkpoint(level)) is not None:
            save_pruned(path, model)
    return model, levels[len(stored) :]


def group_size(protocol: Protocol, device: torch.device, todo: int) -> int:
    """How many one-shot runs of one dense model to retrain together.

    Grouping pays only where an engine trains the group as one: the sparse engine (CPU,
    chains of Linear layers) takes every run at once, vmap (GPU) 16 at a time. Otherwise
    one, so that each run is stored the moment it finishes.
    """
    if protocol.engine == "sequential" or todo <= 1:
        return 1
    if device.type == "cuda":
        return 16 if protocol.engine in ("auto", "vmap") else 1
    if protocol.engine in ("auto", "sparse"):
        probe = build_model(protocol.model, activation=protocol.activation)
        return todo if mlp_chain_or_none(probe) else 1
    return 1


def get_backend(name: str, options: Any = None) -> Backend:
    """The backend called ``name``, made with its ``options`` (Ray: a ``RayOptions``)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {tuple(BACKENDS)}, not {name!r}")
    module, _, cls = BACKENDS[name].partition(":")
    backend: Backend = getattr(importlib.import_module(module), cls)(options)
    return backend


def run_sweep(
    sweep: Sweep,
    db: str | Path,
    *,
    workdir: str | Path | None = None,
    data_dir: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
    log: Callable[[str], Any] = print,
    batch_models: int | None = None,
    backend: str = "local",
    ray_options: Any = None,
) -> SweepStats:
    """Run every missing (protocol, method, level) of ``sweep`` and store each as it finishes.

    ``backend="ray"`` runs the work as tasks on a Ray cluster (``ray_options``, a
    :class:`~lookahead_prune.backends.ray.RayOptions`); see :mod:`.backends.ray`.

    One-shot runs of one dense model are retrained ``batch_models`` at a time by
    :func:`~lookahead_prune.engines.train_many` with the protocol's engine. ``None`` lets
    :func:`group_size` choose: all of them at once where the sparse engine takes them (an
    MLP on CPU), 16 on a GPU (vmap), else one at a time so each run is stored as it ends.
    Several sweeps may share one database (and checkpoint folder): each claims what it
    computes (:mod:`lookahead_prune.claims`), so they split the work, and each returns when
    every run of its grid is stored, by itself or by the others.
    """
    if batch_models is not None and batch_models < 1:
        raise ValueError(f"batch_models must be >= 1, not {batch_models}")
    runner = get_backend(backend, ray_options)
    start = time.perf_counter()
    folder = default_workdir(db, workdir)
    check_writable(folder)  # before hours of training, not after
    stats = SweepStats()
    with RunStore(Path(db)) as store, Claims(Path(db)) as claims:
        bar = progress_bar(sweep.size(), "runs", "run", enabled=progress)
        work = SweepRun(
            sweep, store, claims, folder, bar, stats,
            data_dir=str(data_dir) if data_dir is not None else None, device=device,
            progress=progress, log=log, batch_models=batch_models,
        )  # fmt: skip
        try:  # the bar closes before any error is printed, so the two never share a line
            runner.run(work)
        finally:
            bar.close()
    stats.wall_time = time.perf_counter() - start
    return stats
