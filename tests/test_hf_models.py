"""LAP on Hugging Face models built from tiny configs (no downloads): GPT-2, BERT, Llama.

They are captured with torch.export (fx cannot trace them); GPT-2's Conv1D layers (weights
stored [in, out]) are prunable, Llama's gated MLP and RMSNorm and grouped-query attention are
followed, and tied weights are refused unless left out.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lookahead_prune as lp
from lookahead_prune.graph import build_graph

transformers = pytest.importorskip("transformers")


def gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    cfg = transformers.BertConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=24,
        vocab_size=40, max_position_embeddings=16,
    )  # fmt: skip
    return transformers.BertModel(cfg)


def llama():
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, vocab_size=40, max_position_embeddings=16,
        tie_word_embeddings=False,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(cfg)


TOKENS = torch.arange(6).view(1, 6)


def _output(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = model(TOKENS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_gpt2_conv1d_layers_and_their_neighbours():
    torch.manual_seed(0)
    model = gpt2()
    graph = build_graph(model)
    assert graph.capture == "export"
    h0 = "transformer.h.0."
    assert lp.neighbour_names(graph, h0 + "attn.c_attn") == ([], [h0 + "attn.c_proj"])
    assert lp.neighbour_names(graph, h0 + "mlp.c_proj") == (
        [h0 + "mlp.c_fc"],
        ["transformer.h.1.attn.c_attn"],
    )
    # queries and keys end in the attention product (factor 1); values feed c_proj
    assert torch.equal(graph[h0 + "attn.c_attn"].out_open, torch.tensor([1.0] * 32 + [0.0] * 16))
    # Conv1D stores [in, out]: scores come back in that layout, the neighbours read it rightly
    s = lp.compute_scores(model, "lap")
    fc, proj = model.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].mlp.c_proj.weight
    assert s[h0 + "mlp.c_proj"].shape == proj.shape
    f_in = fc.detach().norm(dim=0)  # c_fc's row for each of its output units
    expected = proj.detach().abs() * f_in.view(-1, 1)
    ratio = s[h0 + "mlp.c_proj"] / expected  # the remaining factor depends on the output unit
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio))


def test_gpt2_tied_head_is_refused_then_left_dense_when_excluded():
    model = gpt2()
    with pytest.raises(ValueError, match="tied"):
        lp.prune(model, "lap", keep=0.3)
    report = lp.prune(model, "lap", keep=0.3, exclude=["lm_head"])
    dense = dict(report.dense)
    assert dense["lm_head.weight"].startswith("excluded, tied to")
    assert not hasattr(model.lm_head, "weight_mask")
    assert model.lm_head.weight is model.transformer.wte.weight


def test_a_pruned_hf_model_is_captured_again_and_pruned_further():
    model = gpt2()
    lp.prune(model, "lap", keep=0.5, exclude=["lm_head"])
    # new example inputs: a fresh capture that sees weight_orig * weight_mask
    graph = build_graph(model, example_inputs=(TOKENS,))
    assert not graph.unreached
    report = lp.prune(model, "lap", keep=0.25, exclude=["lm_head"], example_inputs=(TOKENS,))
    assert all(r.kept == round(0.25 * r.total) for r in report.layers if r.name != "lm_head")


def test_bert_query_key_value_are_parallel_not_chained():
    graph = build_graph(bert())
    a = "encoder.layer.0.attention."
    assert lp.neighbour_names(graph, a + "self.query") == ([], [])
    assert lp.neighbour_names(graph, a + "self.value") == ([], [a + "output.dense"])
    assert lp.neighbour_names(graph, a + "output.dense") == (
        [a + "self.value"],
        ["encoder.layer.0.intermediate.dense"],
    )
    assert lp.neighbour_names(graph, "encoder.layer.0.output.dense")[1] == [
        "encoder.layer.1.attention.self.query",
        "encoder.layer.1.attention.self.key",
        "encoder.layer.1.attention.self.value",
    ]


def test_llama_gated_mlp_rmsnorm_and_grouped_query_attention():
    torch.manual_seed(0)
    model = llama()
    graph = build_graph(model)
    p = "model.layers.0."
    assert lp.neighbour_names(graph, p + "mlp.down_proj")[0] == [
        p + "mlp.gate_proj",
        p + "mlp.up_proj",
    ]
    o_link = graph[p + "self_attn.o_proj"].producers[0]
    # 4 query heads of 4 dims read 2 key/value heads: head h reads value head h // 2
    expected = [(u // 4) // 2 * 4 + u % 4 for u in range(16)]
    assert o_link.producer == p + "self_attn.v_proj" and o_link.index.tolist() == expected
    # the post-attention RMSNorm's weight scales o_proj -> gate_proj like batch norm (Eq. 9)
    link = graph[p + "mlp.gate_proj"].producers[0]
    assert link.producer == p + "self_attn.o_proj" and len(link.bns) == 1


@pytest.mark.parametrize("make", [gpt2, bert, llama], ids=["gpt2", "bert", "llama"])
@pytest.mark.parametrize(
    ("method", "scope"), [("lap", "layer"), ("lap-forward-seq", "layer"), ("lap", "global")]
)
def test_lap_variants_prune_hf_models_exactly(make, method, scope):
    torch.manual_seed(0)
    model = make()
    exclude = ["lm_head"] if make is gpt2 else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = lp.prune(model, method, keep=0.3, scope=scope, exclude=exclude)
    pruned = [r for r in report.layers if r.name not in exclude]
    if scope == "layer":
        assert all(r.kept == round(0.3 * r.total) for r in pruned)
    else:
        assert sum(r.kept for r in pruned) == round(0.3 * sum(r.total for r in pruned))
    assert torch.isfinite(_output(model)).all()


def test_multi_query_attention_every_head_reads_the_one_value_head():
    cfg = transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=24, vocab_size=40, max_position_embeddings=16,
    )  # fmt: skip
    graph = build_graph(transformers.LlamaForCausalLM(cfg))
    link = graph["model.layers.0.self_attn.o_proj"].producers[0]
    assert link.producer == "model.layers.0.self_attn.v_proj"
    assert link.index.tolist() == [u % 4 for u in range(16)]


def _zoo():
    small = dict(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        vocab_size=40, max_position_embeddings=16,
    )  # fmt: skip
    t = transformers
    image = (torch.zeros(1, 3, 32, 32),)
    return {
        "distilbert": (t.DistilBertModel, t.DistilBertConfig(
            dim=16, n_layers=1, n_heads=2, hidden_dim=24, vocab_size=40,
            max_position_embeddings=16), None),
        "mistral": (t.MistralForCausalLM, t.MistralConfig(**small, num_key_value_heads=1), None),
        "t5": (t.T5Model, t.T5Config(d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
            vocab_size=40), {"input_ids": TOKENS, "decoder_input_ids": TOKENS[:, :4]}),
        "vit": (t.ViTModel, t.ViTConfig(hidden_size=16, num_hidden_layers=1,
            num_attention_heads=2, intermediate_size=24, image_size=32, patch_size=16), image),
        "convnext": (t.ConvNextModel, t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1],
            num_stages=2, image_size=32), image),
        "resnet": (t.ResNetModel, t.ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1],
            embedding_size=8), image),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(_zoo()))
def test_more_hf_architectures_are_followed_without_approximation(name):
    cls, cfg, example = _zoo()[name]
    torch.manual_seed(0)
    model = cls(cfg)
    exclude = ["lm_head"] if hasattr(model, "lm_head") else []
    report = lp.prune(model, "lap", keep=0.3, example_inputs=example, exclude=exclude)
    assert not report.approximated
    assert all(r.kept == round(0.3 * r.total) for r in report.layers if r.name not in exclude)
