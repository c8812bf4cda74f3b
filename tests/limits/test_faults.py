"""A shared store that is unreachable at start, or lost mid-run (fail_closed and local)."""

from __future__ import annotations

import logging
import socket
import threading
import time
from urllib.parse import urlsplit

import pytest

from llm_executor import limits
from llm_executor.errors import ConfigError, DeadlineExceededError, ProviderUnavailableError

from .conftest import REDIS_URL, MakeLimiter, redis_client_or_skip


class TcpProxy:
    """A loopback TCP forwarder to Redis that a test can cut and restore (a lost network)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread; close() alone does not
            except OSError:
                pass
            self._listener.close()
            self._listener = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.close()
                except OSError:
                    pass


@pytest.fixture
def proxied_redis_url(namespace: str) -> object:
    client = redis_client_or_skip()
    parts = urlsplit(REDIS_URL)
    proxy = TcpProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    proxy.start()
    yield proxy, f"redis://127.0.0.1:{proxy.port}{parts.path}"
    proxy.stop()
    from .conftest import delete_namespace

    delete_namespace(client, namespace)


def test_unreachable_redis_at_start_is_a_config_error_with_the_password_masked(
        make_limiter: MakeLimiter) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError) as info:
        make_limiter(f"redis://user:hunter2-SENTINEL@127.0.0.1:{port}/0", qps=1)
    message = str(info.value)
    assert f"redis://user:***@127.0.0.1:{port}/0" in message and "unreachable" in message
    assert "SENTINEL" not in message and "SENTINEL" not in repr(info.value)


def test_sqlite_file_in_a_missing_directory_is_a_config_error(tmp_path: object,
                                                               make_limiter: MakeLimiter) -> None:
    with pytest.raises(ConfigError, match=r"LLM_EXECUTOR_RATE_BACKEND='sqlite:///.*unreachable"):
        make_limiter(f"sqlite:///{tmp_path}/no/such/dir/limits.db", qps=1)


def test_redis_lost_mid_run_fails_closed_then_recovers(proxied_redis_url: tuple[TcpProxy, str],
                                                        make_limiter: MakeLimiter) -> None:
    proxy, url = proxied_redis_url
    limiter = make_limiter(url, qps=100, tpm=10_000, global_max_parallel=2)
    stopping = threading.Event()
    limiter.acquire(stopping)
    proxy.stop()
    for attempt in (lambda: limiter.acquire(stopping), lambda: limiter.reserve_tokens(10, stopping),
                    lambda: limiter.acquire_slot(stopping)):
        with pytest.raises(ProviderUnavailableError) as info:
            attempt()
        assert info.value.retryable is False and info.value.provider == "openai"
        assert f"127.0.0.1:{proxy.port}" in str(info.value)
    assert limiter.expected_wait_s() == 3600.0  # "auto" routing steers away
    limiter.settle_tokens(10, 20)  # logged, never raised: the call itself succeeded
    proxy.start()
    limiter.acquire(stopping)  # fail_closed keeps asking the store: it answers again
    assert not limiter.is_degraded


def test_redis_lost_mid_run_falls_back_to_local_limits_and_recovers(
        proxied_redis_url: tuple[TcpProxy, str], make_limiter: MakeLimiter,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(limits, "RECOVERY_CHECK_S", 0.0)  # probe the store on every call: no waiting
    proxy, url = proxied_redis_url
    limiter = make_limiter(url, backend_failure="local", qps=3, burst=3, global_max_parallel=1)
    stopping = threading.Event()
    proxy.stop()
    with caplog.at_level(logging.WARNING, logger="llm_executor.limits"):
        assert [limiter.try_acquire() for _ in range(3)] == [0.0] * 3  # local limits, same rates
        assert limiter.try_acquire() > 0.5
        release = limiter.acquire_slot(stopping)
        assert release is not None
        release()
    lost = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(lost) == 1 and lost[0].levelno == logging.WARNING
    assert limiter.is_degraded
    proxy.start()
    # Back on the shared store, the starts taken locally were recorded into it first: the
    # window is still full, for this limiter and for any other process on the store.
    assert limiter.try_acquire() > 0.5
    assert not limiter.is_degraded
    other = make_limiter(url, qps=3, burst=3, global_max_parallel=1)
    assert other.try_acquire() > 0.5


def _stall_grants(limiter: limits.LaneLimiter,
                  monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the store's grants wait before they reach their caller: ``granted`` is set once the
    store has granted, and the reply goes on only when the test sets ``lost``."""
    real_admit = limiter._shared.admit
    granted, lost = threading.Event(), threading.Event()

    def admit_then_stall(ask: object) -> object:
        verdict = real_admit(ask)  # type: ignore[arg-type]
        granted.set()
        assert lost.wait(10)
        return verdict

    monkeypatch.setattr(limiter._shared, "admit", admit_then_stall)
    return granted, lost


def test_a_start_the_store_granted_while_another_thread_found_it_lost_counts_in_the_local_limits(
        proxied_redis_url: tuple[TcpProxy, str], make_limiter: MakeLimiter,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread A's admission is granted by the store; before A notes that start, thread B's call
    finds the store gone and builds the local limits from the starts noted so far. A's start
    must count there too, or the local limits admit one start too many in that window (the soak
    saw 81 starts in 1 s at QPS 80 across a Redis kill once; this race is one way to get there).
    """
    monkeypatch.setattr(limits, "RECOVERY_CHECK_S", 3600.0)  # stay local for the rest of the test
    _, url = proxied_redis_url
    limiter = make_limiter(url, backend_failure="local", qps=3, burst=3)
    granted, lost = _stall_grants(limiter, monkeypatch)
    waits: list[float] = []
    a = threading.Thread(target=lambda: waits.append(limiter.try_acquire()))
    a.start()
    assert granted.wait(10)
    limiter._lost(limits.BackendLostError("connection reset"))  # thread B's view of the same moment
    lost.set()
    a.join(10)
    assert waits == [0.0] and limiter.is_degraded
    # A's start is one of the window's 3: the local limits admit 2 more, not 3.
    assert [limiter.try_acquire() == 0.0 for _ in range(3)] == [True, True, False]


def test_a_slot_the_store_granted_while_another_thread_found_it_lost_is_held_in_the_local_limits(
        proxied_redis_url: tuple[TcpProxy, str], make_limiter: MakeLimiter,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The same race for a GLOBAL_MAX_PARALLEL slot: granted by the store, leased after thread B
    # built the local limits. The local cap of 1 must see it held until it is released.
    monkeypatch.setattr(limits, "RECOVERY_CHECK_S", 3600.0)
    _, url = proxied_redis_url
    limiter = make_limiter(url, backend_failure="local", global_max_parallel=1)
    granted, lost = _stall_grants(limiter, monkeypatch)
    stopping = threading.Event()
    releases: list[object] = []
    a = threading.Thread(target=lambda: releases.append(limiter.acquire_slot(stopping)))
    a.start()
    assert granted.wait(10)
    limiter._lost(limits.BackendLostError("connection reset"))
    lost.set()
    a.join(10)
    assert len(releases) == 1 and callable(releases[0])
    with pytest.raises(DeadlineExceededError):  # the one slot is A's
        limiter.acquire_slot(stopping, deadline_monotonic=time.monotonic() + 0.05)
    releases[0]()
    release = limiter.acquire_slot(stopping, deadline_monotonic=time.monotonic() + 5)
    assert release is not None
    release()


def test_a_sqlite_file_busy_while_another_process_switches_it_to_wal_is_retried(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Processes opening a new file at once race to switch it to WAL, and the loser can get
    "database is locked" at once, without the busy wait: the store's start retries (bounded)."""
    import sqlite3
    from pathlib import Path

    from llm_executor.limits import _sqlite

    real_connect = sqlite3.connect
    answers = {"locked": 2}

    class RacingConnection:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self._conn = conn

        def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
            if sql.startswith("PRAGMA journal_mode") and answers["locked"]:
                answers["locked"] -= 1
                busy = sqlite3.OperationalError("database is locked")  # as sqlite3 raises it
                busy.sqlite_errorcode, busy.sqlite_errorname = sqlite3.SQLITE_BUSY, "SQLITE_BUSY"
                raise busy
            return self._conn.execute(sql, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(self._conn, name)

    monkeypatch.setattr(_sqlite.sqlite3, "connect", lambda *a, **k: RacingConnection(real_connect(*a, **k)))
    backend = _sqlite.SQLiteBackend(f"sqlite:///{Path(str(tmp_path)) / 'race.db'}", "ns:openai")
    try:
        assert answers["locked"] == 0  # both refusals were met and retried
    finally:
        backend.close()
