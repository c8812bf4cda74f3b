"""Every built-in adapter, through an Executor, against every hostile loopback server (issue 11).

For each pair: the typed error the caller gets, the time bound it arrives within, the worker
threads back after ``shutdown(wait=True)``, and the canary key nowhere a user could look:
exceptions and their chains, log records at DEBUG (ours, urllib3's, requests'), reprs of every
config object, ``stats()`` and the Prometheus text.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.errors import DeadlineExceededError, LLMExecutorError, ProviderError, ProviderUnavailableError
from tests.adversarial.hostile_servers import (
    CANARY_KEY,
    Behaviour,
    Canary,
    HostileServer,
    canned,
    gzip_bomb,
    gzip_bomb_single,
    header_flood,
    huge_body,
    key_echo,
    long_header_line,
    redirect,
    reset,
    reset_mid_body,
    silent,
    trickle_body,
    trickle_head,
)

ADAPTERS = ("openai", "gemini", "ollama")
ATTEMPT_TIMEOUT_S = 0.6
# A shared 2-core machine: the bound plus this much is still "on time".
SLACK_S = 1.5


@dataclass(frozen=True)
class Case:
    behaviour: Callable[[], Behaviour]
    error: type[LLMExecutorError]
    retryable: bool | None  # None: not a ProviderError
    bound_s: float  # the error must arrive within this (+ SLACK_S)
    slow: bool = False


CASES: dict[str, Case] = {
    "silent": Case(silent, ProviderUnavailableError, True, ATTEMPT_TIMEOUT_S, slow=True),
    "trickle-head": Case(lambda: trickle_head(0.05), ProviderUnavailableError, True, ATTEMPT_TIMEOUT_S, slow=True),
    "trickle-body": Case(lambda: trickle_body(0.05), ProviderUnavailableError, True, ATTEMPT_TIMEOUT_S, slow=True),
    "huge": Case(lambda: huge_body(1 << 30), ProviderError, False, 5.0),
    "huge-chunked": Case(lambda: huge_body(1 << 30, chunked=True), ProviderError, False, 5.0, slow=True),
    "gzip-bomb": Case(lambda: gzip_bomb(1 << 30), ProviderError, False, 5.0, slow=True),
    "invalid-utf8": Case(lambda: canned("200 OK", b'{"choices": "\xff\xfe\xfd"}'), ProviderError, False, 0.0),
    "html-200": Case(lambda: canned("200 OK", b"<html><body>Welcome to nginx</body></html>",
                                    {"Content-Type": "text/html"}), ProviderError, False, 0.0),
    "redirect": Case(lambda: redirect("http://127.0.0.1:1/steal?key=x"), ProviderError, False, 0.0),
    "reset": Case(reset, ProviderUnavailableError, True, 0.0),
    "reset-mid-body": Case(reset_mid_body, ProviderUnavailableError, True, 0.0),
    "redirect-307": Case(lambda: redirect("http://127.0.0.1:1/v1/chat/completions", "307 Temporary Redirect"),
                         ProviderError, False, 0.0),
    "header-flood": Case(header_flood, ProviderError, False, 0.0),
    "long-header": Case(long_header_line, ProviderError, False, 0.0),
    "key-echo-401": Case(key_echo, ProviderError, False, 0.0),
    "key-echo-500": Case(lambda: key_echo("500 Internal Server Error"), ProviderUnavailableError, True, 0.0),
    "key-echo-200": Case(lambda: key_echo("200 OK"), ProviderError, False, 0.0),
}


def _base_url(name: str, server: HostileServer) -> str:
    return server.url + "/v1" if name == "openai" else server.url


def _llm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("llm-executor")]


def _run_case(name: str, case: Case, *, request_timeout: float | None = None) -> None:
    before = set(_llm_threads())
    with HostileServer(case.behaviour()) as server, Canary() as canary:
        pcfg = ProviderConfig(base_url=_base_url(name, server), model="m", api_key=CANARY_KEY, max_retries=0,
                              timeout=ATTEMPT_TIMEOUT_S, connect_timeout=2.0)
        cfg = ExecutorConfig(providers={name: pcfg}, rate_backend="redis://user:" + CANARY_KEY + "@127.0.0.1:1/0")
        canary.check_object(cfg, "ExecutorConfig")
        canary.check_object(pcfg, "ProviderConfig")
        canary.check_text(repr(cfg.describe()), "describe()")
        ex = Executor(ExecutorConfig(providers={name: pcfg}))
        try:
            canary.check_object(ex, "Executor")
            started = time.monotonic()
            future = ex.submit(LLMRequest(name, "m", "hello", timeout=request_timeout))
            with pytest.raises(LLMExecutorError) as info:
                future.result(timeout=30)
            elapsed = time.monotonic() - started
            canary.check_text(_prometheus_text(ex), "prometheus")
        finally:
            shutdown_started = time.monotonic()
            ex.shutdown(wait=True)
            shutdown_s = time.monotonic() - shutdown_started
        # After shutdown: the deadline reaper settles the Future while the worker may still be
        # unwinding its (already shut) connection for a moment.
        stats = ex.stats()
        canary.check_text(repr(stats) + repr(stats.as_dict()), "stats()")
        exc = info.value
        canary.check_exception(exc)
        leaks = canary.leaks()
    assert not leaks, "\n".join(leaks)
    assert isinstance(exc, case.error), f"{type(exc).__name__}: {exc}"
    if case.retryable is not None and isinstance(exc, ProviderError):
        assert exc.retryable is case.retryable, exc
        assert exc.provider == name
    assert elapsed <= case.bound_s + SLACK_S, f"took {elapsed:.2f}s, bound {case.bound_s}s"
    assert shutdown_s <= SLACK_S, f"shutdown(wait=True) took {shutdown_s:.2f}s: a worker was still busy"
    names = set(stats[name].failed_by_error)
    assert names == {type(exc).__name__}, names
    assert stats[name].in_flight == 0 and stats[name].queued == 0
    # Lane workers are joined by shutdown, and the HTTP watchdog by the last attempt to finish.
    assert set(_llm_threads()) <= before, _llm_threads()


def _prometheus_text(ex: Executor) -> str:
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    ex.enable_prometheus(registry=registry)
    return str(prometheus_client.generate_latest(registry).decode())


@pytest.mark.parametrize("label", [k for k, c in CASES.items() if not c.slow])
@pytest.mark.parametrize("name", ADAPTERS)
def test_hostile_server_gives_a_typed_error_on_time_and_leaks_no_key(name: str, label: str) -> None:
    _run_case(name, CASES[label])


@pytest.mark.slow
@pytest.mark.parametrize("label", [k for k, c in CASES.items() if c.slow])
@pytest.mark.parametrize("name", ADAPTERS)
def test_slow_hostile_server_gives_a_typed_error_on_time_and_leaks_no_key(name: str, label: str) -> None:
    _run_case(name, CASES[label])


@pytest.mark.slow
@pytest.mark.parametrize("label", ["silent", "trickle-head", "trickle-body"])
def test_the_request_deadline_ends_a_slow_attempt_with_deadline_exceeded(label: str) -> None:
    # The deadline (0.4 s) comes before the attempt timeout (0.6 s): the caller sees the deadline,
    # and the worker is back then too (shutdown does not wait for the server).
    case = Case(CASES[label].behaviour, DeadlineExceededError, None, 0.4)
    _run_case("openai", case, request_timeout=0.4)


@pytest.mark.slow
def test_a_single_member_gzip_bomb_is_cut_at_the_cap() -> None:
    # One gzip member of 256 MiB: a decoder that inflated a whole read at once would blow past the cap.
    _run_case("openai", Case(lambda: gzip_bomb_single(256 << 20), ProviderError, False, 5.0))


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_an_unreachable_backend_url_with_a_password_never_shows_it(scheme: str) -> None:
    from tests.fakes import FakeProvider

    url = f"{scheme}://user:{CANARY_KEY}@127.0.0.1:1/0"
    cfg = ExecutorConfig(rate_backend=url, providers={"fake": ProviderConfig(qps=5, global_max_parallel=2)})
    with Canary() as canary:
        canary.check_object(cfg, "ExecutorConfig")
        canary.check_text(repr(cfg.describe()), "describe()")
        with pytest.raises(LLMExecutorError) as info:
            Executor(cfg, {"fake": FakeProvider()}).shutdown()
        canary.check_exception(info.value)
        leaks = canary.leaks()
    assert not leaks, "\n".join(leaks)
