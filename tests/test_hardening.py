"""Nothing lost, nothing silently wrong: damaged checkpoints, tied weights, aliases, TOML types."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lookahead_prune as lp
from lookahead_prune.cli import main
from lookahead_prune.pipeline import Protocol
from lookahead_prune.prune import canonical_method
from lookahead_prune.store import RunStore, config_hash
from lookahead_prune.sweep import Sweep

TINY = ["--train-steps", "20", "--retrain-steps", "10", "--subset", "600", "--quiet"]


def _sweep(db: Path, levels: str) -> int:
    return main(["sweep", "--model", "fcn", "--methods", "mp", "--levels", levels,
                 "--db", str(db), *TINY])  # fmt: skip


def test_a_bit_flipped_dense_checkpoint_is_refused_and_nothing_is_stored(tmp_path, capsys):
    db = tmp_path / "r.sqlite"
    assert _sweep(db, "4") == 0
    (dense,) = (tmp_path / "r-checkpoints").glob("dense-*.pt")
    data = bytearray(dense.read_bytes())
    data[len(data) // 2] ^= 0x10
    dense.write_bytes(bytes(data))
    capsys.readouterr()
    assert _sweep(db, "4,5") == 2
    err = capsys.readouterr().err
    assert str(dense) in err and "CRC-32" in err and "delete the file" in err
    assert err.count("\n") == 1  # one line, no traceback
    with RunStore(db) as store:
        assert len(store) == 1  # level 5 was not computed from the damaged weights


def test_tied_weights_are_refused_not_silently_untied():
    first, second = nn.Linear(6, 6), nn.Linear(6, 6)
    second.weight = first.weight
    model = nn.Sequential(first, nn.ReLU(), second, nn.ReLU(), nn.Linear(6, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"shares its weight with \['2.weight'\]"):
        lp.prune(model, "lap", 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    class TiedLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, x):
            return self.head(torch.relu(self.fc(self.emb(x)))).mean(1)

    lm = TiedLM()
    with pytest.raises(ValueError, match=r"emb\.weight"):
        lp.prune(lm, "mp", 0.5)
    lp.prune(lm, "mp", 0.5, exclude=["head"])  # the way out the message names
    assert hasattr(lm.fc, "weight_mask") and not hasattr(lm.head, "weight_mask")
    assert lm.head.weight is lm.emb.weight


def test_method_aliases_share_one_run_key():
    base = Protocol(model="fcn", dataset="mnist")
    keys = {config_hash(base.run_config(m, 4)) for m in ("lap", "LAP", "lap-base", "Lap-Base")}
    assert keys == {"5d04fff4ff7371ff"}  # the canonical name's key from before (commit 5f726e4)
    assert canonical_method("LAP-Forward-SEQ") == "lap-forward-seq"
    assert canonical_method("lap-base-seq") == "lap-seq"
    sweep = Sweep(base, ["fcn"], ["mnist"], ["lap", "LAP", "lap-base", "mp"], [4], [0])
    assert sweep.methods == ["lap", "mp"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('bn = "no"', "bn must be true or false"),
        ('compile = "yes"', "compile must be true or false"),
        ("levels = [2.7]", "'levels' must hold int"),
        ("levels = [true]", "'levels' must hold int"),
        ("levels = [[2]]", "'levels' must hold int"),
        ("seeds = [0.9]", "'seeds' must hold int"),
        ("methods = 5", "'methods' must hold str"),
        ("db = 5", "'db' must be a string"),
        ('subset = "5000"', "subset must be an integer"),
        ('activation = "gelu"', "activation must be one of"),
        ("batch_size = 0", "batch_size must be >= 1"),
        ('graph = "module"', "graph must be one of"),
        ('methods = ["lapp"]', "unknown"),
    ],
)
def test_toml_fields_are_checked_strictly_before_any_work(tmp_path, capsys, line, message):
    key = line.split(" =")[0]
    base = {"methods": '["mp"]', "levels": "[4]", "db": repr(str(tmp_path / "r.sqlite"))}
    base.pop(key, None)
    text = "\n".join([f"{k} = {v}" for k, v in base.items()] + [line])
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(text + "\n")
    assert main(["sweep", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.toml"]


def test_report_reads_without_writing_and_leaves_other_sqlite_files_alone(tmp_path, capsys):
    import sqlite3

    db = tmp_path / "r.sqlite"
    assert _sweep(db, "4") == 0
    with sqlite3.connect(db) as conn:  # fold the WAL in, so the file alone holds everything
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before = db.read_bytes()
    capsys.readouterr()
    assert main(["report", "--db", str(db)]) == 0
    assert "MP" in capsys.readouterr().out and db.read_bytes() == before
    other = tmp_path / "other.sqlite"  # another program's database, in rollback-journal mode
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (x)")
    assert main(["report", "--db", str(other)]) == 2
    assert "not a lookahead-prune results store" in capsys.readouterr().err
    with sqlite3.connect(other) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    with pytest.raises(Exception, match="other tables"):  # writing opens refuse it too...
        RunStore(other)
    with sqlite3.connect(other) as conn:  # ...before switching it to WAL
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    garbage = tmp_path / "junk.sqlite"
    garbage.write_bytes(b"x" * 4096)
    assert main(["report", "--db", str(garbage)]) == 2
    assert "not a usable SQLite results file" in capsys.readouterr().err


def test_a_layer_pruned_to_nothing_is_named_in_a_warning():
    model = nn.Sequential(nn.Linear(50, 20), nn.ReLU(), nn.Linear(20, 2))
    with pytest.warns(UserWarning, match=r"layers \['2'\] keep no weight"):
        lp.prune(model, "mp", {"0": 0.5, "2": 0.01})  # round(0.01 * 40) = 0


def test_prune_under_inference_mode_is_refused_before_touching_the_model():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.inference_mode(), pytest.raises(ValueError, match="inference_mode"):
        lp.prune(model, "lap", 0.5)
    assert not hasattr(model[0], "weight_mask")
    with torch.no_grad():
        lp.prune(model, "lap", 0.5)  # no_grad is fine, and training afterwards works
    x, y = torch.randn(12, 8), torch.randint(0, 2, (12,))
    lp.train(model, x, y, lp.TrainConfig(steps=2, lr=1e-2, batch_size=6))


def test_checkpoints_honour_the_umask(tmp_path):
    import os

    from lookahead_prune.checkpoint import save_checkpoint

    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "a.pt", {"x": torch.ones(1)})
    finally:
        os.umask(old)
    assert (tmp_path / "a.pt").stat().st_mode & 0o777 == 0o644


def test_a_full_disk_while_writing_a_checkpoint_is_one_line(tmp_path, monkeypatch):
    import errno

    from lookahead_prune import checkpoint
    from lookahead_prune.checkpoint import CheckpointError, save_checkpoint

    def full(*args, **kwargs):  # what torch raises when the disk fills mid-write
        raise RuntimeError(
            "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing "
            "file data/0: file write failed"
        )

    monkeypatch.setattr(checkpoint.torch, "save", full)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda p: type("U", (), {"free": 0}))
    with pytest.raises(CheckpointError, match="disk is full") as info:
        save_checkpoint(tmp_path / "d.pt", {"x": torch.ones(1)})
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # no temporary left behind

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", enospc)
    with pytest.raises(CheckpointError, match="disk is full"):
        save_checkpoint(tmp_path / "d.pt", {"x": torch.ones(1)})


def test_a_full_database_is_one_line_and_keeps_what_was_stored(tmp_path):
    from lookahead_prune.store import StoreError

    with RunStore(tmp_path / "r.sqlite") as store:
        store.put({"a": 1}, {"keep": 0.5}, wall_time=1.0, code_version="x")
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")  # the "disk" is now full
        big = {"blob": "x" * 100_000}
        with pytest.raises(StoreError, match="full"):
            store.put({"a": 2}, big, wall_time=1.0, code_version="x")
        assert len(store) == 1


def test_an_unwritable_checkpoint_folder_fails_before_any_training(tmp_path, capsys, monkeypatch):
    import lookahead_prune.pipeline as pipeline
    from lookahead_prune import workdir

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    trained = []
    monkeypatch.setattr(workdir.tempfile, "mkstemp", denied)
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: trained.append(1))
    assert _sweep(tmp_path / "r.sqlite", "4") == 2
    err = capsys.readouterr().err
    assert "cannot write checkpoints" in err and "Permission denied" in err and not trained


def test_a_dense_checkpoint_with_missing_keys_is_one_line(tmp_path, capsys):
    from lookahead_prune.checkpoint import save_checkpoint

    db = tmp_path / "r.sqlite"
    assert _sweep(db, "4") == 0
    (dense,) = (tmp_path / "r-checkpoints").glob("dense-*.pt")
    save_checkpoint(dense, {"state": {}, "test_acc": 0.5})
    capsys.readouterr()
    assert _sweep(db, "5") == 2
    err = capsys.readouterr().err
    assert str(dense) in err and "delete the file" in err and err.count("\n") == 1


def test_iterative_checkpoints_are_small_cleaned_and_never_needed_to_resume(tmp_path, capsys):
    import time

    db = tmp_path / "r.sqlite"
    work = tmp_path / "r-checkpoints"
    args = ["sweep", "--model", "fcn", "--methods", "lap", "--mode", "iterative",
            "--db", str(db), *TINY]  # fmt: skip
    assert main([*args, "--levels", "1,2"]) == 0
    ckpts = sorted(work.glob("iter-*.pt"))
    assert len(ckpts) == 2
    state = torch.load(ckpts[0], weights_only=True)["state"]
    assert state["fc1.weight_mask"].dtype == torch.bool
    stale = work / ".dense-x.pt.abc.tmp"  # left by a writer killed mid-write long ago
    stale.write_bytes(b"partial")
    old = time.time() - 3600
    import os

    os.utime(stale, (old, old))
    assert main(["clean", "--db", str(db)]) == 0
    assert "0 file(s)" not in capsys.readouterr().out
    assert not stale.exists() and len(list(work.glob("iter-*.pt"))) == 1  # level 1 went
    for ckpt in work.glob("iter-*.pt"):  # even the last level's checkpoint lost:
        ckpt.unlink()
    assert main([*args, "--levels", "1,2,3"]) == 0  # the chain is recomputed, not stuck
    out = capsys.readouterr().out
    assert "1 runs done, 2 already stored" in out
    with RunStore(db) as store:
        assert len(store) == 3


def test_two_sweeps_on_one_database_split_the_work_and_repeat_nothing(tmp_path):
    import os
    import subprocess
    import sys

    db = tmp_path / "r.sqlite"
    cmd = [sys.executable, "-m", "lookahead_prune.cli", "sweep", "--model", "fcn",
           "--methods", "mp,lap,rp", "--levels", "3,4", "--engine", "sequential",
           "--db", str(db), *TINY]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(outs)[-3000:]
    done = [int(o.split(" runs done")[0].split()[-1]) for o in outs]
    dense = [int(o.split(" dense models trained")[0].split()[-1]) for o in outs]
    assert sum(done) == 6 and sum(dense) == 1, outs  # every run computed once, dense once
    with RunStore(db) as store:
        assert len(store) == 6


def test_a_dead_sweeps_claims_are_taken_over(tmp_path, monkeypatch, capsys):
    import socket
    import time

    from lookahead_prune import claims
    from lookahead_prune.backends import local
    from lookahead_prune.pipeline import Protocol as P

    db = tmp_path / "r.sqlite"
    with RunStore(db):
        pass
    protocol = P(model="fcn", dataset="mnist", train_steps=20, retrain_steps=10, subset=600)
    key = config_hash(protocol.run_config("mp", 4))
    with claims.Claims(db) as live:  # a claim by a pid that no longer exists on this host
        live._conn.execute(
            "INSERT INTO claims VALUES (?, ?, ?)",
            (key, f"{socket.gethostname()}:999999999:dead", time.time()),
        )
    # claims are dropped on close only for their own owner: the dead one's stays
    other = "dense:" + config_hash(protocol.dense_config())
    with claims.Claims(db) as c:  # a live claim from another machine, renewed just now...
        c._conn.execute(
            "INSERT INTO claims VALUES (?, ?, ?)", (other, "elsewhere:1:x", time.time())
        )
    monkeypatch.setattr(claims, "STALE_S", 1.0)  # ...until it goes stale
    monkeypatch.setattr(local, "POLL_S", 0.2)
    assert _sweep(db, "4") == 0
    assert "waiting for" in capsys.readouterr().out
    with RunStore(db) as store:
        assert store.has(key)


def test_report_falls_back_to_an_immutable_read_where_read_only_open_fails(tmp_path, monkeypatch):
    """On a read-only mount a WAL database cannot even be opened with mode=ro (no -shm can be
    made); the report then reads the file as immutable. Root ignores file permissions, so
    the refusal is simulated."""
    import sqlite3

    from lookahead_prune import store as store_module

    db = tmp_path / "r.sqlite"
    assert _sweep(db, "4") == 0
    real = sqlite3.connect
    opened = []

    def connect(target, *args, **kwargs):
        opened.append(str(target))
        if "mode=ro" in str(target):
            raise sqlite3.OperationalError("unable to open database file")
        return real(target, *args, **kwargs)

    monkeypatch.setattr(store_module.sqlite3, "connect", connect)
    with RunStore(db, read_only=True) as store:
        assert len(store.runs()) == 1
    assert any("immutable=1" in target for target in opened)


def test_a_read_only_database_fails_before_any_training(tmp_path, monkeypatch, capsys):
    """Root ignores file modes, so the read-only file is simulated with SQLite's query_only."""
    import sqlite3

    import lookahead_prune.pipeline as pipeline
    from lookahead_prune import store as store_module

    db = tmp_path / "r.sqlite"
    with RunStore(db):
        pass
    real = sqlite3.connect

    def read_only(*args, **kwargs):
        conn = real(*args, **kwargs)
        conn.execute("PRAGMA query_only = ON")
        return conn

    trained = []
    monkeypatch.setattr(store_module.sqlite3, "connect", read_only)
    monkeypatch.setattr(pipeline, "train", lambda *a, **k: trained.append(1))
    assert _sweep(db, "4") == 2
    err = capsys.readouterr().err
    assert str(db) in err and "readonly" in err and err.count("\n") == 1 and not trained


def test_another_tools_database_with_a_runs_table_is_one_line_for_report_and_sweep(
    tmp_path, capsys
):
    import sqlite3

    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("PRAGMA user_version = 1")
    before = other.read_bytes()
    capsys.readouterr()
    assert main(["report", "--db", str(other)]) == 2
    err = capsys.readouterr().err
    assert "another program's SQLite database" in err and err.count("\n") == 1
    assert _sweep(other, "4") == 2
    err = capsys.readouterr().err
    assert "another program's SQLite database" in err and err.count("\n") == 1
    assert other.read_bytes() == before
