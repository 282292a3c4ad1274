"""Capture a model as a graph with tensor shapes: torch.fx first, torch.export when fx cannot.

Capture is kept apart from analysis: both ways yield a :class:`Captured` (an ``fx.Graph``
whose nodes carry ``meta["lap_shape"]``, which nodes apply which prunable layer, and which
nodes are parameters), and one pass in :mod:`.walks` turns it into layers and links.

Without ``example_inputs`` the shapes come from a guessed input. A guess only has to run the
convolutions: where a flatten feeds a Linear whose ``in_features`` disagree with the guess, the
Linear's input is repaired to ``in_features`` and the flatten's unit map follows from
``in_features`` and the channel count, so a CNN for 8x8 or 16x16 inputs needs no shape.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sysconfig
import traceback
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from io import StringIO
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from .layers import layer_type, prunable_layers
from .types import GraphError

ExampleInputs = Tensor | Sequence[Any] | Mapping[str, Any] | None

BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LocalResponseNorm,
)

_LAYER_OPS: dict[Any, tuple[int, int]] = {}  # aten op -> (input arg, weight arg)


def _register_layer_ops() -> None:
    aten = torch.ops.aten
    for op, io in {
        aten.linear.default: (0, 1),
        aten.conv1d.default: (0, 1),
        aten.conv2d.default: (0, 1),
        aten.conv3d.default: (0, 1),
        aten.conv1d.padding: (0, 1),
        aten.conv2d.padding: (0, 1),
        aten.conv3d.padding: (0, 1),
        aten.convolution.default: (0, 1),
        aten.conv_transpose1d.default: (0, 1),
        aten.conv_transpose2d.input: (0, 1),
        aten.conv_transpose3d.input: (0, 1),
        aten.addmm.default: (1, 2),
        aten.mm.default: (0, 1),
        aten.matmul.default: (0, 1),
    }.items():
        _LAYER_OPS[op] = io


_register_layer_ops()


@dataclass
class Captured:
    """A captured graph: nodes with shapes, the layer each layer node applies, parameters."""

    graph: fx.Graph
    how: str  # "fx" or "export"
    modules: dict[str, nn.Module]  # call_module targets (fx) and the model's own modules
    layer_of: dict[fx.Node, str] = field(default_factory=dict)  # node -> prunable layer name
    layer_input: dict[fx.Node, fx.Node] = field(default_factory=dict)
    params: dict[fx.Node, tuple[str, Tensor]] = field(default_factory=dict)  # node -> (fqn, t)
    dense_ops: dict[fx.Node, str] = field(default_factory=dict)  # linear/conv, unpruned weight
    modules_by_name: dict[str, nn.Module] = field(default_factory=dict)  # the model's modules
    rules: Any = None  # the RuleSet the walks use (set by the analysis)

    def module(self, node: fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node calls."""
        return self.modules.get(node.target) if node.op == "call_module" else None

    def describe(self, node: fx.Node) -> str:
        """A short name for error messages: the module it calls or the op it runs."""
        if node in self.layer_of:
            return f"module '{self.layer_of[node]}'"
        mod = self.module(node)
        if mod is not None:
            return f"module '{node.target}' ({type(mod).__name__})"
        target = getattr(node.target, "__name__", str(node.target))
        where = _module_path(node)
        return f"op '{node.name}' ({node.op} {target}{where})"


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return f" in module '{path}'" if path else ""


def shape(node: Any) -> Any:
    """A node's shape: a tuple of ints, a list of them for tuple results, or None."""
    return node.meta.get("lap_shape") if isinstance(node, fx.Node) else None


def is_tensor(node: Any) -> bool:
    """Whether ``node`` produces one tensor (with a known shape)."""
    return isinstance(shape(node), tuple)


def tensor_args(node: fx.Node) -> list[fx.Node]:
    """The tensor-valued nodes among ``node``'s arguments, in order."""
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if is_tensor(n) else None)
    return found


