"""Grouped sparse retraining: K pruned MLPs trained as one block-diagonal sparse network.

The pruned copies of one dense model that retrain on the same batches differ only in their
weights and masks. Layer ``l`` of the group is the block-diagonal of the K copies' layer
``l`` (the first layer's blocks are stacked, since every copy reads the same input), stored
as its surviving weights only, in CSR order. Per step and layer the work is three sparse
products over the surviving weights:

- forward ``W h``: ``F.embedding_bag(col, h, crow, per_sample_weights=values)``, each output
  unit the weighted sum of the input rows it keeps;
- backward ``W^T g``: the same call over the transposed index;
- the weights' gradient ``(g h^T)`` at surviving entries only: ``torch.sparse.sampled_addmm``.

Activations are feature-major ``[K * units, batch]`` so both products read contiguous rows.
Biases stay dense. Adam (and SGD) act element-wise, so one optimiser over the flat vector of
surviving weights is K fresh optimisers, and pruned weights never exist, so they stay zero.
The result equals K separate runs of :func:`~lookahead_prune.train.train` up to
floating-point summation order (tested to 1e-9 in float64).
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .hookless import refresh_pruned
from .mlp_chain import ChainStep, mlp_chain
from .train import (
    LOSS_WINDOW,
    TrainConfig,
    TrainResult,
    batch_stream,
    make_optimizer,
    set_lr,
)

__all__ = ["density", "sparse_why_not", "train_sparse_group"]


@dataclass
class _Index:
    """CSR index of one group layer and of its transpose, built once per group."""

    rows: int
    cols: int
    crow: Tensor  # [rows + 1]
    col: Tensor  # [nnz], CSR order
    ccol: Tensor  # [cols + 1], offsets of the transposed CSR
    row_t: Tensor  # [nnz], row of each entry in transposed (column-major) order
    perm: Tensor  # [nnz], CSR position of each transposed entry
    pattern: Tensor  # sparse CSR [rows, cols] with zero values: where gradients are wanted

    @classmethod
    def build(
        cls, rows: Tensor, cols: Tensor, shape: tuple[int, int], dtype: torch.dtype
    ) -> _Index:
        """From row-major sorted coordinates of the surviving weights."""
        n_rows, n_cols = shape
        crow = _offsets(rows, n_rows)
        perm = torch.argsort(cols * n_rows + rows)
        ccol = _offsets(cols, n_cols)
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(
                crow, cols, torch.zeros(rows.numel(), dtype=dtype), size=shape
            )
        return cls(n_rows, n_cols, crow, cols, ccol, rows[perm], perm, pattern)


def _offsets(index: Tensor, length: int) -> Tensor:
    """CSR offsets: ``out[i]`` is the number of entries whose index is below ``i``."""
    counts = torch.bincount(index, minlength=length)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


class _SparseLinear(torch.autograd.Function):
    """``W h`` for a CSR-indexed ``W`` given by its surviving ``values``; ``h`` is [in, B]."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, h: Tensor, index: _Index) -> Tensor:
        ctx.save_for_backward(values, h)
        ctx.index = index
        # detached: embedding_bag given inputs that require grad takes a 5x slower path
        # that prepares its own backward, which this function replaces
        return _gather_sum(index.col, h.detach(), index.crow, values.detach(), index.rows)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        values, h = ctx.saved_tensors
        index: _Index = ctx.index
        grad = grad.contiguous()
        grad_values = grad_h = None
        if ctx.needs_input_grad[0]:
            if values.numel():
                product = torch.sparse.sampled_addmm(index.pattern, grad, h.t(), beta=0.0)
                grad_values = product.values()
            else:
                grad_values = values.new_zeros(0)
        if ctx.needs_input_grad[1]:
            transposed = values.index_select(0, index.perm)  # 2.6x faster than values[perm]
            grad_h = _gather_sum(index.row_t, grad, index.ccol, transposed, index.cols)
        return grad_values, grad_h, None


