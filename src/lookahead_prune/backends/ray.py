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

The driver takes the sweep's claims (:class:`~lookahead_prune.backends.SweepRun`) as the
local backend does, so Ray and local sweeps on one database split the work, and it counts as
done only the runs it stored itself. An ``address`` where nothing answers is one line
(:class:`ClusterUnreachable`) before any database is opened.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..checkpoint import save_checkpoint
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
from .local import POLL_S

__all__ = [
    "CRASH_ENV",
    "PROBE_S",
    "ClusterUnreachable",
    "RayBackend",
    "RayOptions",
    "probe_address",
    "require_ray",
]

PROBE_S = 5.0
"""Seconds to wait for a TCP answer at ``--address`` before saying no cluster is there."""

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
    keys: list[str]  # the claims it holds: its runs' keys, or its dense model's


class RayBackend:
    """Run the sweep as Ray tasks (:class:`RayOptions`); the driver alone writes the store.

    Tasks that kept failing are listed in ``stats.failed`` (their configuration and error).
    """

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()
        self.ray = require_ray()  # one line on how to install it, before anything runs
        if not self.ray.is_initialized():
            probe_address(self.options.address)  # one line, before any database is opened

    def run(self, work: SweepRun) -> None:
        ray, options = self.ray, self.options
        if options.storage is not None:
            check_writable(Path(options.storage))
        storage = str(Path(options.storage).resolve()) if options.storage is not None else None
        if not ray.is_initialized():
            try:
                ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
            except ConnectionError as error:
                raise ClusterUnreachable(options.address, error) from None
        resources = {"num_cpus": options.cpus_per_task, "num_gpus": options.gpus_per_task}
        remote = {"max_retries": options.max_retries, "retry_exceptions": False, **resources}
        _Driver(
            work, ray, ray.remote(**remote)(dense_task), ray.remote(**remote)(group_task), storage
        ).drive()


class ClusterUnreachable(ValueError, ConnectionError):
    """No Ray cluster answered at the given address (one line, for the command line)."""

    def __init__(self, address: str | None, why: BaseException | str) -> None:
        reason = _short(why) if isinstance(why, BaseException) else why
        super().__init__(
            f"no Ray cluster answered at --address {address} ({reason}); start one there "
            "(ray start --head --port PORT) or omit --address to run a local Ray"
        )


def probe_address(address: str | None, timeout: float = PROBE_S) -> None:
    """Fail in one line, at once, when nothing listens at a ``host:port`` cluster address
    (``ray.init`` itself retries for minutes); ``None`` and ``auto`` are left to Ray."""
    if address is None or address == "auto":
        return
    host, sep, port = address.rpartition("://")[2].rpartition(":")
    if not sep or not port.isdigit():
        return  # not host:port: Ray says what it makes of it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as error:
        raise ClusterUnreachable(
            address, error.strerror or str(error) or type(error).__name__
        ) from None


