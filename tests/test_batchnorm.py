"""Batch-norm recalibration after pruning: statistics by hand, masks intact, state restored."""

from __future__ import annotations

import csv
import dataclasses
import io

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.cli import main
from lookahead_prune.data import BatchStream
from lookahead_prune.pipeline import Protocol
from lookahead_prune.store import RunStore, config_hash

BATCHES, BATCH_SIZE, SEED = 3, 5, 7


def tiny_bn_net() -> nn.Sequential:
    """conv-BN-ReLU-dropout-conv-BN-ReLU-linear in float64, with non-trivial BN parameters."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),  # must be off while statistics are gathered
        nn.Conv2d(4, 3, 3, padding=1),
        nn.BatchNorm2d(3, momentum=0.3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 6, 5),
    ).double()
    with torch.no_grad():
        for bn in (net[1], net[5]):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
            bn.running_mean.fill_(9.0)  # stale "dense" statistics
            bn.running_var.fill_(9.0)
    return net


def images(n: int = 20) -> torch.Tensor:
    return torch.randn(n, 2, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def by_hand(net: nn.Sequential, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per batch norm: mean over the same batches of each batch's mean and unbiased variance."""
    stream = BatchStream(x, torch.zeros(len(x), dtype=torch.long), BATCH_SIZE, seed=SEED)
    sums = [[0.0, 0.0], [0.0, 0.0]]
    with torch.no_grad():
        for _ in range(BATCHES):
            h = net[0](next(stream)[0])  # the pruned conv (its mask hook applies)
            for i, (bn, rest) in enumerate(((net[1], net[2:5]), (net[5], None))):
                mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
                sums[i][0] += mean / BATCHES
                sums[i][1] += var / BATCHES
                if rest is not None:  # normalise with the batch's own statistics, as train mode
                    biased = h.var((0, 2, 3), unbiased=False)
                    z = (h - mean[:, None, None]) / (biased[:, None, None] + bn.eps).sqrt()
                    z = z * bn.weight[:, None, None] + bn.bias[:, None, None]
                    h = rest[2](rest[0](z))  # ReLU, (dropout off), conv
    return [(m, v) for m, v in sums]


