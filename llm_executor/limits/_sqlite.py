"""SQLite backend: limits shared by every process on one host through one database file.

QPS/RPM use pyrate-limiter's SQLiteBucket with its file lock (``<path>.lock``); the TPM
counter and the slot leases are two small tables of our own, changed in ``BEGIN IMMEDIATE``
transactions. Timestamps are wall-clock milliseconds: every process on the host reads the
same clock (``time.monotonic`` is not comparable between processes).
Imports: ``_backend``, pyrate-limiter (+ filelock, its optional dependency), sqlite3.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from pyrate_limiter import Rate, SQLiteBucket

from ._backend import (
    TPM_BUCKET_MS,
    BackendLostError,
    RequestGate,
    tpm_decide,
    tpm_live_since,
    tpm_refund_plan,
)

__all__ = ["SQLiteBackend", "sqlite_path"]

T = TypeVar("T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS llm_executor_tpm ("
    " lane TEXT NOT NULL, bucket INTEGER NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (lane, bucket))",
    "CREATE TABLE IF NOT EXISTS llm_executor_slots ("
    " lane TEXT NOT NULL, holder TEXT NOT NULL, expires_ms INTEGER NOT NULL, PRIMARY KEY (lane, holder))",
)


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:///path`` URL (``sqlite:////abs`` is absolute, as in SQLAlchemy)."""
    return url[len("sqlite:///"):]


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