class _Driver:
    """One Ray sweep's driver: claims runs, submits their tasks, stores what comes back.

    Runs are claimed (:mod:`lookahead_prune.claims`) before their tasks are submitted and
    released once stored, so a Ray sweep and other sweeps on one database split the work; runs
    another sweep holds are looked at again every :data:`~.local.POLL_S` seconds until they
    are stored (by it, or by this sweep once its claims go stale). The dense models' accuracies
    stay in memory, so no checkpoint is read again while the sweep runs.
    """

    def __init__(
        self, work: SweepRun, ray: Any, dense_remote: Any, group_remote: Any, storage: str | None
    ) -> None:
        self.work, self.ray, self.storage = work, ray, storage
        self.dense_remote, self.group_remote = dense_remote, group_remote
        self.pending: dict[Any, _Pending] = {}
        self.accounted: set[str] = set()  # stored (by this sweep or another) and counted
        self.held: set[str] = set()  # claimed by this sweep, in a task
        self.given_up: set[str] = set()  # in a task that kept failing
        self.dense_accs: dict[str, tuple[float, float]] = {}  # dense hash -> (test, train)
        self.dense_refs: dict[tuple[str, int], Any] = {}  # (dense hash, rewind step) -> ref
        self.failed = 0

    def drive(self) -> None:
        work = self.work
        waiting = list(work.sweep.protocols())
        told = False
        while True:
            waiting = [p for p in waiting if not self.submit(p)]
            if not self.pending and not waiting:
                return
            if not self.pending:  # only runs other sweeps hold are left
                if not told:
                    work.log(
                        f"waiting for {work.claims.held_by_others()} run(s) another sweep holds"
                    )
                    told = True
                time.sleep(POLL_S)
                continue
            work.bar.set_postfix_str(
                f"{len(self.pending)} tasks left, {self.failed} failed", refresh=False
            )
            ready, _ = self.ray.wait(
                list(self.pending), num_returns=1, timeout=POLL_S if waiting else None
            )
            for ref in ready:
                self.finish(ref)

    def account(self, keys: list[str]) -> None:
        """Count runs found stored (earlier, or by a concurrent sweep) once each; runs in this
        sweep's tasks are counted when their task comes back."""
        store, skip = self.work.store, self.accounted | self.held
        new = [k for k in dict.fromkeys(keys) if k not in skip and store.has(k)]
        self.accounted.update(new)
        self.work.stats.skipped += len(new)
        self.work.bar.update(len(new))

    def submit(self, protocol: Protocol) -> bool:
        """Claim and submit what is left of ``protocol``; True when nothing is left to claim."""
        work, claims = self.work, self.work.claims
        plan = [(m, lv) for m in work.sweep.methods for lv in work.levels]
        keys = {job: work.key(protocol, *job) for job in plan}
        self.account(list(keys.values()))
        settled = self.accounted | self.held | self.given_up
        todo = [job for job in plan if keys[job] not in settled]
        if not todo:
            return True
        if protocol.mode == "iterative":  # a chain is claimed whole, as the local backend does
            chains = [[j for j in todo if j[0] == m] for m in dict.fromkeys(m for m, _ in todo)]
        else:
            chains = [[job] for job in todo]
        taken = set(claims.take([keys[job] for job in todo]))
        mine = [
            job for chain in chains if taken.issuperset(keys[j] for j in chain) for job in chain
        ]
        mine = [job for job in mine if not work.store.has(keys[job])]
        claims.release(list(taken - {keys[job] for job in mine}))
        if not mine:
            return False
        dense_ref = self.dense_for(protocol)
        if dense_ref is None:  # another sweep is training this dense model: later
            claims.release([keys[job] for job in mine])
            return False
        self.held.update(keys[job] for job in mine)
        for jobs in _groups(protocol, mine, work.batch_models):
            ref = self.group_remote.remote(
                protocol, dense_ref, jobs, work.levels, work.data_dir, work.device, self.storage
            )
            self.pending[ref] = _Pending("group", protocol, jobs, [keys[j] for j in jobs])
        return len(mine) == len(todo)

    def dense_for(self, protocol: Protocol) -> Any:
        """The object ref of ``protocol``'s dense model: the driver's checkpoint, a dense task
        submitted already or a new one (None: another sweep is training it)."""
        dense_hash = config_hash(protocol.dense_config())
        ref_key = (dense_hash, protocol.rewind_key)
        if (ref := self.dense_refs.get(ref_key)) is not None:
            return ref
        local = dense_path(self.work.workdir, protocol)
        kept = load_dense(local) if self.storage is None and local.exists() else None
        if kept is not None and protocol.rewind_key in kept.snapshots:  # an earlier run's
            self.dense_accs[dense_hash] = (kept.test_acc, kept.train_acc)
            ref = self.ray.put(asdict(kept))
        else:
            claim = "dense:" + dense_hash
            if not self.work.claims.take([claim]):
                return None
            ref = self.dense_remote.remote(
                protocol, self.work.data_dir, self.work.device, self.storage
            )
            self.pending[ref] = _Pending("dense", protocol, [], [claim])
        self.dense_refs[ref_key] = ref
        return ref

    def finish(self, ref: Any) -> None:
        """Store (or report) one finished task and release its claims."""
        work, stats = self.work, self.work.stats
        task = self.pending.pop(ref)
        dense_hash = config_hash(task.protocol.dense_config())
        try:
            try:
                value = self.ray.get(ref)
            except Exception as error:  # a task that kept failing: report, go on
                self.failed += 1
                stats.failed.append((task.protocol.dense_config(), task.jobs, _short(error)))
                work.log(f"task failed: {task.protocol.model} seed {task.protocol.seed} "
                         f"{task.jobs or 'dense'}: {_short(error)}")  # fmt: skip
                if task.kind == "group":
                    self.given_up.update(task.keys)
                    work.bar.update(len(task.jobs))
                return
            if task.kind == "dense":
                self.dense_accs[dense_hash] = (value["test_acc"], value["train_acc"])
                if self.storage is None:
                    save_checkpoint(dense_path(work.workdir, task.protocol), value)
                    stats.dense_trained += 1
                return
            accs = self.dense_accs.get(dense_hash)
            if accs is None:  # its dense task is not through wait() yet: from Ray's memory
                dense = self.ray.get(self.dense_refs[(dense_hash, task.protocol.rewind_key)])
                accs = self.dense_accs[dense_hash] = (dense["test_acc"], dense["train_acc"])
            for method, level, result, wall in value:
                row = result_row(result, accs, "ray")
                self.accounted.add(work.store_run(task.protocol, method, level, row, wall))
        finally:
            self.held.difference_update(task.keys)
            work.claims.release(task.keys)


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


def _short(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
