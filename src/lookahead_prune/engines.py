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
    """A way to train models together: ``why_not`` objects (or returns None), ``run`` trains."""

    name: str
    why_not: Callable[[Sequence[nn.Module], Tensor, TrainConfig], str | None]
    run: Callable[..., list[TrainResult]]


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
    "sparse": Engine("sparse", sparse_why_not, train_sparse_group),
}
ENGINE_CHOICES = ("auto", *ENGINES)


def choose_engine(models: Sequence[nn.Module], x: Tensor, config: TrainConfig) -> list[str]:
    """The engine ``auto`` gives each model: its name, per model, in order.

    On CUDA, ``vmap`` for all when it can take them; on CPU, ``sparse`` for the models at
    or below :data:`SPARSE_MAX_DENSITY` when it can take them; ``sequential`` otherwise.
    """
    names = ["sequential"] * len(models)
    if x.device.type == "cuda":
        if len(models) > 1 and batch_why_not(models, x, config) is None:
            names = ["vmap"] * len(models)
        return names
    sparse = [i for i, m in enumerate(models) if density(m) <= SPARSE_MAX_DENSITY]
    if sparse and sparse_why_not([models[i] for i in sparse], x, config) is None:
        for i in sparse:
            names[i] = "sparse"
    return names


def train_many(
    models: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    engine: str = "auto",
    *,
    progress: Progress | None = None,
) -> list[TrainResult]:
    """Train every model in place as ``train(model, x, y, config)`` would; results in order.

    ``engine`` is ``"auto"`` (see :func:`choose_engine`) or a name in :data:`ENGINES`; a named
    engine that cannot take the models raises ``ValueError`` saying why. ``progress(step,
    losses)`` is called every few steps by engines that train a group.
    """
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {ENGINE_CHOICES}")
    models = list(models)
    if not models:
        return []
    if engine != "auto":
        reason = ENGINES[engine].why_not(models, x, config)
        if reason is not None:
            raise ValueError(f"engine {engine!r} cannot train these models: {reason}")
        names = [engine] * len(models)
    else:
        names = choose_engine(models, x, config)
    results: list[TrainResult | None] = [None] * len(models)
    for name in dict.fromkeys(names):
        picked = [i for i, n in enumerate(names) if n == name]
        trained = ENGINES[name].run([models[i] for i in picked], x, y, config, progress=progress)
        for i, result in zip(picked, trained, strict=True):
            results[i] = result
    return [r for r in results if r is not None]
