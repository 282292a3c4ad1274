"""String-keyed model registry: every paper architecture built from one uniform call."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .activations import check_activation
from .checks import positive_int
from .conv6 import Conv6
from .mlp import FCN, LinearNet
from .resnet import ResNet18
from .vgg import VGG

DEFAULT_ACTIVATION = "relu"


def _linear(*, in_channels: int, image_size: int, num_classes: int, activation: str) -> nn.Module:
    if activation != DEFAULT_ACTIVATION:
        raise ValueError(
            f"model 'linear' has no activation; got activation={activation!r}, "
            f"leave it at the default {DEFAULT_ACTIVATION!r}"
        )
    return LinearNet(in_channels * image_size * image_size, num_classes)


def _fcn(*, in_channels: int, image_size: int, num_classes: int, activation: str) -> nn.Module:
    return FCN(in_channels * image_size * image_size, num_classes, activation=activation)


def _conv6(*, in_channels: int, image_size: int, num_classes: int, activation: str) -> nn.Module:
    return Conv6(in_channels, image_size, num_classes, activation)


def _vgg(depth: int) -> Callable[..., nn.Module]:
    def build(*, in_channels: int, image_size: int, num_classes: int, activation: str) -> nn.Module:
        return VGG(depth, in_channels, image_size, num_classes, activation)

    build.__name__ = f"_vgg{depth}"
    return build


def _resnet18(*, in_channels: int, image_size: int, num_classes: int, activation: str) -> nn.Module:
    return ResNet18(in_channels, num_classes, activation)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "linear": _linear,
    "fcn": _fcn,
    "conv6": _conv6,
    "vgg11": _vgg(11),
    "vgg16": _vgg(16),
    "vgg19": _vgg(19),
    "resnet18": _resnet18,
}
"""Builders by name; each takes keyword-only in_channels, image_size, num_classes, activation."""


def model_names() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(MODELS)


def build_model(
    name: str,
    *,
    in_channels: int = 1,
    image_size: int = 28,
    num_classes: int = 10,
    activation: str = DEFAULT_ACTIVATION,
    seed: int | None = None,
) -> nn.Module:
    """Build model ``name`` for [N, in_channels, image_size, image_size] images.

    With ``seed`` the (Glorot) initialisation is reproducible and the global RNG
    is left untouched; without it the global RNG is used as usual.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(model_names())}")
    check_activation(activation)
    kwargs = {
        "in_channels": positive_int("in_channels", in_channels),
        "image_size": positive_int("image_size", image_size),
        "num_classes": positive_int("num_classes", num_classes),
        "activation": activation,
    }
    if seed is None:
        return MODELS[name](**kwargs)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](**kwargs)


def dense_layer_names(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of layers the paper's schedule keeps dense (``model.dense_layers``)."""
    return tuple(getattr(model, "dense_layers", ()))
