"""LAP scores against brute force: Eq. (4) computed literally, one weight zeroed at a time."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.scores import col_sq_norms


def _chain(*layers: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*layers)


def _eq4_linear(ws: list[torch.Tensor], i: int) -> torch.Tensor:
    """Eq. (4) literally: ‖J(W_{i+1})J(W_i)J(W_{i-1}) - J(W_{i+1})J(W_i|w=0)J(W_{i-1})‖_F."""
    w = ws[i]
    prev = ws[i - 1] if i > 0 else torch.ones(w.shape[1], 1, dtype=w.dtype)  # W_0 of ones
    nxt = ws[i + 1] if i + 1 < len(ws) else torch.ones(1, w.shape[0], dtype=w.dtype)
    full = nxt @ w @ prev
    out = torch.empty_like(w)
    for k, j in itertools.product(range(w.shape[0]), range(w.shape[1])):
        zeroed = w.clone()
        zeroed[k, j] = 0
        out[k, j] = torch.linalg.matrix_norm(full - nxt @ zeroed @ prev)
    return out


@pytest.mark.parametrize("activation", [nn.Identity, nn.ReLU, nn.Tanh])
def test_lap_equals_eq4_on_linear_layers(activation):
    model = _chain(
        nn.Linear(5, 4),
        activation(),
        nn.Linear(4, 6),
        activation(),
        nn.Linear(6, 3),
        activation(),
        nn.Linear(3, 2),
    ).double()
    ws = [m.weight.detach() for m in model if isinstance(m, nn.Linear)]
    scores = lp.compute_scores(model, method="lap")
    for i, name in enumerate(["0", "2", "4", "6"]):
        assert torch.allclose(scores[name], _eq4_linear(ws, i), rtol=1e-10, atol=1e-12), name


def test_mono_directional_scores_look_one_way():
    model = _chain(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    ws = [model[i].weight.detach() for i in (0, 2, 4)]
    lfp = lp.compute_scores(model, "lfp")["2"]
    lbp = lp.compute_scores(model, "lbp")["2"]
    col = ws[2].square().sum(0).sqrt()  # ‖W_3[:, k]‖ for output unit k of layer 2
    row = ws[0].square().sum(1).sqrt()  # ‖W_1[j, :]‖ for input unit j of layer 2
    assert torch.allclose(lfp, ws[1].abs() * col[:, None])
    assert torch.allclose(lbp, ws[1].abs() * row[None, :])
    assert torch.allclose(lp.compute_scores(model, "mp")["2"], ws[1].abs())


def _operator(module: nn.Module, in_shape: tuple[int, ...]) -> torch.Tensor:
    """The Jacobian of a linear module as an explicit matrix (outputs x inputs)."""
    n = int(torch.tensor(in_shape).prod())
    basis = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    with torch.no_grad():
        return module(basis).reshape(n, -1).T


def test_conv_and_flatten_match_eq4_with_circular_padding():
    """1x1 conv -> 3x3 conv -> flatten -> linear: Eq. 5 is exact for circular convolutions."""
    prev = nn.Conv2d(2, 3, 1, bias=False)
    mid = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False)
    nxt = nn.Linear(4 * 5 * 5, 3, bias=False)
    model = _chain(prev, nn.ReLU(), mid, nn.ReLU(), nn.Flatten(), nxt).double()
    scores = lp.compute_scores(model, "lap", example_inputs=(torch.zeros(1, 2, 5, 5),))["2"]
    j_prev = _operator(prev, (2, 5, 5))
    j_next = nxt.weight.detach()
    literal = torch.empty_like(mid.weight)
    for idx in itertools.product(*(range(s) for s in mid.weight.shape)):
        delta = nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular", bias=False).double()
        with torch.no_grad():
            delta.weight.zero_()
            delta.weight[idx] = mid.weight[idx]
        literal[idx] = torch.linalg.matrix_norm(j_next @ _operator(delta, (3, 5, 5)) @ j_prev)
    assert torch.allclose(scores, literal, rtol=1e-9)


def test_conv_consumer_matches_eq4_up_to_image_size():
    """With a 3x3 circular consumer, Eq. 4 = sqrt(H*W) * Eq. 5 for every weight."""
    prev = nn.Conv2d(2, 3, 1, bias=False)
    mid = nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular", bias=False)
    nxt = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular", bias=False)
    model = _chain(prev, mid, nn.ReLU(), nxt).double()
    scores = lp.compute_scores(model, "lap", example_inputs=(torch.zeros(1, 2, 4, 4),))["1"]
    j_prev, j_next = _operator(prev, (2, 4, 4)), _operator(nxt, (2, 4, 4))
    ratios = []
    for idx in itertools.product(*(range(s) for s in mid.weight.shape)):
        delta = nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular", bias=False).double()
        with torch.no_grad():
            delta.weight.zero_()
            delta.weight[idx] = mid.weight[idx]
        lit = torch.linalg.matrix_norm(j_next @ _operator(delta, (3, 4, 4)) @ j_prev)
        ratios.append(lit / scores[idx])
    assert torch.allclose(torch.stack(ratios), torch.full((len(ratios),), 4.0, dtype=torch.float64))


def test_batchnorm_factors_match_eq9():
    """Linear-BN-Linear-BN-Linear in eval mode: Eq. 4 with J(BN)=diag(a) equals Eq. 9."""
    model = _chain(
        nn.Linear(4, 5),
        nn.BatchNorm1d(5),
        nn.ReLU(),
        nn.Linear(5, 3),
        nn.BatchNorm1d(3),
        nn.ReLU(),
        nn.Linear(3, 2),
    ).double()
    for bn in (model[1], model[4]):
        with torch.no_grad():
            bn.weight.uniform_(-2, 2)
            bn.running_var.uniform_(0.1, 3)
    model.eval()
    w1, w2, w3 = (model[i].weight.detach() for i in (0, 3, 6))

    def scale(bn):
        return torch.diag(bn.weight.detach() / (bn.running_var + bn.eps).sqrt())

    a1, a2 = scale(model[1]), scale(model[4])
    literal = torch.empty_like(w2)
    for k, j in itertools.product(range(3), range(5)):
        e = torch.zeros_like(w2)
        e[k, j] = w2[k, j]
        literal[k, j] = torch.linalg.matrix_norm(w3 @ a2 @ e @ a1 @ w1)
    assert torch.allclose(lp.compute_scores(model, "lap")["3"], literal, rtol=1e-10)
    plain = lp.compute_scores(model, "lap", bn=False)["3"]
    assert torch.allclose(plain, _eq4_linear([w1, w2, w3], 1), rtol=1e-10)


def test_grouped_and_depthwise_convs_map_channels_by_group():
    prev = nn.Conv2d(2, 4, 3, padding=1)
    mid = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    depth = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    model = _chain(prev, nn.ReLU(), mid, nn.ReLU(), depth)
    scores = lp.compute_scores(model, "lap", example_inputs=(torch.zeros(1, 2, 8, 8),))
    w_prev, w_mid, w_dep = prev.weight.detach(), mid.weight.detach(), depth.weight.detach()
    row = w_prev.flatten(1).norm(dim=1)  # per channel of mid's input
    col = w_dep.flatten(1).norm(dim=1)  # depthwise: channel k is read by filter k only
    expected = torch.empty_like(w_mid)
    for k, jl in itertools.product(range(6), range(2)):
        j = (k // 3) * 2 + jl  # global input channel of this grouped weight
        expected[k, jl] = w_mid[k, jl].abs() * row[j] * col[k]
    assert torch.allclose(scores["2"], expected, rtol=1e-5)
    assert torch.allclose(
        col_sq_norms(w_mid, groups=2), w_mid.square().sum((2, 3)).view(2, 3, 2).sum(1).reshape(-1)
    )


def test_lamp_matches_definition():
    model = _chain(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    w = model[0].weight.detach().flatten()
    score = lp.compute_scores(model, "lamp")["0"].flatten()
    for u in range(w.numel()):
        denom = w[w.abs() >= w[u].abs()].square().sum()
        assert torch.isclose(score[u], w[u].square() / denom)


def test_random_scores_are_seeded():
    model = _chain(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    a = lp.compute_scores(model, "rp", seed=1)
    b = lp.compute_scores(model, "rp", seed=1)
    c = lp.compute_scores(model, "rp", seed=2)
    assert torch.equal(a["0"], b["0"]) and not torch.equal(a["0"], c["0"])


def test_scores_use_masked_weights():
    model = _chain(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    lp.prune(model, "mp", keep={"2": 0.5})
    w = model[2].weight.detach()
    expected = model[0].weight.detach().abs() * w.square().sum(0).sqrt()[:, None]
    assert torch.allclose(lp.compute_scores(model, "lap")["0"], expected)
