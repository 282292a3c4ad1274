"""One test per op rule: LAP scores on a tiny block against the factors computed by hand.

For a weight from input unit j to output unit k, LAP is |w| · f_in[j] · f_out[k] (Eq. 5/9):
f_in is the root of the summed squared row norms of the layers writing unit j, f_out the root
of the summed squared column norms of the layers reading unit k (1 for an open end).
"""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.graph import GraphError, build_graph, register_passthrough
from lookahead_prune.graph.rules import DEFAULT_RULES, Same

from .any_models import (
    Attention,
    LSTMClassifier,
    ManualRMSNorm,
    MeanPooledEmbedding,
    NormSandwich,
    SmallCNN,
    SqueezeExcite,
    SwiGLU,
    TwoInputs,
    UNet,
    ViTBlock,
)
from .test_graph import CumSum, Inception


def rows(w: torch.Tensor) -> torch.Tensor:
    """‖W[k, :]‖ per output unit (kernel entries included), weight as [out, in, ...]."""
    return w.detach().flatten(1).norm(dim=1)


def cols(w: torch.Tensor) -> torch.Tensor:
    """‖W[:, j]‖ per input unit, weight as [out, in, ...]."""
    return w.detach().transpose(0, 1).flatten(1).norm(dim=1)


def hand(w: torch.Tensor, f_in: torch.Tensor | float, f_out: torch.Tensor | float):
    """|w| · f_in[j] · f_out[k] shaped like w ([out, in, ...])."""
    w = w.detach()
    tail = (1,) * (w.dim() - 2)
    f_in = torch.as_tensor(f_in, dtype=w.dtype).expand(w.shape[1]).reshape(1, -1, *tail)
    f_out = torch.as_tensor(f_out, dtype=w.dtype).expand(w.shape[0]).reshape(-1, 1, *tail)
    return w.abs() * f_in * f_out


def l2(*parts: torch.Tensor) -> torch.Tensor:
    return torch.stack(parts).square().sum(0).sqrt()


def scores(model: nn.Module, **kw) -> dict[str, torch.Tensor]:
    return lp.compute_scores(model, "lap", **kw)


