"""prune(): exact counts, ties, cumulative masks, orders, -seq, global scope, bad input."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import lookahead_prune as lp
from lookahead_prune.masks import kth_smallest, top_k_mask
from lookahead_prune.prune import MethodSpec, parse_method

from .test_graph import Untraceable


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(12, 10),
        nn.ReLU(),
        nn.Linear(10, 8),
        nn.ReLU(),
        nn.Linear(8, 6),
        nn.ReLU(),
        nn.Linear(6, 3),
    )


LAYERS = ["1", "3", "5", "7"]


def _kept(model: nn.Module) -> dict[str, int]:
    return {n: int(model.get_submodule(n).weight_mask.sum()) for n in LAYERS}


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.5, 0.77, 1.0])
def test_exact_survivor_counts_and_torch_convention(keep):
    model = _mlp()
    report = lp.prune(model, "lap", keep)
    for n in LAYERS:
        m = model.get_submodule(n)
        assert torch_prune.is_pruned(m)
        assert int(m.weight_mask.sum()) == round(keep * m.weight_mask.numel())
        assert torch.equal(m.weight, m.weight_orig * m.weight_mask)
    assert report.kept == sum(_kept(model).values())
    assert "total" in report.table()
    for n in LAYERS:
        torch_prune.remove(model.get_submodule(n), "weight")
    assert not any(torch_prune.is_pruned(m) for m in model.modules())


def test_pruned_model_keeps_highest_scores():
    model = _mlp()
    scores = lp.compute_scores(model, "lap")
    lp.prune(model, "lap", 0.25)
    for n in LAYERS:
        mask = model.get_submodule(n).weight_mask.bool()
        assert scores[n][mask].min() >= scores[n][~mask].max()


def test_ties_are_broken_deterministically_by_index():
    scores = torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5, 2.0])
    mask = top_k_mask(scores, 3)
    assert mask.tolist() == [False, True, True, True, False, False]
    assert torch.equal(top_k_mask(scores, 3), mask)
    alive = torch.tensor([True, False, True, True, True, True])
    assert top_k_mask(scores, 3, alive).tolist() == [False, False, True, True, False, True]


@pytest.mark.parametrize("kind", ["random", "ties", "sorted"])
def test_fast_selection_equals_kthvalue(kind):
    g = torch.Generator().manual_seed(0)
    n = 16 * 65536 + 123
    flat = {
        "random": torch.randn(n, generator=g),
        "ties": torch.randint(0, 50, (n,), generator=g).float(),
        "sorted": torch.arange(n).float(),
    }[kind]
    for j in (1, 7, n // 100, n // 2, n - n // 20, n - 3, n):
        assert kth_smallest(flat, j) == torch.kthvalue(flat, j).values, j


def test_magnitude_methods_need_no_trace():
    model = Untraceable()
    lp.prune(model, "mp", 0.5)  # MP never reads neighbours, so fx need not follow forward()
    assert int(model.fc.weight_mask.sum()) == 3


def test_pruning_is_cumulative_and_never_revives():
    model = _mlp()
    lp.prune(model, "mp", 0.5)
    first = {n: model.get_submodule(n).weight_mask.clone() for n in LAYERS}
    lp.prune(model, "lap", 0.2)
    for n in LAYERS:
        mask = model.get_submodule(n).weight_mask
        assert int(mask.sum()) == round(0.2 * mask.numel())
        assert not bool((mask.bool() & ~first[n].bool()).any())  # subset of the earlier mask
    with pytest.warns(UserWarning, match="never revived"):
        lp.prune(model, "lap", 0.5)
    assert _kept(model)["3"] == round(0.2 * 80)


def test_keep_dict_prunes_only_named_layers():
    model = _mlp()
    lp.prune(model, "lap", {"3": 0.25, "7": 0.5})
    assert not hasattr(model.get_submodule("1"), "weight_mask")
    assert _kept_named(model, "3") == 20 and _kept_named(model, "7") == 9


def _kept_named(model: nn.Module, name: str) -> int:
    return int(model.get_submodule(name).weight_mask.sum())


def _manual_ordered(model: nn.Module, keep: float, names: list[str]) -> dict[str, torch.Tensor]:
    """LAP-forward/backward by hand: each layer scored with its neighbours already pruned."""
    work = copy.deepcopy(model)
    masks = {}
    for n in names:
        score = lp.compute_scores(work, "lap")[n]
        k = round(keep * score.numel())
        masks[n] = top_k_mask(score, k)
        torch_prune.custom_from_mask(work.get_submodule(n), "weight", masks[n].float())
    return masks


@pytest.mark.parametrize("order", ["forward", "backward"])
def test_ordered_lap_uses_already_pruned_neighbours(order):
    model = _mlp(3)
    names = LAYERS if order == "forward" else LAYERS[::-1]
    expected = _manual_ordered(model, 0.2, names)
    masks, spec = lp.compute_masks(model, f"lap-{order}", 0.2)
    assert spec.order == order and spec.steps == 1
    for n in LAYERS:
        assert torch.equal(masks[n], expected[n]), n
    base, _ = lp.compute_masks(model, "lap", 0.2)
    assert any(not torch.equal(base[n], masks[n]) for n in LAYERS)
    # forward: the first layer sees dense neighbours, as in base LAP
    if order == "forward":
        assert torch.equal(base["1"], masks["1"])
    else:
        assert torch.equal(base["7"], masks["7"])


def test_seq_splits_the_budget_into_five_rounds(monkeypatch):
    model = _mlp(1)
    counts = []
    prune_module = importlib.import_module("lookahead_prune.prune")

    def spy(scores, k, alive=None):
        counts.append(k)
        return top_k_mask(scores, k, alive)

    monkeypatch.setattr(prune_module, "top_k_mask", spy)
    lp.prune(model, "lap-forward-seq", 0.1)
    n = 12 * 10  # layer "1"
    first_layer = counts[0::4]
    assert first_layer == [round(n - (n - 12) * s / 5) for s in range(1, 6)]
    assert _kept(model) == {"1": 12, "3": 8, "5": 5, "7": 2}


def test_method_shorthands():
    assert parse_method("lap-backward-seq") == MethodSpec("lap", "backward", 5)
    assert parse_method("mp").order == "base"
    with pytest.raises(ValueError, match="implies order"):
        parse_method("lap-forward", order="backward")
    with pytest.raises(ValueError, match="known methods"):
        parse_method("lap-sideways")


def test_global_scope_uses_one_threshold_on_normalised_scores():
    model = _mlp(2)
    scores = lp.compute_scores(model, "lap")
    report = lp.prune(model, "lap", 0.3, scope="global")
    assert report.kept == round(0.3 * report.total)
    norm = {n: s.square() / s.square().norm() for n, s in scores.items()}
    kept = torch.cat([norm[n][model.get_submodule(n).weight_mask.bool()] for n in LAYERS])
    gone = torch.cat([norm[n][~model.get_submodule(n).weight_mask.bool()] for n in LAYERS])
    assert kept.min() >= gone.max()
    per_layer = {r.name: r.keep for r in report.layers}
    assert len(set(per_layer.values())) > 1  # budgets differ across layers


def _hand_global_masks(scores: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """The official code's global pruning, literally: score / ||score|| per layer, one sort."""
    flat = torch.cat([(s / s.norm()).flatten() for s in scores.values()]).double()
    order = sorted(range(len(flat)), key=lambda i: (-float(flat[i]), i))
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for n, s in scores.items():
        out[n] = keep[start : start + s.numel()].view_as(s)
        start += s.numel()
    return out


