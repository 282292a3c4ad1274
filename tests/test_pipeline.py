"""Train -> prune -> retrain: level schedule, retraining modes, resumable sweeps, CLI, reports."""

from __future__ import annotations

import csv
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lookahead_prune.cli import main
from lookahead_prune.data import load_dataset
from lookahead_prune.models import build_model
from lookahead_prune.pipeline import (
    Protocol,
    dense_model,
    for_retrain,
    prune_and_retrain,
    train_dense,
)
from lookahead_prune.schedule import level_keep, overall_keep
from lookahead_prune.store import RunStore, config_hash

TABLE1 = [6.36, 3.21, 1.63, 0.84, 0.43, 0.23, 0.12]  # FCN, levels 4..10
TABLE2 = [10.62, 8.86, 7.39, 6.18, 5.17, 4.32, 3.62]  # Conv-6 on CIFAR-10, levels 12..18


def test_level_schedule_reproduces_the_papers_fractions():
    fcn = build_model("fcn")
    got = [round(100 * overall_keep(fcn, level_keep(fcn, t, 0.0, 0.5)), 2) for t in range(4, 11)]
    assert got == TABLE1
    conv6 = build_model("conv6", in_channels=3, image_size=32)
    got = [
        round(100 * overall_keep(conv6, level_keep(conv6, t, 0.85, 0.8)), 2) for t in range(12, 19)
    ]
    assert got == TABLE2
    keep = level_keep(fcn, 2, 0.0, 0.5)
    assert keep["fc1"] == 0.25 and keep["fc5"] == 0.75**2
    resnet = build_model("resnet18")
    assert "conv1" not in level_keep(resnet, 3, 0.85, 0.8, dense=("conv1",))
    with pytest.raises(ValueError, match="level"):
        level_keep(fcn, -1, 0.0, 0.5)


@pytest.fixture(scope="module")
def tiny_data():
    return load_dataset("mnist", subset=600)


def _protocol(**kw) -> Protocol:
    base = {"model": "fcn", "dataset": "mnist", "train_steps": 40, "retrain_steps": 20,
            "subset": 600, "rewind_step": 10}  # fmt: skip
    return Protocol(**(base | kw))


@pytest.mark.parametrize("mode", ["finetune", "rewind-weights", "rewind-lr", "lottery"])
def test_retraining_modes(tiny_data, mode, monkeypatch):
    protocol = for_retrain(_protocol(), mode)
    dense = train_dense(protocol, tiny_data, snapshot_steps=(10,))
    model = dense_model(protocol, dense, tiny_data)
    seen = {}
    import lookahead_prune.pipeline as pipeline

    real_train_many = pipeline.train_many

    def spy(models, x, y, config, *args, **kw):
        (m,) = models
        seen["fc1"] = m.fc1.weight_orig.detach().clone()
        seen["mask"] = m.fc1.weight_mask.detach().clone()
        seen["lr"] = config[0].lr
        return real_train_many(models, x, y, config, *args, **kw)

    monkeypatch.setattr(pipeline, "train_many", spy)
    result = prune_and_retrain(protocol, model, dense, tiny_data, "lap", 2)
    expected_start = {
        "finetune": dense.state["fc1.weight"],
        "rewind-lr": dense.state["fc1.weight"],
        "rewind-weights": dense.rewind_to(10)["fc1.weight"],
        "lottery": dense.init["fc1.weight"],
    }[mode]
    assert torch.equal(seen["fc1"], expected_start)
    assert not torch.equal(dense.rewind_to(10)["fc1.weight"], dense.state["fc1.weight"])
    # masks stay applied through retraining
    assert torch.equal(model.fc1.weight_mask, seen["mask"])
    assert bool((model.fc1.weight[seen["mask"] == 0] == 0).all())
    assert abs(result.keep - 0.2514) < 1e-3
    assert 0.0 <= result.test_acc_pruned <= 1.0 and 0.0 <= result.test_acc_retrained <= 1.0


