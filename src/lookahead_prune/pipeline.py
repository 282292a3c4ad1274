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
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from .batchnorm import recalibrate_batchnorm
from .data import ImageDataset
from .data.sources import SOURCES
from .engines import ENGINE_CHOICES, train_many
from .graph import GRAPH_MODES, prunable_layers
from .masks import parse_nm
from .methods import MethodSpec, canonical_method, resolve
from .models import build_model, dense_layer_names
from .models.activations import ACTIVATIONS
from .progress import progress_bar
from .prune import LayerResult, PruneReport, excluded_layers, prune
from .schedule import kept_fraction, level_keep, paper_pq
from .train import (
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    TrainConfig,
    evaluate,
    lr_at,
    paper_lr,
    train,
)

RETRAIN_MODES = ("finetune", "rewind-weights", "rewind-lr", "lottery")
REWINDING = ("rewind-weights", "lottery")
"""Modes that retrain the rest of the first training from a rewind step: T - k steps."""
DEFINITIONS = "renda2020"
"""Marks the run keys whose meaning changed when the modes began to follow Renda et al.
exactly (see :meth:`Protocol.run_config`)."""
PRUNE_MODES = ("oneshot", "iterative")

ADDED = {"added": True}
"""Field metadata: added after results were first stored. Such a field enters a run's key
only when it differs from its default, so configurations stored before it keep their keys."""
RUNTIME = {"runtime": True}
"""Field metadata: how the computation runs (memory layout, compilation), not what it computes;
never part of a run's key."""
TRAIN_EVAL_EXAMPLES = 10_000  # train accuracy (Appendix B) is measured on this many examples


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_FIELD_TYPES: dict[str, tuple[Any, str]] = {
    "str": (lambda v: isinstance(v, str), "a string"),
    "int": (_is_int, "an integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "bool | None": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "int | None": (lambda v: v is None or _is_int(v), "an integer"),
    "float | None": (lambda v: v is None or _is_number(v), "a number"),
    "float": (_is_number, "a number"),
    "tuple[str, ...]": (
        lambda v: (
            isinstance(v, str)
            or (isinstance(v, list | tuple) and all(isinstance(x, str) for x in v))
        ),
        "a list of strings",
    ),
}
"""How each :class:`Protocol` field's annotation is checked (TOML and the library alike)."""


@dataclass(frozen=True)
class Protocol:
    """Everything shared by the runs of one dense model: what to train and how to retrain."""

    model: str
    dataset: str
    seed: int = 0
    activation: str = "relu"
    train_steps: int = 1000
    retrain_steps: int = 1000
    lr: float | None = None  # None: the paper's learning rate for the model
    batch_size: int = 60
    optimizer: str = "adam"
    schedule: str = "constant"
    weight_decay: float = 0.0
    retrain: str = "finetune"
    rewind_step: int = 0
    mode: str = "oneshot"
    p: float | None = None  # None: the paper's (p, q) for the model
    q: float | None = None
    bn: bool = True
    graph: str = "fx"
    subset: int | None = None
    scope: str = "layer"  # "global": one threshold for the level's overall keep fraction
    exclude: tuple[str, ...] = field(default=(), metadata=ADDED)  # layers left dense (globs)
    eval_examples: int | None = field(default=None, metadata=ADDED)  # None: whole test set
    precision: str = field(default="fp32", metadata=ADDED)  # "bf16": autocast in training
    score_examples: int = field(default=10_000, metadata=ADDED)  # lap-act/obd measure on these
    # crop+flip training batches; None: the dataset's default (CIFAR-10, Tiny-ImageNet: on)
    augment: bool | None = field(default=None, metadata=ADDED | {"key_default": False})
    bn_recalibrate: int = field(default=0, metadata=ADDED)  # batches re-estimating BN after pruning
    nm: str = field(default="", metadata=ADDED)  # "2:4": N:M masks instead of the level's fraction
    channels_last: bool = field(default=False, metadata=RUNTIME)
    compile: bool = field(default=False, metadata=RUNTIME)
    engine: str = field(default="auto", metadata=RUNTIME)  # how retraining groups compute

    def __post_init__(self) -> None:
        for f in fields(self):  # strict types first: "no" is not False, 2.7 is not a level
            check, wanted = _FIELD_TYPES[str(f.type)]
            if not check(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be {wanted}, not {getattr(self, f.name)!r}")
        for name, allowed in (("activation", tuple(ACTIVATIONS)), ("graph", GRAPH_MODES),
                              ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):  # fmt: skip
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        for name in ("batch_size", "subset", "score_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, not {value!r}")
        if self.bn_recalibrate < 0:
            raise ValueError(f"bn_recalibrate must be >= 0 batches, not {self.bn_recalibrate}")
        if isinstance(self.exclude, str):
            raise ValueError(f"exclude must be a list of patterns, not the string {self.exclude!r}")
        object.__setattr__(self, "exclude", tuple(sorted(set(self.exclude))))  # order-free key
        if self.augment is None:  # resolved here, so the key says what was done
            source = SOURCES.get(self.dataset)
            object.__setattr__(self, "augment", bool(source and source.augment))
        if self.engine not in ENGINE_CHOICES:
            raise ValueError(f"engine must be one of {ENGINE_CHOICES}, not {self.engine!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.eval_examples is not None and (
            isinstance(self.eval_examples, bool)
            or not isinstance(self.eval_examples, int)
            or self.eval_examples < 1
        ):
            raise ValueError(f"eval_examples must be an integer >= 1, not {self.eval_examples!r}")
        for name in ("lr", "p", "q", "weight_decay"):  # 0 and 0.0 must hash alike
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{name} must be a number, not {value!r}")
                object.__setattr__(self, name, float(value))
        if self.retrain not in RETRAIN_MODES:
            raise ValueError(f"retrain must be one of {RETRAIN_MODES}, not {self.retrain!r}")
        if self.scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', not {self.scope!r}")
        if self.nm:
            parse_nm(self.nm)  # a malformed pattern fails before anything runs
            if self.scope != "layer":
                raise ValueError(f"nm={self.nm!r} is per group of weights; use scope 'layer'")
        if self.mode not in PRUNE_MODES:
            raise ValueError(f"mode must be one of {PRUNE_MODES}, not {self.mode!r}")
        if self.train_steps < 0 or self.retrain_steps < 0:
            raise ValueError("train_steps and retrain_steps must be >= 0")
        if not 0 <= self.rewind_step <= self.train_steps:
            raise ValueError(
                f"rewind_step must be within the first training (0..{self.train_steps}), "
                f"not {self.rewind_step}"
            )
        wanted = retrain_length(self.retrain, self.train_steps, self.retrain_steps,  # type: ignore[assignment]
                                self.rewind_key)  # fmt: skip
        if self.retrain_steps != wanted:
            raise ValueError(
                f"retrain {self.retrain!r} trains the rest of the first training from step "
                f"{self.rewind_key}: train_steps - rewind_step = {wanted} steps (Renda et al., "
                f"2020), not retrain_steps = {self.retrain_steps}; give {wanted}"
            )
        if (self.retrain == "rewind-lr" and self.schedule != "constant"
                and self.retrain_steps > self.train_steps):  # fmt: skip
            raise ValueError(
                f"rewind-lr replays the last retrain_steps learning rates of the first training, "
                f"so retrain_steps ({self.retrain_steps}) must be <= train_steps "
                f"({self.train_steps}) under the {self.schedule!r} schedule"
            )

    @property
    def learning_rate(self) -> float:
        """The learning rate in use: the given one or the paper's."""
        return self.lr if self.lr is not None else paper_lr(self.model)

    @property
    def pq(self) -> tuple[float, float]:
        """(p, q) of the level schedule: the given values or the paper's."""
        p0, q0 = paper_pq(self.model)
        return (self.p if self.p is not None else p0, self.q if self.q is not None else q0)

    def _key_fields(self, names: Sequence[str] | None = None) -> dict[str, Any]:
        """Fields that identify a result: runtime ones never, added ones unless at default."""
        out = {}
        for f in fields(self):
            if f.metadata.get("runtime") or (names is not None and f.name not in names):
                continue
            value = getattr(self, f.name)
            if f.metadata.get("added") and value == f.metadata.get("key_default", f.default):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def dense_config(self) -> dict[str, Any]:
        """The fields that determine the dense model (its cache key)."""
        keys = ("model", "dataset", "seed", "activation", "train_steps", "batch_size",
                "optimizer", "schedule", "weight_decay", "subset", "eval_examples",
                "precision", "augment")  # fmt: skip
        return self._key_fields(keys) | {
            "lr": self.learning_rate,
            "rewind_step": 0,  # once the rewind step; now the checkpoint holds every one needed
        }

    @property
    def rewind_key(self) -> int:
        """The rewind step where it matters (weight rewinding), else 0, for stable keys."""
        return self.rewind_step if self.retrain == "rewind-weights" else 0

    def run_config(self, method: str, level: int) -> dict[str, Any]:
        """The full configuration of one pruning run, as stored and hashed.

        Rewinding modes under a schedule that changes the rate carry ``"definitions":
        "renda2020"``: before, ``rewind-lr``, ``rewind-weights`` and ``lottery`` replayed the
        whole schedule compressed into ``retrain_steps``; now they follow Renda et al. (see
        the module's docstring), so such a stored row has another meaning and must not be
        reused. Under a constant rate their meaning is unchanged (and ``rewind-weights`` /
        ``lottery`` must now retrain T - k steps, as the row says), as is ``finetune``'s
        under any schedule, so those keys stay as they were.
        """
        p, q = self.pq
        marker = {}
        if self.retrain != "finetune" and self.schedule != "constant":
            marker = {"definitions": DEFINITIONS}
        return (
            self._key_fields()
            | {"lr": self.learning_rate, "p": p, "q": q, "rewind_step": self.rewind_key}
            | marker
            | {
                "method": canonical_method(method),  # aliases share one key
                "level": level,
            }
        )

    def train_config(
        self, steps: int, *, lr: float | None = None, schedule: str | None = None,
        schedule_start: int = 0, schedule_steps: int = 0,
    ) -> TrainConfig:  # fmt: skip
        """A :class:`TrainConfig` for ``steps`` steps of this protocol."""
        return TrainConfig(
            steps=steps,
            schedule_start=schedule_start,
            schedule_steps=schedule_steps,
            lr=lr if lr is not None else self.learning_rate,
            batch_size=self.batch_size,
            optimizer=self.optimizer,
            weight_decay=self.weight_decay,
            schedule=schedule or self.schedule,
            seed=self.seed,
            augment=bool(self.augment),
            pad_value=SOURCES[self.dataset].black if self.dataset in SOURCES else (),
            precision=self.precision,
            channels_last=self.channels_last,
            compile=self.compile,
        )


def retrain_length(mode: str, train_steps: int, retrain_steps: int, rewind_step: int) -> int:
    """Steps that retraining in ``mode`` takes: t for ``finetune`` and ``rewind-lr``, the rest
    of the first training (T - k) for ``rewind-weights`` (k = ``rewind_step``) and
    ``lottery`` (k = 0)."""
    if mode == "lottery":
        return train_steps
    if mode == "rewind-weights":
        return train_steps - rewind_step
    return retrain_steps


def for_retrain(template: Protocol, mode: str) -> Protocol:
    """``template`` retrained in ``mode``; ``template.retrain_steps`` is the budget t of
    ``finetune`` and ``rewind-lr``, while ``rewind-weights`` and ``lottery`` take T - k."""
    k = template.rewind_step if mode == "rewind-weights" else 0
    steps = retrain_length(mode, template.train_steps, template.retrain_steps, k)
    return replace(template, retrain=mode, retrain_steps=steps)


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
