"""Hostile loopback HTTP servers and a key canary, shared by the adversarial tests.

``HostileServer(behaviour)`` listens on 127.0.0.1 (a free port), reads each request (head and
body) and hands the connection to ``behaviour``, a function of ``(Connection, Request)`` that
misbehaves in one way: never answers, trickles the head or the body, sends a gzip bomb, resets,
floods headers, echoes the API key... Every wait is bounded: behaviours stop when the client
goes away or the server stops, and ``stop()`` joins every thread with a timeout.

``Canary`` collects everything a user could see (exceptions with their chains, log records of
llm_executor, urllib3 and requests at DEBUG, reprs, stats, Prometheus text) and reports where a
secret shows up.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import socket
import ssl
import struct
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Self

__all__ = [
    "CANARY_KEY",
    "Canary",
    "Connection",
    "HostileServer",
    "Request",
    "TrickleProxy",
    "canned",
    "gzip_bomb",
    "gzip_bomb_single",
    "header_flood",
    "huge_body",
    "keep_alive_then",
    "key_echo",
    "long_header_line",
    "redirect",
    "reset",
    "reset_mid_body",
    "silent",
    "trickle_body",
    "trickle_head",
    "wait_until",
]

# Looks like a key to every redactor pattern we have, and is unique enough to grep for.
CANARY_KEY = "sk-canary-7f3a9c1e5b2d4f60"

_MAX_HEAD_BYTES = 1 << 20


def wait_until(predicate: Callable[[], bool], timeout_s: float, step_s: float = 0.01) -> bool:
    """Poll ``predicate`` until true or ``timeout_s`` passes (tests only; the library never polls)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(step_s)
    return True


@dataclass
class Request:
    """What the client sent: method, path, lowercase headers and body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def api_key(self) -> str:
        """The key the client sent (Authorization: Bearer, or x-goog-api-key)."""
        auth = self.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return auth[7:]
        return self.headers.get("x-goog-api-key", "")


@dataclass
class Connection:
    """One accepted connection, as a behaviour sees it."""

    sock: socket.socket
    stop: threading.Event
    opened_s: float = field(default_factory=time.monotonic)
    closed_by_peer_s: float | None = None

    def send(self, data: bytes) -> bool:
        """Send ``data``; False once the peer is gone (the behaviour should return)."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self._peer_gone()
            return False

    def peer_gone(self, wait_s: float) -> bool:
        """Wait up to ``wait_s`` for the peer to close; True when it did (or the server stops)."""
        if self.closed_by_peer_s is not None:
            return True
        self.sock.settimeout(max(0.001, wait_s))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return self.stop.is_set()
        except OSError:
            data = b""
        if not data:
            self._peer_gone()
            return True
        return self.stop.is_set()

    def hold(self, limit_s: float = 30.0) -> None:
        """Keep the connection open, answering nothing, until the peer leaves or the server stops."""
        end = time.monotonic() + limit_s
        while time.monotonic() < end and not self.stop.is_set():
            if self.peer_gone(0.05):
                return

    def _peer_gone(self) -> None:
        if self.closed_by_peer_s is None:
            self.closed_by_peer_s = time.monotonic()


Behaviour = Callable[[Connection, Request], None]


class _Listener:
    """A loopback listener whose accepted sockets go to ``_accepted`` (in the acceptor thread).

    Every thread it starts is a daemon, named after its port, and joined (bounded) by ``stop()``.
    """

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Self:
        self._spawn(self._accept_loop)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop accepting, end every connection's thread and join them (bounded)."""
        self._stop.set()
        if self._threads:
            self._threads[0].join(5)  # the acceptor first: then no thread is added behind our back
        for thread in list(self._threads):
            thread.join(5)
        self._listener.close()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, name=f"hostile-{self.port}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._accepted(sock)

    def _accepted(self, sock: socket.socket) -> None:
        raise NotImplementedError


class HostileServer(_Listener):
    """A loopback HTTP/1.1 server whose every answer comes from ``behaviour``.

    Attributes:
        url: ``http://127.0.0.1:<port>`` (``https://`` with ``tls``).
        connections: every connection accepted, with when the peer closed it.
        requests: every request read.
    """

    def __init__(self, behaviour: Behaviour, tls: ssl.SSLContext | None = None) -> None:
        super().__init__()
        self.behaviour = behaviour
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.connections: list[Connection] = []
        self.requests: list[Request] = []

    def _accepted(self, sock: socket.socket) -> None:
        conn = Connection(sock, self._stop)
        self.connections.append(conn)
        self._spawn(self._serve, conn)

    def _serve(self, conn: Connection) -> None:
        try:
            if self.tls is not None:
                conn.sock.settimeout(5)
                conn.sock = self.tls.wrap_socket(conn.sock, server_side=True)
            request = _read_request(conn.sock)
            if request is None:
                return
            self.requests.append(request)
            self.behaviour(conn, request)
        except (OSError, ssl.SSLError):
            conn._peer_gone()
        finally:
            try:
                conn.sock.close()
            except OSError:
                pass


