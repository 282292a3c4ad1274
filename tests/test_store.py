"""Tests for the results database: hashing, roundtrip, no duplicates, filters, kill safety."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import lookahead_prune
from lookahead_prune.store import (
    SCHEMA_VERSION,
    RunStore,
    StoreError,
    code_version,
    config_hash,
)

SRC = Path(lookahead_prune.__file__).resolve().parent.parent


def make_config(i: int, method: str = "lap", model: str = "fcn") -> dict:
    return {"model": model, "dataset": "mnist", "method": method, "level": i % 7, "seed": i}


def make_result(i: int) -> dict:
    return {"keep": 0.5 ** (i % 7), "test_acc_pruned": 0.5 + i / 1000, "test_acc_retrained": 0.9}


# --- config_hash --------------------------------------------------------------------------


def test_config_hash_is_canonical() -> None:
    a = {"lr": 0.1, "model": "fcn", "keep": {"0": 0.5, "2": 0.25}, "sizes": (300, 100)}
    b = {"sizes": [300, 100], "keep": {"2": 0.25, "0": 0.5}, "model": "fcn", "lr": 0.1}
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16
    int(config_hash(a), 16)  # hex
    # Float noise below 12 significant digits does not change the key; real changes do.
    assert config_hash({"keep": 0.8**3}) == config_hash({"keep": 0.512})
    assert config_hash({"keep": 0.512}) != config_hash({"keep": 0.513})
    assert config_hash({"seed": 1}) != config_hash({"seed": 2})
    assert config_hash({"x": -0.0}) == config_hash({"x": 0.0})


def test_config_hash_is_stable_across_versions() -> None:
    # Pinned value: changing canonicalization would orphan every stored run.
    assert (
        config_hash({"b": 1.5, "a": [1, "x", None, True]})
        == (hashlib.sha256(b'{"a":[1,"x",null,true],"b":1.5}').hexdigest()[:16])
    )


@pytest.mark.parametrize(
    ("config", "error"),
    [
        ({"lr": float("nan")}, ValueError),
        ({"lr": float("inf")}, ValueError),
        ({1: "a"}, TypeError),
        ({"path": Path("/tmp")}, TypeError),
        ([("a", 1)], TypeError),
    ],
)
def test_config_hash_rejects_bad_input(config: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        config_hash(config)  # type: ignore[arg-type]


# --- RunStore -----------------------------------------------------------------------------


def test_put_get_has_roundtrip(tmp_path: Path) -> None:
    config, result = make_config(3), make_result(3)
    key = config_hash(config)
    with RunStore(tmp_path / "runs.db") as store:
        assert not store.has(key)
        assert store.get(key) is None
        assert store.put(config, result, wall_time=12.5, code_version="abc123") is True
        assert store.has(key)
        row = store.get(key)
    assert row is not None
    for name, value in {**config, **result}.items():
        assert row[name] == value
    assert row["key"] == key
    assert row["wall_time"] == 12.5
    assert row["code_version"] == "abc123"
    assert row["created_at"].endswith("+00:00")

    # Persisted and readable by a fresh connection; convenience columns filled.
    with RunStore(tmp_path / "runs.db") as store:
        assert store.get(key) == row
    with sqlite3.connect(tmp_path / "runs.db") as raw:
        cols = raw.execute(
            "SELECT model, dataset, method, level, keep, seed, test_acc_pruned, "
            "test_acc_retrained FROM runs"
        ).fetchone()
    assert cols == ("fcn", "mnist", "lap", 3, 0.125, 3, result["test_acc_pruned"], 0.9)


def test_duplicate_put_returns_false_and_keeps_first(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        assert store.put(make_config(1), make_result(1), wall_time=1.0, code_version="v")
        # Same config in another key order with a different result: not stored again.
        shuffled = dict(reversed(list(make_config(1).items())))
        assert not store.put(shuffled, {"test_acc_retrained": 0.1}, wall_time=2, code_version="w")
        assert len(store) == 1
        row = store.get(config_hash(make_config(1)))
        assert row is not None
        assert row["test_acc_retrained"] == 0.9
        assert row["code_version"] == "v"


def test_runs_filters(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        for i in range(6):
            method = "mp" if i % 2 else "lap"
            model = "conv6" if i >= 4 else "fcn"
            store.put(make_config(i, method, model), make_result(i), wall_time=1, code_version="v")
        # A config with an extra, non-indexed field and a keep given as a per-layer dict.
        extra = {**make_config(9), "order": "forward", "keep": {"0": 0.5}}
        store.put(extra, {"test_acc_retrained": 0.8}, wall_time=1, code_version="v")

        assert [r["seed"] for r in store.runs()] == [0, 1, 2, 3, 4, 5, 9]
        assert [r["seed"] for r in store.runs(model="fcn", method="lap")] == [0, 2, 9]
        assert [r["seed"] for r in store.runs(method=["mp", "nothing"])] == [1, 3, 5]
        assert [r["seed"] for r in store.runs(keep=0.5**2)] == [2]
        assert [r["seed"] for r in store.runs(keep=0.25 + 1e-12)] == [2]  # float tolerance
        assert [r["seed"] for r in store.runs(order="forward")] == [9]
        assert store.runs(order="backward") == []
        assert [r["seed"] for r in store.runs(keep=None)] == [9]  # dict keep: no column value
        assert store.runs(model="fcn", seed=4) == []
        with pytest.raises(ValueError, match="empty"):
            store.runs(method=[])


def test_put_validates_input(tmp_path: Path) -> None:
    with RunStore(tmp_path / "runs.db") as store:
        ok = {"wall_time": 1.0, "code_version": "v"}
        with pytest.raises(ValueError, match="reserved"):
            store.put({"key": 1}, {}, **ok)
        with pytest.raises(ValueError, match="reserved"):
            store.put({"a": 1}, {"wall_time": 3}, **ok)
        with pytest.raises(TypeError, match="JSON"):
            store.put({"a": 1}, {"obj": object()}, **ok)
        with pytest.raises(ValueError, match="wall_time"):
            store.put({"a": 1}, {}, wall_time=float("nan"), code_version="v")
        with pytest.raises(ValueError, match="code_version"):
            store.put({"a": 1}, {}, wall_time=1.0, code_version="")
        assert len(store) == 0


def test_schema_version_and_foreign_files(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    RunStore(path).close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        raw.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer"):
        RunStore(path)

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a lookahead-prune results store"):
        RunStore(other)

    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable SQLite"):
        RunStore(garbage)


def test_closed_store_raises(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "runs.db")
    store.close()
    store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        store.has("x")


def test_code_version_uses_git_or_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    code_version.cache_clear()
    version = code_version()
    assert version
    assert " " not in version
    assert "\n" not in version

    monkeypatch.setenv("PATH", "")  # no git to run: fall back to the package version
    code_version.cache_clear()
    try:
        assert code_version() == lookahead_prune.__version__
    finally:
        monkeypatch.undo()
        code_version.cache_clear()
    assert code_version() == version


# --- crash safety -------------------------------------------------------------------------

WRITER = textwrap.dedent(
    """
    import sys
    from lookahead_prune.store import RunStore
    path, n = sys.argv[1], int(sys.argv[2])
    store = RunStore(path)
    for i in range(n):
        config = {"model": "fcn", "method": "lap", "seed": i, "pad": "x" * (i % 50) * 100}
        result = {"test_acc_retrained": i / n, "payload": list(range(i % 200))}
        store.put(config, result, wall_time=float(i), code_version="kill-test")
        print(i, flush=True)  # acknowledged only after the transaction committed
    """
)
N_RUNS = 400


def expected(i: int) -> tuple[dict, dict]:
    config = {"model": "fcn", "method": "lap", "seed": i, "pad": "x" * (i % 50) * 100}
    result = {"test_acc_retrained": i / N_RUNS, "payload": list(range(i % 200))}
    return config, result


def _run_writer_and_kill(path: Path, after: int, delay: float) -> list[int]:
    """Start a sweep writer, SIGKILL it *delay* s after its *after*-th acknowledged put."""
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), str(N_RUNS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    acknowledged: list[int] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    while len(acknowledged) < after and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        acknowledged.append(int(line))
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)  # mid-sweep, most likely inside a put
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert len(acknowledged) == after, "writer did not get going"
    return acknowledged


def test_sigkill_mid_sweep_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    acknowledged: set[int] = set()
    # Killed three times at different points; each restart resumes the same sweep.
    for after, delay in ((25, 0.0), (60, 0.001), (90, 0.003)):
        acknowledged |= set(_run_writer_and_kill(path, after, delay))

        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            n_keys, n_distinct = raw.execute(
                "SELECT count(*), count(DISTINCT key) FROM runs"
            ).fetchone()
        assert n_keys == n_distinct
        assert n_keys < N_RUNS, "the writer finished before it was killed; the test proved nothing"

        with RunStore(path) as store:
            rows = store.runs()
        seeds = sorted(r["seed"] for r in rows)
        # Every acknowledged run survived, and what is stored is a complete prefix.
        assert acknowledged <= set(seeds)
        assert seeds == list(range(len(seeds)))
        for row in rows:
            config, result = expected(row["seed"])
            assert row["key"] == config_hash(config)
            assert {k: row[k] for k in config} == config
            assert {k: row[k] for k in result} == result

    # The final rerun of the sweep adds only the missing runs.
    with RunStore(path) as store:
        done = len(store)
        added = [
            store.put(*expected(i), wall_time=0.0, code_version="rerun") for i in range(N_RUNS)
        ]
        assert added == [i >= done for i in range(N_RUNS)]
        assert len(store) == N_RUNS
        assert sorted(r["seed"] for r in store.runs()) == list(range(N_RUNS))


# --- opening a fresh database from many processes at once ---------------------------------

# Loads store.py by path, as a module of a bare package over its folder (no torch import from
# the real __init__: starts in milliseconds), then for each round waits for a "go" line on stdin
# and opens that round's fresh database; prints "ok" or the error.
OPENER = textwrap.dedent(
    """
    import importlib.util, os, sys, types
    package = types.ModuleType("lap_pkg")
    package.__path__ = [os.path.dirname(sys.argv[1])]
    sys.modules["lap_pkg"] = package
    spec = importlib.util.spec_from_file_location("lap_pkg.store", sys.argv[1])
    store = importlib.util.module_from_spec(spec)
    sys.modules["lap_pkg.store"] = store
    spec.loader.exec_module(store)
    print("ready", flush=True)
    for path in sys.argv[2:]:
        sys.stdin.readline()
        try:
            store.RunStore(path).close()
            print("ok", flush=True)
        except Exception as err:
            print(f"{type(err).__name__}: {err}".replace("\\n", " "), flush=True)
    """
)


def test_many_processes_opening_a_fresh_database_at_once_all_succeed(tmp_path: Path) -> None:
    n_procs, n_rounds = 16, 12
    paths = [str(tmp_path / f"fresh-{r}.sqlite") for r in range(n_rounds)]
    store_py = str(SRC / "lookahead_prune" / "store.py")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", OPENER, store_py, *paths],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n_procs)
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline() == "ready\n"
        failures = []
        for path in paths:
            for p in procs:  # release them all at once
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            answers = [p.stdout.readline().strip() for p in procs if p.stdout is not None]
            failures += [f"{Path(path).name}: {a}" for a in answers if a != "ok"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert not failures, f"{len(failures)} of {n_procs * n_rounds} opens failed: {failures[:5]}"
    for path in paths:
        with RunStore(path, read_only=True) as store:
            assert len(store) == 0


# --- damaged files and rows ---------------------------------------------------------------


def _fill(path: Path, n: int = 8) -> list[str]:
    with RunStore(path) as store:
        for i in range(n):
            store.put(make_config(i), make_result(i), wall_time=1.0, code_version="v")
        keys = [key for key, _ in store.configs()]
    with sqlite3.connect(path) as raw:  # fold the WAL in: the file alone holds everything
        raw.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return keys


def test_a_damaged_row_names_the_file_and_the_run_and_scan_skips_it(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    keys = _fill(path)
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE runs SET result = '{\"keep\": 0.5,, }' WHERE key = ?", (keys[1],))
        raw.execute("UPDATE runs SET result = x'00ff' WHERE key = ?", (keys[2],))
        config = raw.execute("SELECT config FROM runs WHERE key = ?", (keys[3],)).fetchone()[0]
        raw.execute(
            "UPDATE runs SET config = ? WHERE key = ?",
            (config.replace('"seed":3', '"seed":8'), keys[3]),
        )
        raw.execute("UPDATE runs SET test_acc_pruned = 0.25 WHERE key = ?", (keys[4],))
        raw.execute(  # the JSON changed, its column copy did not
            "UPDATE runs SET result = replace(result, '0.9', '0.1') WHERE key = ?", (keys[5],)
        )
    with RunStore(path, read_only=True) as store:
        with pytest.raises(StoreError) as info:
            store.runs()
        message = str(info.value)
        assert str(path) in message and keys[1] in message and "\n" not in message
        assert "not valid JSON" in message and "4 more damaged runs" in message
        with pytest.raises(StoreError, match=f"{keys[2]}.*result is bytes, not text"):
            store.get(keys[2])
        with pytest.raises(StoreError, match=f"{keys[3]}.*no longer hashes to its key"):
            store.configs()
        rows, problems = store.scan()
        assert [r["key"] for r in rows] == [keys[i] for i in (0, 6, 7)]
        assert [p.split(" (row")[0] for p in problems] == [
            f"{path}: run {keys[i]}" for i in (1, 2, 3, 4, 5)
        ]
        assert "test_acc_pruned column holds 0.25" in problems[3]
        assert "test_acc_retrained column holds 0.9 but its JSON 0.1" in problems[4]
        assert all("DELETE FROM runs WHERE rowid" in p and "\n" not in p for p in problems)
        # A filter never hides a damaged row: it is reported whatever it would have matched.
        rows, problems = store.scan(seed=[0, 7])
        assert [r["seed"] for r in rows] == [0, 7] and len(problems) == 5


def _flip_outcome(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``lap report`` and a sweep's opening make of a file: every outcome must be a
    one-line error, a report with one line per skipped run, or the undamaged report."""
    from lookahead_prune.cli import main

    capsys.readouterr()
    rc = main(["report", "--db", str(path), "--format", "csv"])  # every stored field
    out, err = capsys.readouterr()
    lines = err.splitlines()
    if rc == 2:
        assert len(lines) == 1 and lines[0].startswith("lap report: error: "), err
        assert str(path) in err, err
        outcome = "error"
    else:
        assert rc == 0, err
        assert all(line.startswith("lap report: skipped a run: ") for line in lines), err
        assert all(str(path) in line for line in lines), err
        outcome = "skipped" if lines else out
    try:  # what a sweep does first: open for writing, ask what is stored, store a run
        with RunStore(path) as store:
            store.runs()
            store.put({"fresh": 1}, {"keep": 0.5}, wall_time=0.0, code_version="v")
    except StoreError as error:
        assert "\n" not in str(error) and str(path) in str(error), error
    return outcome