class SQLiteBackend:
    """Shared limits of one lane in a SQLite file (one host, any number of processes).

    Args:
        url: ``sqlite:///path``.
        lane_key: the namespaced lane key (``{namespace}:{provider}[:{key hash}]``).
        rates: QPS/RPM rates (may be empty).

    Raises:
        BackendLostError: the file cannot be opened or initialised.
    """

    def __init__(self, url: str, lane_key: str, rates: list[Rate], *,
                 now_ms: Callable[[], int] = _wall_ms) -> None:
        self.url = url
        self.lane_key = lane_key
        self._now_ms = now_ms
        self._lock = threading.Lock()  # one thread of this process at a time on the connections
        path = sqlite_path(url)
        if not path or not Path(path).resolve().parent.is_dir():
            raise BackendLostError(f"no directory for {path!r}")
        table = "rate_" + re.sub(r"[^A-Za-z0-9_]", "_", lane_key)
        self._bucket: SQLiteBucket | None = None
        self._gate: RequestGate | None = None
        try:
            if rates:
                self._bucket = SQLiteBucket.init_from_file(rates, table=table, db_path=path,
                                                           use_file_lock=True)
                self._file_lock: Any = self._bucket.lock  # filelock.FileLock on <path>.lock
                self._gate = RequestGate(lane_key, self._bucket, now_ms)
            # Our own connection in autocommit mode, so BEGIN IMMEDIATE is ours to issue; the
            # busy timeout makes writers of other processes queue instead of failing.
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=10.0)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            for statement in _SCHEMA:
                self._conn.execute(statement)
        except (sqlite3.Error, OSError) as exc:
            raise BackendLostError(f"{type(exc).__name__}: {exc}") from exc

    # -- QPS / RPM ---------------------------------------------------------------------------
    def _locked_gate(self, fn: Callable[[RequestGate], T]) -> T:
        assert self._gate is not None and self._bucket is not None
        with self._lock:
            try:
                # Hold the file lock while the clock is read and the item put: a token stamped
                # before a wait for the lock would carry a time older than its real start.
                with self._file_lock.acquire(poll_interval=0.001):
                    return fn(self._gate)
            except (sqlite3.Error, OSError) as exc:
                raise BackendLostError(f"{type(exc).__name__}: {exc}") from exc

    def try_acquire_request(self) -> float:
        if self._gate is None:
            return 0.0
        return self._locked_gate(lambda gate: gate.try_acquire())

    def request_wait_s(self) -> float:
        if self._gate is None:
            return 0.0
        return self._locked_gate(lambda gate: gate.wait_s())

    # -- transactions ------------------------------------------------------------------------
    def _transaction(self, fn: Callable[[sqlite3.Connection, int], T]) -> T:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(self._conn, self._now_ms())
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                raise BackendLostError(f"{type(exc).__name__}: {exc}") from exc

    # -- TPM -----------------------------------------------------------------------------------
    def _live_tpm(self, conn: sqlite3.Connection, now: int) -> dict[int, int]:
        conn.execute("DELETE FROM llm_executor_tpm WHERE lane = ? AND bucket < ?",
                      (self.lane_key, tpm_live_since(now)))
        rows = conn.execute("SELECT bucket, tokens FROM llm_executor_tpm WHERE lane = ?", (self.lane_key,))
        return {int(b): int(t) for b, t in rows}

    def _add_tokens(self, conn: sqlite3.Connection, now: int, amount: int) -> None:
        conn.execute(
            "INSERT INTO llm_executor_tpm (lane, bucket, tokens) VALUES (?, ?, ?) "
            "ON CONFLICT (lane, bucket) DO UPDATE SET tokens = tokens + excluded.tokens",
            (self.lane_key, now // TPM_BUCKET_MS, amount),
        )

    def try_reserve_tokens(self, estimate: int, limit: int) -> float:
        def reserve(conn: sqlite3.Connection, now: int) -> float:
            wait_ms = tpm_decide(self._live_tpm(conn, now), now, estimate, limit)
            if wait_ms == 0:
                self._add_tokens(conn, now, estimate)
            return wait_ms / 1000.0

        return self._transaction(reserve)

    def adjust_tokens(self, delta: int) -> None:
        def adjust(conn: sqlite3.Connection, now: int) -> None:
            live = self._live_tpm(conn, now)
            if delta > 0:
                self._add_tokens(conn, now, delta)
            for bucket, tokens in tpm_refund_plan(live, -delta).items():
                conn.execute("UPDATE llm_executor_tpm SET tokens = ? WHERE lane = ? AND bucket = ?",
                             (tokens, self.lane_key, bucket))

        self._transaction(adjust)

    def tpm_used(self) -> int:
        """Tokens counted in the window now."""
        return self._transaction(lambda conn, now: sum(self._live_tpm(conn, now).values()))

    # -- slots ---------------------------------------------------------------------------------
    def try_acquire_slot(self, holder: str, cap: int, ttl_ms: int) -> bool:
        def take(conn: sqlite3.Connection, now: int) -> bool:
            conn.execute("DELETE FROM llm_executor_slots WHERE lane = ? AND expires_ms <= ?",
                         (self.lane_key, now))
            (held,) = conn.execute("SELECT COUNT(*) FROM llm_executor_slots WHERE lane = ?",
                                   (self.lane_key,)).fetchone()
            if int(held) >= cap:
                return False
            conn.execute("INSERT OR REPLACE INTO llm_executor_slots (lane, holder, expires_ms) "
                         "VALUES (?, ?, ?)", (self.lane_key, holder, now + ttl_ms))
            return True

        return self._transaction(take)

    def renew_slots(self, holders: Iterable[str], ttl_ms: int) -> set[str]:
        wanted = list(holders)

        def renew(conn: sqlite3.Connection, now: int) -> set[str]:
            lost: set[str] = set()
            for holder in wanted:
                cur = conn.execute(
                    "UPDATE llm_executor_slots SET expires_ms = ? "
                    "WHERE lane = ? AND holder = ? AND expires_ms > ?",
                    (now + ttl_ms, self.lane_key, holder, now))
                if cur.rowcount == 0:
                    lost.add(holder)
            return lost

        return self._transaction(renew) if wanted else set()

    def release_slot(self, holder: str) -> None:
        self._transaction(lambda conn, now: conn.execute(
            "DELETE FROM llm_executor_slots WHERE lane = ? AND holder = ?", (self.lane_key, holder)))

    def slots_held(self) -> int:
        """Unexpired leases now (for tests and stats)."""
        def count(conn: sqlite3.Connection, now: int) -> int:
            row: Any = conn.execute("SELECT COUNT(*) FROM llm_executor_slots "
                                    "WHERE lane = ? AND expires_ms > ?", (self.lane_key, now)).fetchone()
            return int(row[0])

        return self._transaction(count)

    def ping(self) -> None:
        with self._lock:
            try:
                self._conn.execute("SELECT COUNT(*) FROM llm_executor_slots").fetchone()
            except sqlite3.Error as exc:
                raise BackendLostError(f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._bucket is not None:
                self._bucket.close()  # type: ignore[no-untyped-call]
