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
from .resnet50 import ResNet50
from .vgg import VGG
from .wrn import WideResNet

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


def _vgg(depth: int, first_stride: int = 1) -> Callable[..., nn.Module]:
    def build(*, in_channels: int, image_size: int, num_classes: int, activation: str) -> nn.Module:
        return VGG(depth, in_channels, image_size, num_classes, activation, first_stride)

    build.__name__ = f"_vgg{depth}" + ("_64" if first_stride == 2 else "")
    return build


def _resnet18(*, in_channels: int, image_size: int, num_classes: int, activation: str) -> nn.Module:
    return ResNet18(in_channels, num_classes, activation)


def _resnet50_64(
    *, in_channels: int, image_size: int, num_classes: int, activation: str
) -> nn.Module:
    return ResNet50(in_channels, num_classes, activation, stem_stride=2)


def _wrn(depth: int, width: int, stem_stride: int) -> Callable[..., nn.Module]:
    def build(*, in_channels: int, image_size: int, num_classes: int, activation: str) -> nn.Module:
        return WideResNet(depth, width, in_channels, num_classes, activation, stem_stride)

    build.__name__ = f"_wrn{depth}_{width}" + ("_64" if stem_stride == 2 else "")
    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "linear": _linear,
    "fcn": _fcn,
    "conv6": _conv6,
    "vgg11": _vgg(11),
    "vgg16": _vgg(16),
    "vgg19": _vgg(19),
    "resnet18": _resnet18,
    # The official code's 64x64 Tiny-ImageNet models (stride-2 stems), and WRN-16-8 for 32x32.
    "vgg19-64": _vgg(19, first_stride=2),
    "resnet50-64": _resnet50_64,
    "wrn-16-8-64": _wrn(16, 8, stem_stride=2),
    "wrn-16-8": _wrn(16, 8, stem_stride=1),
}
"""Builders by name; each takes keyword-only in_channels, image_size, num_classes, activation.

Names ending in ``-64`` are the official LAP code's Tiny-ImageNet models (``vgg19_64``,
``resnet50_64``, ``wrn-16-8_64``): their first conv has stride 2, for 64x64 inputs.
"""


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
        model = MODELS[name](**kwargs)
    else:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = MODELS[name](**kwargs)
    # The recipe, so a compact file (lp.save_sparse) can rebuild the architecture by itself.
    model.lap_architecture = {"name": name, **kwargs}  # type: ignore[assignment]
    return model


def dense_layer_names(model: nn.Module) -> tuple[str, ...]:
    """Qualified names of layers the paper's schedule keeps dense (``model.dense_layers``)."""
    return tuple(getattr(model, "dense_layers", ()))
