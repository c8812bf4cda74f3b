"""Socket-level guards under the HTTP base: a total time bound per attempt, and keys kept out of logs.

``requests`` times each socket read, not the attempt: a server that trickles one byte a second
keeps a call alive for as long as it likes (issue 11 item 2). Here an attempt gets an
``AttemptWatch`` with a deadline; the connections built by ``GuardedHTTPAdapter`` hand their
socket to the watch of the thread using them, and one process-wide watchdog thread shuts that
socket down from outside when the deadline passes, so the blocked read returns at once. The
watchdog thread starts on demand and ends when no attempt has been in flight for a moment.

``register_secret`` and the ``SecretFilter`` it installs keep API keys out of log records of
urllib3 (which quotes unparsable response headers, i.e. a key a hostile server echoes back) and
of this package.

Imports: stdlib, ``requests``/``urllib3``; nothing of llm_executor.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import socket
import threading
import time
import traceback
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

__all__ = [
    "WATCHDOG_LINGER_S",
    "WATCHDOG_THREAD_NAME",
    "AttemptGuard",
    "AttemptWatch",
    "GuardedHTTPAdapter",
    "SecretFilter",
    "register_secret",
    "scrub",
    "quiesce_watchdog",
    "watchdog_thread_alive",
]

# quiesce() joins the stopped watchdog thread; it only has to wake and return.
_JOIN_TIMEOUT_S = 5.0
# Keys shorter than this are not scrubbed from logs: replacing a 3-character string everywhere
# would mangle records and no real key is that short.
_MIN_SECRET_CHARS = 8
WATCHDOG_THREAD_NAME = "llm-executor-http-watchdog"
# How long the idle watchdog thread waits for the next attempt before it ends.
WATCHDOG_LINGER_S = 2.0


def _shutdown_socket(sock: object) -> None:
    # socket.socket.shutdown on the fd, also for an SSLSocket: SSLSocket.shutdown would first drop
    # its SSL object under the feet of the thread blocked reading it.
    if not isinstance(sock, socket.socket):
        return
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass  # already closed or never connected: nothing is blocked on it


class AttemptWatch:
    """The total time bound of one HTTP attempt and the sockets it uses.

    ``expire()`` (called by the watchdog at the deadline) shuts every attached socket down, so a
    thread blocked reading it wakes with EOF or an error; ``finish()`` detaches them. urllib3 puts
    a connection back in the pool the moment its body is read, a little before ``finish()``: a
    socket attached with its connection as ``owner`` is only shut while that connection is still
    ours (the next attempt to use it takes it over), so a late expiry never cuts another attempt.
    """

    __slots__ = ("_done", "_expired", "_lock", "_sockets", "deadline_monotonic")

    def __init__(self, deadline_monotonic: float) -> None:
        self.deadline_monotonic = deadline_monotonic
        self._lock = threading.Lock()
        self._sockets: list[tuple[socket.socket, object]] = []
        self._expired = False
        self._done = False

    @property
    def expired(self) -> bool:
        """Whether the watchdog fired (the attempt's sockets were shut down)."""
        return self._expired

    def remaining_s(self) -> float:
        """Seconds left before the deadline (negative once passed)."""
        return self.deadline_monotonic - time.monotonic()

    def is_over(self) -> bool:
        """Whether the bound is reached, fired or not."""
        return self._expired or time.monotonic() >= self.deadline_monotonic

    def attach(self, sock: object, owner: object = None) -> None:
        """Watch ``sock`` for the rest of the attempt (shut it at once if the bound already passed).

        Args:
            sock: the socket a thread of this attempt may block on.
            owner: the pooled connection ``sock`` belongs to; it is claimed for this watch, and
                ``expire`` leaves the socket alone once another watch has claimed it.
        """
        if not isinstance(sock, socket.socket):
            return
        if owner is not None:
            owner._llm_watch = self  # type: ignore[attr-defined]
        with self._lock:
            if self._done:
                return
            if self._expired:
                _shutdown_socket(sock)
            elif all(s is not sock for s, _ in self._sockets):
                self._sockets.append((sock, owner))

    def expire(self) -> None:
        """Mark the bound passed and shut the attached sockets down (no-op after ``finish``)."""
        with self._lock:
            if self._done:
                return
            self._expired = True
            for sock, owner in self._sockets:
                if owner is None or getattr(owner, "_llm_watch", None) is self:
                    _shutdown_socket(sock)

    def finish(self) -> None:
        """End the watch: later ``expire``/``attach`` calls do nothing."""
        with self._lock:
            self._done = True
            self._sockets.clear()

    @property
    def done(self) -> bool:
        return self._done


class _Watchdog:
    """One thread that expires watches at their deadlines, alive while attempts are in flight.

    The first armed attempt starts the thread. When the last one finishes it lingers for
    ``WATCHDOG_LINGER_S`` and then ends, so a lane whose attempts never overlap (MAX_PARALLEL=1,
    a sequential ETL loop) does not pay a thread start and a join per attempt: ~0.5 ms each
    normally, ~20 ms each under libfaketime, where that delay between the rate token and the
    wire broke "QPS in any 1 s window" at the provider. ``Executor.shutdown(wait=True)`` calls
    ``quiesce_watchdog()``, so no idle thread outlives it. Arming wakes the sleeping thread
    only when the new deadline comes before the one it sleeps until.
    """

    def __init__(self) -> None:
        self._reset()

    def after_fork(self) -> None:
        """In a forked child (once per process, whoever calls first): no thread, no held lock.

        The executor's own at-fork hook may run before this module's (hooks run in registration
        order) and rebuilds adapters, which may take this lock: it calls this first.
        """
        if self._pid != os.getpid():
            self._reset()

    def _reset(self) -> None:
        # The child has no watchdog thread and must not inherit a held lock.
        self._pid = os.getpid()
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, AttemptWatch]] = []
        self._live = 0
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = -math.inf  # when the sleeping thread wakes; -inf while it is not sleeping

    def arm(self, watch: AttemptWatch) -> None:
        with self._cond:
            heapq.heappush(self._heap, (watch.deadline_monotonic, next(self._seq), watch))
            self._live += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=WATCHDOG_THREAD_NAME, daemon=True)
                self._thread.start()
            elif watch.deadline_monotonic < self._wake_at:
                self._cond.notify()

    def disarm(self, watch: AttemptWatch) -> None:
        watch.finish()
        with self._cond:
            self._live -= 1
            if self._live == 0:
                self._heap.clear()
                self._cond.notify()  # the thread starts lingering
            elif len(self._heap) > 2 * self._live + 64:
                # Finished watches stay in the heap until their deadline; drop them in bulk.
                self._heap = [e for e in self._heap if not e[2].done]
                heapq.heapify(self._heap)

    def quiesce(self) -> None:
        """Stop and join the thread now if no attempt is in flight (another executor's may be)."""
        ended: threading.Thread | None = None
        with self._cond:
            if self._live == 0 and self._thread is not None:
                ended, self._thread = self._thread, None
                self._cond.notify()
        if ended is not None and ended is not threading.current_thread():
            # Outside the lock: the thread needs it to see it has been stopped.
            ended.join(_JOIN_TIMEOUT_S)

    def is_alive(self) -> bool:
        with self._cond:
            return self._thread is not None

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            due: list[AttemptWatch] = []
            with self._cond:
                if self._thread is not me:
                    return  # the last attempt finished (or a fork replaced us)
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, watch = heapq.heappop(self._heap)
                    if not watch.done:
                        due.append(watch)
                if not due and self._live == 0:
                    # Idle: linger, then end unless an attempt was armed meanwhile.
                    self._wake_at = math.inf
                    self._cond.wait(WATCHDOG_LINGER_S)
                    self._wake_at = -math.inf
                    if self._live == 0 and self._thread is me:
                        self._heap.clear()
                        self._thread = None
                        return
                    continue
                if not due:
                    self._wake_at = self._heap[0][0] if self._heap else math.inf
                    self._cond.wait(self._wake_at - now if self._heap else None)
                    self._wake_at = -math.inf
                    continue
            for watch in due:  # outside our lock: expire takes the watch's lock and touches sockets
                watch.expire()


