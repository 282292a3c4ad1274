"""Capture (issue 23): tensor constants under fx, quiet and one-line failures, advice that works."""

from __future__ import annotations

import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.graph import build_graph


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
