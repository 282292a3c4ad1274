"""Fixed-step training and evaluation on in-memory tensors, with pruning masks kept applied.

The paper (Appendix C) trains every model with Adam, batch size 60, a constant learning
rate and a fixed number of steps; :data:`PAPER_LR` and :data:`PAPER_STEPS` hold its
values. Batches come from :class:`~lookahead_prune.data.BatchStream` (no DataLoader),
and the loop never syncs with the device per step, so its overhead stays small.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import BatchStream, iterate_eval
from .hookless import HooklessMasks, apply_masks, mask_pairs
from .progress import progress_bar

__all__ = [
    "OPTIMIZERS",
    "PAPER_LR",
    "PAPER_STEPS",
    "SCHEDULES",
    "Metrics",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "lr_at",
    "make_optimizer",
    "paper_lr",
    "paper_steps",
    "pick_device",
    "set_lr",
    "train",
]

OPTIMIZERS = ("adam", "sgd")
PRECISIONS = ("fp32", "bf16")
"""``bf16`` runs forward and loss under bfloat16 autocast; weights and optimiser stay fp32."""
SCHEDULES = ("constant", "cosine", "step")
STEP_MILESTONES = (0.5, 0.75)
"""Fractions of the run after which the ``step`` schedule divides the learning rate by 10."""

PAPER_LR: dict[str, float] = {
    "linear": 1.2e-3,
    "fcn": 1.2e-3,
    "conv6": 3e-4,
    "vgg11": 3e-4,
    "vgg16": 3e-4,
    "vgg19": 3e-4,
    "resnet18": 3e-4,
    "vgg19-64": 3e-4,  # the official code's Tiny-ImageNet models (hyperparameter.py)
    "resnet50-64": 3e-4,
    "wrn-16-8-64": 3e-4,
}
PAPER_DEFAULT_LR = 3e-4
"""The paper's rate for every model other than FCN ("all other models")."""

PAPER_STEPS: dict[str, tuple[int, int]] = {
    "linear": (50_000, 50_000),
    "fcn": (50_000, 50_000),
    "conv6": (30_000, 20_000),
    "vgg11": (35_000, 25_000),
    "resnet18": (35_000, 25_000),
    "vgg16": (50_000, 35_000),
    "vgg19": (60_000, 40_000),
    "vgg19-64": (60_000, 40_000),  # the official code's Tiny-ImageNet models (hyperparameter.py)
    "resnet50-64": (60_000, 40_000),
    "wrn-16-8-64": (60_000, 40_000),
}
"""(initial training, retraining) steps per model, Appendix C and the official code."""

LOSS_WINDOW = 100
"""``TrainResult.final_loss`` averages the training loss over this many last steps."""
PROGRESS_EVERY = 50


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one fixed-step training run; the defaults are the paper's recipe.

    ``weight_decay`` is L2 added to the gradient (``torch.optim.Adam``/``SGD`` semantics).
    The learning-rate schedule is that of a run of ``schedule_steps`` updates (0: ``steps``),
    entered at update ``schedule_start``: update ``i`` (0-based) of this run uses
    ``lr_at(config, schedule_start + i)``. Retraining uses this to replay a part of the
    first training's schedule (weight and learning-rate rewinding, Renda et al., 2020).
    """

    steps: int
    lr: float
    batch_size: int = 60
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    augment: bool = False
    pad_value: tuple[float, ...] = ()  # crop padding per channel: the data's black pixel
    seed: int = 0
    eval_every: int = 0
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    schedule_start: int = 0
    schedule_steps: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.steps, int) or self.steps < 0:
            problems.append(f"steps must be an integer >= 0, got {self.steps!r}")
        if not (isinstance(self.lr, int | float) and math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a finite number > 0, got {self.lr!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            problems.append(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if not 0.0 <= self.momentum < 1.0:
            problems.append(f"momentum must lie in [0, 1), got {self.momentum!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.precision not in PRECISIONS:
            problems.append(f"unknown precision {self.precision!r}; choose one of {PRECISIONS}")
        if not isinstance(self.eval_every, int) or self.eval_every < 0:
            problems.append(f"eval_every must be an integer >= 0, got {self.eval_every!r}")
        for name in ("schedule_start", "schedule_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @property
    def horizon(self) -> int:
        """Length of the run the schedule is read from: ``schedule_steps``, else ``steps``."""
        return self.schedule_steps or self.steps

    @classmethod
    def paper(cls, model_name: str, phase: str = "train", **overrides: Any) -> TrainConfig:
        """The paper's recipe for ``model_name``: ``phase`` is ``"train"`` or ``"retrain"``."""
        phases = ("train", "retrain")
        if phase not in phases:
            raise ValueError(f"unknown phase {phase!r}; choose one of {phases}")
        steps = paper_steps(model_name)[phases.index(phase)]
        return cls(**{"steps": steps, "lr": paper_lr(model_name), **overrides})


