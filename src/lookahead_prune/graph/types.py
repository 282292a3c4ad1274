"""The graph's data: prunable layers, producer/consumer links, and per-unit scales on paths."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


class GraphError(ValueError):
    """The tracer could not follow the model; the message names the module or op and why."""


class UnitScale(nn.Module):
    """A per-unit scale met on a path (a norm layer's affine weight), read like a batch norm.

    Scores read ``|weight| / sqrt(running_var + eps)`` from a batch norm; this object holds
    ``running_var = 1`` and ``eps = 0`` so the same formula gives ``|weight|`` (Eq. 9 with
    LayerNorm/RMSNorm/GroupNorm or a constant ``x * w`` in place of batch norm).
    """

    def __init__(self, weight: Tensor, source: str) -> None:
        super().__init__()
        self.source = source
        self.num_features = weight.numel()
        self.eps = 0.0
        self.weight = weight.detach().reshape(-1)
        self.running_var = torch.ones_like(self.weight)

    def extra_repr(self) -> str:
        return f"{self.source}, {self.num_features}"


@dataclass(frozen=True)
class Link:
    """A producer -> consumer connection: ``index[u]`` is the producer's output unit feeding the
    consumer's input unit ``u`` along this path, or -1 where the path does not reach ``u``."""

    producer: str
    consumer: str
    index: Tensor
    bns: tuple = ()  # per-unit scales on this path: (bn or UnitScale, unit map at it)


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
    in_open_bn: list = field(default_factory=list)  # open paths through scales: (index, bns)
    out_open_bn: list = field(default_factory=list)
    type_name: str = ""

    @property
    def kind(self) -> str:
        """``linear`` or ``conv``: units are neurons for the first and channels for the second."""
        return "linear" if self.type_name in ("linear", "conv1d-hf", "mha-in-proj") else "conv"


@dataclass
class LayerGraph:
    """All prunable layers of a model, in forward (topological) order, with their links."""

    layers: dict[str, Layer]
    mode: str
    unreached: list[str] = field(default_factory=list)
    approximated: dict[str, str] = field(default_factory=dict)  # strict=False: layer -> why
    capture: str = ""  # how the graph was captured: fx, export, sequential, none

    def names(self) -> list[str]:
        """Qualified names of the prunable layers in forward order."""
        return list(self.layers)

    def __getitem__(self, name: str) -> Layer:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)
