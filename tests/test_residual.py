"""ResNet-18 two ways: the official module-order chain without shortcuts, and the traced graph."""

from __future__ import annotations

import pytest
import torch

import lookahead_prune as lp
from lookahead_prune.data import load_dataset
from lookahead_prune.graph import GraphError, build_graph, neighbour_names
from lookahead_prune.models import build_model
from lookahead_prune.pipeline import Protocol, dense_model, prune_and_retrain, train_dense
from lookahead_prune.prune import excluded_layers

SHORTCUTS = {"layer2.0.shortcut.0", "layer3.0.shortcut.0", "layer4.0.shortcut.0"}


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    return build_model("resnet18", seed=0)


def test_exclude_patterns_match_names_and_reject_typos(resnet):
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    names = [n for n, m in resnet.named_modules() if isinstance(m, layers)]
    assert excluded_layers(names, ["*shortcut*"]) == SHORTCUTS
    assert excluded_layers(names, ["fc", "conv1"]) == {"fc", "conv1"}
    with pytest.raises(ValueError, match="matches no prunable layer"):
        excluded_layers(names, ["*shorcut*"])


def test_module_order_chain_needs_the_shortcuts_left_out(resnet):
    with pytest.raises(GraphError, match=r"layer2\.0\.shortcut\.0"):
        build_graph(resnet, "sequential")
    chain = build_graph(resnet, "sequential", skip=SHORTCUTS)
    assert not SHORTCUTS & set(chain.names())
    # the official chain runs through the main path only, block after block
    assert neighbour_names(chain, "layer1.1.conv2") == (["layer1.1.conv1"], ["layer2.0.conv1"])
    assert neighbour_names(chain, "layer2.0.conv2") == (["layer2.0.conv1"], ["layer2.1.conv1"])


def test_traced_graph_sees_the_residual_neighbours(resnet):
    graph = build_graph(resnet, "fx")
    # the shortcut conv is a real layer: it reads the previous block's output and its sum
    # with layer2.0.conv2 feeds layer2.1.conv1 (the identity skip onwards counts as 1)
    assert neighbour_names(graph, "layer2.0.shortcut.0") == (["layer1.1.conv2"], ["layer2.1.conv1"])
    assert neighbour_names(graph, "layer2.0.conv2") == (["layer2.0.conv1"], ["layer2.1.conv1"])
    # its output (through bn2) also leaves by the identity skip, which the chain never sees
    assert graph["layer1.0.conv2"].out_open_bn
    chain = build_graph(resnet, "sequential", skip=SHORTCUTS)
    assert not chain["layer1.0.conv2"].out_open_bn and not chain["layer1.0.conv2"].out_open.any()


@pytest.mark.parametrize("graph", ["fx", "sequential"])
def test_excluded_layers_stay_dense_and_the_rest_is_pruned(resnet, graph):
    model = build_model("resnet18", seed=0)
    report = lp.prune(model, "lap", 0.2, graph=graph, exclude=["*shortcut*"])
    kept = {r.name: r.keep for r in report.layers}
    assert {r.name for r in report.excluded} == SHORTCUTS
    assert all(r.keep == 1.0 for r in report.excluded)
    assert all(abs(kept[n] - 0.2) < 1e-3 for n in kept if n not in SHORTCUTS)
    assert not any(hasattr(dict(model.named_modules())[n], "weight_mask") for n in SHORTCUTS)


def test_module_order_and_graph_lap_differ_only_where_the_graphs_differ():
    fx = lp.compute_scores(build_model("resnet18", seed=0), "lap", exclude=["*shortcut*"])
    seq = lp.compute_scores(
        build_model("resnet18", seed=0), "lap", graph="sequential", exclude=["*shortcut*"]
    )
    assert set(fx) == set(seq) and not SHORTCUTS & set(fx)
    # layer1.0.conv1 reads the stem's output and feeds layer1.0.conv2 in both views
    assert torch.allclose(fx["layer1.0.conv1"], seq["layer1.0.conv1"])
    # layer1.0.conv2 feeds the add: the traced graph also sees the next blocks' conv1s
    assert not torch.allclose(fx["layer1.0.conv2"], seq["layer1.0.conv2"])


def test_an_excluded_layer_cannot_also_be_asked_for(resnet):
    model = build_model("resnet18", seed=0)
    with pytest.raises(ValueError, match="both excluded and asked"):
        lp.prune(model, "mp", {"layer2.0.shortcut.0": 0.5}, exclude=["*shortcut*"])


def test_protocol_exclude_keeps_the_schedule_off_those_layers():
    tiny_data = load_dataset("mnist", subset=64)
    protocol = Protocol(
        model="resnet18", dataset="mnist", train_steps=1, retrain_steps=1, batch_size=8,
        exclude=("*shortcut*",), graph="sequential", eval_examples=16,
    )  # fmt: skip
    dense = train_dense(protocol, tiny_data)
    model = dense_model(protocol, dense, tiny_data)
    result = prune_and_retrain(protocol, model, dense, tiny_data, "lap", 10)
    assert all(result.keep_layers[n] == 1.0 for n in SHORTCUTS)
    assert result.keep_layers["conv1"] == 1.0  # the paper keeps ResNet-18's first conv dense
    assert result.keep_layers["layer1.0.conv1"] < 0.25
    # the stored keep counts the dense layers whole, as it always has (issue 23 kept it so)
    layers = lp.graph.prunable_layers(model)
    masks = [getattr(m, "weight_mask", torch.ones_like(m.weight)) for m in layers.values()]
    assert result.keep == sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)
    assert list(result.keep_layers) == list(layers)


@pytest.mark.parametrize("name", ["conv6", "vgg11", "vgg16", "vgg19", "resnet18"])
def test_each_conv_model_trains_prunes_and_retrains_a_few_steps(name):
    data = load_dataset("mnist", subset=48)
    protocol = Protocol(
        model=name, dataset="mnist", train_steps=2, retrain_steps=2, batch_size=8,
        eval_examples=16, channels_last=True,
    )  # fmt: skip
    dense = train_dense(protocol, data)
    model = dense_model(protocol, dense, data)
    result = prune_and_retrain(protocol, model, dense, data, "lap-forward", 8)
    assert 0.0 <= result.test_acc_retrained <= 1.0
    assert result.keep < 0.5
    pruned = [m for m in model.modules() if hasattr(m, "weight_mask")]
    assert pruned and all(
        torch.equal(m.weight, m.weight_orig * m.weight_mask)
        and not (m.weight[m.weight_mask == 0]).any()
        for m in pruned
    )


def test_module_order_chain_scales_conv2_by_bn2_where_the_official_code_takes_the_shortcut_norm(
    resnet,
):
    # docs/residual-lap.md: the official get_bn_weights gives each layer the last batch norm
    # registered before the next masked layer, shortcut.1 in the downsampling blocks
    chain = build_graph(resnet, "sequential", skip=SHORTCUTS)
    for stage in ("layer2", "layer3", "layer4"):
        block = getattr(resnet, stage)[0]
        assert chain[f"{stage}.0.conv2"].batchnorm is block.bn2
        assert chain[f"{stage}.0.conv2"].batchnorm is not block.shortcut[1]
    assert chain["layer1.0.conv2"].batchnorm is resnet.layer1[0].bn2