def _read_request(sock: socket.socket) -> Request | None:
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk or len(data) > _MAX_HEAD_BYTES:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Request(method, path, headers, body)


def _head(status: str, headers: dict[str, str] | list[tuple[str, str]], length: int | None,
          *, close: bool = True) -> bytes:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    if length is not None:
        items.append(("Content-Length", str(length)))
    items.append(("Connection", "close" if close else "keep-alive"))
    lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in items]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# --- behaviours ----------------------------------------------------------------------------------


def silent() -> Behaviour:
    """Read the request, then answer nothing until the client leaves."""
    return lambda conn, request: conn.hold()


def trickle_head(interval_s: float = 0.1) -> Behaviour:
    """Send the status line, then one header byte per ``interval_s``, never finishing the head."""

    def run(conn: Connection, request: Request) -> None:
        if not conn.send(b"HTTP/1.1 200 OK\r\nX-Slow: "):
            return
        while not conn.stop.is_set():
            if not conn.send(b"a") or conn.peer_gone(interval_s):
                return

    return run


def trickle_body(interval_s: float = 0.1, length: int = 100_000) -> Behaviour:
    """Send a complete head announcing ``length`` bytes, then one body byte per ``interval_s``."""

    def run(conn: Connection, request: Request) -> None:
        if not conn.send(_head("200 OK", {"Content-Type": "application/json"}, length) + b"{"):
            return
        while not conn.stop.is_set():
            if not conn.send(b" ") or conn.peer_gone(interval_s):
                return

    return run


def huge_body(total_bytes: int = 1 << 30, chunked: bool = False) -> Behaviour:
    """A 200 whose JSON body is ``total_bytes`` long, sent as fast as the client reads."""

    def run(conn: Connection, request: Request) -> None:
        prefix = b'{"choices": [{"message": {"content": "'
        headers = {"Content-Type": "application/json"}
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        if not conn.send(_head("200 OK", headers, None if chunked else total_bytes)):
            return
        block = b"a" * 65536
        sent = 0
        first = True
        while sent < total_bytes and not conn.stop.is_set():
            data = prefix + block[len(prefix):] if first else block
            first = False
            data = data[: total_bytes - sent]
            frame = b"%x\r\n%s\r\n" % (len(data), data) if chunked else data
            if not conn.send(frame):
                return
            sent += len(data)

    return run


def _gzip_member(raw_bytes: int) -> bytes:
    return gzip.compress(b"\0" * raw_bytes, compresslevel=9)


def gzip_bomb(inflated_bytes: int = 1 << 30, member_bytes: int = 1 << 20) -> Behaviour:
    """A 200 with ``Content-Encoding: gzip``: many gzip members of zeros, ``inflated_bytes`` in all.

    About 1 KiB on the wire per MiB inflated (1 MiB for 1 GiB), cheap to build.
    """
    member = _gzip_member(member_bytes)
    count = inflated_bytes // member_bytes
    return _send_encoded(lambda: (member for _ in range(count)), len(member) * count)