def _gather_sum(index: Tensor, table: Tensor, offsets: Tensor, weights: Tensor, n: int) -> Tensor:
    """Row ``i`` of the result: ``sum_j weights[j] * table[index[j]]`` over bag ``i``."""
    if index.numel() == 0:
        return table.new_zeros(n, table.shape[1])
    return F.embedding_bag(
        index, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True
    )


@dataclass
class _GroupLayer:
    """One Linear layer of the group: the K modules, their index, weights and biases.

    The surviving weights (and biases) are one leaf per schedule class (models retrained
    with the same configuration sit next to each other), so each class has its own
    optimiser group and learning rate; with one class they are one leaf, as they always were.
    """

    modules: list[nn.Linear]
    masks: list[Tensor]  # bool [out, in] per model
    index: _Index
    values: list[Tensor]  # leaves, one per class, [nnz of the class] (CSR order)
    bias: list[Tensor] | None  # leaves, one per class, [K_class * out, 1]
    counts: list[int]  # surviving weights per model, in CSR order

    def weights(self) -> Tensor:
        return self.values[0] if len(self.values) == 1 else torch.cat(self.values)

    def biases(self) -> Tensor | None:
        if self.bias is None:
            return None
        return self.bias[0] if len(self.bias) == 1 else torch.cat(self.bias)


def _weight_and_mask(module: nn.Linear) -> tuple[Tensor, Tensor]:
    """The trainable weight (``weight_orig`` when pruned) and its boolean mask."""
    orig = getattr(module, "weight_orig", None)
    if isinstance(orig, Tensor):
        return orig, module.weight_mask.bool()
    return module.weight, torch.ones_like(module.weight, dtype=torch.bool)


def _group_layer(modules: list[nn.Linear], shared_input: bool, classes: list[int]) -> _GroupLayer:
    """Stack the K copies of one layer into one CSR-indexed group layer.

    ``classes`` counts the consecutive models of each schedule class (they sum to K).
    """
    out_f, in_f = modules[0].out_features, modules[0].in_features
    rows, cols, values, masks, counts = [], [], [], [], []
    for k, module in enumerate(modules):
        weight, mask = _weight_and_mask(module)
        r, c = mask.nonzero(as_tuple=True)  # row-major order
        rows.append(r + k * out_f)
        cols.append(c if shared_input else c + k * in_f)
        values.append(weight.detach()[r, c])
        masks.append(mask)
        counts.append(r.numel())
    k_models = len(modules)
    shape = (k_models * out_f, in_f if shared_input else k_models * in_f)
    flat = torch.cat(values)
    index = _Index.build(torch.cat(rows), torch.cat(cols), shape, flat.dtype)
    bounds = [0, *itertools.accumulate(classes)]
    nnz = [sum(counts[a:b]) for a, b in itertools.pairwise(bounds)]
    leaves = [v.clone().requires_grad_(True) for v in flat.split(nnz)]
    bias = None
    if modules[0].bias is not None:
        stacked = torch.cat([m.bias.detach() for m in modules]).reshape(-1, 1)
        bias = [b.clone().requires_grad_(True) for b in stacked.split([n * out_f for n in classes])]
    return _GroupLayer(modules, masks, index, leaves, bias, counts)


def density(model: nn.Module) -> float:
    """Share of the Linear layers' weights that survive their masks (1.0 if unpruned)."""
    kept = total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            _, mask = _weight_and_mask(module)
            kept += int(mask.sum())
            total += mask.numel()
    return kept / total if total else 1.0


def _signature(model: nn.Module, chain: list[ChainStep]) -> list[tuple[object, ...]]:
    modules = dict(model.named_modules())
    out: list[tuple[object, ...]] = []
    for step in chain:
        if step.kind == "linear":
            m = modules[step.name]
            out.append(("linear", m.in_features, m.out_features, m.bias is not None))
        else:
            out.append(step.signature)
    return out


SCHEDULE_FIELDS = ("steps", "lr", "schedule", "schedule_start", "schedule_steps")
"""What the models of one sparse group may differ in: how long and at which rates they train.
Everything else (batches, optimiser) they share."""


