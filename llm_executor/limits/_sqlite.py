"""SQLite backend: limits shared by every process on one host through one database file.

Three small tables (rate entries, TPM buckets, slot leases), each change one ``BEGIN IMMEDIATE``
transaction that reads the rows it needs and applies ``_backend.py``'s pure functions to them.

Clock: the host's monotonic clock (``CLOCK_MONOTONIC`` on Linux, shared by every process of the
host and never stepped by NTP), so a wall-clock step or slew changes no window. It restarts at
boot; the database remembers the boot it was written in and starts empty after a reboot.

Every wait is bounded: another process holding the database's write lock (a writer of ours, or
any other program) makes a call fail after ``BUSY_TIMEOUT_S`` with ``BackendLostError``, which
``LaneLimiter`` turns into the configured failure policy; threads of this process queue on the
connection for at most as long.
Imports: ``_backend``, sqlite3.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ._backend import (
    LEARNED_TTL_MS,
    TPM_BUCKET_MS,
    Admitted,
    Ask,
    BackendLostError,
    LearnedRecord,
    Rate,
    Verdict,
    admit_decide,
    learned_decide,
    rate_horizon_ms,
    rate_wait_ms,
    tpm_live_since,
    tpm_refund_plan,
)

__all__ = ["BUSY_TIMEOUT_S", "SQLiteBackend", "sqlite_path"]

T = TypeVar("T")

# The longest a call waits for the database's lock (or for another thread of this process on
# the connection) before the store counts as lost.
BUSY_TIMEOUT_S = 2.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS llm_executor_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS llm_executor_rate ("
    " lane TEXT NOT NULL, member TEXT NOT NULL, start_ms INTEGER NOT NULL, PRIMARY KEY (lane, member))",
    "CREATE INDEX IF NOT EXISTS llm_executor_rate_start ON llm_executor_rate (lane, start_ms)",
    "CREATE TABLE IF NOT EXISTS llm_executor_tpm ("
    " lane TEXT NOT NULL, bucket INTEGER NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (lane, bucket))",
    "CREATE TABLE IF NOT EXISTS llm_executor_slots ("
    " lane TEXT NOT NULL, holder TEXT NOT NULL, expires_ms INTEGER NOT NULL, PRIMARY KEY (lane, holder))",
    "CREATE TABLE IF NOT EXISTS llm_executor_learned ("
    " lane TEXT PRIMARY KEY, version INTEGER NOT NULL, changed_ms INTEGER NOT NULL, data TEXT NOT NULL)",
)
_TABLES = ("llm_executor_rate", "llm_executor_tpm", "llm_executor_slots", "llm_executor_learned")


def sqlite_path(url: str) -> str:
    """The file of a ``sqlite:///path`` URL (``sqlite:////abs`` is absolute, as in SQLAlchemy)."""
    return url[len("sqlite:///"):]


def _host_ms() -> int:
    return time.monotonic_ns() // 1_000_000


