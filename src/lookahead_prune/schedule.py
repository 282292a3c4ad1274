"""Per-layer keep fractions: the paper's level rule (Appendix C) and its overall fraction.

At level τ a conv layer keeps p^τ of its weights, a linear layer q^τ, and the last layer
((1+q)/2)^τ; (p, q) = (0, 0.5) for the MLPs and (0.85, 0.8) for the conv nets. Layers a model
lists in ``dense_layers`` (the first conv of ResNet-18, ResNet-50 and WRN-16-8) stay dense.

The official code states the same rule as per-layer prune ratios r with keep (1 - r)^τ: for
its 64x64 Tiny-ImageNet models ``vgg19_64`` [.15]*16 + [.10], ``resnet50_64`` [0] + [.15]*48 +
[.10] and ``wrn-16-8_64`` [0] + [.15]*12 + [.10], i.e. (p, q) = (0.85, 0.8) with the stem dense
(r = 0) for ResNet-50 and WRN only; their shortcut convs are never pruned there (``exclude``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from .graph import layer_type, prunable_layers, weight_name

PAPER_PQ: dict[str, tuple[float, float]] = {
    "linear": (0.0, 0.5),
    "fcn": (0.0, 0.5),
    "conv6": (0.85, 0.8),
    "vgg11": (0.85, 0.8),
    "vgg16": (0.85, 0.8),
    "vgg19": (0.85, 0.8),
    "resnet18": (0.85, 0.8),
    "vgg19-64": (0.85, 0.8),
    "resnet50-64": (0.85, 0.8),
    "wrn-16-8-64": (0.85, 0.8),
}
"""The paper's (p, q) per model: conv and linear keep factors per level."""


def paper_pq(model_name: str) -> tuple[float, float]:
    """(p, q) the paper uses for ``model_name``; conv-net values for models it did not use."""
    return PAPER_PQ.get(model_name, (0.85, 0.8))


def level_keep(
    model: nn.Module,
    level: int,
    p: float,
    q: float,
    *,
    dense: Iterable[str] = (),
) -> dict[str, float]:
    """Keep fraction per prunable layer at ``level`` (τ); ``dense`` layers are left out."""
    if isinstance(level, bool) or not isinstance(level, int) or level < 0:
        raise ValueError(f"level must be a non-negative integer, not {level!r}")
    for name, value in (("p", p), ("q", q)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], not {value!r}")
    layers = prunable_layers(model)
    dense = set(dense)
    unknown = dense - set(layers)
    if unknown:
        raise ValueError(f"dense layers {sorted(unknown)} are not prunable layers of the model")
    last = list(layers)[-1]
    keep = {}
    for name, module in layers.items():
        if name in dense:
            continue
        if name == last:
            base = (1.0 + q) / 2.0
        elif layer_type(module).unit_axis == -1:  # Linear-like: Linear, HF Conv1D, MHA
            base = q
        else:
            base = p
        keep[name] = max(base**level, 0.0) if level else 1.0
    return keep


def overall_keep(model: nn.Module, keep: Mapping[str, float]) -> float:
    """Overall fraction of prunable weights kept, counting ``round(keep * n)`` per layer."""
    layers = prunable_layers(model)
    sizes = {n: _size(m) for n, m in layers.items()}
    total = sum(sizes.values())
    kept = sum(round(keep[n] * sizes[n]) if n in keep else sizes[n] for n in layers)
    return kept / total


def kept_fraction(model: nn.Module, keep: Mapping[str, float]) -> float:
    """Fraction of the weights of the layers in ``keep`` that survive, as ``prune`` counts."""
    layers = prunable_layers(model)
    sizes = {n: _size(layers[n]) for n in keep}
    return sum(round(keep[n] * sizes[n]) for n in keep) / sum(sizes.values())


def _size(module: nn.Module) -> int:
    """Number of weights in the parameter a prunable module has pruned."""
    return getattr(module, weight_name(module)).numel()