@pytest.mark.parametrize("side", [8, 16])
def test_flatten_into_linear_needs_no_input_shape(side):
    torch.manual_seed(0)
    model = SmallCNN(side).double()
    graph = build_graph(model)  # no example_inputs: the map follows from in_features/channels
    link = graph["fc"].producers[0]
    per_channel = (side // 4) ** 2
    assert link.producer == "c2"
    assert link.index.tolist() == [f // per_channel for f in range(6 * per_channel)]
    s = scores(model)
    f_in = rows(model.c2.weight).repeat_interleave(per_channel)
    assert torch.allclose(s["fc"], hand(model.fc.weight, f_in, 1.0))
    report = lp.prune(model, "lap", keep=0.3)
    assert [r.kept for r in report.layers] == [round(0.3 * r.total) for r in report.layers]


def test_gate_keeps_units_on_both_inputs():
    torch.manual_seed(0)
    m = SqueezeExcite().double()
    s = scores(m)
    assert torch.allclose(
        s["out"], hand(m.out.weight, l2(rows(m.conv.weight), rows(m.fc2.weight)), 1)
    )
    assert torch.allclose(s["fc2"], hand(m.fc2.weight, rows(m.fc1.weight), cols(m.out.weight)))
    f_out = l2(cols(m.fc1.weight), cols(m.out.weight))
    assert torch.allclose(s["conv"], hand(m.conv.weight, 1, f_out))


def test_swiglu_gate_and_up_both_feed_down():
    torch.manual_seed(0)
    m = SwiGLU().double()
    s = scores(m)
    f_in = l2(rows(m.gate.weight), rows(m.up.weight))
    assert torch.allclose(s["down"], hand(m.down.weight, f_in, cols(m.out.weight)))
    assert torch.allclose(s["gate"], hand(m.gate.weight, rows(m.inp.weight), cols(m.down.weight)))
    assert torch.allclose(
        s["inp"], hand(m.inp.weight, 1, l2(cols(m.gate.weight), cols(m.up.weight)))
    )


def test_upsampling_keeps_units_and_conv_transpose_is_a_layer():
    torch.manual_seed(0)
    m = UNet().double()
    s = scores(m, example_inputs=(torch.zeros(1, 1, 8, 8),))
    up = m.up.weight.detach().transpose(0, 1)  # ConvTranspose [in, out, k, k] as [out, in, k, k]
    f_in_u1 = torch.cat([rows(m.d1.weight), rows(up)])
    assert torch.allclose(s["u1"], hand(m.u1.weight, f_in_u1, cols(m.head.weight)))
    expected_up = hand(up, rows(m.d2.weight), cols(m.u1.weight)[4:]).transpose(0, 1)
    assert s["up"].shape == m.up.weight.shape
    assert torch.allclose(s["up"], expected_up)
    f_out_d1 = l2(cols(m.d2.weight), cols(m.u1.weight)[:4])
    assert torch.allclose(s["d1"], hand(m.d1.weight, 1, f_out_d1))
    assert torch.allclose(s["head"], hand(m.head.weight, rows(m.u1.weight), 1))


def test_linear_per_token_and_mean_over_tokens_keep_units():
    torch.manual_seed(0)
    m = MeanPooledEmbedding().double()
    s = scores(m)  # input guessed as a batch of token ids
    assert torch.allclose(s["fc2"], hand(m.fc2.weight, rows(m.fc1.weight), 1))
    assert torch.allclose(s["fc1"], hand(m.fc1.weight, 1, cols(m.fc2.weight)))
    report = lp.prune(m, "lap", keep=0.5)
    assert report.dense == (("emb.weight", "not prunable (Embedding.weight)"),)


@pytest.mark.parametrize(
    "norm",
    [
        lambda: nn.LayerNorm(6),
        lambda: nn.RMSNorm(6),
        lambda: nn.GroupNorm(3, 6),
        lambda: ManualRMSNorm(6),
    ],
    ids=["layernorm", "rmsnorm", "groupnorm", "manual-rmsnorm"],
)
def test_norm_weight_scales_the_link_like_batch_norm(norm):
    torch.manual_seed(0)
    m = NormSandwich(norm()).double()
    with torch.no_grad():
        m.norm.weight.uniform_(-2, 2)
    gamma = m.norm.weight.detach().abs()
    s = scores(m)
    assert torch.allclose(s["a"], hand(m.a.weight, 1, gamma * cols(m.b.weight)))
    assert torch.allclose(s["b"], hand(m.b.weight, gamma * rows(m.a.weight), 1))
    plain = scores(m, bn=False)  # bn=False drops every norm scale, as for batch norm
    assert torch.allclose(plain["a"], hand(m.a.weight, 1, cols(m.b.weight)))


@pytest.mark.parametrize("how", ["sdpa", "matmul", "einsum"])
def test_attention_values_feed_the_output_and_queries_keys_end_open(how):
    torch.manual_seed(0)
    m = Attention(manual=how == "matmul", einsum=how == "einsum").double()
    s = scores(m, example_inputs=(torch.zeros(1, 4, 5, dtype=torch.float64),))
    assert torch.allclose(s["q"], hand(m.q.weight, rows(m.inp.weight), 1))
    assert torch.allclose(s["k"], hand(m.k.weight, rows(m.inp.weight), 1))
    assert torch.allclose(s["v"], hand(m.v.weight, rows(m.inp.weight), cols(m.o.weight)))
    assert torch.allclose(s["o"], hand(m.o.weight, rows(m.v.weight), cols(m.head.weight)))
    f_out = l2(cols(m.q.weight), cols(m.k.weight), cols(m.v.weight))
    assert torch.allclose(s["inp"], hand(m.inp.weight, 1, f_out))


def test_fused_qkv_split_along_units():
    torch.manual_seed(0)
    m = Attention(fused=True).double()
    s = scores(m, example_inputs=(torch.zeros(1, 4, 5, dtype=torch.float64),))
    f_out = torch.cat([torch.ones(16, dtype=torch.float64), cols(m.o.weight)])
    assert torch.allclose(s["qkv"], hand(m.qkv.weight, rows(m.inp.weight), f_out))
    assert torch.allclose(s["o"], hand(m.o.weight, rows(m.qkv.weight)[16:], cols(m.head.weight)))


def test_vit_block_neighbours_through_class_token_norms_and_residuals():
    graph = build_graph(ViTBlock(), example_inputs=(torch.zeros(1, 3, 8, 8),))
    nb = {n: lp.neighbour_names(graph, n) for n in graph.names()}
    assert nb["patch"] == ([], ["q", "k", "v"])
    assert nb["o"] == (["v"], ["f1"])
    assert nb["head"] == (["f2"], [])
    assert torch.equal(graph["head"].in_open, torch.ones(8))  # the residual stream: identity
    assert torch.equal(graph["q"].out_open, torch.ones(8))


def test_lstm_and_embedding_stay_dense_and_are_listed():
    model = LSTMClassifier()
    assert lp.neighbour_names(build_graph(model), "fc1") == ([], ["fc2"])
    report = lp.prune(model, "lap", keep=0.5, exclude=["fc2"])
    dense = dict(report.dense)
    assert dense["fc2.weight"] == "excluded"
    assert dense["rnn.weight_ih_l0"] == "not prunable (LSTM.weight_ih_l0)"
    assert "emb.weight" in dense and "dense: rnn.weight_hh_l0" in report.table()


def test_transformer_encoder_is_captured_with_export_and_its_packed_qkv_pruned():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    graph = build_graph(model, example_inputs=(x,))
    assert graph.capture == "export"
    attn = "layers.0.self_attn"
    assert lp.neighbour_names(graph, attn) == ([], [attn + ".out_proj"])
    assert lp.neighbour_names(graph, "layers.0.linear1") == (
        [attn + ".out_proj"],
        ["layers.0.linear2"],
    )
    # in_proj_weight packs q, k, v: q and k end in the attention product, v feeds out_proj
    assert graph[attn].out_open.tolist() == [1.0] * 16 + [0.0] * 8
    mha = model.layers[0].self_attn
    s = scores(model, example_inputs=(x,))
    f_out = torch.cat([torch.ones(16, dtype=x.dtype), cols(mha.out_proj.weight)])
    assert torch.allclose(s[attn], hand(mha.in_proj_weight, 1, f_out))
    report = lp.prune(model, "lap", keep=0.3, example_inputs=(x,))
    assert all(r.kept == round(0.3 * r.total) for r in report.layers)
    assert hasattr(mha, "in_proj_weight_mask")
    assert torch.isfinite(model(x)).all()


def test_strict_false_opens_what_cannot_be_followed_and_says_so():
    model = CumSum()
    with pytest.raises(GraphError, match=r"op 'cumsum'"):
        lp.prune(model, "lap", 0.5, example_inputs=(torch.zeros(4, 4),))
    with pytest.warns(UserWarning, match="strict=False"):
        report = lp.prune(model, "lap", 0.5, example_inputs=(torch.zeros(4, 4),), strict=False)
    assert {n for n, _ in report.approximated} == {"a", "b"}
    assert [r.kept for r in report.layers] == [8, 8]


def test_sequential_refuses_gates_and_concatenation():
    with pytest.raises(GraphError, match="gate"):
        lp.prune(SqueezeExcite(), "lap", 0.5, graph="sequential")
    with pytest.raises(GraphError, match="concatenation"):
        lp.prune(Inception(), "lap", 0.5, graph="sequential")
    with pytest.raises(GraphError, match="attention"):
        lp.prune(ViTBlock(), "lap", 0.5, graph="sequential", example_inputs=torch.zeros(1, 3, 8, 8))
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
    with pytest.raises(GraphError, match="attention"):  # captured from a guessed input
        lp.prune(encoder, "lap", 0.5, graph="sequential")
    swish = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2))  # x * sigmoid(x) is no gate
    lp.prune(swish, "lap", 0.5, graph="sequential")


