"""Ops and unit-axis reshapes met in real architectures (issue 23, causes 1, 2 and 5).

Each reproducer prunes in strict mode with exact masks, and its Eq. 5 factors are checked
against a hand computation, as in ``tests/test_rules.py``.
"""

from __future__ import annotations

import warnings
from copy import deepcopy

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.graph import build_graph

from . import reach_models as R
from .test_rules import cols, hand, l2, rows

KEEP = 0.3


def _double(example):
    return tuple(x.double() if x.is_floating_point() else x for x in example)


def check(model: nn.Module, example, graph: str = "fx", capture: str | None = None):
    """LAP scores of ``model`` (strict), after checking that pruning it keeps exact counts
    with nothing approximated and no warning."""
    example = _double(example)
    s = lp.compute_scores(model, "lap", example_inputs=example, graph=graph)
    built = build_graph(model, mode=graph, example_inputs=example)
    assert built.approximated == {}
    if capture is not None:
        assert built.capture == capture
    copy = deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = lp.prune(copy, "lap", keep=KEEP, example_inputs=example, graph=graph)
    assert report.approximated == ()
    assert [r.kept for r in report.layers] == [round(KEEP * r.total) for r in report.layers]
    return s


def _droppath_factors(m, s):
    assert torch.allclose(s["c2"], hand(m.c2.weight, rows(m.c1.weight), cols(m.head.weight)))
    f_in = l2(rows(m.c0.weight), rows(m.c2.weight))
    assert torch.allclose(s["head"], hand(m.head.weight, f_in, 1))
    assert torch.allclose(s["c0"], hand(m.c0.weight, 1, l2(cols(m.c1.weight), torch.ones(4))))


@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_stochastic_depth_keeps_units(functional, train):
    torch.manual_seed(0)
    m = R.DropPath(functional).double().train(train)
    s = check(m, (torch.randn(2, 3, 6, 6),), capture="fx")
    assert m.training == train
    _droppath_factors(m, s)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_a_wrapped_function_without_a_rule_is_captured_by_export(train):
    torch.manual_seed(0)
    m = R.PerSampleScaled().double().train(train)
    s = check(m, (torch.randn(2, 3, 6, 6),), capture="export")
    _droppath_factors(m, s)


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_addcmul_adds_its_product_like_a_residual_gate(graph):
    torch.manual_seed(0)
    m = R.AddCMul().double()
    s = check(m, (torch.randn(2, 5, 3),), graph)
    f_in = l2(rows(m.inp.weight), rows(m.a.weight), rows(m.b.weight))
    assert torch.allclose(s["out"], hand(m.out.weight, f_in, 1))
    assert torch.allclose(s["a"], hand(m.a.weight, rows(m.inp.weight), cols(m.out.weight)))
    f_out = l2(cols(m.a.weight), cols(m.b.weight), torch.ones(4))
    assert torch.allclose(s["inp"], hand(m.inp.weight, 1, f_out))


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_index_tensors_on_batch_and_token_axes_keep_units(graph):
    torch.manual_seed(0)
    m = R.TokenPool().double()
    s = check(m, (torch.randint(0, 10, (2, 5)),), graph)
    assert torch.allclose(s["proj"], hand(m.proj.weight, rows(m.fc.weight), 1))
    assert torch.allclose(s["fc"], hand(m.fc.weight, 1, cols(m.proj.weight)))


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_a_functional_conv_reading_a_module_weight_is_that_layer(graph):
    torch.manual_seed(0)
    m = R.FunctionalConv().double()
    s = check(m, (torch.randn(2, 7, 3),), graph)
    g = build_graph(m, mode=graph, example_inputs=(torch.randn(2, 7, 3).double(),))
    assert lp.neighbour_names(g, "conv") == (["inp"], ["out"])
    assert torch.allclose(s["out"], hand(m.out.weight, rows(m.conv.weight), 1))
    w = m.conv.weight.detach()  # depthwise: channel k reads input channel k alone
    f = (rows(m.inp.weight) * cols(m.out.weight)).view(6, 1, 1)
    assert torch.allclose(s["conv"], w.abs() * f)


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_roll_pad_and_swapaxes_on_token_axes_keep_units(graph):
    torch.manual_seed(0)
    m = R.RollPad().double()
    s = check(m, (torch.randn(2, 4, 4, 3),), graph)
    assert torch.allclose(s["b"], hand(m.b.weight, rows(m.a.weight), 1))
    assert torch.allclose(s["a"], hand(m.a.weight, 1, cols(m.b.weight)))


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_roll_along_units_permutes_them(graph):
    torch.manual_seed(0)
    m = R.RollUnits().double()
    s = check(m, (torch.randn(2, 3),), graph)
    assert torch.allclose(s["b"], hand(m.b.weight, rows(m.a.weight).roll(1), 1))
    assert torch.allclose(s["a"], hand(m.a.weight, 1, cols(m.b.weight).roll(-1)))


