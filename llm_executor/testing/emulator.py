"""A local HTTP emulator of the openai, gemini and ollama APIs, with limits, faults and a recorder.

``Emulator`` is a real HTTP server on 127.0.0.1 (``ThreadingHTTPServer``, one daemon thread per
connection) that speaks the wire formats of PROVIDERS.md: request bodies, success bodies with
usage and finish reasons, and the services' exact error bodies. Per provider (``ProviderSim``) it
enforces its own concurrency and requests-per-second limits and answers like the real service
when they are exceeded (OpenAI 429 ``rate_limit_exceeded`` with ``retry-after`` and
``retry-after-ms``; Gemini 429 ``RESOURCE_EXHAUSTED`` with a ``RetryInfo.retryDelay``; Ollama 503
"server busy"), injects faults drawn from a seeded RNG, and records what it saw so a test can
assert that a client kept its limits end to end.

Routes (``emu.url(provider)`` is the ``ProviderConfig.base_url`` to use)::

    openai  base http://127.0.0.1:PORT/v1   POST /v1/chat/completions, GET /v1/models
    gemini  base http://127.0.0.1:PORT      POST /v1beta/models/{model}:generateContent,
                                            GET /v1beta/models, GET /v1beta/models/{model}
    ollama  base http://127.0.0.1:PORT      POST /api/chat, POST /api/generate,
                                            GET /api/tags, GET /api/version

Order of checks on a generation request: key (``require_key``) → model (``models``) → body →
requests-per-second → concurrency → injected fault → latency → reply. Listing endpoints (GET) are
recorded but not limited, faulted nor counted in ``stats``.

Faults (``ProviderSim.faults`` maps a kind to a weight; ``fault_rate`` is the chance that a
request gets one): ``rate_limit`` (429 like the limits), ``server_error`` (500),
``unavailable`` (503), ``slow`` (``slow_s`` extra delay, then a normal reply), ``hang`` (no
reply; the connection is closed after ``hang_s`` or as soon as the client gives up, so a server
thread never hangs forever), ``malformed`` (HTTP 200 whose body is cut-off JSON), ``truncated``
(a reply cut to half its tokens with finish reason length: "length", "MAX_TOKENS",
done_reason "length") and ``blocked`` (Gemini: 200 with ``promptFeedback.blockReason``; OpenAI: a
``refusal``; Ollama: empty content). Each provider has its own ``random.Random`` seeded from
``(seed, provider)`` and draws once per accepted generation request in arrival order, so the same
sequence of requests meets the same faults.

Replies come from ``llm_executor.testing.responder`` (deterministic; see its rules).
Imports: the stdlib and ``responder`` only, so the server runs anywhere Python does.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import re
import select
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from .responder import count_tokens, reply_text, truncate_tokens

__all__ = [
    "FAULT_KINDS",
    "PROVIDERS",
    "Emulator",
    "EmulatorStats",
    "ProviderSim",
    "RecordedRequest",
    "serve",
]

PROVIDERS: tuple[str, ...] = ("openai", "gemini", "ollama")
FAULT_KINDS: tuple[str, ...] = (
    "rate_limit",
    "server_error",
    "unavailable",
    "slow",
    "hang",
    "malformed",
    "truncated",
    "blocked",
)
_DEFAULT_FAULTS: Mapping[str, float] = {
    "rate_limit": 1.0,
    "server_error": 1.0,
    "unavailable": 1.0,
    "slow": 1.0,
    "malformed": 1.0,
    "truncated": 1.0,
}
_DEFAULT_MODELS: Mapping[str, tuple[str, ...]] = {
    "openai": ("gpt-4o-mini", "gpt-4o"),
    "gemini": ("gemini-2.5-flash", "gemini-2.5-pro"),
    "ollama": ("llama3.2", "qwen2.5"),
}
MAX_HANG_S = 300.0
_SECRET_HEADERS = frozenset(
    {"authorization", "x-goog-api-key", "api-key", "x-api-key", "proxy-authorization"}
)
_SECRET_QUERY = frozenset({"key", "api_key", "apikey", "access_token"})
_OPENAI_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_GEMINI_PATH_RE = re.compile(r"^/v1beta/models/([^/:]+):generateContent$")


@dataclass(frozen=True)
class ProviderSim:
    """How the emulator behaves for one provider.

    Args:
        max_concurrency: generation requests served at once; one more is refused like the real
            service refuses a burst (None: no cap).
        rps: at most ``max(1, floor(rps))`` generation requests accepted in any sliding 1 s
            window (None: no limit); refused ones get the provider's 429 (Ollama: 503).
        latency_s: time each accepted request takes before its reply (the concurrency slot is
            held meanwhile).
        fault_rate: probability in [0, 1] that an accepted request gets a fault.
        faults: fault kind → relative weight (kinds in ``FAULT_KINDS``).
        slow_s: extra delay of a "slow" fault.
        hang_s: how long a "hang" fault holds the connection (at most ``MAX_HANG_S``).
        retry_after_s: the wait an injected "rate_limit" fault asks for.
        require_key: when set, requests must carry this key (OpenAI/Ollama ``Authorization:
            Bearer``, Gemini ``x-goog-api-key``) or get the service's auth error.
        models: model names listed by the models endpoints; when non-empty, other models get
            the service's 404. Empty: a default list is shown and every model is accepted.

    Raises:
        ValueError: a value out of range or an unknown fault kind.
    """

    max_concurrency: int | None = None
    rps: float | None = None
    latency_s: float = 0.0
    fault_rate: float = 0.0
    faults: Mapping[str, float] = field(default_factory=lambda: dict(_DEFAULT_FAULTS))
    slow_s: float = 0.5
    hang_s: float = 10.0
    retry_after_s: float = 1.0
    require_key: str | None = field(default=None, repr=False)
    models: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(
                f"ProviderSim.max_concurrency must be >= 1 or None, got {self.max_concurrency!r}"
            )
        if self.rps is not None and not self.rps > 0:
            raise ValueError(f"ProviderSim.rps must be > 0 or None, got {self.rps!r}")
        if not 0.0 <= self.fault_rate <= 1.0:
            raise ValueError(f"ProviderSim.fault_rate must be in [0, 1], got {self.fault_rate!r}")
        for name in ("latency_s", "slow_s", "hang_s", "retry_after_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 <= value < math.inf):
                raise ValueError(f"ProviderSim.{name} must be a finite number >= 0, got {value!r}")
        if self.hang_s > MAX_HANG_S:
            raise ValueError(f"ProviderSim.hang_s must be <= {MAX_HANG_S}, got {self.hang_s!r}")
        unknown = sorted(set(self.faults) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(
                f"ProviderSim.faults has unknown kinds {unknown}; known: {', '.join(FAULT_KINDS)}"
            )
        if any(w < 0 for w in self.faults.values()):
            raise ValueError(f"ProviderSim.faults weights must be >= 0, got {dict(self.faults)!r}")
        if self.fault_rate > 0 and not any(w > 0 for w in self.faults.values()):
            raise ValueError("ProviderSim.fault_rate > 0 needs at least one fault with a positive weight")


@dataclass(frozen=True)
class RecordedRequest:
    """One request the emulator received.

    Attributes:
        time: wall-clock arrival (``time.time()``).
        monotonic: arrival on ``time.monotonic()`` (what the 1 s windows use).
        provider: "openai", "gemini", "ollama", or None for an unknown route.
        method / path: the HTTP method and path (a key in the query string is redacted).
        model: the model named by the request ("" when none).
        body: the parsed JSON body (None when absent or not JSON).
        headers: request headers, auth values replaced by "***".
        status: the status answered (None while in flight or when the connection was dropped).
        fault: the injected fault kind, "rate_limited"/"busy" for a limit hit, else None.
        duration_s: time to the answer (None while in flight).
    """

    time: float
    monotonic: float
    provider: str | None
    method: str
    path: str
    model: str
    body: Any
    headers: Mapping[str, str]
    status: int | None = None
    fault: str | None = None
    duration_s: float | None = None


@dataclass(frozen=True)
class EmulatorStats:
    """What one provider saw (generation requests only).

    Attributes:
        provider: the provider name.
        requests: generation requests received (refused and faulted ones included).
        max_concurrency: most requests in flight at once, from arrival to answer.
        max_requests_per_1s: most arrivals in any sliding 1 s window.
        statuses: answered status → count (a dropped connection counts under 0).
        faults: injected fault kind (or limit refusal) → count.
        in_flight: requests not answered yet.
    """

    provider: str
    requests: int
    max_concurrency: int
    max_requests_per_1s: int
    statuses: Mapping[int, int]
    faults: Mapping[str, int]
    in_flight: int


class _ProviderState:
    """Counters and the RNG of one provider; every field guarded by the emulator's lock."""

    def __init__(self, name: str, sim: ProviderSim, seed: int) -> None:
        self.name = name
        self.sim = sim
        self.rng = random.Random(f"{seed}:{name}")
        self.accepted: deque[float] = deque()  # accepted arrivals in the last second (rps limit)
        self.arrivals: deque[float] = deque()  # every arrival in the last second (recorder)
        self.in_service = 0  # accepted and not answered (concurrency limit)
        self.in_flight = 0  # arrived and not answered (recorder)
        self.requests = 0
        self.max_concurrency = 0
        self.max_per_1s = 0
        self.statuses: dict[int, int] = {}
        self.faults: dict[str, int] = {}


