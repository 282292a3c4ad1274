"""The Ray backend: dense trainings and retraining groups as tasks on a Ray cluster.

The unit of work is the local backend's: one dense training per protocol, then the groups
of pruned copies that retrain from it (one-shot), or one chain per method (iterative). A
group task takes the dense task's result as an argument, so Ray schedules it when the dense
model exists; nothing polls. Workers return results to the driver, and only the driver
writes the results database, so SQLite needs no network file system. Dense models and
iterative checkpoints live under ``storage`` when every node can read it (a shared file
system), otherwise they travel through Ray's object store and the driver keeps a copy of
each dense model beside its database for the next run. A task whose worker dies is retried
(``max_retries``); a task that raises is reported with its configuration and the rest of the
sweep goes on. Killing the driver and running the same command again continues.

The driver is given the sweep's claims (:class:`~lookahead_prune.backends.SweepRun`) but
does not take them yet: a Ray sweep assumes it is the only sweep on its database.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import ImageDataset, load_dataset
from ..pipeline import (
    DenseModel,
    Protocol,
    dense_model,
    prune_and_retrain,
    prune_and_retrain_many,
    train_dense,
)
from ..store import config_hash
from ..sweep import run_config
from ..train import pick_device
from ..workdir import chain_path, check_writable, dense_path, get_dense, load_dense, save_pruned
from . import SweepRun, group_size, replay_chain, result_row

__all__ = ["CRASH_ENV", "RayBackend", "RayOptions", "require_ray"]

CRASH_ENV = "LAP_RAY_CRASH_FILE"
"""Fault injection for tests: a file path. While the file says ``crash``, the next group task
to read it rewrites it to ``crashed`` and kills its own worker process, as a lost machine
would; Ray then retries the task."""


def require_ray() -> Any:
    """The ``ray`` module, or a ``ValueError`` that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError(
            "the Ray backend needs Ray: pip install 'lookahead-prune[ray]' (or pip install ray)"
        ) from None
    return ray


@dataclass(frozen=True)
class RayOptions:
    """Where the cluster is and what each task asks of it."""

    address: str | None = None  # None: start a local Ray, "auto": the running cluster
    cpus_per_task: float = 1.0
    gpus_per_task: float = 0.0
    storage: str | None = None  # a folder every node can read and write, or None
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.cpus_per_task <= 0 or self.gpus_per_task < 0:
            raise ValueError("cpus_per_task must be > 0 and gpus_per_task >= 0")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, not {self.max_retries}")


_DATA: dict[tuple[Any, ...], ImageDataset] = {}


def _data(protocol: Protocol, data_dir: str | None, device: str | None) -> ImageDataset:
    """The protocol's dataset in this worker, loaded once per process."""
    key = (protocol.dataset, protocol.subset, data_dir, device)
    if key not in _DATA:
        _DATA[key] = load_dataset(
            protocol.dataset, data_dir, device=pick_device(device), subset=protocol.subset
        )
    return _DATA[key]


def dense_task(
    protocol: Protocol, data_dir: str | None, device: str | None, storage: str | None
) -> dict[str, Any]:
    """Train (or, from ``storage``, load) one dense model; its fields as a dict."""
    data = _data(protocol, data_dir, device)
    if storage is not None:
        dense, _ = get_dense(protocol, data, Path(storage))
    else:
        dense = train_dense(protocol, data)
    return asdict(dense)


def group_task(
    protocol: Protocol, dense_state: dict[str, Any], jobs: list[tuple[str, int]],
    levels: list[int], data_dir: str | None, device: str | None, storage: str | None,
) -> list[tuple[str, int, dict[str, Any], float]]:  # fmt: skip
    """Retrain one group (one-shot) or chains (iterative); ``(method, level, result, wall)``."""
    _maybe_crash()
    dense = DenseModel.from_state(dense_state)
    data = _data(protocol, data_dir, device)
    if protocol.mode == "oneshot":
        start = time.perf_counter()
        models = [dense_model(protocol, dense, data) for _ in jobs]
        results = prune_and_retrain_many(protocol, models, dense, data, jobs)
        wall = (time.perf_counter() - start) / len(jobs)
        return [(m, lv, asdict(r), wall) for (m, lv), r in zip(jobs, results, strict=True)]
    out = []
    wanted = set(jobs)
    for method in dict.fromkeys(m for m, _ in jobs):

        def ckpt(level: int, method: str = method) -> Path | None:
            key = config_hash(run_config(protocol, method, level, levels))
            return chain_path(Path(storage), key) if storage else None

        model, left = replay_chain(
            protocol, dense, data, method, levels,
            done=lambda lv, m=method: (m, lv) not in wanted,  # type: ignore[misc]
            checkpoint=ckpt,
        )  # fmt: skip
        for level in left:
            start = time.perf_counter()
            result = prune_and_retrain(protocol, model, dense, data, method, level)
            if (path := ckpt(level)) is not None:
                save_pruned(path, model)
            if (method, level) in wanted:
                out.append((method, level, asdict(result), time.perf_counter() - start))
    return out


