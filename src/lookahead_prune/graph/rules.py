"""What each op does to units: one small rule object per kind of op, registered per target.

A unit is a neuron (Linear, last axis) or a channel (Conv, axis 1). Walks carry, for the
tensor at a node, the axes its units live on (more than one after a head split) and a unit
map. Each rule answers, for an op and one of its inputs, where the units go: the same units on
new axes with an optional index map (``map[v]`` = the input unit feeding output unit ``v``),
or an end: ``open`` (no prunable layer on this side: a factor of 1, like the paper's W_0 and
W_{L+1}), ``sink`` (the units end in a product of two activations, as queries and keys do in
attention: factor 1), or ``drop`` (the input is a per-token statistic or scale, not a unit
carrier). Walking back uses the same answers, so each rule states its unit map once.

Rules are registered per target (module type, function, method name, aten op, or the dotted
name of a function or module type in a package that need not be installed) in
:data:`DEFAULT_RULES`; :func:`register_passthrough` adds unit-preserving ops. Where units
split into sub-axes, change order among their axes or fold with other dims, the rule states an
index map; nothing about units is approximated.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .capture import BATCHNORM_TYPES, NORM_TYPES, Captured, is_tensor, shape, tensor_args
from .types import GraphError, UnitScale

aten = torch.ops.aten


@dataclass(frozen=True)
class Step:
    """Where an op sends the units of one input: ``units`` (on ``axes``, mapped by ``map``) or an
    end (``open``, ``sink``, ``drop``); ``scale`` is a per-unit factor met at the op."""

    kind: str
    axes: tuple[int, ...] = ()
    map: Tensor | None = None
    scale: nn.Module | None = None


OPEN, SINK, DROP = Step("open"), Step("sink"), Step("drop")


def _ndim(node: fx.Node) -> int:
    return len(shape(node))


def _align(axes: tuple[int, ...], src: int, dst: int) -> tuple[int, ...] | None:
    """Axes of a tensor with ``src`` dims seen in a broadcast result with ``dst`` dims."""
    out = tuple(a - src + dst for a in axes)
    return out if all(a >= 0 for a in out) else None


def _sizes(node: fx.Node, axes: tuple[int, ...]) -> tuple[int, ...]:
    s = shape(node)
    return tuple(s[a] for a in axes)


def _grid(sizes: tuple[int, ...]) -> Tensor:
    """Unit ids laid out over the unit axes (row-major: the flat unit order)."""
    return torch.arange(math.prod(sizes)).view(sizes)


def _part_map(
    sizes_out: tuple[int, ...], pos: int, offset: int, sizes_part: tuple[int, ...]
) -> Tensor:
    """Map of a concatenation along unit axis ``pos``: the part's ids at ``offset``, -1 else."""
    g = torch.full(sizes_out, -1, dtype=torch.long)
    g.narrow(pos, offset, sizes_part[pos]).copy_(_grid(sizes_part))
    return g.flatten()


def _pick_map(sizes_in: tuple[int, ...], pos: int, picked: Tensor) -> Tensor:
    """Map of picking ``picked`` positions along unit axis ``pos``."""
    return _grid(sizes_in).index_select(pos, picked).flatten()


def n_units(node: fx.Node, axes: tuple[int, ...]) -> int:
    """Number of units of ``node`` on ``axes`` (their sizes multiplied)."""
    return math.prod(_sizes(node, axes))


