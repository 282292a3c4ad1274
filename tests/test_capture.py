"""Capture (issue 23): tensor constants under fx, quiet and one-line failures, advice that works."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.graph import GraphError, build_graph


class ConstantGate(nn.Module):
    """``fc1(x) * torch.arange(1, 9)``: fx stores the constant on the model while tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.fc1(x) * torch.arange(1.0, 9.0))


def test_tensor_constant_is_traced_scaled_and_the_model_left_as_it_was():
    torch.manual_seed(0)
    model = ConstantGate()
    attrs = {m: set(vars(m)) for m in model.modules()}
    state = set(model.state_dict())
    x = (torch.randn(2, 4),)
    scores = lp.compute_scores(model, "lap", example_inputs=x)
    w1, w2 = model.fc1.weight.detach(), model.fc2.weight.detach()
    scale = torch.arange(1.0, 9.0)  # a constant per-unit scale, read like a batch norm
    torch.testing.assert_close(scores["fc1"], w1.abs() * (w2 * scale).norm(dim=0)[:, None])
    torch.testing.assert_close(scores["fc2"], w2.abs() * (scale[:, None] * w1).norm(dim=1))
    assert build_graph(model, example_inputs=x).capture == "fx"
    assert {m: set(vars(m)) for m in model.modules()} == attrs  # no _tensor_constant0 left
    assert set(model.state_dict()) == state
    report = lp.prune(model, "lap", 0.5, example_inputs=x)
    assert [r.kept for r in report.layers] == [16, 12]
    assert not [a for m in model.modules() for a in vars(m) if "constant" in a]


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class Detector(nn.Module):
    """A head with Python control flow on tensor values: neither fx nor export follow it."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = Backbone()
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.backbone(x)
        if h.sum() > 0:
            h = h * 2
        return self.head(h)


def test_capture_failing_under_both_tracers_is_one_quiet_line(capfd, caplog):
    model = Detector()
    with caplog.at_level(logging.DEBUG), pytest.raises(GraphError) as err:
        lp.prune(model, "lap", 0.5, example_inputs=(torch.randn(2, 4),))
    out, errs = capfd.readouterr()
    assert out == "" and errs == ""  # torch.export's partial graph is not printed
    assert not [r for r in caplog.records if r.name.startswith("torch")]
    msg = str(err.value)
    assert "\n" not in msg
    assert "torch.fx: cannot capture it: TraceError at test_capture.py:" in msg
    assert "torch.export: cannot capture it: " in msg
    assert "example_inputs" not in msg  # they were passed
    assert "lp.prune(model.backbone, ...)" in msg
    assert "graph='sequential'" in msg  # a plain chain in module order: it can work
    lp.prune(model.backbone, "lap", 0.5, example_inputs=(torch.randn(2, 4),))  # the advice works
    assert int(model.backbone.a.weight_mask.sum()) == 16
    with pytest.raises(GraphError, match=r"pass example_inputs=\(a batch"):
        build_graph(Detector())  # a guessed input: they may help


class Gated(nn.Module):
    """A gate (a * b) and then a running sum that mixes units (no rule follows it)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)

    def forward(self, x):
        return self.c(torch.cumsum(self.a(x) * self.b(x), dim=-1))


def test_advice_never_goes_in_a_circle():
    x = (torch.randn(4, 4),)
    with pytest.raises(GraphError) as err:
        lp.prune(Gated(), "lap", 0.5, example_inputs=x)
    msg = str(err.value)
    assert "torch.fx: cannot follow units through op 'cumsum'" in msg and "torch.export: " in msg
    assert "strict=False" in msg
    assert "sequential" not in msg  # sequential refuses the gate
    with pytest.raises(GraphError) as err:
        lp.prune(Gated(), "lap", 0.5, example_inputs=x, graph="sequential")
    assert "use graph='fx' with strict=False" in str(err.value)
    with pytest.warns(UserWarning, match="strict=False"):  # and that advice works
        report = lp.prune(Gated(), "lap", 0.5, example_inputs=x, strict=False)
    assert [r.kept for r in report.layers] == [8, 8, 8]


def test_fx_failing_on_an_op_falls_back_to_export():
    rules = lp.graph.DEFAULT_RULES.copy()
    rules.modules.pop(nn.Softsign, None)  # fx sees the module whole; export sees abs/add/div
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Softsign(), nn.Conv2d(4, 2, 1))
    graph = build_graph(model, example_inputs=(torch.randn(2, 3, 4, 4),), rules=rules)
    assert graph.capture == "export"
    assert lp.neighbour_names(graph, "0") == ([], ["2"])
    with pytest.raises(GraphError) as err:  # fx cannot follow it either: not suggested
        build_graph(Gated(), mode="export", example_inputs=(torch.randn(4, 4),))
    assert "graph='fx'" not in str(err.value)
    rules.functions.pop(torch.ops.aten.relu.default)  # export's relu has no rule; fx's has
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(GraphError, match="pass graph='fx'"):
        build_graph(mlp, mode="export", example_inputs=(torch.randn(2, 4),), rules=rules)
    assert build_graph(mlp, example_inputs=(torch.randn(2, 4),), rules=rules).capture == "fx"
