"""An attempt of a built-in adapter ends at min(TIMEOUT, deadline), whatever the server does (issue 11 item 2).

``requests`` times each socket read, so a server trickling a byte per interval kept an attempt,
its worker and its MAX_PARALLEL slot for as long as it trickled. These tests pin the bound on each
path a socket can be blocked on (a fresh connection, a pooled one, head, body), the error class
for each bound, the slot coming back at the bound, and the watchdog's own lifecycle.
"""

from __future__ import annotations

import itertools
import json
import os
import ssl
import threading
import time

import pytest

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.errors import DeadlineExceededError, ProviderUnavailableError
from llm_executor.providers.openai import OpenAIProvider
from tests.adversarial.hostile_servers import (
    HostileServer,
    TrickleProxy,
    keep_alive_then,
    silent,
    trickle_body,
    trickle_head,
    wait_until,
)

SLACK_S = 1.5
OK_BODY = json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}).encode()


def _openai(server: HostileServer, **kw: object) -> OpenAIProvider:
    cfg = ProviderConfig(base_url=server.url + "/v1", model="m", max_retries=0, **kw)  # type: ignore[arg-type]
    return OpenAIProvider("openai", cfg)


@pytest.mark.parametrize("behaviour", [silent, lambda: trickle_head(0.05), lambda: trickle_body(0.05)],
                         ids=["silent", "trickle-head", "trickle-body"])
def test_the_attempt_timeout_bounds_the_whole_attempt_and_closes_the_connection(behaviour: object) -> None:
    with HostileServer(behaviour()) as server:  # type: ignore[operator]
        provider = _openai(server, timeout=0.5)
        started = time.monotonic()
        with pytest.raises(ProviderUnavailableError) as info:
            provider.complete(LLMRequest("openai", "m", "hi"))
        elapsed = time.monotonic() - started
        # The server sees the client leave at the bound (the old code kept reading for ever).
        assert wait_until(lambda: server.connections[0].closed_by_peer_s is not None, 5)
        held = server.connections[0].closed_by_peer_s - server.connections[0].opened_s  # type: ignore[operator]
    assert info.value.retryable is True and "LLM_EXECUTOR_OPENAI_TIMEOUT" in str(info.value)
    assert 0.45 <= elapsed <= 0.5 + SLACK_S, elapsed
    assert held <= 0.5 + SLACK_S, held


def test_a_request_deadline_shorter_than_the_timeout_ends_the_attempt_with_deadline_exceeded() -> None:
    with HostileServer(trickle_body(0.05)) as server:
        provider = _openai(server, timeout=30.0)
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as info:
            provider.complete(LLMRequest("openai", "m", "hi", request_id="rid-7", timeout=0.4))
        elapsed = time.monotonic() - started
    assert info.value.request_id == "rid-7" and info.value.provider == "openai"
    assert elapsed <= 0.4 + SLACK_S, elapsed


def test_a_pooled_connection_is_bounded_too() -> None:
    # The second call reuses the first one's connection: no connect(), the socket is picked up at send.
    with HostileServer(keep_alive_then(OK_BODY, trickle_body(0.05))) as server:
        provider = _openai(server, timeout=0.5)
        assert provider.complete(LLMRequest("openai", "m", "hi")).text == "hi"
        started = time.monotonic()
        with pytest.raises(ProviderUnavailableError):
            provider.complete(LLMRequest("openai", "m", "hi"))
        elapsed = time.monotonic() - started
        assert len(server.connections) == 1, "the second call was expected on the pooled connection"
    assert elapsed <= 0.5 + SLACK_S, elapsed


