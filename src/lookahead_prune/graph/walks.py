"""From a captured graph to layers and links: walk back and forward from every prunable layer.

A walk carries, for the tensor at a node, the axes its units live on and a unit map
(back: ``sel[u]`` is the unit here feeding the start layer's input unit ``u``; forward:
``src[v]`` is the start layer's output unit carried by unit ``v`` here). Each op's rule in
:mod:`.rules` says where units go; the walks only dispatch. An identity path around a block
(the skip of a residual add) contributes like an identity matrix, the model's input and
output like the paper's ``W_0``/``W_{L+1}`` of ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from .capture import BATCHNORM_TYPES, Captured, shape, tensor_users
from .layers import layer_type, prunable_layers
from .rules import (
    ATTENTION,
    DEFAULT_RULES,
    MATMUL,
    RuleSet,
    Same,
    Unsupported,
    rule_for,
    unsupported_message,
)
from .types import GraphError, Layer, LayerGraph, Link


@dataclass
class _Reach:
    kind: str  # "layer", "open" or "sink"
    index: Tensor
    layer: str | None = None
    bns: tuple = ()


def _data_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(
        (node.args, node.kwargs), lambda n: found.append(n) if shape(n) is not None else None
    )
    return list(dict.fromkeys(found))


def _norm_axis(axis: int, node: fx.Node) -> tuple[int, ...]:
    return (axis % len(shape(node)),)


def new_layer(name: str, module: nn.Module) -> Layer:
    """A layer entry with no neighbours yet (all factors from open ends still zero)."""
    t = layer_type(module)
    n_in, n_out, groups = t.units(module)
    return Layer(
        name,
        module,
        n_in,
        n_out,
        groups,
        in_open=torch.zeros(n_in),
        out_open=torch.zeros(n_out),
        type_name=t.name,
    )


class _Walker:
    """Walks over one captured graph with one rule set."""

    def __init__(self, cx: Captured, rules: RuleSet) -> None:
        self.cx = cx
        self.rules = rules
        self.axes_of: dict[fx.Node, tuple[int, ...]] = {}
        self._sources: dict[fx.Node, fx.Node] = {}
        self._annotate()

    def rule(self, node: fx.Node):
        return rule_for(node, self.cx, self.rules)

    def _unit_axis(self, name: str) -> int:
        return layer_type(self.cx.modules_by_name[name]).unit_axis

    def _annotate(self) -> None:
        """In graph (topological) order: the unit axes of every node reached forward from a
        layer (read by back walks), and each node's element-wise source (see ``source``)."""
        for node in self.cx.graph.nodes:
            if shape(node) is None:
                continue
            if node in self.cx.layer_of:
                self.axes_of[node] = _norm_axis(self._unit_axis(self.cx.layer_of[node]), node)
                continue
            rule = self.rule(node)
            for arg in _data_args(node):
                if arg not in self.axes_of:
                    continue
                try:
                    step = rule.forward(node, arg, self.axes_of[arg], self.cx)
                except (GraphError, IndexError, TypeError, KeyError, ValueError):
                    continue
                if step.kind == "units":
                    self.axes_of[node] = step.axes
                    break
            if node in self.axes_of and not isinstance(rule, Unsupported):
                try:
                    carriers = rule.carriers(node, self.axes_of[node], self.cx)
                except (GraphError, IndexError, TypeError, KeyError):
                    carriers = []
                found = {self.source(c) for c in carriers}
                if len(found) == 1:
                    self._sources[node] = found.pop()

    def source(self, node: fx.Node) -> fx.Node:
        """The node whose units ``node`` is an element-wise function of: up through ops with
        one unit-carrying input, and through merges whose inputs all share one source."""
        return self._sources.get(node, node)

    def is_residual(self, rule, node: fx.Node, axes: tuple[int, ...]) -> bool:
        """An add of two or more unit carriers that are not one element-wise function of a
        single tensor (as GELU's ``x + 0.044715 x^3`` is): a residual connection."""
        if not rule.residual:
            return False
        carriers = rule.carriers(node, axes, self.cx)
        return len(carriers) > 1 and len({self.source(c) for c in carriers}) > 1

    def reaches_layer(self, node: fx.Node, forward: bool) -> bool:
        """Whether a prunable layer lies downstream (``forward``) or upstream of ``node``;
        forward, a query or key ends in its attention product and reaches nothing."""
        seen, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n is not node and n in self.cx.layer_of:
                return True
            if not forward:
                stack.extend(n.all_input_nodes)
                continue
            for u in n.users:
                r = self.rule(u)
                if r is ATTENTION and n in u.args[:2] and n is not u.args[2]:
                    continue
                if r is MATMUL and u.args and u.args[0] is n:
                    continue
                stack.append(u)
        return False

    # ------------------------------------------------------------------ back

    def back(
        self,
        node: fx.Node,
        axes: tuple[int, ...],
        sel: Tensor,
        passed_add: bool,
        out: list[_Reach],
        bns: tuple,
        moved: str,
    ) -> None:
        cx = self.cx
        if node.op == "placeholder":
            if node not in cx.params:
                out.append(_Reach("open", sel, None, bns))
            return
        if node.op == "get_attr" or node in cx.params:
            return  # constants: no producer
        if node in cx.layer_of:
            name = cx.layer_of[node]
            want = _norm_axis(self._unit_axis(name), node)
            if not set(axes) & set(want):
                # the units are on another axis of the layer's output (tokens through a Linear
                # across tokens): each of them sees the whole layer, the same factor for all
                # units, which is a factor of 1 for ranking: an open end, exactly
                out.append(_Reach("open", sel, None, bns))
                return
            if axes != want:
                raise GraphError(
                    f"units reach module '{name}' on axes {list(axes)} of its output, not on its "
                    f"unit axis {list(want)}{moved}; its neighbours cannot be read."
                )
            out.append(_Reach("layer", sel, name, bns))
            return
        if node in cx.dense_ops:
            out.append(_Reach("open", sel, None, bns))  # a weight that is not pruned
            return
        if passed_add and len(tensor_users(node)) > 1:
            out.append(_Reach("open", sel, None, bns))  # the skip of a residual block: identity
            return
        rule = self.rule(node)
        if isinstance(rule, Unsupported):
            if not self.reaches_layer(node, False):
                out.append(_Reach("open", sel, None, bns))  # input preprocessing: W_0
                return
            raise GraphError(unsupported_message(node, cx))
        carriers = rule.carriers(node, axes, cx)
        residual = self.is_residual(rule, node, axes)
        for arg in carriers:
            if arg in cx.dense_ops:
                out.append(_Reach("open", sel, None, bns))  # a weight that is not pruned
                continue
            try:
                arg_axes, step = self._step_back(rule, node, arg, axes)
            except GraphError:
                if self.reaches_layer(arg, False):
                    raise
                out.append(_Reach("open", sel, None, bns))  # the model input, seen any way: W_0
                continue
            if step.kind != "units":
                continue
            nb = (*bns, (step.scale, sel)) if step.scale is not None else bns
            if step.map is not None:
                m = step.map
                sel_arg = torch.where(sel >= 0, m[sel.clamp(min=0)], torch.full_like(sel, -1))
            else:
                sel_arg = sel
            here = moved if arg_axes == axes else f" (moved by {cx.describe(node)})"
            self.back(arg, arg_axes, sel_arg, passed_add or residual, out, nb, here)

    def _step_back(self, rule, node: fx.Node, arg: fx.Node, axes: tuple[int, ...]):
        """The axes of ``arg`` whose units become ``axes`` at ``node``, and the step between.

        The axes found forward (and the rule's own guess) come first; where they give more
        axes than the units here hold, the others hold copies of the units (a batch folded
        into heads) and one copy stands for all. Then any other axes, in order."""
        n = len(shape(arg)) if isinstance(shape(arg), tuple) else len(shape(arg)[0])
        first = [self.axes_of.get(arg), rule.back_axes(node, arg, axes, self.cx)]
        guesses = list(itertools.combinations(range(n), len(axes)))  # any other axes, in order
        for cands, copies in ((first, True), (guesses, False), (guesses, True)):
            for cand in dict.fromkeys(c for c in cands if c is not None):
                try:
                    step = rule.forward(node, arg, cand, self.cx)
                except (GraphError, IndexError, TypeError, KeyError):
                    continue
                if step.kind != "units" or step.axes == axes:
                    return cand, step
                if copies and set(axes) < set(step.axes):
                    return cand, _one_copy(step, axes, node)
        raise GraphError(
            f"cannot tell which axes of {self.cx.describe(arg)} become the unit axes "
            f"{list(axes)} of {self.cx.describe(node)}."
        )

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        node: fx.Node,
        axes: tuple[int, ...],
        src: Tensor,
        passed_fork: bool,
        out: list[_Reach],
        bns: tuple,
        moved: str,
    ) -> None:
        cx = self.cx
        users = tensor_users(node)
        passed_fork = passed_fork or len(users) > 1
        for user in users:
            if user.op == "output":
                out.append(_Reach("open", src, None, bns))
                continue
            if user in cx.layer_of:
                self._arrive(user, node, axes, src, out, bns, moved)
                continue
            if user in cx.dense_ops:
                out.append(_Reach("open", src, None, bns))
                continue
            rule = self.rule(user)
            try:
                step = rule.forward(user, node, axes, cx)
            except GraphError:
                if not self.reaches_layer(user, True):
                    out.append(_Reach("open", src, None, bns))  # post-processing: W_{L+1}
                    continue
                raise
            if step.kind in ("open", "sink"):
                out.append(_Reach(step.kind, src, None, bns))
                continue
            if step.kind == "drop":
                continue
            if passed_fork and self.is_residual(rule, user, step.axes):
                out.append(_Reach("open", src, None, bns))  # the skip of a residual block
                continue
            new_axes = step.axes
            if step.map is not None:
                m = step.map
                nsrc = torch.where(m >= 0, src[m.clamp(min=0)], torch.full_like(m, -1))
                new_axes, nsrc = _drop_copies(user, new_axes, nsrc)
            else:
                nsrc = src
            nb = (*bns, (step.scale, nsrc)) if step.scale is not None else bns
            here = moved if new_axes == axes else f" (moved by {cx.describe(user)})"
            self.forward(user, new_axes, nsrc, passed_fork, out, nb, here)

    def _arrive(
        self,
        user: fx.Node,
        node: fx.Node,
        axes: tuple[int, ...],
        src: Tensor,
        out: list[_Reach],
        bns: tuple,
        moved: str,
    ) -> None:
        name = self.cx.layer_of[user]
        if self.cx.layer_input.get(user) is not node:
            raise GraphError(f"module '{name}' reads {self.cx.describe(node)} as its weight.")
        want = _norm_axis(self._unit_axis(name), node)
        if not set(axes) & set(want):
            out.append(_Reach("open", src, None, bns))  # a layer across another axis: 1
            return
        if axes != want:
            raise GraphError(
                f"units arrive at module '{name}' on axes {list(axes)}, not on its unit axis "
                f"{list(want)}{moved}; its neighbours cannot be read."
            )
        n_in = layer_type(self.cx.modules_by_name[name]).units(self.cx.modules_by_name[name])[0]
        if src.numel() != n_in:
            raise GraphError(
                f"module '{name}' reads {src.numel()} units where it has {n_in} inputs."
            )
        out.append(_Reach("layer", src, name, bns))


