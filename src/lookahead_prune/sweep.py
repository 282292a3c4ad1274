"""A sweep's grid: models x datasets x seeds x methods x levels, and its configuration.

Every run of the grid is keyed by the hash of its full configuration (:func:`run_config`), so
a sweep killed at any moment (even ``kill -9``) resumes where it stopped and never repeats or
loses a finished run. A grid comes from the library (:class:`Sweep`), from ``lap sweep``'s
flags or from a TOML file (:func:`load_sweep_file`). Who runs it is a backend
(:mod:`lookahead_prune.backends`); where its checkpoints live, :mod:`lookahead_prune.workdir`.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from .batchnorm import batchnorm_modules
from .data import DATASETS
from .data.sources import SOURCES
from .graph import prunable_layers
from .models import build_model, dense_layer_names
from .pipeline import RETRAIN_MODES, Protocol, for_retrain
from .prune import canonical_method, excluded_layers
from .schedule import level_keep
from .store import config_hash
from .train import PAPER_STEPS

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
        return replace(self.protocol, model=model, dataset=dataset, seed=seed, **given)  # type: ignore[arg-type]

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

    def run_keys(self) -> set[str]:
        """The key of every run of the grid."""
        return {
            config_hash(run_config(p, m, lv, self.levels))
            for p in self.protocols()
            for m in self.methods
            for lv in self.levels
        }

    def size(self) -> int:
        """Number of pruning runs in the grid."""
        return len(self.protocols()) * len(self.methods) * len(self.levels)


def template(values: dict[str, Any], models: Sequence[str]) -> tuple[Protocol, frozenset[str]]:
    """A sweep's protocol template from given field values, and the step fields it takes from
    the paper (:attr:`Sweep.paper_steps`): those not given (absent or None).

    The paper's steps are per model and :class:`Sweep` applies them to each; the template
    holds the first model's only so that it is a valid protocol (a rewind step within them).
    """
    paper = frozenset(f for f in STEP_FIELDS if values.get(f) is None)
    steps = dict(zip(STEP_FIELDS, model_steps(str(models[0])), strict=True))
    given = {k: v for k, v in values.items() if k not in paper}
    defaults = {"model": "fcn", "dataset": "mnist"} | {f: steps[f] for f in paper}
    return Protocol(**(defaults | given)), paper


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


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def seeds_from(text: str, flag: str = "--seeds") -> list[int]:
    """Seeds from ``"0,1,2"`` or ``"0-4"``; a bad one names the flag."""
    try:
        return levels_from(text)
    except ValueError:
        raise ValueError(f"{flag} must be integers like '0,1,2' or '0-4', not {text!r}") from None


class SweepFileError(ValueError):
    """A sweep file that cannot describe a sweep: unknown or missing keys."""


SWEEP_KEYS = ("models", "datasets", "methods", "levels", "seeds", "db", "data_dir", "device",
              "backend", "address", "cpus_per_task", "gpus_per_task", "storage",
              "dense_snapshots")  # fmt: skip
"""TOML keys of a sweep besides the :class:`Protocol` fields (see examples/sweep.toml)."""
SETTINGS = ("db", "data_dir", "device", "backend", "address", "cpus_per_task", "gpus_per_task",
            "storage")  # fmt: skip
"""TOML keys that say where and how a sweep runs, not what it computes."""


def _as_list(value: Any, key: str, kind: type = str) -> list[Any]:
    """A TOML value that may be a list, one scalar, or a comma-separated string; each item
    must be a ``kind`` (no bool for int, no float for int), or the key is named in the error."""
    if isinstance(value, str):
        items: list[Any] = _split(value)
        if kind is int:
            return seeds_from(value, flag=key) if key == "seeds" else levels_from(value)
    elif isinstance(value, list | tuple):
        items = list(value)
    elif isinstance(value, dict):
        raise ValueError(f"TOML key {key!r} must be a list or a string, not a table")
    else:
        items = [value]
    for item in items:
        if not isinstance(item, kind) or isinstance(item, bool):
            raise ValueError(
                f"TOML key {key!r} must hold {kind.__name__} values, not {item!r} "
                f"({type(item).__name__})"
            )
    return items


def _load_toml(path: str) -> dict[str, Any]:
    """A sweep file's table, with ``train-steps`` spelt either way (as flags or as fields)."""
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path} is not valid TOML: {error}") from None
    table: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in table:
            raise ValueError(f"{path}: key {key!r} is given twice (with - and _)")
        table[name] = value
    return table


def read_sweep_file(path: str) -> dict[str, Any]:
    """A sweep file's table, its keys checked: the :class:`Protocol` fields and
    :data:`SWEEP_KEYS`, as in examples/sweep.toml; ``methods`` and ``levels`` required."""
    cfg = _load_toml(path)
    known = {f.name for f in fields(Protocol)} | set(SWEEP_KEYS)
    unknown = set(cfg) - known
    if unknown:
        raise SweepFileError(f"{path}: unknown keys {sorted(unknown)}; known {sorted(known)}")
    missing = [k for k in ("methods", "levels") if k not in cfg]
    if missing:
        raise SweepFileError(f"{path}: missing keys {missing}")
    return cfg


def sweep_from_table(cfg: dict[str, Any]) -> tuple[Sweep, dict[str, Any]]:
    """The sweep a checked sweep file's table describes (:func:`read_sweep_file`), and the
    settings it gives (:data:`SETTINGS`: where the results go, which backend)."""
    names = {f.name for f in fields(Protocol)}
    proto_fields = {k: v for k, v in cfg.items() if k in names}
    retrains = _as_list(proto_fields.pop("retrain", "finetune"), "retrain")
    models = _as_list(cfg.get("models", [proto_fields.get("model", "fcn")]), "models")
    protocol, paper = template(proto_fields, models)
    for key in ("db", "data_dir", "device", "backend", "address", "storage"):
        if key in cfg and not isinstance(cfg[key], str):
            raise ValueError(f"TOML key {key!r} must be a string, not {cfg[key]!r}")
    for key in ("cpus_per_task", "gpus_per_task"):
        value = cfg.get(key, 1.0)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"TOML key {key!r} must be a number, not {value!r}")
    sweep = Sweep(
        protocol,
        models,
        _as_list(cfg.get("datasets", [protocol.dataset]), "datasets"),
        _as_list(cfg["methods"], "methods"),
        _as_list(cfg["levels"], "levels", int),
        _as_list(cfg.get("seeds", [0]), "seeds", int),
        paper_steps=paper,
        retrains=retrains,
        snapshots=_as_list(cfg.get("dense_snapshots", []), "dense_snapshots", int),
    )
    return sweep, {k: cfg[k] for k in SETTINGS if k in cfg}


def load_sweep_file(path: str) -> tuple[Sweep, dict[str, Any]]:
    """The sweep a TOML file describes and the settings it gives (see :func:`sweep_from_table`)."""
    return sweep_from_table(read_sweep_file(path))