@pytest.mark.parametrize("index", [False, True], ids=["unbind", "index"])
@pytest.mark.parametrize("graph", ["fx", "export"])
def test_fused_qkv_split_into_sub_axes_and_unbound(graph, index):
    torch.manual_seed(0)
    m = R.FusedQKV(index=index).double()
    s = check(m, (torch.randn(2, 4, 5),), graph)
    f_out = torch.cat([torch.ones(16, dtype=torch.float64), cols(m.proj.weight)])
    assert torch.allclose(s["qkv"], hand(m.qkv.weight, rows(m.inp.weight), f_out))
    f_in = rows(m.qkv.weight)[16:]
    assert torch.allclose(s["proj"], hand(m.proj.weight, f_in, cols(m.head.weight)))


@pytest.mark.parametrize("einsum", [False, True], ids=["transpose", "einsum"])
@pytest.mark.parametrize("graph", ["fx", "export"])
def test_channel_shuffle_permutes_units(graph, einsum):
    torch.manual_seed(0)
    m = R.ChannelShuffle(einsum).double()
    s = check(m, (torch.randn(2, 3, 4, 4),), graph)
    perm = torch.tensor([g * 3 + i for i in range(3) for g in range(2)])  # [0, 3, 1, 4, 2, 5]
    assert torch.allclose(s["c2"], hand(m.c2.weight, rows(m.c1.weight)[perm], 1))
    f_out = torch.empty(6, dtype=torch.float64)
    f_out[perm] = cols(m.c2.weight)
    assert torch.allclose(s["c1"], hand(m.c1.weight, 1, f_out))


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_a_linear_across_tokens_is_an_open_end(graph):
    torch.manual_seed(0)
    m = R.TokenMixer().double()
    s = check(m, (torch.randn(2, 5, 3),), graph)
    assert torch.allclose(s["tok"], m.tok.weight.detach().abs())  # a factor of 1 both sides
    ones = torch.ones(4, dtype=torch.float64)
    assert torch.allclose(s["inp"], hand(m.inp.weight, 1, l2(ones, ones)))
    f_in = l2(rows(m.inp.weight), ones)  # the residual: inp, and tok's side open
    assert torch.allclose(s["ch"], hand(m.ch.weight, f_in, cols(m.out.weight)))


def test_a_linear_across_the_batch_axis_is_an_open_end():
    torch.manual_seed(0)
    m = R.AcrossBatch().double()
    s = check(m, (torch.randn(4, 4),))
    assert torch.allclose(s["a"], m.a.weight.detach().abs())
    assert torch.allclose(s["b"], m.b.weight.detach().abs())


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_unfold_to_patches_and_back_keeps_channels(graph):
    torch.manual_seed(0)
    m = R.Unfold().double()
    s = check(m, (torch.randn(2, 3, 4, 4),), graph)
    assert torch.allclose(s["fc"], hand(m.fc.weight, rows(m.c1.weight), cols(m.c2.weight)))
    assert torch.allclose(s["c1"], hand(m.c1.weight, 1, cols(m.fc.weight)))
    assert torch.allclose(s["c2"], hand(m.c2.weight, rows(m.fc.weight), 1))


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("batch", [1, 3])
def test_multihead_attention_folding_batch_into_heads(batch, batch_first):
    torch.manual_seed(0)
    m = R.MHA(batch_first=batch_first).double()
    x = torch.randn(batch, 4, 3)
    s = check(m, (x if batch_first else x.transpose(0, 1),))
    attn = m.attn
    f_out = torch.cat([torch.ones(16, dtype=torch.float64), cols(attn.out_proj.weight)])
    assert torch.allclose(s["attn"], hand(attn.in_proj_weight, rows(m.inp.weight), f_out))
    f_in = rows(attn.in_proj_weight)[16:]
    assert torch.allclose(s["attn.out_proj"], hand(attn.out_proj.weight, f_in, cols(m.head.weight)))


@pytest.mark.parametrize("graph", ["fx", "export"])
def test_the_model_input_seen_through_any_view_is_an_open_end(graph):
    torch.manual_seed(0)
    m = R.InputUnsqueeze().double()
    s = check(m, (torch.randn(2, 10),), graph)
    assert torch.allclose(s["c1"], hand(m.c1.weight, 1, cols(m.c2.weight)))
    assert torch.allclose(s["c2"], hand(m.c2.weight, rows(m.c1.weight), 1))