def _maybe_crash() -> None:
    """Die here if the test harness armed :data:`CRASH_ENV` (see there)."""
    path = os.environ.get(CRASH_ENV)
    if path and os.path.exists(path) and Path(path).read_text().strip() == "crash":
        Path(path).write_text("crashed\n")
        os._exit(1)


@dataclass
class _Pending:
    """What a submitted task stands for."""

    kind: str  # "dense" or "group"
    protocol: Protocol
    jobs: list[tuple[str, int]]


class RayBackend:
    """Run the sweep as Ray tasks (:class:`RayOptions`); the driver alone writes the store.

    Tasks that kept failing are listed in ``stats.failed`` (their configuration and error).
    """

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        self.ray = require_ray()  # one line on how to install it, before anything runs

    def run(self, work: SweepRun) -> None:
        ray, options = self.ray, self.options
        if options.storage is not None:
            check_writable(Path(options.storage))
        storage = str(Path(options.storage).resolve()) if options.storage is not None else None
        if not ray.is_initialized():
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
        resources = {"num_cpus": options.cpus_per_task, "num_gpus": options.gpus_per_task}
        remote = {"max_retries": options.max_retries, "retry_exceptions": False, **resources}
        dense_remote = ray.remote(**remote)(dense_task)
        group_remote = ray.remote(**remote)(group_task)
        stats, store, bar, levels = work.stats, work.store, work.bar, work.levels
        data_dir, device = work.data_dir, work.device
        pending: dict[Any, _Pending] = {}
        dense_accs: dict[str, tuple[float, float]] = {}
        failed = 0
        for protocol in work.sweep.protocols():
            plan = [(m, lv) for m in work.sweep.methods for lv in levels]
            todo = [j for j in plan if not store.has(work.key(protocol, *j))]
            stats.skipped += len(plan) - len(todo)
            bar.update(len(plan) - len(todo))
            if not todo:
                continue
            local = dense_path(work.workdir, protocol)
            kept = load_dense(local) if storage is None and local.exists() else None
            if kept is not None and protocol.rewind_key in kept.snapshots:  # earlier run's
                dense_ref = ray.put(asdict(kept))
            else:
                dense_ref = dense_remote.remote(protocol, data_dir, device, storage)
                pending[dense_ref] = _Pending("dense", protocol, [])
            for jobs in _groups(protocol, todo, work.batch_models):
                ref = group_remote.remote(
                    protocol, dense_ref, jobs, levels, data_dir, device, storage
                )
                pending[ref] = _Pending("group", protocol, jobs)
        while pending:
            bar.set_postfix_str(f"{len(pending)} tasks left, {failed} failed", refresh=False)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ref)
            try:
                value = ray.get(ref)
            except Exception as error:  # a task that kept failing: report, go on
                failed += 1
                stats.failed.append((task.protocol.dense_config(), task.jobs, _short(error)))
                work.log(f"task failed: {task.protocol.model} seed {task.protocol.seed} "
                         f"{task.jobs or 'dense'}: {_short(error)}")  # fmt: skip
                if task.kind == "group":
                    bar.update(len(task.jobs))
                continue
            if task.kind == "dense":
                dense_accs[config_hash(task.protocol.dense_config())] = (
                    value["test_acc"],
                    value["train_acc"],
                )
                if storage is None:
                    save_checkpoint(dense_path(work.workdir, task.protocol), value)
                    stats.dense_trained += 1
                continue
            for method, level, result, wall in value:
                accs = dense_accs.get(config_hash(task.protocol.dense_config()))
                if accs is None:  # the dense model came from the driver's own checkpoint
                    accs = _dense_accs(task.protocol, work.workdir, storage)
                row = result_row(result, accs, "ray")
                work.store_run(task.protocol, method, level, row, wall)


def _groups(
    protocol: Protocol, todo: list[tuple[str, int]], batch_models: int | None
) -> list[list[tuple[str, int]]]:
    """The retraining tasks of one protocol: groups (one-shot) or one chain per method."""
    if protocol.mode == "iterative":
        methods = dict.fromkeys(m for m, _ in todo)
        return [[j for j in todo if j[0] == m] for m in methods]
    device = pick_device("cpu")  # workers decide their device; grouping follows the CPU rule
    size = batch_models or group_size(protocol, device, len(todo))
    return [todo[i : i + size] for i in range(0, len(todo), size)]


def _dense_accs(protocol: Protocol, workdir: Path, storage: str | None) -> tuple[float, float]:
    """Dense accuracies from the checkpoint the dense model came from."""
    folder = Path(storage) if storage else workdir
    state = load_checkpoint(dense_path(folder, protocol))
    return state["test_acc"], state["train_acc"]


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
