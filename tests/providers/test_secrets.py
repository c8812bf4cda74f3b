"""No API key in any exception message, repr, chain, log record or URL, on every error path.

Recognisable fake keys are configured; every failure the adapters can produce is driven,
including provider bodies and requests exceptions that *echo* the key, and everything a
user could see is scanned for the sentinel.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import requests
import responses

from llm_executor import Executor, ExecutorConfig
from llm_executor.config import ProviderConfig
from llm_executor.errors import ConfigError, LLMExecutorError, ProviderError
from llm_executor.providers.base import HTTPProvider
from llm_executor.providers.gemini import GeminiProvider
from llm_executor.providers.ollama import OllamaProvider
from llm_executor.providers.openai import OpenAIProvider
from llm_executor.types import LLMRequest
from tests.adversarial.hostile_servers import HostileServer, canned
from tests.providers.provider_fixtures import (
    GEMINI_400_BADKEY,
    GEMINI_429,
    GEMINI_429_DAILY,
    GEMINI_BLOCKED_200,
    GEMINI_KEY,
    GEMINI_URL,
    OLLAMA_404,
    OLLAMA_KEY,
    OLLAMA_URL,
    OPENAI_429,
    OPENAI_429_HEADERS,
    OPENAI_KEY,
    OPENAI_QUOTA_429,
    OPENAI_URL,
)

SENTINEL = "SENTINEL"

ADAPTERS: dict[str, tuple[type[HTTPProvider], str, str, str]] = {
    "openai": (OpenAIProvider, OPENAI_KEY, OPENAI_URL, "gpt-4o-mini"),
    "gemini": (GeminiProvider, GEMINI_KEY, GEMINI_URL, "gemini-2.5-flash"),
    "ollama": (OllamaProvider, OLLAMA_KEY, OLLAMA_URL, "llama3.2"),
}


def _echo(key: str) -> dict[str, Any]:
    return {"error": {"message": f"Incorrect API key provided: {key}. See https://x.example/?key={key}",
                      "code": "invalid_api_key"}}


def _scenarios(key: str, url: str) -> list[tuple[str, Callable[[responses.RequestsMock], None]]]:
    def status(code: int, body: Any, headers: dict[str, str] | None = None) -> Callable[..., None]:
        return lambda wire: wire.add(responses.POST, url, json=body, status=code, headers=headers or {})

    def raw(code: int, body: bytes) -> Callable[..., None]:
        return lambda wire: wire.add(responses.POST, url, body=body, status=code)

    def raises(exc: Exception) -> Callable[..., None]:
        return lambda wire: wire.add(responses.POST, url, body=exc)

    leaky = f"HTTPSConnectionPool: Max retries exceeded with url: /v1?key={key} (headers Bearer {key})"
    out: list[tuple[str, Callable[[responses.RequestsMock], None]]] = [
        ("connect-timeout", raises(requests.ConnectTimeout(leaky))),
        ("read-timeout", raises(requests.ReadTimeout(leaky))),
        ("connection", raises(requests.ConnectionError(leaky))),
        ("chunked", raises(requests.exceptions.ChunkedEncodingError(leaky))),
        ("ssl", raises(requests.exceptions.SSLError(leaky))),
        ("invalid-header", raises(requests.exceptions.InvalidHeader(leaky))),
        ("redirect", lambda wire: wire.add(responses.POST, url, status=302,
                                           headers={"Location": f"https://evil.example/?key={key}"})),
        ("html-502", raw(502, f"<html>bad gateway for ?key={key}</html>".encode())),
        ("malformed-200", raw(200, f"not json {key}".encode())),
        ("empty-object-200", status(200, {"unexpected": key})),
        ("openai-429", status(429, OPENAI_429, OPENAI_429_HEADERS)),
        ("openai-quota", status(429, OPENAI_QUOTA_429)),
        ("gemini-429", status(429, GEMINI_429)),
        ("gemini-daily", status(429, GEMINI_429_DAILY)),
        ("gemini-badkey", status(400, GEMINI_400_BADKEY)),
        ("gemini-blocked", status(200, GEMINI_BLOCKED_200)),
        ("ollama-404", status(404, OLLAMA_404)),
        ("string-error", status(400, {"error": f"bad key {key}"})),
        ("top-level-message", status(400, {"message": f"bad key {key}", "code": 400})),
    ]
    out += [(f"echo-{code}", status(code, _echo(key))) for code in (400, 401, 403, 404, 408, 409, 413,
                                                                   422, 429, 500, 503, 504)]
    return out


def _chain_text(exc: BaseException) -> str:
    parts = ["".join(traceback.format_exception(exc)), repr(exc), str(exc), repr(exc.args), repr(vars(exc))]
    seen: BaseException | None = exc
    while seen is not None:
        parts.append(repr(seen))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


CASES = [(name, label) for name, (_, key, url, _) in ADAPTERS.items() for label, _ in _scenarios(key, url)]


@pytest.mark.parametrize(("name", "label"), CASES)
def test_no_key_leaks_on_any_error_path(wire: responses.RequestsMock, caplog: pytest.LogCaptureFixture,
                                        name: str, label: str) -> None:
    cls, key, url, model = ADAPTERS[name]
    scenario = dict(_scenarios(key, url))[label]
    scenario(wire)
    provider = cls(name, ProviderConfig(api_key=key, model=model))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LLMExecutorError) as info:
        provider.complete(LLMRequest(provider=name, model="", prompt="Hi", request_id="rid"))
    text = _chain_text(info.value)
    assert key not in text and SENTINEL not in text, text
    for record in caplog.records:
        assert SENTINEL not in record.getMessage() and SENTINEL not in repr(record.__dict__)
    for call in wire.calls:
        assert SENTINEL not in call.request.url
    assert SENTINEL not in repr(provider) and SENTINEL not in repr(provider.config)


BAD_KEYS = {"newline": "\nX-Evil: 1", "euro": "\u20ac", "nul": "\x00", "cjk": "\u5bc6"}


@pytest.mark.parametrize("suffix", list(BAD_KEYS))
def test_a_key_http_cannot_carry_is_rejected_at_config_time_without_quoting_it(suffix: str) -> None:
    # issue 11 item 1a: "sk-...€" made every adapter fail with a raw UnicodeEncodeError quoting "Bearer sk-...".
    key = OPENAI_KEY + BAD_KEYS[suffix]
    with pytest.raises(ConfigError) as info:
        ProviderConfig(api_key=key)
    message = str(info.value)
    assert info.value.field == "api_key" and message.startswith("api_key:")
    assert "latin-1" in message or "control character" in message
    assert SENTINEL not in _chain_text(info.value)


@pytest.mark.parametrize("variable", ["OPENAI_API_KEY", "LLM_EXECUTOR_OPENAI_API_KEY"])
def test_a_non_latin1_key_in_the_environment_names_the_variable_not_the_key(variable: str) -> None:
    with pytest.raises(ConfigError) as info:
        ExecutorConfig.from_env({"LLM_EXECUTOR_PROVIDERS": "openai", variable: OPENAI_KEY + "\u20ac"})
    assert str(info.value).startswith(variable + ":") and "latin-1" in str(info.value)
    assert SENTINEL not in _chain_text(info.value)


def _config_bypassing_checks(key: str, model: str, base_url: str) -> ProviderConfig:
    # A config whose key skipped validation (a subclass, object.__setattr__): the adapter is the last line.
    cfg = ProviderConfig(api_key="placeholder-key", model=model, base_url=base_url, max_retries=0)
    object.__setattr__(cfg, "api_key", key)
    return cfg


def _base_url(name: str, server: HostileServer) -> str:
    return server.url + "/v1" if name == "openai" else server.url


# NUL passes requests and http.client (the server gets it); these three cannot be sent at all.
@pytest.mark.parametrize("suffix", ["newline", "euro", "cjk"])
@pytest.mark.parametrize("name", list(ADAPTERS))
def test_an_unsendable_key_that_reaches_an_adapter_is_a_typed_error_without_the_key(
        caplog: pytest.LogCaptureFixture, name: str, suffix: str) -> None:
    # A real loopback server: the latin-1 encoding of headers happens in http.client, under `responses`.
    cls, key, _, model = ADAPTERS[name]
    with HostileServer(canned("200 OK", b"{}")) as server:
        provider = cls(name, _config_bypassing_checks(key + BAD_KEYS[suffix], model, _base_url(name, server)))
        caplog.set_level(logging.DEBUG)
        with pytest.raises(ProviderError) as info:
            provider.complete(LLMRequest(provider=name, model="", prompt="Hi"))
    assert type(info.value) is ProviderError and info.value.retryable is False
    assert "API_KEY" in str(info.value)
    assert SENTINEL not in _chain_text(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert all(SENTINEL not in r.getMessage() for r in caplog.records)


def test_an_unsendable_key_fails_the_future_with_a_typed_error_and_clean_stats() -> None:
    _, key, _, model = ADAPTERS["openai"]
    with HostileServer(canned("200 OK", b"{}")) as server:
        cfg = ExecutorConfig(providers={"openai": _config_bypassing_checks(key + "\u20ac", model,
                                                                           _base_url("openai", server))})
        with Executor(cfg) as ex:
            with pytest.raises(ProviderError) as info:
                ex.run(LLMRequest(provider="openai", model=model, prompt="Hi"), timeout=10)
            stats = ex.stats()
    assert SENTINEL not in _chain_text(info.value)
    assert dict(stats["openai"].failed_by_error) == {"ProviderError": 1}
    assert SENTINEL not in repr(stats)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_a_key_echoed_in_a_response_header_is_not_logged(wire: responses.RequestsMock,
                                                         caplog: pytest.LogCaptureFixture, name: str) -> None:
    # issue 11 item 1b: the DEBUG line of an error status wrote the x-request-id header as received.
    cls, key, url, model = ADAPTERS[name]
    echoed = f"req-{key}-opaque"
    wire.add(responses.POST, url, json={"error": {"message": "nope"}}, status=500,
             headers={"x-request-id": echoed})
    provider = cls(name, ProviderConfig(api_key=key, model=model))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(LLMExecutorError) as info:
        provider.complete(LLMRequest(provider=name, model="", prompt="Hi"))
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "x-request-id" in r.getMessage()]
    assert debug, "the DEBUG line of an error status is expected"
    for record in caplog.records:
        assert SENTINEL not in record.getMessage(), record.getMessage()
    assert SENTINEL not in _chain_text(info.value)


def test_config_reprs_hide_passwords_and_query_strings() -> None:
    # issue 11 item 1c: repr(ExecutorConfig) showed rate_backend='redis://user:s3cretpw@...'.
    cfg = ExecutorConfig(
        rate_backend="redis://user:SENTINELpw@127.0.0.1:6379/0",
        providers={"openai": ProviderConfig(api_key=OPENAI_KEY, base_url="https://u:SENTINELpw@h.example/v1?key=SENTINEL")},
    )
    for text in (repr(cfg), str(cfg), repr(cfg.providers["openai"]), repr(cfg.describe()),
                 repr(ExecutorConfig(rate_backend="rediss://:SENTINELpw@h:6380/1"))):
        assert SENTINEL not in text, text
    assert "redis://user:***@127.0.0.1:6379/0" in repr(cfg)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_health_check_errors_do_not_leak(wire: responses.RequestsMock, name: str) -> None:
    cls, key, _, model = ADAPTERS[name]
    wire.add(responses.GET, url_for_health(name), json=_echo(key), status=401)
    provider = cls(name, ProviderConfig(api_key=key, model=model))
    with pytest.raises(LLMExecutorError) as info:
        provider.health_check()
    assert SENTINEL not in _chain_text(info.value)


def url_for_health(name: str) -> str:
    return {"openai": "https://api.openai.com/v1/models",
            "gemini": "https://generativelanguage.googleapis.com/v1beta/models",
            "ollama": "http://127.0.0.1:11434/api/version"}[name]


def test_successful_calls_send_keys_only_in_headers(wire: responses.RequestsMock) -> None:
    for name, (cls, key, url, model) in ADAPTERS.items():
        ok = {"openai": {"choices": [{"message": {"content": "x"}, "finish_reason": "stop"}]},
              "gemini": {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": "STOP"}]},
              "ollama": {"message": {"content": "x"}, "done_reason": "stop"}}[name]
        wire.add(responses.POST, url, json=ok)
        cls(name, ProviderConfig(api_key=key)).complete(LLMRequest(provider=name, model=model, prompt="Hi"))
        call = wire.calls[-1]
        assert SENTINEL not in call.request.url
        assert call.request.body is not None and SENTINEL.encode() not in call.request.body