def tensor_users(node: fx.Node) -> list[fx.Node]:
    """Users whose result holds tensors (tuples too) or the output: followed or refused."""
    return [u for u in node.users if u.op == "output" or shape(u) is not None]


def _to_shape(value: Any) -> Any:
    if isinstance(value, Tensor):
        return tuple(int(d) for d in value.shape)
    if isinstance(value, list | tuple) and any(isinstance(v, Tensor) for v in value):
        return [_to_shape(v) for v in value]
    return None


def normalize_inputs(
    example_inputs: ExampleInputs,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``example_inputs`` as (args, kwargs): a tensor, a tuple/list of args, or a dict."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad, no KV cache (Hugging Face) while capturing; restored after."""
    was_training = {m: m.training for m in model.modules()}
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    cached = [c for c in configs.values() if getattr(c, "use_cache", False) is True]
    model.eval()
    for c in cached:
        c.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        for m, flag in was_training.items():
            m.training = flag
        for c in cached:
            c.use_cache = True


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Nothing from torch while a capture may fail: no warnings, no log records, and no
    partial graph torch.export prints to stderr on a failed try (hundreds of lines for a
    large model); our one line says what failed."""
    names = ["torch", *(n for n in logging.root.manager.loggerDict if n.startswith("torch."))]
    loggers = [logging.getLogger(n) for n in names]
    states = [(lg.level, lg.disabled) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    sink = StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, (level, disabled) in zip(loggers, states, strict=True):
            lg.setLevel(level)
            lg.disabled = disabled


def _where(exc: BaseException) -> str:
    """`` at file.py:12`` for the innermost frame of the model's own code in a traceback."""
    skip = (
        os.path.dirname(torch.__file__),
        os.path.dirname(os.path.dirname(__file__)),
        sysconfig.get_paths()["stdlib"],
        "<",
    )
    found = ""
    for frame, line in traceback.walk_tb(exc.__traceback__):
        path = frame.f_code.co_filename
        if path.startswith(skip):
            continue
        found = f" at {os.path.basename(path)}:{line}"
    return found


# --------------------------------------------------------------------------- fx


class _LeafTracer(fx.Tracer):
    """Prunable layers, norms and modules holding no prunable layer are leaves; modules that
    hold prunable layers are traced through so those layers are seen where they are called."""

    def __init__(self, holders: set[str]) -> None:
        super().__init__()
        self.holders = holders

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        t = layer_type(m)
        if (t is not None and t.leaf) or isinstance(m, BATCHNORM_TYPES + NORM_TYPES):
            return True
        if qualname in self.holders:
            return False
        return super().is_leaf_module(m, qualname)


def _holders(model: nn.Module) -> set[str]:
    """Qualified names of modules that contain a prunable layer below them."""
    out: set[str] = set()
    for name in prunable_layers(model):
        parts = name.split(".")
        for i in range(len(parts)):
            out.add(".".join(parts[:i]))
    return out


def trace_fx(model: nn.Module) -> fx.GraphModule:
    """Symbolic trace with prunable layers and norms as leaves; raises GraphError in one line."""
    # forward() may assign attributes (self.feat = x); tracing would leave Proxies behind
    # and tensor constants (torch.ones(8)) as _tensor_constant0: the GraphModule copies those
    # before the model gets its own attributes back, so the model is left as it was
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        graph = _LeafTracer(_holders(model)).trace(model)
        return fx.GraphModule(model, graph)
    except Exception as exc:  # any tracing failure gets the same clear message
        raise GraphError(f"{type(exc).__name__}{_where(exc)}: {_first_line(exc)}") from None
    finally:
        for m, attrs in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


class _ShapeRun(fx.Interpreter):
    """Runs the traced model once and stores each node's shape; repairs flatten -> Linear."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.failed: fx.Node | None = None
        self.repaired: list[fx.Node] = []

    def run_node(self, n: fx.Node) -> Any:
        try:
            if n.op == "call_module":
                mod = self.module.get_submodule(n.target)
                t = layer_type(mod)
                if t is not None and t.unit_axis == -1:
                    args, kwargs = self.fetch_args_kwargs_from_env(n)
                    x = args[0] if args else None
                    need = t.units(mod)[0]
                    if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] != need:
                        self.repaired.append(n)
                        x = x.new_zeros(*x.shape[:-1], need)
                        result = mod(x, *args[1:], **kwargs)
                        n.meta["lap_shape"] = _to_shape(result)
                        return result
            result = super().run_node(n)
        except Exception:
            if self.failed is None:
                self.failed = n
            raise
        n.meta["lap_shape"] = _to_shape(result)
        return result


def _fix_repaired(gm: fx.GraphModule, repaired: list[fx.Node]) -> None:
    """Give the nodes from a flatten to a repaired Linear the Linear's input width: back
    through shape-preserving ops (activations, dropout) up to the op that changed the shape."""
    for node in repaired:
        mod = gm.get_submodule(node.target)
        need = layer_type(mod).units(mod)[0]
        cur = node.args[0]
        while isinstance(cur, fx.Node) and is_tensor(cur):
            args = tensor_args(cur)
            kept_shape = len(args) == 1 and shape(args[0]) == shape(cur)
            cur.meta["lap_shape"] = (*shape(cur)[:-1], need)
            cur.meta["lap_repaired"] = True
            if not kept_shape:
                break
            cur = args[0]


def propagate_shapes(gm: fx.GraphModule, model: nn.Module, example_inputs: ExampleInputs) -> None:
    """Run ``gm`` on ``example_inputs`` (or guessed inputs) to learn every node's shape."""
    if example_inputs is not None:
        args, kwargs = normalize_inputs(example_inputs)
        cands = [(_like_model(model, args), kwargs)]
    else:
        cands = [(c, {}) for c in guess_inputs(model)]
    first_error = None
    with _evaluating(model):
        for args, kwargs in cands:
            run = _ShapeRun(gm)
            try:
                with _quiet():
                    run.run(*_positional(gm, args, kwargs))
            except Exception as exc:  # try the next guess; remember the first failure
                if first_error is None:
                    where = "" if run.failed is None else f" at {_fx_describe(gm, run.failed)}"
                    shapes = [list(a.shape) for a in args if isinstance(a, Tensor)]
                    first_error = f"on input {shapes}{where}: {_first_line(exc)}"
                continue
            _fix_repaired(gm, run.repaired)
            return
    if not cands:
        raise GraphError("no input can be guessed (no layer reads the input first)")
    given = "the given example_inputs" if example_inputs is not None else "a guessed input"
    raise GraphError(f"tensor shapes are needed and it does not run {first_error} ({given})")


def _positional(gm: fx.GraphModule, args: Sequence[Any], kwargs: Mapping[str, Any]) -> list:
    """Placeholder values in order: positional inputs, then keywords by name, then defaults."""
    values = list(args)
    for p in [n for n in gm.graph.nodes if n.op == "placeholder"][len(args) :]:
        name = str(p.target).lstrip("*")
        if name in kwargs:
            values.append(kwargs[name])
        elif p.args:
            values.append(p.args[0])
        else:
            raise GraphError(f"no value for forward()'s argument {name!r}")
    return values


def _fx_describe(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(gm.get_submodule(node.target)).__name__})"
    return f"op '{node.name}'"