def _drop_copies(node: fx.Node, axes: tuple[int, ...], src: Tensor) -> tuple:
    """Unit axes along which every position holds the same unit are copies (a batch folded
    into heads): they stop being unit axes, and ``src`` keeps one copy."""
    sizes = tuple(shape(node)[a] for a in axes)
    if len(axes) < 2 or src.numel() != math.prod(sizes):
        return axes, src
    grid = src.view(sizes)
    copies = [
        i
        for i, n in enumerate(sizes)
        if n > 1 and torch.equal(grid, grid.narrow(i, 0, 1).expand_as(grid))
    ]
    if not copies or len(copies) == len(axes):
        return axes, src
    for i in reversed(copies):
        grid = grid.select(i, 0)
    return tuple(a for i, a in enumerate(axes) if i not in copies), grid.flatten()


def _one_copy(step, axes: tuple[int, ...], node: fx.Node):
    """A step onto more axes than the units here hold, restricted to them: the others hold
    copies of the same units, and one copy stands for all."""
    sizes = tuple(shape(node)[a] for a in step.axes)
    grid = (step.map if step.map is not None else torch.arange(math.prod(sizes))).view(sizes)
    for i in reversed(range(len(step.axes))):
        if step.axes[i] not in axes:
            grid = grid.select(i, 0)
    return dataclasses.replace(step, axes=axes, map=grid.flatten())


