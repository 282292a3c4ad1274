"""Find each prunable layer's neighbours (producers, consumers, batch norm) from the traced graph.

LAP scores a weight by the weights next to it, so we need, for every Linear/Conv layer, which
layers write the units it reads (producers) and which layers read the units it writes
(consumers), with the unit-to-unit map between them. We trace with ``torch.fx``, propagate
shapes once, and walk the graph through unit-preserving ops (activations, pooling, dropout,
batch norm), flatten (channel ``c`` -> features ``c*S .. c*S+S-1``), residual adds and
concatenation. An identity path around a block (the skip of a residual add) contributes like an
identity matrix, and the model's input and output like the paper's ``W_0``/``W_{L+1}`` of ones.
"""

from __future__ import annotations

import contextlib
import functools
import io
import operator
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

PRUNABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

# Modules and functions that keep units (neurons/channels) where they are.
_PASSTHROUGH_MODULES: set[type[nn.Module]] = {
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
}
_PASSTHROUGH_FUNCTIONS: set[Any] = {
    F.relu,
    F.relu6,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.gelu,
    F.silu,
    F.mish,
    F.hardtanh,
    F.hardswish,
    F.softplus,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.sigmoid,
    F.tanh,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.nn.functional.batch_norm,
}
_PASSTHROUGH_METHODS: set[str] = {
    "relu",
    "relu_",
    "sigmoid",
    "tanh",
    "contiguous",
    "clone",
    "detach",
    "float",
    "to",
    "type_as",
}
_ADD_TARGETS: set[Any] = {operator.add, operator.iadd, operator.sub, operator.isub, torch.add}
_ADD_METHODS: set[str] = {"add", "add_", "sub", "sub_"}
_SCALE_TARGETS: set[Any] = {operator.mul, operator.imul, operator.truediv, torch.mul, torch.div}
_SCALE_METHODS: set[str] = {"mul", "mul_", "div", "div_"}
_RESHAPE_TARGETS: set[Any] = {torch.flatten, torch.reshape}
_RESHAPE_METHODS: set[str] = {"view", "reshape", "flatten"}
_CAT_TARGETS: set[Any] = {torch.cat, torch.concat}
_MEAN_METHODS: set[str] = {"mean", "sum", "amax"}


def register_passthrough(target: type[nn.Module] | Callable[..., Any] | str) -> None:
    """Declare a module type, function or method name as unit-preserving (like an activation)."""
    if isinstance(target, type) and issubclass(target, nn.Module):
        _PASSTHROUGH_MODULES.add(target)
    elif isinstance(target, str):
        _PASSTHROUGH_METHODS.add(target)
    else:
        _PASSTHROUGH_FUNCTIONS.add(target)


class GraphError(ValueError):
    """The tracer could not follow the model; the message names the module or op and why."""


@dataclass(frozen=True)
class Link:
    """A producer -> consumer connection: ``index[u]`` is the producer's output unit feeding the
    consumer's input unit ``u`` along this path, or -1 where the path does not reach ``u``."""

    producer: str
    consumer: str
    index: Tensor
    bns: tuple = ()  # batch norms on this path: (bn, unit map at the bn), see _Reach


