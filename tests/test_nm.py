"""N:M masks (``keep="2:4"``): in every group of M consecutive weights along the input axis
(input channels innermost for convolutions) the N best by the method's score survive."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.masks import nm_mask, parse_nm
from tests.any_models import SmallCNN


def _groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    """Survivors per group of ``m`` along dim 1, channels innermost."""
    return mask.movedim(1, -1).reshape(-1, m).sum(1)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                         nn.Linear(8, 3))  # fmt: skip


def test_mp_2_4_is_the_top_two_magnitudes_of_every_four():
    model = _mlp()
    w = model[0].weight.detach().clone()
    lp.prune(model, "mp", "2:4")
    g = w.abs().view(12, 2, 4)
    want = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.topk(2, dim=2).indices, True)
    assert torch.equal(model[0].weight_mask.bool(), want.view(12, 8))


@pytest.mark.parametrize("method", ["mp", "lap", "lap-forward-seq", "lamp"])
@pytest.mark.parametrize("nm", ["2:4", "1:4", "3:8"])
def test_exact_n_m_on_linear_and_conv_layers(method, nm):
    n, m = parse_nm(nm)
    torch.manual_seed(0)
    model = SmallCNN()  # c1 has 3 inputs (left dense), c2 4 channels x 3x3, fc 96 inputs
    report = lp.prune(model, method, nm)
    for name in ("c2", "fc") if m == 4 else ("fc",):
        groups = _groups(getattr(model, name).weight_mask, m)
        assert bool((groups == n).all()), (name, groups)
    dense = dict(report.dense)
    assert "not a multiple" in dense["c1.weight"] and not hasattr(model.c1, "weight_mask")


def test_conv_groups_run_along_input_channels_innermost():
    scores = torch.arange(2 * 8 * 3 * 3, dtype=torch.float32).view(2, 8, 3, 3)
    mask = nm_mask(scores, 2, 4)
    # at each (out, kh, kw) the two highest of channels 0-3 and of 4-7: channels 2, 3, 6, 7
    assert torch.equal(mask.any(dim=(0, 2, 3)), torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]).bool())
    assert bool((_groups(mask, 4) == 2).all())


def test_ties_go_to_the_lowest_index_and_pruned_weights_stay_pruned():
    mask = nm_mask(torch.ones(1, 4), 2, 4)
    assert mask.tolist() == [[True, True, False, False]]
    alive = torch.tensor([[False, True, True, True]])
    assert nm_mask(torch.ones(1, 4), 2, 4, alive).tolist() == [[False, True, True, False]]


def test_the_pruned_model_runs_sparse_with_equal_outputs():
    model = _mlp()
    lp.prune(model, "lap", "2:4")
    sparse = lp.to_sparse(model, max_density=0.5)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        assert torch.allclose(model(x), sparse(x), atol=1e-5)


@pytest.mark.parametrize(
    ("keep", "message"),
    [("4:4", "0 < N < M"), ("5:4", "0 < N < M"), ("0:4", "0 < N < M"), ("2-4", "such as '2:4'"),
     ("2:x", "look like"), ("2:4:8", "look like")],
)  # fmt: skip
def test_bad_n_m_specs_get_one_line(keep, message):
    with pytest.raises((ValueError, TypeError), match=message) as err:
        lp.prune(_mlp(), "mp", keep)
    assert "\n" not in str(err.value)


def test_n_m_is_per_layer_only():
    with pytest.raises(ValueError, match="scope='layer'"):
        lp.prune(_mlp(), "mp", "2:4", scope="global")


def test_lap_prune_keep_2_4(tmp_path, capsys):
    from lookahead_prune.cli import main

    dense = tmp_path / "dense.pt"
    assert main(["train", "--out", str(dense), "--quiet", "--train-steps", "5",
                 "--subset", "120"]) == 0  # fmt: skip
    assert main(["prune", str(dense), "--method", "lap", "--keep", "2:4"]) == 0
    out = capsys.readouterr().out
    assert "50.00%" in out and "fc5" in out
    with pytest.raises(SystemExit):
        main(["prune", str(dense), "--keep", "4:4"])
    assert "0 < N < M" in capsys.readouterr().err


def test_a_sweep_with_nm_stores_n_m_runs_under_their_own_key(tmp_path):
    from lookahead_prune.cli import main
    from lookahead_prune.pipeline import Protocol
    from lookahead_prune.store import RunStore

    db = tmp_path / "nm.sqlite"
    args = ["sweep", "--model", "fcn", "--methods", "mp,lap-forward-seq", "--levels", "1",
            "--seeds", "0", "--train-steps", "20", "--retrain-steps", "5", "--subset", "600",
            "--db", str(db), "--quiet", "--nm", "2:4"]  # fmt: skip
    assert main(args) == 0
    with RunStore(db) as store:
        rows = store.runs()
    assert len(rows) == 2 and all(r["nm"] == "2:4" and r["keep"] == 0.5 for r in rows)
    plain = Protocol(model="fcn", dataset="mnist").run_config("mp", 1)
    assert "nm" not in plain  # runs stored before the field existed keep their keys
    with pytest.raises(ValueError, match="0 < N < M"):
        Protocol(model="fcn", dataset="mnist", nm="4:4")
    with pytest.raises(ValueError, match="scope 'layer'"):
        Protocol(model="fcn", dataset="mnist", nm="2:4", scope="global")
