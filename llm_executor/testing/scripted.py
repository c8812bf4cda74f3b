"""ScriptedProvider: a Provider that plays back replies from a list (our httpx MockTransport).

Executor tests plug it in instead of patching anything::

    provider = ScriptedProvider(["first", RateLimitedError("slow down", retryable=True), "second"])
    with Executor(cfg, providers={"scripted": provider}) as ex:
        ...
    assert [r.prompt for r in provider.requests] == [...]

Imports: the public API (``llm_executor``) and ``llm_executor.errors`` only.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TypeAlias

from llm_executor import Capabilities, LLMRequest, LLMResponse
from llm_executor.errors import ProviderError

from .responder import count_tokens

__all__ = ["Reply", "ScriptExhaustedError", "ScriptedProvider"]

Reply: TypeAlias = "str | LLMResponse | BaseException | Callable[[LLMRequest], str | LLMResponse]"


class ScriptExhaustedError(ProviderError):
    """A ScriptedProvider got more requests than it had replies (a test bug, so never retried)."""


class ScriptedProvider:
    """A provider whose ``complete()`` returns (or raises) the next scripted reply.

    Thread-safe: concurrent calls each take a distinct reply, in call order.

    Args:
        replies: what successive calls give back. A ``str`` becomes
            ``LLMResponse(text, provider=name, model=request.model, finish_reason="stop",
            usage_tokens=<words of prompt + text>)``; an ``LLMResponse`` is returned as is; an
            exception instance is raised; a callable gets the request and returns a str or
            an LLMResponse (for replies that depend on the request).
        name: the provider name (``LLMResponse.provider`` of string replies).
        capabilities: what ``capabilities()`` returns (default: JSON mode and schema, system prompt).

    Attributes:
        requests: every request ``complete()`` received, in call order (a copy is safest to read
            while calls are running: ``list(provider.requests)``).
    """

    def __init__(
        self,
        replies: Iterable[Reply] = (),
        *,
        name: str = "scripted",
        capabilities: Capabilities | None = None,
    ) -> None:
        self.name = name
        self._capabilities = capabilities or Capabilities(
            supports_json_mode=True, supports_json_schema=True, supports_system_prompt=True
        )
        self._replies: list[Reply] = list(replies)
        self._next = 0
        self._lock = threading.Lock()
        self.requests: list[LLMRequest] = []

    def capabilities(self) -> Capabilities:
        """The capabilities given at construction."""
        return self._capabilities

    def add(self, *replies: Reply) -> None:
        """Append replies to the script."""
        with self._lock:
            self._replies.extend(replies)

    @property
    def remaining(self) -> int:
        """Replies not used yet."""
        with self._lock:
            return len(self._replies) - self._next

    def complete(self, request: LLMRequest) -> LLMResponse:
        """Record ``request`` and play the next reply.

        Raises:
            ScriptExhaustedError: no reply left (non-retryable, names the call number).
            BaseException: the scripted exception instance, when that is the next reply.
        """
        with self._lock:
            self.requests.append(request)
            call = len(self.requests)
            if self._next >= len(self._replies):
                raise ScriptExhaustedError(
                    f"ScriptedProvider {self.name!r} has no reply left for call {call} "
                    f"(scripted {len(self._replies)}); add more replies or expect fewer requests",
                    provider=self.name,
                    request_id=request.request_id or None,
                    retryable=False,
                )
            reply = self._replies[self._next]
            self._next += 1
        # Build or raise outside the lock: a callable reply may be slow or block on a test gate.
        if isinstance(reply, BaseException):
            raise reply
        if callable(reply) and not isinstance(reply, str | LLMResponse):
            reply = reply(request)
        if isinstance(reply, LLMResponse):
            return reply
        text = str(reply)
        prompt_tokens = count_tokens(request.prompt) + count_tokens(request.system or "")
        completion_tokens = count_tokens(text)
        return LLMResponse(
            text=text,
            provider=self.name,
            model=request.model,
            finish_reason="stop",
            usage_tokens=prompt_tokens + completion_tokens,
            raw_finish_reason="stop",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )
