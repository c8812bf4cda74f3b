"""Unit tests of the transport guards: the attempt watch, the watchdog thread, the log filter."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from llm_executor.providers import transport
from llm_executor.providers.transport import (
    WATCHDOG_THREAD_NAME,
    AttemptGuard,
    AttemptWatch,
    SecretFilter,
    quiesce_watchdog,
    register_secret,
    scrub,
    watchdog_thread_alive,
)

Pair = tuple[socket.socket, socket.socket]


@pytest.fixture
def pair() -> Iterator[Pair]:
    """A connected socket pair: the left end is watched, the right end plays the server."""
    left, right = socket.socketpair()
    left.settimeout(5)  # a test that goes wrong fails, it does not hang
    yield left, right
    left.close()
    right.close()


def test_an_expired_watch_wakes_a_thread_blocked_on_its_socket(pair: Pair) -> None:
    left = pair[0]
    woke = threading.Event()
    received: list[bytes] = []

    def reader() -> None:
        with AttemptGuard(time.monotonic() + 0.2) as watch:
            watch.attach(left)
            received.append(left.recv(10))  # blocks until the watchdog shuts the socket
        woke.set()

    thread = threading.Thread(target=reader)
    thread.start()
    assert woke.wait(5), "the watchdog did not wake the blocked reader"
    thread.join(5)
    assert received == [b""]


def test_a_finished_watch_leaves_its_socket_alone(pair: Pair) -> None:
    left, right = pair
    watch = AttemptWatch(time.monotonic() - 1.0)
    watch.attach(left)
    watch.finish()
    watch.expire()  # a late expiry must not touch a socket back in the pool
    right.sendall(b"x")
    assert left.recv(1) == b"x"
    assert not watch.expired


def test_the_watchdog_thread_lingers_between_attempts_and_quiesce_joins_it() -> None:
    # One thread across attempts that never overlap (no start + join per attempt); quiesce()
    # (called by Executor.shutdown(wait=True)) joins it, so no thread outlives shutdown.
    with AttemptGuard(time.monotonic() + 60):
        with AttemptGuard(time.monotonic() + 30):
            assert watchdog_thread_alive()
        assert watchdog_thread_alive()  # one attempt is still in flight
    first = [t for t in threading.enumerate() if t.name == WATCHDOG_THREAD_NAME]
    assert watchdog_thread_alive() and len(first) == 1  # lingering
    with AttemptGuard(time.monotonic() + 60):
        quiesce_watchdog()  # an attempt is in flight: not stopped
        assert [t for t in threading.enumerate() if t.name == WATCHDOG_THREAD_NAME] == first
    quiesce_watchdog()
    assert not watchdog_thread_alive()
    assert not [t for t in threading.enumerate() if t.name == WATCHDOG_THREAD_NAME]


def test_an_idle_watchdog_thread_ends_after_its_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport, "WATCHDOG_LINGER_S", 0.05)
    quiesce_watchdog()
    with AttemptGuard(time.monotonic() + 60):
        pass
    threads = [t for t in threading.enumerate() if t.name == WATCHDOG_THREAD_NAME]
    assert len(threads) == 1
    threads[0].join(5)
    assert not threads[0].is_alive() and not watchdog_thread_alive()
    with AttemptGuard(time.monotonic() + 60):  # the next attempt starts a new one
        assert watchdog_thread_alive()
    quiesce_watchdog()


def test_the_secret_filter_scrubs_messages_args_and_tracebacks() -> None:
    secret = "sk-filter-test-9b8c7d6e"
    register_secret(secret)
    register_secret("short")  # too short to scrub safely: ignored
    logger = logging.getLogger("urllib3.connection")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        try:
            raise ValueError(f"header line broken-{secret}")
        except ValueError:
            logger.warning("Failed to parse headers (url=%s): %s", "http://h/", f"data {secret}", exc_info=True)
        logger.debug("nothing secret here: %s", "short")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    formatted = [logging.Formatter().format(r) for r in records]
    assert secret not in formatted[0] and "data ***" in formatted[0] and "broken-***" in formatted[0]
    assert formatted[1] == "nothing secret here: short"
    assert scrub(f"a {secret} b") == "a *** b"
    assert any(isinstance(f, SecretFilter) for f in logging.getLogger("urllib3.connectionpool").filters)


def test_a_late_expiry_leaves_a_connection_the_next_attempt_took_over(pair: Pair) -> None:
    # urllib3 returns a connection to the pool as the body's last byte is read, a moment before the
    # attempt finishes its watch: if the next attempt has claimed it, the old watch must not cut it.
    class Conn:
        pass

    left, right = pair
    conn = Conn()
    first, second = AttemptWatch(time.monotonic() + 60), AttemptWatch(time.monotonic() + 60)
    first.attach(left, conn)
    second.attach(left, conn)  # the next attempt's request() on the pooled connection
    first.expire()
    right.sendall(b"x")
    assert left.recv(1) == b"x", "the first watch cut a connection it no longer owns"
    second.expire()
    assert left.recv(1) == b""


def test_a_nearer_deadline_wakes_the_sleeping_watchdog(pair: Pair) -> None:
    # The watchdog sleeps towards the earliest deadline (at most a second); an attempt armed with a
    # nearer one must be expired on time, not at the end of that nap.
    left = pair[0]
    with AttemptGuard(time.monotonic() + 60):
        time.sleep(0.05)  # let the watchdog settle into its nap
        started = time.monotonic()
        with AttemptGuard(started + 0.1) as watch:
            watch.attach(left)
            assert left.recv(10) == b""
        woke_after = time.monotonic() - started
    assert woke_after < 0.6, woke_after