def _boot_id() -> str:
    """Names this boot of the host: monotonic times of another boot mean nothing in this one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        # Elsewhere: the wall time of the boot, to the minute (a reboot within a minute of the
        # previous one is missed; its monotonic times are then close to ours anyway).
        return str(round((time.time() - time.monotonic()) / 60))


class SQLiteBackend:
    """Shared limits of one lane in a SQLite file (one host, any number of processes).

    Args:
        url: ``sqlite:///path``.
        lane_key: the namespaced lane key (``{namespace}:{provider}[:{key hash}]``).
        now_ms: the clock (the host's monotonic clock; tests inject one).
        busy_timeout_s: the longest wait for a lock.

    Raises:
        BackendLostError: the file cannot be opened or initialised.
    """

    def __init__(self, url: str, lane_key: str, *, now_ms: Callable[[], int] = _host_ms,
                 busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.url = url
        self.lane_key = lane_key
        self._now_ms = now_ms
        self._busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()  # one thread of this process at a time on the connection
        self._calls_lock = threading.Lock()
        self.round_trips = 0  # guarded by _calls_lock: transactions run
        path = sqlite_path(url)
        if not path or not Path(path).resolve().parent.is_dir():
            raise BackendLostError(f"no directory for {path!r}")
        try:
            # Autocommit mode, so BEGIN IMMEDIATE is ours to issue; the timeout bounds every wait
            # for another process's write lock.
            self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                         timeout=busy_timeout_s)
            self._set_up(self._conn, busy_timeout_s)
        except sqlite3.Error as exc:
            raise BackendLostError(f"{type(exc).__name__}: {exc}") from exc
        self._transaction(self._check_boot)

    @staticmethod
    def _set_up(conn: sqlite3.Connection, busy_timeout_s: float) -> None:
        """WAL mode and the schema, retried while another process holds the file (bounded).

        Several processes opening a new database file at once race to switch it to WAL, and the
        switch can answer "database is locked" at once, without the busy handler's wait (seen in
        1 of 180 opens of six processes racing; it failed a store's start with ConfigError).
        """
        deadline = time.monotonic() + busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                for statement in _SCHEMA:
                    conn.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    @staticmethod
    def _check_boot(conn: sqlite3.Connection, now: int) -> None:
        boot = _boot_id()
        row = conn.execute("SELECT value FROM llm_executor_meta WHERE key = 'boot'").fetchone()
        if row is None or row[0] != boot:
            for table in _TABLES:
                conn.execute(f"DELETE FROM {table}")
            conn.execute("INSERT OR REPLACE INTO llm_executor_meta (key, value) VALUES ('boot', ?)", (boot,))

    # -- transactions ------------------------------------------------------------------------
    def _transaction(self, fn: Callable[[sqlite3.Connection, int], T]) -> T:
        with self._calls_lock:
            self.round_trips += 1
        # A thread of ours stuck on a foreign lock holds the connection for up to the busy
        # timeout; the others wait as long at most, then count the store as lost too.
        if not self._lock.acquire(timeout=self._busy_timeout_s):
            raise BackendLostError(f"the database stayed locked for {self._busy_timeout_s:g}s")
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
        finally:
            self._lock.release()

    # -- admission -----------------------------------------------------------------------------
    def _nth_newest(self, conn: sqlite3.Connection) -> Callable[[int], int | None]:
        def nth(n: int) -> int | None:
            row = conn.execute("SELECT start_ms FROM llm_executor_rate WHERE lane = ? "
                               "ORDER BY start_ms DESC LIMIT 1 OFFSET ?", (self.lane_key, n)).fetchone()
            return None if row is None else int(row[0])

        return nth

    def _live_tpm(self, conn: sqlite3.Connection, now: int) -> dict[int, int]:
        conn.execute("DELETE FROM llm_executor_tpm WHERE lane = ? AND bucket < ?",
                     (self.lane_key, tpm_live_since(now)))
        rows = conn.execute("SELECT bucket, tokens FROM llm_executor_tpm WHERE lane = ?", (self.lane_key,))
        return {int(b): int(t) for b, t in rows}

    def _add_tokens(self, conn: sqlite3.Connection, at_ms: int, amount: int) -> None:
        conn.execute(
            "INSERT INTO llm_executor_tpm (lane, bucket, tokens) VALUES (?, ?, ?) "
            "ON CONFLICT (lane, bucket) DO UPDATE SET tokens = tokens + excluded.tokens",
            (self.lane_key, at_ms // TPM_BUCKET_MS, amount),
        )

    def admit(self, ask: Ask) -> Verdict:
        def admit(conn: sqlite3.Connection, now: int) -> Verdict:
            slot_taken, held = False, 0
            if ask.cap is not None:
                conn.execute("DELETE FROM llm_executor_slots WHERE lane = ? AND expires_ms <= ?",
                             (self.lane_key, now))
                slot_taken = conn.execute("SELECT 1 FROM llm_executor_slots WHERE lane = ? AND holder = ?",
                                          (self.lane_key, ask.holder)).fetchone() is not None
                (held,) = conn.execute("SELECT COUNT(*) FROM llm_executor_slots WHERE lane = ?",
                                       (self.lane_key,)).fetchone()
            if ask.rates:
                conn.execute("DELETE FROM llm_executor_rate WHERE lane = ? AND (start_ms < ? OR member = ?)",
                             (self.lane_key, rate_horizon_ms(now, ask.rates), ask.member))
            verdict = admit_decide(ask, now, slot_taken=slot_taken, slots_held=int(held),
                                   tpm_buckets=self._live_tpm(conn, now) if ask.tpm_limit is not None else {},
                                   nth_newest=self._nth_newest(conn))
            if verdict.taken:
                start = now + verdict.wait_ms
                if ask.cap is not None:
                    conn.execute("INSERT OR REPLACE INTO llm_executor_slots (lane, holder, expires_ms) "
                                 "VALUES (?, ?, ?)", (self.lane_key, ask.holder, now + ask.ttl_ms))
                if ask.tpm_limit is not None and ask.tokens:
                    self._add_tokens(conn, start, ask.tokens)
                if ask.rates:
                    conn.execute("INSERT OR REPLACE INTO llm_executor_rate (lane, member, start_ms) VALUES (?, ?, ?)",
                                 (self.lane_key, ask.member, start))
            return verdict

        return self._transaction(admit)

    def cancel(self, member: str) -> None:
        self._transaction(lambda conn, now: conn.execute(
            "DELETE FROM llm_executor_rate WHERE lane = ? AND member = ?", (self.lane_key, member)))

    def rate_wait_s(self, rates: Sequence[Rate]) -> float:
        return self._transaction(lambda conn, now: rate_wait_ms(now, rates, self._nth_newest(conn))) / 1000.0

    def record(self, usage: Admitted, rates: Sequence[Rate], ttl_ms: int) -> None:
        def record(conn: sqlite3.Connection, now: int) -> None:
            conn.executemany("INSERT OR REPLACE INTO llm_executor_rate (lane, member, start_ms) VALUES (?, ?, ?)",
                             [(self.lane_key, member, now - age) for member, age in usage.rate_entries])
            for age, tokens in usage.tpm_ages_ms:
                self._add_tokens(conn, now - age, tokens)
            conn.executemany("INSERT OR REPLACE INTO llm_executor_slots (lane, holder, expires_ms) VALUES (?, ?, ?)",
                             [(self.lane_key, holder, now + ttl_ms) for holder in usage.holders])

        self._transaction(record)

    # -- TPM -----------------------------------------------------------------------------------
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

    def learned(self, expected_version: int, data: str, min_age_ms: int) -> LearnedRecord:
        def exchange(conn: sqlite3.Connection, now: int) -> LearnedRecord:
            row = conn.execute("SELECT version, changed_ms, data FROM llm_executor_learned WHERE lane = ?",
                               (self.lane_key,)).fetchone()
            version, changed, current = (0, 0, "") if row is None else (int(row[0]), int(row[1]), str(row[2]))
            if version and now - changed > LEARNED_TTL_MS:
                version, changed, current = 0, 0, ""
            if not learned_decide(version, changed, now, expected_version, min_age_ms):
                return LearnedRecord(version, changed, current, now)
            conn.execute("INSERT OR REPLACE INTO llm_executor_learned (lane, version, changed_ms, data) "
                         "VALUES (?, ?, ?, ?)", (self.lane_key, version + 1, now, data))
            return LearnedRecord(version + 1, now, data, now, applied=True)
        return self._transaction(exchange)

    def ping(self) -> None:
        # An empty write transaction: it answers only when the write lock can be had.
        self._transaction(lambda conn, now: None)

    def close(self) -> None:
        # A thread stuck on a foreign lock gives the connection back within the busy timeout;
        # closing under it anyway is safe (sqlite3 serialises) and bounded by the same timeout.
        got = self._lock.acquire(timeout=self._busy_timeout_s)
        try:
            self._conn.close()
        except sqlite3.Error:
            pass
        finally:
            if got:
                self._lock.release()
