"""The Ray backend against a real local Ray cluster: same rows as the local backend, a worker
killed mid-task is retried, a failing task is reported, a killed driver resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lookahead_prune.backends import run_sweep
from lookahead_prune.cli import main
from lookahead_prune.pipeline import Protocol
from lookahead_prune.store import RunStore
from lookahead_prune.sweep import Sweep

ray = pytest.importorskip("ray")
from lookahead_prune.backends.ray import CRASH_ENV, RayOptions  # noqa: E402

PROTOCOL = Protocol(model="fcn", dataset="mnist", train_steps=20, retrain_steps=10, subset=600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray for the module; its workers read the crash switch from this file."""
    switch = tmp_path_factory.mktemp("ray") / "crash"
    switch.write_text("off\n")
    os.environ[CRASH_ENV] = str(switch)
    env = {"OMP_NUM_THREADS": "1", CRASH_ENV: str(switch)}
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": env}
    )
    yield switch
    ray.shutdown()
    os.environ.pop(CRASH_ENV, None)


def _rows(db) -> dict[str, dict]:
    with RunStore(db) as store:
        return {r["key"]: r for r in store.runs()}


def test_ray_gives_the_local_rows_even_when_a_worker_dies_mid_task(cluster, tmp_path):
    sweep = Sweep(PROTOCOL, ["fcn"], ["mnist"], ["mp", "lap"], [3, 4], [0])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray workers run
    try:
        run_sweep(sweep, tmp_path / "local.sqlite", progress=False)
    finally:
        torch.set_num_threads(threads)
    cluster.write_text("crash\n")  # the first group task kills its worker
    stats = run_sweep(sweep, tmp_path / "ray.sqlite", progress=False, backend="ray",
                      ray_options=RayOptions(max_retries=2))  # fmt: skip
    assert cluster.read_text().strip() == "crashed" and not stats.failed
    local, remote = _rows(tmp_path / "local.sqlite"), _rows(tmp_path / "ray.sqlite")
    assert set(local) == set(remote) and len(local) == 4
    for key, row in local.items():
        for name in ("keep", "test_acc_pruned", "test_acc_retrained", "test_loss_retrained"):
            assert remote[key][name] == pytest.approx(row[name], abs=1e-12), (key, name)


def test_a_task_that_keeps_failing_is_reported_and_the_rest_finishes(cluster, tmp_path, capsys):
    sweep = Sweep(replace_engine("sequential"), ["fcn"], ["mnist"], ["mp", "lap"], [4], [0])
    cluster.write_text("crash\n")  # no retries: the crash is final for that task
    stats = run_sweep(sweep, tmp_path / "r.sqlite", progress=False, backend="ray",
                      ray_options=RayOptions(max_retries=0))  # fmt: skip
    assert len(stats.failed) == 1 and stats.done == 1
    config, jobs, error = stats.failed[0]
    assert config["model"] == "fcn" and len(jobs) == 1 and error
    assert len(_rows(tmp_path / "r.sqlite")) == 1
    stats = run_sweep(sweep, tmp_path / "r.sqlite", progress=False, backend="ray")
    assert stats.done == 1 and stats.skipped == 1  # a rerun finishes it


def replace_engine(engine: str) -> Protocol:
    from dataclasses import replace

    return replace(PROTOCOL, engine=engine)


def test_a_run_another_sweep_holds_is_left_to_it(cluster, tmp_path):
    import threading

    from lookahead_prune.claims import Claims
    from lookahead_prune.store import config_hash
    from lookahead_prune.sweep import run_config

    db = tmp_path / "r.sqlite"
    protocol = replace_engine("sequential")
    sweep = Sweep(protocol, ["fcn"], ["mnist"], ["mp", "lap"], [4], [0])
    (p,) = sweep.protocols()
    config = run_config(p, "mp", 4, [4])
    with RunStore(db):
        pass
    with Claims(db) as other:  # a local sweep computing mp
        assert other.take([config_hash(config)])

        def finish() -> None:
            time.sleep(2)
            with RunStore(db) as store:
                store.put(config, {"keep": 0.5}, wall_time=1.0, code_version="other")
            other.release([config_hash(config)])

        thread = threading.Thread(target=finish)
        thread.start()
        stats = run_sweep(sweep, db, progress=False, backend="ray")
        thread.join()
    assert stats.done == 1 and stats.skipped == 1 and not stats.failed
    rows = _rows(db)
    assert len(rows) == 2 and rows[config_hash(config)]["code_version"] == "other"


def test_a_killed_driver_resumes_without_loss_or_duplicates(cluster, tmp_path):
    db = tmp_path / "r.sqlite"
    address = ray.get_runtime_context().gcs_address  # the drivers join the module's cluster
    cmd = [sys.executable, "-m", "lookahead_prune.cli", "sweep", "--model", "fcn",
           "--methods", "mp,lap,rp", "--levels", "4", "--engine", "sequential",
           "--train-steps", "20", "--retrain-steps", "100", "--subset", "600",
           "--db", str(db), "--quiet", "--backend", "ray", "--address", address]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(CRASH_ENV, None)
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    deadline = time.time() + 600  # generous: a loaded machine is slow, not wrong
    while time.time() < deadline and (not db.exists() or len(_rows(db)) == 0):
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies; the cluster goes on
    driver.wait()
    first = _rows(db)
    assert 1 <= len(first) < 3
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = _rows(db)
    assert len(rows) == 3 and all(
        rows[k]["created_at"] == r["created_at"] for k, r in first.items()
    )


def test_without_ray_the_message_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    import builtins

    real = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    rc = main(["sweep", "--model", "fcn", "--methods", "mp", "--levels", "4", "--backend", "ray",
               "--db", str(tmp_path / "r.sqlite")])  # fmt: skip
    assert rc == 2
    assert "pip install 'lookahead-prune[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "r.sqlite").exists()