def test_bytes_flipped_anywhere_give_one_line_errors_or_warnings(tmp_path, capsys) -> None:
    clean = tmp_path / "clean.sqlite"
    _fill(clean, 40)
    data = clean.read_bytes()
    assert _flip_outcome(clean, capsys) not in ("error", "skipped")
    _fill(clean := tmp_path / "clean2.sqlite", 40)
    undamaged = _flip_outcome(clean, capsys)
    page = 4096
    # The header's fields, then spots in every page: its header, cell pointers and cells.
    positions = sorted(
        {*range(16, 100, 4)}
        | {p + d for p in range(0, len(data), page) for d in (100 if p == 0 else 0, 5, 9)}
        | {p - d for p in range(page, len(data) + 1, page) for d in (1, 37, 300, 1000)}
        | set(range(0, len(data), 1009))
    )
    outcomes: dict[str, int] = {}
    for i, position in enumerate(positions):
        damaged = bytearray(data)
        damaged[position] ^= 0x55
        path = tmp_path / f"flip-{i}.sqlite"
        path.write_bytes(bytes(damaged))
        outcome = _flip_outcome(path, capsys)
        if outcome not in ("error", "skipped"):
            outcome = "unchanged" if outcome == undamaged else f"CHANGED at {position}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert set(outcomes) <= {"error", "skipped", "unchanged"}, outcomes
    assert outcomes.get("error", 0) > 5 and outcomes.get("skipped", 0) > 5, outcomes


