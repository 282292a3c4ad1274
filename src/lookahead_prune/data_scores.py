"""Per-layer statistics measured on examples, for the data-dependent scores (LAP-act, OBD).

Each statistic is a :class:`Measure` in :data:`MEASURES`, named by the :class:`Score` that
needs it. They run the model in eval mode under its current masks and leave it as it was.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.func import functional_call, grad, vmap

from .graph.layers import layer_type, weight_name

Data = Tensor | tuple[Tensor, Tensor] | list[Tensor]
"""Examples for a data score: a tensor of inputs, or ``(inputs, labels)``."""

CHUNK = 256  # examples per forward pass when measuring activation rates
GRAD_CHUNK = 32  # examples per vmapped per-example gradient when measuring Hessian diagonals

_RELUS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU)
_RELU_CALLS = {F.relu, torch.relu, torch.relu_, F.relu6, F.leaky_relu, "relu", "relu_"}
_KEEP_SIGN = (nn.modules.batchnorm._BatchNorm, nn.Dropout, nn.Identity)
_KEEP_SIGN_CALLS = {F.dropout, F.batch_norm, "contiguous", operator.pos}


@dataclass(frozen=True)
class Measure:
    """One statistic: ``fn(model, inputs, layer names) -> {layer: per-unit/per-weight tensor}``."""

    fn: Callable[[nn.Module, Tensor, Sequence[str]], dict[str, Tensor]]
    what: str
    scales_rows: bool = False  # True: the statistic rescales weight rows before any score
    classes: bool = False  # True: labels given with the data must index the output's classes


def _inputs(data: Data | None, method: str) -> Tensor:
    """The input tensor of ``data``, or a clear error when the method got none."""
    if data is None:
        raise ValueError(
            f"method {method!r} measures the model on examples: pass data=(x, y) or data=x "
            "(a few thousand training examples are plenty)"
        )
    x = data[0] if isinstance(data, tuple | list) else data
    if not isinstance(x, Tensor) or x.dim() < 2 or len(x) == 0:
        raise ValueError(
            f"data for {method!r} must hold a batch of inputs (a tensor [N, ...] with N >= 1)"
        )
    if (x.is_floating_point() or x.is_complex()) and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(
            f"data for {method!r} holds {bad} NaN or infinite value(s) among {x.numel()}; "
            "data scores need finite examples: drop or repair those first"
        )
    return x


def _probe(model: nn.Module, x: Tensor, method: str) -> Any:
    """The model's output on the first examples: data that does not fit the model fails here,
    in one line naming the layer it does not fit and what that layer expects."""
    names = {id(m): n for n, m in model.named_modules()}
    entered: list[tuple[nn.Module, tuple]] = []

    def enter(module: nn.Module, args: tuple) -> None:
        entered.append((module, args))

    def leave(module: nn.Module, args: tuple, out: Any) -> None:
        entered.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    try:
        with torch.no_grad():
            return model(x[:2])
    except RuntimeError as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if not entered or not names.get(id(entered[-1][0])):  # the model's own code failed
            raise ValueError(
                f"data for {method!r} (shape {tuple(x.shape)}) does not fit "
                f"{type(model).__name__}: {why}"
            ) from None
        module, args = entered[-1]  # the innermost module still running: where it failed
        got = tuple(args[0].shape) if args and isinstance(args[0], Tensor) else "?"
        if isinstance(module, nn.Linear):
            expects = f"expects {module.in_features} input features (last dimension)"
        elif isinstance(module, nn.modules.conv._ConvNd):
            expects = f"expects {module.in_channels} input channels (dimension 1)"
        else:
            expects = "cannot take its input"
        raise ValueError(
            f"data for {method!r} (shape {tuple(x.shape)}) does not fit the model: layer "
            f"'{names[id(module)]}' ({type(module).__name__}) {expects} but gets shape {got} "
            f"for {min(len(x), 2)} example(s) ({why})"
        ) from None
    finally:
        for handle in handles:
            handle.remove()


def _check_labels(data: Data | None, x: Tensor, out: Any, method: str) -> None:
    """Labels given with the data must be one class index of the output per example."""
    if not isinstance(data, tuple | list) or len(data) < 2:
        return
    y = data[1]
    if not isinstance(y, Tensor) or y.dim() != 1 or len(y) != len(x):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(
            f"labels for {method!r} must be a tensor [N] with one class index per example; "
            f"got {shape} for {len(x)} examples"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels for {method!r} must be integer class indices, got {y.dtype}")
    if isinstance(out, Tensor) and out.dim() == 2 and len(y):
        classes = out.shape[1]
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= classes:
            raise ValueError(
                f"labels for {method!r} lie in {low}..{high}, outside the model's {classes} "
                f"classes (0..{classes - 1}); are they the labels of this data and model?"
            )


def _chunks(x: Tensor, size: int) -> Iterator[Tensor]:
    for start in range(0, len(x), size):
        yield x[start : start + size]


def _is(node: fx.Node, modules: dict[str, nn.Module], types: tuple, calls: set) -> bool:
    if node.op == "call_module":
        return isinstance(modules[str(node.target)], types)
    return node.op in ("call_function", "call_method") and node.target in calls


def _activation_node(
    node: fx.Node, modules: dict[str, nn.Module], target: str | None = None
) -> fx.Node | None:
    """The ReLU whose output decides whether the layer's units are active, if one follows.

    Sign-keeping single-user steps (batch norm, dropout) are followed; anything else (an add,
    a sigmoid, the output) means the layer has no ReLU of its own and its rows keep scale 1.
    """
    while len(node.users) == 1:
        (node,) = node.users
        if _is(node, modules, _RELUS, _RELU_CALLS):
            return node
        if not _is(node, modules, _KEEP_SIGN, _KEEP_SIGN_CALLS):
            return None
    return None


class _Counter(fx.Interpreter):
    """Runs the traced model and counts, per watched node, where its output is positive."""

    def __init__(self, gm: fx.GraphModule, watch: dict[fx.Node, tuple[str, int]]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.counts: dict[str, Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.watch:
            name, axis = self.watch[n]
            active = out.detach().gt(0).movedim(axis, -1)
            active = active.reshape(active.shape[0], -1, active.shape[-1])  # [B, positions, U]
            count = active.sum(0, dtype=torch.float64)
            self.counts[name] = self.counts[name] + count if name in self.counts else count
        return out


def activation_scales(model: nn.Module, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """Per output unit of each layer followed by a ReLU: sqrt(fraction of examples on which
    it is active), averaged over positions for convolutions (the official code sums over
    positions, a per-layer constant that changes no ranking). Layers without a ReLU of their
    own (the classifier, a residual branch before its add) are left out: scale 1.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as err:  # torch.fx raises many types; the user needs one line
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"lap-act measures activations through torch.fx, which cannot trace "
            f"{type(model).__name__}: {why}"
        ) from None
    modules = dict(gm.named_modules())
    watch: dict[fx.Node, tuple[str, int]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) in layers:
            relu = _activation_node(node, modules)
            if relu is not None:
                kind = layer_type(modules[str(node.target)])
                watch[relu] = (str(node.target), kind.unit_axis if kind else 1)
    counter = _Counter(gm, watch)
    with torch.no_grad():
        for chunk in _chunks(x, CHUNK):
            counter.run(chunk)
    return {name: (c / len(x)).sqrt().mean(0) for name, c in counter.counts.items()}


