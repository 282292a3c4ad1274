"""Conv-6 of Frankle & Carbin (2019): six 3x3 convs in three pooled pairs, then a 256-256 MLP."""

from __future__ import annotations

import torch
from torch import nn

from .activations import check_activation, make_activation
from .checks import positive_int
from .features import POOL, build_features
from .initialization import glorot_init

CONV6_CONFIG: tuple[int | str, ...] = (64, 64, POOL, 128, 128, POOL, 256, 256, POOL)


class Conv6(nn.Module):
    """Conv-6 without batch norm: ``features`` (convs with bias), ``flatten``, ``classifier``.

    ``classifier`` is Linear(256*s*s, 256), act, Linear(256, 256), act, Linear(256, classes),
    where ``s`` is the spatial size after the pools (3 for 28x28 inputs, 4 for 32x32).
    """

    dense_layers: tuple[str, ...] = ()

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        activation: str = "relu",
        hidden: int = 256,
    ) -> None:
        super().__init__()
        positive_int("in_channels", in_channels)
        positive_int("image_size", image_size)
        positive_int("num_classes", num_classes)
        positive_int("hidden", hidden)
        check_activation(activation)
        self.features, channels, size = build_features(
            CONV6_CONFIG,
            in_channels=in_channels,
            image_size=image_size,
            batch_norm=False,
            activation=activation,
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            nn.Linear(channels * size * size, hidden),
            make_activation(activation),
            nn.Linear(hidden, hidden),
            make_activation(activation),
            nn.Linear(hidden, num_classes),
        )
        glorot_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images [N, C, H, W] to logits [N, num_classes]."""
        return self.classifier(self.flatten(self.features(x)))