@dataclass(frozen=True)
class Metrics:
    """Mean cross-entropy loss and top-1 accuracy (a fraction in [0, 1])."""

    loss: float
    accuracy: float


@dataclass
class TrainResult:
    """What a run did: updates made, mean loss of the last steps, seconds, weight snapshots.

    ``snapshots[k]`` is a CPU copy of the state dict after ``k`` updates (0: before any),
    for weight rewinding. ``engine`` names what computed it (see :mod:`.engines`); runs
    trained together report the group's wall time.
    """

    steps: int
    final_loss: float
    wall_time: float
    snapshots: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    engine: str = "sequential"

    @property
    def steps_per_second(self) -> float:
        """Throughput of the run (``nan`` when it took no time or made no step)."""
        return self.steps / self.wall_time if self.steps and self.wall_time > 0 else math.nan


def paper_lr(model_name: str) -> float:
    """Learning rate of Appendix C: 1.2e-3 for FCN (and the linear network), else 3e-4."""
    return PAPER_LR.get(model_name, PAPER_DEFAULT_LR)


def paper_steps(model_name: str) -> tuple[int, int]:
    """(initial training, retraining) step counts of Appendix C for ``model_name``."""
    if model_name not in PAPER_STEPS:
        raise ValueError(
            f"the paper gives no step counts for model {model_name!r}; known: {sorted(PAPER_STEPS)}"
        )
    return PAPER_STEPS[model_name]


def pick_device(requested: str | torch.device | None = None) -> torch.device:
    """The device to train on: CUDA when available unless ``requested`` names one.

    ``None`` or ``"auto"`` picks; an explicit device that this machine lacks raises
    ``ValueError`` rather than failing later inside a kernel.
    """
    if requested is None or requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"not a device: {requested!r} ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {requested!r} requested but CUDA is not available "
                f"(this torch {torch.__version__} build has CUDA {torch.version.cuda})"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {requested!r} requested but only {count} GPU(s) exist")
    elif device.type != "cpu":
        backend = getattr(torch.backends, device.type, None) or getattr(torch, device.type, None)
        is_available = getattr(backend, "is_available", None)
        if is_available is None or not is_available():
            raise ValueError(f"device {requested!r} requested but it is not available here")
    return device


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of update ``step`` (0-based) of a run of ``config.horizon`` updates.

    ``constant`` keeps ``lr``; ``cosine`` decays it to 0 at the horizon; ``step`` divides it
    by 10 for the updates from 50% of the horizon on and again from 75% on: with 50,000
    steps, updates 0..24,999 use ``lr``, 25,000..37,499 ``lr/10``, 37,500..49,999
    ``lr/100``. ``step`` is absolute: :func:`set_lr` adds ``config.schedule_start``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    horizon = config.horizon
    if config.schedule == "constant" or horizon == 0:
        return config.lr
    progress = min(step, horizon) / horizon
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    passed = sum(progress >= milestone for milestone in STEP_MILESTONES)
    return config.lr * 0.1**passed


