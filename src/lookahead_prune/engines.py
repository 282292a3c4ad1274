"""Train many models at once: one entry point, engines that differ only in how they compute.

- ``sequential``: :func:`~lookahead_prune.train.train` per model, the reference.
- ``vmap``: stacked dense weights, one vectorised step (:mod:`.batched`), for GPUs.
- ``sparse``: the pruned copies as one block-diagonal sparse network (:mod:`.sparse_group`);
  the cost follows the surviving weights, which pays on CPUs for sparse MLPs.

Every engine leaves each model as a separate ``train`` run would (up to summation order) and
returns one :class:`~lookahead_prune.train.TrainResult` per model, in order. An engine is a
runtime choice and never part of a run's key; each result names the engine that made it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from .batched import batch_why_not, train_batched
from .sparse_group import density, sparse_why_not, train_sparse_group
from .train import TrainConfig, TrainResult, train

__all__ = ["ENGINES", "SPARSE_MAX_DENSITY", "Engine", "choose_engine", "train_many"]

SPARSE_MAX_DENSITY = 0.25
"""``auto`` trains a model with the sparse engine on CPU only at or below this share of
surviving weights; denser models train faster with dense masked kernels. Measured by
``benchmarks/group_retrain.py`` (see benchmarks/RESULTS.md)."""

Progress = Callable[[int, Tensor], None]


@dataclass(frozen=True)
class Engine:
    """A way to train models together: ``why_not`` objects (or returns None), ``run`` trains.

    ``mixes``: ``run`` takes one configuration per model (they may differ in their
    schedules, :data:`~lookahead_prune.sparse_group.SCHEDULE_FIELDS`); other engines get
    the models of one configuration at a time.
    """

    name: str
    why_not: Callable[[Sequence[nn.Module], Tensor, Any], str | None]
    run: Callable[..., list[TrainResult]]
    mixes: bool = False


def _sequential(
    models: Sequence[nn.Module], x: Tensor, y: Tensor, config: TrainConfig, *,
    progress: Progress | None = None,
) -> list[TrainResult]:  # fmt: skip
    return [train(model, x, y, config) for model in models]


def _vmap(
    models: Sequence[nn.Module], x: Tensor, y: Tensor, config: TrainConfig, *,
    progress: Progress | None = None,
) -> list[TrainResult]:  # fmt: skip
    return [replace(r, engine="vmap") for r in train_batched(models, x, y, config)]


ENGINES: dict[str, Engine] = {
    "sequential": Engine("sequential", lambda models, x, config: None, _sequential),
    "vmap": Engine("vmap", batch_why_not, _vmap),
    "sparse": Engine("sparse", sparse_why_not, train_sparse_group, mixes=True),
}
ENGINE_CHOICES = ("auto", *ENGINES)


def choose_engine(
    models: Sequence[nn.Module], x: Tensor, config: TrainConfig | Sequence[TrainConfig]
) -> list[str]:
    """The engine ``auto`` gives each model: its name, per model, in order.

    On CUDA, ``vmap`` for all when it can take them; on CPU, ``sparse`` for the models at
    or below :data:`SPARSE_MAX_DENSITY` when it can take them; ``sequential`` otherwise.
    ``config`` is one configuration or one per model.
    """
    configs = _configs(config, len(models))
    names = ["sequential"] * len(models)
    if x.device.type == "cuda":
        if len(models) > 1 and batch_why_not(models, x, configs[0]) is None:
            names = ["vmap"] * len(models)
        return names
    sparse = [i for i, m in enumerate(models) if density(m) <= SPARSE_MAX_DENSITY]
    picked = [configs[i] for i in sparse]
    if sparse and sparse_why_not([models[i] for i in sparse], x, picked) is None:
        for i in sparse:
            names[i] = "sparse"
    return names


def _configs(config: TrainConfig | Sequence[TrainConfig], n: int) -> list[TrainConfig]:
    configs = [config] * n if isinstance(config, TrainConfig) else list(config)
    if len(configs) != n:
        raise ValueError(f"got {len(configs)} training configurations for {n} models")
    return configs


def train_many(
    models: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    config: TrainConfig | Sequence[TrainConfig],
    engine: str = "auto",
    *,
    progress: Progress | None = None,
) -> list[TrainResult]:
    """Train every model in place as ``train(model, x, y, config)`` would; results in order.

    ``config`` is one configuration for all or one per model (retraining modes differ in
    their schedules: :func:`~lookahead_prune.pipeline.retrain_config`). ``engine`` is
    ``"auto"`` (see :func:`choose_engine`) or a name in :data:`ENGINES`; a named engine that
    cannot take the models raises ``ValueError`` saying why. An engine that mixes
    configurations (sparse) trains its models as one group; the others train the models of
    each configuration together. ``progress(step, losses)`` is called every few steps by
    engines that train a group.
    """
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINE_CHOICES}")
    models = list(models)
    if not models:
        return []
    configs = _configs(config, len(models))
    if engine != "auto":
        chosen = ENGINES[engine]
        parts = [configs] if chosen.mixes else [[c] for c in dict.fromkeys(configs)]
        for part in parts:
            these = [m for m, c in zip(models, configs, strict=True) if c in part]
            reason = chosen.why_not(these, x, part if chosen.mixes else part[0])
            if reason is not None:
                raise ValueError(f"engine {engine!r} cannot train these models: {reason}")
        names = [engine] * len(models)
    else:
        names = choose_engine(models, x, configs)
    results: list[TrainResult | None] = [None] * len(models)
    for name in dict.fromkeys(names):
        picked = [i for i, n in enumerate(names) if n == name]
        runner = ENGINES[name]
        kinds = dict.fromkeys(configs[i] for i in picked)
        batches = (
            [picked] if runner.mixes else [[i for i in picked if configs[i] == c] for c in kinds]
        )
        for batch in batches:
            given: Any = [configs[i] for i in batch]
            given = given if runner.mixes else given[0]
            trained = runner.run([models[i] for i in batch], x, y, given, progress=progress)
            for i, result in zip(batch, trained, strict=True):
                results[i] = result
    return [r for r in results if r is not None]
