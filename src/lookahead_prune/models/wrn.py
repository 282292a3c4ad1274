"""Wide ResNet (Zagoruyko & Komodakis 2016) as in the official LAP code: WRN-16-8.

The layout follows the official ``MaskedWideResNet_64`` (itself from meliketoy's
wide-resnet.pytorch): a 3x3 stem conv to 16 channels, three stages of ``(depth - 4) / 6``
pre-activation blocks ``bn -> act -> conv -> dropout -> bn -> act -> conv`` (+ shortcut) of
widths 16k, 32k and 64k, then ``bn -> act``, average pooling and a Linear classifier. Convs have
biases and dropout is 0.3, as there. The stem has stride 2 for 64x64 inputs (Tiny-ImageNet)
and 1 for 32x32 (CIFAR). One difference: the official final batch norm has ``momentum=0.9``
(running statistics follow the last batch); here every batch norm keeps PyTorch's 0.1.
"""

from __future__ import annotations

import torch
from torch import nn

from .activations import check_activation, make_activation
from .checks import positive_int
from .initialization import glorot_init

WRN_DENSE_LAYERS: tuple[str, ...] = ("conv1",)
"""Layers the official schedule leaves unpruned (its ratio 0): the stem convolution."""


class WideBlock(nn.Module):
    """Pre-activation block: ``conv2(act2(bn2(dropout(conv1(act1(bn1(x))))))) + shortcut(x)``.

    ``conv2`` carries the stride; ``shortcut`` is an identity (empty ``nn.Sequential``) or a
    1x1 conv with bias (``shortcut.0``), which the official code never prunes.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        dropout: float,
        stride: int = 1,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.act1 = make_activation(activation)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout)
        self.bn2 = nn.BatchNorm2d(channels)
        self.act2 = make_activation(activation)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=True)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the wide block."""
        out = self.dropout(self.conv1(self.act1(self.bn1(x))))
        out = self.conv2(self.act2(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """WRN-``depth``-``width``: ``conv1``, ``layer1..3``, ``bn``, ``act``, ``pool``, ``fc``."""

    dense_layers: tuple[str, ...] = WRN_DENSE_LAYERS

    def __init__(
        self,
        depth: int = 16,
        width: int = 8,
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "relu",
        stem_stride: int = 1,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        positive_int("depth", depth)
        positive_int("width", width)
        positive_int("in_channels", in_channels)
        positive_int("num_classes", num_classes)
        positive_int("stem_stride", stem_stride)
        check_activation(activation)
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"wide ResNet depth must be 6n+4 with n >= 1, got {depth!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        blocks = (depth - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=stem_stride, padding=1, bias=True)
        channels = 16
        stages: list[nn.Sequential] = []
        for stage_width, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            stage = []
            for i in range(blocks):
                stride_i = stride if i == 0 else 1
                stage.append(WideBlock(channels, stage_width, dropout, stride_i, activation))
                channels = stage_width
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(channels)
        self.act = make_activation(activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(channels, num_classes)
        glorot_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images [N, C, H, W] to logits [N, num_classes]."""
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.flatten(self.pool(self.act(self.bn(out)))))