def _weight_param(model: nn.Module, name: str) -> str:
    """The parameter that holds layer ``name``'s weight (``weight_orig`` once pruned)."""
    module = model.get_submodule(name)
    attr = weight_name(module)
    attr = f"{attr}_orig" if hasattr(module, f"{attr}_orig") else attr
    return f"{name}.{attr}" if name else attr


def _softmax_roots(logits: Tensor) -> Tensor:
    """[C, B, C]: for each class c, s_c = sqrt(p_c)(e_c - p), so Σ_c s_c s_cᵀ = diag(p) - ppᵀ."""
    if logits.dim() != 2:
        raise ValueError(
            f"obd needs a classifier whose output is [batch, classes]; got {tuple(logits.shape)}"
        )
    probs = logits.detach().softmax(-1)
    eye = torch.eye(probs.shape[1], dtype=probs.dtype, device=probs.device)
    return probs.t().sqrt().unsqueeze(2) * (eye.unsqueeze(1) - probs.unsqueeze(0))


def _linear_diagonals(
    model: nn.Module, x: Tensor, layers: dict[str, nn.Linear]
) -> dict[str, Tensor]:
    """Σ_n Σ_c (g_nc h_nᵀ)² = Σ_c (g_c²)ᵀ(h²) for Linear layers on [batch, features] inputs:
    one backward pass per class instead of per-example gradients (the BackPACK identity)."""
    seen: dict[str, Tensor] = {}
    grads: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            seen[name] = args[0].detach()
            out.register_hook(lambda g: grads.__setitem__(name, g.detach()))

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in layers.items()]
    total = {n: torch.zeros(m.weight.shape, dtype=torch.float64) for n, m in layers.items()}
    try:
        for chunk in _chunks(x, CHUNK):
            with torch.enable_grad():
                logits = model(chunk.requires_grad_(False))
                roots = _softmax_roots(logits)
                if any(seen[n].dim() != 2 for n in layers):
                    raise _NotFlat
                for c in range(len(roots)):
                    torch.autograd.backward(logits, roots[c], retain_graph=c + 1 < len(roots))
                    for n in layers:
                        g2, h2 = grads[n].double().square(), seen[n].double().square()
                        total[n] += g2.t() @ h2
    finally:
        for h in handles:
            h.remove()
    return {n: t * _mask(m) for (n, t), m in zip(total.items(), layers.values(), strict=True)}


