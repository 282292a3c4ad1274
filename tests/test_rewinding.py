"""Renda et al.'s retraining modes exactly: lengths, rates, start weights, keys, engines."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

import lookahead_prune as lp
from lookahead_prune.cli import main
from lookahead_prune.data import load_dataset
from lookahead_prune.engines import train_many
from lookahead_prune.models.mlp import FCN
from lookahead_prune.pipeline import (
    Protocol,
    dense_model,
    for_retrain,
    prune_and_retrain,
    retrain_config,
    train_dense,
)
from lookahead_prune.store import RunStore, config_hash
from lookahead_prune.train import TrainConfig, lr_at, train

ROOT = Path(__file__).resolve().parents[1]
T, K = 40, 10


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("mnist", subset=600)


def _protocol(**kw) -> Protocol:
    base = {"model": "fcn", "dataset": "mnist", "train_steps": T, "retrain_steps": 12,
            "subset": 600, "rewind_step": K, "schedule": "step"}  # fmt: skip
    return Protocol(**(base | kw))


@pytest.fixture(scope="module")
def dense_step(tiny_data):
    return train_dense(_protocol(), tiny_data, snapshot_steps=(K,))


@pytest.fixture
def lrs(monkeypatch):
    """The learning rate of every optimiser group at each step any Adam takes."""
    seen: list[list[float]] = []
    real = torch.optim.Adam.step

    def step(self, *args, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return seen


def _retrain(protocol, dense, data, method="mp", level=3, engine="sequential"):
    protocol = replace(protocol, engine=engine)
    model = dense_model(protocol, dense, data)
    result = prune_and_retrain(protocol, model, dense, data, method, level)
    return model, result


def test_the_step_schedule_divides_by_ten_at_half_and_three_quarters():
    config = TrainConfig(steps=50_000, lr=1.0, schedule="step")
    assert lr_at(config, 24_999) == 1.0 and lr_at(config, 25_000) == pytest.approx(0.1)
    assert lr_at(config, 37_499) == pytest.approx(0.1)
    assert lr_at(config, 37_500) == lr_at(config, 49_999) == pytest.approx(0.01)
    entered = replace(config, steps=100, schedule_start=24_950, schedule_steps=50_000)
    assert lr_at(entered, 24_950 + 60) == pytest.approx(0.1)


def test_the_configurations_of_the_four_modes():
    full = _protocol().train_config(T)
    fine = retrain_config(_protocol(retrain="finetune"))
    assert (fine.steps, fine.schedule, fine.lr) == (12, "constant", lr_at(full, T - 1))
    lr = retrain_config(_protocol(retrain="rewind-lr"))
    assert [lr_at(lr, lr.schedule_start + i) for i in range(12)] == [
        lr_at(full, T - 12 + i) for i in range(12)
    ]
    weights = retrain_config(for_retrain(_protocol(), "rewind-weights"))
    assert weights.steps == T - K
    assert [lr_at(weights, weights.schedule_start + i) for i in range(T - K)] == [
        lr_at(full, K + i) for i in range(T - K)
    ]
    lottery = retrain_config(for_retrain(_protocol(), "lottery"))
    assert lottery.steps == T and lottery.schedule_start == 0 and lottery.horizon == T


def test_rewinding_lengths_are_checked_and_derived_in_one_line():
    with pytest.raises(ValueError, match=r"train_steps - rewind_step = 30 steps"):
        _protocol(retrain="rewind-weights", retrain_steps=12)
    with pytest.raises(ValueError, match=r"= 40 steps .*not retrain_steps = 12"):
        _protocol(retrain="lottery")
    with pytest.raises(ValueError, match="must be <= train_steps"):
        _protocol(retrain="rewind-lr", retrain_steps=T + 1)
    assert _protocol(retrain="rewind-lr", retrain_steps=T + 1, schedule="constant")
    assert for_retrain(_protocol(), "rewind-weights").retrain_steps == T - K
    assert for_retrain(_protocol(), "lottery").retrain_steps == T
    assert for_retrain(_protocol(), "rewind-lr").retrain_steps == 12


def test_under_a_constant_rate_lr_rewinding_is_fine_tuning(tiny_data):
    protocol = _protocol(schedule="constant")
    dense = train_dense(protocol, tiny_data)
    a, ra = _retrain(replace(protocol, retrain="finetune"), dense, tiny_data, "lap")
    b, rb = _retrain(replace(protocol, retrain="rewind-lr"), dense, tiny_data, "lap")
    assert ra == rb
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


@pytest.mark.parametrize("engine", ["sequential", "vmap", "sparse"])
def test_lr_rewinding_uses_the_last_t_rates_of_the_first_training(
    tiny_data, dense_step, lrs, engine
):
    protocol = _protocol(retrain="rewind-lr")
    _, result = _retrain(protocol, dense_step, tiny_data, engine=engine)
    assert result.engine == engine
    full = protocol.train_config(T)
    assert [g[0] for g in lrs] == [lr_at(full, T - 12 + i) for i in range(12)]
    assert [g[0] for g in lrs] == pytest.approx([1.2e-4] * 2 + [1.2e-5] * 10)  # 28, 29 | 30..39


@pytest.mark.parametrize("engine", ["sequential", "vmap", "sparse"])
def test_weight_rewinding_restarts_at_step_k_with_the_rates_from_k_on(
    tiny_data, dense_step, lrs, engine
):
    protocol = for_retrain(_protocol(), "rewind-weights")
    # the snapshot is the first training after exactly K updates
    again = dense_model(protocol, dense_step, tiny_data)
    again.load_state_dict(dense_step.init)
    train(again, tiny_data.train_x, tiny_data.train_y, protocol.train_config(K, schedule_steps=T))
    for key, value in again.state_dict().items():
        assert torch.equal(value.cpu(), dense_step.rewind_to(K)[key]), key
    lrs.clear()
    _retrain(protocol, dense_step, tiny_data, engine=engine)
    full = protocol.train_config(T)
    assert [g[0] for g in lrs] == [lr_at(full, K + i) for i in range(T - K)]


def test_fine_tuning_runs_at_the_final_rate(tiny_data, dense_step, lrs):
    _retrain(_protocol(retrain="finetune"), dense_step, tiny_data)
    assert [g[0] for g in lrs] == [pytest.approx(1.2e-5)] * 12


def test_lottery_is_weight_rewinding_to_step_zero(tiny_data, dense_step):
    lottery, r1 = _retrain(for_retrain(_protocol(), "lottery"), dense_step, tiny_data)
    rewound, r2 = _retrain(
        for_retrain(_protocol(rewind_step=0), "rewind-weights"), dense_step, tiny_data
    )
    assert r1 == r2
    for key, value in lottery.state_dict().items():
        assert torch.equal(value, rewound.state_dict()[key]), key


def _pruned(jobs) -> list[torch.nn.Module]:
    models = []
    for method, keep in jobs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = FCN(784, 10, hidden=(64, 32)).double()
        lp.prune(model, method, keep, seed=0)
        models.append(model)
    return models


def test_the_sparse_engine_mixes_modes_in_one_group_as_separate_runs_would():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 28, 28, generator=g, dtype=torch.float64)
    y = x.flatten(1)[:, :10].argmax(1)
    base = TrainConfig(steps=30, lr=1e-3, schedule="step", batch_size=20)
    configs = [
        replace(base, lr=1e-5, schedule="constant", steps=12),  # fine-tuning
        replace(base, steps=12, schedule_start=18, schedule_steps=30),  # LR rewinding
        replace(base, steps=20, schedule_start=10, schedule_steps=30),  # weight rewinding
        base,  # lottery
        replace(base, steps=12, schedule_start=18, schedule_steps=30),
    ]
    jobs = [("mp", 0.2), ("lap", 0.1), ("lap", 0.05), ("mp", 0.1), ("lap-forward", 0.03)]
    reference, grouped = _pruned(jobs), _pruned(jobs)
    expected = [train(m, x, y, c) for m, c in zip(reference, configs, strict=True)]
    results = train_many(grouped, x, y, configs, engine="sparse")
    assert [r.engine for r in results] == ["sparse"] * 5
    assert [r.steps for r in results] == [c.steps for c in configs]
    for ref, ours, want, got in zip(reference, grouped, expected, results, strict=True):
        for key, value in ref.state_dict().items():
            assert (value - ours.state_dict()[key]).abs().max().item() < 1e-9, key
        assert got.final_loss == pytest.approx(want.final_loss, abs=1e-6)
    # vmap and sequential take mixed configurations one configuration at a time
    for engine in ("vmap", "sequential"):
        again = _pruned(jobs)
        train_many(again, x, y, configs, engine=engine)
        for ref, ours in zip(reference, again, strict=True):
            for key, value in ref.state_dict().items():
                assert (value - ours.state_dict()[key]).abs().max().item() < 1e-6, key
    with pytest.raises(ValueError, match="differ in more than"):
        train_many(_pruned(jobs[:2]), x, y, [base, replace(base, batch_size=30)], "sparse")


def test_keys_of_finetune_and_constant_rate_runs_stay_the_stored_ones():
    db = ROOT / "results" / "mnist-full.sqlite"
    names = {f.name for f in fields(Protocol)}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        stored = [(k, json.loads(c)) for k, c in conn.execute("SELECT key, config FROM runs")]
    for key, config in stored[:50]:
        protocol = Protocol(**{k: v for k, v in config.items() if k in names})
        assert config_hash(protocol.run_config(config["method"], config["level"])) == key
    for schedule in ("constant", "step", "cosine"):
        assert "definitions" not in _protocol(retrain="finetune", schedule=schedule).run_config(
            "mp", 1
        )
    for mode in ("rewind-lr", "rewind-weights", "lottery"):
        constant = for_retrain(_protocol(schedule="constant"), mode).run_config("mp", 1)
        stepped = for_retrain(_protocol(), mode).run_config("mp", 1)
        assert "definitions" not in constant and stepped["definitions"] == "renda2020"


def test_one_sweep_runs_several_modes_from_one_dense_model_in_one_group(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    base = ["sweep", "--model", "fcn", "--methods", "mp,lap", "--levels", "4,6", "--quiet",
            "--train-steps", "40", "--retrain-steps", "12", "--subset", "600",
            "--schedule", "step", "--rewind-step", "10", "--eval-examples", "500"]  # fmt: skip
    mixed = [*base, "--retrain", "finetune,rewind-lr,lottery,rewind-weights", "--db", str(db)]
    assert main(mixed) == 0
    out = capsys.readouterr().out
    assert "retrain 12 (finetune), 12 (rewind-lr), 40 (lottery: T - k, not 12), 30 " in out
    assert "1 dense models trained" in out and "16 runs done" in out
    with RunStore(db) as store:
        rows = {(r["retrain"], r["method"], r["level"]): r for r in store.runs()}
    assert {r["engine"] for r in rows.values()} == {"sparse"}
    assert {r["wall_time"] for r in rows.values()}.__len__() == 1  # one group
    assert {(r["retrain"], r["retrain_steps"]) for r in rows.values()} == {
        ("finetune", 12), ("rewind-lr", 12), ("lottery", 40), ("rewind-weights", 30)
    }  # fmt: skip
    for mode in ("finetune", "rewind-weights"):  # each mode alone gives the same rows
        alone = tmp_path / f"{mode}.sqlite"
        assert main([*base, "--retrain", mode, "--db", str(alone)]) == 0
        with RunStore(alone) as store:
            for r in store.runs():
                twin = rows[(mode, r["method"], r["level"])]
                assert r["key"] == twin["key"]
                assert r["test_loss_retrained"] == pytest.approx(
                    twin["test_loss_retrained"], rel=1e-4
                )
    assert main([*base, "--retrain", "finetune,bogus", "--db", str(db)]) == 2
    assert "unknown retraining mode" in capsys.readouterr().err


def test_a_dense_checkpoint_gains_the_snapshots_a_later_sweep_needs(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    base = ["sweep", "--model", "fcn", "--methods", "mp", "--levels", "4", "--quiet",
            "--train-steps", "40", "--retrain-steps", "12", "--subset", "600",
            "--schedule", "step", "--db", str(db)]  # fmt: skip
    assert main([*base, "--retrain", "finetune"]) == 0
    assert main([*base, "--retrain", "finetune"]) == 0
    assert "0 dense models trained" in capsys.readouterr().out.splitlines()[-1]
    assert main([*base, "--retrain", "rewind-weights", "--rewind-step", "28"]) == 0
    out = capsys.readouterr().out
    assert "1 dense models trained" in out  # again, deterministic, with the step-28 snapshot
    (ckpt,) = (tmp_path / "r-checkpoints").glob("dense-*.pt")
    assert sorted(torch.load(ckpt, weights_only=True)["snapshots"]) == [0, 28]


def _store_runs(db: Path, protocols: list[Protocol], errors: dict[str, float]) -> None:
    """Synthetic rows: MP and LAP at one level per protocol, error from ``errors[retrain]``."""
    with RunStore(db) as store:
        for p in protocols:
            for method, extra in (("mp", 0.0), ("lap", -1.0)):
                for seed in (0, 1):
                    acc = 1 - (errors[p.retrain] + extra + seed * 0.1) / 100
                    store.put(replace(p, seed=seed).run_config(method, 6),
                              {"keep": 0.0163, "test_acc_pruned": 0.5, "test_acc_retrained": acc},
                              wall_time=1.0, code_version="test")  # fmt: skip


def test_report_compares_retraining_modes_and_its_csv_tells_runs_apart(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    base = _protocol(train_steps=400, retrain_steps=400, rewind_step=20)
    modes = [for_retrain(base, m) for m in ("rewind-lr", "finetune", "lottery", "rewind-weights")]
    _store_runs(db, modes, {"finetune": 10.0, "rewind-lr": 5.0, "lottery": 6.0,
                            "rewind-weights": 7.0})  # fmt: skip
    assert main(["report", "--db", str(db), "--by", "retrain"]) == 0
    out = capsys.readouterr().out
    assert out.count("by retraining mode") == 2  # one table per method
    mp = out[out.index("with MP") : out.index("with LAP")]
    rows = [line.split(" | ")[0].lstrip("| ") for line in mp.splitlines() if line[:2] == "| "][1:]
    assert rows == ["finetune, 400 steps (baseline)", "rewind-weights k=20, 380 steps",
                    "rewind-lr, 400 steps", "lottery, 400 steps"]  # fmt: skip
    assert "5.05±0.07 (-49.75%)" in mp  # rewind-lr against fine-tuning
    assert main(["report", "--db", str(db), "--by", "retrain", "--format", "summary-csv"]) == 0
    assert '"lap: rewind-lr, 400 steps",1.63,2,4.05' in capsys.readouterr().out
    # runs that differ only in activation, scope, batch-norm handling or graph: told apart
    other = tmp_path / "o.sqlite"
    variants = [base, replace(base, activation="tanh"), replace(base, scope="global"),
                replace(base, bn=False), replace(base, graph="sequential")]  # fmt: skip
    with RunStore(other) as store:
        for p in variants:
            store.put(p.run_config("mp", 6), {"keep": 0.0163, "test_acc_pruned": 0.5,
                      "test_acc_retrained": 0.9}, wall_time=1.0, code_version="test")  # fmt: skip
    assert main(["report", "--db", str(other), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split(",")
    for column in ("retrain", "rewind_step", "schedule", "activation", "scope", "bn", "graph"):
        assert column in header
    assert len(set(lines[1:])) == len(variants)
    picked = [header.index(c) for c in ("activation", "scope", "bn", "graph")]
    assert len({tuple(line.split(",")[i] for i in picked) for line in lines[1:]}) == 5


def test_build_rewinding_rebuilds_the_same_bytes_from_partial_data(tmp_path):
    db = tmp_path / "r.sqlite"
    base = _protocol(train_steps=400, retrain_steps=400, rewind_step=20)
    result = {"test_acc_pruned": 0.5, "dense_test_acc": 0.97, "device": "cpu", "engine": "sparse"}
    with RunStore(db) as store:
        for mode in ("finetune", "rewind-lr", "lottery", "rewind-weights"):
            p = for_retrain(base, mode)
            for method in ("mp", "lap", "lap-forward-seq"):
                for level, keep in ((4, 0.0636), (6, 0.0163), (9, 0.0023)):
                    for seed in (0, 1) if level != 9 else (0,):  # seed 1 still running
                        acc = 0.9 - 0.01 * level - 0.001 * seed
                        acc += 0.002 * (method == "lap" and seed == 1)  # beats MP once
                        store.put(replace(p, seed=seed).run_config(method, level),
                                  result | {"keep": keep, "test_acc_retrained": acc},
                                  wall_time=1.0, code_version="test")  # fmt: skip
        for t in (20, 80, 200):
            budget = replace(base, retrain_steps=t, rewind_step=400 - t)
            for mode in ("finetune", "rewind-lr", "rewind-weights"):
                for level, keep in ((6, 0.0163), (9, 0.0023)):
                    store.put(for_retrain(budget, mode).run_config("lap", level),
                              result | {"keep": keep, "test_acc_retrained": 0.5 + t / 1000},
                              wall_time=1.0, code_version="test")  # fmt: skip
    script = ROOT / "results" / "build_rewinding.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        done = subprocess.run([sys.executable, str(script), str(db), "--out", str(out)],
                              capture_output=True, text=True, env=env)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "no iterative runs yet" in done.stdout
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert outs[0] == outs[1]
    assert sorted(outs[0]) == ["budget.csv", "budget.png", "gain.csv", "gain.md", "grid.csv",
                               "grid.md", "grid.png", "protocol.txt"]  # fmt: skip
    grid = outs[0]["grid.csv"].decode()
    assert "rewind-weights (k = 20),lap,9,0.23,1," in grid and "finetune,mp,4,6.36,2," in grid
    assert "(n=1)" in outs[0]["grid.md"].decode()
    gain = outs[0]["gain.csv"].decode().splitlines()
    # LAP beats MP in seed 1 only (a tie in seed 0 is no win); level 9 has seed 0 alone
    assert gain[1].startswith("finetune,4,6.36,2,") and ",1,2," in gain[1]
    assert gain[3].startswith("finetune,9,0.23,1,") and gain[3].count(",0,1") == 2
    assert "(+" in outs[0]["gain.md"].decode() and "1/2)" in outs[0]["gain.md"].decode()
    budget = outs[0]["budget.csv"].decode().splitlines()
    assert len(budget) == 1 + 3 * 3 * 2 + 2 * 2 * 2  # + the grid's t = T rows of MP and LAP
    # t = T takes only the budget sweep's seed 0, not the grid's seed 1: one curve, one seed set
    cells = {",".join(line.split(",")[:6]) for line in budget}  # level ... n_seeds
    assert {"6,1.63,lap,finetune,400,1", "6,1.63,mp,rewind-lr,400,1"} <= cells
