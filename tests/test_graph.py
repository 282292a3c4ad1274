"""Neighbour discovery from the traced graph: residual adds, concat, flatten, branches, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.graph import GraphError, build_graph
from lookahead_prune.models import build_model


def _neighbours(model: nn.Module, **kw) -> dict[str, tuple[list[str], list[str]]]:
    graph = build_graph(model, **kw)
    return {n: lp.neighbour_names(graph, n) for n in graph.names()}


class Block(nn.Module):
    """A ResNet basic block with an identity or 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.short(x))


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.b1 = Block(4, 4)
        self.b2 = Block(4, 6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        x = self.b2(self.b1(torch.relu(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_residual_block_neighbours_and_identity_paths():
    model = TinyResNet()
    nb = _neighbours(model, example_inputs=(torch.zeros(1, 3, 8, 8),))
    assert nb["stem"] == ([], ["b1.conv1"])
    assert nb["b1.conv2"] == (["b1.conv1"], ["b2.conv1", "b2.short"])
    assert nb["b2.conv1"] == (["b1.conv2"], ["b2.conv2"])
    assert nb["fc"] == (["b2.conv2", "b2.short"], [])
    graph = build_graph(model)
    # The stem's output also skips block 1 (identity), and block 1's input reads that identity.
    assert torch.equal(graph["stem"].out_open, torch.ones(4))
    assert torch.equal(graph["b2.conv1"].in_open, torch.ones(4))  # b1's identity skip
    assert torch.equal(graph["b2.short"].in_open, torch.ones(4))
    assert torch.equal(graph["fc"].in_open, torch.zeros(6))  # projection: no identity
    assert graph["b1.conv1"].batchnorm is model.b1.bn1
    assert graph["b2.short"].batchnorm is None


def test_resnet18_shortcuts_are_neighbours():
    nb = _neighbours(build_model("resnet18"))
    assert nb["layer1.1.conv2"][1] == ["layer2.0.conv1", "layer2.0.shortcut.0"]
    assert nb["layer2.1.conv1"][0] == ["layer2.0.conv2", "layer2.0.shortcut.0"]
    assert nb["fc"][0] == ["layer4.1.conv2"]


class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.a = nn.Conv2d(4, 2, 1)
        self.b = nn.Conv2d(4, 3, 3, padding=1)
        self.head = nn.Conv2d(5, 2, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1))


def test_concat_splits_units_among_producers():
    model = Inception()
    graph = build_graph(model, example_inputs=(torch.zeros(1, 1, 6, 6),))
    assert lp.neighbour_names(graph, "stem") == ([], ["a", "b"])
    assert lp.neighbour_names(graph, "head") == (["a", "b"], [])
    links = {link.producer: link.index for link in graph["head"].producers}
    assert links["a"].tolist() == [0, 1, -1, -1, -1]
    assert links["b"].tolist() == [-1, -1, 0, 1, 2]
    # LAP's input factor of head is the producing row norm of whichever branch wrote the unit.
    scores = lp.compute_scores(model, "lap")["head"]
    rows = torch.cat([model.a.weight.flatten(1).norm(dim=1), model.b.weight.flatten(1).norm(dim=1)])
    expected = model.head.weight.detach().abs() * rows.view(1, 5, 1, 1)
    assert torch.allclose(scores, expected)


def test_flatten_maps_features_to_channels():
    model = build_model("conv6")
    graph = build_graph(model)
    link = graph["classifier.0"].producers[0]
    assert link.producer == "features.12"
    assert link.index.tolist() == [f // 9 for f in range(256 * 9)]  # 28x28 -> 3x3 after 3 pools


def test_depthwise_conv_is_followed():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=4), nn.ReLU(), nn.Conv2d(4, 3, 1)
    )
    nb = _neighbours(model, example_inputs=(torch.zeros(1, 2, 6, 6),))
    assert nb["2"] == (["0"], ["4"])


def test_sequential_fallback_chains_module_order():
    model = build_model("vgg11", in_channels=3, image_size=32)
    graph = build_graph(model, mode="sequential")
    assert graph.mode == "sequential"
    names = graph.names()
    assert lp.neighbour_names(graph, names[3]) == ([names[2]], [names[4]])
    assert graph[names[0]].batchnorm is model.features[1]


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return -self.fc(x)


class CumSum(nn.Module):
    """A running sum across units: an op that mixes units and has no rule."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), -1))


def test_untraceable_model_gets_a_clear_error_and_sequential_still_works():
    model = Untraceable()
    with pytest.raises(GraphError, match="graph='sequential'"):
        lp.prune(model, "lap", 0.5)
    assert not hasattr(model.fc, "weight_mask")
    lp.prune(model, "lap", 0.5, graph="sequential")
    assert int(model.fc.weight_mask.sum()) == 3


def test_unsupported_op_names_the_op():
    with pytest.raises(GraphError, match=r"op 'cumsum'"):
        build_graph(CumSum(), example_inputs=(torch.zeros(4, 4),))


def test_no_prunable_layers_and_bad_graph_mode():
    with pytest.raises(ValueError, match="no prunable layers"):
        build_graph(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="'fx' or 'sequential'"):
        build_graph(nn.Linear(2, 2), mode="order")


def test_graph_is_cached_per_model_and_rebuilt_when_modules_change():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    g1 = build_graph(model)
    assert build_graph(model) is g1
    model[2] = nn.Linear(4, 5)
    g2 = build_graph(model)
    assert g2 is not g1 and g2["2"].out_units == 5


def test_sequential_and_traced_graphs_agree_on_a_chain_with_batchnorm():
    model = build_model("vgg11", in_channels=3, image_size=32)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)
                m.running_var.uniform_(0.5, 2.0)
    fx_scores = lp.compute_scores(model, "lap")
    seq_scores = lp.compute_scores(model, "lap", graph="sequential")
    for name, score in fx_scores.items():
        assert torch.allclose(score, seq_scores[name], rtol=1e-5), name
    plain = lp.compute_scores(model, "lap", bn=False)
    assert not torch.allclose(plain["features.4"], fx_scores["features.4"])


class SumThenNorm(nn.Module):
    """Two branches added, then batch norm (pre-activation style): the BN is on both paths."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5, bias=False)
        self.b = nn.Linear(4, 5, bias=False)
        self.bn = nn.BatchNorm1d(5)
        self.c = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.c(torch.relu(self.bn(self.a(x) + self.b(x))))


def test_batchnorm_after_an_add_scales_both_branches_as_eq4():
    model = SumThenNorm().double().eval()
    with torch.no_grad():
        model.bn.weight.uniform_(-2, 2)
        model.bn.running_var.uniform_(0.1, 3)
    a = torch.diag(model.bn.weight / (model.bn.running_var + model.bn.eps).sqrt()).detach()
    wa, wc = model.a.weight.detach(), model.c.weight.detach()
    literal = torch.empty_like(wa)
    for k in range(5):
        for j in range(4):
            e = torch.zeros_like(wa)
            e[k, j] = wa[k, j]
            literal[k, j] = torch.linalg.matrix_norm(wc @ a @ e @ torch.ones(4, 1).double())
    assert torch.allclose(lp.compute_scores(model, "lap")["a"], literal)


class Heads(nn.Module):
    """Post-processing after the last layer (chunk, log_softmax) and a stored activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.fc2 = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        self.last_hidden = h
        mu, logvar = self.fc2(h).chunk(2, dim=1)
        return torch.log_softmax(mu, dim=1), logvar


def test_ops_after_the_last_layer_count_as_the_output_and_tracing_leaves_no_proxy():
    model = Heads()
    scores = lp.compute_scores(model, "lap")
    graph = build_graph(model)
    assert torch.equal(graph["fc2"].out_open, torch.ones(4))
    assert bool((scores["fc2"] > 0).all())
    assert not hasattr(model, "last_hidden") or isinstance(model.last_hidden, torch.Tensor)


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.spare = nn.Linear(9, 9)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_unused_layer_only_matters_when_it_is_pruned():
    model = WithUnused()
    lp.prune(model, "lap", 0.5, layers=["a", "b"])
    assert int(model.a.weight_mask.sum()) == 6
    with pytest.raises(GraphError, match="never called"):
        lp.prune(WithUnused(), "lap", 0.5)


def test_batchnorm_subclass_is_followed():
    class MyBN(nn.BatchNorm1d):
        pass

    model = nn.Sequential(nn.Linear(3, 4), MyBN(4), nn.ReLU(), nn.Linear(4, 2))
    assert lp.neighbour_names(build_graph(model), "0") == ([], ["3"])


def test_channel_reduction_is_refused_even_when_shapes_look_alike():
    class Squash(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.fc = nn.Linear(64, 2)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.conv(x)).mean(1), 1))

    with pytest.raises(GraphError, match="across units"):
        build_graph(Squash(), example_inputs=(torch.zeros(1, 1, 8, 8),))