class _NotFlat(Exception):
    """A Linear layer sees more than [batch, features] (tokens): per-example gradients then."""


def _mask(module: nn.Module) -> Tensor:
    mask = getattr(module, "weight_mask", None)
    return torch.ones(()) if mask is None else mask.detach().double().cpu()


def _per_example_diagonals(model: nn.Module, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """The same sum by per-example gradients (torch.func): any layer type, slower."""
    names = {layer: _weight_param(model, layer) for layer in layers}
    params = {k: v.detach() for k, v in model.named_parameters()}
    chosen = {p: params[p] for p in names.values()}
    rest = {k: v for k, v in params.items() if k not in chosen}

    def contraction(weights: dict[str, Tensor], xi: Tensor, si: Tensor) -> Tensor:
        logits = functional_call(model, rest | weights, (xi.unsqueeze(0),))
        return (logits.reshape(-1) * si).sum()

    per_example = vmap(grad(contraction), in_dims=(None, 0, 0))
    total = {p: torch.zeros_like(w, dtype=torch.float64) for p, w in chosen.items()}
    for chunk in _chunks(x, GRAD_CHUNK):
        with torch.no_grad():
            roots = _softmax_roots(model(chunk))
        for s in roots:
            for p, g in per_example(chosen, chunk, s).items():
                total[p] += g.square().sum(0, dtype=torch.float64)
    return {layer: total[p].cpu() for layer, p in names.items()}


def hessian_diagonals(model: nn.Module, x: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """Diagonal of the Hessian of the mean cross-entropy w.r.t. each layer's weight.

    Computed as the Gauss-Newton diagonal (1/N) Σ_n Σ_c (∂⟨s_nc, f_n⟩/∂w)², with
    s_nc = sqrt(p_nc)(e_c - p_n) the columns of the softmax Hessian's square root. It equals
    the exact Hessian diagonal for networks linear in each single weight between kinks (ReLU,
    max pooling, eval-mode batch norm: the paper's models) and needs no labels; for curved
    activations it is the Gauss-Newton part, which is never negative. Pruned weights get 0.
    Linear layers on flat inputs use one backward pass per class; the rest per-example
    gradients.
    """
    linear = {n: m for n in layers if type(m := model.get_submodule(n)) is nn.Linear}
    out: dict[str, Tensor] = {}
    if linear:
        try:
            out = _linear_diagonals(model, x, linear)
        except _NotFlat:
            out = {}
    rest = [n for n in layers if n not in out]
    if rest:
        out |= _per_example_diagonals(model, x, rest)
    return {n: out[n] / len(x) for n in layers}


MEASURES: dict[str, Measure] = {
    "activation": Measure(activation_scales, "sqrt(activation rate)", scales_rows=True),
    "hessian": Measure(hessian_diagonals, "Hessian diagonal of the cross-entropy", classes=True),
}
"""Statistics a :class:`~lookahead_prune.scores.Score` can ask for by name."""


def measure(
    name: str, method: str, model: nn.Module, data: Data | None, layers: Sequence[str]
) -> dict[str, Tensor]:
    """Run measure ``name`` for ``method`` on ``data`` in eval mode; the model's modes are kept."""
    x = _inputs(data, method)
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        out = _probe(model, x, method)
        if MEASURES[name].classes:
            _check_labels(data, x, out, method)
        return MEASURES[name].fn(model, x, layers)
    finally:
        for m, mode in modes.items():
            m.train(mode)
