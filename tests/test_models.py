"""Tests for lookahead_prune.models: shapes, tracing, initialisation, registry errors."""

from __future__ import annotations

import math
import operator
from functools import cache

import pytest
import torch
from torch import fx, nn

from lookahead_prune.models import (
    MODELS,
    RESNET18_DENSE_LAYERS,
    VGG,
    build_model,
    dense_layer_names,
    glorot_init,
    model_names,
)

ALL = ["conv6", "fcn", "linear", "resnet18", "vgg11", "vgg16", "vgg19"]
LARGE = ["resnet50-64", "vgg19-64", "wrn-16-8", "wrn-16-8-64"]  # tests/test_models_large.py
MNIST = (1, 28)
CIFAR = (3, 32)


@cache
def _model(name: str, channels: int, size: int) -> nn.Module:
    """One seeded model per configuration, in eval mode; tests must not change its weights."""
    return build_model(name, in_channels=channels, image_size=size, seed=0).eval()


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _layers(model: nn.Module, kind: type | tuple[type, ...]) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, kind)}


def test_registry_lists_every_paper_model() -> None:
    assert model_names() == sorted(ALL + LARGE)
    assert set(MODELS) == set(ALL + LARGE)


@pytest.mark.parametrize("shape", [MNIST, CIFAR], ids=["mnist", "cifar"])
@pytest.mark.parametrize("name", ALL)
def test_output_shape_and_fx_trace_match_eager(name: str, shape: tuple[int, int]) -> None:
    channels, size = shape
    model = _model(name, channels, size)
    x = torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        eager = model(x)
        traced = fx.symbolic_trace(model)(x)
    assert eager.shape == (3, 10)
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)


def test_parameter_counts_match_the_standard_architectures() -> None:
    # Known counts: CIFAR ResNet-18 (kuangliu) 11,173,962; VGG-16-BN with bias-free convs
    # and Linear(512, 10) 14,724,042; Conv-6 ~2.26M (Frankle & Carbin: 2.3M).
    assert _count(_model("resnet18", *CIFAR)) == 11_173_962
    assert _count(_model("vgg16", *CIFAR)) == 14_724_042
    assert _count(_model("conv6", *CIFAR)) == 2_262_602
    assert _count(_model("fcn", *MNIST)) == 784 * 500 + 500 + 3 * (500 * 500 + 500) + 5010
    assert _count(_model("linear", *MNIST)) == 784 * 1000 + 1000 + 1000 * 10 + 10


def test_fcn_layout_and_activation_choice() -> None:
    for activation, kind in [("relu", nn.ReLU), ("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh)]:
        model = build_model("fcn", activation=activation, seed=0)
        linears = _layers(model, nn.Linear)
        assert list(linears) == ["fc1", "fc2", "fc3", "fc4", "fc5"]
        assert [m.out_features for m in linears.values()] == [500, 500, 500, 500, 10]
        assert list(_layers(model, kind)) == ["act1", "act2", "act3", "act4"]
    x = torch.randn(4, 1, 28, 28)
    relu = build_model("fcn", activation="relu", seed=0)(x)
    tanh = build_model("fcn", activation="tanh", seed=0)(x)
    assert not torch.allclose(relu, tanh)


def test_activation_applies_to_conv_models() -> None:
    model = build_model("resnet18", in_channels=1, image_size=8, activation="tanh", seed=0)
    assert not _layers(model, nn.ReLU)
    assert len(_layers(model, nn.Tanh)) == 1 + 2 * 8


def test_linear_model_has_no_activation() -> None:
    model = _model("linear", *MNIST)
    kinds = {type(m) for m in model.children()}
    assert kinds == {nn.Flatten, nn.Linear}
    assert list(_layers(model, nn.Linear)) == ["fc1", "fc2"]
    assert all(m.bias is not None for m in _layers(model, nn.Linear).values())
    with pytest.raises(ValueError, match="no activation"):
        build_model("linear", activation="tanh")


def test_bad_arguments_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="known models: conv6, fcn, linear"):
        build_model("alexnet")
    with pytest.raises(ValueError, match="known activations: relu, sigmoid, tanh"):
        build_model("fcn", activation="gelu")
    with pytest.raises(ValueError, match="image_size"):
        build_model("conv6", image_size=0)
    with pytest.raises(ValueError, match="in_channels"):
        build_model("vgg11", in_channels=True)
    with pytest.raises(ValueError, match="seed"):
        build_model("fcn", seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="VGG depth"):
        VGG(depth=13)


def test_seeded_init_is_reproducible_and_seed_dependent() -> None:
    a = build_model("conv6", in_channels=3, image_size=8, seed=3).state_dict()
    b = build_model("conv6", in_channels=3, image_size=8, seed=3).state_dict()
    c = build_model("conv6", in_channels=3, image_size=8, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.0.weight"], c["features.0.weight"])


def test_seed_leaves_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    build_model("fcn", seed=7)
    torch.testing.assert_close(torch.rand(5), expected)


def test_glorot_normal_statistics() -> None:
    fcn = _model("fcn", *MNIST)
    weight = fcn.get_submodule("fc2").weight  # 500 x 500
    assert weight.mean().abs() < 0.002
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (500 + 500)), rel=0.02)
    conv = _model("vgg16", *CIFAR).get_submodule("features.40").weight  # 512 x 512 x 3 x 3
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (2 * 512 * 9)), rel=0.02)
    for name in ALL:
        model = _model(name, *CIFAR)
        for module in model.modules():
            if getattr(module, "bias", None) is not None:
                assert not module.bias.any(), name
            if isinstance(module, nn.BatchNorm2d):
                assert torch.equal(module.weight, torch.ones_like(module.weight))