def _like_model(model: nn.Module, args: Sequence[Any]) -> tuple[Any, ...]:
    """Float inputs in the model's dtype and device, integer inputs on its device."""
    p = next(iter(model.parameters()), None)
    if p is None:
        return tuple(args)
    return tuple(
        (a.to(p) if a.is_floating_point() else a.to(p.device)) if isinstance(a, Tensor) else a
        for a in args
    )


def guess_inputs(model: nn.Module) -> list[tuple[Tensor, ...]]:
    """Inputs to try when the user gave none: from the first module that reads the input."""
    first = None
    for m in model.modules():
        if isinstance(m, nn.Embedding | nn.EmbeddingBag | nn.RNNBase) or layer_type(m):
            first = m
            break
    if first is None:
        return []
    p = next(iter(model.parameters()))
    zeros = lambda *s: torch.zeros(*s, device=p.device, dtype=p.dtype)  # noqa: E731
    if isinstance(first, nn.Embedding | nn.EmbeddingBag):
        return [(torch.zeros(1, 8, dtype=torch.long, device=p.device),)]
    if isinstance(first, nn.RNNBase):
        n = first.input_size
        return [(zeros(1, 8, n),) if first.batch_first else (zeros(8, 1, n),)]
    t = layer_type(first)
    n_in = t.units(first)[0]
    if t.unit_axis == -1:
        cands = [(zeros(1, n_in),), (zeros(1, 8, n_in),)]  # features, or tokens of features
        if isinstance(first, nn.MultiheadAttention):
            cands.reverse()
        for c in (1, 3):
            side = round((n_in / c) ** 0.5)
            if c * side * side == n_in:
                cands.append((zeros(1, c, side, side),))
        return cands
    dims = first.weight.dim() - 2
    sizes = {1: (256, 64, 1024), 2: (32, 28, 64, 224), 3: (16, 32)}[dims]
    return [(zeros(1, n_in, *([s] * dims)),) for s in sizes]


