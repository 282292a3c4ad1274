"""CIFAR ResNet-18 (He et al. 2016, kuangliu layout): 3x3 stem, four stages of BasicBlocks."""

from __future__ import annotations

import torch
from torch import nn

from .activations import check_activation, make_activation
from .checks import positive_int
from .initialization import glorot_init

RESNET18_STAGES: tuple[tuple[int, int, int], ...] = (
    (64, 2, 1),
    (128, 2, 2),
    (256, 2, 2),
    (512, 2, 2),
)
"""Per stage: (output channels, number of blocks, stride of the first block)."""

RESNET18_DENSE_LAYERS: tuple[str, ...] = ("conv1",)
"""Layers the paper's schedule leaves unpruned in ResNet-18: the stem convolution."""


def shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """A residual block's skip path: identity, or a 1x1 conv + batch norm where the shape
    changes (named ``shortcut`` so ``--exclude '*shortcut*'`` leaves it dense, as officially)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs plus a shortcut: ``act2(bn2(conv2(act1(bn1(conv1(x))))) + sc(x))``.

    ``shortcut`` is an empty ``nn.Sequential`` (identity, invisible in the traced graph)
    or ``shortcut.0`` (1x1 conv) and ``shortcut.1`` (BN) when the shape changes.
    """

    def __init__(
        self, in_channels: int, channels: int, stride: int = 1, activation: str = "relu"
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = shortcut(in_channels, channels, stride)
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.act2(out)


class ResNet(nn.Module):
    """A ResNet body: stem ``conv1``/``bn1``/``act``, ``layer1..4``, then adaptive average
    pooling to 1x1, ``flatten`` and ``fc``. ``block(in, width, stride, activation)`` builds one
    residual block whose output has ``expansion * width`` channels."""

    def __init__(
        self,
        block: type[nn.Module],
        stages: tuple[tuple[int, int, int], ...],
        *,
        in_channels: int,
        num_classes: int,
        activation: str,
        stem_stride: int = 1,
        expansion: int = 1,
    ) -> None:
        super().__init__()
        positive_int("in_channels", in_channels)
        positive_int("num_classes", num_classes)
        positive_int("stem_stride", stem_stride)
        check_activation(activation)
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.act = make_activation(activation)
        channels = 64
        built: list[nn.Sequential] = []
        for width, blocks, stride in stages:
            stage = []
            for i in range(blocks):
                stage.append(block(channels, width, stride if i == 0 else 1, activation))
                channels = expansion * width
            built.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = built
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        glorot_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images [N, C, H, W] to logits [N, num_classes]."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.flatten(self.pool(out)))


class ResNet18(ResNet):
    """ResNet-18 for small images: stem ``conv1``/``bn1``/``act``, ``layer1..4``, ``pool``, ``fc``.

    No stem max pool; the head is adaptive average pooling to 1x1, ``flatten`` and
    Linear(512, num_classes). ``dense_layers`` names the stem conv the paper keeps dense.
    """

    dense_layers: tuple[str, ...] = RESNET18_DENSE_LAYERS

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "relu",
    ) -> None:
        super().__init__(
            BasicBlock,
            RESNET18_STAGES,
            in_channels=in_channels,
            num_classes=num_classes,
            activation=activation,
        )
