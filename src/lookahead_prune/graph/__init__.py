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
import itertools
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

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
from .rules import DEFAULT_RULES, RuleSet, register_passthrough
from .types import GraphError, Layer, LayerGraph, Link, UnitScale
from .walks import analyse, branch_points, new_layer

__all__ = [
    "BATCHNORM_TYPES",
    "GRAPH_MODES",
    "LAYER_TYPES",
    "NORM_TYPES",
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


_TRACERS = {"fx": ("fx", "export"), "export": ("export",)}


def _capture_with(model: nn.Module, how: str, example_inputs: ExampleInputs) -> Captured:
    """Capture with one tracer; fx fails where it keeps a prunable layer out of sight."""
    if how == "export":
        return capture_export(model, example_inputs)
    cap, hidden = capture_fx(model, example_inputs)
    if hidden:
        raise GraphError(f"it keeps {hidden[0]!r} inside a module it cannot see into")
    return cap


def _follow(
    model: nn.Module, mode: str, example_inputs: ExampleInputs, strict: bool, rules: RuleSet
) -> LayerGraph:
    """fx first (exact for the paper's models), torch.export where fx cannot capture the model
    or its graph cannot be followed strictly; ``strict=False`` approximates only where no
    tracer gives a graph that can be followed exactly."""
    failures: list[tuple[str, str]] = []
    captured: Captured | None = None
    for how in _TRACERS[mode]:
        try:
            cx = _capture_with(model, how, example_inputs)
        except GraphError as exc:
            failures.append((how, f"cannot capture it: {exc}"))
            continue
        try:
            return analyse(cx, model, rules, True)
        except GraphError as exc:
            failures.append((how, str(exc)))
        except (TypeError, IndexError, KeyError, ValueError) as exc:  # an op no rule expects
            failures.append((how, f"{type(exc).__name__} while following its graph: {exc}"))
        captured = captured or cx
    if captured is not None and not strict:
        return analyse(captured, model, rules, False)
    raise GraphError(_failed(model, mode, example_inputs, failures, captured, rules)) from None


def _failed(
    model: nn.Module,
    mode: str,
    example_inputs: ExampleInputs,
    failures: list[tuple[str, str]],
    captured: Captured | None,
    rules: RuleSet,
) -> str:
    """One line: what failed under each tracer, then only the ways out that can work."""
    said = "; ".join(f"torch.{how}: {_first_sentence(msg)}" for how, msg in failures)
    ways = []
    if captured is None:
        if example_inputs is None:
            ways.append("pass example_inputs=(a batch of real inputs,) (a tuple or a dict)")
        part = _largest_part(model)
        if part:
            ways.append(f"prune a part that both can follow (e.g. lp.prune(model.{part}, ...))")
        if any(w in msg for _, msg in failures for w in ("control flow", "data-dependent")):
            ways.append("make forward() free of Python control flow on tensor values")
    else:
        if any("cannot follow units through" in msg for _, msg in failures):
            ways.append(
                "register a unit-preserving op with lookahead_prune.graph.register_passthrough"
            )
        ways.append("pass strict=False to give the layers next to it a factor of 1 there")
    if mode == "export" and _fx_follows(model, example_inputs, rules):
        ways.append("pass graph='fx' (torch.fx follows it)")
    if _chains(model, captured):
        ways.append("pass graph='sequential' to chain the layers in module order")
    if not ways:
        ways.append("prune with a method that reads no neighbours (mp, rp, lamp)")
    return f"cannot follow {type(model).__name__}: {said}. Ways out: {'; '.join(ways)}."


def _fx_follows(model: nn.Module, example_inputs: ExampleInputs, rules: RuleSet) -> bool:
    """Whether torch.fx captures the model and its graph can be followed strictly."""
    try:
        analyse(_capture_with(model, "fx", example_inputs), model, rules, True)
    except (GraphError, TypeError, IndexError, KeyError, ValueError):
        return False
    return True


def _first_sentence(msg: str) -> str:
    """The fact of an error message, without the advice that follows it."""
    head = msg.split(". ", 1)[0].strip().rstrip(".")
    return head if len(head) <= 300 else head[:297] + "..."


def _largest_part(model: nn.Module) -> str | None:
    """The child module holding the most prunable weights, to suggest pruning it alone."""
    best, most = None, 0
    for name, child in model.named_children():
        if layer_type(child) is not None or not prunable_layers(child):
            continue
        n = sum(p.numel() for p in child.parameters())
        if n > most:
            best, most = name, n
    return best


def _chains(model: nn.Module, captured: Captured | None) -> bool:
    """Whether graph='sequential' can chain the model: no gate, concatenation or attention
    in the captured graph, and each layer's inputs a multiple of the previous one's outputs."""
    if captured is not None and branch_points(captured, model):
        return False
    layers = [new_layer(n, m) for n, m in prunable_layers(model).items()]
    return all(b.in_units % a.out_units == 0 for a, b in itertools.pairwise(layers))


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
            layer.in_open += 1  # type: ignore[assignment]
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
                layer.out_open += 1  # type: ignore[assignment]
    return LayerGraph(layers, "sequential", capture="sequential")


def _refuse_branches(model: nn.Module, example_inputs: ExampleInputs) -> None:
    """Module order cannot express gates (SE, GLU), concatenation or attention: refuse them.

    Residual adds stay allowed: the official code chains ResNets this way (shortcuts left
    out), and the paper's ResNet results are reproduced with it. Models that can be captured
    neither by fx nor by torch.export are chained as before (that is what the mode is for).
    """
    cx = None
    for how in _TRACERS["fx"]:
        with contextlib.suppress(GraphError):
            cx = _capture_with(model, how, example_inputs)
            break
    if cx is None:
        return
    found = branch_points(cx, model)
    if found:
        try:
            _follow(model, "fx", example_inputs, True, DEFAULT_RULES)
            way = "use graph='fx'"
        except GraphError:
            way = (
                "use graph='fx' with strict=False (neither torch.fx nor torch.export can "
                "follow every layer's neighbours exactly; those sides get a factor of 1)"
            )
        raise GraphError(
            f"graph='sequential' cannot chain {type(model).__name__}: {found[0]}, which module "
            f"order cannot express; {way}."
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
        try:
            graph = _follow(model, mode, example_inputs, strict, rules)
        except GraphError as err:
            if example_inputs is not None or "example_inputs" in str(err):
                raise
            raise GraphError(
                f"{err} (shapes came from a guessed input; if the model takes another shape, "
                "pass example_inputs=(a real batch,))"
            ) from None
        graph.mode = mode
    _CACHE[model] = (sig, graph)
    return graph


def neighbour_names(graph: LayerGraph, name: str) -> tuple[list[str], list[str]]:
    """(producers, consumers) of a layer by name, each listed once, for inspection and tests."""
    layer = graph[name]

    def unique(items: Iterable[str]) -> list[str]:
        return list(dict.fromkeys(items))

    return (
        unique(link.producer for link in layer.producers),
        unique(link.consumer for link in layer.consumers),
    )
