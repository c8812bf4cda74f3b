"""ScriptedProvider: replays replies in order, thread-safe, records requests."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from llm_executor import Capabilities, LLMRequest, LLMResponse, Provider
from llm_executor.errors import ProviderError, RateLimitedError
from llm_executor.testing import ScriptedProvider, ScriptExhaustedError


def req(prompt: str = "hello there") -> LLMRequest:
    return LLMRequest(provider="scripted", model="m1", prompt=prompt)


def test_plays_strings_responses_and_exceptions_in_order() -> None:
    canned = LLMResponse(text="canned", provider="x", model="y", finish_reason="length", usage_tokens=1)
    boom = RateLimitedError("slow down", provider="scripted", retry_after_s=2.0)
    provider = ScriptedProvider(["first", canned, boom, lambda r: r.prompt.upper()])
    assert isinstance(provider, Provider)
    first = provider.complete(req())
    assert (first.text, first.provider, first.model, first.finish_reason) == (
        "first",
        "scripted",
        "m1",
        "stop",
    )
    assert first.usage_tokens == 3
    assert provider.complete(req()) is canned
    with pytest.raises(RateLimitedError) as info:
        provider.complete(req())
    assert info.value is boom
    assert provider.complete(req("abc")).text == "ABC"
    assert [r.prompt for r in provider.requests] == ["hello there"] * 3 + ["abc"]


def test_running_out_raises_a_clear_non_retryable_error() -> None:
    provider = ScriptedProvider(["only"], name="mine")
    provider.complete(req())
    with pytest.raises(ScriptExhaustedError, match="'mine' has no reply left for call 2") as info:
        provider.complete(req())
    assert isinstance(info.value, ProviderError) and info.value.retryable is False
    provider.add("more")
    assert provider.complete(req()).text == "more" and provider.remaining == 0


def test_concurrent_calls_each_take_a_distinct_reply() -> None:
    n = 64
    provider = ScriptedProvider([str(i) for i in range(n)])
    start = threading.Barrier(8)

    def call(_: int) -> str:
        if _ < 8:
            start.wait(5)
        return provider.complete(req()).text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(call, range(n)))
    assert sorted(texts, key=int) == [str(i) for i in range(n)]
    assert len(provider.requests) == n


def test_capabilities_are_configurable() -> None:
    caps = Capabilities(max_output_tokens=10, models=("m1",))
    assert ScriptedProvider(capabilities=caps).capabilities() is caps
    assert ScriptedProvider().capabilities().supports_json_schema