def capture_fx(model: nn.Module, example_inputs: ExampleInputs) -> tuple[Captured, list[str]]:
    """fx capture; also returns prunable layers hidden inside modules fx kept whole."""
    gm = trace_fx(model)
    propagate_shapes(gm, model, example_inputs)
    modules = dict(gm.named_modules())
    cap = Captured(gm.graph, "fx", modules)
    own = dict(model.named_modules())  # gm holds bare stand-ins for modules read by get_attr
    called: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            called.add(node.target)
            t = layer_type(modules[node.target])
            if t is not None and t.leaf:
                cap.layer_of[node] = node.target
                args = tensor_args(node)
                if len(args) != 1:
                    raise GraphError(
                        f"module '{node.target}' takes {len(args)} tensor inputs; expected 1."
                    )
                cap.layer_input[node] = args[0]
        elif node.op == "get_attr":
            with contextlib.suppress(AttributeError):
                t = gm.get_parameter(node.target)
                cap.params[node] = (node.target, t)
                continue
            with contextlib.suppress(AttributeError):
                cap.params[node] = (node.target, gm.get_buffer(node.target))
        elif node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
            _functional_layer(cap, node, own)
    hidden = [
        n
        for n in prunable_layers(model)
        if n not in called
        and any(
            c and (n == c or n.startswith(c + "."))
            for c in called
            if c not in cap.layer_of.values()
        )
    ]
    return cap, hidden


_FUNCTIONAL_LAYERS: dict[Any, tuple[int, int]] = {
    f: (0, 1)
    for f in (
        nn.functional.linear, nn.functional.conv1d, nn.functional.conv2d, nn.functional.conv3d,
        nn.functional.conv_transpose1d, nn.functional.conv_transpose2d,
        nn.functional.conv_transpose3d, torch.conv1d, torch.conv2d, torch.conv3d,
    )
}  # fmt: skip


def _functional_layer(cap: Captured, node: fx.Node, modules: Mapping[str, nn.Module]) -> None:
    """``F.conv1d(x, self.conv.weight, ...)`` (Mamba's depthwise conv) applies ``conv``: the
    functional call reading a prunable module's own weight is that layer, as under export."""
    i, w = _FUNCTIONAL_LAYERS[node.target]
    weight = node.args[w] if len(node.args) > w else node.kwargs.get("weight")
    if not (isinstance(weight, fx.Node) and weight in cap.params and "." in cap.params[weight][0]):
        return
    owner, attr = cap.params[weight][0].rsplit(".", 1)
    t = layer_type(modules[owner]) if owner in modules else None
    if t is None or attr != t.weight:
        return
    if owner in cap.layer_of.values():
        raise GraphError(
            f"module '{owner}' is called more than once in forward(); a layer shared between "
            "places has no single set of neighbours."
        )
    cap.layer_of[node] = owner
    cap.layer_input[node] = node.args[i] if node.args else node.kwargs["input"]


