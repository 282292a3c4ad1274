"""A VGG-style convolutional stack built from a config list, with static pool skipping."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from .activations import make_activation

POOL = "M"
"""Marker for a 2x2 max pool in a feature config; any int is a 3x3 conv's output channels."""


def build_features(
    config: Sequence[int | str],
    *,
    in_channels: int,
    image_size: int,
    batch_norm: bool,
    activation: str,
    first_stride: int = 1,
) -> tuple[nn.Sequential, int, int]:
    """Build ``features`` from ``config``; return it with its output channels and spatial size.

    Convs are 3x3 with padding 1, followed by BatchNorm2d (then bias-free) when
    ``batch_norm`` is set, then the activation. A pool whose input is already 1x1 is
    left out, decided here from ``image_size`` so the forward has no control flow.
    ``first_stride`` strides the first conv (2 in the official 64x64 VGG for Tiny-ImageNet).
    """
    layers: list[nn.Module] = []
    channels, size = in_channels, image_size
    stride = first_stride
    for item in config:
        if item == POOL:
            if size > 1:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
        elif isinstance(item, int) and not isinstance(item, bool) and item > 0:
            layers.append(
                nn.Conv2d(channels, item, 3, stride=stride, padding=1, bias=not batch_norm)
            )
            size = (size - 1) // stride + 1
            stride = 1
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            layers.append(make_activation(activation))
            channels = item
        else:
            raise ValueError(
                f"bad feature config entry {item!r}: expected a positive int or {POOL!r}"
            )
    return nn.Sequential(*layers), channels, size