_WATCHDOG = _Watchdog()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_WATCHDOG.after_fork)


def after_fork() -> None:
    """Reset this module's process-wide state in a forked child (idempotent)."""
    _WATCHDOG.after_fork()


_current = threading.local()


def quiesce_watchdog() -> None:
    """End the idle watchdog thread now (``Executor.shutdown(wait=True)``); no-op while attempts run."""
    _WATCHDOG.quiesce()


def watchdog_thread_alive() -> bool:
    """Whether the watchdog thread is running (only while an attempt is in flight)."""
    return _WATCHDOG.is_alive()


class AttemptGuard:
    """Context manager: bound the HTTP calls this thread makes inside it by ``deadline_monotonic``.

    Connections of a ``GuardedHTTPAdapter`` attach their socket to the watch while it is active;
    on exit the watch is finished *before* the caller lets the connection go back to the pool.
    """

    __slots__ = ("_previous", "watch")

    def __init__(self, deadline_monotonic: float) -> None:
        self.watch = AttemptWatch(deadline_monotonic)
        self._previous: AttemptWatch | None = None

    def __enter__(self) -> AttemptWatch:
        self._previous = getattr(_current, "watch", None)
        _current.watch = self.watch
        _WATCHDOG.arm(self.watch)
        return self.watch

    def __exit__(self, *exc: object) -> None:
        _current.watch = self._previous
        _WATCHDOG.disarm(self.watch)