def gzip_bomb_single(inflated_bytes: int = 256 << 20) -> Behaviour:
    """One gzip member of ``inflated_bytes`` zeros: a single decompress call could inflate it whole."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip wrapper
    zeros = b"\0" * (1 << 20)
    parts = [compressor.compress(zeros) for _ in range(inflated_bytes >> 20)]
    parts.append(compressor.flush())
    payload = b"".join(parts)
    return _send_encoded(lambda: iter([payload]), len(payload))


def _send_encoded(parts: Callable[[], Iterator[bytes]], length: int) -> Behaviour:
    def run(conn: Connection, request: Request) -> None:
        head = _head("200 OK", {"Content-Type": "application/json", "Content-Encoding": "gzip"}, length)
        if not conn.send(head):
            return
        for part in parts():
            if conn.stop.is_set() or not conn.send(part):
                return

    return run


def canned(status: str, body: bytes, headers: dict[str, str] | None = None) -> Behaviour:
    """One fixed answer (invalid UTF-8, an HTML 200, a 502 page...)."""
    data = _head(status, headers or {}, len(body)) + body

    def run(conn: Connection, request: Request) -> None:
        conn.send(data)

    return run


def redirect(location: str, status: str = "302 Found") -> Behaviour:
    """A redirect to ``location`` (which must never be followed)."""
    return canned(status, b"", {"Location": location})


def reset() -> Behaviour:
    """Read the request, then reset the connection (RST, not FIN)."""

    def run(conn: Connection, request: Request) -> None:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    return run


def reset_mid_body(sent_bytes: int = 10) -> Behaviour:
    """Send a head announcing 1000 bytes and ``sent_bytes`` of them, then reset the connection."""

    def run(conn: Connection, request: Request) -> None:
        if conn.send(_head("200 OK", {"Content-Type": "application/json"}, 1000) + b"{" + b" " * (sent_bytes - 1)):
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    return run


def header_flood(count: int = 20_000) -> Behaviour:
    """A 200 with ``count`` headers (http.client refuses more than 100)."""
    headers = [(f"X-Flood-{i}", "x" * 20) for i in range(count)]
    return canned("200 OK", b"{}", headers)  # type: ignore[arg-type]


def long_header_line(size: int = 200_000) -> Behaviour:
    """A 200 with one header line of ``size`` bytes (http.client refuses lines over 64 KiB)."""
    return canned("200 OK", b"{}", {"X-Long": "y" * size})


def keep_alive_then(first_body: bytes, then: Behaviour) -> Behaviour:
    """Answer the first request with a 200 keeping the connection open, then the next one with ``then``.

    The client's second call reuses the pooled connection (no new connect): the path where a
    guard must pick the socket up at send time.
    """

    def run(conn: Connection, request: Request) -> None:
        if not conn.send(_head("200 OK", {"Content-Type": "application/json"}, len(first_body), close=False)
                         + first_body):
            return
        following = _read_request(conn.sock)
        if following is not None:
            then(conn, following)

    return run


def key_echo(status: str = "401 Unauthorized", malformed: bool = True) -> Behaviour:
    """Echo the key the client sent back: in x-request-id, another header, the body, and a broken header line.

    The broken line (no colon) makes urllib3 log "Failed to parse headers" quoting it.
    """

    def run(conn: Connection, request: Request) -> None:
        key = request.api_key()
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {key}", "code": "invalid_api_key",
                                     "type": "invalid_request_error"}}).encode()
        head = _head(status, [("Content-Type", "application/json"), ("x-request-id", key),
                              ("X-Echo", f"Bearer {key}")], len(body))
        if malformed:
            # A header line without a colon, after the good ones: an email.parser defect.
            head = head[:-2] + f"broken-line-{key}\r\n\r\n".encode("latin-1")
        conn.send(head + body)

    return run


class TrickleProxy(_Listener):
    """A TCP proxy to ``upstream_port`` that passes the client's bytes at once and the server's one per ``interval_s``.

    In front of a TLS server it trickles the handshake itself (certificate and all), the phase
    before any HTTP socket exists. ``client_closed_s`` records when the client gave up.
    """

    def __init__(self, upstream_port: int, interval_s: float = 0.05) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.interval_s = interval_s
        self.client_closed_s: list[float] = []
        self.opened_s: list[float] = []

    def _accepted(self, client: socket.socket) -> None:
        self.opened_s.append(time.monotonic())
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        self._spawn(self._to_server, client, upstream)
        self._spawn(self._to_client, client, upstream)

    def _to_server(self, client: socket.socket, upstream: socket.socket) -> None:
        client.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = client.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                data = b""
            if not data:
                self.client_closed_s.append(time.monotonic())
                break
            try:
                upstream.sendall(data)
            except OSError:
                break
        for sock in (client, upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _to_client(self, client: socket.socket, upstream: socket.socket) -> None:
        upstream.settimeout(5)
        try:
            while not self._stop.is_set():
                byte = upstream.recv(1)
                if not byte:
                    return
                client.sendall(byte)
                self._stop.wait(self.interval_s)
        except OSError:
            return
        finally:
            client.close()
            upstream.close()


# --- the key canary ------------------------------------------------------------------------------


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(self.format(record) + " " + repr(record.__dict__))


class Canary:
    """Where a secret shows up in what a user can see.

    Use as a context manager: it turns on DEBUG for ``llm_executor``, ``urllib3`` and ``requests``
    and collects every record (restoring the levels after). Feed it exceptions, objects and texts;
    ``leaks()`` lists every place the secret was found.
    """

    LOGGERS = ("llm_executor", "urllib3", "requests")

    def __init__(self, secret: str = CANARY_KEY) -> None:
        self.secret = secret
        self._handler = _Collect()
        self._levels: dict[str, int] = {}
        self._found: list[str] = []

    def __enter__(self) -> Canary:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            logger.setLevel(logging.DEBUG)
            logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(self._handler)
            logger.setLevel(self._levels.get(name, logging.NOTSET))

    @property
    def records(self) -> list[logging.LogRecord]:
        return self._handler.records

    def check_exception(self, exc: BaseException, where: str = "exception") -> None:
        """str, repr, args, attributes, traceback and the whole __cause__/__context__ chain."""
        seen: set[int] = set()
        current: BaseException | None = exc
        depth = 0
        while current is not None and id(current) not in seen:
            seen.add(id(current))
            attrs = repr(getattr(current, "__dict__", {}))
            self.check_text(f"{current!s}\n{current!r}\n{current.args!r}\n{attrs}", f"{where}[{depth}]")
            current = current.__cause__ or current.__context__
            depth += 1
        self.check_text("".join(traceback.format_exception(exc)), f"{where} traceback")

    def check_object(self, obj: object, where: str) -> None:
        self.check_text(repr(obj), f"repr({where})")

    def check_text(self, text: str, where: str) -> None:
        if self.secret in text:
            self._found.append(f"{where}: ...{_around(text, self.secret)}...")

    def leaks(self) -> list[str]:
        """Every place the secret was found, log records included."""
        for text in self._handler.texts:
            self.check_text(text, "log record")
        return list(self._found)


def _around(text: str, needle: str) -> str:
    at = text.index(needle)
    return text[max(0, at - 60): at + len(needle) + 20].replace("\n", " ")