def branch_points(cx: Captured, model: nn.Module) -> list[str]:
    """Gates, concatenations of units and attention products: what module order cannot say."""
    cx.modules_by_name = dict(model.named_modules())
    walker = _Walker(cx, DEFAULT_RULES)
    found = []
    for node, axes in walker.axes_of.items():
        rule = walker.rule(node)
        if rule is ATTENTION or (rule is MATMUL and node not in cx.layer_of):
            found.append(f"{cx.describe(node)} is an attention product")
        elif rule.name in ("gate", "cat"):
            try:
                carriers = rule.carriers(node, axes, cx)
            except (GraphError, IndexError, TypeError, KeyError):
                continue
            if rule.name == "cat":
                _, dim = rule._parts(node)
                if dim not in axes:
                    continue
            if len({walker.source(c) for c in carriers}) > 1:
                kind = "a gate (a * b)" if rule.name == "gate" else "a concatenation of units"
                found.append(f"{cx.describe(node)} is {kind}")
    return found


def _unique(reaches: list[_Reach]) -> list[_Reach]:
    """Layer reaches once per (layer, unit map, scales): the paths inside one element-wise
    function (``x * sigmoid(x)``, tanh-GELU) are one connection, not several."""
    out, seen = [], []
    for r in reaches:
        if r.kind == "layer":
            key = (r.layer, tuple(id(b[0]) for b in r.bns))
            if any(k == key and torch.equal(i, r.index) for k, i in seen):
                continue
            seen.append((key, r.index))
        out.append(r)
    return out


