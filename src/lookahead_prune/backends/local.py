"""The local backend: every dense training and retraining group in this process.

Several local sweeps (and machines) may share one database and checkpoint folder: each
claims what it computes, so they split the work, and one waits (polling every
:data:`POLL_S` seconds) for what another holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..data import ImageDataset, load_dataset
from ..pipeline import DenseModel, LevelResult, Protocol, dense_model, prune_and_retrain_many
from ..store import config_hash
from ..train import pick_device
from ..workdir import (
    chain_path,
    dense_path,
    get_dense,
    load_dense,
    remove_stale_temporaries,
    save_pruned,
)
from . import SweepRun, group_size, replay_chain, result_row

__all__ = ["POLL_S", "LocalBackend"]

POLL_S = 5.0
"""Seconds a sweep waits before looking again at runs another sweep has claimed."""


class LocalBackend:
    """Run the sweep here; the options are unused (one signature for every backend)."""

    def __init__(self, options: Any = None) -> None:
        self.options = options

    def run(self, work: SweepRun) -> None:
        remove_stale_temporaries(work.workdir)
        dev = pick_device(work.device)
        datasets: dict[tuple[str, int | None], ImageDataset] = {}

        def data_for(protocol: Protocol) -> ImageDataset:
            data_key = (protocol.dataset, protocol.subset)
            if data_key not in datasets:
                datasets[data_key] = load_dataset(
                    protocol.dataset, work.data_dir, device=dev, subset=protocol.subset
                )
            return datasets[data_key]

        sweep = work.sweep
        runner = _Runner(work, dev)
        pending = sweep.families()
        told = False
        while pending:
            pending = [
                f for f in pending
                if not runner.run_family(f, sweep.methods, sweep.levels, data_for,
                                         sweep.snapshot_steps(f))
            ]  # fmt: skip
            if pending:
                if not told:
                    held = work.claims.held_by_others()
                    work.log(f"waiting for {held} run(s) another sweep holds")
                    told = True
                time.sleep(POLL_S)


@dataclass
class _Runner:
    """The state one sweep call shares across its protocols."""

    work: SweepRun
    device: torch.device
    accounted: set[str] = field(default_factory=set)

    def key(self, protocol: Protocol, method: str, level: int) -> str:
        return self.work.key(protocol, method, level)

    def record(
        self, protocol: Protocol, dense: DenseModel, job: tuple[str, int], result: LevelResult,
        wall: float,
    ) -> None:  # fmt: skip
        """Store one finished run (one committed transaction) and advance the progress bar."""
        method, level = job
        row = result_row(result, (dense.test_acc, dense.train_acc), str(self.device))
        self.accounted.add(self.work.store_run(protocol, method, level, row, wall))
        self.work.bar.set_postfix_str(
            f"{method} L{level} {100 * result.keep:.2f}% acc {100 * result.test_acc_retrained:.2f}%"
        )

    def account(self, keys: Iterable[str]) -> None:
        """Count runs found stored (by an earlier or a concurrent sweep) once each."""
        store = self.work.store
        new = [k for k in dict.fromkeys(keys) if k not in self.accounted and store.has(k)]
        self.accounted.update(new)
        self.work.stats.skipped += len(new)
        self.work.bar.update(len(new))

    def run_family(
        self, family: Sequence[Protocol], methods: Sequence[str], levels: Sequence[int],
        data_for: Callable[[Protocol], ImageDataset], snapshot_steps: Sequence[int] = (),
    ) -> bool:  # fmt: skip
        """Run what is missing of one dense model's protocols (one per retraining mode) and
        not claimed by another sweep.

        True when every run of them is stored (by this sweep or another one).
        """
        plan = [(p, m, lv) for p in family for m in methods for lv in sorted(levels)]
        keys = [self.key(*job) for job in plan]
        self.account(keys)
        if all(k in self.accounted for k in keys):
            return True
        first = family[0]
        data = data_for(first)
        dense = self.dense(first, data, snapshot_steps)
        if dense is None:
            return False  # another sweep is training it: come back later
        if first.mode == "oneshot":
            todo = [job for job, k in zip(plan, keys, strict=True) if k not in self.accounted]
            self.oneshot(first, dense, data, todo)
        else:
            for protocol in family:
                self.iterative(protocol, dense, data, methods, levels)
        self.account(keys)
        return all(k in self.accounted for k in keys)

    def dense(
        self, protocol: Protocol, data: ImageDataset, snapshot_steps: Sequence[int] = ()
    ) -> DenseModel | None:
        """The dense model, trained here unless another sweep is training it (then None)."""
        work = self.work
        wanted = {0, protocol.rewind_key, *snapshot_steps}
        path = dense_path(work.workdir, protocol)
        if path.exists():
            stored = load_dense(path)
            if wanted <= set(stored.snapshots):
                return stored
        claim = "dense:" + config_hash(protocol.dense_config())
        if not work.claims.take([claim]):
            return None
        try:
            t0 = time.perf_counter()
            dense, trained = get_dense(
                protocol, data, work.workdir, progress=work.progress,
                snapshot_steps=sorted(wanted),
            )  # fmt: skip
        finally:
            work.claims.release([claim])
        if trained:
            work.stats.dense_trained += 1
            work.log(
                f"dense {protocol.model}/{protocol.dataset} seed {protocol.seed}: "
                f"test acc {100 * dense.test_acc:.2f}% ({time.perf_counter() - t0:.1f}s; "
                f"snapshots at steps {sorted(dense.snapshots)})"
            )
        return dense

    def oneshot(
        self, protocol: Protocol, dense: DenseModel, data: ImageDataset,
        todo: list[tuple[Protocol, str, int]],
    ) -> None:  # fmt: skip
        """Every level pruned from the dense model; retrained in groups (see :func:`group_size`).

        ``todo`` holds (protocol, method, level): the protocols differ only in how they
        retrain, so one group mixes them where the engine can (sparse). Each group's runs are
        claimed first; runs another sweep holds are left to it.
        """
        work = self.work
        size = work.batch_models or group_size(protocol, self.device, len(todo))
        for i in range(0, len(todo), size):
            group = todo[i : i + size]
            keys = [self.key(*job) for job in group]
            taken = set(work.claims.take(keys))
            try:
                mine = [
                    job for job, k in zip(group, keys, strict=True)
                    if k in taken and not work.store.has(k)
                ]  # fmt: skip
                if not mine:
                    continue
                models = [dense_model(protocol, dense, data) for _ in mine]
                results, wall = self._retrain_group(
                    protocol, models, dense, data, [(m, lv) for _, m, lv in mine],
                    protocols=[p for p, _, _ in mine],
                )  # fmt: skip
                for (own, method, level), result in zip(mine, results, strict=True):
                    self.record(own, dense, (method, level), result, wall)
            finally:
                work.claims.release(taken)

    def _retrain_group(
        self, protocol: Protocol, models: list[nn.Module], dense: DenseModel, data: ImageDataset,
        jobs: list[tuple[str, int]], protocols: Sequence[Protocol] | None = None,
    ) -> tuple[list[LevelResult], float]:  # fmt: skip
        """Prune and retrain ``models`` as one group: their results, each run's time share."""
        start = time.perf_counter()
        results = prune_and_retrain_many(
            protocol, models, dense, data, jobs, progress=self.work.progress, protocols=protocols
        )
        return results, (time.perf_counter() - start) / len(jobs)

    def iterative(
        self, protocol: Protocol, dense: DenseModel, data: ImageDataset, methods: Sequence[str],
        levels: Sequence[int],
    ) -> None:  # fmt: skip
        """Levels applied in turn; each level's model is checkpointed so a rerun continues.

        The chains of all methods advance together, one level at a time, and at each level
        their models retrain in groups as one-shot runs do (:func:`group_size`; on CPU the
        sparse engine, which gives what separate chains would). A chain is claimed whole; one
        another sweep holds is left to it.
        """
        work = self.work
        levels = sorted(levels)
        missing: dict[str, list[str]] = {}
        for method in dict.fromkeys(methods):
            keys = [self.key(protocol, method, lv) for lv in levels]
            if left := [k for k in keys if not work.store.has(k)]:
                missing[method] = left
        if not missing:
            return
        taken = set(work.claims.take([k for keys in missing.values() for k in keys]))
        mine = [method for method, keys in missing.items() if taken.issuperset(keys)]
        partial = taken.difference(*(missing[m] for m in mine))
        work.claims.release(list(partial))  # chains held in part elsewhere are left to them
        taken -= partial

        def ckpt(method: str, level: int) -> Any:
            return chain_path(work.workdir, self.key(protocol, method, level))

        try:
            models = {
                m: replay_chain(
                    protocol, dense, data, m, levels,
                    done=lambda lv, m=m: work.store.has(self.key(protocol, m, lv)),  # type: ignore[misc]
                    checkpoint=lambda lv, m=m: ckpt(m, lv),  # type: ignore[misc]
                )[0]
                for m in mine
            }  # fmt: skip
            for level in levels:
                todo = [m for m in mine if not work.store.has(self.key(protocol, m, level))]
                size = work.batch_models or group_size(protocol, self.device, len(todo))
                for i in range(0, len(todo), size):
                    group = todo[i : i + size]
                    results, wall = self._retrain_group(
                        protocol, [models[m] for m in group], dense, data,
                        [(m, level) for m in group],
                    )  # fmt: skip
                    for method, result in zip(group, results, strict=True):
                        save_pruned(ckpt(method, level), models[method])
                        self.record(protocol, dense, (method, level), result, wall)
        finally:
            work.claims.release(list(taken))