def _attach_current(sock: object, owner: object) -> None:
    watch: AttemptWatch | None = getattr(_current, "watch", None)
    if watch is not None:
        watch.attach(sock, owner)


class _GuardedHTTPConnection(HTTPConnection):
    """An urllib3 connection that hands its socket to the calling thread's attempt watch."""

    def connect(self) -> None:
        # A TLS handshake needs no watch: CPython bounds the whole handshake by the socket timeout,
        # which is the attempt's connect timeout cut to its budget.
        super().connect()
        _attach_current(self.sock, self)  # the TLS socket, for HTTPS

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        # A pooled connection is reused without connect(): attach (and claim it) before sending.
        if self.sock is not None:
            _attach_current(self.sock, self)
        super().request(*args, **kwargs)

    def getresponse(self) -> Any:  # type: ignore[override]
        _attach_current(self.sock, self)
        return super().getresponse()


class _GuardedHTTPSConnection(_GuardedHTTPConnection, HTTPSConnection):
    """The HTTPS twin (the MRO puts HTTPSConnection.connect under our overrides)."""


class _GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


_DEFAULT_POOLS = {"http": HTTPConnectionPool, "https": HTTPSConnectionPool}
_GUARDED_POOLS = {"http": _GuardedHTTPConnectionPool, "https": _GuardedHTTPSConnectionPool}


class GuardedHTTPAdapter(HTTPAdapter):
    """``requests``' HTTPAdapter whose connections (direct or through an HTTP proxy) obey ``AttemptGuard``.

    A SOCKS proxy keeps urllib3's own connections: there the bound is enforced between body
    chunks and by the socket timeouts only.
    """

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_GUARDED_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if getattr(manager, "pool_classes_by_scheme", None) == _DEFAULT_POOLS:
            manager.pool_classes_by_scheme = dict(_GUARDED_POOLS)
        return manager


# --- keys out of log records --------------------------------------------------------------------

_secrets_lock = threading.Lock()
_secrets: tuple[str, ...] = ()
# urllib3's module loggers (a filter on a logger sees only records made on that very logger),
# requests', and ours.
_FILTERED_LOGGERS = ("urllib3", "urllib3.connection", "urllib3.connectionpool", "urllib3.response",
                     "urllib3.poolmanager", "urllib3.util.retry", "requests", "llm_executor")


def scrub(text: str, secrets: tuple[str, ...] | None = None) -> str:
    """``text`` with every registered key replaced by ``***``."""
    for secret in _secrets if secrets is None else secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class SecretFilter(logging.Filter):
    """Rewrite a record whose message or traceback holds a registered key; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = _secrets
        if not secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: the handler reports it, as without us
            return True
        cleaned = scrub(message, secrets)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and record.exc_info[1] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            if any(s in text for s in secrets):
                # The exception object itself holds the key: keep only its scrubbed rendering.
                record.exc_text, record.exc_info = scrub(text, secrets).rstrip("\n"), None
        if record.exc_text and any(s in record.exc_text for s in secrets):
            record.exc_text = scrub(record.exc_text, secrets)
        if record.stack_info and any(s in record.stack_info for s in secrets):
            record.stack_info = scrub(record.stack_info, secrets)
        return True


_FILTER = SecretFilter()


def _install_filter() -> None:
    names = set(_FILTERED_LOGGERS)
    names.update(n for n in logging.root.manager.loggerDict if n.startswith(("llm_executor.", "urllib3.")))
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def register_secret(secret: str | None) -> None:
    """Scrub ``secret`` from every later record of urllib3's, requests' and this package's loggers."""
    if not secret:
        return
    secret = secret.strip()
    if len(secret) < _MIN_SECRET_CHARS:
        return
    global _secrets
    with _secrets_lock:
        if secret not in _secrets:
            # Longest first, so a key that contains another is replaced whole.
            _secrets = tuple(sorted((*_secrets, secret), key=len, reverse=True))
        _install_filter()