def test_sweep_cli_and_report_csv(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    args = ["sweep", "--model", "fcn", "--dataset", "mnist", "--methods", "mp,lap",
            "--levels", "2,4", "--seeds", "0", "--train-steps", "30", "--retrain-steps", "10",
            "--subset", "600", "--db", str(db), "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert main(args) == 0  # second call: everything already stored
    assert "0 runs done, 4 already stored" in capsys.readouterr().out
    assert main(["report", "--db", str(db), "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 4
    assert {"model", "dataset", "method", "level", "keep", "seed", "test_acc_pruned",
            "test_acc_retrained"} <= set(rows[0])  # fmt: skip
    keeps = {(r["method"], r["level"]): float(r["keep"]) for r in rows}
    assert round(keeps[("lap", "2")], 4) == 0.2514 and round(keeps[("mp", "4")], 4) == 0.0636
    assert main(["report", "--db", str(db)]) == 0
    assert "LAP" in capsys.readouterr().out


def test_iterative_sweep_applies_levels_cumulatively(tmp_path):
    db = tmp_path / "it.sqlite"
    args = ["sweep", "--model", "fcn", "--methods", "lap", "--levels", "1,2", "--train-steps",
            "20", "--retrain-steps", "5", "--subset", "600", "--mode", "iterative", "--db",
            str(db), "--quiet"]  # fmt: skip
    assert main(args) == 0
    with RunStore(db) as store:
        rows = sorted(store.runs(), key=lambda r: r["level"])
    assert [r["level"] for r in rows] == [1, 2]
    assert rows[1]["keep"] < rows[0]["keep"]


def test_killed_sweep_resumes_without_loss_or_duplicates(tmp_path):
    db = tmp_path / "kill.sqlite"
    cmd = [sys.executable, "-m", "lookahead_prune.cli", "sweep", "--model", "fcn", "--methods",
           "mp,lap,lfp", "--levels", "1,2,3", "--train-steps", "30", "--retrain-steps", "60",
           "--subset", "600", "--db", str(db), "--quiet", "--batch-models", "2"]  # fmt: skip
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: a loaded machine is slow, not wrong
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                with sqlite3.connect(db) as con:
                    done = con.execute("SELECT count(*) FROM runs").fetchone()[0]
            except sqlite3.Error:
                done = 0
            if done >= 2:
                break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    with RunStore(db) as store:
        before = {r["key"]: r for r in store.runs()}
    assert 2 <= len(before) < 9, "the sweep should have been killed midway"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        keys = [k for (k,) in con.execute("SELECT key FROM runs")]
    assert len(keys) == len(set(keys)) == 9
    with RunStore(db) as store:
        after = {r["key"]: r for r in store.runs()}
    for key, row in before.items():  # finished runs are kept exactly as they were
        assert after[key]["test_acc_retrained"] == row["test_acc_retrained"]
        assert after[key]["created_at"] == row["created_at"]


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["report", "--db", str(tmp_path / "none.sqlite")]) == 2
    assert "lap report: error: no results database" in capsys.readouterr().err
    rc = main(["sweep", "--model", "fcn", "--methods", "obd9", "--levels", "1", "--db",
               str(tmp_path / "x.sqlite")])  # fmt: skip
    assert rc == 2 and "known methods" in capsys.readouterr().err


def test_demo_writes_tables_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--levels", "2,6", "--train-steps", "40",
               "--retrain-steps", "10"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "MP" in text and "LAP" in text and "25.14%" in text
    assert (out / "demo.png").stat().st_size > 1000
    assert Path(out / "demo.sqlite").exists()


def test_global_scope_spends_the_levels_budget_under_one_threshold(tiny_data):
    protocol = _protocol(scope="global", retrain_steps=0)
    dense = train_dense(protocol, tiny_data)
    model = dense_model(protocol, dense, tiny_data)
    result = prune_and_retrain(protocol, model, dense, tiny_data, "lamp", 4)
    assert abs(result.keep - 0.0636) < 1e-3  # the same overall fraction as layer-wise level 4
    assert len({round(v, 4) for v in result.keep_layers.values()}) > 2  # spread unevenly


def test_sweep_from_toml(tmp_path, capsys):
    db = tmp_path / "t.sqlite"
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(
        f'model = "fcn"\nmethods = ["mp", "lap-forward"]\nlevels = "1-2"\nseeds = [0]\n'
        f'train_steps = 20\nretrain_steps = 5\nsubset = 600\ndb = "{db}"\n'
    )
    assert main(["sweep", str(cfg), "--quiet"]) == 0
    with RunStore(db) as store:
        assert sorted((r["method"], r["level"]) for r in store.runs()) == [
            ("lap-forward", 1), ("lap-forward", 2), ("mp", 1), ("mp", 2)
        ]  # fmt: skip
    cfg.write_text('methods = ["mp"]\nlevels = [1]\nwarmup = 3\n')
    with pytest.raises(SystemExit, match="unknown keys"):
        main(["sweep", str(cfg)])


def test_dense_key_never_follows_the_rewind_step_the_run_key_does_for_weight_rewinding():
    a = _protocol(retrain="rewind-weights", rewind_step=10, retrain_steps=30)
    b = _protocol(retrain="rewind-weights", rewind_step=5, retrain_steps=35)
    c = _protocol(retrain="finetune", rewind_step=10)
    d = _protocol(retrain="finetune", rewind_step=5)
    assert a.dense_config() == b.dense_config() == c.dense_config() == d.dense_config()
    assert a.dense_config()["rewind_step"] == 0  # the dense keys stored before stay valid
    assert a.run_config("mp", 1) != b.run_config("mp", 1)
    assert c.run_config("mp", 1) == d.run_config("mp", 1)
    assert _protocol(weight_decay=0).run_config("mp", 1) == _protocol(weight_decay=0.0).run_config(
        "mp", 1
    )  # 0 and 0.0 give one key


def test_finetune_after_a_cosine_schedule_uses_the_last_positive_rate(tiny_data):
    protocol = _protocol(schedule="cosine", retrain_steps=3)
    dense = train_dense(protocol, tiny_data)
    result = prune_and_retrain(protocol, dense_model(protocol, dense, tiny_data), dense,
                               tiny_data, "mp", 1)  # fmt: skip
    assert 0.0 <= result.test_acc_retrained <= 1.0


def test_iterative_chains_of_several_methods_retrain_together_as_separate_chains_would(tmp_path):
    base = ["sweep", "--model", "fcn", "--levels", "2,3,4", "--train-steps", "20", "--quiet",
            "--retrain-steps", "6", "--subset", "600", "--mode", "iterative"]  # fmt: skip
    assert main([*base, "--methods", "mp,lap", "--db", str(tmp_path / "both.sqlite")]) == 0
    for method in ("mp", "lap"):
        assert main([*base, "--methods", method, "--db", str(tmp_path / f"{method}.sqlite")]) == 0
    with RunStore(tmp_path / "both.sqlite") as store:
        both = {(r["method"], r["level"]): r for r in store.runs()}
    alone = {}
    for method in ("mp", "lap"):
        with RunStore(tmp_path / f"{method}.sqlite") as store:
            alone |= {(r["method"], r["level"]): r for r in store.runs()}
    assert sorted(both) == sorted(alone) and len(both) == 6
    for job, row in both.items():
        assert row["path"] == alone[job]["path"] and row["keep"] == alone[job]["keep"]
        assert row["test_loss_retrained"] == pytest.approx(alone[job]["test_loss_retrained"],
                                                           rel=1e-4)  # fmt: skip
    for level in (3, 4):  # below the sparse engine's density: one group per level
        assert both[("mp", level)]["engine"] == both[("lap", level)]["engine"] == "sparse"
        assert both[("mp", level)]["wall_time"] == both[("lap", level)]["wall_time"]


def test_iterative_runs_record_the_levels_they_went_through(tmp_path):
    db = tmp_path / "path.sqlite"
    base = ["sweep", "--model", "fcn", "--methods", "mp,mp", "--train-steps", "20",
            "--retrain-steps", "3", "--subset", "600", "--mode", "iterative", "--db", str(db),
            "--quiet"]  # fmt: skip
    assert main([*base, "--levels", "2,4"]) == 0
    assert main([*base, "--levels", "1-4"]) == 0
    with RunStore(db) as store:
        paths = sorted((r["level"], tuple(r["path"])) for r in store.runs())
    assert paths == [(1, (1,)), (2, (1, 2)), (2, (2,)), (3, (1, 2, 3)), (4, (1, 2, 3, 4)),
                     (4, (2, 4))]  # fmt: skip


def test_toml_sweep_errors(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('model = "fcn"\nlevels = [1]\n')
    with pytest.raises(SystemExit, match="missing keys"):
        main(["sweep", str(cfg)])
    cfg.write_text('methods = "mp"\nlevels = [1]\n')
    with pytest.raises(SystemExit, match="--train-steps"):
        main(["sweep", str(cfg), "--train-steps", "7"])


def test_fields_added_later_keep_old_keys_and_runtime_fields_never_enter_them():
    base = Protocol(model="fcn", dataset="mnist")
    config = base.run_config("lap", 4)
    # keys of results stored before exclude/eval_examples/precision existed (commit 5f726e4)
    assert config_hash(config) == "5d04fff4ff7371ff"
    assert config_hash(base.dense_config()) == "9d1e1ec8fbf0dc22"
    assert not {"exclude", "eval_examples", "precision", "channels_last", "compile"} & set(config)
    fast = Protocol(model="fcn", dataset="mnist", channels_last=True, compile=True, engine="sparse")
    assert fast.run_config("lap", 4) == config and fast.dense_config() == base.dense_config()
    for change in ({"exclude": ["fc3"]}, {"eval_examples": 100}, {"precision": "bf16"}):
        other = Protocol(model="fcn", dataset="mnist", **change)
        assert config_hash(other.run_config("lap", 4)) != config_hash(config), change
    assert Protocol(model="fcn", dataset="mnist", exclude=["a", "b"]).exclude == ("a", "b")
    with pytest.raises(ValueError, match="precision"):
        Protocol(model="fcn", dataset="mnist", precision="fp8")
    with pytest.raises(ValueError, match="engine"):
        Protocol(model="fcn", dataset="mnist", engine="fast")
    with pytest.raises(ValueError, match="eval_examples"):
        Protocol(model="fcn", dataset="mnist", eval_examples=0)
    with pytest.raises(ValueError, match="list of patterns"):
        Protocol(model="fcn", dataset="mnist", exclude="*shortcut*")


def test_eval_examples_limits_what_accuracy_is_measured_on(tiny_data, monkeypatch):
    import lookahead_prune.pipeline as pipeline

    sizes = []
    real = pipeline.evaluate
    monkeypatch.setattr(pipeline, "evaluate", lambda m, x, y: sizes.append(len(y)) or real(m, x, y))
    protocol = _protocol(eval_examples=50, train_steps=5, retrain_steps=2, rewind_step=0)
    dense = train_dense(protocol, tiny_data)
    prune_and_retrain(protocol, dense_model(protocol, dense, tiny_data), dense, tiny_data, "mp", 2)
    assert sizes == [50] * 6


def test_sweep_cli_speed_and_exclude_flags(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    args = ["sweep", "--model", "fcn", "--dataset", "mnist", "--methods", "lap", "--levels", "3",
            "--train-steps", "10", "--retrain-steps", "5", "--subset", "600", "--db", str(db),
            "--quiet", "--exclude", "fc1", "--eval-examples", "200", "--precision", "bf16",
            "--channels-last", "--compile"]  # fmt: skip
    assert main(args[:-1]) == 0  # eager
    assert main(args) == 0  # --compile only changes how it runs: the run is already stored
    assert "0 runs done, 1 already stored" in capsys.readouterr().out
    with RunStore(db) as store:
        (row,) = store.runs()
    assert row["exclude"] == ["fc1"] and row["eval_examples"] == 200
    assert row["precision"] == "bf16" and "compile" not in row
    assert row["keep_layers"]["fc1"] == 1.0 and row["keep_layers"]["fc2"] < 0.2


def test_sweep_refuses_an_exclude_pattern_before_training():
    from lookahead_prune.sweep import Sweep

    protocol = Protocol(model="fcn", dataset="mnist", exclude=("*shortcut*",))
    with pytest.raises(ValueError, match="matches no prunable layer"):
        Sweep(protocol, ["resnet18", "conv6"], ["mnist"], ["lap"], [3], [0])
    assert Protocol(model="fcn", dataset="mnist", exclude=("b", "a", "b")).exclude == ("a", "b")


def test_sparse_engine_sweep_stores_what_the_sequential_one_does(tmp_path):
    """Same keys, same numbers (up to summation order); the engine is recorded, not keyed."""
    rows = {}
    for engine in ("sequential", "sparse"):
        db = tmp_path / f"{engine}.sqlite"
        args = ["sweep", "--model", "fcn", "--methods", "mp,lap", "--levels", "4,9",
                "--seeds", "0", "--train-steps", "30", "--retrain-steps", "20",
                "--subset", "600", "--db", str(db), "--quiet", "--engine", engine]  # fmt: skip
        assert main(args) == 0
        with RunStore(db) as store:
            rows[engine] = {r["key"]: r for r in store.runs()}
    assert set(rows["sparse"]) == set(rows["sequential"]) and len(rows["sparse"]) == 4
    for key, ours in rows["sparse"].items():
        ref = rows["sequential"][key]
        assert ours["engine"] == "sparse" and ref["engine"] == "sequential"
        assert ours["keep"] == ref["keep"]
        assert ours["test_acc_pruned"] == ref["test_acc_pruned"]
        # float32: Adam turns rounding of near-zero gradients into small steps, so the two
        # engines agree closely but not to the bit (tests/test_engines.py checks float64)
        assert abs(ours["test_acc_retrained"] - ref["test_acc_retrained"]) <= 0.02
        assert abs(ours["test_loss_retrained"] - ref["test_loss_retrained"]) < 0.02


def test_sweep_groups_one_shot_runs_only_where_an_engine_trains_them_as_one():
    from lookahead_prune.backends import group_size

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    fcn = Protocol(model="fcn", dataset="mnist")
    assert group_size(fcn, cpu, 63) == 63
    assert group_size(Protocol(model="conv6", dataset="mnist"), cpu, 63) == 1
    assert group_size(Protocol(model="fcn", dataset="mnist", engine="sequential"), cpu, 63) == 1
    assert group_size(fcn, cuda, 63) == 16
