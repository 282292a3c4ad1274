"""The protocol: every field of a run that is not its method and level, declared once.

A :class:`Protocol` field carries, in its metadata (:func:`option`), everything the project
derives from it: whether it is part of a run's key (all but ``runtime`` ones; ``added`` ones
only when they differ from their default, so older keys stay), whether it shapes the dense
model (``dense``: its checkpoint's key), its ``lap`` flag, help and choices. A new field is
one declaration here plus its use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from .data.sources import SOURCES
from .engines import ENGINE_CHOICES
from .graph import GRAPH_MODES
from .masks import parse_nm
from .models.activations import ACTIVATIONS
from .prune import canonical_method
from .schedule import paper_pq
from .train import OPTIMIZERS, PRECISIONS, SCHEDULES, TrainConfig, paper_lr

RETRAIN_MODES = ("finetune", "rewind-weights", "rewind-lr", "lottery")
REWINDING = ("rewind-weights", "lottery")
"""Modes that retrain the rest of the first training from a rewind step: T - k steps."""
DEFINITIONS = "renda2020"
"""Marks the run keys whose meaning changed when the modes began to follow Renda et al.
exactly (see :meth:`Protocol.run_config`)."""
PRUNE_MODES = ("oneshot", "iterative")


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

RETRAIN_HELP = (
    "how the pruned model retrains (Renda et al., 2020): finetune (t = --retrain-steps steps at "
    "the final rate), rewind-lr (t steps at the rates of training's last t), rewind-weights "
    "(weights of step k = --rewind-step, then training's steps k..T-1: T - k steps), lottery "
    "(rewind-weights to k = 0: T steps); Adam's state starts afresh"
)
BN_RECAL_HELP = (
    "after pruning, re-estimate batch-norm statistics on N training batches and report "
    "accuracy before retraining with and without it (0: off)"
)


def option(
    default: Any = dataclasses.MISSING, *, help: str, dense: bool = False, added: bool = False,
    runtime: bool = False, key_default: Any = dataclasses.MISSING,
    dense_value: Callable[[Protocol], Any] | None = None, choices: Sequence[str] | None = None,
    group: str | None = "pruning", **cli: Any,
) -> Any:  # fmt: skip
    """A :class:`Protocol` field and what the project derives from it.

    ``dense``: it changes the dense model, so it enters the dense model's key
    (``dense_value``: as this value of the protocol, not the field's own; a field that is not
    ``dense`` may still enter the dense key with a fixed value). ``added``: added after
    results were stored; it enters a run's key only when it differs from ``key_default``
    (default: its default). ``runtime``: how the computation runs, never in a key.
    ``choices``: the values it takes (checked, and the flag's choices). ``group``: the ``lap``
    option group whose commands get its flag (``training`` or ``pruning``; None: each command
    declares its own, such as ``--model``). ``cli``: more of the flag: ``flag``, ``dest``,
    ``metavar``, ``help_more`` (help after the paper's step counts).
    """
    meta: dict[str, Any] = {"help": help, "group": group, **cli}
    for name, value in (("dense", dense), ("added", added), ("runtime", runtime)):
        if value:
            meta[name] = True
    if key_default is not dataclasses.MISSING:
        meta["key_default"] = key_default
    if dense_value is not None:
        meta["dense_value"] = dense_value
    if choices is not None:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class Protocol:
    """Everything shared by the runs of one dense model: what to train and how to retrain.

    Each field is declared once, with what the rest of the project needs to know of it (see
    :func:`option`): its ``lap`` flag and help, its choices (checked here), whether it shapes
    the dense model (its cache key) or only how the work runs (no key at all). Every field is
    also a key of a sweep file.
    """

    model: str = option(help="architecture", dense=True, group=None)
    dataset: str = option(help="dataset", dense=True, group=None)
    seed: int = option(0, help="initialisation and batch-order seed", dense=True, group=None,
                       dest="seeds")  # fmt: skip
    activation: str = option("relu", help="nonlinearity of the model", dense=True,
                             choices=tuple(ACTIVATIONS), group="training")  # fmt: skip
    train_steps: int = option(1000, help="steps of dense training", dense=True,
                              group="training")  # fmt: skip
    retrain_steps: int = option(
        1000, help="steps of retraining", help_more="; the budget t of finetune and rewind-lr "
        "(rewind-weights and lottery retrain T - k)",
    )  # fmt: skip
    lr: float | None = option(None, help="learning rate (None: the paper's)", dense=True,
                              dense_value=lambda p: p.learning_rate, group="training")  # fmt: skip
    batch_size: int = option(60, help="examples per step", dense=True, group="training")
    optimizer: str = option("adam", help="optimiser", dense=True, choices=OPTIMIZERS,
                            group="training")  # fmt: skip
    schedule: str = option("constant", help="learning-rate schedule", dense=True,
                           choices=SCHEDULES, group="training")  # fmt: skip
    weight_decay: float = option(0.0, help="L2 weight decay", dense=True, group="training")
    retrain: str = option("finetune", help=RETRAIN_HELP, choices=RETRAIN_MODES)
    rewind_step: int = option(0, help="step k rewind-weights returns to",
                              dense_value=lambda p: 0)  # fmt: skip
    # ^ once the dense key's rewind step; now the checkpoint holds every one needed
    mode: str = option("oneshot", help="prune each level from the dense model, or the levels "
                       "in turn", choices=PRUNE_MODES)  # fmt: skip
    p: float | None = option(None, help="conv keep factor per level (None: paper)")
    q: float | None = option(None, help="linear keep factor per level")
    bn: bool = option(True, help="LAP without Eq. 9's batch-norm factors", flag="--no-bn",
                      dest="no_bn")  # fmt: skip
    graph: str = option("fx", help="neighbours from the traced graph (fx; torch.export where "
                        "fx cannot follow), torch.export only, or module order",
                        choices=GRAPH_MODES)  # fmt: skip
    subset: int | None = option(None, help="use only n training examples", dense=True,
                                group="training")  # fmt: skip
    scope: str = option("layer", help="global: the level's overall fraction under one "
                        "threshold (normalised scores)", choices=("layer", "global"))  # fmt: skip
    exclude: tuple[str, ...] = option(
        (), added=True, help="comma-separated layer names or globs left dense and, with --graph "
        "sequential, out of the chain (the official code's ResNet shortcuts: '*shortcut*')",
    )  # fmt: skip
    eval_examples: int | None = option(
        None, added=True, dense=True, group="training",
        help="measure accuracy on the first n test (and training) examples (None: all)",
    )  # fmt: skip
    precision: str = option("fp32", added=True, dense=True, choices=PRECISIONS,
                            group="training", help="bf16: train under bfloat16 autocast (fast "
                            "on recent GPUs)")  # fmt: skip
    score_examples: int = option(
        10_000, added=True,
        help="training examples that data scores (lap-act, obd) measure the model on",
    )  # fmt: skip
    augment: bool | None = option(
        None, added=True, key_default=False, dense=True, group="training",
        help="random crop (pad 4 black pixels) and flip of training batches (None: the "
        "dataset's default, as the official code: on for CIFAR-10 and Tiny-ImageNet)",
    )  # fmt: skip
    bn_recalibrate: int = option(0, added=True, help=BN_RECAL_HELP, metavar="N")
    nm: str = option(
        "", added=True, metavar="N:M",
        help="N:M masks (e.g. 2:4: the best 2 of every 4 consecutive input weights) on every "
        "layer a level prunes, instead of the level's fraction; the level then only labels "
        "the run, so give one",
    )  # fmt: skip
    channels_last: bool = option(
        False, runtime=True, group="training",
        help="NHWC memory layout for conv nets (cuDNN, oneDNN)",
    )  # fmt: skip
    compile: bool = option(
        False, runtime=True, group="training",
        help="torch.compile the training step, once for all levels",
    )  # fmt: skip
    engine: str = option(
        "auto", runtime=True, choices=ENGINE_CHOICES,
        help="how pruned copies retrain together: sparse (MLPs on CPU: cost follows the "
        "surviving weights), vmap (GPU), sequential (one train() each, the reference); "
        "auto picks per model. Results are the same; never part of a run's key",
    )  # fmt: skip

    def __post_init__(self) -> None:
        for f in fields(self):  # strict types first: "no" is not False, 2.7 is not a level
            check, wanted = _FIELD_TYPES[str(f.type)]
            if not check(getattr(self, f.name)):
                raise ValueError(f"{f.name} must be {wanted}, not {getattr(self, f.name)!r}")
        for f in fields(self):
            allowed = f.metadata.get("choices")
            if allowed is not None and getattr(self, f.name) not in allowed:
                raise ValueError(
                    f"{f.name} must be one of {allowed}, not {getattr(self, f.name)!r}"
                )
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
        if self.nm:
            parse_nm(self.nm)  # a malformed pattern fails before anything runs
            if self.scope != "layer":
                raise ValueError(f"nm={self.nm!r} is per group of weights; use scope 'layer'")
        if self.train_steps < 0 or self.retrain_steps < 0:
            raise ValueError("train_steps and retrain_steps must be >= 0")
        if not 0 <= self.rewind_step <= self.train_steps:
            raise ValueError(
                f"rewind_step must be within the first training (0..{self.train_steps}), "
                f"not {self.rewind_step}"
            )
        length = retrain_length(self.retrain, self.train_steps, self.retrain_steps,
                                self.rewind_key)  # fmt: skip
        if self.retrain_steps != length:
            raise ValueError(
                f"retrain {self.retrain!r} trains the rest of the first training from step "
                f"{self.rewind_key}: train_steps - rewind_step = {length} steps (Renda et al., "
                f"2020), not retrain_steps = {self.retrain_steps}; give {length}"
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
        """The fields that determine the dense model (its cache key): those declared
        ``dense``, each as its ``dense_value`` says (``lr``: the rate in use)."""
        names = [f.name for f in fields(self) if f.metadata.get("dense")]
        config = self._key_fields(names)
        for f in fields(self):
            if "dense_value" in f.metadata:
                config[f.name] = f.metadata["dense_value"](self)
        return config

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