def _configs(config: TrainConfig | Sequence[TrainConfig], n: int) -> list[TrainConfig]:
    configs = [config] * n if isinstance(config, TrainConfig) else list(config)
    if len(configs) != n:
        raise ValueError(f"got {len(configs)} training configurations for {n} models")
    return configs


def _shared(config: TrainConfig) -> TrainConfig:
    """``config`` with its schedule fields at their defaults: what a group's models share."""
    return replace(config, steps=0, lr=1.0, schedule="constant", schedule_start=0,
                   schedule_steps=0)  # fmt: skip


def sparse_why_not(
    models: Sequence[nn.Module], x: Tensor, config: TrainConfig | Sequence[TrainConfig]
) -> str | None:
    """Why the sparse engine cannot train ``models`` on ``x`` as ``config`` says (None: it can).

    ``config`` may be one configuration per model; they may differ only in
    :data:`SCHEDULE_FIELDS`.
    """
    if not models:
        return "no models"
    configs = _configs(config, len(models))
    if len({_shared(c) for c in configs}) > 1:
        return f"the models' configurations differ in more than {SCHEDULE_FIELDS}"
    config = configs[0]
    if config.precision != "fp32":
        return f"precision {config.precision!r}: the sparse kernels run in the weights' dtype"
    try:
        chains = [mlp_chain(m) for m in models]
    except ValueError as error:
        return f"not a chain of Linear layers and element-wise activations: {error}"
    first = _signature(models[0], chains[0])
    if any(_signature(m, c) != first for m, c in zip(models, chains, strict=True)):
        return "the models differ in architecture"
    in_features = first[0][1]
    if math.prod(x.shape[1:]) != in_features:
        return f"inputs have {math.prod(x.shape[1:])} features, the first layer takes {in_features}"
    dtypes = {p.dtype for m in models for p in m.parameters()} | {x.dtype}
    if len(dtypes) != 1:
        return f"mixed dtypes {sorted(map(str, dtypes))}"
    return None


class _Group:
    """The K models as one sparse network: parameters, forward loss and write-back.

    ``classes`` counts the consecutive models that share one schedule (default: all K).
    """

    def __init__(self, models: Sequence[nn.Module], classes: list[int] | None = None) -> None:
        self.models = list(models)
        self.class_sizes = classes or [len(self.models)]
        chain = mlp_chain(self.models[0])
        self.plan: list[tuple[str, Any]] = []
        self.layers: list[_GroupLayer] = []
        for step in chain:
            if step.kind == "linear":
                mods = [dict(m.named_modules())[step.name] for m in self.models]
                layer = _group_layer(mods, not self.layers, self.class_sizes)
                self.layers.append(layer)
                self.plan.append(("linear", layer))
            else:
                self.plan.append(("act", step.act_ or step.act))  # h is ours: in place
        self.classes = self.layers[-1].modules[0].out_features
        self.final: dict[int, list[Tensor]] = {}  # class -> its leaves when its run ended

    def parameters(self, c: int = 0) -> list[Tensor]:
        """The leaves of schedule class ``c``."""
        out = [layer.values[c] for layer in self.layers]
        return out + [layer.bias[c] for layer in self.layers if layer.bias is not None]

    def losses(self, xb: Tensor, yb: Tensor) -> Tensor:
        """Each model's mean cross-entropy on the batch, ``[K]``."""
        h = xb.reshape(xb.shape[0], -1).t().contiguous()  # [features, B]
        for kind, item in self.plan:
            if kind == "linear":
                h = _SparseLinear.apply(item.weights(), h, item.index)
                bias = item.biases()
                if bias is not None:
                    h = h.add_(bias)  # in place: a fresh [K*out, B] buffer costs page faults
            else:
                h = item(h)
        k_models, batch = len(self.models), xb.shape[0]
        logits = h.view(k_models, self.classes, batch)  # cross_entropy's [N, C, d] form
        target = yb.expand(k_models, batch)
        return F.cross_entropy(logits, target, reduction="none").mean(1)

    @torch.no_grad()
    def finish(self, c: int) -> None:
        """Class ``c`` has made its last update: keep its weights as they are now."""
        self.final[c] = [p.detach().clone() for p in self.parameters(c)]

    @torch.no_grad()
    def write_back(self) -> None:
        """Put each model's trained weights and biases back into its own modules."""
        n_layers = len(self.layers)
        ended = [self.final.get(c, self.parameters(c)) for c in range(len(self.class_sizes))]
        for i, layer in enumerate(self.layers):
            chunks = torch.cat([leaves[i] for leaves in ended]).split(layer.counts)
            biases = None
            if layer.bias is not None:
                b = n_layers + sum(lay.bias is not None for lay in self.layers[:i])
                biases = torch.cat([leaves[b] for leaves in ended])
            out_f = layer.modules[0].out_features
            for k, (module, mask, chunk) in enumerate(
                zip(layer.modules, layer.masks, chunks, strict=True)
            ):
                weight, _ = _weight_and_mask(module)
                weight.zero_()
                weight[mask] = chunk  # boolean indexing is row-major, as the CSR order
                if biases is not None:
                    module.bias.copy_(biases[k * out_f : (k + 1) * out_f, 0])
                refresh_pruned(module)


