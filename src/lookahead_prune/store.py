"""The results database: one SQLite file, one row per finished run.

Each run is keyed by :func:`config_hash` of its configuration, so a sweep can ask
``store.has(key)`` to skip work already done. Every :meth:`RunStore.put` is a single
committed transaction in WAL mode with ``synchronous=FULL``: a sweep killed at any
moment (even ``kill -9``) loses no finished run and never writes one twice.

Opening is safe from many processes at once (the checks and the schema are one transaction,
retried while another process holds the file), refuses damaged files (``PRAGMA quick_check``)
and other programs' databases: ours carry ``PRAGMA application_id`` :data:`APPLICATION_ID`.
Files written before that mark existed (application_id 0) are accepted when their ``runs``
table is exactly this schema; they get the mark with the first run stored into them, never
by reading. A row whose text was damaged (its config no longer hashes to its key, its JSON
does not parse, its columns disagree with its JSON) raises a :class:`StoreError` naming the
file and the run, or is left out with a note by :meth:`RunStore.scan`.

Schema (version 1, kept in ``PRAGMA user_version``)::

    runs(key TEXT PRIMARY KEY,        -- config_hash(config)
         config TEXT, result TEXT,    -- canonical JSON
         model, dataset, method, level, keep, seed,
         test_acc_pruned, test_acc_retrained,   -- copies for filtering, NULL when absent
         wall_time REAL, code_version TEXT, created_at TEXT)  -- meta; created_at is UTC ISO 8601
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import math
import numbers
import random
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .run_keys import canonical_json, code_version, config_hash, hash_text

__all__ = [
    "APPLICATION_ID",
    "SCHEMA_VERSION",
    "RunStore",
    "StoreError",
    "code_version",
    "config_hash",
]

SCHEMA_VERSION = 1
APPLICATION_ID = int.from_bytes(b"LAPr", "big")
"""``PRAGMA application_id`` of a lookahead-prune results database (0x4C415072, "LAPr")."""
OPEN_TIMEOUT_S = 30.0
"""How long opening waits for other processes that hold the file (creating it, writing)."""

# Convenience columns: read from the config first (then the result) ...
_CONFIG_COLUMNS = ("model", "dataset", "method", "level", "seed")
# ... or from the result first (then the config): the measured keep fraction wins.
_RESULT_COLUMNS = ("keep", "test_acc_pruned", "test_acc_retrained")
_META_COLUMNS = ("key", "wall_time", "code_version", "created_at")
_INDEXED = _CONFIG_COLUMNS + _RESULT_COLUMNS + ("wall_time", "code_version", "created_at")

_SCHEMA = """
CREATE TABLE runs (
    key TEXT PRIMARY KEY NOT NULL,
    config TEXT NOT NULL,
    result TEXT NOT NULL,
    model TEXT,
    dataset TEXT,
    method TEXT,
    level NUMERIC,
    keep REAL,
    seed INTEGER,
    test_acc_pruned REAL,
    test_acc_retrained REAL,
    wall_time REAL NOT NULL,
    code_version TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX runs_experiment ON runs (model, dataset, method, keep);
CREATE INDEX runs_level ON runs (level);
CREATE INDEX runs_seed ON runs (seed);
"""

# Significant digits kept for floats in the canonical form: absorbs arithmetic noise
# such as 0.8**3 == 0.5120000000000001 so equal hyper-parameters hash equally.


class StoreError(RuntimeError):
    """The results file cannot be used (newer schema, not a results store, not SQLite)."""


@functools.cache
def _schema_columns() -> list[tuple[Any, ...]]:
    """``PRAGMA table_info(runs)`` of the schema, less the column ids."""
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript(_SCHEMA)
        return [tuple(row[1:]) for row in conn.execute("PRAGMA table_info(runs)")]
    finally:
        conn.close()


def _busy(err: sqlite3.OperationalError) -> bool:
    """Whether another connection holding the file caused *err* (worth retrying)."""
    code = getattr(err, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(err) or "busy" in str(err)


def _scalar(value: Any) -> Any:
    """Return *value* if it fits a convenience column, else None (dicts, lists, NaN)."""
    if isinstance(value, str | bool) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None
    return None


def _pick(first: Mapping[str, Any], second: Mapping[str, Any], name: str) -> Any:
    """Return the first scalar found for *name* in *first*, then *second*."""
    for source in (first, second):
        if name in source:
            value = _scalar(source[name])
            if value is not None:
                return value
    return None


class RunStore:
    """An SQLite file of finished runs, keyed by config hash; safe against kills mid-write.

    Use as a context manager or call :meth:`close`. Rows come back as flat dicts:
    config keys, then result keys (a result key wins over a config key of the same name),
    then the meta columns ``key``, ``wall_time``, ``code_version``, ``created_at``.
    """

    def __init__(self, path: str | Path, *, read_only: bool = False) -> None:
        self.path = Path(path)
        self.read_only = read_only
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a directory, not a results file")
        self._conn: sqlite3.Connection | None = None
        self._unmarked = False  # a file from before the application_id mark: set on first put
        try:
            if read_only:
                self._conn = self._connect_read_only()
                self._inspect_snapshot()
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # isolation_level=None: we issue BEGIN/COMMIT ourselves.
                self._conn = sqlite3.connect(
                    self.path, timeout=OPEN_TIMEOUT_S, isolation_level=None
                )
                self._open()
        except sqlite3.DatabaseError as err:
            self.close()
            raise StoreError(f"{self.path} is not a usable SQLite results file: {err}") from err
        except BaseException:
            self.close()
            raise

    def _connect_read_only(self) -> sqlite3.Connection:
        """Open for reading without writing a byte: works on read-only mounts and never
        changes the journal mode of a file that is not ours."""
        if not self.path.is_file():
            raise StoreError(f"no results database at {self.path}")
        uri = self.path.resolve().as_uri()
        for mode in ("mode=ro", "immutable=1"):  # immutable: a WAL file on a read-only mount
            try:
                conn = sqlite3.connect(
                    f"{uri}?{mode}", uri=True, timeout=OPEN_TIMEOUT_S, isolation_level=None
                )
                conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
                return conn
            except sqlite3.OperationalError as err:
                failure: sqlite3.Error = err
            except sqlite3.DatabaseError as err:
                raise StoreError(f"{self.path} is not a usable SQLite results file: {err}") from err
        raise StoreError(f"cannot read {self.path}: {failure}")

    def _inspect_snapshot(self) -> str:
        """Check integrity and kind in one read transaction (one consistent snapshot: another
        process may be creating the schema meanwhile) before anything is changed."""
        conn = self._db
        conn.execute("BEGIN")
        try:
            rows = conn.execute("PRAGMA quick_check(3)").fetchall()
            if rows != [("ok",)]:
                lines = [line for row in rows for line in str(row[0]).splitlines()]
                first = next((line for line in lines if not line.startswith("***")), "?")
                raise StoreError(
                    f"{self.path} is damaged (SQLite integrity check: {first}); its runs "
                    "cannot be trusted: restore it from a backup or use another path"
                )
            kind = self._inspect()
        finally:
            if conn.in_transaction:
                conn.execute("COMMIT")
        if self.read_only and kind == "fresh":
            raise StoreError(f"{self.path} is an empty SQLite file, not a results store")
        self._unmarked = kind == "unmarked"
        return kind

    def _inspect(self) -> str:
        """What the file is, read inside the caller's transaction: ``fresh`` (no tables),
        ``ours`` (marked), ``unmarked`` (our exact schema from before the mark); else refused."""
        conn = self._db
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        other = f"{self.path} is another program's SQLite database"
        if app not in (0, APPLICATION_ID):
            raise StoreError(
                f"{other} (application_id {app:#x}), not a lookahead-prune results store; "
                "choose another path"
            )
        if version == 0 and not tables:
            return "fresh"
        if version == 0:
            raise StoreError(
                f"{self.path} is an SQLite file with other tables, not a "
                "lookahead-prune results store; choose another path"
            )
        if version > SCHEMA_VERSION and app == APPLICATION_ID:
            raise StoreError(
                f"{self.path} has results schema version {version}, newer than the "
                f"{SCHEMA_VERSION} this lookahead-prune understands; upgrade lookahead-prune"
            )
        columns = [tuple(row[1:]) for row in conn.execute("PRAGMA table_info(runs)")]
        if version != SCHEMA_VERSION or columns != _schema_columns():
            if app == APPLICATION_ID:
                raise StoreError(
                    f"{self.path} is marked as a lookahead-prune results store but its runs "
                    "table is not the one of schema version 1 (damaged or edited by hand)"
                )
            raise StoreError(
                f"{other} (user_version {version}, tables {sorted(tables)}), not a "
                "lookahead-prune results store; choose another path"
            )
        return "ours" if app == APPLICATION_ID else "unmarked"

    def _open(self) -> None:
        """Check the file, set durability pragmas and create the schema, as one atomic step.

        Many processes may open one fresh file at once. Switching it to WAL needs the
        whole file, and SQLite refuses at once (no busy wait) when another process holds
        it; the checks and the schema run inside one ``BEGIN IMMEDIATE``. So the whole
        sequence is retried while another process holds the file, up to OPEN_TIMEOUT_S.
        """
        conn = self._db
        deadline = time.monotonic() + OPEN_TIMEOUT_S
        while True:
            try:
                # Refuse a damaged or foreign file before changing a byte of it (WAL).
                self._inspect_snapshot()
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    kind = self._inspect()  # again: another process may have been first
                    if kind == "fresh":
                        for statement in _SCHEMA.split(";"):
                            if statement.strip():
                                conn.execute(statement)
                        conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                self._unmarked = kind == "unmarked"
                return
            except sqlite3.OperationalError as err:
                if not _busy(err) or time.monotonic() > deadline:
                    raise
            time.sleep(random.uniform(0.002, 0.02))  # jitter: the racers do not collide again

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the results store {self.path} is closed")
        return self._conn

    def close(self) -> None:
        """Close the connection; further use raises StoreError. Safe to call twice."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __len__(self) -> int:
        return self._db.execute("SELECT count(*) FROM runs").fetchone()[0]

    def has(self, key: str) -> bool:
        """Whether a finished run with this config hash is stored."""
        row = self._db.execute("SELECT 1 FROM runs WHERE key = ?", (key,)).fetchone()
        return row is not None

    def get(self, key: str) -> dict[str, Any] | None:
        """Return the flat dict of the run with this config hash, or None."""
        rows = self._select(f"SELECT rowid, {_SELECTED} FROM runs WHERE key = ?", (key,))
        if not rows:
            return None
        try:
            return self._flatten(rows[0])
        except _Damaged as damage:
            raise self._damaged_error(rows[0][0], key, damage) from None

    def _writable(self) -> None:
        if self.read_only:
            raise StoreError(f"the results store {self.path} was opened read-only")

    def put(
        self,
        config: Mapping[str, Any],
        result: Mapping[str, Any],
        *,
        wall_time: float,
        code_version: str,
    ) -> bool:
        """Store one finished run in a single transaction; False if its config was already stored.

        The existing row is never overwritten: a rerun of a sweep adds only missing runs.
        """
        self._writable()
        config_json = canonical_json(config)
        if not isinstance(result, Mapping):
            raise TypeError(f"result must be a mapping, got {type(result).__name__}")
        for name, part in (("config", config), ("result", result)):
            clash = sorted(set(part) & set(_META_COLUMNS))
            if clash:
                raise ValueError(f"{name} uses reserved name(s) {clash}; rename them")
        if not isinstance(wall_time, numbers.Real) or not math.isfinite(wall_time):
            raise ValueError(f"wall_time must be a finite number of seconds, got {wall_time!r}")
        if wall_time < 0:
            raise ValueError(f"wall_time must be >= 0, got {wall_time!r}")
        if not isinstance(code_version, str) or not code_version:
            raise ValueError("code_version must be a non-empty string (see code_version())")
        try:
            result_json = json.dumps(dict(result), sort_keys=True, separators=(",", ":"))
        except TypeError as err:
            raise TypeError(f"result is not JSON-serializable: {err}") from err

        values: dict[str, Any] = {"key": hash_text(config_json)}
        values["config"] = config_json
        values["result"] = result_json
        for name in _CONFIG_COLUMNS:
            values[name] = _pick(config, result, name)
        for name in _RESULT_COLUMNS:
            values[name] = _pick(result, config, name)
        values["wall_time"] = float(wall_time)
        values["code_version"] = code_version
        values["created_at"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")

        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        conn = self._db
        conn.execute("BEGIN IMMEDIATE")
        try:
            cursor = conn.execute(
                f"INSERT INTO runs ({columns}) VALUES ({marks}) ON CONFLICT(key) DO NOTHING",
                tuple(values.values()),
            )
            inserted = cursor.rowcount == 1
            if inserted and self._unmarked:  # the file changes anyway: mark it as ours
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute("COMMIT")
            self._unmarked = self._unmarked and not inserted
        except sqlite3.OperationalError as err:  # disk full, read-only file, locked too long
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(
                f"could not store a run in {self.path}: {err}; fix that and rerun (runs "
                "already stored are kept, this one is recomputed)"
            ) from err
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return inserted

    def configs(self) -> list[tuple[str, dict[str, Any]]]:
        """Every stored run's key and configuration (as hashed), in insertion order.

        A damaged configuration raises a :class:`StoreError` naming the file and the run.
        """
        out = []
        rows = self._select("SELECT rowid, key, config FROM runs ORDER BY rowid")
        for rowid, key, config in rows:
            try:
                out.append((key, self._config(key, config)))
            except _Damaged as damage:
                raise self._damaged_error(rowid, key, damage) from None
        return out

    def runs(self, **filters: Any) -> list[dict[str, Any]]:
        """Return stored runs (in insertion order) whose fields equal every filter.

        A filter value may be a list/tuple/set meaning "any of these"; floats match within
        1e-9 relative tolerance. Indexed columns are filtered in SQL, other names on the
        flat dict (a run lacking the name does not match unless the value is None). A
        damaged row raises a :class:`StoreError` naming the file and the run; :meth:`scan`
        leaves it out instead.
        """
        rows, problems = self.scan(**filters)
        if problems:
            more = f" (and {len(problems) - 1} more damaged runs)" if len(problems) > 1 else ""
            raise StoreError(problems[0] + more)
        return rows

    def scan(self, **filters: Any) -> tuple[list[dict[str, Any]], list[str]]:
        """Like :meth:`runs`, but a damaged row is left out and described in one line (file,
        run key, row, what is wrong and how to get rid of it) instead of raising."""
        where: list[str] = []
        params: list[Any] = []
        rest: dict[str, list[Any]] = {}
        for name, wanted in filters.items():
            options = list(wanted) if isinstance(wanted, list | tuple | set) else [wanted]
            if not options:
                raise ValueError(f"filter {name}= got an empty collection; nothing can match")
            if name in _INDEXED:
                clauses = []
                for option in options:
                    if option is None:
                        clauses.append(f"{name} IS NULL")
                    elif isinstance(option, float):
                        clauses.append(f"abs({name} - ?) <= ?")
                        params += [option, 1e-9 * max(1.0, abs(option))]
                    else:
                        clauses.append(f"{name} = ?")
                        params.append(option)
                where.append("(" + " OR ".join(clauses) + ")")
            else:
                rest[name] = options
        # Every row is read and checked, and the filters are evaluated on its checked columns
        # (NOT INDEXED: never on an index, which quick_check does not compare with the rows):
        # a damaged row is reported even where its damage would have hidden it from a filter.
        hit = " AND ".join(where) or "1"
        sql = f"SELECT rowid, {_SELECTED}, {hit} FROM runs NOT INDEXED"
        problems: list[str] = []
        try:
            found = self._db.execute(sql + " ORDER BY rowid", params).fetchall()
        except sqlite3.DatabaseError as err:  # one unreadable record: read row by row
            if isinstance(err, sqlite3.OperationalError) and _busy(err):
                raise StoreError(f"could not read {self.path}: {err}") from err
            found = []
            for (rowid,) in self._select("SELECT rowid FROM runs NOT INDEXED ORDER BY rowid"):
                try:
                    found += self._db.execute(sql + " WHERE rowid = ?", [*params, rowid])
                except sqlite3.DatabaseError as row_err:
                    problems.append(self._damage_line(rowid, None, _one_line(row_err)))
        rows = []
        for *row, wanted in found:
            try:
                flat = self._flatten(tuple(row))
            except _Damaged as damage:
                problems.append(self._damage_line(row[0], row[3], str(damage)))
                continue
            if wanted and all(_matches(flat.get(k), v) for k, v in rest.items()):
                rows.append(flat)
        return rows, problems

    def _select(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of a query; an unreadable file raises a one-line StoreError naming it."""
        try:
            return self._db.execute(sql, tuple(params)).fetchall()
        except sqlite3.DatabaseError as err:
            raise StoreError(f"could not read {self.path}: {_one_line(err)}") from err

    def _damage_line(self, rowid: Any, key: Any, why: str) -> str:
        run = f"run {key}" if isinstance(key, str) else "a run"
        return (
            f"{self.path}: {run} (row {rowid}) is damaged: {why}; restore the file from a "
            f"backup, or delete the row (DELETE FROM runs WHERE rowid = {rowid}) so a sweep "
            "recomputes it"
        )

    def _damaged_error(self, rowid: Any, key: Any, damage: _Damaged) -> StoreError:
        return StoreError(self._damage_line(rowid, key, str(damage)))

    @staticmethod
    def _config(key: Any, config_json: Any) -> dict[str, Any]:
        """The configuration of a row, checked against its key (the key hashes its text)."""
        if not isinstance(config_json, str):
            raise _Damaged(f"its config is {type(config_json).__name__}, not text")
        if not isinstance(key, str) or hash_text(config_json) != key:
            raise _Damaged("its config no longer hashes to its key")
        try:
            config = json.loads(config_json)
        except ValueError as err:
            raise _Damaged(f"its config is not valid JSON: {err}") from None
        if not isinstance(config, dict):
            raise _Damaged("its config is not a JSON object")
        return config

    @classmethod
    def _flatten(cls, row: tuple[Any, ...]) -> dict[str, Any]:
        """The flat dict of a row, or _Damaged when its parts disagree."""
        _, config_json, result_json, key, wall_time, version, created_at, *copies = row
        config = cls._config(key, config_json)
        if not isinstance(result_json, str):
            raise _Damaged(f"its result is {type(result_json).__name__}, not text")
        try:
            result = json.loads(result_json)
        except ValueError as err:
            raise _Damaged(f"its result is not valid JSON: {err}") from None
        if not isinstance(result, dict):
            raise _Damaged("its result is not a JSON object")
        if not (
            isinstance(wall_time, int | float)
            and isinstance(version, str)
            and isinstance(created_at, str)
        ):
            raise _Damaged("its wall_time, code_version or created_at column is damaged")
        for name, stored in zip(_CONFIG_COLUMNS + _RESULT_COLUMNS, copies, strict=True):
            if name in _CONFIG_COLUMNS:
                expected = _pick(config, result, name)
            else:
                expected = _pick(result, config, name)
            if not _same(stored, expected):
                raise _Damaged(f"its {name} column holds {stored!r} but its JSON {expected!r}")
        flat: dict[str, Any] = {**config, **result}
        flat.update(key=key, wall_time=wall_time, code_version=version, created_at=created_at)
        return flat


class _Damaged(Exception):
    """A row whose stored parts disagree (the message says how)."""


# The columns a row is read with: the JSON, the meta columns, then the copies to check.
_READ = ("config", "result", "key", "wall_time", "code_version", "created_at")
_SELECTED = ", ".join([*_READ, *_CONFIG_COLUMNS, *_RESULT_COLUMNS])


def _same(stored: Any, expected: Any) -> bool:
    """Whether a convenience column agrees with the JSON it was copied from (SQLite's column
    affinity may have stored a number as text or text as a number; floats within 1e-9)."""
    if stored is None or expected is None:
        return stored is None and expected is None
    if stored == expected:
        return True
    try:
        a, b = float(stored), float(expected)
    except (TypeError, ValueError):
        return False
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _matches(value: Any, options: Iterable[Any]) -> bool:
    """Whether *value* equals one of *options* (floats within a relative 1e-9; bools only bools)."""
    for option in options:
        if isinstance(option, bool) or isinstance(value, bool):
            if value is option:
                return True
        elif isinstance(option, float) and isinstance(value, numbers.Real):
            if math.isclose(value, option, rel_tol=1e-9, abs_tol=1e-12):
                return True
        elif value == option:
            return True
    return False