@pytest.mark.slow
def test_the_slot_comes_back_at_the_bound_and_retries_are_bounded_each() -> None:
    # MAX_PARALLEL=1: the second request can only start when the first one's attempts have ended.
    with HostileServer(trickle_body(0.05)) as server:
        pcfg = ProviderConfig(base_url=server.url + "/v1", model="m", max_parallel=1, max_retries=1,
                              timeout=0.4, backoff_max_s=0.0)
        with Executor(ExecutorConfig(providers={"openai": pcfg})) as ex:
            started = time.monotonic()
            first = ex.submit(LLMRequest("openai", "m", "one"))
            second = ex.submit(LLMRequest("openai", "m", "two"))
            for future in (first, second):
                with pytest.raises(ProviderUnavailableError):
                    future.result(timeout=30)
            elapsed = time.monotonic() - started
            stats = ex.stats()["openai"]
        opened = [c.opened_s for c in server.connections]
    assert stats.attempts == 4 and stats.max_in_flight == 1
    # Four attempts of 0.4 s one after the other: each connection opens when the previous attempt ended.
    assert len(opened) == 4
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    assert all(0.35 <= gap <= 0.4 + SLACK_S for gap in gaps), gaps
    assert elapsed <= 4 * 0.4 + 2 * SLACK_S, elapsed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_gets_its_own_watchdog() -> None:
    with HostileServer(silent()) as server:
        provider = _openai(server, timeout=0.3)
        # The parent's watchdog is running at the fork (an attempt of another thread is in flight).
        with HostileServer(silent()) as other:
            busy = threading.Thread(target=_expect_unavailable, args=(_openai(other, timeout=2.0),))
            busy.start()
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child reports through the pipe
                code = 1
                try:
                    started = time.monotonic()
                    try:
                        provider.complete(LLMRequest("openai", "m", "hi"))
                    except ProviderUnavailableError:
                        code = 0 if time.monotonic() - started < 0.3 + SLACK_S else 2
                finally:
                    os.write(write_fd, bytes([code]))
                    os._exit(0)
            os.close(write_fd)
            try:
                outcome = _read_with_timeout(read_fd, 10)
            finally:
                os.close(read_fd)
                os.waitpid(pid, 0)
            busy.join(10)
    assert outcome == b"\x00", outcome


def _read_with_timeout(fd: int, timeout_s: float) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], timeout_s)
    return os.read(fd, 1) if ready else b"timeout"


def _expect_unavailable(provider: OpenAIProvider) -> None:
    with pytest.raises(ProviderUnavailableError):
        provider.complete(LLMRequest("openai", "m", "hi"))


# --- HTTPS: the TLS socket after the handshake, and the handshake itself ------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, str]:
    """A server context with a certificate for 127.0.0.1, and the CA bundle path clients trust."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    bundle = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return server, str(bundle)


def _https_openai(base_url: str, bundle: str, timeout: float) -> OpenAIProvider:
    provider = OpenAIProvider("openai", ProviderConfig(base_url=base_url + "/v1", model="m", max_retries=0,
                                                       timeout=timeout))
    provider.session.verify = bundle
    return provider


def test_an_https_reply_is_served_through_the_guarded_connections(tls: tuple[ssl.SSLContext, str]) -> None:
    context, bundle = tls
    with HostileServer(keep_alive_then(OK_BODY, trickle_body(0.05)), tls=context) as server:
        provider = _https_openai(server.url, bundle, 0.5)
        assert provider.complete(LLMRequest("openai", "m", "hi")).text == "hi"
        started = time.monotonic()
        with pytest.raises(ProviderUnavailableError):  # the pooled TLS connection, trickled
            provider.complete(LLMRequest("openai", "m", "hi"))
        assert time.monotonic() - started <= 0.5 + SLACK_S


def test_an_https_body_trickle_is_cut_at_the_bound(tls: tuple[ssl.SSLContext, str]) -> None:
    context, bundle = tls
    with HostileServer(trickle_body(0.05), tls=context) as server:
        provider = _https_openai(server.url, bundle, 0.5)
        started = time.monotonic()
        with pytest.raises(ProviderUnavailableError):
            provider.complete(LLMRequest("openai", "m", "hi"))
        elapsed = time.monotonic() - started
    assert elapsed <= 0.5 + SLACK_S, elapsed


@pytest.mark.slow
def test_a_trickled_tls_handshake_is_cut_at_the_bound(tls: tuple[ssl.SSLContext, str]) -> None:
    # The certificate arrives a byte per 50 ms (a minute in all). CPython times a handshake as a
    # whole by the socket timeout: the connect timeout (10 s here) must be cut to the budget.
    context, bundle = tls
    with HostileServer(keep_alive_then(OK_BODY, silent()), tls=context) as server, \
            TrickleProxy(server.port, 0.05) as proxy:
        provider = _https_openai(f"https://127.0.0.1:{proxy.port}", bundle, 0.6)
        started = time.monotonic()
        with pytest.raises(ProviderUnavailableError) as info:
            provider.complete(LLMRequest("openai", "m", "hi"))
        elapsed = time.monotonic() - started
        assert wait_until(lambda: bool(proxy.client_closed_s), 5), "the client never closed the connection"
    assert "within 0.6s" in str(info.value), info.value
    assert elapsed <= 0.6 + SLACK_S, elapsed
