"""Claims: sweeps sharing one results database split the work instead of repeating it.

Before computing a run (or training a dense model) a sweep claims its key in a ``claims``
table beside the runs; another sweep skips what is claimed and comes back to it later. A
background thread renews the claims' heartbeat; a claim whose heartbeat is older than
:data:`STALE_S`, or whose owner is a process on this machine that no longer exists (a
sweep killed with ``kill -9``), is taken over. Claims are hints: the runs table stays the
only record of what is done, and a run stored twice is still stored once.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

__all__ = ["HEARTBEAT_S", "STALE_S", "Claims", "live_claims"]

HEARTBEAT_S = 20.0
"""Seconds between heartbeats of a live sweep's claims."""
STALE_S = 90.0
"""A claim not renewed for this long belongs to a sweep that died (or a machine that left)."""

_SCHEMA = """CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY NOT NULL, owner TEXT NOT NULL, heartbeat REAL NOT NULL)"""


def _owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def live_claims(db: str | Path) -> list[str]:
    """The keys that live sweeps (any owner) hold on the database at ``db``, read without
    writing; none when it has no claims table (no sweep ever claimed there)."""
    try:
        conn = sqlite3.connect(f"{Path(db).resolve().as_uri()}?mode=ro", uri=True, timeout=30.0)
    except sqlite3.OperationalError:
        return []
    try:
        rows = conn.execute("SELECT key, owner, heartbeat FROM claims").fetchall()
    except sqlite3.OperationalError as err:
        if "no such table" in str(err):
            return []
        raise
    finally:
        conn.close()
    now = time.time()
    return [key for key, owner, beat in rows if not Claims._dead(owner, beat, now)]


class Claims:
    """This process's claims on keys of the results database at ``db``."""

    def __init__(self, db: str | Path, *, heartbeat: float = HEARTBEAT_S) -> None:
        self.owner = _owner_id()
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            Path(db), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        self._conn.execute(_SCHEMA)
        self._stop = threading.Event()
        self._every = heartbeat
        self._thread = threading.Thread(target=self._beat, name="claims-heartbeat", daemon=True)
        self._thread.start()

    def take(self, keys: Iterable[str]) -> list[str]:
        """Claim every key no live sweep holds; the keys that are now this process's."""
        taken = []
        now = time.time()
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for key in keys:
                    row = self._conn.execute(
                        "SELECT owner, heartbeat FROM claims WHERE key = ?", (key,)
                    ).fetchone()
                    if row is None or row[0] == self.owner or self._dead(*row, now):  # type: ignore[call-arg]
                        self._conn.execute(
                            "INSERT INTO claims (key, owner, heartbeat) VALUES (?, ?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET owner = ?, heartbeat = ?",
                            (key, self.owner, now, self.owner, now),
                        )
                        taken.append(key)
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        return taken

    def release(self, keys: Iterable[str]) -> None:
        """Give up this process's claims on ``keys`` (done or abandoned)."""
        with self._lock:
            self._conn.executemany(
                "DELETE FROM claims WHERE key = ? AND owner = ?",
                [(key, self.owner) for key in keys],
            )

    def held_by_others(self) -> int:
        """How many live claims other sweeps hold (for a 'waiting' message)."""
        now = time.time()
        with self._lock:
            rows = self._conn.execute("SELECT owner, heartbeat FROM claims").fetchall()
        return sum(
            1 for owner, beat in rows if owner != self.owner and not self._dead(owner, beat, now)
        )

    @staticmethod
    def _dead(owner: str, heartbeat: float, now: float) -> bool:
        if now - heartbeat > STALE_S:
            return True
        host, _, rest = owner.partition(":")
        pid = rest.partition(":")[0]
        return host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid))

    def _beat(self) -> None:
        while not self._stop.wait(self._every):
            try:
                with self._lock:
                    self._conn.execute(
                        "UPDATE claims SET heartbeat = ? WHERE owner = ?", (time.time(), self.owner)
                    )
            except sqlite3.Error:  # a busy database: the next beat tries again
                continue

    def close(self) -> None:
        """Stop the heartbeat and drop every claim this process still holds."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._conn.execute("DELETE FROM claims WHERE owner = ?", (self.owner,))
            self._conn.close()

    def __enter__(self) -> Claims:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
