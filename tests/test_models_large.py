"""The official LAP code's larger models: VGG-19, ResNet-50 and WRN-16-8 (64x64), WRN-16-8 (32x32).

Each is built once at full width; the checks are layouts and counts against the official
``network/masked_*_64.py`` (counted from its definitions), the official per-layer prune
ratios of ``hyperparameter.py``, one forward pass and one LAP prune of each.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import fx, nn

import lookahead_prune as lp
from lookahead_prune.graph import prunable_layers
from lookahead_prune.models import WideResNet, build_model, dense_layer_names
from lookahead_prune.schedule import level_keep, paper_pq
from lookahead_prune.train import paper_lr, paper_steps

TINY = (3, 64, 200)
CIFAR = (3, 32, 10)
SHAPES = {"vgg19-64": TINY, "resnet50-64": TINY, "wrn-16-8-64": TINY, "wrn-16-8": CIFAR}

OFFICIAL = {
    # name: (masked layers, their weights, shortcut-conv weights, all parameters)
    "vgg19-64": (17, 20_121_280, 0, 20_137_992),
    "resnet50-64": (50, 21_087_936, 2_768_896, 23_910_152),
    "wrn-16-8-64": (14, 10_885_552, 165_888, 11_063_336),
}
"""Counted from the official definitions. Its VGG convs have biases (5,504 more parameters)
before batch norm; ours are bias-free, so its total is 20,137,992 and ours 20,132,488."""

OFFICIAL_RATIOS = {
    "vgg19-64": [0.15] * 16 + [0.10],
    "resnet50-64": [0.0] + [0.15] * 48 + [0.10],
    "wrn-16-8-64": [0.0] + [0.15] * 12 + [0.10],
}
"""``prune_ratios`` of the official ``hyperparameter.py``: level τ keeps (1 - r)^τ per layer."""


@cache
def _model(name: str) -> nn.Module:
    channels, size, classes = SHAPES[name]
    return build_model(name, in_channels=channels, image_size=size, num_classes=classes, seed=0)


def _masked(model: nn.Module) -> dict[str, nn.Module]:
    """Prunable layers as the official code has them: all but the shortcut convs."""
    return {n: m for n, m in prunable_layers(model).items() if "shortcut" not in n}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_layer_and_parameter_counts_match_the_official_models(name: str) -> None:
    model = _model(name)
    layers, weights, shortcut, total = OFFICIAL[name]
    masked = _masked(model)
    assert len(masked) == layers
    assert sum(m.weight.numel() for m in masked.values()) == weights
    shortcuts = [m for n, m in prunable_layers(model).items() if "shortcut" in n]
    assert sum(m.weight.numel() for m in shortcuts) == shortcut
    biases = sum(m.out_channels for m in masked.values() if isinstance(m, nn.Conv2d))
    expected = total - biases if name == "vgg19-64" else total
    assert sum(p.numel() for p in model.parameters()) == expected
    first = next(iter(masked.values()))
    assert first.stride == (2, 2) and first.weight.shape[1] == 3
    assert list(masked.values())[-1].weight.shape[0] == 200


def test_wrn_16_8_for_cifar_has_a_stride_1_stem() -> None:
    model = _model("wrn-16-8")
    assert model.conv1.stride == (1, 1)
    assert len(_masked(model)) == 14 and model.fc.weight.shape == (10, 512)
    widths = [model.get_submodule(f"layer{i}.0.conv1").out_channels for i in (1, 2, 3)]
    assert widths == [128, 256, 512]
    assert isinstance(model.layer2[0].dropout, nn.Dropout) and model.layer2[0].dropout.p == 0.3
    with pytest.raises(ValueError, match="6n\\+4"):
        WideResNet(depth=15)


@pytest.mark.parametrize("name", sorted(OFFICIAL_RATIOS))
def test_level_rule_equals_the_official_prune_ratios(name: str) -> None:
    model = _model(name)
    masked = _masked(model)
    dense = dense_layer_names(model) + tuple(n for n in prunable_layers(model) if n not in masked)
    for level in (1, 3, 7):
        keep = level_keep(model, level, *paper_pq(name), dense=dense)
        got = [keep.get(n, 1.0) for n in masked]
        want = [(1.0 - r) ** level for r in OFFICIAL_RATIOS[name]]
        assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_forward_trace_and_lap_prune(name: str) -> None:
    channels, size, classes = SHAPES[name]
    model = build_model(
        name, in_channels=channels, image_size=size, num_classes=classes, seed=1
    ).eval()
    x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(x)
        traced = fx.symbolic_trace(model)(x)
    assert eager.shape == (1, classes) and torch.isfinite(eager).all()
    torch.testing.assert_close(traced, eager, rtol=0, atol=0)
    report = lp.prune(model, "lap", keep=0.2)
    for layer_name, module in prunable_layers(model).items():
        mask = module.weight_mask
        assert int(mask.sum()) == round(0.2 * mask.numel()), layer_name
    assert report is not None
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_official_module_order_lap_with_shortcuts_excluded() -> None:
    model = build_model("resnet50-64", in_channels=3, image_size=64, num_classes=200, seed=2)
    keep = level_keep(model, 2, *paper_pq("resnet50-64"), dense=dense_layer_names(model))
    keep = {n: k for n, k in keep.items() if "shortcut" not in n}
    lp.prune(model, "lap", keep=keep, graph="sequential", exclude=["*shortcut*"])
    layers = prunable_layers(model)
    assert not hasattr(layers["conv1"], "weight_mask")
    assert not hasattr(layers["layer1.0.shortcut.0"], "weight_mask")
    body = layers["layer3.2.conv2"]
    assert int(body.weight_mask.sum()) == round(0.85**2 * body.weight.numel())
    assert int(layers["fc"].weight_mask.sum()) == round(0.9**2 * layers["fc"].weight.numel())


def test_official_training_recipe_for_the_64x64_models() -> None:
    for name in OFFICIAL:
        assert paper_steps(name) == (60_000, 40_000) and paper_lr(name) == 3e-4
        assert paper_pq(name) == (0.85, 0.8)
    with pytest.raises(ValueError, match="no step counts"):  # the official code has no 32x32 WRN
        paper_steps("wrn-16-8")