@dataclass
class Layer:
    """A prunable layer and its neighbourhood in the traced graph."""

    name: str
    module: nn.Module
    in_units: int
    out_units: int
    groups: int = 1
    batchnorm: nn.Module | None = None
    producers: list[Link] = field(default_factory=list)
    consumers: list[Link] = field(default_factory=list)
    in_open: Tensor | None = None  # per input unit: paths from the model input or an identity
    out_open: Tensor | None = None  # per output unit: paths to the model output or an identity
    in_open_bn: list = field(default_factory=list)  # open paths through batch norms: (index, bns)
    out_open_bn: list = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``linear`` or ``conv``: units are neurons for the first and channels for the second."""
        return "linear" if isinstance(self.module, nn.Linear) else "conv"


@dataclass
class LayerGraph:
    """All prunable layers of a model, in forward (topological) order, with their links."""

    layers: dict[str, Layer]
    mode: str
    unreached: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        """Qualified names of the prunable layers in forward order."""
        return list(self.layers)

    def __getitem__(self, name: str) -> Layer:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Linear and Conv1d/2d/3d modules of ``model`` by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE_TYPES)}


def _units(module: nn.Module) -> tuple[int, int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, 1
    return module.in_channels, module.out_channels, module.groups


def _new_layer(name: str, module: nn.Module) -> Layer:
    n_in, n_out, groups = _units(module)
    return Layer(
        name,
        module,
        n_in,
        n_out,
        groups,
        in_open=torch.zeros(n_in),
        out_open=torch.zeros(n_out),
    )


# --------------------------------------------------------------------------- tracing


class _LeafTracer(fx.Tracer):
    """Keeps every prunable layer and batch norm a leaf, whatever module it lives in."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, PRUNABLE_TYPES + BATCHNORM_TYPES):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    # forward() may assign attributes (self.feat = x); tracing would leave Proxies behind
    saved = [(m, dict(m.__dict__)) for m in model.modules()]
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # any tracing failure gets the same clear message
        raise GraphError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Make forward() free of data-dependent Python control flow, or pass "
            "graph='sequential' to chain the prunable layers in module order instead."
        ) from exc
    finally:
        for m, attrs in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
    return fx.GraphModule(model, graph)


def _first_layer(gm: fx.GraphModule, modules: dict[str, nn.Module]) -> nn.Module | None:
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(node.target), PRUNABLE_TYPES):
            return modules[node.target]
    return None


def _candidate_inputs(first: nn.Module | None) -> list[tuple[Tensor, ...]]:
    """Inputs to try for shape propagation when the user gave none."""
    if first is None:
        return []
    device, dtype = first.weight.device, first.weight.dtype
    zeros = functools.partial(torch.zeros, device=device, dtype=dtype)
    if isinstance(first, nn.Linear):
        n = first.in_features
        cands = [(zeros(1, n),)]
        for c in (1, 3):
            side = round((n / c) ** 0.5)
            if c * side * side == n:
                cands.append((zeros(1, c, side, side),))
        return cands
    if isinstance(first, nn.Conv1d):
        return [(zeros(1, first.in_channels, s),) for s in (64, 256, 1024)]
    if isinstance(first, nn.Conv3d):
        return [(zeros(1, first.in_channels, s, s, s),) for s in (16, 32)]
    if isinstance(first, nn.Conv2d):
        return [(zeros(1, first.in_channels, s, s),) for s in (32, 28, 64, 224)]
    return []


def _propagate_shapes(
    gm: fx.GraphModule, model: nn.Module, example_inputs: Sequence[Tensor] | None
) -> None:
    modules = dict(gm.named_modules())
    if example_inputs is not None:
        first = _first_layer(gm, modules)
        like = first.weight if first is not None else None
        cands = [
            tuple(
                t if like is None else t.to(like) if t.is_floating_point() else t.to(like.device)
                for t in example_inputs
            )
        ]
    else:
        cands = _candidate_inputs(_first_layer(gm, modules))
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    errors = []
    try:
        with torch.no_grad():
            for inputs in cands:
                try:
                    # ShapeProp prints a traceback for every failed guess; keep that quiet.
                    with contextlib.redirect_stderr(io.StringIO()):
                        ShapeProp(gm).propagate(*inputs)
                    return
                except Exception as exc:  # try the next candidate shape
                    errors.append(f"{[tuple(t.shape) for t in inputs]}: {exc}")
    finally:
        for m, flag in was_training.items():
            m.training = flag
    raise GraphError(
        "could not run the traced model to learn its tensor shapes "
        f"(tried {'; '.join(errors) or 'no input'}). Pass example_inputs=(tensor,) with a batch "
        "of the model's real input shape."
    )


