"""Fuzzing (hypothesis): whatever a provider answers, adapters raise only typed errors with clear messages.

Reply bodies for each built-in adapter (the valid body with fields deleted or given wrong types,
random JSON, truncated JSON, non-JSON bytes, an empty body, huge strings), with any status code
and odd Retry-After / x-should-retry / x-request-id headers, go through ``responses`` to
``complete()``: the result is an ``LLMResponse`` of sane types, or an ``llm_executor.errors``
exception (ProviderError or InvalidRequestError) whose message is non-empty, bounded and free of
the key, with no ``requests`` exception chained. The same replies through an ``Executor`` fail
only their own Future, and the executor serves the next request.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import responses
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from llm_executor import Executor, ExecutorConfig, LLMRequest, LLMResponse, ProviderConfig
from llm_executor.errors import InvalidRequestError, ProviderError
from llm_executor.providers.base import HTTPProvider
from llm_executor.providers.gemini import GeminiProvider
from llm_executor.providers.ollama import OllamaProvider
from llm_executor.providers.openai import OpenAIProvider
from tests.providers.provider_fixtures import (
    GEMINI_400_BADKEY,
    GEMINI_429,
    GEMINI_BLOCKED_200,
    GEMINI_KEY,
    GEMINI_OK,
    GEMINI_URL,
    OLLAMA_404,
    OLLAMA_503,
    OLLAMA_KEY,
    OLLAMA_OK,
    OLLAMA_OK_OLD,
    OLLAMA_URL,
    OPENAI_400,
    OPENAI_429,
    OPENAI_KEY,
    OPENAI_OK,
    OPENAI_QUOTA_429,
    OPENAI_URL,
)

KEYS = {"openai": OPENAI_KEY, "gemini": GEMINI_KEY, "ollama": OLLAMA_KEY}
URLS = {"openai": OPENAI_URL, "gemini": GEMINI_URL, "ollama": OLLAMA_URL}
VALID = {"openai": OPENAI_OK, "gemini": GEMINI_OK, "ollama": OLLAMA_OK}
# Real bodies to mutate, success and error shapes both: mutations reach the fields each one has.
BASES: dict[str, list[Any]] = {
    "openai": [OPENAI_OK, OPENAI_429, OPENAI_QUOTA_429, OPENAI_400],
    "gemini": [GEMINI_OK, GEMINI_BLOCKED_200, GEMINI_429, GEMINI_400_BADKEY],
    "ollama": [OLLAMA_OK, OLLAMA_OK_OLD, OLLAMA_503, OLLAMA_404],
}
MODELS = {"openai": "gpt-4o-mini", "gemini": "gemini-2.5-flash", "ollama": "llama3.2"}
ADAPTERS: dict[str, type[HTTPProvider]] = {"openai": OpenAIProvider, "gemini": GeminiProvider,
                                           "ollama": OllamaProvider}
FINISH_REASONS = {"stop", "length", "content_filter", "tool_calls", "other"}
MAX_MESSAGE_CHARS = 1000
HUGE = "x" * 200_000


def _field_names() -> list[str]:
    names: set[str] = {"error", "message", "code", "status", "type", "details", "@type", "retryDelay",
                       "violations", "quotaId", "reason", "promptFeedback", "blockReason", "refusal", "thought",
                       "functionCall", "tool_calls", "done", "response"}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            names.update(node)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    for bodies in BASES.values():
        walk(bodies)
    return sorted(names)


FIELD_NAMES = _field_names()
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "STOP", "stop", "length", "MAX_TOKENS", "SAFETY", "RESOURCE_EXHAUSTED",
                     "insufficient_quota", "API_KEY_INVALID", "PerDay", "17s", "-1s", "99999999999999999999s",
                     "type.googleapis.com/google.rpc.RetryInfo", "type.googleapis.com/google.rpc.QuotaFailure",
                     "type.googleapis.com/google.rpc.ErrorInfo",
                     "https://example.test/x?key=SECRETQUERY", *KEYS.values()]),
    st.just(HUGE),
)
leaves = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                   st.floats(allow_nan=False, allow_infinity=False), texts)
json_values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=8)), inner, max_size=5),
    max_leaves=20,
)


def paths_of(node: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*prefix, k)
            yield from paths_of(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield (*prefix, i)
            yield from paths_of(v, (*prefix, i))


@st.composite
def mutated(draw: st.DrawFn, provider: str) -> Any:
    """A real body (success or error) with 1-3 fields deleted or replaced by a value of any type."""
    body = copy.deepcopy(draw(st.sampled_from(BASES[provider])))
    paths = list(paths_of(body))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        try:
            parent = body
            for step in path[:-1]:
                parent = parent[step]
            if draw(st.booleans()) and isinstance(parent, dict):
                del parent[path[-1]]
            else:
                parent[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    return body


@st.composite
def replies(draw: st.DrawFn, provider: str) -> tuple[int, bytes, dict[str, str]]:
    """(status, raw body, headers) of one provider reply."""
    valid_raw = json.dumps(VALID[provider]).encode()
    kind = draw(st.sampled_from(["mutated", "mutated", "random_json", "truncated", "bytes", "empty",
                                 "error_body"]))
    if kind == "mutated":
        raw = json.dumps(draw(mutated(provider))).encode()
    elif kind == "random_json":
        raw = json.dumps(draw(json_values)).encode()
    elif kind == "truncated":
        raw = valid_raw[: draw(st.integers(0, len(valid_raw) - 1))]
    elif kind == "bytes":
        raw = draw(st.binary(max_size=300))
    elif kind == "empty":
        raw = b""
    else:
        raw = json.dumps({"error": draw(json_values)}).encode()
    status = draw(st.one_of(
        st.just(200),
        st.sampled_from([201, 204, 301, 302, 400, 401, 403, 404, 408, 409, 422, 429, 500, 502, 503, 504, 529]),
        st.integers(min_value=100, max_value=599),
    ))
    headers: dict[str, str] = {}
    for name, values in (
        ("retry-after", ["1", "0", "-5", "abc", "1e309", "nan", "99999999999", "Wed, 21 Oct 2015 07:28:00 GMT"]),
        ("retry-after-ms", ["250", "-1", "inf", "x"]),
        ("x-should-retry", ["true", "false", "maybe"]),
        ("x-request-id", ["req_1", KEYS[provider], HUGE[:5000]]),
    ):
        value = draw(st.one_of(st.none(), st.sampled_from(values)))
        if value is not None:
            headers[name] = value
    return status, raw, headers


def fuzz_request(provider: str, *, schema: bool = False) -> LLMRequest:
    return LLMRequest(provider, MODELS[provider], "Hi", request_id="fuzz-1",
                      json_schema={"type": "object"} if schema else None)


def check_error(exc: BaseException, provider: str) -> None:
    assert isinstance(exc, ProviderError | InvalidRequestError), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert message.strip(), f"{type(exc).__name__} with an empty message"
    assert len(message) <= MAX_MESSAGE_CHARS, f"message of {len(message)} chars: {message[:200]}..."
    for text in (message, repr(exc)):
        assert KEYS[provider] not in text, f"key in error text: {text[:300]}"
    for chained in (exc.__cause__, exc.__context__):
        assert not isinstance(chained, requests.RequestException), f"requests exception chained: {chained!r}"
    if isinstance(exc, ProviderError):
        assert exc.provider == provider
        assert exc.status is None or isinstance(exc.status, int)


def check_response(response: object, provider: str) -> None:
    assert isinstance(response, LLMResponse)
    assert isinstance(response.text, str)
    assert response.provider == provider
    assert isinstance(response.model, str) and response.model
    assert response.finish_reason in FINISH_REASONS
    for count in (response.usage_tokens, response.prompt_tokens, response.completion_tokens):
        assert count is None or (isinstance(count, int) and count >= 0)


def adapter(provider: str) -> HTTPProvider:
    return ADAPTERS[provider](provider, ProviderConfig(api_key=KEYS[provider], max_retries=0))


_ADAPTERS = {name: adapter(name) for name in ADAPTERS}


def serve(mock: responses.RequestsMock, provider: str, reply: tuple[int, bytes, dict[str, str]]) -> None:
    status, raw, headers = reply
    mock.add(responses.POST, URLS[provider], body=raw, status=status, headers=headers,
             content_type="application/json")


# FUZZ_EXAMPLES=3000 for a longer hunt; the default keeps the file near 10 s.
FUZZ = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("provider", list(ADAPTERS))
@FUZZ
@given(data=st.data())
def test_any_reply_gives_a_sane_response_or_a_typed_error(provider: str, data: st.DataObject) -> None:
    reply = data.draw(replies(provider), label="reply")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        serve(mock, provider, reply)
        try:
            response = _ADAPTERS[provider].complete(fuzz_request(provider))
        except Exception as exc:  # the property under test: only typed errors escape
            event(f"error {type(exc).__name__}")
            check_error(exc, provider)
            return
    event("response")
    check_response(response, provider)


@pytest.fixture(scope="module")
def executor() -> Iterator[Executor]:
    config = ExecutorConfig(providers={name: ProviderConfig(api_key=KEYS[name], model=MODELS[name], max_retries=0,
                                                            max_parallel=2) for name in ADAPTERS}, queue_size=10)
    with Executor(config) as ex:
        yield ex


@pytest.mark.parametrize("provider", list(ADAPTERS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_bad_reply_fails_only_its_future_and_the_executor_serves_the_next(
        executor: Executor, provider: str, data: st.DataObject) -> None:
    reply = data.draw(replies(provider), label="reply")
    schema = data.draw(st.booleans(), label="schema")
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        serve(mock, provider, reply)
        future = executor.submit(fuzz_request(provider, schema=schema))
        exc = future.exception(timeout=10)
        if exc is not None:
            # SchemaValidationError is a ProviderError too: every failure here is an adapter's or a
            # validator's, never the executor's own.
            check_error(exc, provider)
        else:
            check_response(future.result(), provider)
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add(responses.POST, URLS[provider], json=VALID[provider], status=200)
        assert executor.submit(fuzz_request(provider)).result(timeout=10).text
    stats = executor.stats()[provider]
    assert stats.in_flight == 0 and stats.queued == 0
