"""The Ray driver's bookkeeping without a cluster: claims shared with other sweeps, only what
it stored counted as done, dense accuracies kept in memory, an unreachable address in one line.
Tasks run at once in this process through a fake ``ray`` module (the real one: test_ray_backend).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from lookahead_prune.backends import ray as ray_backend
from lookahead_prune.backends import run_sweep
from lookahead_prune.claims import Claims
from lookahead_prune.cli import main
from lookahead_prune.pipeline import Protocol
from lookahead_prune.store import RunStore, config_hash
from lookahead_prune.sweep import Sweep, run_config
from lookahead_prune.workdir import dense_path

PROTOCOL = Protocol(model="fcn", dataset="mnist", train_steps=20, retrain_steps=10, subset=600)
DENSE = {"state": {}, "init": {}, "snapshots": {0: {}}, "test_acc": 0.91, "test_loss": 0.3,
         "train_acc": 0.95, "wall_time": 1.0}  # fmt: skip


def _result(level: int) -> dict[str, Any]:
    acc = 0.9 - 0.01 * level
    return {"keep": 0.8**level, "keep_layers": {}, "test_acc_pruned": acc,
            "test_loss_pruned": 0.4, "train_acc_pruned": acc, "test_acc_retrained": acc,
            "test_loss_retrained": 0.4, "train_acc_retrained": acc}  # fmt: skip


class _Ref:
    def __init__(self, value: Any) -> None:
        self.value = value


class FakeRay:
    """Runs each task when it is submitted; ``wait`` hands back the oldest."""

    def is_initialized(self) -> bool:
        return True

    def remote(self, **_: Any) -> Any:
        def wrap(fn: Any) -> Any:
            return SimpleNamespace(remote=lambda *args: self.put(fn(*map(self._value, args))))

        return wrap

    def _value(self, arg: Any) -> Any:
        return arg.value if isinstance(arg, _Ref) else arg

    def put(self, value: Any) -> _Ref:
        return _Ref(value)

    def get(self, ref: _Ref) -> Any:
        return ref.value

    def wait(self, refs: list[_Ref], num_returns: int = 1, timeout: Any = None) -> Any:
        return refs[:num_returns], refs[num_returns:]


@pytest.fixture
def fake(monkeypatch):
    """The Ray backend on a fake ``ray``; ``fake.computed`` lists the jobs its tasks ran and
    ``fake.before_return`` (jobs -> None) runs inside a group task, as another sweep would."""
    state = SimpleNamespace(computed=[], dense=0, before_return=lambda jobs: None)

    def dense_task(protocol, data_dir, device, storage):
        state.dense += 1
        return dict(DENSE)

    def group_task(protocol, dense_state, jobs, levels, data_dir, device, storage):
        state.computed += jobs
        state.before_return(jobs)
        return [(m, lv, _result(lv), 0.1) for m, lv in jobs]

    monkeypatch.setattr(ray_backend, "require_ray", FakeRay)
    monkeypatch.setattr(ray_backend, "dense_task", dense_task)
    monkeypatch.setattr(ray_backend, "group_task", group_task)
    monkeypatch.setattr(ray_backend, "POLL_S", 0.01, raising=False)
    return state


def _key(sweep: Sweep, method: str, level: int) -> str:
    (protocol,) = sweep.protocols()
    return config_hash(run_config(protocol, method, level, sorted(sweep.levels)))


def _store(db, sweep: Sweep, method: str, level: int) -> None:
    """Store one run as another sweep would."""
    (protocol,) = sweep.protocols()
    config = run_config(protocol, method, level, sorted(sweep.levels))
    with RunStore(db) as store:
        assert store.put(config, _result(level), wall_time=1.0, code_version="other")


def test_ray_takes_claims_and_counts_only_what_it_stored(fake, tmp_path):
    db = tmp_path / "r.sqlite"
    sweep = Sweep(PROTOCOL, ["fcn"], ["mnist"], ["mp", "lap"], [3, 4], [0])
    with RunStore(db):
        pass
    with Claims(db) as other:  # another live sweep computes mp at level 3
        assert other.take([_key(sweep, "mp", 3)])

        def meanwhile(jobs):
            if len(fake.computed) == 1:  # the other sweep finishes its claimed run
                _store(db, sweep, "mp", 3)
                other.release([_key(sweep, "mp", 3)])
            if ("lap", 4) in jobs:  # a sweep that claims nothing stores it first
                _store(db, sweep, "lap", 4)

        fake.before_return = meanwhile
        stats = run_sweep(sweep, db, progress=False, backend="ray", batch_models=1)
    assert ("mp", 3) not in fake.computed  # held by the other sweep: never computed here
    assert sorted(fake.computed) == [("lap", 3), ("lap", 4), ("mp", 4)]
    assert stats.done == 2 and stats.skipped == 2 and not stats.failed
    assert _key(sweep, "lap", 4) not in stats.keys
    with RunStore(db) as store:
        assert len(store) == 4
    with Claims(db) as probe:  # the driver released every claim it took
        assert probe.held_by_others() == 0


def test_dense_accuracies_stay_in_memory_when_the_checkpoint_goes(fake, tmp_path):
    db = tmp_path / "r.sqlite"
    first = Sweep(PROTOCOL, ["fcn"], ["mnist"], ["mp"], [3], [0])
    assert run_sweep(first, db, progress=False, backend="ray").done == 1
    ckpt = dense_path(tmp_path / "r-checkpoints", PROTOCOL)
    assert ckpt.exists() and fake.dense == 1

    def clean_dense(jobs):  # `lap clean --dense` while the sweep runs
        ckpt.unlink(missing_ok=True)

    fake.before_return = clean_dense
    more = Sweep(PROTOCOL, ["fcn"], ["mnist"], ["mp", "lap"], [3, 4], [0])
    stats = run_sweep(more, db, progress=False, backend="ray", batch_models=1)
    assert fake.dense == 1  # the kept dense model was used, not retrained
    assert stats.done == 3 and stats.skipped == 1 and not stats.failed
    with RunStore(db) as store:
        rows = store.runs()
    assert len(rows) == 4 and {r["dense_test_acc"] for r in rows} == {0.91}


def _empty_store_with_checkpoints(tmp_path):
    """An empty results database and its checkpoint folder, as a sweep leaves them."""
    db = tmp_path / "r.sqlite"
    with RunStore(db):
        pass
    folder = tmp_path / "r-checkpoints"
    folder.mkdir()
    return db, folder


def test_clean_keeps_dense_models_while_a_live_claim_is_held(tmp_path, capsys):
    db, folder = _empty_store_with_checkpoints(tmp_path)
    dense = folder / "dense-abc.pt"
    dense.write_bytes(b"weights")
    with Claims(db) as sweep:  # a running sweep
        sweep.take(["some-run"])
        assert main(["clean", "--db", str(db), "--dense"]) == 0
        assert dense.exists()
        assert "live claim" in capsys.readouterr().out
    assert main(["clean", "--db", str(db), "--dense"]) == 0  # the sweep has ended
    assert not dense.exists()


def test_clean_survives_a_temporary_renamed_between_glob_and_stat(tmp_path, monkeypatch, capsys):
    import pathlib

    db, folder = _empty_store_with_checkpoints(tmp_path)
    tmp = folder / ".dense-abc.pt.x1.tmp"
    tmp.write_bytes(b"partial")
    real_stat = pathlib.Path.stat

    def stat(self, *args, **kwargs):
        if self.name.endswith(".tmp"):  # renamed into place by a writer since the glob
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "stat", stat)
    assert main(["clean", "--db", str(db)]) == 0
    assert main(["clean", "--db", str(db), "--dry-run"]) == 0
    assert "0 file(s)" in capsys.readouterr().out


@pytest.mark.parametrize("address", ["127.0.0.1:1", "auto"])
def test_an_unreachable_address_is_one_line(address, tmp_path, monkeypatch, capsys):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray is running in this process")

    def init(*args, **kwargs):  # what ray.init raises, after minutes, where no cluster is
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    monkeypatch.setattr(ray, "init", init)
    db = tmp_path / "r.sqlite"
    rc = main(["sweep", "--model", "fcn", "--methods", "mp", "--levels", "4", "--quiet",
               "--backend", "ray", "--address", address, "--db", str(db)])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"no Ray cluster answered at --address {address}" in err
    assert "ray start --head" in err and "omit --address" in err
    if address != "auto":  # nothing listens there: said at once, before the database opens
        assert "Failed to connect" not in err and not db.exists()