@pytest.mark.parametrize("method", ["mp", "lap"])
def test_global_normalised_ranks_as_the_official_code(method):
    """Official MP: |W| / ||W||; official LAP: w²·prev·next (our score squared) / its norm."""
    model = _mlp(3).double()
    with torch.no_grad():
        model[7].weight.mul_(30.0)  # unequal layer norms make the normalisation matter
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in LAYERS}
    if method == "mp":
        official = {n: w.abs() for n, w in weights.items()}
    else:
        official = {n: s.square() for n, s in lp.compute_scores(model, "lap").items()}
    total = sum(w.numel() for w in weights.values())
    report = lp.prune(model, method, 0.3, scope="global")
    expected = _hand_global_masks(official, round(0.3 * total))
    for n in LAYERS:
        assert torch.equal(model.get_submodule(n).weight_mask.bool(), expected[n]), n
    assert report.kept == round(0.3 * total)


def test_global_lamp_keeps_every_layer_alive():
    model = _mlp(4)
    with torch.no_grad():
        model[7].weight.mul_(100.0)  # a layer of huge weights would take all of global MP
    report = lp.prune(model, "lamp", 0.05, scope="global", normalize=False)
    assert report.kept == round(0.05 * report.total)
    assert all(r.kept > 0 for r in report.layers)
    mp_model = _mlp(4)
    with torch.no_grad():
        mp_model[7].weight.mul_(100.0)
    mp = lp.prune(mp_model, "mp", 0.05, scope="global", normalize=False)
    assert {r.name: r.kept for r in mp.layers}["1"] == 0


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"keep": 0.0}, ValueError, r"\(0, 1\]"),
        ({"keep": 1.5}, ValueError, r"\(0, 1\]"),
        ({"keep": float("nan")}, ValueError, r"\(0, 1\]"),
        ({"keep": "half"}, TypeError, "number"),
        ({"keep": {"3": 0.5, "nope": 0.5}}, ValueError, "nope"),
        ({"keep": {"3": -0.1}}, ValueError, r"keep\['3'\]"),
        (
            {"method": "obd2"},
            ValueError,
            "known methods: lamp, lap, lap-act, lbp, lfp, mp, obd, rp",
        ),
        ({"scope": "model"}, ValueError, "scope"),
        ({"keep": {"3": 0.5}, "scope": "global"}, ValueError, "one overall"),
        ({"order": "sideways"}, ValueError, "order"),
        ({"steps": 0}, ValueError, "steps"),
        ({"graph": "magic"}, ValueError, "sequential"),
    ],
)
def test_bad_input_is_rejected_and_model_untouched(kwargs, error, match):
    model = _mlp()
    before = _state(model)
    args = {"method": "lap", "keep": 0.5} | kwargs
    with pytest.raises(error, match=match):
        lp.prune(model, **args)
    assert _state(model).keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_keep_takes_any_real_scalar_but_not_bools_nan_or_out_of_range():
    import numpy as np

    expected = lp.prune(_mlp(), "lap", 0.25).kept
    for keep in (np.float32(0.25), np.float64(0.25), np.float16(0.25), torch.tensor(0.25),
                 torch.tensor(0.25, dtype=torch.float64), np.array(0.25)):  # fmt: skip
        assert lp.prune(_mlp(), "lap", keep).kept == expected, type(keep)
        assert lp.prune(_mlp(), "lap", {"3": keep}).layers  # dict values too
    assert lp.prune(_mlp(), "mp", torch.tensor(1)).kept == lp.prune(_mlp(), "mp", 1.0).kept
    bad = [np.bool_(True), torch.tensor(True), True, np.float32("nan"), torch.tensor(1.5),
           torch.tensor([0.5]), np.array([0.5]), torch.tensor(0.5j), "0.5"]  # fmt: skip
    for keep in bad:
        with pytest.raises((TypeError, ValueError), match=r"keep must be"):
            lp.prune(_mlp(), "lap", keep)