def train_sparse_group(
    models: Sequence[nn.Module],
    x: Tensor,
    y: Tensor,
    config: TrainConfig | Sequence[TrainConfig],
    *,
    progress: Any = None,
) -> list[TrainResult]:
    """Train ``models`` in place as one grouped sparse network; one result per model, in order.

    Each model ends as ``train(model, x, y, its config)`` would leave it: the same batches
    (one stream from the shared seed), a fresh optimiser each, masks fixed and masked weights
    exactly zero. ``config`` is one configuration or one per model; they may differ in
    :data:`SCHEDULE_FIELDS` (fine-tuning, weight and learning-rate rewinding in one group):
    each distinct configuration is one optimiser group with its own learning rates, and a
    model whose run is shorter keeps the weights of its last update. ``progress`` is an
    optional callable ``(steps_done, losses)`` invoked every few steps (the sweep's bar).
    Raises ``ValueError`` when :func:`sparse_why_not` objects.
    """
    reason = sparse_why_not(models, x, config)
    if reason is not None:
        raise ValueError(f"the sparse engine cannot train these models: {reason}")
    configs = _configs(config, len(models))
    kinds = list(dict.fromkeys(configs))  # one schedule class per distinct configuration
    order = sorted(range(len(models)), key=lambda i: kinds.index(configs[i]))  # stable
    sizes = [sum(c == kind for c in configs) for kind in kinds]
    group = _Group([models[i] for i in order], sizes)
    optimizer = make_optimizer(
        [{"params": group.parameters(c), "lr": kind.lr} for c, kind in enumerate(kinds)],
        kinds[0],
    )
    stream = batch_stream(x, y, kinds[0])
    total = max(kind.steps for kind in kinds)
    tail_start = min(kind.steps - min(LOSS_WINDOW, kind.steps) for kind in kinds)
    tail: dict[int, Tensor] = {}
    for c, kind in enumerate(kinds):
        if kind.steps == 0:
            group.finish(c)
    start = time.perf_counter()
    for step in range(1, total + 1):
        set_lr(optimizer, kinds, step)  # one schedule per class, each its own group
        xb, yb = next(stream)
        losses = group.losses(xb, yb)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        if step > tail_start:
            tail[step] = losses.detach()
        for c, kind in enumerate(kinds):
            if step == kind.steps and len(kinds) > 1:
                group.finish(c)
        if progress is not None and (step % 50 == 0 or step == total):
            progress(step, losses)
    wall = time.perf_counter() - start
    group.write_back()
    results: list[TrainResult | None] = [None] * len(models)
    for position, i in enumerate(order):
        steps = configs[i].steps
        window = [tail[s][position] for s in range(steps - min(LOSS_WINDOW, steps) + 1, steps + 1)]
        loss = torch.stack(window).float().mean().item() if window else math.nan
        results[i] = TrainResult(steps, loss, wall, {}, engine="sparse")
    return [r for r in results if r is not None]