# --- whose database is it -----------------------------------------------------------------

COMMITTED = Path(__file__).resolve().parent.parent / "results"


def test_databases_are_marked_and_other_programs_databases_refused(tmp_path: Path) -> None:
    from lookahead_prune.store import APPLICATION_ID

    ours = tmp_path / "ours.sqlite"
    RunStore(ours).close()
    with sqlite3.connect(ours) as raw:
        assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID

    # Another tool's database that happens to have a runs table and user_version 1.
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT, score REAL)")
        raw.execute("INSERT INTO runs (name, score) VALUES ('a', 1.0)")
        raw.execute("PRAGMA user_version = 1")
    before = other.read_bytes()
    for read_only in (True, False):
        with pytest.raises(StoreError, match="another program's SQLite database") as info:
            RunStore(other, read_only=read_only)
        assert "\n" not in str(info.value) and str(other) in str(info.value)
    assert other.read_bytes() == before  # not even switched to WAL

    # Our exact schema under another program's application_id: refused as well.
    marked = tmp_path / "marked.sqlite"
    RunStore(marked).close()
    with sqlite3.connect(marked) as raw:
        raw.execute("PRAGMA application_id = 12345")
    with pytest.raises(StoreError, match=r"another program's SQLite database \(application_id"):
        RunStore(marked, read_only=True)


@pytest.mark.skipif(not (COMMITTED / "fmnist.sqlite").is_file(), reason="no committed results")
def test_databases_from_before_the_mark_work_and_are_marked_only_when_written(tmp_path) -> None:
    import shutil

    from lookahead_prune.store import APPLICATION_ID

    path = tmp_path / "fmnist.sqlite"
    shutil.copyfile(COMMITTED / "fmnist.sqlite", path)
    with sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True) as raw:
        assert raw.execute("PRAGMA application_id").fetchone()[0] == 0
    before = path.read_bytes()
    with RunStore(path, read_only=True) as store:
        rows = store.runs()
        assert len(rows) > 100
    with RunStore(path) as store:  # a sweep over what is all stored already
        config = store.configs()[0][1]
        assert not store.put(config, {}, wall_time=0.0, code_version="v")  # stored already
        assert all(store.has(r["key"]) for r in rows)
    assert path.read_bytes() == before  # reading never writes, not even the mark
    with RunStore(path) as store:
        assert store.put({"new": 1}, {"keep": 0.5}, wall_time=0.0, code_version="v")
        assert store._db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    with RunStore(path, read_only=True) as store:
        assert len(store.runs()) == len(rows) + 1
