"""Find each prunable layer's neighbours (producers, consumers, norms) from the model's graph.

LAP scores a weight by the weights next to it, so we need, for every prunable layer, which
layers write the units it reads (producers) and which layers read the units it writes
(consumers), with the unit-to-unit map between them. The package is split by concept:

- :mod:`.layers`: prunable layer types (Linear, Conv, ConvTranspose, Hugging Face Conv1D),
  where their units live and how their weight reads as ``[out, in/groups, ...]``;
- :mod:`.capture`: the model as a graph with shapes, by ``torch.fx`` or, where fx cannot
  follow it (Hugging Face models, ``nn.TransformerEncoder``), by ``torch.export``;
- :mod:`.rules`: what each op does to units, one rule object per kind of op;
- :mod:`.walks`: walks from every layer through the rules to its neighbours.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from .capture import (
    BATCHNORM_TYPES,
    NORM_TYPES,
    Captured,
    ExampleInputs,
    capture_export,
    capture_fx,
    normalize_inputs,
)
from .layers import (
    LAYER_TYPES,
    LayerType,
    canonical,
    from_canonical,
    layer_type,
    prunable_layers,
    weight_name,
)
from .rules import DEFAULT_RULES, RuleSet, Unsupported, register_passthrough, rule_for
from .types import GraphError, Layer, LayerGraph, Link, UnitScale
from .walks import analyse, branch_points, new_layer

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

__all__ = [
    "BATCHNORM_TYPES",
    "GRAPH_MODES",
    "LAYER_TYPES",
    "NORM_TYPES",
    "PRUNABLE_TYPES",
    "GraphError",
    "Layer",
    "LayerGraph",
    "LayerType",
    "Link",
    "RuleSet",
    "UnitScale",
    "build_graph",
    "canonical",
    "check_graph_mode",
    "from_canonical",
    "layer_type",
    "layers_only",
    "neighbour_names",
    "prunable_layers",
    "register_passthrough",
    "weight_name",
]

GRAPH_MODES = ("fx", "export", "sequential")


def check_graph_mode(mode: str) -> None:
    """Refuse a graph mode other than ``fx`` (traced; export where fx cannot), ``export``
    or ``sequential`` (module order)."""
    if mode not in GRAPH_MODES:
        raise ValueError(
            f"graph must be 'fx' or 'sequential' (or 'export' to capture with torch.export), "
            f"not {mode!r}"
        )


def _no_layers(model: nn.Module) -> ValueError:
    return ValueError(
        f"{type(model).__name__} has no prunable layers (nn.Linear, nn.Conv1d/2d/3d, "
        "nn.ConvTranspose1d/2d/3d, Hugging Face Conv1D)."
    )


def layers_only(model: nn.Module) -> LayerGraph:
    """Prunable layers without neighbours, for scores that never look at them (MP, RP, LAMP)."""
    if not prunable_layers(model):
        raise _no_layers(model)
    return LayerGraph({n: new_layer(n, m) for n, m in prunable_layers(model).items()}, "none")


def _capture(model: nn.Module, mode: str, example_inputs: ExampleInputs) -> Captured:
    """fx first (exact for the paper's models); torch.export where fx fails or hides layers."""
    fx_error = None
    if mode == "fx":
        try:
            cap, hidden = capture_fx(model, example_inputs)
            if not hidden:
                return cap
            fx_error = f"torch.fx keeps {hidden[0]!r} inside a module it cannot see into"
        except GraphError as exc:
            fx_error = str(exc)
    try:
        return capture_export(model, example_inputs)
    except GraphError as exc:
        first = f"{fx_error}; " if fx_error else ""
        raise GraphError(
            f"cannot capture {type(model).__name__}: {first}{exc}. Pass example_inputs=(a "
            "batch of real inputs,) (a tuple or a dict of keyword arguments), make forward() "
            "free of data-dependent control flow, or pass graph='sequential' to chain the "
            "prunable layers in module order."
        ) from None


def _sequential_graph(
    model: nn.Module, skip: frozenset[str] = frozenset(), example_inputs: ExampleInputs = None
) -> LayerGraph:
    """The official code's view: prunable layers chained in module order.

    Layers in ``skip`` are left out of the chain altogether, as the official code's plain
    (unmasked) shortcut convolutions are. The batch norm of a layer is the first one after
    it in module order (before the next chained layer) with as many features as the layer
    has outputs.
    """
    _refuse_branches(model, example_inputs)
    layers = {n: new_layer(n, m) for n, m in prunable_layers(model).items() if n not in skip}
    if not layers:
        raise GraphError("graph='sequential': every prunable layer is skipped; nothing to chain.")
    names = list(layers)
    order = [n for n, _ in model.named_modules()]
    mods = dict(model.named_modules())
    for i, name in enumerate(names):
        start = order.index(name)
        stop = order.index(names[i + 1]) if i + 1 < len(names) else len(order)
        for other in order[start + 1 : stop]:
            mod = mods[other]
            if isinstance(mod, BATCHNORM_TYPES) and mod.num_features == layers[name].out_units:
                layers[name].batchnorm = mod
                break
    for i, name in enumerate(names):
        layer = layers[name]
        own_bn = _bn_path(layer.batchnorm, torch.arange(layer.out_units))
        if i == 0:
            layer.in_open += 1
        else:
            prev = layers[names[i - 1]]
            if layer.in_units % prev.out_units:
                raise GraphError(
                    f"graph='sequential': '{name}' has {layer.in_units} input units, not a "
                    f"multiple of the {prev.out_units} outputs of '{prev.name}'."
                )
            idx = torch.arange(layer.in_units) // (layer.in_units // prev.out_units)
            # backward semantics: the bn unit feeding each input unit; forward: identity map
            layer.producers.append(Link(prev.name, name, idx, _bn_path(prev.batchnorm, idx)))
            prev_bn = _bn_path(prev.batchnorm, torch.arange(prev.out_units))
            prev.consumers.append(Link(prev.name, name, idx, prev_bn))
        if i == len(names) - 1:
            if own_bn:
                layer.out_open_bn.append((torch.arange(layer.out_units), own_bn))
            else:
                layer.out_open += 1
    return LayerGraph(layers, "sequential", capture="sequential")


def _refuse_branches(model: nn.Module, example_inputs: ExampleInputs) -> None:
    """Module order cannot express gates (SE, GLU), concatenation or attention: refuse them.

    Residual adds stay allowed: the official code chains ResNets this way (shortcuts left
    out), and the paper's ResNet results are reproduced with it. Models that can be captured
    neither by fx nor by torch.export are chained as before (that is what the mode is for).
    """
    try:
        cx = _capture(model, "fx", example_inputs)
    except GraphError:
        return
    found = branch_points(cx, model)
    if found:
        raise GraphError(
            f"graph='sequential' cannot chain {type(model).__name__}: {found[0]}, which module "
            "order cannot express; use graph='fx'."
        )


def _bn_path(bn: nn.Module | None, index: torch.Tensor) -> tuple:
    return () if bn is None else ((bn, index),)


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, LayerGraph]] = weakref.WeakKeyDictionary()