class _Reply:
    """What a handler sends back: status, JSON (or raw) body and headers; ``drop`` closes instead."""

    def __init__(
        self,
        status: int,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.status = status
        self.raw = raw if raw is not None else json.dumps(body).encode()
        self.headers = dict(headers or {})
        self.content_type = content_type
        self.drop = False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # We join handler threads ourselves, with a bound, after closing their sockets.
    block_on_close = False
    emulator: Emulator

    def __init__(self, address: tuple[str, int], emulator: Emulator) -> None:
        self.emulator = emulator
        self.handler_threads: set[threading.Thread] = set()
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._run_request,
            args=(request, client_address),
            name=f"llm-emulator-conn-{client_address[1]}",
            daemon=True,
        )
        with self.conn_lock:
            self.handler_threads.add(thread)
            self.connections.add(request)
        thread.start()

    def _run_request(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.conn_lock:
                self.handler_threads.discard(threading.current_thread())
                self.connections.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-reply is normal under faults and timeouts; stay quiet.
        pass

    def close_connections(self) -> list[threading.Thread]:
        with self.conn_lock:
            conns, threads = list(self.connections), list(self.handler_threads)
        for conn in conns:
            # Wakes handler threads blocked reading an idle keep-alive connection.
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        return threads


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as requests.Session pools connections
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        # The emulator never prints: tests and the CLI own the output.
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        reply = self.server.emulator._handle(
            method, self.path, dict(self.headers.items()), raw, self.connection
        )
        if reply.drop:
            self.close_connection = True
            return
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.raw)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.raw)
        except OSError:
            self.close_connection = True


