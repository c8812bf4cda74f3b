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

from llm_executor.config import ProviderConfig
from llm_executor.errors import LLMExecutorError
from llm_executor.providers.base import HTTPProvider
from llm_executor.providers.gemini import GeminiProvider
from llm_executor.providers.ollama import OllamaProvider
from llm_executor.providers.openai import OpenAIProvider
from llm_executor.types import LLMRequest
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


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_a_key_with_a_newline_does_not_leak_through_invalid_header(wire: responses.RequestsMock,
                                                                   name: str) -> None:
    # requests' InvalidHeader quotes the header value, i.e. the key; our message must not.
    cls, key, url, model = ADAPTERS[name]
    wire.add(responses.POST, url, json={})
    provider = cls(name, ProviderConfig(api_key=key + "\nX-Evil: 1", model=model))
    with pytest.raises(LLMExecutorError) as info:
        provider.complete(LLMRequest(provider=name, model="", prompt="Hi"))
    assert SENTINEL not in _chain_text(info.value)
    assert info.value.__context__ is None


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
