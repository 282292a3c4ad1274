"""Resumable sweeps: models x datasets x seeds x methods x levels into the results store.

Every finished run is one committed row keyed by the hash of its full configuration, so a sweep
killed at any moment (even ``kill -9``) resumes where it stopped and never repeats or loses a
finished run. Dense models (and, for iterative pruning, each level's retrained model) are
checkpointed atomically beside the database and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from .batchnorm import batchnorm_modules
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .claims import Claims
from .data import DATASETS, ImageDataset, load_dataset
from .data.sources import SOURCES
from .graph import prunable_layers
from .mlp_chain import mlp_chain_or_none
from .models import build_model, dense_layer_names
from .pipeline import (
    RETRAIN_MODES,
    DenseModel,
    LevelResult,
    Protocol,
    dense_model,
    for_retrain,
    prune_and_retrain,
    prune_and_retrain_many,
    train_dense,
)
from .progress import progress_bar
from .prune import canonical_method, excluded_layers
from .schedule import level_keep
from .store import RunStore, code_version, config_hash
from .train import PAPER_STEPS, pick_device

STEP_FIELDS = ("train_steps", "retrain_steps")


def model_steps(model: str) -> tuple[int, int]:
    """The paper's (training, retraining) steps for ``model``; FCN's 50k + 50k for models
    the paper does not train (the official code's 32x32 WRN, models a user registers)."""
    return PAPER_STEPS.get(model, PAPER_STEPS["fcn"])


@dataclass(frozen=True)
class Sweep:
    """A grid of runs sharing one protocol template."""

    protocol: Protocol
    models: Sequence[str]
    datasets: Sequence[str]
    methods: Sequence[str]
    levels: Sequence[int]
    seeds: Sequence[int]
    paper_steps: frozenset[str] = frozenset()
    """Step fields (``train_steps``, ``retrain_steps``) each model takes from the paper
    (:data:`~lookahead_prune.train.PAPER_STEPS`) instead of the template: FCN 50k + 50k,
    Conv-6 30k + 20k, ..., as when a user gives no step counts."""
    retrains: Sequence[str] = ()
    """Retraining modes, each run for every (method, level) from one shared dense model
    (empty: the template's). The template's ``retrain_steps`` is the budget t of
    ``finetune`` and ``rewind-lr``; ``rewind-weights`` (to the template's ``rewind_step``)
    and ``lottery`` retrain the rest of the first training (:func:`~.pipeline.for_retrain`)."""
    snapshots: Sequence[int] = ()
    """Further steps at which dense models keep their weights (for later weight rewinding
    sweeps over the same dense models; never part of a key)."""

    def __post_init__(self) -> None:
        retrains = list(dict.fromkeys(self.retrains or [self.protocol.retrain]))
        unknown_modes = [m for m in retrains if m not in RETRAIN_MODES]
        if unknown_modes:
            raise ValueError(f"unknown retraining mode(s) {unknown_modes}; choose {RETRAIN_MODES}")
        object.__setattr__(self, "retrains", retrains)
        object.__setattr__(self, "snapshots", sorted(set(self.snapshots)))
        unknown_steps = set(self.paper_steps) - set(STEP_FIELDS)
        if unknown_steps:
            raise ValueError(f"paper_steps takes {STEP_FIELDS}, not {sorted(unknown_steps)}")
        methods = [canonical_method(m) for m in self.methods]  # LAP, lap-base -> lap
        object.__setattr__(self, "methods", methods)
        for name in ("models", "datasets", "methods", "levels", "seeds"):  # keep order, no repeats
            object.__setattr__(self, name, list(dict.fromkeys(getattr(self, name))))
        for name in ("models", "datasets", "methods", "levels", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"a sweep needs at least one entry in {name}")
        if any(isinstance(lv, bool) or not isinstance(lv, int) or lv < 0 for lv in self.levels):
            raise ValueError(f"levels must be non-negative integers, got {list(self.levels)}")
        unknown = [d for d in self.datasets if d not in DATASETS]
        if unknown:
            raise ValueError(f"unknown dataset(s) {unknown}; known datasets: {', '.join(DATASETS)}")
        for model in self.models:  # names, exclude patterns and levels, before anything runs
            for dataset in self.datasets:
                self._check_levels(self._for(model, dataset, self.protocol.seed))

    def _check_levels(self, protocol: Protocol) -> None:
        """Refuse a level that leaves some pruned layer with no weight at all.

        Such a run stores ``keep=0``, which no table can show; with ``scope="global"`` the
        budget is shared, so only the overall count must stay positive.
        """
        c, size, _ = SOURCES[protocol.dataset].input_shape
        net = build_model(
            protocol.model, in_channels=c, image_size=size, activation=protocol.activation
        )
        if protocol.bn_recalibrate and not batchnorm_modules(net):  # refused before any training
            raise ValueError(f"bn_recalibrate: {protocol.model} has no batch norm to recalibrate")
        layers = prunable_layers(net)
        dense = dense_layer_names(net) + tuple(excluded_layers(layers, protocol.exclude))
        p, q = protocol.pq
        for level in self.levels if not protocol.nm else ():  # N:M keeps N of M everywhere
            keep = level_keep(net, level, p, q, dense=dense)
            counts = {n: round(k * layers[n].weight.numel()) for n, k in keep.items()}
            empty = [n for n, kept in counts.items() if kept == 0]
            if protocol.scope == "global" and sum(counts.values()) > 0:
                empty = []
            if empty:
                raise ValueError(
                    f"level {level} keeps no weight of {protocol.model} layer(s) {empty} "
                    f"(keep {min(keep[n] for n in empty):.2e}); use a lower level"
                )

    def _for(self, model: str, dataset: str, seed: int) -> Protocol:
        """The template for one (model, dataset, seed), with the paper's steps where asked."""
        steps = dict(zip(STEP_FIELDS, model_steps(model), strict=True))
        given = {name: steps[name] for name in self.paper_steps}
        return replace(self.protocol, model=model, dataset=dataset, seed=seed, **given)

    def families(self) -> list[list[Protocol]]:
        """Per (model, dataset, seed), one protocol per retraining mode: they share one dense
        model (:meth:`Protocol.dense_config` does not depend on the mode)."""
        return [
            [for_retrain(self._for(m, d, s), mode) for mode in self.retrains]
            for m, d, s in itertools.product(self.models, self.datasets, self.seeds)
        ]

    def protocols(self) -> list[Protocol]:
        """Every protocol of the sweep: per (model, dataset, seed), one per retraining mode."""
        return [p for family in self.families() for p in family]

    def snapshot_steps(self, family: Sequence[Protocol]) -> list[int]:
        """The steps a family's dense model keeps: 0, each rewind step, :attr:`snapshots`."""
        steps = {0, *self.snapshots, *(p.rewind_key for p in family)}
        return sorted(s for s in steps if s <= family[0].train_steps)

    def size(self) -> int:
        """Number of pruning runs in the grid."""
        return len(self.protocols()) * len(self.methods) * len(self.levels)


def protocol_lines(sweep: Sweep) -> list[str]:
    """One line per (model, dataset) saying what the sweep trains: steps, optimiser, data."""
    lines, seen = [], set()
    for family in sweep.families():
        p = family[0]
        if (p.model, p.dataset) in seen:
            continue
        seen.add((p.model, p.dataset))
        source = {True: " (the paper's)", False: ""}
        pq = ", ".join(f"{v:g}" for v in p.pq)
        budget = sweep._for(p.model, p.dataset, p.seed).retrain_steps
        retrain = ", ".join(_retrain_words(q, budget) for q in family)
        lines.append(
            f"protocol: {p.model} on {p.dataset}: train {p.train_steps} steps"
            f"{source['train_steps' in sweep.paper_steps]}, retrain {retrain}"
            f"{source['retrain_steps' in sweep.paper_steps]}; {p.optimizer} "
            f"lr {p.learning_rate:g} {p.schedule}, batch {p.batch_size}, augment "
            f"{'on' if p.augment else 'off'}; {p.mode} {p.scope}-scope levels "
            f"{','.join(map(str, sweep.levels))} (p, q = {pq}); seeds "
            f"{','.join(map(str, sweep.seeds))}; methods {','.join(sweep.methods)}"
        )
    return lines


def _retrain_words(p: Protocol, budget: int) -> str:
    """How one mode retrains, e.g. ``47500 (rewind-weights from step 2500: T - k, not 50000)``."""
    words = f"{p.retrain_steps} ({p.retrain}"
    if p.retrain == "rewind-weights":
        words += f" from step {p.rewind_step}"
    if p.retrain_steps != budget:
        words += f": T - k, not {budget}"
    return words + ")"


@dataclass
class SweepStats:
    """What a sweep call did."""

    done: int = 0
    skipped: int = 0
    dense_trained: int = 0
    wall_time: float = 0.0
    keys: list[str] = field(default_factory=list)
    failed: list[tuple[Any, ...]] = field(default_factory=list)  # (config, jobs, error)


def _dense_path(workdir: Path, protocol: Protocol) -> Path:
    return workdir / f"dense-{config_hash(protocol.dense_config())}.pt"


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
    path = _dense_path(workdir, protocol)
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


def _save_pruned(path: Path, model: nn.Module) -> None:
    """A pruned model's state, masks as bool (1 byte per weight instead of 4)."""
    state = {
        k: (v.bool() if k.endswith("_mask") else v).cpu() for k, v in model.state_dict().items()
    }
    save_checkpoint(path, {"state": state})


def _load_pruned(path: Path, model: nn.Module) -> nn.Module:
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


STALE_TEMP_S = 600.0
"""A checkpoint's temporary file older than this is left over from a killed writer."""


def remove_stale_temporaries(workdir: Path) -> int:
    """Delete ``.NAME.*.tmp`` files that a killed checkpoint write left behind; their count.

    Only old ones: a concurrent sweep may be writing a fresh one right now.
    """
    removed = 0
    now = time.time()
    for tmp in workdir.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_TEMP_S:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


def clean_checkpoints(
    db: str | Path, workdir: str | Path | None = None, *, dense: bool = False,
    dry_run: bool = False,
) -> list[Path]:  # fmt: skip
    """Delete checkpoints that no resume can need; the paths removed (or, dry, removable).

    An iterative level's model is needed only to continue its chain: once the next level of
    the same chain is stored, it goes. The last stored level of a chain stays, so a sweep
    with more levels can still continue it. Dense models stay unless ``dense`` (a new sweep
    over the same protocol would retrain them). Stale temporaries always go.
    """
    db = Path(db)
    workdir = Path(workdir) if workdir is not None else db.with_name(db.stem + "-checkpoints")
    if not workdir.is_dir():
        return []
    with RunStore(db, read_only=True) as store:
        configs = [(k, c) for k, c in store.configs() if c.get("mode") == "iterative"]
    chains: dict[str, list[tuple[list[int], str]]] = {}
    for key, config in configs:
        chain = {k: v for k, v in config.items() if k not in ("level", "path")}
        chains.setdefault(repr(sorted(chain.items())), []).append((config.get("path", []), key))
    removable = []
    for members in chains.values():
        for path, key in members:
            extended = any(p[: len(path)] == path and len(p) > len(path) for p, _ in members)
            ckpt = workdir / f"iter-{key}.pt"
            if extended and ckpt.exists():
                removable.append(ckpt)
    if dense:
        removable += sorted(workdir.glob("dense-*.pt"))
    now = time.time()
    removable += [t for t in workdir.glob(".*.tmp") if now - t.stat().st_mtime > STALE_TEMP_S]
    if not dry_run:
        for path in removable:
            path.unlink(missing_ok=True)
    return removable


def run_config(
    protocol: Protocol, method: str, level: int, levels: Sequence[int]
) -> dict[str, Any]:
    """The stored configuration of one run of a sweep over ``levels``.

    An iterative run's result depends on every level pruned before it, so those are part of
    its configuration (and key): ``--levels 2,4`` and ``--levels 1-4`` never share level 4.
    """
    config = protocol.run_config(method, level)
    if protocol.mode == "iterative":
        config["path"] = [lv for lv in sorted(set(levels)) if lv <= level]
    return config


@dataclass
class _Runner:
    """The state one sweep call shares across its protocols: store, claims, progress, counters."""

    store: RunStore
    claims: Claims
    bar: Any
    stats: SweepStats
    device: torch.device
    version: str
    workdir: Path
    batch_models: int | None
    levels: Sequence[int]
    progress: bool = False
    log: Callable[[str], Any] = print
    accounted: set[str] = field(default_factory=set)

    def config(self, protocol: Protocol, method: str, level: int) -> dict[str, Any]:
        """A run's stored configuration; iterative runs also record the levels they went through."""
        return run_config(protocol, method, level, self.levels)

    def key(self, protocol: Protocol, method: str, level: int) -> str:
        return config_hash(self.config(protocol, method, level))

    def record(
        self, protocol: Protocol, dense: DenseModel, job: tuple[str, int], result: LevelResult,
        wall: float,
    ) -> None:  # fmt: skip
        """Store one finished run (one committed transaction) and advance the progress bar."""
        method, level = job
        row = asdict(result) | {
            "dense_test_acc": dense.test_acc,
            "dense_train_acc": dense.train_acc,
            "device": str(self.device),
        }
        config = self.config(protocol, method, level)
        key = config_hash(config)
        self.store.put(config, row, wall_time=wall, code_version=self.version)
        self.stats.done += 1
        self.stats.keys.append(key)
        self.accounted.add(key)
        self.bar.update(1)
        self.bar.set_postfix_str(
            f"{method} L{level} {100 * result.keep:.2f}% acc {100 * result.test_acc_retrained:.2f}%"
        )

    def account(self, keys: Iterable[str]) -> None:
        """Count runs found stored (by an earlier or a concurrent sweep) once each."""
        new = [k for k in dict.fromkeys(keys) if k not in self.accounted and self.store.has(k)]
        self.accounted.update(new)
        self.stats.skipped += len(new)
        self.bar.update(len(new))

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

    def run_protocol(
        self, protocol: Protocol, methods: Sequence[str], levels: Sequence[int],
        data_for: Callable[[Protocol], ImageDataset],
    ) -> bool:  # fmt: skip
        """:meth:`run_family` for one protocol."""
        return self.run_family([protocol], methods, levels, data_for)

    def dense(
        self, protocol: Protocol, data: ImageDataset, snapshot_steps: Sequence[int] = ()
    ) -> DenseModel | None:
        """The dense model, trained here unless another sweep is training it (then None)."""
        wanted = {0, protocol.rewind_key, *snapshot_steps}
        path = _dense_path(self.workdir, protocol)
        if path.exists():
            stored = load_dense(path)
            if wanted <= set(stored.snapshots):
                return stored
        claim = "dense:" + config_hash(protocol.dense_config())
        if not self.claims.take([claim]):
            return None
        try:
            t0 = time.perf_counter()
            dense, trained = get_dense(
                protocol, data, self.workdir, progress=self.progress,
                snapshot_steps=sorted(wanted),
            )  # fmt: skip
        finally:
            self.claims.release([claim])
        if trained:
            self.stats.dense_trained += 1
            self.log(
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
        size = self.batch_models or group_size(protocol, self.device, len(todo))
        for i in range(0, len(todo), size):
            group = todo[i : i + size]
            keys = [self.key(*job) for job in group]
            taken = set(self.claims.take(keys))
            try:
                mine = [
                    job for job, k in zip(group, keys, strict=True)
                    if k in taken and not self.store.has(k)
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
                self.claims.release(taken)

    def _retrain_group(
        self, protocol: Protocol, models: list[nn.Module], dense: DenseModel, data: ImageDataset,
        jobs: list[tuple[str, int]], protocols: Sequence[Protocol] | None = None,
    ) -> tuple[list[LevelResult], float]:  # fmt: skip
        """Prune and retrain ``models`` as one group: their results, each run's time share."""
        start = time.perf_counter()
        results = prune_and_retrain_many(
            protocol, models, dense, data, jobs, progress=self.progress, protocols=protocols
        )
        return results, (time.perf_counter() - start) / len(jobs)

    def _resume_chain(
        self, protocol: Protocol, dense: DenseModel, data: ImageDataset, method: str,
        levels: list[int],
    ) -> nn.Module:  # fmt: skip
        """The model after the chain's stored levels, from the latest checkpoint that exists.

        Levels stored in the database but whose checkpoints are gone (cleaned, lost) are
        recomputed from the one before, without storing them again (they are deterministic
        on CPU); a chain is never stuck behind rows it cannot continue from.
        """
        stored = []
        for level in levels:
            if not self.store.has(self.key(protocol, method, level)):
                break
            stored.append(level)
        model, start = dense_model(protocol, dense, data), 0
        for i in range(len(stored) - 1, -1, -1):
            ckpt = self._ckpt(protocol, method, stored[i])
            if ckpt.exists():
                model, start = _load_pruned(ckpt, dense_model(protocol, dense, data)), i + 1
                break
        for level in stored[start:]:  # checkpoints missing: recompute, do not store again
            prune_and_retrain(protocol, model, dense, data, method, level)
            _save_pruned(self._ckpt(protocol, method, level), model)
        return model

    def _ckpt(self, protocol: Protocol, method: str, level: int) -> Path:
        return self.workdir / f"iter-{self.key(protocol, method, level)}.pt"

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
        levels = sorted(levels)
        missing: dict[str, list[str]] = {}
        for method in dict.fromkeys(methods):
            keys = [self.key(protocol, method, lv) for lv in levels]
            if left := [k for k in keys if not self.store.has(k)]:
                missing[method] = left
        if not missing:
            return
        taken = set(self.claims.take([k for keys in missing.values() for k in keys]))
        mine = [method for method, keys in missing.items() if taken.issuperset(keys)]
        partial = taken.difference(*(missing[m] for m in mine))
        self.claims.release(list(partial))  # chains held in part elsewhere are left to them
        taken -= partial
        try:
            models = {m: self._resume_chain(protocol, dense, data, m, levels) for m in mine}
            for level in levels:
                todo = [m for m in mine if not self.store.has(self.key(protocol, m, level))]
                size = self.batch_models or group_size(protocol, self.device, len(todo))
                for i in range(0, len(todo), size):
                    group = todo[i : i + size]
                    results, wall = self._retrain_group(
                        protocol, [models[m] for m in group], dense, data,
                        [(m, level) for m in group],
                    )  # fmt: skip
                    for method, result in zip(group, results, strict=True):
                        _save_pruned(self._ckpt(protocol, method, level), models[method])
                        self.record(protocol, dense, (method, level), result, wall)
        finally:
            self.claims.release(list(taken))


BACKENDS = ("local", "ray")
POLL_S = 5.0
"""Seconds a sweep waits before looking again at runs another sweep has claimed."""


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
    :class:`~lookahead_prune.ray_backend.RayOptions`); see :mod:`lookahead_prune.ray_backend`.

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
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend == "ray":
        from .ray_backend import RayOptions, run_sweep_ray

        return run_sweep_ray(
            sweep, db, ray_options or RayOptions(), workdir=workdir, data_dir=data_dir,
            device=device, progress=progress, log=log, batch_models=batch_models,
        )  # fmt: skip
    start = time.perf_counter()
    db = Path(db)
    workdir = Path(workdir) if workdir is not None else db.with_name(db.stem + "-checkpoints")
    check_writable(workdir)  # before hours of training, not after
    remove_stale_temporaries(workdir)
    dev = pick_device(device)
    stats = SweepStats()
    datasets: dict[tuple[str, int | None], ImageDataset] = {}

    def data_for(protocol: Protocol) -> ImageDataset:
        data_key = (protocol.dataset, protocol.subset)
        if data_key not in datasets:
            datasets[data_key] = load_dataset(
                protocol.dataset, data_dir, device=dev, subset=protocol.subset
            )
        return datasets[data_key]

    with RunStore(db) as store, Claims(db) as claims:
        bar = progress_bar(sweep.size(), "runs", "run", enabled=progress)
        runner = _Runner(
            store, claims, bar, stats, dev, code_version(), workdir, batch_models,
            sorted(sweep.levels), progress, log,
        )  # fmt: skip
        try:  # the bar closes before any error is printed, so the two never share a line
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
                        log(f"waiting for {claims.held_by_others()} run(s) another sweep holds")
                        told = True
                    time.sleep(POLL_S)
        finally:
            bar.close()
    stats.wall_time = time.perf_counter() - start
    return stats


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


def levels_from(spec: str | Sequence[int]) -> list[int]:
    """Parse ``"2,4"`` or ``"4-10"`` (inclusive range) into a list of levels."""
    if not isinstance(spec, str):
        return [int(v) for v in spec]
    levels: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                levels.extend(range(lo, hi + 1))
            elif part:
                levels.append(int(part))
    except ValueError:
        raise ValueError(f"levels must look like '2,4' or '4-10', not {spec!r}") from None
    if not levels:
        raise ValueError(f"no levels in {spec!r}")
    return levels


def device_name() -> str:
    """A short description of the compute device for result notes."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"
