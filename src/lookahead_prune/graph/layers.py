"""Prunable layer types: one entry each says how to read units and weights of that type.

Every score works on the weight viewed as ``[out, in/groups, *kernel]`` (the canonical view);
a type whose weight is stored otherwise (ConvTranspose ``[in, out/groups, ...]``, Hugging
Face ``Conv1D`` ``[in, out]``) converts to and from that view here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn


@dataclass(frozen=True)
class LayerType:
    """How one kind of prunable module holds its units and its weight."""

    name: str
    matches: Callable[[nn.Module], bool]
    units: Callable[[nn.Module], tuple[int, int, int]]  # (in units, out units, groups)
    unit_axis: int  # where units live in the input/output activations: 1 or -1 (last)
    to_canonical: Callable[[Tensor, nn.Module], Tensor] = lambda w, m: w
    from_canonical: Callable[[Tensor, nn.Module], Tensor] = lambda w, m: w
    weight: str = "weight"  # the parameter that is pruned
    leaf: bool = True  # one op: torch.fx keeps it whole (else fx traces into it)


def _is_packed_mha(m: nn.Module) -> bool:
    """``nn.MultiheadAttention`` with q, k, v projections packed in ``in_proj_weight``."""
    return isinstance(m, nn.MultiheadAttention) and bool(m._qkv_same_embed_dim)


def _is_hf_conv1d(m: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2): a Linear whose weight is stored ``[in, out]``."""
    w = m._parameters.get("weight", getattr(m, "weight_orig", None))
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and w is not None and w.dim() == 2


def _t_to(w: Tensor, m: nn.Module) -> Tensor:
    """ConvTranspose ``[in, out/g, *k]`` -> ``[out, in/g, *k]``."""
    g = m.groups
    cin, opg = w.shape[:2]
    k = w.shape[2:]
    return w.reshape(g, cin // g, opg, *k).transpose(1, 2).reshape(g * opg, cin // g, *k)


def _t_from(w: Tensor, m: nn.Module) -> Tensor:
    """``[out, in/g, *k]`` -> ConvTranspose ``[in, out/g, *k]``."""
    g = m.groups
    cout, ipg = w.shape[:2]
    k = w.shape[2:]
    return w.reshape(g, cout // g, ipg, *k).transpose(1, 2).reshape(g * ipg, cout // g, *k)


LAYER_TYPES: list[LayerType] = [
    LayerType(
        "linear",
        lambda m: isinstance(m, nn.Linear),
        lambda m: (m.in_features, m.out_features, 1),
        -1,
    ),
    LayerType(
        "conv",
        lambda m: isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d),
        lambda m: (m.in_channels, m.out_channels, m.groups),
        1,
    ),
    LayerType(
        "conv-transpose",
        lambda m: isinstance(m, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d),
        lambda m: (m.in_channels, m.out_channels, m.groups),
        1,
        _t_to,
        _t_from,
    ),
    LayerType(
        "conv1d-hf",
        _is_hf_conv1d,
        lambda m: (int(m.nx) if hasattr(m, "nx") else m.weight.shape[0], int(m.nf), 1),
        -1,
        lambda w, m: w.t(),
        lambda w, m: w.t(),
    ),
    LayerType(
        "mha-in-proj",
        _is_packed_mha,
        lambda m: (m.embed_dim, 3 * m.embed_dim, 1),
        -1,
        weight="in_proj_weight",
        leaf=False,
    ),
]
"""Prunable layer types, first match wins; append a ``LayerType`` to prune a new kind."""


def layer_type(module: nn.Module) -> LayerType | None:
    """The registered type of a module, or None when it is not prunable."""
    for t in LAYER_TYPES:
        if t.matches(module):
            return t
    return None


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Prunable modules (Linear, Conv, ConvTranspose, HF Conv1D, packed MHA) by qualified name."""
    return {n: m for n, m in model.named_modules() if layer_type(m) is not None}


def weight_name(module: nn.Module) -> str:
    """The name of the parameter a prunable module has pruned (``weight`` but for MHA)."""
    t = layer_type(module)
    return "weight" if t is None else t.weight


def canonical(module: nn.Module, weight: Tensor) -> Tensor:
    """``weight`` (or a tensor shaped like it) viewed as ``[out, in/groups, *kernel]``."""
    t = layer_type(module)
    return weight if t is None else t.to_canonical(weight, module)


def from_canonical(module: nn.Module, tensor: Tensor) -> Tensor:
    """A tensor in the canonical view back in the module's own weight layout."""
    t = layer_type(module)
    return tensor if t is None else t.from_canonical(tensor, module)
