"""ResNet-50 of the official LAP code for 64x64 Tiny-ImageNet: bottleneck blocks, stride-2 stem.

The layout follows the official ``MaskedResNet50_64``: a 3x3 stem conv (stride 2 for 64x64
inputs, no max pool), four stages of 3, 4, 6 and 3 bottlenecks (1x1 -> 3x3 -> 1x1, expansion 4)
of widths 64, 128, 256 and 512, average pooling to 1x1 and Linear(2048, num_classes).
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import make_activation
from .resnet import ResNet, shortcut

RESNET50_STAGES: tuple[tuple[int, int, int], ...] = (
    (64, 3, 1),
    (128, 4, 2),
    (256, 6, 2),
    (512, 3, 2),
)
"""Per stage: (bottleneck width, number of blocks, stride of the first block)."""

EXPANSION = 4
"""A bottleneck's output has ``EXPANSION`` times its width in channels."""

RESNET50_DENSE_LAYERS: tuple[str, ...] = ("conv1",)
"""Layers the official schedule leaves unpruned (its ratio 0): the stem convolution."""


class Bottleneck(nn.Module):
    """``act3(bn3(conv3(act2(bn2(conv2(act1(bn1(conv1(x)))))))) + shortcut(x))``.

    ``conv2`` (3x3) carries the stride. ``shortcut`` is an empty ``nn.Sequential`` (identity)
    or a 1x1 conv and BN (``shortcut.0``, ``shortcut.1``) when the shape changes; the official
    code never prunes those (exclude them with ``'*shortcut*'`` to do the same).
    """

    def __init__(
        self, in_channels: int, width: int, stride: int = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        out_channels = EXPANSION * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = make_activation(activation)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = shortcut(in_channels, out_channels, stride)
        self.act3 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the bottleneck block."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act3(out + self.shortcut(x))


class ResNet50(ResNet):
    """ResNet-50: stem ``conv1``/``bn1``/``act``, ``layer1..4`` of bottlenecks, ``pool``, ``fc``.

    ``stem_stride`` is 2 for the official 64x64 model, 1 for 32x32 inputs.
    """

    dense_layers: tuple[str, ...] = RESNET50_DENSE_LAYERS

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 200,
        activation: str = "relu",
        stem_stride: int = 2,
    ) -> None:
        super().__init__(
            Bottleneck,
            RESNET50_STAGES,
            in_channels=in_channels,
            num_classes=num_classes,
            activation=activation,
            stem_stride=stem_stride,
            expansion=EXPANSION,
        )