# --------------------------------------------------------------------------- export


def capture_export(model: nn.Module, example_inputs: ExampleInputs) -> Captured:
    """Capture with ``torch.export`` (non-strict) and map its graph back to module names."""
    cands = (
        [normalize_inputs(example_inputs)]
        if example_inputs is not None
        else [(c, {}) for c in _guess_export_inputs(model)]
    )
    if not cands:
        raise GraphError("it needs example_inputs=(a batch of real inputs,)")
    first_error = None
    with _evaluating(model):
        for args, kwargs in cands:
            try:
                with _quiet():
                    ep = torch.export.export(model, _like_model(model, args), kwargs, strict=False)
                break
            except Exception as exc:  # try the next guess
                if first_error is None:
                    first_error = f"{type(exc).__name__}{_where(exc)}: {_first_line(exc)}"
        else:
            raise GraphError(first_error)
    graph = ep.graph_module.graph
    sig = ep.graph_signature
    cap = Captured(graph, "export", dict(model.named_modules()))
    lookup = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    for node in graph.nodes:
        if "val" in node.meta:
            node.meta["lap_shape"] = _to_shape(node.meta["val"])
        if node.op == "placeholder" and node.name in lookup:
            fqn = lookup[node.name]
            if fqn in state:
                cap.params[node] = (fqn, state[fqn])
    layers = prunable_layers(model)
    weight_of = _weights_by_tensor(model, layers)
    for node in graph.nodes:
        io = _LAYER_OPS.get(node.target) if node.op == "call_function" else None
        if io is None or len(node.args) <= io[1]:
            continue
        w = _pruned_weight(node.args[io[1]], cap)
        if isinstance(w, fx.Node) and w in cap.params:
            fqn, tensor = cap.params[w]
            name = weight_of.get(id(tensor))
            if name is None:
                cap.dense_ops[node] = fqn
                continue
        else:
            name = _parametrized_layer(node, layers)
            if name is None:
                continue
        if name in cap.layer_of.values():
            raise GraphError(
                f"module '{name}' is called more than once in forward(); a layer "
                "shared between places has no single set of neighbours."
            )
        cap.layer_of[node] = name
        cap.layer_input[node] = node.args[io[0]]
    return cap


def _parametrized_layer(node: fx.Node, layers: Mapping[str, nn.Module]) -> str | None:
    """The layer whose parametrised weight (weight norm, spectral norm, a mask) a linear or
    conv op computes with: the op runs in that layer's forward and reads a computed weight."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1][0]
    layer = layers.get(path)
    if layer is None or not parametrize.is_parametrized(layer, layer_type(layer).weight):
        return None
    return path


def _pruned_weight(w: Any, cap: Captured) -> Any:
    """``weight_orig * weight_mask`` (a model pruned before) stands for ``weight_orig``."""
    if isinstance(w, fx.Node) and w.op == "call_function" and w.target == torch.ops.aten.mul.Tensor:
        for a in w.args:
            if isinstance(a, fx.Node) and a in cap.params and cap.params[a][0].endswith("_orig"):
                return a
    return w


def _weights_by_tensor(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[int, str]:
    """id(weight tensor) -> layer name, for the weight export lifts into the graph."""
    out: dict[int, str] = {}
    for name, m in layers.items():
        wn = layer_type(m).weight
        w = m._parameters.get(f"{wn}_orig", m._parameters.get(wn))
        if w is not None:
            out.setdefault(id(w), name)
    return out


def _guess_export_inputs(model: nn.Module) -> list[tuple[Any, ...]]:
    embed = getattr(model, "get_input_embeddings", None)
    if callable(embed) and getattr(model, "config", None) is not None:
        p = next(iter(model.parameters()))
        return [(torch.zeros(1, 8, dtype=torch.long, device=p.device),)]
    return guess_inputs(model)
