"""Fakes shared by the executor tests: providers that block on Events, count, and fail on cue.

Imported by tests as ``tests.fakes``; the ``fake`` and ``gate`` fixtures are re-exported by conftest.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from llm_executor import Capabilities, LLMRequest, LLMResponse
from llm_executor.testing import max_in_window

__all__ = ["FakeProvider", "GateProvider", "fake", "gate", "llm_threads", "max_in_window", "req", "wait_for"]


class FakeProvider:
    """Answers at once; records every request it saw and the time each call started."""

    def __init__(self, name: str = "fake", caps: Capabilities | None = None,
                 reply: Callable[[LLMRequest], Any] | None = None) -> None:
        self.name = name
        self._caps = caps or Capabilities(max_output_tokens=1000, supports_json_mode=True)
        self._reply = reply
        self.lock = threading.Lock()
        self.seen: list[LLMRequest] = []
        self.starts: list[float] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def capabilities(self) -> Capabilities:
        return self._caps

    def _enter(self, request: LLMRequest) -> None:
        with self.lock:
            self.seen.append(request)
            self.starts.append(time.monotonic())
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _exit(self) -> None:
        with self.lock:
            self.in_flight -= 1

    def respond(self, request: LLMRequest) -> LLMResponse:
        if self._reply is not None:
            out = self._reply(request)
            if isinstance(out, BaseException):
                raise out
            if isinstance(out, LLMResponse):
                return out
            text = str(out)
        else:
            text = f"echo:{request.prompt}"
        return LLMResponse(text=text, provider=self.name, model=request.model or "m", finish_reason="stop",
                           usage_tokens=5, prompt_tokens=3, completion_tokens=2)

    def complete(self, request: LLMRequest) -> LLMResponse:
        self._enter(request)
        try:
            return self.respond(request)
        finally:
            self._exit()

    @property
    def prompts(self) -> list[str]:
        with self.lock:
            return [r.prompt for r in self.seen]


class GateProvider(FakeProvider):
    """Blocks every call until the test opens the gate; ``started`` counts calls that began."""

    def __init__(self, name: str = "gate", **kw: Any) -> None:
        super().__init__(name, **kw)
        self.gate = threading.Event()
        self.started = threading.Semaphore(0)

    def complete(self, request: LLMRequest) -> LLMResponse:
        self._enter(request)
        try:
            self.started.release()
            assert self.gate.wait(10), "test never opened the gate"
            return self.respond(request)
        finally:
            self._exit()

    def wait_started(self, n: int = 1, timeout: float = 5.0) -> None:
        for _ in range(n):
            assert self.started.acquire(timeout=timeout), "provider call did not start"


@pytest.fixture
def fake() -> FakeProvider:
    return FakeProvider()


@pytest.fixture
def gate() -> GateProvider:
    provider = GateProvider()
    yield provider
    provider.gate.set()


def req(provider: str = "fake", prompt: str = "hi", **kw: Any) -> LLMRequest:
    return LLMRequest(provider=provider, model=kw.pop("model", "m"), prompt=prompt, **kw)


def llm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("llm-executor", "PyrateLimiter"))]


def wait_for(predicate: Callable[[], object], timeout_s: float = 5.0) -> bool:
    """Poll ``predicate`` until true, for conditions only observable from outside (threads ending)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())
