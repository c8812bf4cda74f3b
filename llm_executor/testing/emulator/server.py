"""The emulator's core: the HTTP server, the request pipeline, limits, faults and the recorder.

``Emulator`` routes each request to the first wire format that recognises its path shape
(Gemini before OpenAI: both live under ``/v1``), and runs a generation request through key →
body → model → validation → limits → fault → latency → reply. The wire modules only say how
each outcome reads on their wire. Imports: the stdlib, ``..responder`` and this package.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from ..responder import count_tokens, reply_text, truncate_tokens
from .gemini import GeminiWire
from .limits import ProviderState
from .ollama import OllamaWire
from .openai import OpenAIWire
from .recorder import EmulatorStats, RecordedRequest, redact_headers, redact_path
from .sim import DEFAULT_MODELS, MAX_HANG_S, PROVIDERS, ProviderSim, sends_rate_limit_headers
from .wire import Completion, Parsed, Refusal, Reply, Route, WireFormat, base_model, rate_limit_headers

__all__ = ["Emulator", "serve"]

# Gemini first: under /v1 its routes (models/{m}:generateContent) and OpenAI's share a prefix.
_FORMATS: tuple[WireFormat, ...] = (GeminiWire(), OpenAIWire(), OllamaWire())
_FORMAT_OF: dict[str, WireFormat] = {f.provider: f for f in _FORMATS}


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
    # TCP_NODELAY on each connection (StreamRequestHandler.setup). Without it, a reply written in
    # more than one write (headers then body, or a stream's chunks) on a kept-alive connection
    # held its second segment back under Nagle's algorithm until the client's delayed ACK: ~40 ms
    # added to every reply after a connection's first. Real servers set it (Go's net/http does).
    disable_nagle_algorithm = True
    # A buffered wfile (StreamRequestHandler's wbufsize), so the status line, headers and a
    # fixed-length body leave in one write at the flush: one segment for a small reply. Every
    # reply path flushes: _dispatch below, send_error's replies at finish().
    wbufsize = -1
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        # The emulator never prints: tests and the CLI own the output.
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def parse_request(self) -> bool:
        # Called right after the request line is read: this is the request's arrival. Stamped
        # here, not after the headers, body and JSON are parsed, which on a busy in-process
        # emulator can take several GIL hand-offs (tens of ms) and made rate windows look busier
        # than what reached the socket.
        self.arrived = (time.time(), time.monotonic())
        return super().parse_request()

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length > 0 else b""
        reply = self.server.emulator._handle(
            method, self.path, dict(self.headers.items()), raw, self.connection, self.arrived
        )
        if reply.drop:
            self.close_connection = True
            return
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            if reply.chunks is None:
                self.send_header("Content-Length", str(len(reply.raw)))
            else:
                self.send_header("Transfer-Encoding", "chunked")
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            if reply.chunks is None:
                self.wfile.write(reply.raw)
            else:
                for chunk in reply.chunks:
                    if chunk:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True


class Emulator:
    """A local server that speaks the openai, gemini and ollama APIs (see the package docstring).

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
        sims = {name: (providers or {}).get(name, ProviderSim()) for name in PROVIDERS}
        self._seed = seed
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified whenever a request is answered
        self._stopping = threading.Event()
        self._states = {name: ProviderState(name, sim, seed) for name, sim in sims.items()}
        # One per provider, on the same lock: waiters of the shared-service latency model.
        self._service_changed = {name: threading.Condition(self._lock) for name in PROVIDERS}
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
        with self._lock:
            for changed in self._service_changed.values():
                changed.notify_all()
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
        self._check_provider(provider)
        return f"{self.base_url}/v1" if provider == "openai" else self.base_url

    @staticmethod
    def _check_provider(provider: str) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"no emulated provider {provider!r}; use one of {', '.join(PROVIDERS)}")

    # -- settings at run time -------------------------------------------------------------------

    def sim(self, provider: str) -> ProviderSim:
        """The settings ``provider`` runs with now."""
        self._check_provider(provider)
        with self._lock:
            return self._states[provider].sim

    def set_limits(self, provider: str, **changes: Any) -> ProviderSim:
        """Change ``provider``'s settings while it serves, e.g. ``emu.set_limits("openai", rpm=1110)``.

        Any ``ProviderSim`` field may change (limits, latency, capacity, faults, headers...). The
        limit windows keep running: a lowered limit applies to the next request, counted against
        what the window already holds, so a test can halve a hidden limit mid-run.

        Returns:
            The new settings.

        Raises:
            ValueError: an unknown provider, an unknown field or a value out of range.
        """
        self._check_provider(provider)
        unknown = sorted(set(changes) - set(ProviderSim.__dataclass_fields__))
        if unknown:
            raise ValueError(f"set_limits: {unknown} are not ProviderSim fields")
        with self._lock:
            state = self._states[provider]
            state.sim = replace(state.sim, **changes)
            # A new capacity changes every waiter's share of the service.
            self._service_changed[provider].notify_all()
            return state.sim

    # -- recorder ------------------------------------------------------------------------------

    def stats(self, provider: str) -> EmulatorStats:
        """What ``provider`` saw since the start or the last ``reset()``.

        Raises:
            ValueError: ``provider`` is not emulated.
        """
        self._check_provider(provider)
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
                new = ProviderState(name, old.sim, self._seed)
                # Requests still in flight will settle on the new state when they finish.
                new.carry_over(old)
                self._states[name] = new

    # -- request handling (called on handler threads) ------------------------------------------

    def _handle(
        self, method: str, target: str, headers: dict[str, str], raw: bytes, conn: socket.socket,
        arrived: tuple[float, float] | None = None,
    ) -> Reply:
        """Answer one request; ``arrived`` is (wall, monotonic) when its request line was read."""
        parts = urlsplit(target)
        path = parts.path
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        route = next((r for f in _FORMATS if (r := f.route(method, path, parts.query, headers)) is not None), None)
        owner = _FORMAT_OF[route.provider] if route else next((f for f in _FORMATS if f.owns(path, headers)), None)
        model = route.model if route and route.model else _body_model(body)
        wall, mono = arrived if arrived is not None else (time.time(), time.monotonic())
        record = RecordedRequest(
            time=wall,
            monotonic=mono,
            provider=owner.provider if owner else None,
            method=method,
            path=redact_path(parts.path, parts.query),
            model=model,
            body=body,
            headers=redact_headers(headers),
        )
        generation = route is not None and route.generation
        with self._lock:
            index = self._arrivals
            self._arrivals += 1
            self._records[index] = record
            if len(self._records) > self._max_records:
                del self._records[next(iter(self._records))]
            st = self._states[route.provider] if generation and route is not None else None
            if st is not None:
                st.arrive(record.monotonic)
        reply: Reply | None = None
        fault: str | None = None
        try:
            if owner is None:
                reply = Reply(404, b"404 page not found", content_type="text/plain")
            elif route is None:
                reply = owner.route_not_found(method, path)
            elif st is None:
                reply = self._info(owner, route, headers, body, model)
            else:
                reply, fault = self._generate(owner, st, route, headers, raw, body, model, conn)
            return reply
        finally:
            done = time.monotonic()
            status = None if reply is None or reply.drop else reply.status
            with self._lock:
                if self._records.get(index) is record:
                    self._records[index] = replace(
                        record, status=status, fault=fault, duration_s=done - record.monotonic
                    )
                if st is not None:
                    # reset() may have replaced the state while this request ran: settle on the new one.
                    current = self._states[st.name]
                    if current is st:
                        st.settle(status, fault)
                    else:
                        current.in_flight -= 1
                self._idle.notify_all()

    def _generate(
        self,
        fmt: WireFormat,
        st: ProviderState,
        route: Route,
        headers: dict[str, str],
        raw: bytes,
        body: Any,
        model: str,
        conn: socket.socket,
    ) -> tuple[Reply, str | None]:
        name, sim = st.name, st.sim
        auth = fmt.check_key(sim.require_key, headers)
        if auth is not None:
            return auth, None
        if not isinstance(body, dict):
            return fmt.bad_json(raw), None
        if not _model_known(sim, model):
            return fmt.model_not_found(route, model), None
        parsed = fmt.parse(route, body)
        if isinstance(parsed, Reply):
            return parsed, None
        answer = _answer(model, parsed, sim.thinking_tokens if parsed.thinking else 0)
        # OpenAI charges max_tokens at admission when given, else (here, knowing it) the reply.
        charged = answer.prompt_tokens + (
            parsed.max_tokens if parsed.max_tokens is not None else answer.completion_tokens + answer.thought_tokens
        )
        with self._lock:
            current = self._states[name]
            refusal, fault = current.admit(time.monotonic(), charged)
            rate_headers = self._rate_headers(current)
            current.last_used[model] = time.time()
        if refusal is not None:
            return _with_headers(fmt.limited(refusal, model), rate_headers), refusal.reason
        try:
            if fault == "rate_limit":
                injected = Refusal("rate_limited", sim.retry_after_s)
                return _with_headers(fmt.limited(injected, model), rate_headers), fault
            if fault in ("server_error", "unavailable"):
                return _with_headers(fmt.server_error(500 if fault == "server_error" else 503), rate_headers), fault
            if fault == "hang":
                _wait_hang(conn, sim.hang_s, self._stopping)
                return Reply.dropped(), fault
            delay = sim.latency_s + (sim.slow_s if fault == "slow" else 0.0)
            if delay > 0 and not self._serve(name, delay):
                return Reply.dropped(), fault
            out = _with_headers(fmt.success(route, parsed, _apply_fault(answer, fault)), rate_headers)
            if fault == "malformed":
                whole = out.body_bytes()
                out = Reply(200, whole[: max(1, len(whole) // 2)], out.headers, out.content_type)
            return out, fault
        finally:
            with self._lock:
                # reset() may have replaced the state meanwhile: the slot is the current state's.
                self._states[name].release()

    def _info(self, fmt: WireFormat, route: Route, headers: dict[str, str], body: Any, model: str) -> Reply:
        sim = self._states[route.provider].sim
        if not route.public:
            auth = fmt.check_key(sim.require_key, headers)
            if auth is not None:
                return auth
        if model and not _model_known(sim, model):
            return fmt.model_not_found(route, model)
        with self._lock:
            recent = dict(self._states[route.provider].last_used)
        return fmt.info(route, body, sim.models or DEFAULT_MODELS[route.provider], recent)

    def _rate_headers(self, st: ProviderState) -> dict[str, str]:
        if not sends_rate_limit_headers(st.name, st.sim):
            return {}
        return rate_limit_headers(*st.rate_windows(time.monotonic()))

    def _serve(self, name: str, work_s: float) -> bool:
        """Hold the request for its service time; False when stop() interrupted it."""
        capacity = self._states[name].sim.capacity
        if capacity is None:
            return not self._stopping.wait(work_s)
        changed = self._service_changed[name]
        with changed:
            service = self._states[name].service
            finish = service.start(time.monotonic(), work_s, capacity)
            # Every arrival and departure changes everyone's share: waiters recompute their wait.
            changed.notify_all()
            try:
                while not self._stopping.is_set():
                    capacity = self._states[name].sim.capacity
                    left = service.left_s(time.monotonic(), finish, capacity)
                    if left <= 0:
                        return True
                    changed.wait(left)
                return False
            finally:
                service.end(time.monotonic(), self._states[name].sim.capacity)
                changed.notify_all()

def _answer(model: str, parsed: Parsed, thought_tokens: int) -> Completion:
    """The responder's reply, cut at ``max_tokens`` (thoughts count against it, as on Gemini and o-series)."""
    text = reply_text(model, parsed.prompt, parsed.system, parsed.schema, parsed.json_mode)
    finish = "stop"
    if parsed.max_tokens is not None:
        thought_tokens = min(thought_tokens, parsed.max_tokens)
        cap = parsed.max_tokens - thought_tokens
        if count_tokens(text) > cap:
            text, finish = truncate_tokens(text, cap), "length"
    prompt_tokens = count_tokens(parsed.prompt) + count_tokens(parsed.system or "")
    return Completion(model, text, finish, prompt_tokens, count_tokens(text), thought_tokens=thought_tokens)


def _apply_fault(answer: Completion, fault: str | None) -> Completion:
    if fault == "truncated":
        text = answer.text[: max(1, len(answer.text) // 2)]
        return replace(answer, text=text, finish="length", completion_tokens=count_tokens(text))
    if fault == "blocked":
        return replace(answer, blocked=True)
    return answer


def _with_headers(reply: Reply, headers: Mapping[str, str]) -> Reply:
    reply.headers.update(headers)
    return reply


def _model_known(sim: ProviderSim, model: str) -> bool:
    return not sim.models or base_model(model) in {base_model(m) for m in sim.models}


def _body_model(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return str(body["model"])
    return ""


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