def test_nan_weights_name_the_layer_and_leave_model_untouched():
    model = _mlp()
    with torch.no_grad():
        model[5].weight[0, 0] = float("nan")
    before = _state(model)
    with pytest.raises(ValueError, match=r"layer '5'.*NaN"):
        lp.prune(model, "mp", 0.5)
    assert set(model.state_dict()) == set(before)


def test_rp_is_seeded():
    a, b = _mlp(), _mlp()
    lp.prune(a, "rp", 0.3, seed=5)
    lp.prune(b, "rp", 0.3, seed=5)
    assert all(
        torch.equal(a.get_submodule(n).weight_mask, b.get_submodule(n).weight_mask) for n in LAYERS
    )


def test_hook_based_weight_norm_is_refused_before_anything_is_pruned():
    with pytest.warns(FutureWarning):
        model = nn.Sequential(
            nn.Linear(4, 4), nn.ReLU(), torch.nn.utils.weight_norm(nn.Linear(4, 2))
        )
    with pytest.raises(ValueError, match=r"parametrizations\.weight_norm"):
        lp.prune(model, "mp", 0.5)
    assert not hasattr(model[0], "weight_mask")


def test_tie_filling_never_revives_a_pruned_weight():
    scores = torch.tensor([float("-inf"), float("-inf"), 1.0])
    alive = torch.tensor([False, True, True])
    assert top_k_mask(scores, 2, alive).tolist() == [False, True, True]
    exact = torch.tensor([1.0, 1.0 + 1e-12], dtype=torch.float64)
    assert top_k_mask(exact, 1).tolist() == [False, True]  # float64 scores are not rounded


class TiedHead(nn.Module):
    """A language-model-like net whose head shares the token embedding (GPT-2's lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 16)
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


def test_report_counts_pruned_layers_and_keeps_excluded_ones_apart():
    model = TiedHead()
    report = lp.prune(model, "lap", 0.2, exclude=["head"])
    assert [r.name for r in report.layers] == ["fc"]
    assert report.keep == round(0.2 * 256) / 256  # not (51 + 640) / 896, the head at 100%
    assert [(r.name, r.kept, r.total) for r in report.excluded] == [("head", 640, 640)]
    assert report.keep_overall == (51 + 640) / (256 + 640)  # what results databases store
    assert "left dense: 1 prunable layers, 640 weights" in report.table()
    assert dict(report.dense)["head.weight"].startswith("excluded, tied to")
    # a keep dict: layers left out are apart too; a layer pruned before still counts
    model = _mlp()
    lp.prune(model, "mp", {"1": 0.5})
    report = lp.prune(model, "mp", {"3": 0.25})
    assert [r.name for r in report.layers] == ["1", "3"]
    assert [r.name for r in report.excluded] == ["5", "7"]
    assert report.kept == 60 + 20 and report.total == 120 + 80
