"""Weight-normalised layers (issue 23): the mask as one more parametrisation."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import lookahead_prune as lp
from lookahead_prune.masks import WeightMask, current_mask, is_masked

X = (torch.randn(3, 4, generator=torch.Generator().manual_seed(1)),)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6),
        nn.ReLU(),
        parametrizations.weight_norm(nn.Linear(6, 5)),
        nn.ReLU(),
        parametrizations.spectral_norm(nn.Linear(5, 3)),
    )


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return {n: model.get_submodule(n).weight.clone() for n in ("0", "2", "4")}


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_lap_scores_of_a_weight_normalised_layer_use_its_effective_weight(graph):
    model = _net()
    w = _weights(model)
    scores = lp.compute_scores(model, "lap", graph=graph, example_inputs=X)
    hand = w["2"].abs() * w["0"].norm(dim=1)[None, :] * w["4"].norm(dim=0)[:, None]
    torch.testing.assert_close(scores["2"], hand)
    torch.testing.assert_close(scores["4"], w["4"].abs() * w["2"].norm(dim=1)[None, :])


def test_weight_norm_and_spectral_norm_layers_prune_exactly_and_cumulatively():
    model = _net()
    model.train()  # spectral norm's power iteration must not run while pruning
    dense = _weights(model)
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("_u", "_v"))}
    report = lp.prune(model, "lap", 0.5, example_inputs=X)
    assert [(r.name, r.kept) for r in report.layers] == [("0", 12), ("2", 15), ("4", 8)]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())
    for n in ("2", "4"):
        layer = model.get_submodule(n)
        assert isinstance(layer.parametrizations.weight[-1], WeightMask)
        assert is_masked(layer) and not torch.nn.utils.prune.is_pruned(layer)
    assert "2.parametrizations.weight.1.mask" in model.state_dict()
    masks = {n: current_mask(model.get_submodule(n)).float() for n in ("2", "4")}
    model.eval()
    h = torch.relu(F.linear(X[0], model[0].weight, model[0].bias))
    h = torch.relu(F.linear(h, dense["2"] * masks["2"], model[2].bias))
    expected = F.linear(h, dense["4"] * masks["4"], model[4].bias)
    torch.testing.assert_close(model(X[0]), expected)  # forward sees the masked weight
    report = lp.prune(model, "lap", 0.25, example_inputs=X)  # cumulative, one mask each
    assert [(r.name, r.kept) for r in report.layers] == [("0", 6), ("2", 8), ("4", 4)]
    for n in ("2", "4"):
        layer = model.get_submodule(n)
        assert sum(isinstance(p, WeightMask) for p in layer.parametrizations.weight) == 1
        assert not (current_mask(layer) & ~masks[n].bool()).any()  # never revived
    baked = copy.deepcopy(model[2])
    parametrize.remove_parametrizations(baked, "weight")  # bakes the masked weight in
    assert int((baked.weight != 0).sum()) == 8


def test_weight_normalised_layer_excluded_is_reported_excluded():
    model = _net()
    report = lp.prune(model, "mp", 0.5, exclude=["2"])
    dense = dict(report.dense)
    assert dense["2.parametrizations.weight.original1"] == "excluded"
    assert [r.name for r in report.excluded] == ["2"]
    assert not is_masked(model[2])


@pytest.mark.parametrize(
    ("norm", "fix"),
    [
        (torch.nn.utils.weight_norm, "remove_weight_norm"),
        (torch.nn.utils.spectral_norm, "remove_spectral_norm"),
    ],
)
def test_hook_based_norms_are_refused_with_the_fix_and_excluded_cleanly(norm, fix):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), norm(nn.Linear(6, 5)))
    with pytest.raises(ValueError, match=rf"layer '2'.*{fix}.*exclude=\['2'\]"):
        lp.prune(model, "mp", 0.5)
    assert not is_masked(model[0])
    report = lp.prune(model, "lap", 0.5, exclude=["2"])
    assert all(why == "excluded" for name, why in report.dense if name.startswith("2."))
    assert [r.kept for r in report.layers] == [12]


class TCNBlock(nn.Module):
    """A temporal block as TCNs write it: weight-normalised causal convs, a 1x1 downsample."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = parametrizations.weight_norm(nn.Conv1d(3, 8, 3, padding=2))
        self.c2 = parametrizations.weight_norm(nn.Conv1d(8, 8, 3, padding=2))
        self.down = nn.Conv1d(3, 8, 1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        n = x.shape[-1]  # a Proxy under fx: the slices below need torch.export
        h = torch.relu(self.c1(x)[..., :n])
        h = torch.relu(self.c2(h)[..., :n])
        return self.fc((h + self.down(x))[:, :, -1])


def test_weight_normalised_tcn_prunes_in_strict_mode():
    model = TCNBlock()
    x = (torch.randn(2, 3, 16),)
    graph = lp.graph.build_graph(model, example_inputs=x)
    assert lp.neighbour_names(graph, "c2") == (["c1"], ["fc"])
    report = lp.prune(model, "lap", 0.3, example_inputs=x)
    assert all(r.kept == round(0.3 * r.total) for r in report.layers)
    assert torch.isfinite(model(*x)).all()