def test_glorot_init_resets_a_model() -> None:
    layer = nn.Sequential(nn.Linear(300, 300), nn.BatchNorm1d(300))
    with torch.no_grad():
        layer[1].weight.fill_(3.0)
    glorot_init(layer)
    assert not layer[0].bias.any()
    assert torch.equal(layer[1].weight, torch.ones(300))
    assert layer[0].weight.std().item() == pytest.approx(math.sqrt(2 / 600), rel=0.05)


@pytest.mark.parametrize("name", ["vgg11", "vgg16", "vgg19"])
def test_vgg_skips_pools_on_1x1_maps(name: str) -> None:
    small, large = _model(name, *MNIST), _model(name, *CIFAR)
    assert len(_layers(small, nn.MaxPool2d)) == 4  # 28 -> 14 -> 7 -> 3 -> 1, fifth skipped
    assert len(_layers(large, nn.MaxPool2d)) == 5  # 32 -> 16 -> 8 -> 4 -> 2 -> 1
    for model in (small, large):
        assert isinstance(model.classifier, nn.Linear)
        assert model.classifier.in_features == 512
        convs = _layers(model, nn.Conv2d)
        assert all(n.startswith("features.") and m.bias is None for n, m in convs.items())
    depth = int(name.removeprefix("vgg"))
    # VGG-n counts its three original FC layers; this variant keeps one.
    assert len(_layers(large, nn.Conv2d)) + 3 == depth
    assert len(_layers(large, nn.BatchNorm2d)) + 3 == depth


def test_conv6_layout() -> None:
    for (channels, size), spatial in [(MNIST, 3), (CIFAR, 4)]:
        model = _model("conv6", channels, size)
        convs = _layers(model, nn.Conv2d)
        assert [m.out_channels for m in convs.values()] == [64, 64, 128, 128, 256, 256]
        assert all(m.bias is not None for m in convs.values())
        assert not _layers(model, nn.BatchNorm2d)
        linears = _layers(model, nn.Linear)
        assert list(linears) == ["classifier.0", "classifier.2", "classifier.4"]
        assert linears["classifier.0"].in_features == 256 * spatial * spatial


def test_resnet18_layout_shortcuts_and_dense_layers() -> None:
    model = _model("resnet18", *CIFAR)
    convs = _layers(model, nn.Conv2d)
    assert len(convs) == 1 + 16 + 3
    assert all(m.bias is None for m in convs.values())
    shortcut_convs = [n for n in convs if "shortcut" in n]
    assert shortcut_convs == [f"layer{i}.0.shortcut.0" for i in (2, 3, 4)]
    assert all(convs[n].kernel_size == (1, 1) for n in shortcut_convs)
    identity = model.get_submodule("layer1.0.shortcut")
    assert isinstance(identity, nn.Sequential) and len(identity) == 0
    assert not _layers(model, nn.MaxPool2d)
    graph = fx.symbolic_trace(model).graph
    adds = [n for n in graph.nodes if n.target in (operator.add, torch.add)]
    assert len(adds) == 8
    # The identity shortcut feeds the add straight from the stem's activation.
    assert any(arg.target == "act" for arg in adds[0].args)
    assert dense_layer_names(model) == RESNET18_DENSE_LAYERS == ("conv1",)
    assert isinstance(model.get_submodule("conv1"), nn.Conv2d)
    assert all(dense_layer_names(_model(n, *CIFAR)) == () for n in ALL if n != "resnet18")


@pytest.mark.parametrize("name", ALL)
def test_num_classes_and_backward_reaches_every_parameter(name: str) -> None:
    model = build_model(name, in_channels=3, image_size=8, num_classes=7, seed=0)
    logits = model(torch.randn(4, 3, 8, 8))
    assert logits.shape == (4, 7)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 6])).backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, param_name