def _count(index: Tensor, n: int) -> Tensor:
    valid = index[index >= 0]
    return torch.bincount(valid, minlength=n).float()


def _following_batchnorm(node: fx.Node, walker: _Walker) -> nn.Module | None:
    """The batch norm applied to this layer's output alone (Eq. 9's ``a_i``), if any."""
    while True:
        users = tensor_users(node)
        if len(users) != 1 or users[0].op == "output":
            return None
        user = users[0]
        mod = walker.cx.module(user)
        if isinstance(mod, BATCHNORM_TYPES):
            return mod
        if not isinstance(walker.rule(user), Same):
            return None
        node = user


def analyse(
    cx: Captured, model: nn.Module, rules: RuleSet = DEFAULT_RULES, strict: bool = True
) -> LayerGraph:
    """Layers and links of a captured graph; ``strict=False`` opens what cannot be followed."""
    cx.modules_by_name = dict(model.named_modules())
    cx.rules = rules
    walker = _Walker(cx, rules)
    layers: dict[str, Layer] = {}
    nodes: dict[str, fx.Node] = {}
    for node, name in cx.layer_of.items():
        layers[name] = new_layer(name, cx.modules_by_name[name])
        nodes[name] = node
    unreached = sorted(set(prunable_layers(model)) - set(layers))
    approximated: dict[str, str] = {}
    for name, node in nodes.items():
        layer = layers[name]
        src_node = cx.layer_input[node]
        axes = _norm_axis(layer_type(layer.module).unit_axis, src_node)
        back: list[_Reach] = []
        try:
            if shape(src_node)[axes[0]] != layer.in_units:
                raise GraphError(
                    f"module '{name}' reads {shape(src_node)[axes[0]]} units on axis "
                    f"{axes[0]} where it has {layer.in_units} inputs."
                )
            walker.back(src_node, axes, torch.arange(layer.in_units), False, back, (), "")
        except GraphError as exc:
            if strict:
                raise
            approximated[name] = f"inputs: {exc}"
            back = [_Reach("open", torch.arange(layer.in_units))]
        for r in _unique(back):
            if r.kind == "layer":
                layer.producers.append(Link(r.layer, name, r.index, r.bns))
            elif r.bns:
                layer.in_open_bn.append((r.index, r.bns))
            else:
                layer.in_open += (r.index >= 0).float()
        fwd: list[_Reach] = []
        out_axes = _norm_axis(layer_type(layer.module).unit_axis, node)
        try:
            walker.forward(node, out_axes, torch.arange(layer.out_units), False, fwd, (), "")
        except GraphError as exc:
            if strict:
                raise
            approximated[name] = approximated.get(name, "") + f" outputs: {exc}"
            fwd = [_Reach("open", torch.arange(layer.out_units))]
        if not fwd:  # outputs that only scale others (a one-unit gate): an open end
            fwd = [_Reach("open", torch.arange(layer.out_units))]
        sunk = torch.zeros(layer.out_units, dtype=torch.bool)
        for r in _unique(fwd):
            if r.kind == "layer":
                layer.consumers.append(Link(name, r.layer, r.index, r.bns))
            elif r.kind == "sink":
                sunk[r.index[r.index >= 0]] = True
            elif r.bns:
                layer.out_open_bn.append((r.index, r.bns))
            else:
                layer.out_open += _count(r.index, layer.out_units)
        layer.out_open += sunk.float()
        layer.batchnorm = _following_batchnorm(node, walker) if cx.how == "fx" else None
    return LayerGraph(layers, cx.how, unreached, approximated, cx.how)
