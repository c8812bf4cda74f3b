"""The shared HTTP base: Retry-After, error bodies, timeouts, transport errors, redirects, sessions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import requests
import responses

from llm_executor.config import ProviderConfig
from llm_executor.errors import InvalidRequestError, ProviderError, ProviderUnavailableError
from llm_executor.providers.base import (
    ErrorInfo,
    build_session,
    freeze_environment,
    parse_duration_s,
    parse_error_body,
    parse_retry_after,
)
from llm_executor.providers.ollama import OllamaProvider
from llm_executor.providers.openai import OpenAIProvider
from llm_executor.types import LLMRequest
from tests.providers.provider_fixtures import OLLAMA_OK, OLLAMA_URL, OPENAI_OK, OPENAI_URL

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def req(**kw: object) -> LLMRequest:
    fields: dict[str, object] = {"provider": "openai", "model": "gpt-4o-mini", "prompt": "Hi"}
    fields.update(kw)
    return LLMRequest(**fields)  # type: ignore[arg-type]


def openai(**kw: object) -> OpenAIProvider:
    cfg: dict[str, object] = {"api_key": "sk-test"}
    cfg.update(kw)
    return OpenAIProvider("openai", ProviderConfig(**cfg))  # type: ignore[arg-type]


# --- parse_retry_after ---------------------------------------------------------------------------

@pytest.mark.parametrize(("headers", "expected"), [
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after-ms": "20000", "retry-after": "99"}, 20.0),     # ms wins
    ({"retry-after": "20"}, 20.0),
    ({"retry-after": "0.5"}, 0.5),
    ({"retry-after": "Thu, 01 Jan 2026 12:00:30 GMT"}, 30.0),
    ({"retry-after": "Thu, 01 Jan 2026 11:00:00 GMT"}, 0.0),     # a past date: no wait
    ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),        # bad ms falls through
    ({"retry-after": "garbage"}, None),
    ({"retry-after": "-5"}, None),
    ({"retry-after": "nan"}, None),
    ({}, None),
])
def test_parse_retry_after_reads_ms_seconds_and_http_dates(headers: dict[str, str],
                                                           expected: float | None) -> None:
    assert parse_retry_after(headers, now=NOW) == expected


def test_parse_retry_after_is_case_insensitive_on_requests_headers() -> None:
    headers = requests.structures.CaseInsensitiveDict({"Retry-After": "7"})
    assert parse_retry_after(headers) == 7.0


@pytest.mark.parametrize(("text", "expected"), [("17s", 17.0), ("0.5s", 0.5), ("17", None), (17, None),
                                                (None, None)])
def test_parse_duration_s_reads_protobuf_durations(text: object, expected: float | None) -> None:
    assert parse_duration_s(text) == expected


# --- parse_error_body ----------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "expected"), [
    (b'{"error": {"message": "bad", "type": "invalid_request_error", "code": "x"}}',
     ErrorInfo(message="bad", code="x", type="invalid_request_error")),
    (b'{"error": "model not found"}', ErrorInfo(message="model not found")),
    (b'[{"error": {"code": 429, "message": "slow", "status": "RESOURCE_EXHAUSTED"}}]',
     ErrorInfo(message="slow", code="429", status="RESOURCE_EXHAUSTED")),
    (b'{"error": [{"message": "wrapped"}]}', ErrorInfo(message="wrapped")),
    (b'{"object": "error", "message": "vllm old", "type": "BadRequestError", "code": 400}',
     ErrorInfo(message="vllm old", code="400", type="BadRequestError")),
    (b"<html><body><h1>502 Bad Gateway</h1></body></html>", ErrorInfo(message="502 Bad Gateway")),
    (b"", ErrorInfo(message="")),
    (b"null", ErrorInfo(message="")),
    (b'{"error": null}', ErrorInfo(message="")),
    (b"\xff\xfe not utf8", ErrorInfo(message="\ufffd\ufffd not utf8")),
])
def test_parse_error_body_accepts_every_shape(body: bytes, expected: ErrorInfo) -> None:
    assert parse_error_body(body) == expected


def test_parse_error_body_keeps_only_object_details() -> None:
    info = parse_error_body(b'{"error": {"message": "m", "details": [{"@type": "t"}, "junk", 3]}}')
    assert info.details == ({"@type": "t"},)


# --- timeouts, session, redirects ----------------------------------------------------------------

def test_timeout_is_connect_and_config_read_without_a_deadline(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    openai(timeout=42.0, connect_timeout=3.0).complete(req())
    assert wire.calls[0].request.req_kwargs["timeout"] == (3.0, 42.0)


def test_read_timeout_is_cut_to_the_time_left_before_the_deadline(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    openai(timeout=60.0, connect_timeout=3.0).complete(req(timeout=7.5))
    assert wire.calls[0].request.req_kwargs["timeout"] == (3.0, 7.5)


def test_read_timeout_keeps_the_config_cap_when_the_deadline_is_far(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    openai(timeout=5.0).complete(req(timeout=300.0))
    assert wire.calls[0].request.req_kwargs["timeout"][1] == 5.0


def test_built_session_pools_max_parallel_connections_and_never_retries() -> None:
    session = build_session(ProviderConfig(max_parallel=17))
    adapter = session.get_adapter("https://api.openai.com/v1")
    assert isinstance(adapter, requests.adapters.HTTPAdapter)
    assert adapter._pool_maxsize == 17  # type: ignore[attr-defined]
    assert adapter.max_retries.total == 0


def test_frozen_environment_keeps_proxies_and_no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # os.environ is what requests itself reads; there is no mapping to pass instead.
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    proxied, direct = requests.Session(), requests.Session()
    freeze_environment(proxied, "https://api.openai.com/v1")
    freeze_environment(direct, "http://127.0.0.1:11434")
    assert proxied.proxies["https"] == "http://proxy.example:3128"
    assert "https" not in direct.proxies
    assert not proxied.trust_env and not direct.trust_env


def test_built_session_reads_the_environment_once_at_the_first_call(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    provider = openai()
    assert provider.session.trust_env
    provider.complete(req())
    provider.complete(req())
    assert not provider.session.trust_env
    assert len(wire.calls) == 2


def test_injected_session_keeps_trust_env(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    session = requests.Session()
    OpenAIProvider("openai", ProviderConfig(api_key="sk-test"), session=session).complete(req())
    assert session.trust_env


def test_injected_session_is_used(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json=OPENAI_OK)
    session = requests.Session()
    session.headers["X-Test"] = "yes"
    provider = OpenAIProvider("openai", ProviderConfig(api_key="sk-test"), session=session)
    provider.complete(req())
    assert provider.session is session
    assert wire.calls[0].request.headers["X-Test"] == "yes"


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_redirect_is_not_followed_and_is_not_retryable(wire: responses.RequestsMock, status: int) -> None:
    wire.add(responses.POST, OPENAI_URL, status=status,
             headers={"Location": "https://evil.example.com/steal?key=x"})
    wire.add(responses.POST, "https://evil.example.com/steal", json=OPENAI_OK)
    with pytest.raises(ProviderError) as info:
        openai().complete(req())
    assert len(wire.calls) == 1
    assert info.value.status == status and info.value.retryable is False
    assert f"HTTP {status}" in str(info.value) and "evil" not in str(info.value)


# --- transport errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("exc", [
    requests.ConnectTimeout("timed out: https://api.openai.com/v1?x=1"),
    requests.ReadTimeout("read timed out"),
    requests.ConnectionError("Max retries exceeded with url: /v1/chat/completions?x=1"),
    requests.exceptions.ChunkedEncodingError("broken"),
])
def test_transport_errors_become_retryable_unavailable(wire: responses.RequestsMock,
                                                       exc: Exception) -> None:
    wire.add(responses.POST, OPENAI_URL, body=exc)
    with pytest.raises(ProviderUnavailableError) as info:
        openai().complete(req(request_id="rid-1"))
    err = info.value
    assert err.retryable is True and err.status is None
    assert err.provider == "openai" and err.request_id == "rid-1"
    assert err.__cause__ is None and err.__context__ is None  # requests exceptions hold URLs and headers
    assert "?x=1" not in str(err)


def test_read_timeout_message_names_the_read_timeout(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, body=requests.ReadTimeout("x"))
    with pytest.raises(ProviderUnavailableError, match=r"within 7.5s \(read timeout\)"):
        openai().complete(req(timeout=7.5))


def test_tls_error_is_not_retryable(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, body=requests.exceptions.SSLError("cert verify failed"))
    with pytest.raises(ProviderError) as info:
        openai().complete(req())
    assert info.value.retryable is False and "TLS" in str(info.value)


def test_unregistered_url_is_a_connection_error_not_the_network(wire: responses.RequestsMock) -> None:
    with pytest.raises(ProviderUnavailableError):
        openai().complete(req())


# --- statuses and bodies ---------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "cls", "retryable"), [
    (400, ProviderError, False), (401, ProviderError, False), (403, ProviderError, False),
    (404, ProviderError, False), (413, ProviderError, False), (422, ProviderError, False),
    (418, ProviderError, False), (408, ProviderUnavailableError, True),
    (500, ProviderUnavailableError, True), (502, ProviderUnavailableError, True),
    (503, ProviderUnavailableError, True), (504, ProviderUnavailableError, True),
    (501, ProviderUnavailableError, False),
])
def test_status_classes_and_retryable_flags(wire: responses.RequestsMock, status: int, cls: type,
                                            retryable: bool) -> None:
    wire.add(responses.POST, OLLAMA_URL, json={"error": "boom"}, status=status)
    provider = OllamaProvider("ollama", ProviderConfig())
    with pytest.raises(ProviderError) as info:
        provider.complete(req(provider="ollama", model="llama3.2"))
    assert type(info.value) is cls
    assert info.value.retryable is retryable and info.value.status == status
    assert "boom" in str(info.value)


def test_retry_after_header_is_carried_on_503(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OLLAMA_URL, json={"error": "busy"}, status=503, headers={"Retry-After": "4"})
    with pytest.raises(ProviderUnavailableError) as info:
        OllamaProvider("ollama", ProviderConfig()).complete(req(model="llama3.2"))
    assert info.value.retry_after_s == 4.0


def test_long_provider_messages_are_truncated(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OPENAI_URL, json={"error": {"message": "x" * 5000}}, status=400)
    with pytest.raises(ProviderError) as info:
        openai().complete(req())
    assert len(str(info.value)) < 500


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"', b"null", b""])
def test_a_2xx_body_that_is_not_a_json_object_is_malformed(wire: responses.RequestsMock, body: bytes) -> None:
    wire.add(responses.POST, OPENAI_URL, body=body, status=200)
    with pytest.raises(ProviderError, match="malformed response") as info:
        openai().complete(req())
    assert info.value.retryable is False and type(info.value) is ProviderError


def test_missing_model_names_the_variable() -> None:
    with pytest.raises(InvalidRequestError, match="LLM_EXECUTOR_OLLAMA_MODEL") as info:
        OllamaProvider("ollama", ProviderConfig()).complete(req(model=""))
    assert info.value.field == "model"


def test_config_model_is_used_when_the_request_has_none(wire: responses.RequestsMock) -> None:
    wire.add(responses.POST, OLLAMA_URL, json=OLLAMA_OK)
    OllamaProvider("ollama", ProviderConfig(model="qwen3")).complete(req(model=""))
    assert b'"model": "qwen3"' in wire.calls[0].request.body


def test_bad_json_schema_string_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequestError, match="json_schema"):
        openai().complete(req(json_schema="{not json"))


def test_repr_shows_name_and_masked_base_url_only() -> None:
    provider = openai(base_url="https://user:pw@proxy.example.com/v1?token=abc", api_key="sk-secret-123")
    text = repr(provider)
    assert "OpenAIProvider" in text and "proxy.example.com" in text
    assert "sk-secret-123" not in text and "pw" not in text and "abc" not in text


def test_an_error_hook_that_trips_over_the_body_still_gives_a_typed_error(wire: responses.RequestsMock) -> None:
    class Clumsy(OpenAIProvider):
        def _describe_error(self, status: int, info: object, model: str | None) -> str | None:
            raise TypeError("unhashable type: 'list'")

    wire.add(responses.POST, OPENAI_URL, status=503, json={"error": {"message": "busy"}})
    with pytest.raises(ProviderUnavailableError) as info:
        Clumsy("openai", ProviderConfig(api_key="sk-test")).complete(req())
    assert info.value.status == 503 and info.value.retryable
    assert "unexpected shape (TypeError)" in str(info.value)
    assert info.value.__context__ is None
