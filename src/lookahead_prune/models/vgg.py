"""CIFAR-style VGG-11/16/19: batch-normed conv stack and a single Linear classifier."""

from __future__ import annotations

import torch
from torch import nn

from .activations import check_activation
from .checks import positive_int
from .features import POOL, build_features
from .initialization import glorot_init

M = POOL
VGG_CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M),
    16: (64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M),
    19: (
        64, 64, M, 128, 128, M, 256, 256, 256, 256, M,
        512, 512, 512, 512, M, 512, 512, 512, 512, M,
    ),
}  # fmt: skip
"""Simonyan & Zisserman's configurations A (11), D (16) and E (19)."""


class VGG(nn.Module):
    """VGG with BatchNorm2d after each (bias-free) conv and one Linear classifier.

    Modules: ``features.<i>`` (conv, bn, act, ..., pool), ``flatten``, ``classifier``.
    Pools whose input is already 1x1 are skipped, so 28x28 and 32x32 inputs both end
    at 1x1 and the classifier is Linear(512, num_classes). ``first_stride=2`` is the official
    LAP code's 64x64 variant (``vgg19_64`` for Tiny-ImageNet): its first conv has stride 2.
    """

    dense_layers: tuple[str, ...] = ()

    def __init__(
        self,
        depth: int = 16,
        in_channels: int = 3,
        image_size: int = 32,
        num_classes: int = 10,
        activation: str = "relu",
        first_stride: int = 1,
    ) -> None:
        super().__init__()
        if depth not in VGG_CONFIGS:
            raise ValueError(f"unknown VGG depth {depth!r}; known depths: {sorted(VGG_CONFIGS)}")
        positive_int("in_channels", in_channels)
        positive_int("image_size", image_size)
        positive_int("num_classes", num_classes)
        positive_int("first_stride", first_stride)
        check_activation(activation)
        self.depth = depth
        self.features, channels, size = build_features(
            VGG_CONFIGS[depth],
            in_channels=in_channels,
            image_size=image_size,
            batch_norm=True,
            activation=activation,
            first_stride=first_stride,
        )
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(channels * size * size, num_classes)
        glorot_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images [N, C, H, W] to logits [N, num_classes]."""
        return self.classifier(self.flatten(self.features(x)))
