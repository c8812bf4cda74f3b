"""Replies are capped after decompression, with memory bounded by the cap (issue 11 item 7).

A gzip bomb of 1 MB on the wire inflating to 1 GiB took RSS to 2.1 GB before failing. Now the
body is read as a stream, counted after decompression, and stopped at
``ProviderConfig.max_response_bytes``; tracemalloc's peak shows the memory it took.
"""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from llm_executor import ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.errors import ProviderError, ProviderUnavailableError
from llm_executor.providers.openai import OpenAIProvider
from tests.adversarial.hostile_servers import (
    Behaviour,
    HostileServer,
    canned,
    gzip_bomb,
    gzip_bomb_single,
    huge_body,
)

CAP = 4 << 20
# Headroom over the cap for one decompression step, buffers and the test's own bookkeeping.
HEADROOM = 8 << 20


class _Peak:
    """Memory allocated during the call, above what was allocated before it (server payloads included)."""

    baseline = 0

    def reset(self) -> None:
        tracemalloc.reset_peak()
        self.baseline = tracemalloc.get_traced_memory()[0]

    def __call__(self) -> int:
        return tracemalloc.get_traced_memory()[1] - self.baseline


@pytest.fixture
def peak_bytes() -> Iterator[_Peak]:
    tracemalloc.start()
    try:
        yield _PEAK
    finally:
        tracemalloc.stop()


_PEAK = _Peak()


def _complete(behaviour: Behaviour, cap: int = CAP) -> ProviderError:
    with HostileServer(behaviour) as server:
        provider = OpenAIProvider("openai", ProviderConfig(base_url=server.url + "/v1", model="m", max_retries=0,
                                                           timeout=30, max_response_bytes=cap))
        _PEAK.reset()
        with pytest.raises(ProviderError) as info:
            provider.complete(LLMRequest("openai", "m", "hi"))
    return info.value


@pytest.mark.slow
@pytest.mark.parametrize("bomb", [lambda: gzip_bomb(1 << 30), lambda: gzip_bomb_single(256 << 20)],
                         ids=["1GiB-many-members", "256MiB-one-member"])
def test_a_gzip_bomb_fails_at_the_cap_with_memory_near_the_cap(peak_bytes: _Peak,
                                                             bomb: Callable[[], Behaviour]) -> None:
    behaviour = bomb()  # built before measuring: the server's payload is not the client's memory
    error = _complete(behaviour)
    assert type(error) is ProviderError and error.retryable is False and error.status == 200
    assert "max_response_bytes=4194304" in str(error) and "MAX_RESPONSE_BYTES" in str(error)
    assert peak_bytes() < CAP + HEADROOM, f"peak {peak_bytes() / 2**20:.1f} MiB"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_huge_plain_body_fails_at_the_cap(peak_bytes: _Peak, chunked: bool) -> None:
    error = _complete(huge_body(1 << 30, chunked=chunked))
    assert type(error) is ProviderError and error.retryable is False
    assert "larger than max_response_bytes" in str(error)
    # With a Content-Length over the cap nothing is read at all.
    assert peak_bytes() < (1 << 20 if not chunked else CAP + HEADROOM), peak_bytes()


def test_an_error_status_with_a_huge_body_keeps_its_own_error(peak_bytes: _Peak) -> None:
    body = json.dumps({"error": {"message": "overloaded " + "x" * (20 << 20)}}).encode()
    behaviour = canned("503 Service Unavailable", body, {"Content-Type": "application/json"})
    error = _complete(behaviour)
    # The body is cut for its message (64 KiB), not failed as too large: the 503 stays retryable.
    assert isinstance(error, ProviderUnavailableError) and error.status == 503 and error.retryable
    assert peak_bytes() < 1 << 20, peak_bytes()


def test_a_reply_just_under_the_cap_succeeds() -> None:
    text = "y" * (CAP - 200)
    body = json.dumps({"choices": [{"message": {"content": text}, "finish_reason": "stop"}]}).encode()
    assert len(body) <= CAP
    with HostileServer(canned("200 OK", body, {"Content-Type": "application/json"})) as server:
        provider = OpenAIProvider("openai", ProviderConfig(base_url=server.url + "/v1", model="m",
                                                           max_response_bytes=CAP))
        assert provider.complete(LLMRequest("openai", "m", "hi")).text == text


def test_the_cap_is_configurable_from_the_environment() -> None:
    cfg = ExecutorConfig.from_env({"LLM_EXECUTOR_PROVIDERS": "openai",
                                   "LLM_EXECUTOR_OPENAI_MAX_RESPONSE_BYTES": "2048"})
    assert cfg.providers["openai"].max_response_bytes == 2048
    assert ProviderConfig().max_response_bytes == 32 << 20