def batch_stream(x: Tensor, y: Tensor, config: TrainConfig, seed: int | None = None) -> BatchStream:
    """The minibatches a run of ``config`` draws (every engine uses this one stream)."""
    return BatchStream(
        x,
        y,
        config.batch_size,
        seed=config.seed if seed is None else seed,
        augment=config.augment,
        fill=config.pad_value,
    )


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    config: TrainConfig,
    *,
    callback: Callable[[int, nn.Module], None] | None = None,
    checkpoints: Iterable[int] = (),
    progress: bool = False,
) -> TrainResult:
    """Train ``model`` in place for ``config.steps`` minibatch updates of cross-entropy.

    ``x``, ``y`` must already sit on the model's device. Pruning masks stay applied: the
    pruning hooks are taken off for the run (:mod:`lookahead_prune.hookless`), each layer
    reads its ``*_orig`` parameter, whose masked entries are reset to 0 after every update,
    so neither momentum nor weight decay can revive a pruned weight; the kept weights get
    bit-identical updates to training through the hooks. ``callback(step,
    model)`` runs every ``config.eval_every`` steps (never when it is 0), and may even
    prune. On CPU the same seed gives bit-identical weights. Module train/eval modes
    are restored on return.
    """
    device = _model_device(model)
    _check_data(x, y, device, "training")
    wanted = _checkpoint_steps(checkpoints, config.steps)
    stream = batch_stream(x, y, config)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    loss_of = forward_loss(config, model)
    hookless = HooklessMasks(model)
    every = config.eval_every
    tail_start = config.steps - min(LOSS_WINDOW, config.steps)
    tail: list[Tensor] = []
    modes = _module_modes(model)
    bar = progress_bar(config.steps, "train", "step", enabled=progress, leave=False)
    try:
        hookless.engage()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{type(model).__name__} has no trainable parameters")
        optimizer = make_optimizer(trainable, config)
        snapshots = {0: _snapshot(model)} if 0 in wanted else {}
        start = time.perf_counter()
        with _seeded_rng(device, config.seed):
            model.train()
            for step in range(1, config.steps + 1):
                set_lr(optimizer, config, step)
                xb, yb = next(stream)
                if config.channels_last and xb.ndim == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                loss = loss_of(model, xb, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                apply_masks(hookless.pairs)
                if step > tail_start:
                    tail.append(loss.detach())
                if step in wanted:
                    snapshots[step] = _snapshot(model)
                if callback is not None and every and step % every == 0:
                    _clear_masked_state(optimizer, hookless.pairs)  # as hooked training has it
                    hookless.release()  # the callback sees a normal pruned model, may prune
                    callback(step, model)
                    model.train()
                    hookless.engage()  # pruning keeps each Parameter: the optimiser stays valid
                if progress and (step % PROGRESS_EVERY == 0 or step == config.steps):
                    bar.update(step - bar.n)
                    bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        final_loss = torch.stack(tail).float().mean().item() if tail else math.nan
        wall_time = time.perf_counter() - start
        _clear_masked_state(optimizer, hookless.pairs, grads=True)
    finally:
        hookless.release()
        bar.close()
        _restore_modes(modes)
    return TrainResult(config.steps, final_loss, wall_time, snapshots)


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = 1000) -> Metrics:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)`` in eval mode, without grads.

    Batch norm uses its running statistics; every module's train/eval mode is restored.
    Only one device sync happens, at the end.
    """
    device = _model_device(model)
    _check_data(x, y, device, "evaluation")
    if x.shape[0] == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    modes = _module_modes(model)
    model.eval()
    try:
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        for xb, yb in iterate_eval(x, y, batch_size):
            logits = model(xb)
            loss_sum += F.cross_entropy(logits, yb, reduction="sum").double()
            correct += (logits.argmax(dim=1) == yb).sum()
    finally:
        _restore_modes(modes)
    count = x.shape[0]
    return Metrics(loss=loss_sum.item() / count, accuracy=correct.item() / count)


def _model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (training needs at least one)."""
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError(f"{type(model).__name__} has no parameters")
    return parameter.device


def _check_data(x: Tensor, y: Tensor, device: torch.device, purpose: str) -> None:
    """Refuse data on another device than the model, or labels that are not class indices."""
    for name, tensor in (("x", x), ("y", y)):
        if tensor.device != device:
            raise ValueError(
                f"{purpose} data {name} is on {tensor.device} but the model is on {device}; "
                "move both to one device first"
            )
    if y.dtype != torch.int64 or y.ndim != 1:
        raise ValueError(f"y must be int64 class indices [N], got {y.dtype} {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]}")


def _checkpoint_steps(checkpoints: Iterable[int], steps: int) -> frozenset[int]:
    """Validate snapshot steps: each an integer in ``0..steps``."""
    wanted = frozenset(int(step) for step in checkpoints)
    outside = sorted(step for step in wanted if not 0 <= step <= steps)
    if outside:
        raise ValueError(f"checkpoint steps {outside} lie outside 0..{steps}")
    return wanted


