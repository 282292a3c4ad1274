"""Read a model as a chain of Linear layers and element-wise activations, or say why not.

The grouped sparse engine (:mod:`lookahead_prune.sparse_group`) can train a model only if
its forward pass is ``flatten -> Linear -> act -> Linear -> ... -> Linear``, where every
activation acts on each unit alone (so it does not care how the units of many models are
laid out). The chain is read from the ``torch.fx`` graph, not from module order, so a model
whose ``forward`` skips, reorders or reuses modules is refused instead of being misread.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = [
    "ELEMENTWISE_FUNCTIONS",
    "ELEMENTWISE_MODULES",
    "ChainStep",
    "mlp_chain",
    "mlp_chain_or_none",
]

ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.GELU,
    nn.SiLU,
    nn.ELU,
    nn.Softplus,
    nn.Hardtanh,
    nn.Identity,
)
"""Activation modules that act on every unit alone (no state, no randomness)."""

ELEMENTWISE_FUNCTIONS: frozenset[Callable[..., object]] = frozenset(
    {F.relu, torch.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu, F.elu}
)
"""Activation functions called in ``forward`` that act on every unit alone."""

_FLATTEN_METHODS = frozenset({"flatten", "view", "reshape"})

_IN_PLACE: dict[object, Callable[[torch.Tensor], torch.Tensor]] = {
    nn.ReLU: torch.relu_,
    nn.Sigmoid: torch.sigmoid_,
    nn.Tanh: torch.tanh_,
    F.relu: torch.relu_,
    torch.relu: torch.relu_,
    torch.sigmoid: torch.sigmoid_,
    F.sigmoid: torch.sigmoid_,
    torch.tanh: torch.tanh_,
    F.tanh: torch.tanh_,
}
"""In-place forms of common activations, for a caller that owns the input (saves a buffer)."""


@dataclass(frozen=True)
class ChainStep:
    """One step of the chain: a ``Linear`` layer (by qualified name) or an activation.

    ``act`` is the callable applied to the pre-activations (a module or a function with
    its constant keyword arguments bound), ``act_`` the same in place where one is known;
    ``signature`` identifies the step across models.
    """

    kind: str  # "linear" or "act"
    name: str
    act: Callable[[torch.Tensor], torch.Tensor] | None = None
    signature: tuple[object, ...] = ()
    act_: Callable[[torch.Tensor], torch.Tensor] | None = None


def mlp_chain(model: nn.Module) -> list[ChainStep]:
    """The model's forward pass as Linear and activation steps; ``ValueError`` if it is not one.

    A flatten (module, ``torch.flatten`` or ``view``/``reshape``/``flatten``) may only come
    before the first Linear layer. Dropout, normalisation, residuals or any other op refuse.
    """
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as error:  # fx raises many kinds; the message is what matters
        raise ValueError(f"torch.fx cannot trace {type(model).__name__}: {error}") from None
    modules = dict(model.named_modules())
    steps: list[ChainStep] = []
    previous: fx.Node | None = None
    for node in graph.nodes:
        if _is_shape_query(node):  # x.shape[0], x.size(0): read sizes, carry no units
            continue
        if node.op == "placeholder":
            if previous is not None:
                raise ValueError("the model takes more than one input")
            previous = node
            continue
        if node.op == "output":
            if node.args[0] is not previous:
                raise ValueError("the model's output is not the last layer's result")
            break
        inputs = [n for n in node.all_input_nodes if not _is_shape_query(n)]
        users = [n for n in previous.users if not _is_shape_query(n)]
        if len(inputs) != 1 or inputs[0] is not previous or len(users) != 1:
            raise ValueError(f"'{node.name}' is not a step of a plain chain (branch or skip)")
        steps.extend(_step(node, modules, seen_linear=any(s.kind == "linear" for s in steps)))
        previous = node
    if not any(s.kind == "linear" for s in steps):
        raise ValueError(f"{type(model).__name__} has no Linear layer")
    return steps


def mlp_chain_or_none(model: nn.Module) -> list[ChainStep] | None:
    """:func:`mlp_chain`, or None where the model is not such a chain."""
    try:
        return mlp_chain(model)
    except ValueError:
        return None


def _is_shape_query(node: fx.Node) -> bool:
    """Whether ``node`` only reads sizes (``x.shape``, ``x.size()``, an index of them)."""
    if node.op == "call_method" and node.target in ("size", "dim"):
        return True
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    if node.op == "call_function" and node.target is operator.getitem:
        source = node.args[0]
        return isinstance(source, fx.Node) and _is_shape_query(source)
    return False


def _step(node: fx.Node, modules: dict[str, nn.Module], *, seen_linear: bool) -> list[ChainStep]:
    """The chain step(s) for one graph node: none for a leading flatten."""
    if node.op == "call_module":
        module = modules[str(node.target)]
        if isinstance(module, nn.Linear):
            return [ChainStep("linear", str(node.target))]
        if isinstance(module, nn.Flatten) and not seen_linear and module.end_dim == -1:
            return []
        if type(module) in ELEMENTWISE_MODULES:
            if isinstance(module, nn.Identity):
                return []
            in_place = _IN_PLACE.get(type(module))
            signature = (type(module), repr(module))
            return [ChainStep("act", str(node.target), module, signature, in_place)]
        raise ValueError(
            f"module '{node.target}' ({type(module).__name__}) is not a Linear layer or an "
            "element-wise activation"
        )
    if node.op == "call_function":
        if node.target is torch.flatten and not seen_linear:
            return []
        if node.target in ELEMENTWISE_FUNCTIONS:
            kwargs = dict(node.kwargs)
            if len(node.args) > 1 or any(not isinstance(v, int | float | bool | str) for v in
                                         kwargs.values()):  # fmt: skip
                raise ValueError(f"'{node.name}' has arguments the chain cannot carry")
            kwargs.pop("inplace", None)
            fn = node.target

            def act(t: torch.Tensor, fn: Callable = fn, kwargs: dict = kwargs) -> torch.Tensor:
                return fn(t, **kwargs)

            in_place = None if kwargs else _IN_PLACE.get(fn)
            signature = (fn, tuple(sorted(kwargs.items())))  # type: ignore[assignment]
            return [ChainStep("act", node.name, act, signature, in_place)]
    if node.op == "call_method" and node.target in _FLATTEN_METHODS and not seen_linear:
        return []
    raise ValueError(f"op '{node.name}' ({node.op} {node.target}) is not supported in a chain")