def test_recalibration_matches_batch_statistics_by_hand_and_keeps_masks():
    net = tiny_bn_net()
    lp.prune(net, "lap", keep=0.5, example_inputs=(images(1),))
    masks = {i: net[i].weight_mask.clone() for i in (0, 4, 8)}
    weights = {i: net[i].weight_orig.clone() for i in (0, 4, 8)}
    net.train()
    net[3].eval()  # modes differ across modules: each must come back as it was
    before = [m.training for m in net.modules()]
    x = images()
    expected = by_hand(net, x)
    assert lp.recalibrate_batchnorm(net, x, batches=BATCHES, batch_size=BATCH_SIZE, seed=SEED) == 2
    for bn, (mean, var) in zip((net[1], net[5]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=1e-10)
        torch.testing.assert_close(bn.running_var, var, rtol=0, atol=1e-10)
        assert int(bn.num_batches_tracked) == BATCHES
    assert [m.training for m in net.modules()] == before
    assert (net[1].momentum, net[5].momentum) == (0.1, 0.3)
    for i in (0, 4, 8):
        assert torch.equal(net[i].weight_mask, masks[i])
        assert torch.equal(net[i].weight_orig, weights[i])
        assert bool((net[i].weight[masks[i] == 0] == 0).all())


def test_recalibration_improves_a_pruned_model_whose_statistics_are_stale():
    net = tiny_bn_net()
    lp.prune(net, "mp", keep=0.3, example_inputs=(images(1),))
    x = images(60)
    net.eval()
    stale = net(x)
    lp.recalibrate_batchnorm(net, x, batches=12, batch_size=BATCH_SIZE)
    fresh = net(x)
    assert not net.training and not torch.equal(stale, fresh)


def test_a_model_without_batch_norm_is_left_alone():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert lp.recalibrate_batchnorm(net, torch.randn(10, 4), batches=2, batch_size=5) == 0
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_bad_input_fails_in_one_line():
    net = tiny_bn_net()
    with pytest.raises(ValueError, match="batches must be an integer >= 1"):
        lp.recalibrate_batchnorm(net, images(), batches=0)
    with pytest.raises(ValueError, match="batch_size"):
        lp.recalibrate_batchnorm(net, images(), batches=1, batch_size=100)


def test_the_run_key_holds_bn_recalibrate_only_when_it_is_asked_for():
    base = Protocol(model="vgg11", dataset="mnist")
    assert config_hash(Protocol(model="fcn", dataset="mnist").run_config("lap", 4)) == (
        "5d04fff4ff7371ff"  # the golden key of test_pipeline, from before the field existed
    )
    assert "bn_recalibrate" not in base.run_config("lap", 4)
    recal = Protocol(model="vgg11", dataset="mnist", bn_recalibrate=50)
    assert recal.run_config("lap", 4)["bn_recalibrate"] == 50
    assert recal.dense_config() == base.dense_config()  # the dense model is shared
    with pytest.raises(ValueError, match="bn_recalibrate must be >= 0"):
        Protocol(model="vgg11", dataset="mnist", bn_recalibrate=-1)
    with pytest.raises(ValueError, match="bn_recalibrate must be an integer"):
        Protocol(model="vgg11", dataset="mnist", bn_recalibrate=2.5)


SWEEP = ["sweep", "--dataset", "mnist", "--methods", "mp,lap", "--levels", "2", "--train-steps",
         "3", "--retrain-steps", "1", "--subset", "120", "--eval-examples", "40",
         "--batch-size", "20", "--quiet"]  # fmt: skip


def test_a_sweep_records_accuracy_before_retraining_with_and_without_recalibration(
    tmp_path, capsys
):
    db = str(tmp_path / "r.sqlite")
    args = [*SWEEP, "--model", "vgg11", "--db", db, "--bn-recalibrate", "2"]
    assert main(args) == 0
    with RunStore(db) as store:
        rows = store.runs()
    assert len(rows) == 2
    for row in rows:
        assert row["bn_recalibrate"] == 2
        assert 0 <= row["test_acc_recalibrated"] <= 1 and 0 <= row["train_acc_recalibrated"] <= 1
    assert main([*SWEEP, "--model", "vgg11", "--db", db]) == 0  # same dense model, no recal
    with RunStore(db) as store:
        plain = {r["method"]: r for r in store.runs() if "bn_recalibrate" not in r}
    assert len(plain) == 2 and "0 dense models trained" in capsys.readouterr().out
    for row in rows:  # "without recalibration" is the number a plain sweep measures
        assert row["test_acc_pruned"] == plain[row["method"]]["test_acc_pruned"]
    assert main(["report", "--db", db, "--format", "csv"]) == 0
    csv_rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert sorted((r["bn_recalibrate"], bool(r["test_acc_recalibrated"])) for r in csv_rows) == [
        ("", False), ("", False), ("2", True), ("2", True)
    ]  # fmt: skip
    assert main(["report", "--db", db, "--metric", "test_acc_recalibrated"]) == 0
    assert "batch norm recalibrated" in capsys.readouterr().out


def test_old_rows_without_recalibration_stay_reportable(tmp_path, capsys):
    db = tmp_path / "old.sqlite"
    config = Protocol(model="vgg11", dataset="mnist").run_config("mp", 2)
    with RunStore(db) as store:  # a row as stored before the recalibration columns existed
        store.put(config, {"keep": 0.5, "test_acc_pruned": 0.1, "test_acc_retrained": 0.8},
                  wall_time=1.0, code_version="old")  # fmt: skip
    assert main(["report", "--db", str(db), "--format", "csv"]) == 0
    (row,) = csv.DictReader(io.StringIO(capsys.readouterr().out))
    assert row["test_acc_recalibrated"] == "" and row["test_acc_pruned"] == "0.1"
    assert main(["report", "--db", str(db), "--metric", "test_acc_recalibrated"]) == 0
    assert "no run has test_acc_recalibrated" in capsys.readouterr().err


def test_recalibrating_a_model_without_batch_norm_is_refused_before_training(tmp_path, capsys):
    db = tmp_path / "fcn.sqlite"
    assert main([*SWEEP, "--model", "fcn", "--db", str(db), "--bn-recalibrate", "2"]) == 2
    assert "fcn has no batch norm to recalibrate" in capsys.readouterr().err
    assert not (tmp_path / "fcn-checkpoints").exists()


def test_lap_prune_reports_accuracy_with_and_without_recalibration(tmp_path, capsys, monkeypatch):
    import lookahead_prune.cli as cli

    real = cli.load_dataset

    def small(*args, **kwargs):  # 200 test images: the command, not VGG's speed, is under test
        data = real(*args, **kwargs)
        return dataclasses.replace(data, test_x=data.test_x[:200], test_y=data.test_y[:200])

    monkeypatch.setattr(cli, "load_dataset", small)
    dense = tmp_path / "vgg.pt"
    tiny = ["--train-steps", "2", "--subset", "120", "--batch-size", "20", "--quiet"]
    assert main(["train", "--model", "vgg11", "--out", str(dense), *tiny]) == 0
    assert main(["prune", str(dense), "--keep", "0.2", "--bn-recalibrate", "2"]) == 0
    out = capsys.readouterr().out
    assert "after pruning (no retraining)" in out
    assert "after recalibrating batch norm on 2 batches" in out