def make_optimizer(
    params: list[Any], config: TrainConfig, *, fused: bool = True
) -> torch.optim.Optimizer:
    """Adam or SGD over ``params`` (tensors or parameter groups) as ``config`` says: its
    ``optimizer``, ``lr``, ``weight_decay`` and ``momentum``.

    Every engine builds its optimiser here, so all of them update weights alike; ``fused``
    kernels are used where this torch has them unless ``fused=False`` (the vmap engine: the
    fused kernels over stacked tensors drift from separate runs, see :mod:`.batched`).
    """
    if not params:
        raise ValueError("no trainable parameters")
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if config.optimizer == "adam":
        factory: Callable[..., torch.optim.Optimizer] = torch.optim.Adam
    else:
        factory = torch.optim.SGD
        kwargs["momentum"] = config.momentum
    if not fused:
        return factory(params, **kwargs)
    try:  # fused Adam/SGD run ~1.5x faster on CPU; older torch only fuses on CUDA
        return factory(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return factory(params, **kwargs)


def set_lr(
    optimizer: torch.optim.Optimizer, config: TrainConfig | Sequence[TrainConfig], step: int
) -> None:
    """Set the learning rate of update ``step`` (1-based) of this run from the schedule, entered
    at ``config.schedule_start``; constant: no-op.

    ``config`` may be one configuration per parameter group (the sparse engine trains models
    with different schedules as one optimiser's groups); a group whose run is over
    (``step > config.steps``) keeps its rate.
    """
    if isinstance(config, TrainConfig):
        if config.schedule != "constant":
            for group in optimizer.param_groups:
                group["lr"] = lr_at(config, config.schedule_start + step - 1)
        return
    for group, own in zip(optimizer.param_groups, config, strict=True):
        if own.schedule != "constant" and step <= own.steps:
            group["lr"] = lr_at(own, own.schedule_start + step - 1)


LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def forward_loss(config: TrainConfig, model: nn.Module | None = None) -> LossFn:
    """``loss(model, x, y)``: cross-entropy of the logits, in bf16 autocast and compiled if asked.

    One compiled function serves every model of an architecture, so retraining at a new
    sparsity level reuses the compiled graph instead of compiling again.
    """
    dtype = torch.bfloat16 if config.precision == "bf16" else None
    if not config.compile:
        return _EAGER[dtype]
    if model is None:
        raise ValueError("forward_loss(config, model) needs the model when config.compile")
    # one compiled function per variant, so that many architectures in one sweep never
    # exhaust dynamo's per-function recompile limit (8) and fall back to eager
    key = (dtype, type(model), config.channels_last, bool(mask_pairs(model)))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_EAGER[dtype])
    return _COMPILED[key]


def _loss_fp32(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x), y)


def _loss_bf16(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        logits = model(x)
    return F.cross_entropy(logits.float(), y)


_EAGER: dict[torch.dtype | None, LossFn] = {None: _loss_fp32, torch.bfloat16: _loss_bf16}
_COMPILED: dict[tuple[Any, ...], LossFn] = {}


def _snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A CPU copy of the state dict that later updates cannot change."""
    return {key: value.detach().to("cpu", copy=True) for key, value in model.state_dict().items()}


def _module_modes(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    """Each submodule with its current ``training`` flag, to restore later."""
    return [(module, module.training) for module in model.modules()]


def _restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put back the flags recorded by :func:`_module_modes` (submodules may differ)."""
    for module, training in modes:
        module.training = training


@contextmanager
def _seeded_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Seed the global RNG of ``device`` (dropout and the like), restoring the caller's after."""
    cuda = device.type == "cuda"
    index = device.index if device.index is not None or not cuda else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[index] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


@torch.no_grad()
def _clear_masked_state(
    optimizer: torch.optim.Optimizer, pairs: list[tuple[Tensor, Tensor]], *, grads: bool = False
) -> None:
    """Zero the optimiser moments (and, with ``grads``, the gradients) of masked entries.

    Training through the pruning hooks leaves them exact zeros; hook-free training lets them
    fill, which matters only if a callback later unmasks weights or someone reads ``.grad``.
    """
    for orig, mask in pairs:
        for value in optimizer.state.get(orig, {}).values():
            if isinstance(value, Tensor) and value.shape == orig.shape:
                value.mul_(mask)
        if grads and orig.grad is not None:
            orig.grad.mul_(mask)