def _dim(node: fx.Node, pos: int, name: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


class Rule:
    """Base rule: units pass unchanged from the first tensor input to the output."""

    name = "same"
    residual = False  # an add: its other inputs may be identity skips

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        """Where the units of input ``arg`` (on ``axes``) go at ``node``."""
        return Step("units", axes)

    def carriers(self, node: fx.Node, axes: tuple[int, ...], cx: Captured) -> list[fx.Node]:
        """The inputs whose units make ``node``'s units (walking back)."""
        args = [a for a in tensor_args(node) if a not in cx.params]
        return args[:1]

    def back_axes(
        self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured
    ) -> tuple[int, ...] | None:
        """Axes of ``arg`` that become ``axes`` of ``node`` (used where no annotation exists)."""
        return _align(axes, _ndim(node), _ndim(arg))


class Same(Rule):
    """Element-wise ops, activations, dropout, pooling, upsampling, casts: units stay put."""


class Norm(Rule):
    """Batch/layer/group/RMS norm: units stay put; the affine weight is a per-unit scale (Eq. 9).

    Batch norm contributes |gamma| / sqrt(running_var + eps) as in the paper; the others
    |gamma| (they normalise per sample, so no running statistics enter).
    """

    name = "norm"

    def __init__(self, weight_arg: int | None = None) -> None:
        self.weight_arg = weight_arg

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        if arg is not tensor_args(node)[0]:
            return DROP
        return Step("units", axes, None, self._scale(node, arg, axes, cx))

    def _scale(
        self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured
    ) -> nn.Module | None:
        n = n_units(arg, axes)
        mod = cx.module(node)
        if mod is not None:
            if isinstance(mod, BATCHNORM_TYPES):
                return mod if mod.num_features == n else None
            w = getattr(mod, "weight", None)
            source = f"module '{node.target}'"
        else:
            wnode = _dim(node, self.weight_arg, "weight") if self.weight_arg is not None else None
            if wnode not in cx.params:
                return None
            fqn, w = cx.params[wnode]
            owner = cx.modules.get(fqn.rsplit(".", 1)[0]) if "." in fqn else None
            if isinstance(owner, BATCHNORM_TYPES):
                return owner if owner.num_features == n else None
            source = fqn
        if not isinstance(w, Tensor) or w.numel() != n:
            return None
        return UnitScale(w, source)


class Add(Rule):
    """Residual add (or sub): units of every input that carries them meet, squared norms add."""

    name = "add"
    residual = True

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        out = _broadcast(node, arg, axes)
        return DROP if out is None else Step("units", out)  # None: a per-token shift

    def carriers(self, node: fx.Node, axes: tuple[int, ...], cx: Captured) -> list[fx.Node]:
        return [a for a in tensor_args(node) if a not in cx.params and _carries(a, node, axes)]


def _broadcast(node: fx.Node, arg: fx.Node, axes: tuple[int, ...]) -> tuple[int, ...] | None:
    """The unit axes of ``arg`` in an element-wise result; a size-1 unit axis broadcast there
    is no unit axis any more. None when ``arg`` is broadcast over units (it carries none)."""
    out = _align(axes, _ndim(arg), _ndim(node))
    if out is None:
        return None
    s_arg, s_node = _sizes(arg, axes), _sizes(node, out)
    kept = [(a, x) for a, x, y in zip(out, s_arg, s_node, strict=True) if not (x == 1 and y > 1)]
    if not kept or any(x != shape(node)[a] for a, x in kept):
        return None
    return tuple(a for a, _ in kept)


def _carries(arg: fx.Node, node: fx.Node, axes: tuple[int, ...]) -> bool:
    """Whether ``arg`` has all of ``node``'s units on ``axes`` (not broadcast over them)."""
    a = _align(axes, _ndim(node), _ndim(arg))
    return a is not None and _sizes(arg, a) == _sizes(node, axes)


class Mul(Rule):
    """Element-wise product: both inputs that carry units keep them (a gate: SE, GLU, SwiGLU);
    an input broadcast over units is a scale (RMSNorm's 1/rms, a token weight) and carries
    none; a constant weight shaped like the units is a per-unit scale, as a norm's affine."""

    name = "gate"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        out = _broadcast(node, arg, axes)
        if out is None:
            return DROP  # a statistic or per-token scale: it carries no units
        scale = None
        if node.target in _MUL_TARGETS:
            for other in tensor_args(node):
                if other is not arg and other in cx.params and _carries(other, node, out):
                    fqn, w = cx.params[other]
                    if w.numel() == n_units(node, out):
                        scale = UnitScale(w, fqn)
        return Step("units", out, None, scale)

    def carriers(self, node: fx.Node, axes: tuple[int, ...], cx: Captured) -> list[fx.Node]:
        return [a for a in tensor_args(node) if a not in cx.params and _carries(a, node, axes)]


_MUL_TARGETS: set[Any] = {
    operator.mul, operator.imul, torch.mul, "mul", "mul_", aten.mul.Tensor, aten.mul_.Tensor
}  # fmt: skip


class Cat(Rule):
    """Concatenation: along the unit axis units split among inputs; along another axis
    (tokens, a class token) every input keeps its units."""

    name = "cat"

    def _parts(self, node: fx.Node) -> tuple[list[Any], int]:
        tensors = node.args[0] if node.args else node.kwargs["tensors"]
        dim = _dim(node, 1, "dim", 0)
        return list(tensors), dim % _ndim(node)

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        tensors, dim = self._parts(node)
        if dim not in axes:
            return Step("units", axes)
        offset, pos = 0, axes.index(dim)
        out = None
        for t in tensors:
            if t is arg:  # the same tensor twice: each copy reads it
                m = _part_map(_sizes(node, axes), pos, offset, _sizes(arg, axes))
                out = m if out is None else torch.where(m >= 0, m, out)
            offset += shape(t)[dim]
        return Step("units", axes, out)

    def carriers(self, node: fx.Node, axes: tuple[int, ...], cx: Captured) -> list[fx.Node]:
        tensors, _ = self._parts(node)
        return list(
            dict.fromkeys(t for t in tensors if isinstance(t, fx.Node) and t not in cx.params)
        )


def _groups(si: tuple[int, ...], so: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Match the dims of a reshape into groups of equal size: [(input dims, output dims)]."""
    groups, i, j = [], 0, 0
    while i < len(si) or j < len(so):
        gi, gj, pi, pj = [], [], 1, 1
        if i < len(si):
            gi.append(i)
            pi *= si[i]
            i += 1
        if j < len(so):
            gj.append(j)
            pj *= so[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(si):
                gi.append(i)
                pi *= si[i]
                i += 1
            elif pj < pi and j < len(so):
                gj.append(j)
                pj *= so[j]
                j += 1
            else:
                return None
        # absorb trailing size-1 dims so a group never ends before them
        while i < len(si) and si[i] == 1 and (j >= len(so) or so[j] != 1):
            gi.append(i)
            i += 1
        while j < len(so) and so[j] == 1 and (i >= len(si) or si[i] != 1):
            gj.append(j)
            j += 1
        groups.append((gi, gj))
    return groups


class Reshape(Rule):
    """view/reshape/flatten/unflatten/squeeze/unsqueeze: units keep their flat order.

    Where unit dims are whole groups of the reshape, they move with them (a head split);
    where they lead a group that becomes one dim (flatten from ``[N, C, H, W]`` to
    ``[N, C*H*W]``), feature ``f`` is unit ``f // (H*W)``. A flatten into a Linear whose
    ``in_features`` disagree with a guessed input uses ``in_features // channels``.
    """

    name = "reshape"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        si, so = shape(arg), shape(node)
        ax = sorted(axes)
        groups = _groups(tuple(si), tuple(so))
        if groups is None and node.meta.get("lap_repaired") and len(so) == 2 and len(ax) == 1:
            c = si[ax[0]]
            if so[1] % c == 0 and ax[0] == 1:
                return Step("units", (1,), torch.arange(so[1]) // (so[1] // c))
        if groups is not None:
            touched = [g for g in groups if set(g[0]) & set(ax)]
            dims_in = [d for g in touched for d in g[0]]
            dims_out = [d for g in touched for d in g[1]]
            core_in = [d for d in dims_in if si[d] != 1]
            core_ax = [d for d in ax if si[d] != 1]
            if core_ax == core_in and dims_out:
                out = tuple(d for d in dims_out if so[d] != 1) or (dims_out[0],)
                return Step("units", out)
            contiguous = ax == list(range(ax[0], ax[-1] + 1))
            out_dims = [d for d in dims_out if so[d] != 1]
            if (
                len(touched) == 1
                and contiguous
                and len(out_dims) == 1
                and set(core_ax) <= set(core_in)
            ):
                # units are a run of dims inside one flattened group: feature f carries unit
                # (f // inner) % n: a flatten [N, C, H, W] -> [N, C*H*W] gives f // (H*W);
                # a merge of copies (heads repeated over grouped-query attention, tokens
                # flattened into features) gives f % n
                inner = math.prod(si[d] for d in core_in if d > core_ax[-1])
                n = math.prod(si[d] for d in core_ax)
                return Step("units", (out_dims[0],), torch.arange(so[out_dims[0]]) // inner % n)
        step = _reshape_map(tuple(si), tuple(so), ax, groups)
        if step is not None:
            return step
        raise GraphError(
            f"{cx.describe(node)} reshapes {list(si)} to {list(so)}, mixing units (axes "
            f"{ax}) with other dims; only flattening [N, C, ...] to [N, C*...], head "
            "splits/merges and shape-preserving views keep units traceable (where batch and "
            "heads share an axis, example_inputs with a batch of 1 keeps them apart)."
        )

    def back_axes(
        self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured
    ) -> tuple[int, ...] | None:
        si, so = shape(arg), shape(node)
        groups = _groups(tuple(si), tuple(so))
        if groups is None:
            return (1,) if len(si) > 1 else None
        touched = [g for g in groups if set(g[1]) & set(axes)]
        dims_in = [d for g in touched for d in g[0] if si[d] != 1]
        dims_out = [d for g in touched for d in g[1] if so[d] != 1]
        if sorted(axes) == dims_out:
            return tuple(dims_in) or None
        return (dims_in[0],) if dims_in else None


def _reshape_map(
    si: tuple[int, ...], so: tuple[int, ...], axes: list[int], groups: list | None
) -> Step | None:
    """Any reshape as an index map: lay the unit ids over the dims the units share a group
    with, reshape them as the op does, and keep the output dims the ids vary along. Units
    split into sub-axes (a fused qkv's (3, H, D)) or folded with batch or tokens into one
    axis (nn.MultiheadAttention's batch*heads, MobileViT's unfold) stay exact; positions
    holding the same unit are copies, which walks drop where no unit varies along them."""
    if groups is None:
        return None
    touched = [g for g in groups if set(g[0]) & set(axes)]
    dims_in = [d for g in touched for d in g[0]]
    dims_out = [d for g in touched for d in g[1]]
    if not dims_out or math.prod(si[d] for d in dims_in) > 1 << 22:
        return None
    ids = _grid(tuple(si[d] for d in axes))
    ids = ids.reshape([si[d] if d in axes else 1 for d in dims_in])
    ids = ids.expand([si[d] for d in dims_in]).reshape([so[d] for d in dims_out])
    keep = [i for i in range(ids.dim()) if not torch.equal(ids, ids.narrow(i, 0, 1).expand_as(ids))]
    if not keep:
        return None
    sub = ids
    for i in reversed(range(ids.dim())):
        if i not in keep:
            sub = sub.select(i, 0)
    flat = sub.flatten()
    same = torch.equal(flat, torch.arange(flat.numel()))
    return Step("units", tuple(dims_out[i] for i in keep), None if same else flat)


class Reduce(Rule):
    """mean/sum/amax over other axes keep units (pooling, a mean over tokens); over the unit
    axis with keepdim it is a statistic (a norm's mean square) and carries no units; without
    keepdim it mixes units and is refused."""

    name = "reduce"

    def _dims(self, node: fx.Node, arg: fx.Node) -> tuple[list[int], bool]:
        n = _ndim(arg)
        dim = _dim(node, 1, "dim")
        keep = bool(_dim(node, 2, "keepdim", False))
        if dim is None or dim == []:
            return list(range(n)), keep
        dims = [dim] if isinstance(dim, int) else list(dim)
        return sorted(d % n for d in dims), keep

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        dims, keep = self._dims(node, arg)
        if set(dims) & set(axes):
            if keep:
                return DROP
            raise GraphError(
                f"{cx.describe(node)} reduces {list(shape(arg))} to {list(shape(node))} "
                "across units; only reductions over other dimensions keep units traceable."
            )
        if keep:
            return Step("units", axes)
        return Step("units", tuple(a - sum(d < a for d in dims) for a in axes))

    def back_axes(
        self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured
    ) -> tuple[int, ...] | None:
        dims, keep = self._dims(node, arg)
        if keep:
            return axes
        kept = [d for d in range(_ndim(arg)) if d not in dims]
        return tuple(kept[a] for a in axes)


_TRANSPOSES: tuple[Any, ...] = (
    "transpose", "transpose_", "swapaxes", "swapdims", aten.transpose.int, torch.transpose,
    torch.swapaxes, torch.swapdims, aten.swapaxes.default, aten.swapdims.default,
)  # fmt: skip


class Permute(Rule):
    """transpose/permute/swapaxes: units move with their axes; where unit axes swap among
    themselves (a channel shuffle) the units are renumbered by an index map."""

    name = "permute"

    def _perm(self, node: fx.Node, arg: fx.Node) -> list[int]:
        n = _ndim(arg)
        target = node.target
        if target in ("t", aten.t.default, torch.t):
            return [1, 0] if n == 2 else list(range(n))
        if target in _TRANSPOSES:
            d0 = _dim(node, 1, "dim0", node.kwargs.get("axis0")) % n
            d1 = _dim(node, 2, "dim1", node.kwargs.get("axis1")) % n
            perm = list(range(n))
            perm[d0], perm[d1] = perm[d1], perm[d0]
            return perm
        dims = node.args[1:] if target == "permute" else (_dim(node, 1, "dims"),)
        if len(dims) == 1 and isinstance(dims[0], list | tuple):
            dims = dims[0]
        return [d % n for d in dims]

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        perm = self._perm(node, arg)
        new = [perm.index(a) for a in axes]
        if new == sorted(new):
            return Step("units", tuple(new))
        # the unit axes change order among themselves (channel shuffle): the same units, laid
        # out anew: unit v (row-major over the new order) is the input unit at the same place
        order = sorted(range(len(new)), key=new.__getitem__)
        grid = _grid(_sizes(arg, axes)).permute(order)
        return Step("units", tuple(sorted(new)), grid.flatten())

    def back_axes(
        self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured
    ) -> tuple[int, ...] | None:
        perm = self._perm(node, arg)
        return tuple(sorted(perm[a] for a in axes))


class Roll(Rule):
    """roll: units stay; rolled along a unit axis, unit ``v`` is the input unit ``v - shift``."""

    name = "roll"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        shifts, dims = _dim(node, 1, "shifts"), _dim(node, 2, "dims", None)
        shifts = [shifts] if isinstance(shifts, int) else list(shifts)
        if dims is None or dims == []:
            raise GraphError(f"{cx.describe(node)} rolls the flattened tensor.")
        dims = [dims] if isinstance(dims, int) else list(dims)
        grid = _grid(_sizes(arg, axes))
        moved = False
        for sh, d in zip(shifts, dims, strict=True):
            d %= _ndim(arg)
            if d in axes:
                grid, moved = grid.roll(sh, axes.index(d)), True
        return Step("units", axes, grid.flatten() if moved else None)


class Pad(Rule):
    """Constant padding: on other axes units stay; padded along a unit axis, the new places
    hold no unit (-1) and the others their input unit."""

    name = "pad"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        pad = list(_dim(node, 1, "pad"))
        n = _ndim(arg)
        padded = {n - 1 - i // 2 for i, p in enumerate(pad) if p}
        if not padded & set(axes):
            return Step("units", axes)
        mode = _dim(node, 2, "mode", "constant")
        if mode != "constant" and node.target is not aten.constant_pad_nd.default:
            raise GraphError(f"{cx.describe(node)} pads the unit axis in mode {mode!r}.")
        g = _grid(_sizes(arg, axes))
        for i in range(0, len(pad), 2):
            d = n - 1 - i // 2
            if d in axes:
                lo, hi = pad[i], pad[i + 1]
                k = axes.index(d)
                g = g.narrow(k, max(-lo, 0), g.shape[k] - max(-lo, 0) - max(-hi, 0))
                parts = [
                    torch.full((*g.shape[:k], max(x, 0), *g.shape[k + 1 :]), -1) for x in (lo, hi)
                ]
                g = torch.cat([parts[0], g, parts[1]], k)
        return Step("units", axes, g.flatten())


class Split(Rule):
    """split/chunk/unbind: the tuple holds the same units; ``getitem`` picks a part of them."""

    name = "split"


class GetItem(Rule):
    """``x[i]`` of a split (a slice of units along the split axis, or all of them), of a
    multi-output op (max pool with indices, batch norm) or indexing a tensor on other axes."""

    name = "getitem"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        src, idx = node.args[0], node.args[1]
        if isinstance(shape(src), list):
            split_rule = rule_for(src, cx, cx.rules or DEFAULT_RULES)
            if not isinstance(split_rule, Split):
                return Step("units", axes) if idx == 0 else DROP
            parts = shape(src)
            dim = _split_dim(src)
            if _is_unbind(src):
                dim %= len(parts[0]) + 1
                rest = tuple(a - (dim < a) for a in axes if a != dim)
                if dim not in axes:
                    return Step("units", rest)
                if not rest:
                    raise GraphError(f"{cx.describe(src)} unbinds along a unit axis.")
                # one slice of a unit axis split in sub-axes (q, k or v of a fused qkv)
                grid = _grid(_sizes(src.args[0], axes)).select(axes.index(dim), idx)
                return Step("units", rest, grid.flatten())
            dim %= len(parts[0])
            if dim not in axes:
                return Step("units", axes)
            offset = sum(p[dim] for p in parts[:idx])
            picked = torch.arange(parts[idx][dim]) + offset
            whole = _sizes(src.args[0], axes)
            return Step("units", axes, _pick_map(whole, axes.index(dim), picked))
        return _index_step(node, arg, axes, idx, cx)

    def carriers(self, node: fx.Node, axes: tuple[int, ...], cx: Captured) -> list[fx.Node]:
        return [node.args[0]]

    def back_axes(
        self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured
    ) -> tuple[int, ...] | None:
        src = node.args[0]
        if isinstance(shape(src), list):
            if _is_unbind(src):
                dim = _split_dim(src) % (len(shape(src)[0]) + 1)
                return tuple(a + (a >= dim) for a in axes)
            return axes
        return None


def _split_dim(node: fx.Node) -> int:
    if _is_unbind(node):
        return _dim(node, 1, "dim", 0)
    return _dim(node, 2, "dim", 0)


def _is_unbind(node: fx.Node) -> bool:
    return node.target in (torch.unbind, "unbind", aten.unbind.int)


def _index_step(node: fx.Node, arg: fx.Node, axes: tuple[int, ...], idx: Any, cx: Captured) -> Step:
    """Tensor indexing (ints, slices, None, ..., index tensors): units stay unless an int or
    an index tensor picks among them. Index tensors on other axes (``x[arange(B), ids]``,
    CLIP's pooling of one token per sequence) gather positions and keep units."""
    if arg is not node.args[0]:
        return DROP  # the index tensor
    items = list(idx) if isinstance(idx, tuple | list) else [idx]
    n = _ndim(arg)
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        fill = n - sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:k] + [slice(None)] * fill + items[k + 1 :]
    advanced = any(is_tensor(i) for i in items)
    kinds: list[tuple[str, int | None]] = []  # per item: (kind, input dim)
    grid, changed, picks = _grid(_sizes(arg, axes)), False, []
    d_in = 0
    for item in items:
        if item is None:
            kinds.append(("new", None))
        elif isinstance(item, int) and not isinstance(item, bool):
            if d_in in axes and (advanced or len(axes) == 1):
                raise GraphError(f"{cx.describe(node)} indexes a single unit of axis {d_in}.")
            if d_in in axes:  # one slice of a unit axis split in sub-axes (qkv[0])
                picks.append((axes.index(d_in), item % shape(arg)[d_in]))
            kinds.append(("adv" if advanced else "int", d_in))
            d_in += 1
        elif isinstance(item, slice):
            bounds = (item.start, item.stop, item.step)
            if d_in not in axes:
                picked = range(shape(arg)[d_in])  # tokens, time: any slice keeps units
            elif any(isinstance(b, fx.Node) for b in bounds):
                raise GraphError(f"{cx.describe(node)} slices units by a traced size.")
            else:
                picked = range(*item.indices(shape(arg)[d_in]))
            if d_in in axes and len(picked) != shape(arg)[d_in]:
                idx_t = torch.tensor(list(picked), dtype=torch.long)
                grid, changed = grid.index_select(axes.index(d_in), idx_t), True
            kinds.append(("keep", d_in))
            d_in += 1
        elif is_tensor(item):
            if d_in in axes:
                raise GraphError(f"{cx.describe(node)} gathers units of axis {d_in} by a tensor.")
            kinds.append(("adv", d_in))
            d_in += 1
        else:
            raise GraphError(f"{cx.describe(node)} indexes with {type(item).__name__}.")
    kinds += [("keep", d) for d in range(d_in, n)]
    n_adv = max((len(shape(i)) for i in items if is_tensor(i)), default=0)
    for pos, at in sorted(picks, reverse=True):
        grid, changed = grid.select(pos, at), True
    if len(picks) == len(axes):
        raise GraphError(f"{cx.describe(node)} indexes single units.")
    picked_axes = {axes[pos] for pos, _ in picks}
    kept = tuple(a for a in axes if a not in picked_axes)
    out = _indexed_axes(kinds, kept, _ndim(node), n_adv)
    return Step("units", out, grid.flatten() if changed else None)


def _indexed_axes(
    kinds: list[tuple[str, int | None]], axes: tuple[int, ...], n_out: int, n_adv: int
) -> tuple[int, ...]:
    """Where kept input axes land after indexing: basic items in order; the ``n_adv`` dims of
    the broadcast index tensors replace the first of them when they are adjacent, else lead."""
    adv = [i for i, (k, _) in enumerate(kinds) if k == "adv"]
    basic = sum(1 for k, _ in kinds if k in ("keep", "new"))
    if basic + (n_adv if adv else 0) != n_out:  # a boolean mask spans several dims
        raise GraphError("indexing by a mask or by tensors of another shape than told")
    at_front = bool(adv) and adv != list(range(adv[0], adv[-1] + 1))
    mapping: dict[int, int] = {}
    out = n_adv if at_front else 0
    placed = at_front
    for kind, d in kinds:
        if kind == "adv":
            if not placed:
                out += n_adv
                placed = True
        elif kind == "new":
            out += 1
        elif kind == "keep":
            mapping[d] = out
            out += 1
    return tuple(mapping[a] for a in axes)


class Index(Rule):
    """aten ``index.Tensor(x, [i0, None, ...])``: index tensors on other axes keep units."""

    name = "index"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        if arg is not node.args[0]:
            return DROP
        items = [slice(None) if i is None else i for i in node.args[1]]
        return _index_step(node, arg, axes, tuple(items), cx)

    def carriers(self, node: fx.Node, axes: tuple[int, ...], cx: Captured) -> list[fx.Node]:
        return [node.args[0]]


class Select(Rule):
    """aten select/slice: away from the unit axes units stay (a class token, a time step)."""

    name = "select"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        n = _ndim(arg)
        dim = _dim(node, 1, "dim", 0) % n
        if node.target == aten.select.int:
            rest = tuple(a - (dim < a) for a in axes if a != dim)
            if dim not in axes:
                return Step("units", rest)
            if not rest:
                raise GraphError(f"{cx.describe(node)} selects a single unit of axis {dim}.")
            # one slice of a split unit axis (q, k or v of a packed projection)
            index = _dim(node, 2, "index", 0) % shape(arg)[dim]
            grid = _grid(_sizes(arg, axes)).select(axes.index(dim), index)
            return Step("units", rest, grid.flatten())
        if dim in axes and shape(node)[dim] != shape(arg)[dim]:
            start = _dim(node, 2, "start", 0) or 0
            end = _dim(node, 3, "end", None)
            step = _dim(node, 4, "step", 1) or 1
            picked = torch.arange(*slice(start, end, step).indices(shape(arg)[dim]))
            return Step("units", axes, _pick_map(_sizes(arg, axes), axes.index(dim), picked))
        return Step("units", axes)

    def back_axes(
        self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured
    ) -> tuple[int, ...] | None:
        if node.target == aten.select.int:
            dim = _dim(node, 1, "dim", 0) % _ndim(arg)
            return tuple(a + (a >= dim) for a in axes)
        return axes


class MatMul(Rule):
    """``a @ b``: units of ``b`` on its last axis (values in attention) or of ``a`` on its
    second-to-last pass to the product; units on the contracted axis end there (``q @ k^T``:
    a product of two activations, an open end with factor 1)."""

    name = "matmul"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        a, b = node.args[0], node.args[1]
        n, na, nb = _ndim(node), _ndim(a), _ndim(b)
        if arg is b and arg is not a:
            if nb >= 2 and nb - 2 in axes:
                return SINK
            return Step("units", _align(axes, nb, n) or axes)
        if na >= 2 and na - 1 in axes:
            return SINK
        return Step("units", _align(axes, na, n) or axes)

    def carriers(self, node: fx.Node, axes: tuple[int, ...], cx: Captured) -> list[fx.Node]:
        a, b = node.args[0], node.args[1]
        n = _ndim(node)
        if n - 1 in axes:
            return [b]
        if n >= 2 and n - 2 in axes:
            return [a]
        return [a, b]


class Einsum(Rule):
    """``torch.einsum``: a unit axis whose letter is in the output moves there; one summed
    over is contracted (an open end, as ``q @ k^T``). Walking back, the output's units come
    from the inputs that hold all of their letters (v in ``bhqk,bhkd->bhqd``)."""

    name = "einsum"

    def _spec(self, node: fx.Node, cx: Captured) -> tuple[list[str], str, list[fx.Node]]:
        eq = node.args[0].replace(" ", "")
        operands = node.args[1:]
        if len(operands) == 1 and isinstance(operands[0], list | tuple):
            operands = operands[0]
        lhs, out = eq.split("->") if "->" in eq else (eq, None)
        ins = lhs.split(",")
        if out is None or "." in eq:
            raise GraphError(f"{cx.describe(node)} uses an implicit or '...' einsum equation.")
        return ins, out, list(operands)

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        ins, out, operands = self._spec(node, cx)
        letters = ins[operands.index(arg)]
        unit = [letters[a] for a in axes]
        if any(u not in out for u in unit):
            return SINK
        new = [out.index(u) for u in unit]
        if new == sorted(new):
            return Step("units", tuple(new))
        order = sorted(range(len(new)), key=new.__getitem__)  # renumbered, as by permute
        grid = _grid(_sizes(arg, axes)).permute(order)
        return Step("units", tuple(sorted(new)), grid.flatten())

    def carriers(self, node: fx.Node, axes: tuple[int, ...], cx: Captured) -> list[fx.Node]:
        ins, out, operands = self._spec(node, cx)
        unit = {out[a] for a in axes}
        return [op for op, letters in zip(operands, ins, strict=True) if unit <= set(letters)]


class Attention(Rule):
    """scaled_dot_product_attention(q, k, v): the output holds v's units, mixed over tokens by
    the attention weights; q and k end in their product (open ends, factor 1)."""

    name = "attention"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        q, k, v = node.args[:3]
        if arg is v and arg is not q and arg is not k:
            if _ndim(v) - 2 in axes:
                raise GraphError(f"{cx.describe(node)} reads units on the token axis of v.")
            return Step("units", _align(axes, _ndim(v), _ndim(node)) or axes)
        if arg is q or arg is k:
            return SINK
        return DROP  # the mask

    def carriers(self, node: fx.Node, axes: tuple[int, ...], cx: Captured) -> list[fx.Node]:
        return [node.args[2]]


class Expand(Rule):
    """expand/broadcast: units stay where their sizes do not change. A size-1 axis right
    after a unit axis that is expanded holds copies of those units (grouped-query attention's
    ``repeat_kv``: key/value heads repeated for several query heads), so it joins the units
    and each copy maps to the unit it copies."""

    name = "expand"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        out = _align(axes, _ndim(arg), _ndim(node))
        if out is None or _sizes(node, out) != _sizes(arg, axes):
            raise GraphError(f"{cx.describe(node)} broadcasts across units.")
        si = (1,) * (_ndim(node) - _ndim(arg)) + tuple(shape(arg))
        so = shape(node)
        copies = [a + 1 for a in out if a + 1 < len(so) and si[a + 1] == 1 and so[a + 1] > 1]
        copies = [c for c in copies if c not in out]
        if not copies:
            return Step("units", out)
        new = tuple(sorted((*out, *copies)))
        sizes = [so[a] if a in out else 1 for a in new]
        grid = _grid(_sizes(arg, axes)).reshape(sizes).expand(*(so[a] for a in new))
        return Step("units", new, grid.flatten())


class Unsupported(Rule):
    """An op without a rule: walks fail here unless no prunable layer lies beyond it."""

    name = "unsupported"

    def forward(self, node: fx.Node, arg: fx.Node, axes: tuple[int, ...], cx: Captured) -> Step:
        raise GraphError(unsupported_message(node, cx))


def unsupported_message(node: fx.Node, cx: Captured) -> str:
    """One line naming an op the walks cannot follow and the ways out."""
    return (
        f"cannot follow units through {cx.describe(node)}. Supported: activations, "
        "dropout, pooling, norms, flatten/view, residual add, cat, gates (a * b), "
        "upsampling, attention. Register a unit-preserving op with "
        "lookahead_prune.graph.register_passthrough(...), pass strict=False to give the "
        "layers next to it a factor of 1 there, or graph='sequential' to chain layers in "
        "module order."
    )


@dataclass
class RuleSet:
    """Rules per target: module types, functions, method names, aten ops; ``version`` enters
    the graph cache's signature so a registration rebuilds cached graphs."""

    modules: dict[type, Rule] = field(default_factory=dict)
    functions: dict[Any, Rule] = field(default_factory=dict)
    methods: dict[str, Rule] = field(default_factory=dict)
    version: int = 0
    named: dict[str, Rule] = field(default_factory=dict)  # "package.module.name" -> rule

    def copy(self) -> RuleSet:
        """An independent rule set starting from this one (to extend for one model)."""
        return RuleSet(
            dict(self.modules), dict(self.functions), dict(self.methods), 0, dict(self.named)
        )

    def add(self, rule: Rule, *targets: Any) -> None:
        """Register ``rule`` for each target: a module type, a function/op, a method name, or
        the dotted name of a function or module type in a package that need not be installed
        (``"torchvision.ops.stochastic_depth.stochastic_depth"``)."""
        for t in targets:
            if isinstance(t, type) and issubclass(t, nn.Module):
                self.modules[t] = rule
            elif isinstance(t, str) and "." in t:
                self.named[t] = rule
            elif isinstance(t, str):
                self.methods[t] = rule
            else:
                self.functions[t] = rule
        self.version += 1


SAME, NORM, ADD, MUL, CAT = Same(), Norm(), Add(), Mul(), Cat()
RESHAPE, REDUCE, PERMUTE, SPLIT, GETITEM = Reshape(), Reduce(), Permute(), Split(), GetItem()
SELECT, MATMUL, ATTENTION, EXPAND, UNSUPPORTED = (
    Select(),
    MatMul(),
    Attention(),
    Expand(),
    Unsupported(),
)

DEFAULT_RULES = RuleSet()
"""The rules every graph build uses; :func:`register_passthrough` adds to them."""

_same_modules = [
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
    nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid,
    nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d, nn.ConstantPad2d, nn.ReflectionPad2d,
    nn.ReplicationPad2d,
]  # fmt: skip
_same_functions = [
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.gelu, F.silu, F.mish, F.hardtanh,
    F.hardswish, F.hardsigmoid, F.softplus, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.sigmoid, F.tanh, F.interpolate, F.upsample,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.neg, torch.abs,
    torch.square, torch.sqrt, torch.rsqrt, torch.clamp, operator.neg, operator.pow, torch.pow,
]  # fmt: skip
_same_methods = [
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "double",
    "half", "bfloat16", "to", "type_as", "pow", "neg", "abs", "sqrt", "rsqrt", "exp",
    "square", "clamp", "masked_fill",
]  # fmt: skip
_same_aten = [
    "relu.default", "relu_.default", "gelu.default", "silu.default", "silu_.default",
    "sigmoid.default", "tanh.default", "hardtanh.default", "hardswish.default",
    "hardsigmoid.default", "leaky_relu.default", "elu.default", "mish.default",
    "softplus.default", "relu6.default", "dropout.default", "clone.default",
    "contiguous.default", "alias.default", "detach.default", "_to_copy.default",
    "to.dtype", "to.dtype_layout", "to.device", "type_as.default", "neg.default",
    "pow.Tensor_Scalar", "rsqrt.default", "sqrt.default", "exp.default", "abs.default",
    "square.default", "clamp.default", "max_pool1d.default", "max_pool2d.default",
    "max_pool3d.default", "avg_pool1d.default", "avg_pool2d.default", "avg_pool3d.default",
    "adaptive_avg_pool1d.default", "adaptive_avg_pool2d.default",
    "adaptive_avg_pool3d.default", "upsample_nearest1d.vec", "upsample_nearest2d.vec",
    "upsample_nearest3d.vec", "upsample_bilinear2d.vec", "upsample_linear1d.vec",
    "upsample_trilinear3d.vec", "_upsample_nearest_exact2d.vec",
    "upsample_nearest2d.default", "upsample_bilinear2d.default", "mul.Scalar", "add.Scalar",
    "sub.Scalar", "div.Scalar", "masked_fill.Scalar", "max_pool2d_with_indices.default",
    "hardtanh_.default",
    "gelu_.default", "sigmoid_.default", "tanh_.default", "leaky_relu_.default",
    "hardswish_.default", "mul_.Scalar", "add_.Scalar", "div_.Scalar", "dropout_.default",
]  # fmt: skip


def _op(name: str) -> Any:
    packet, overload = name.split(".")
    return getattr(getattr(aten, packet), overload)


DEFAULT_RULES.add(SAME, *_same_modules, *_same_functions, *_same_methods)
DEFAULT_RULES.add(SAME, *(_op(n) for n in _same_aten))
DEFAULT_RULES.add(NORM, *BATCHNORM_TYPES, *NORM_TYPES, F.batch_norm, F.layer_norm)
DEFAULT_RULES.add(Norm(2), aten.layer_norm.default, aten.group_norm.default, aten.rms_norm.default)
DEFAULT_RULES.add(
    Norm(1), aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default
)
DEFAULT_RULES.add(ADD, operator.add, operator.iadd, operator.sub, operator.isub, torch.add)
DEFAULT_RULES.add(ADD, torch.sub, "add", "add_", "sub", "sub_", aten.add.Tensor, aten.sub.Tensor)
DEFAULT_RULES.add(ADD, aten.add_.Tensor, aten.sub_.Tensor)
DEFAULT_RULES.add(MUL, operator.mul, operator.imul, operator.truediv, operator.itruediv)
DEFAULT_RULES.add(MUL, torch.mul, torch.div, "mul", "mul_", "div", "div_")
DEFAULT_RULES.add(MUL, aten.mul.Tensor, aten.div.Tensor, aten.mul_.Tensor, aten.div_.Tensor)
DEFAULT_RULES.add(CAT, torch.cat, torch.concat, aten.cat.default)
DEFAULT_RULES.add(RESHAPE, nn.Flatten, nn.Unflatten, torch.flatten, torch.reshape)
DEFAULT_RULES.add(RESHAPE, torch.squeeze, torch.unsqueeze, "view", "reshape", "flatten")
DEFAULT_RULES.add(RESHAPE, "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as")
DEFAULT_RULES.add(RESHAPE, aten.view.default, aten.reshape.default, aten._unsafe_view.default)
DEFAULT_RULES.add(RESHAPE, aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.dim)
DEFAULT_RULES.add(RESHAPE, aten.squeeze.dims, aten.unsqueeze.default, aten.squeeze.default)
DEFAULT_RULES.add(REDUCE, torch.mean, torch.sum, torch.amax, "mean", "sum", "amax")
DEFAULT_RULES.add(REDUCE, aten.mean.dim, aten.sum.dim_IntList, aten.amax.default)
DEFAULT_RULES.add(PERMUTE, torch.transpose, torch.permute, torch.t, "transpose", "permute", "t")
DEFAULT_RULES.add(PERMUTE, "swapaxes", aten.transpose.int, aten.permute.default, aten.t.default)
DEFAULT_RULES.add(SPLIT, torch.split, torch.chunk, torch.unbind, "split", "chunk", "unbind")
DEFAULT_RULES.add(SPLIT, aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
DEFAULT_RULES.add(SPLIT, aten.unbind.int)
DEFAULT_RULES.add(GETITEM, operator.getitem)
DEFAULT_RULES.add(SELECT, aten.select.int, aten.slice.Tensor)
DEFAULT_RULES.add(MATMUL, torch.matmul, operator.matmul, torch.bmm, "matmul", "bmm")
DEFAULT_RULES.add(MATMUL, aten.matmul.default, aten.bmm.default)
DEFAULT_RULES.add(
    ATTENTION, F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default
)
DEFAULT_RULES.add(EXPAND, "expand", "expand_as", aten.expand.default)
DEFAULT_RULES.add(Roll(), torch.roll, "roll", aten.roll.default)
DEFAULT_RULES.add(Pad(), F.pad, aten.pad.default, aten.constant_pad_nd.default)
DEFAULT_RULES.add(PERMUTE, torch.swapaxes, torch.swapdims, "swapdims", aten.swapaxes.default)
DEFAULT_RULES.add(PERMUTE, aten.swapdims.default)
DEFAULT_RULES.add(ADD, torch.addcmul, torch.addcdiv, "addcmul", "addcmul_", "addcdiv")
DEFAULT_RULES.add(ADD, "addcdiv_", aten.addcmul.default, aten.addcdiv.default)
DEFAULT_RULES.add(Index(), aten.index.Tensor)
# per-sample random scaling (stochastic depth, drop path): the same units; torchvision's
# function is kept whole by torch.fx (it is fx-wrapped), so it needs a rule by name
DEFAULT_RULES.add(
    SAME,
    "torchvision.ops.stochastic_depth.stochastic_depth",
    "torchvision.ops.stochastic_depth.StochasticDepth",
)
DEFAULT_RULES.add(Einsum(), torch.einsum, aten.einsum.default)


def _qualified(target: Any) -> str:
    return f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"


def rule_for(node: fx.Node, cx: Captured, rules: RuleSet = DEFAULT_RULES) -> Rule:
    """The rule for a node: by module type (subclasses of norms too), function or method."""
    if node.op == "call_module":
        mod = cx.module(node)
        rule = rules.modules.get(type(mod)) or rules.named.get(_qualified(type(mod)))
        if rule is None and isinstance(mod, BATCHNORM_TYPES + NORM_TYPES):
            rule = NORM
        return rule or UNSUPPORTED
    if node.op == "call_function":
        rule = rules.functions.get(node.target)
        if rule is None and hasattr(node.target, "overloadpacket"):
            rule = rules.functions.get(node.target.overloadpacket)
        if rule is None and rules.named:
            rule = rules.named.get(_qualified(node.target))
        return rule or UNSUPPORTED
    if node.op == "call_method":
        return rules.methods.get(node.target, UNSUPPORTED)
    return UNSUPPORTED


def register_passthrough(target: type[nn.Module] | Callable[..., Any] | str) -> None:
    """Declare a module type, function, aten op or method name unit-preserving (an activation).

    A target that already has a rule other than pass-through (a gate, an add, a reshape)
    keeps it: replacing it would silently lose units, so that is refused.
    """
    if isinstance(target, type) and issubclass(target, nn.Module):
        current = DEFAULT_RULES.modules.get(target)
    elif isinstance(target, str) and "." in target:
        current = DEFAULT_RULES.named.get(target)
    elif isinstance(target, str):
        current = DEFAULT_RULES.methods.get(target)
    else:
        current = DEFAULT_RULES.functions.get(target)
    if current is not None and not isinstance(current, Same):
        name = getattr(target, "__name__", str(target))
        raise ValueError(f"{name} already has the '{current.name}' rule; it is followed as is")
    DEFAULT_RULES.add(SAME, target)
