"""Train -> prune -> retrain: the paper's protocol and the rewinding variants around it.

One dense model is trained per (model, dataset, seed) and reused by every method, level and
retraining mode. One-shot pruning prunes each level from that dense model; iterative pruning
applies the levels in turn, retraining between them. Retraining follows Renda et al. (2020),
with T training steps (``train_steps``) and t retraining steps (``retrain_steps``):

- ``finetune``: the surviving weights train t steps at the first training's final rate;
- ``rewind-lr``: the final weights train t steps with the rates of the first training's last
  t steps (``lr_at(T - t + i)``); under a constant rate this is fine-tuning;
- ``rewind-weights``: the weights go back to their values at step k (``rewind_step``) and
  train the rest of the original schedule, T - k steps at ``lr_at(k + i)`` (Renda et al.
  take k = T - t, so the budget is t; late rewinding takes a small k);
- ``lottery``: weight rewinding to k = 0, the initialisation: T steps at ``lr_at(i)``.

For ``rewind-weights`` and ``lottery`` the retraining length is therefore T - k, not a free
choice: a :class:`Protocol` refuses any other ``retrain_steps``, and :func:`for_retrain`
derives it. Every mode starts a fresh optimiser (Adam's moments reset at retraining start).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from .batchnorm import recalibrate_batchnorm
from .data import ImageDataset
from .engines import train_many
from .graph import prunable_layers
from .methods import MethodSpec, resolve
from .models import build_model, dense_layer_names
from .progress import progress_bar
from .protocol import (
    DEFINITIONS,
    PRUNE_MODES,
    RETRAIN_MODES,
    REWINDING,
    Protocol,
    for_retrain,
    retrain_length,
)
from .prune import LayerResult, PruneReport, excluded_layers, prune
from .schedule import kept_fraction, level_keep
from .train import TrainConfig, evaluate, lr_at, train

__all__ = [  # the protocol's names stay importable from here
    "DEFINITIONS",
    "PRUNE_MODES",
    "RETRAIN_MODES",
    "REWINDING",
    "DenseModel",
    "LevelResult",
    "Protocol",
    "dense_model",
    "for_retrain",
    "load_weights_keeping_masks",
    "new_model",
    "prune_and_retrain",
    "prune_and_retrain_many",
    "retrain_config",
    "retrain_length",
    "train_dense",
]

TRAIN_EVAL_EXAMPLES = 10_000  # train accuracy (Appendix B) is measured on this many examples


@dataclass
class DenseModel:
    """A trained dense model with the states retraining may rewind to.

    ``snapshots[k]`` holds the weights after k updates of the first training (0 always).
    """

    state: dict[str, torch.Tensor]
    init: dict[str, torch.Tensor]
    snapshots: dict[int, dict[str, torch.Tensor]]
    test_acc: float
    test_loss: float
    train_acc: float
    wall_time: float

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> DenseModel:
        """From a checkpoint's dict; an older one's ``rewind`` (taken at step 0 under the keys
        it can be found by) becomes ``snapshots[0]``."""
        state = dict(state)
        if "rewind" in state and "snapshots" not in state:
            state["snapshots"] = {0: state.pop("rewind")}
        wanted = {f.name for f in fields(cls)}
        if set(state) != wanted:
            raise ValueError(f"a dense model has keys {sorted(wanted)}, not {sorted(state)}")
        state["snapshots"] = {int(k): v for k, v in state["snapshots"].items()}
        return cls(**state)

    def rewind_to(self, step: int) -> dict[str, torch.Tensor]:
        """The weights after ``step`` updates of the first training."""
        if step not in self.snapshots:
            raise KeyError(
                f"the dense model keeps snapshots at steps {sorted(self.snapshots)}, not {step}"
            )
        return self.snapshots[step]


def new_model(protocol: Protocol, data: ImageDataset) -> nn.Module:
    """The protocol's architecture, sized for ``data``, Glorot-initialised from its seed."""
    c, h, _ = data.input_shape
    return build_model(
        protocol.model,
        in_channels=c,
        image_size=h,
        num_classes=data.num_classes,
        activation=protocol.activation,
        seed=protocol.seed,
    )


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _train_subset(protocol: Protocol, data: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The training examples whose accuracy is reported (the first ones)."""
    n = min(TRAIN_EVAL_EXAMPLES, protocol.eval_examples or TRAIN_EVAL_EXAMPLES, len(data.train_y))
    return data.train_x[:n], data.train_y[:n]


def _score_data(protocol: Protocol, spec: MethodSpec, data: ImageDataset) -> torch.Tensor | None:
    """The first ``score_examples`` training inputs, for methods that measure the model."""
    if spec.entry.data is None:
        return None
    return data.train_x[: protocol.score_examples]


def _test_set(protocol: Protocol, data: ImageDataset) -> tuple[torch.Tensor, torch.Tensor]:
    """The test examples accuracy is measured on: all, or the first ``eval_examples``."""
    n = protocol.eval_examples or len(data.test_y)
    return data.test_x[:n], data.test_y[:n]


def train_dense(
    protocol: Protocol, data: ImageDataset, *, progress: bool = False,
    snapshot_steps: Sequence[int] = (),
) -> DenseModel:  # fmt: skip
    """Train the dense model once; keep its initial weights and those at step 0, at the
    protocol's rewind step and at ``snapshot_steps`` (for weight rewinding)."""
    device = data.train_x.device
    model = new_model(protocol, data).to(device)
    init = _cpu_state(model)
    start = time.perf_counter()
    result = train(
        model,
        data.train_x,
        data.train_y,
        protocol.train_config(protocol.train_steps),
        checkpoints={0, protocol.rewind_key, *snapshot_steps},
        progress=progress,
    )
    test = evaluate(model, *_test_set(protocol, data))
    train_metrics = evaluate(model, *_train_subset(protocol, data))
    return DenseModel(
        state=_cpu_state(model),
        init=init,
        snapshots={
            step: {k: v.cpu() for k, v in snap.items()} for step, snap in result.snapshots.items()
        },
        test_acc=test.accuracy,
        test_loss=test.loss,
        train_acc=train_metrics.accuracy,
        wall_time=time.perf_counter() - start,
    )


def load_weights_keeping_masks(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a dense state dict into a (possibly pruned) model; masks stay as they are.

    A pruned module stores its weight as ``weight_orig``; the dense ``weight`` goes there.
    """
    own = model.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            target = key if key in own else key.removesuffix("weight") + "weight_orig"
            if target not in own:
                raise KeyError(f"state entry {key!r} has no place in the model")
            own[target].copy_(value)


def retrain_config(protocol: Protocol) -> TrainConfig:
    """The training configuration of retraining in ``protocol.retrain`` (Renda et al., 2020).

    T = ``train_steps``, t = ``retrain_steps``, k = ``rewind_step``: ``finetune`` t steps at
    the first training's final rate (constant); ``rewind-lr`` t steps at ``lr_at(T - t + i)``;
    ``rewind-weights`` T - k steps at ``lr_at(k + i)``; ``lottery`` T steps at ``lr_at(i)``.
    """
    T, t = protocol.train_steps, protocol.retrain_steps
    if protocol.retrain == "finetune":
        last_update = max(T - 1, 0)  # cosine is 0 after the last update
        final_lr = lr_at(protocol.train_config(T), last_update)
        return protocol.train_config(t, lr=final_lr, schedule="constant")
    if protocol.retrain == "rewind-lr":
        return protocol.train_config(t, schedule_start=max(T - t, 0), schedule_steps=T)
    k = protocol.rewind_key  # rewind-weights: k; lottery: 0
    return protocol.train_config(T - k, schedule_start=k, schedule_steps=T)


def _retrain_setup(protocol: Protocol, model: nn.Module, dense: DenseModel) -> TrainConfig:
    """Reset weights as the retraining mode says and return its training configuration."""
    if protocol.retrain == "rewind-weights":
        load_weights_keeping_masks(model, dense.rewind_to(protocol.rewind_step))
    elif protocol.retrain == "lottery":
        load_weights_keeping_masks(model, dense.init)
    return retrain_config(protocol)


@dataclass
class LevelResult:
    """Accuracy and loss of one pruned model before and after retraining."""

    keep: float
    keep_layers: dict[str, float]
    test_acc_pruned: float
    test_loss_pruned: float
    train_acc_pruned: float
    test_acc_retrained: float
    test_loss_retrained: float
    train_acc_retrained: float
    engine: str = "sequential"  # what retrained it (never part of the run's key)
    # after re-estimating batch-norm statistics (Protocol.bn_recalibrate); None when not asked
    test_acc_recalibrated: float | None = None
    test_loss_recalibrated: float | None = None
    train_acc_recalibrated: float | None = None


def prune_and_retrain_many(
    protocol: Protocol,
    models: Sequence[nn.Module],
    dense: DenseModel,
    data: ImageDataset,
    jobs: Sequence[tuple[str | MethodSpec, int]],
    *,
    progress: bool = False,
    protocols: Sequence[Protocol] | None = None,
) -> list[LevelResult]:
    """Prune each model in place to its (method, level), evaluate, retrain, evaluate.

    The models are retrained by :func:`~lookahead_prune.engines.train_many` with the
    protocol's engine: together where an engine can take them (what separate runs would
    give, faster), otherwise one after another. ``progress`` shows a bar for the group.
    ``protocols`` gives each model its own protocol (one per retraining mode, sharing the
    dense model); by default every model follows ``protocol``.
    """
    p, q = protocol.pq
    reports, before, before_train, recalibrated = [], [], [], []
    configs = []
    protocols = list(protocols) if protocols is not None else [protocol] * len(models)
    for model, (method, level), own in zip(models, jobs, protocols, strict=True):
        spec = resolve(method)  # once; the spec travels from here
        dense_names = dense_layer_names(model) + tuple(
            excluded_layers(prunable_layers(model), protocol.exclude)
        )
        per_layer = level_keep(model, level, p, q, dense=dense_names)
        keep: float | str | dict[str, float] = per_layer
        layers, exclude = None, protocol.exclude
        if protocol.nm:  # N:M on every layer the level would prune; the level only labels
            keep, exclude = protocol.nm, tuple(dense_names)
        elif protocol.scope == "global":  # the same overall budget, spread by one threshold
            layers = list(per_layer)
            keep = kept_fraction(model, per_layer)
        reports.append(
            prune(
                model,
                spec,
                keep,
                scope=protocol.scope,
                layers=layers,
                bn=protocol.bn,
                graph=protocol.graph,
                exclude=exclude,
                seed=protocol.seed,
                data=_score_data(protocol, spec, data),
            )
        )
        before.append(evaluate(model, *_test_set(protocol, data)))
        before_train.append(evaluate(model, *_train_subset(protocol, data)))
        recalibrated.append(_recalibrated(protocol, model, data))
        configs.append(_retrain_setup(own, model, dense))
    engines = [protocol.engine if protocol.engine != "auto" else "sequential"] * len(models)
    busy = [i for i, c in enumerate(configs) if c.steps]
    if busy:
        steps = max(configs[i].steps for i in busy)
        with _GroupBar(len(busy), steps, enabled=progress) as bar:
            trained = train_many(
                [models[i] for i in busy], data.train_x, data.train_y,
                [configs[i] for i in busy], protocol.engine, progress=bar.update,
            )  # fmt: skip
        for i, r in zip(busy, trained, strict=True):
            engines[i] = r.engine
    results = []
    for model, report, b, bt, recal, engine in zip(
        models, reports, before, before_train, recalibrated, engines, strict=True
    ):
        after = evaluate(model, *_test_set(protocol, data))
        after_train = evaluate(model, *_train_subset(protocol, data))
        results.append(
            LevelResult(
                keep=report.keep_overall,  # stored meaning: dense layers count, whole
                keep_layers={r.name: r.keep for r in _every_layer(model, report)},
                test_acc_pruned=b.accuracy,
                test_loss_pruned=b.loss,
                train_acc_pruned=bt.accuracy,
                test_acc_retrained=after.accuracy,
                test_loss_retrained=after.loss,
                train_acc_retrained=after_train.accuracy,
                engine=engine,
                **recal,
            )
        )
    return results


def _every_layer(model: nn.Module, report: PruneReport) -> list[LayerResult]:
    """Pruned and dense layers of a report in module order (stored ``keep_layers``)."""
    by_name = {r.name: r for r in (*report.layers, *report.excluded)}
    return [by_name[n] for n in prunable_layers(model) if n in by_name]


def _recalibrated(protocol: Protocol, model: nn.Module, data: ImageDataset) -> dict[str, float]:
    """Re-estimate the pruned model's batch-norm statistics (if asked) and measure it again."""
    if not protocol.bn_recalibrate:
        return {}
    if not recalibrate_batchnorm(
        model, data.train_x, batches=protocol.bn_recalibrate, batch_size=protocol.batch_size,
        seed=protocol.seed,
    ):  # fmt: skip
        raise ValueError(f"bn_recalibrate: {protocol.model} has no batch norm to recalibrate")
    test = evaluate(model, *_test_set(protocol, data))
    return {
        "test_acc_recalibrated": test.accuracy,
        "test_loss_recalibrated": test.loss,
        "train_acc_recalibrated": evaluate(model, *_train_subset(protocol, data)).accuracy,
    }


class _GroupBar:
    """A progress bar for one retraining group: steps, models in it, model-steps per second."""

    def __init__(self, models: int, steps: int, *, enabled: bool) -> None:
        self.models = models
        self.bar = progress_bar(steps, f"retrain x{models}", "step", enabled=enabled, leave=False)
        self.start = time.perf_counter()

    def update(self, step: int, losses: torch.Tensor) -> None:
        """Advance to ``step``; called by the engine every few steps."""
        self.bar.update(step - self.bar.n)
        rate = step * self.models / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate:.0f} model-steps/s", refresh=False)

    def __enter__(self) -> _GroupBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def prune_and_retrain(
    protocol: Protocol,
    model: nn.Module,
    dense: DenseModel,
    data: ImageDataset,
    method: str,
    level: int,
) -> LevelResult:
    """Prune ``model`` in place to ``level`` with ``method``, evaluate, retrain, evaluate."""
    return prune_and_retrain_many(protocol, [model], dense, data, [(method, level)])[0]


def dense_model(protocol: Protocol, dense: DenseModel, data: ImageDataset) -> nn.Module:
    """A fresh copy of the trained dense model on the data's device."""
    model = new_model(protocol, data)
    model.load_state_dict(dense.state)
    return model.to(data.train_x.device)
