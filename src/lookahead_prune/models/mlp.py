"""Fully connected models: the paper's linear network (Fig. 2) and FCN (MNIST, Sec. 3.1)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from itertools import pairwise

from torch import nn

from .activations import check_activation, make_activation
from .checks import positive_int
from .initialization import glorot_init


class LinearNet(nn.Sequential):
    """Flatten, then two Linear layers with no activation between them (a deep linear network).

    Modules: ``flatten``, ``fc1``, ``fc2``.
    """

    dense_layers: tuple[str, ...] = ()

    def __init__(self, in_features: int, num_classes: int, hidden: int = 1000) -> None:
        positive_int("in_features", in_features)
        positive_int("num_classes", num_classes)
        positive_int("hidden", hidden)
        super().__init__(
            OrderedDict(
                flatten=nn.Flatten(),
                fc1=nn.Linear(in_features, hidden),
                fc2=nn.Linear(hidden, num_classes),
            )
        )
        glorot_init(self)


class FCN(nn.Sequential):
    """Flatten, then Linear layers with an activation between each pair (784-500x4-10 by default).

    Modules: ``flatten``, ``fc1``, ``act1``, ..., ``fc{n}`` with ``n = len(hidden) + 1``.
    """

    dense_layers: tuple[str, ...] = ()

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (500, 500, 500, 500),
        activation: str = "relu",
    ) -> None:
        positive_int("in_features", in_features)
        positive_int("num_classes", num_classes)
        for width in hidden:
            positive_int("hidden width", width)
        check_activation(activation)
        widths = [in_features, *hidden, num_classes]
        layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
        for i, (fan_in, fan_out) in enumerate(pairwise(widths), start=1):
            layers[f"fc{i}"] = nn.Linear(fan_in, fan_out)
            if i < len(widths) - 1:
                layers[f"act{i}"] = make_activation(activation)
        super().__init__(layers)
        glorot_init(self)