class Emulator:
    """A local server that speaks the openai, gemini and ollama APIs (see the module docstring).

    Use it as a context manager::

        with Emulator(providers={"openai": ProviderSim(max_concurrency=2, rps=5)}, seed=1) as emu:
            cfg = ProviderConfig(base_url=emu.url("openai"), api_key="test")
            ...
            assert emu.stats("openai").max_concurrency <= 2

    Args:
        providers: per-provider settings; providers left out get ``ProviderSim()`` (no limits,
            no faults, no latency).
        seed: seeds the fault RNGs (one per provider).
        host: the address to bind; keep 127.0.0.1 unless other machines must reach it.
        port: 0 picks a free port.
        max_records: requests kept for ``requests()``; the oldest are dropped past it, so a
            long ``serve`` run stays bounded (``stats()`` counters cover every request).

    Raises:
        ValueError: a provider name other than openai, gemini, ollama.
    """

    def __init__(
        self,
        providers: Mapping[str, ProviderSim] | None = None,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        max_records: int = 100_000,
    ) -> None:
        unknown = sorted(set(providers or {}) - set(PROVIDERS))
        if unknown:
            raise ValueError(f"Emulator providers {unknown} are not emulated; use {', '.join(PROVIDERS)}")
        self._sims = {name: (providers or {}).get(name, ProviderSim()) for name in PROVIDERS}
        self._seed = seed
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified whenever a request is answered
        self._stopping = threading.Event()
        self._states = {name: _ProviderState(name, sim, seed) for name, sim in self._sims.items()}
        # Keyed by arrival number; dict order is arrival order, so the oldest is evicted first.
        self._records: dict[int, RecordedRequest] = {}
        self._arrivals = 0
        self._max_records = max_records
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> Emulator:
        """Bind the socket and serve in a background thread; returns self. Idempotent."""
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self._host, self._port), self)
        # A short poll interval keeps stop() prompt: shutdown() waits for the serve loop to look.
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="llm-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving, drop open connections and join every server thread. Idempotent.

        Args:
            timeout_s: the longest wait for handler threads (they wake at once in practice:
                latency, slow and hang waits watch the same stop event).
        """
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        threads = server.close_connections()
        server.server_close()
        deadline = time.monotonic() + timeout_s
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._server = self._thread = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        """Whether the server is serving."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The bound port.

        Raises:
            RuntimeError: the emulator is not started.
        """
        if self._server is None:
            raise RuntimeError("Emulator is not started: call start() or use it as a context manager")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` with no trailing slash."""
        # A wildcard bind address is not a client target (Ollama's ConnectableHost does the same).
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self._host, self._host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    def url(self, provider: str) -> str:
        """The ``ProviderConfig.base_url`` for ``provider`` ("openai" gets the ``/v1`` suffix).

        Raises:
            ValueError: ``provider`` is not emulated.
        """
        if provider not in PROVIDERS:
            raise ValueError(f"no emulated provider {provider!r}; use one of {', '.join(PROVIDERS)}")
        return f"{self.base_url}/v1" if provider == "openai" else self.base_url

    # -- recorder ------------------------------------------------------------------------------

    def stats(self, provider: str) -> EmulatorStats:
        """What ``provider`` saw since the start or the last ``reset()``.

        Raises:
            ValueError: ``provider`` is not emulated.
        """
        if provider not in self._states:
            raise ValueError(f"no emulated provider {provider!r}; use one of {', '.join(PROVIDERS)}")
        with self._lock:
            st = self._states[provider]
            return EmulatorStats(
                provider=provider,
                requests=st.requests,
                max_concurrency=st.max_concurrency,
                max_requests_per_1s=st.max_per_1s,
                statuses=dict(st.statuses),
                faults=dict(st.faults),
                in_flight=st.in_flight,
            )

    def requests(self, provider: str | None = None) -> list[RecordedRequest]:
        """Every request received, oldest first (only ``provider``'s when given)."""
        with self._lock:
            return [r for r in self._records.values() if provider is None or r.provider == provider]

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        """Wait until no generation request is in flight (e.g. after client-side timeouts).

        Returns:
            True when idle, False when ``timeout_s`` passed first.
        """
        with self._idle:
            return self._idle.wait_for(
                lambda: all(st.in_flight == 0 for st in self._states.values()), timeout=timeout_s
            )

    def reset(self) -> None:
        """Forget recorded requests and counters and reseed the fault RNGs (limits keep running)."""
        with self._lock:
            self._records.clear()
            for name, old in self._states.items():
                new = _ProviderState(name, self._sims[name], self._seed)
                # Requests still in flight will decrement these when they finish.
                new.in_service, new.in_flight = old.in_service, old.in_flight
                new.accepted = old.accepted
                self._states[name] = new

    # -- request handling (called on handler threads) ------------------------------------------

    def _handle(
        self, method: str, target: str, headers: dict[str, str], raw: bytes, conn: socket.socket
    ) -> _Reply:
        parts = urlsplit(target)
        path = parts.path
        provider = _route_provider(path)
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        model = _model_of(provider, path, body)
        record = RecordedRequest(
            time=time.time(),
            monotonic=time.monotonic(),
            provider=provider,
            method=method,
            path=_redact_path(parts.path, parts.query),
            model=model,
            body=body,
            headers=_redact_headers(headers),
        )
        generation = provider is not None and method == "POST" and _is_generation(provider, path)
        with self._lock:
            index = self._arrivals
            self._arrivals += 1
            self._records[index] = record
            if len(self._records) > self._max_records:
                del self._records[next(iter(self._records))]
            st = self._states[provider] if generation and provider is not None else None
            if st is not None:
                self._arrive(st, record.monotonic)
        reply: _Reply | None = None
        fault: str | None = None
        try:
            if provider is None:
                reply = _Reply(404, raw=b"404 page not found", content_type="text/plain")
            elif not generation:
                reply = self._listing(provider, method, path, headers)
            else:
                assert st is not None
                reply, fault = self._generate(st, path, headers, raw, body, model, conn)
            return reply
        finally:
            done = time.monotonic()
            status = None if reply is None or reply.drop else reply.status
            with self._lock:
                if self._records.get(index) is record:
                    self._records[index] = replace(
                        record, status=status, fault=fault, duration_s=done - record.monotonic
                    )
                if st is not None and self._states.get(st.name) is st:
                    st.in_flight -= 1
                    st.statuses[status or 0] = st.statuses.get(status or 0, 0) + 1
                    if fault is not None:
                        st.faults[fault] = st.faults.get(fault, 0) + 1
                elif st is not None:
                    # reset() replaced the state while this request ran: settle on the new one.
                    self._states[st.name].in_flight -= 1
                self._idle.notify_all()

    def _arrive(self, st: _ProviderState, now: float) -> None:
        st.requests += 1
        st.in_flight += 1
        st.max_concurrency = max(st.max_concurrency, st.in_flight)
        st.arrivals.append(now)
        while st.arrivals and st.arrivals[0] <= now - 1.0:
            st.arrivals.popleft()
        st.max_per_1s = max(st.max_per_1s, len(st.arrivals))

    def _admit(self, st: _ProviderState) -> tuple[str | None, float, str | None]:
        """Limit checks and the fault draw, under the lock: (refusal, retry_after_s, fault)."""
        sim = st.sim
        now = time.monotonic()
        while st.accepted and st.accepted[0] <= now - 1.0:
            st.accepted.popleft()
        if sim.rps is not None and len(st.accepted) >= max(1, math.floor(sim.rps)):
            return "rate_limited", max(0.001, st.accepted[0] + 1.0 - now), None
        if sim.max_concurrency is not None and st.in_service >= sim.max_concurrency:
            return "busy", max(0.05, sim.latency_s), None
        st.accepted.append(now)
        st.in_service += 1
        fault = None
        # Draw for every accepted request, so the fault sequence depends only on arrival order.
        roll = st.rng.random()
        pick = st.rng.random()
        if roll < sim.fault_rate:
            kinds = [(k, w) for k, w in sim.faults.items() if w > 0]
            total = sum(w for _, w in kinds)
            acc = 0.0
            for kind, weight in kinds:
                acc += weight
                if pick * total < acc:
                    fault = kind
                    break
            else:
                fault = kinds[-1][0]
        return None, 0.0, fault

    def _generate(
        self,
        st: _ProviderState,
        path: str,
        headers: dict[str, str],
        raw: bytes,
        body: Any,
        model: str,
        conn: socket.socket,
    ) -> tuple[_Reply, str | None]:
        fmt = _FORMATS[st.name]
        sim = st.sim
        auth = fmt.check_key(sim.require_key, headers)
        if auth is not None:
            return auth, None
        if not isinstance(body, dict):
            return fmt.bad_json(raw), None
        if sim.models and _base_model(model) not in {_base_model(m) for m in sim.models}:
            return fmt.not_found(model), None
        parsed = fmt.parse(path, body)
        if isinstance(parsed, _Reply):
            return parsed, None
        with self._lock:
            refusal, retry_after_s, fault = self._admit(st)
        if refusal is not None:
            return fmt.limited(refusal, retry_after_s, model), refusal
        try:
            if fault == "rate_limit":
                return fmt.limited("rate_limited", sim.retry_after_s, model), fault
            if fault in ("server_error", "unavailable"):
                return fmt.server_error(500 if fault == "server_error" else 503), fault
            if fault == "hang":
                _wait_hang(conn, sim.hang_s, self._stopping)
                dropped = _Reply(0)
                dropped.drop = True
                return dropped, fault
            delay = sim.latency_s + (sim.slow_s if fault == "slow" else 0.0)
            if delay > 0 and self._stopping.wait(delay):
                dropped = _Reply(0)
                dropped.drop = True
                return dropped, fault
            text = reply_text(model, parsed.prompt, parsed.system, parsed.schema, parsed.json_mode)
            finish = "stop"
            if parsed.max_tokens is not None and count_tokens(text) > parsed.max_tokens:
                text, finish = truncate_tokens(text, parsed.max_tokens), "length"
            if fault == "truncated":
                text, finish = text[: max(1, len(text) // 2)], "length"
            prompt_tokens = count_tokens(parsed.prompt) + count_tokens(parsed.system or "")
            out = fmt.success(parsed, model, text, finish, prompt_tokens, blocked=fault == "blocked")
            if fault == "malformed":
                out = _Reply(200, raw=out.raw[: max(1, len(out.raw) // 2)], headers=out.headers)
            return out, fault
        finally:
            with self._lock:
                st.in_service -= 1

    def _listing(self, provider: str, method: str, path: str, headers: dict[str, str]) -> _Reply:
        fmt = _FORMATS[provider]
        sim = self._sims[provider]
        if provider != "ollama" or path not in ("/api/version", "/api/tags"):
            auth = fmt.check_key(sim.require_key, headers)
            if auth is not None:
                return auth
        models = sim.models or _DEFAULT_MODELS[provider]
        listing = fmt.listing(method, path, models)
        return listing if listing is not None else fmt.route_not_found(path)


def _wait_hang(conn: socket.socket, hang_s: float, stopping: threading.Event) -> None:
    """Hold a request without answering until ``hang_s`` passes, the client leaves, or stop()."""
    deadline = time.monotonic() + min(hang_s, MAX_HANG_S)
    while not stopping.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        # select() wakes when the client closes its end (readable, recv gives b""); the short
        # slice also lets stop() end the hang promptly without a second wake-up channel.
        try:
            readable, _, _ = select.select([conn], [], [], min(left, 0.05))
            if readable and conn.recv(1, socket.MSG_PEEK) == b"":
                return
        except (OSError, ValueError):
            return


# -- wire formats ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Parsed:
    prompt: str
    system: str | None
    schema: Mapping[str, Any] | None
    json_mode: bool
    max_tokens: int | None
    endpoint: str = ""
    stream: bool = False


class _Format:
    """One provider's dialect: parse a request, build replies and error bodies."""

    def check_key(self, key: str | None, headers: Mapping[str, str]) -> _Reply | None:
        raise NotImplementedError

    def bad_json(self, raw: bytes) -> _Reply:
        raise NotImplementedError

    def not_found(self, model: str) -> _Reply:
        raise NotImplementedError

    def route_not_found(self, path: str) -> _Reply:
        raise NotImplementedError

    def parse(self, path: str, body: dict[str, Any]) -> _Parsed | _Reply:
        raise NotImplementedError

    def limited(self, why: str, retry_after_s: float, model: str) -> _Reply:
        raise NotImplementedError

    def server_error(self, status: int) -> _Reply:
        raise NotImplementedError

    def success(
        self, parsed: _Parsed, model: str, text: str, finish: str, prompt_tokens: int, *, blocked: bool
    ) -> _Reply:
        raise NotImplementedError

    def listing(self, method: str, path: str, models: tuple[str, ...]) -> _Reply | None:
        raise NotImplementedError


def _header(headers: Mapping[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _bearer(headers: Mapping[str, str]) -> str | None:
    value = _header(headers, "authorization")
    if value is None or not value.startswith("Bearer "):
        return None
    return value[len("Bearer ") :].strip()


def _text_content(content: Any) -> str:
    """OpenAI/Ollama message content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _split_messages(messages: list[Any]) -> tuple[str, str | None]:
    users = [_text_content(m.get("content")) for m in messages if m.get("role") == "user"]
    systems = [_text_content(m.get("content")) for m in messages if m.get("role") in ("system", "developer")]
    return "\n".join(users), ("\n".join(systems) if systems else None)


class _OpenAI(_Format):
    @staticmethod
    def error(status: int, message: str, type_: str, code: str | None, param: str | None = None) -> _Reply:
        body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        return _Reply(status, body, {"x-request-id": f"req_{uuid.uuid4().hex[:24]}"})

    def check_key(self, key: str | None, headers: Mapping[str, str]) -> _Reply | None:
        if key is None:
            return None
        given = _bearer(headers)
        if not given:
            return self.error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                "invalid_request_error",
                None,
            )
        if given != key:
            # The real message shows the key's last 4 characters; that is all we echo too.
            return self.error(
                401,
                f"Incorrect API key provided: sk-...{given[-4:]}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                "invalid_request_error",
                "invalid_api_key",
            )
        return None

    def bad_json(self, raw: bytes) -> _Reply:
        return self.error(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't "
            "using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was "
            "sent was not valid JSON.)",
            "invalid_request_error",
            None,
        )

    def not_found(self, model: str) -> _Reply:
        return self.error(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        )

    def route_not_found(self, path: str) -> _Reply:
        return self.error(404, f"Invalid URL (GET {path})", "invalid_request_error", None)

    def parse(self, path: str, body: dict[str, Any]) -> _Parsed | _Reply:
        if not isinstance(body.get("model"), str) or not body["model"]:
            return self.error(400, "you must provide a model parameter", "invalid_request_error", None)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return self.error(
                400,
                "Missing required parameter: 'messages'.",
                "invalid_request_error",
                "missing_required_parameter",
                "messages",
            )
        prompt, system = _split_messages(messages)
        schema: Mapping[str, Any] | None = None
        json_mode = False
        fmt = body.get("response_format")
        if isinstance(fmt, dict):
            if fmt.get("type") == "json_object":
                json_mode = True
                if "json" not in f"{prompt}\n{system or ''}".lower():
                    return self.error(
                        400,
                        "'messages' must contain the word 'json' in some form, to use 'response_format' of "
                        "type 'json_object'.",
                        "invalid_request_error",
                        None,
                        "messages",
                    )
            elif fmt.get("type") == "json_schema":
                spec = fmt.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                    return self.error(
                        400,
                        "Missing required parameter: 'response_format.json_schema.name'.",
                        "invalid_request_error",
                        "missing_required_parameter",
                        "response_format.json_schema.name",
                    )
                if not _OPENAI_NAME_RE.match(spec["name"]):
                    return self.error(
                        400,
                        "Invalid 'response_format.json_schema.name': string does not match pattern. "
                        "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
                        "invalid_request_error",
                        "invalid_value",
                        "response_format.json_schema.name",
                    )
                raw_schema = spec.get("schema", {"type": "object"})
                if not isinstance(raw_schema, dict):
                    return self.error(
                        400,
                        "Invalid type for 'response_format.json_schema.schema': expected an object.",
                        "invalid_request_error",
                        "invalid_type",
                        "response_format.json_schema.schema",
                    )
                schema = raw_schema
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return _Parsed(prompt, system, schema, json_mode, max_tokens if isinstance(max_tokens, int) else None)

    def limited(self, why: str, retry_after_s: float, model: str) -> _Reply:
        reply = self.error(
            429,
            f"Rate limit reached for {model} on requests per min (RPM): Limit reached. "
            f"Please try again in {_duration(retry_after_s)}.",
            "requests",
            "rate_limit_exceeded",
        )
        reply.headers.update(
            {
                "retry-after": str(max(1, math.ceil(retry_after_s))),
                "retry-after-ms": str(max(1, round(retry_after_s * 1000))),
                "x-ratelimit-remaining-requests": "0",
                "x-ratelimit-reset-requests": _duration(retry_after_s),
            }
        )
        return reply

    def server_error(self, status: int) -> _Reply:
        if status == 503:
            return self.error(503, "The server is overloaded or not ready yet.", "server_error", None)
        return self.error(
            500,
            "The server had an error while processing your request. Sorry about that!",
            "server_error",
            None,
        )

    def success(
        self, parsed: _Parsed, model: str, text: str, finish: str, prompt_tokens: int, *, blocked: bool
    ) -> _Reply:
        completion = 0 if blocked else count_tokens(text)
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if blocked:
            message = {"role": "assistant", "content": None, "refusal": "I'm sorry, I can't help with that."}
            finish = "stop"
        body = {
            "id": f"chatcmpl-emu{uuid.uuid4().hex[:20]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": None}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        }
        return _Reply(200, body, {"x-request-id": f"req_{uuid.uuid4().hex[:24]}"})

    def listing(self, method: str, path: str, models: tuple[str, ...]) -> _Reply | None:
        if method == "GET" and path.rstrip("/") == "/v1/models":
            data = [
                {"id": m, "object": "model", "created": 1700000000, "owned_by": "emulator"} for m in models
            ]
            return _Reply(200, {"object": "list", "data": data})
        return None


class _Gemini(_Format):
    @staticmethod
    def error(status: int, rpc: str, message: str, details: list[dict[str, Any]] | None = None) -> _Reply:
        err: dict[str, Any] = {"code": status, "message": message, "status": rpc}
        if details:
            err["details"] = details
        return _Reply(status, {"error": err}, content_type="application/json; charset=UTF-8")

    def check_key(self, key: str | None, headers: Mapping[str, str]) -> _Reply | None:
        if key is None:
            return None
        given = _header(headers, "x-goog-api-key")
        if not given:
            return self.error(
                403,
                "PERMISSION_DENIED",
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        if given != key:
            return self.error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID",
                        "domain": "googleapis.com",
                        "metadata": {"service": "generativelanguage.googleapis.com"},
                    }
                ],
            )
        return None

    def bad_json(self, raw: bytes) -> _Reply:
        return self.error(400, "INVALID_ARGUMENT", "Invalid JSON payload received. Unexpected token.")

    def not_found(self, model: str) -> _Reply:
        return self.error(
            404,
            "NOT_FOUND",
            f"models/{model} is not found for API version v1beta, or is not supported for generateContent. "
            "Call ListModels to see the list of available models and their supported methods.",
        )

    def route_not_found(self, path: str) -> _Reply:
        return self.error(404, "NOT_FOUND", f"Requested entity was not found: {path}")

    def parse(self, path: str, body: dict[str, Any]) -> _Parsed | _Reply:
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return self.error(
                400, "INVALID_ARGUMENT", "* GenerateContentRequest.contents: contents is not specified"
            )
        texts: list[str] = []
        for content in contents:
            if isinstance(content, dict) and content.get("role", "user") == "user":
                for part in content.get("parts") or []:
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        texts.append(part["text"])
        if not texts:
            return self.error(
                400,
                "INVALID_ARGUMENT",
                "* GenerateContentRequest.contents[0].parts: contents.parts must not be empty.",
            )
        system: str | None = None
        instruction = body.get("systemInstruction")
        if isinstance(instruction, dict):
            parts = instruction.get("parts") or []
            system = "\n".join(str(p.get("text", "")) for p in parts if isinstance(p, dict)) or None
        config = body.get("generationConfig") or {}
        if not isinstance(config, dict):
            return self.error(
                400, "INVALID_ARGUMENT", 'Invalid JSON payload received. Unknown name "generationConfig"'
            )
        mime = config.get("responseMimeType")
        json_schema, open_schema = config.get("responseJsonSchema"), config.get("responseSchema")
        if json_schema is not None and open_schema is not None:
            return self.error(
                400,
                "INVALID_ARGUMENT",
                "responseJsonSchema and responseSchema cannot both be set. "
                "Only one of them may be specified.",
            )
        schema = json_schema if json_schema is not None else open_schema
        if schema is not None and mime != "application/json":
            return self.error(
                400,
                "INVALID_ARGUMENT",
                "* GenerateContentRequest.generation_config.response_mime_type: response_mime_type must be "
                "application/json when response_schema is set.",
            )
        if schema is not None and not isinstance(schema, dict):
            return self.error(
                400, "INVALID_ARGUMENT", "* GenerateContentRequest.generation_config.response_schema"
            )
        max_tokens = config.get("maxOutputTokens")
        return _Parsed(
            "\n".join(texts),
            system,
            schema,
            mime == "application/json" and schema is None,
            max_tokens if isinstance(max_tokens, int) else None,
        )

    def limited(self, why: str, retry_after_s: float, model: str) -> _Reply:
        return self.error(
            429,
            "RESOURCE_EXHAUSTED",
            "You exceeded your current quota, please check your plan and billing details.",
            [
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": (
                                "generativelanguage.googleapis.com/generate_content_free_tier_requests"
                            ),
                            "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                            "quotaDimensions": {"location": "global", "model": model},
                            "quotaValue": "10",
                        }
                    ],
                },
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": _proto_duration(retry_after_s),
                },
            ],
        )

    def server_error(self, status: int) -> _Reply:
        if status == 503:
            return self.error(503, "UNAVAILABLE", "The model is overloaded. Please try again later.")
        return self.error(
            500,
            "INTERNAL",
            "An internal error has occurred. Please retry or report in "
            "https://developers.generativeai.google/guide/troubleshooting",
        )

    def success(
        self, parsed: _Parsed, model: str, text: str, finish: str, prompt_tokens: int, *, blocked: bool
    ) -> _Reply:
        if blocked:
            return _Reply(
                200,
                {
                    "promptFeedback": {"blockReason": "SAFETY"},
                    "usageMetadata": {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens},
                    "modelVersion": model,
                },
            )
        completion = count_tokens(text)
        body = {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [{"text": text}]},
                    "finishReason": "MAX_TOKENS" if finish == "length" else "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": prompt_tokens,
                "candidatesTokenCount": completion,
                "totalTokenCount": prompt_tokens + completion,
            },
            "modelVersion": model,
            "responseId": uuid.uuid4().hex[:22],
        }
        return _Reply(200, body, content_type="application/json; charset=UTF-8")

    @staticmethod
    def model_info(model: str) -> dict[str, Any]:
        return {
            "name": f"models/{model}",
            "version": "001",
            "displayName": model,
            "description": "Emulated by llm_executor.testing",
            "inputTokenLimit": 1048576,
            "outputTokenLimit": 65536,
            "supportedGenerationMethods": ["generateContent", "countTokens"],
            "temperature": 1.0,
            "maxTemperature": 2.0,
            "topP": 0.95,
            "topK": 64,
            "thinking": False,
        }

    def listing(self, method: str, path: str, models: tuple[str, ...]) -> _Reply | None:
        if method != "GET":
            return None
        if path.rstrip("/") == "/v1beta/models":
            return _Reply(200, {"models": [self.model_info(m) for m in models]})
        if path.startswith("/v1beta/models/"):
            name = path[len("/v1beta/models/") :]
            if name in models:
                return _Reply(200, self.model_info(name))
            return self.not_found(name)
        return None


class _Ollama(_Format):
    @staticmethod
    def error(status: int, message: str) -> _Reply:
        return _Reply(status, {"error": message}, content_type="application/json; charset=utf-8")

    def check_key(self, key: str | None, headers: Mapping[str, str]) -> _Reply | None:
        if key is not None and _bearer(headers) != key:
            return self.error(401, "unauthorized")
        return None

    def bad_json(self, raw: bytes) -> _Reply:
        return self.error(400, "invalid character in request body" if raw else "missing request body")

    def not_found(self, model: str) -> _Reply:
        return self.error(404, f'model "{model}" not found, try pulling it first')

    def route_not_found(self, path: str) -> _Reply:
        return _Reply(404, raw=b"404 page not found", content_type="text/plain")

    def parse(self, path: str, body: dict[str, Any]) -> _Parsed | _Reply:
        if not isinstance(body.get("model"), str) or not body["model"]:
            return self.error(400, "model is required")
        if path == "/api/chat":
            messages = body.get("messages")
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                return self.error(400, "messages is required")
            prompt, system = _split_messages(messages)
        else:
            prompt = str(body.get("prompt") or "")
            system = body.get("system") if isinstance(body.get("system"), str) else None
        fmt = body.get("format")
        schema = fmt if isinstance(fmt, dict) else None
        if fmt is not None and fmt != "" and fmt != "json" and schema is None:
            return self.error(400, f"invalid format: {json.dumps(fmt)}")
        options = body.get("options") or {}
        max_tokens = options.get("num_predict") if isinstance(options, dict) else None
        if not isinstance(max_tokens, int) or max_tokens < 0:
            max_tokens = None
        # Ollama streams NDJSON unless told "stream": false, a classic adapter bug to catch.
        stream = body.get("stream", True) is not False
        return _Parsed(prompt, system, schema, fmt == "json", max_tokens, endpoint=path, stream=stream)

    def limited(self, why: str, retry_after_s: float, model: str) -> _Reply:
        # Ollama sends no Retry-After: a full queue is a plain 503.
        return self.error(503, "server busy, please try again.  maximum pending requests exceeded")

    def server_error(self, status: int) -> _Reply:
        if status == 503:
            return self.error(503, "server busy, please try again.  maximum pending requests exceeded")
        return self.error(500, "llama runner process has terminated: exit status 2")

    def success(
        self, parsed: _Parsed, model: str, text: str, finish: str, prompt_tokens: int, *, blocked: bool
    ) -> _Reply:
        if blocked:
            text = ""
        completion = count_tokens(text)
        body: dict[str, Any] = {
            "model": model,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if parsed.endpoint == "/api/chat":
            body["message"] = {"role": "assistant", "content": text}
        else:
            body["response"] = text
        body.update(
            {
                "done": True,
                "done_reason": finish,
                "total_duration": 1_000_000 * (1 + completion),
                "load_duration": 1_000_000,
                "prompt_eval_duration": 1_000_000,
                "eval_duration": 1_000_000 * completion,
            }
        )
        # Go's omitempty: a zero count is absent from the JSON, as on a real server.
        if prompt_tokens:
            body["prompt_eval_count"] = prompt_tokens
        if completion:
            body["eval_count"] = completion
        if parsed.stream:
            chunk: dict[str, Any] = {"model": model, "created_at": body["created_at"], "done": False}
            if parsed.endpoint == "/api/chat":
                chunk["message"] = {"role": "assistant", "content": text}
                body["message"] = {"role": "assistant", "content": ""}
            else:
                chunk["response"], body["response"] = text, ""
            lines = [json.dumps(chunk), json.dumps(body)]
            return _Reply(200, raw="\n".join(lines).encode() + b"\n", content_type="application/x-ndjson")
        return _Reply(200, body, content_type="application/json; charset=utf-8")

    def listing(self, method: str, path: str, models: tuple[str, ...]) -> _Reply | None:
        if method == "GET" and path == "/api/version":
            return _Reply(200, {"version": "0.12.0"})
        if method == "GET" and path == "/api/tags":
            tags = [
                {
                    "name": f"{_base_model(m)}:latest" if ":" not in m else m,
                    "model": f"{_base_model(m)}:latest" if ":" not in m else m,
                    "modified_at": "2025-01-01T00:00:00Z",
                    "size": 2019393189,
                    "digest": _digest(m),
                    "details": {
                        "format": "gguf",
                        "family": "llama",
                        "parameter_size": "3.2B",
                        "quantization_level": "Q4_K_M",
                    },
                }
                for m in models
            ]
            return _Reply(200, {"models": tags})
        return None


_FORMATS: dict[str, _Format] = {"openai": _OpenAI(), "gemini": _Gemini(), "ollama": _Ollama()}


def _digest(text: str) -> str:
    """A stable fake digest for a model name."""
    return hashlib.sha256(text.encode()).hexdigest()


def _route_provider(path: str) -> str | None:
    if path.startswith("/v1beta/"):
        return "gemini"
    if path.startswith("/v1/") or path == "/v1":
        return "openai"
    if path.startswith("/api/"):
        return "ollama"
    return None


def _is_generation(provider: str, path: str) -> bool:
    if provider == "openai":
        return path == "/v1/chat/completions"
    if provider == "gemini":
        return _GEMINI_PATH_RE.match(path) is not None
    return path in ("/api/chat", "/api/generate")


def _model_of(provider: str | None, path: str, body: Any) -> str:
    if provider == "gemini":
        match = _GEMINI_PATH_RE.match(path)
        return match.group(1) if match else ""
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return str(body["model"])
    return ""


def _base_model(name: str) -> str:
    return name[: -len(":latest")] if name.endswith(":latest") else name


def _redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for name, value in headers.items():
        if name.lower() in _SECRET_HEADERS:
            scheme = value.split(" ", 1)[0] + " " if value.startswith(("Bearer ", "Basic ")) else ""
            out[name] = f"{scheme}***"
        else:
            out[name] = value
    return out


def _redact_path(path: str, query: str) -> str:
    if not query:
        return path
    pairs = [
        (k, "***" if k.lower() in _SECRET_QUERY else v) for k, v in parse_qsl(query, keep_blank_values=True)
    ]
    return f"{path}?{urlencode(pairs, safe='*')}"


def _duration(seconds: float) -> str:
    """A Go-style duration like OpenAI's reset headers: "20ms", "1.5s"."""
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"


def _proto_duration(seconds: float) -> str:
    """A protobuf Duration JSON string like Gemini's retryDelay: "17s", "0.250s"."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds:.3f}s"


def serve(
    host: str = "127.0.0.1",
    port: int = 8080,
    providers: Mapping[str, ProviderSim] | None = None,
    seed: int = 0,
    *,
    on_ready: Callable[[Emulator], None] | None = None,
    stop_event: threading.Event | None = None,
) -> Emulator:
    """Run an emulator until KeyboardInterrupt (or ``stop_event``); prints nothing itself.

    Args:
        host: the address to bind.
        port: the port (0 picks a free one).
        providers: per-provider settings, as for ``Emulator``.
        seed: the fault RNG seed.
        on_ready: called with the started emulator (the CLI prints ``emu.url(...)`` from it).
        stop_event: when set, the call returns (lets tests and embedding code stop it).

    Returns:
        The stopped emulator, whose ``stats()`` and ``requests()`` remain readable.
    """
    emu = Emulator(providers, seed=seed, host=host, port=port)
    emu.start()
    event = stop_event if stop_event is not None else threading.Event()
    try:
        if on_ready is not None:
            on_ready(emu)
        # Event.wait without a timeout is not interruptible by Ctrl-C on every platform; a
        # 0.5 s slice keeps KeyboardInterrupt prompt.
        while not event.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        emu.stop()
    return emu