def test_example_inputs_as_keywords():
    graph = build_graph(
        TwoInputs(), example_inputs={"x": torch.zeros(1, 3), "y": torch.zeros(1, 4)}
    )
    assert lp.neighbour_names(graph, "a") == ([], ["b"])


def test_register_passthrough_adds_a_rule_and_cannot_replace_a_real_one():
    class Erf(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.special.erfc(self.a(x)))

    model = Erf()
    with pytest.raises(GraphError, match="erfc"):
        build_graph(model)
    own = DEFAULT_RULES.copy()  # a rule set for one build leaves the default alone
    own.add(Same(), torch.special.erfc)
    assert lp.neighbour_names(build_graph(model, rules=own), "a") == ([], ["b"])
    with pytest.raises(GraphError, match="erfc"):
        build_graph(model)
    register_passthrough(torch.special.erfc)  # the next build sees it (the rule set changed)
    assert lp.neighbour_names(build_graph(model), "a") == ([], ["b"])
    with pytest.raises(ValueError, match="gate"):
        register_passthrough(operator.mul)


def test_unguessable_input_fails_in_one_line_without_a_chained_traceback():
    with pytest.raises(GraphError) as info:
        build_graph(TwoInputs())
    message = str(info.value)
    assert "\n" not in message and "example_inputs" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    graph = build_graph(TwoInputs(), example_inputs=(torch.zeros(1, 3), torch.zeros(1, 4)))
    assert lp.neighbour_names(graph, "b") == (["a"], [])