def _signature(
    model: nn.Module,
    mode: str,
    example_inputs: ExampleInputs,
    skip: frozenset[str],
    strict: bool,
    rules: RuleSet,
) -> Any:
    mods = tuple((n, id(m), type(m)) for n, m in model.named_modules())
    args, kwargs = normalize_inputs(example_inputs)
    shapes = tuple(
        (k, tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v))
        for k, v in [*enumerate(args), *kwargs.items()]
    )
    return (mode, mods, example_inputs is None, shapes, skip, strict, id(rules), rules.version)


def build_graph(
    model: nn.Module,
    mode: str = "fx",
    example_inputs: ExampleInputs = None,
    *,
    skip: Iterable[str] = (),
    strict: bool = True,
    rules: RuleSet = DEFAULT_RULES,
) -> LayerGraph:
    """Capture ``model`` and find every prunable layer's neighbours, or chain its layers in
    module order (``mode='sequential'``).

    ``mode='fx'`` traces with torch.fx and falls back to torch.export (from
    ``example_inputs``, or a guessed input) where fx fails or hides layers inside a module it
    keeps whole; ``'export'`` uses torch.export directly. ``strict=False`` gives a layer whose
    neighbours cannot be followed a factor of 1 on that side and records it in
    ``graph.approximated``. ``skip`` names layers to leave out of the sequential chain.
    ``rules`` is the op rule set (``DEFAULT_RULES``, which ``register_passthrough`` edits, or
    a ``RuleSet`` of your own). The result is cached per model object until its modules, the
    inputs' shapes or the rules change.
    """
    check_graph_mode(mode)
    if not prunable_layers(model):
        raise _no_layers(model)
    skipped = frozenset(skip) if mode == "sequential" else frozenset()
    sig = _signature(model, mode, example_inputs, skipped, strict, rules)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == sig:
        return cached[1]
    if mode == "sequential":
        graph = _sequential_graph(model, skipped, example_inputs)
    else:
        captured = _capture(model, mode, example_inputs)
        try:
            graph = _analyse(captured, model, example_inputs, rules, strict)
        except GraphError as err:
            if example_inputs is not None:
                raise
            raise GraphError(
                f"{err} (shapes came from a guessed input; if the model takes another shape, "
                "pass example_inputs=(a real batch,))"
            ) from None
        graph.mode = mode
    _CACHE[model] = (sig, graph)
    return graph


def _analyse(
    cx: Captured, model: nn.Module, example_inputs: ExampleInputs, rules: RuleSet, strict: bool
) -> LayerGraph:
    """The fx graph's layers and links; where they cannot be followed (or only approximately)
    and fx kept functions whole that no rule covers, torch.export's, which sees into them."""
    opaque = cx.how == "fx" and bool(_opaque_functions(cx, rules))
    graph, fx_error = None, None
    try:
        graph = analyse(cx, model, rules, strict)
    except GraphError as exc:
        if not opaque:
            raise
        fx_error = exc
    if opaque and (graph is None or graph.approximated):
        with contextlib.suppress(GraphError):
            other = analyse(capture_export(model, example_inputs), model, rules, strict)
            if not other.approximated:
                return other
    if graph is None:
        raise fx_error
    return graph


def _opaque_functions(cx: Captured, rules: RuleSet) -> list[fx.Node]:
    """Calls of Python functions that torch.fx keeps whole (``torch.fx.wrap``, as torchvision
    does for ``stochastic_depth``) and no rule covers: torch.export traces into them."""
    found = []
    for node in cx.graph.nodes:
        if node.op != "call_function" or not inspect.isfunction(node.target):
            continue
        home = getattr(node.target, "__module__", "") or ""
        if home.split(".")[0] in ("torch", "_operator", "operator", "math", "builtins"):
            continue
        if isinstance(rule_for(node, cx, rules), Unsupported) and node not in cx.layer_of:
            found.append(node)
    return found


def neighbour_names(graph: LayerGraph, name: str) -> tuple[list[str], list[str]]:
    """(producers, consumers) of a layer by name, each listed once, for inspection and tests."""
    layer = graph[name]

    def unique(items: Iterable[str]) -> list[str]:
        return list(dict.fromkeys(items))

    return (
        unique(link.producer for link in layer.producers),
        unique(link.consumer for link in layer.consumers),
    )