def _is_tensor(node: Any) -> bool:
    return (
        isinstance(node, fx.Node)
        and "tensor_meta" in node.meta
        and hasattr(node.meta["tensor_meta"], "shape")
    )


def _shape(node: fx.Node) -> tuple[int, ...]:
    return tuple(node.meta["tensor_meta"].shape)


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) if _is_tensor(n) else None)
    return found


def _tensor_users(node: fx.Node) -> list[fx.Node]:
    # keep users whose result holds tensors (tuple results such as chunk/split too): they
    # must be followed or refused, never silently dropped
    return [u for u in node.users if u.op == "output" or "tensor_meta" in u.meta]


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module '{node.target}' ({type(modules[node.target]).__name__})"
    target = getattr(node.target, "__name__", str(node.target))
    return f"op '{node.name}' ({node.op} {target})"


def _classify(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """What an op does to units: same, add, cat, reshape, or unsupported."""
    tensor_args = _tensor_args(node)
    if node.op == "call_module":
        mod = modules[node.target]
        if isinstance(mod, PRUNABLE_TYPES):
            return "layer"
        if isinstance(mod, nn.Flatten):
            return "reshape"
        if isinstance(mod, BATCHNORM_TYPES):
            return "same"
        if type(mod) in _PASSTHROUGH_MODULES:
            return "same"
        return "unsupported"
    if node.op == "call_function":
        return _by_target(node.target, _FUNCTION_KINDS, len(tensor_args))
    if node.op == "call_method":
        return _by_target(node.target, _METHOD_KINDS, len(tensor_args))
    return "unsupported"


_FUNCTION_KINDS: list[tuple[set[Any], str]] = [
    (_ADD_TARGETS, "add"),
    (_SCALE_TARGETS, "scale"),
    (_CAT_TARGETS, "cat"),
    (_RESHAPE_TARGETS, "reshape"),
    (_PASSTHROUGH_FUNCTIONS, "same"),
    ({torch.mean, torch.sum, torch.amax}, "reduce"),
]
_METHOD_KINDS: list[tuple[set[Any], str]] = [
    (_ADD_METHODS, "add"),
    (_SCALE_METHODS, "scale"),
    (_RESHAPE_METHODS, "reshape"),
    (_PASSTHROUGH_METHODS, "same"),
    (_MEAN_METHODS, "reduce"),
]


def _by_target(target: Any, table: list[tuple[set[Any], str]], n_tensors: int) -> str:
    """Kind of a function or method call; add/mul with one tensor operand scale it in place."""
    for targets, kind in table:
        if target in targets:
            if kind == "add":
                return "add" if n_tensors > 1 else "same"
            if kind == "scale":
                return "same" if n_tensors == 1 else "unsupported"
            return kind
    return "unsupported"


def _reshape_factor(node: fx.Node, src: fx.Node, modules: dict[str, nn.Module]) -> int:
    """For a reshape from ``src`` to ``node``: S such that output feature f is input unit f // S."""
    si, so = _shape(src), _shape(node)
    if si[:2] == so[:2]:
        return 1
    if len(si) >= 2 and len(so) == 2 and so[0] == si[0]:
        spatial = 1
        for d in si[2:]:
            spatial *= d
        if so[1] == si[1] * spatial:
            return spatial
    raise GraphError(
        f"{_describe(node, modules)} reshapes {list(si)} to {list(so)}; only flattening "
        "[N, C, ...] to [N, C*...] (or a shape-preserving view) keeps units traceable. "
        "Pass graph='sequential' to chain layers in module order instead."
    )


def _check_reduce(node: fx.Node, src: fx.Node, modules: dict[str, nn.Module]) -> None:
    si, so = _shape(src), _shape(node)
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [] if dim is None else [dim] if isinstance(dim, int) else list(dim)
    spatial = bool(dims) and all(isinstance(d, int) and d % len(si) >= 2 for d in dims)
    if spatial and len(si) >= 2 and len(so) >= 2 and si[:2] == so[:2]:
        return
    raise GraphError(
        f"{_describe(node, modules)} reduces {list(si)} to {list(so)} across units; "
        "only reductions over spatial dimensions keep units traceable."
    )


def _cat_parts(node: fx.Node, modules: dict[str, nn.Module]) -> list[tuple[fx.Node, int, int]]:
    tensors = node.args[0] if node.args else node.kwargs["tensors"]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    ndim = len(_shape(node))
    if dim % ndim != 1:
        raise GraphError(
            f"{_describe(node, modules)} concatenates along dim {dim}; only concatenation of "
            "units (dim 1) is supported."
        )
    parts, offset = [], 0
    for t in tensors:
        n = _shape(t)[1]
        parts.append((t, offset, n))
        offset += n
    return parts


def _unsupported(node: fx.Node, modules: dict[str, nn.Module]) -> GraphError:
    return GraphError(
        f"cannot follow units through {_describe(node, modules)}. Supported: activations, "
        "dropout, pooling, batch norm, flatten/view, residual add, cat along dim 1. Register "
        "a unit-preserving op with lookahead_prune.graph.register_passthrough(...), or pass "
        "graph='sequential' to chain layers in module order."
    )


# --------------------------------------------------------------------------- walks


@dataclass
class _Reach:
    kind: str  # "layer" or "open"
    index: Tensor
    layer: str | None = None
    # batch norms passed: (bn, map). Backward walk: map[u] = bn unit for the start layer's
    # input unit u. Forward walk: map[v] = start layer's output unit carried by bn unit v.
    bns: tuple = ()


def _reaches_layer(node: fx.Node, modules: dict[str, nn.Module], forward: bool) -> bool:
    """Whether a prunable layer lies downstream (``forward``) or upstream of ``node``."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if (
            n is not node
            and n.op == "call_module"
            and isinstance(modules.get(n.target), PRUNABLE_TYPES)
        ):
            return True
        stack.extend(n.users if forward else n.all_input_nodes)
    return False


def _walk_back(
    node: fx.Node,
    sel: Tensor,
    passed_add: bool,
    modules: dict[str, nn.Module],
    out: list[_Reach],
    bns: tuple = (),
) -> None:
    """From ``node`` back to the nearest prunable layers; ``sel[u]`` is the unit of ``node``
    feeding the start layer's input unit ``u`` (-1: none)."""
    if node.op == "placeholder":
        out.append(_Reach("open", sel, None, bns))
        return
    if node.op == "get_attr" or (
        _classify(node, modules) == "unsupported" and not _reaches_layer(node, modules, False)
    ):
        if node.op != "get_attr":
            out.append(_Reach("open", sel, None, bns))
        return  # constants and input preprocessing: no producer (the paper's W_0)
    if node.op == "get_attr":
        raise GraphError(f"op '{node.name}' reads attribute '{node.target}' as data; unsupported.")
    if passed_add and len(_tensor_users(node)) > 1:
        out.append(_Reach("open", sel, None, bns))  # the skip of a residual block: identity
        return
    kind = _classify(node, modules)
    if kind == "layer":
        out.append(_Reach("layer", sel, node.target, bns))
        return
    if node.op == "call_module" and isinstance(modules[node.target], BATCHNORM_TYPES):
        bns = (*bns, (modules[node.target], sel))
    args = _tensor_args(node)
    if kind == "same":
        _walk_back(args[0], sel, passed_add, modules, out, bns)
    elif kind == "reduce":
        _check_reduce(node, args[0], modules)
        _walk_back(args[0], sel, passed_add, modules, out, bns)
    elif kind == "reshape":
        s = _reshape_factor(node, args[0], modules)
        _walk_back(args[0], torch.where(sel >= 0, sel // s, sel), passed_add, modules, out, bns)
    elif kind == "add":
        for a in args:
            _walk_back(a, sel, True, modules, out, bns)
    elif kind == "cat":
        for part, offset, n in _cat_parts(node, modules):
            hit = (sel >= offset) & (sel < offset + n)
            if bool(hit.any()):
                sub = torch.where(hit, sel - offset, torch.full_like(sel, -1))
                _walk_back(part, sub, passed_add, modules, out, bns)
    else:
        raise _unsupported(node, modules)


def _walk_forward(
    node: fx.Node,
    src: Tensor,
    passed_fork: bool,
    modules: dict[str, nn.Module],
    out: list[_Reach],
    bns: tuple = (),
) -> None:
    """From ``node`` forward to the nearest prunable layers; ``src[v]`` is the start layer's
    output unit carried by unit ``v`` of ``node`` (-1: none)."""
    users = _tensor_users(node)
    passed_fork = passed_fork or len(users) > 1
    for user in users:
        if user.op == "output":
            out.append(_Reach("open", src, None, bns))
            continue
        kind = _classify(user, modules)
        if kind == "layer":
            out.append(_Reach("layer", src, user.target, bns))
        elif kind in ("same", "reduce"):
            if kind == "reduce":
                _check_reduce(user, node, modules)
            nb = bns
            if user.op == "call_module" and isinstance(modules[user.target], BATCHNORM_TYPES):
                nb = (*bns, (modules[user.target], src))
            _walk_forward(user, src, passed_fork, modules, out, nb)
        elif kind == "reshape":
            s = _reshape_factor(user, node, modules)
            _walk_forward(user, src.repeat_interleave(s), passed_fork, modules, out, bns)
        elif kind == "add":
            if passed_fork:
                out.append(_Reach("open", src, None, bns))  # the skip of a residual block
            else:
                _walk_forward(user, src, passed_fork, modules, out, bns)
        elif kind == "cat":
            pieces = []
            for part, _, n in _cat_parts(user, modules):
                pieces.append(src if part is node else torch.full((n,), -1, dtype=src.dtype))
            _walk_forward(user, torch.cat(pieces), passed_fork, modules, out, bns)
        elif not _reaches_layer(user, modules, True):
            out.append(_Reach("open", src, None, bns))  # post-processing of the output: W_{L+1}
        else:
            raise _unsupported(user, modules)


def _following_batchnorm(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    """The batch norm applied to this layer's output alone (Eq. 9's ``a_i``), if any."""
    while True:
        users = _tensor_users(node)
        if len(users) != 1 or users[0].op == "output":
            return None
        user = users[0]
        if user.op == "call_module" and isinstance(modules[user.target], BATCHNORM_TYPES):
            return modules[user.target]
        if _classify(user, modules) != "same":
            return None
        node = user


def _count(index: Tensor, n: int) -> Tensor:
    valid = index[index >= 0]
    return torch.bincount(valid, minlength=n).float()


def _fx_graph(model: nn.Module, example_inputs: Sequence[Tensor] | None) -> LayerGraph:
    gm = _trace(model)
    _propagate_shapes(gm, model, example_inputs)
    modules = dict(gm.named_modules())
    layers: dict[str, Layer] = {}
    nodes: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], PRUNABLE_TYPES):
            if node.target in layers:
                raise GraphError(
                    f"module '{node.target}' is called more than once in forward(); a layer "
                    "shared between places has no single set of neighbours."
                )
            layers[node.target] = _new_layer(node.target, modules[node.target])
            nodes[node.target] = node
    unreached = sorted(set(prunable_layers(model)) - set(layers))
    for name, node in nodes.items():
        layer = layers[name]
        inputs = _tensor_args(node)
        if len(inputs) != 1:
            raise GraphError(f"module '{name}' takes {len(inputs)} tensor inputs; expected 1.")
        in_shape = _shape(inputs[0])
        if isinstance(layer.module, nn.Linear) and len(in_shape) != 2:
            raise GraphError(
                f"module '{name}' (Linear) is applied to a {len(in_shape)}-D tensor "
                f"{list(in_shape)}; token-wise Linear layers are not supported yet."
            )
        back: list[_Reach] = []
        _walk_back(inputs[0], torch.arange(layer.in_units), False, modules, back)
        for r in back:
            if r.kind == "layer":
                layer.producers.append(Link(r.layer, name, r.index, r.bns))
            elif r.bns:
                layer.in_open_bn.append((r.index, r.bns))
            else:
                layer.in_open += (r.index >= 0).float()
        fwd: list[_Reach] = []
        _walk_forward(node, torch.arange(layer.out_units), False, modules, fwd)
        for r in fwd:
            if r.kind == "layer":
                layer.consumers.append(Link(name, r.layer, r.index, r.bns))
            elif r.bns:
                layer.out_open_bn.append((r.index, r.bns))
            else:
                layer.out_open += _count(r.index, layer.out_units)
        layer.batchnorm = _following_batchnorm(node, modules)
    return LayerGraph(layers, "fx", unreached)


def _sequential_graph(model: nn.Module, skip: frozenset[str] = frozenset()) -> LayerGraph:
    """The official code's view: prunable layers chained in module order.

    Layers in ``skip`` are left out of the chain altogether, as the official code's plain
    (unmasked) shortcut convolutions are. The batch norm of a layer is the first one after
    it in module order (before the next chained layer) with as many features as the layer
    has outputs.
    """
    layers = {n: _new_layer(n, m) for n, m in prunable_layers(model).items() if n not in skip}
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
    return LayerGraph(layers, "sequential")


def _bn_path(bn: nn.Module | None, index: Tensor) -> tuple:
    return () if bn is None else ((bn, index),)


GRAPH_MODES = ("fx", "sequential")


def check_graph_mode(mode: str) -> None:
    """Refuse a graph mode other than ``fx`` (traced) or ``sequential`` (module order)."""
    if mode not in GRAPH_MODES:
        raise ValueError(f"graph must be 'fx' or 'sequential', not {mode!r}")


def layers_only(model: nn.Module) -> LayerGraph:
    """Prunable layers without neighbours, for scores that never look at them (MP, RP, LAMP)."""
    if not prunable_layers(model):
        raise ValueError(
            f"{type(model).__name__} has no prunable layers (nn.Linear, nn.Conv1d/2d/3d)."
        )
    return LayerGraph({n: _new_layer(n, m) for n, m in prunable_layers(model).items()}, "none")


_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[Any, LayerGraph]] = weakref.WeakKeyDictionary()


def _signature(
    model: nn.Module, mode: str, example_inputs: Sequence[Tensor] | None, skip: frozenset[str]
) -> Any:
    mods = tuple((n, id(m), type(m)) for n, m in model.named_modules())
    shapes = None if example_inputs is None else tuple(tuple(t.shape) for t in example_inputs)
    return (mode, mods, shapes, skip)


def build_graph(
    model: nn.Module,
    mode: str = "fx",
    example_inputs: Sequence[Tensor] | None = None,
    *,
    skip: Iterable[str] = (),
) -> LayerGraph:
    """Trace ``model`` (``mode='fx'``) or chain its layers in module order (``'sequential'``).

    ``skip`` names layers to leave out of the sequential chain (in ``fx`` mode every layer
    stays: a skipped layer is still a real neighbour of the others). The result is cached
    per model object until its modules change.
    """
    check_graph_mode(mode)
    if not prunable_layers(model):
        raise ValueError(
            f"{type(model).__name__} has no prunable layers (nn.Linear, nn.Conv1d/2d/3d)."
        )
    skipped = frozenset(skip) if mode == "sequential" else frozenset()
    sig = _signature(model, mode, example_inputs, skipped)
    cached = _CACHE.get(model)
    if cached is not None and cached[0] == sig:
        return cached[1]
    graph = _fx_graph(model, example_inputs) if mode == "fx" else _sequential_graph(model, skipped)
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