def test_lap_variants_run_on_every_tiny_model():
    cases = [
        (SmallCNN(8), None),
        (SqueezeExcite(), None),
        (SwiGLU(), None),
        (UNet(), (torch.zeros(1, 1, 8, 8),)),
        (MeanPooledEmbedding(), None),
        (LSTMClassifier(), None),
        (ViTBlock(), (torch.zeros(1, 3, 8, 8),)),
    ]
    for model, example in cases:
        for method, scope in (("lap", "layer"), ("lap-forward-seq", "layer"), ("lap", "global")):
            m = type(model)() if not isinstance(model, SmallCNN) else SmallCNN(8)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = lp.prune(m, method, keep=0.3, scope=scope, example_inputs=example)
            if scope == "layer":
                assert all(r.kept == round(0.3 * r.total) for r in report.layers), type(m)
            else:
                assert report.kept == round(0.3 * report.total)


def test_a_one_unit_gate_scales_without_carrying_units_and_ends_open():
    class TokenGate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.gate, self.out = nn.Linear(4, 6), nn.Linear(6, 1), nn.Linear(6, 2)

        def forward(self, x):
            h = self.inp(x)
            return self.out(h * torch.sigmoid(self.gate(h)))

    m = TokenGate().double()
    s = scores(m, example_inputs=(torch.zeros(1, 3, 4, dtype=torch.float64),))
    assert torch.allclose(s["gate"], hand(m.gate.weight, rows(m.inp.weight), 1))
    assert torch.allclose(s["out"], hand(m.out.weight, rows(m.inp.weight), 1))


@pytest.mark.parametrize("name", ["vgg11", "resnet18", "conv6"])
def test_export_capture_gives_the_same_lap_scores_as_fx_on_the_paper_models(name, capfd):
    from lookahead_prune.models import build_model

    torch.manual_seed(0)
    kw = {"in_channels": 3, "image_size": 32} if name == "vgg11" else {}
    model = build_model(name, **kw).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)
                m.running_var.uniform_(0.5, 2.0)
    by_fx = scores(model)
    by_export = scores(model, graph="export")  # guessed inputs; failed guesses stay quiet
    assert build_graph(model, mode="export").capture == "export"
    for layer, s in by_fx.items():
        assert torch.allclose(s, by_export[layer], rtol=1e-12, atol=0), layer
    assert capfd.readouterr().err == ""
