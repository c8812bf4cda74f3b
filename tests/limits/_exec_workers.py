"""Process bodies of the Executor-level multi-process tests (importable by "spawn" children).

Each child builds its own ``Executor`` through the public API, on the shared backend and
namespace the parent gives it, with a ``StampProvider`` that records wall-clock start and end
times of every call; the child sends those back through a queue. Wall-clock (``time.time()``)
because the stamps of several processes are merged; on one host they share the clock.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from llm_executor import Capabilities, Executor, ExecutorConfig, LLMRequest, LLMResponse, ProviderConfig
from llm_executor.errors import ProviderUnavailableError


class StampProvider:
    """Records ``(start, end)`` wall times of each call; sleeps ``latency_s``; reports ``usage_tokens``.

    Args:
        name: the provider (lane) name.
        latency_s: how long each call takes.
        usage: the usage_tokens to report for a request (default: 7).
        fail_first: prompts whose first attempt raises a retryable ProviderUnavailableError.
        block: when set, every call waits on it (up to 120 s): a provider that never answers.
        started: an object with ``put`` told each call's prompt as it starts (e.g. a process Queue).
    """

    def __init__(self, name: str = "fake", *, latency_s: float = 0.0, usage: Any = None,
                 fail_first: frozenset[str] = frozenset(), block: threading.Event | None = None,
                 started: Any = None) -> None:
        self.name = name
        self.latency_s = latency_s
        self.usage = usage or (lambda request: 7)
        self.fail_first = set(fail_first)
        self.block = block
        self.started = started
        self.lock = threading.Lock()
        self.spans: list[tuple[float, float]] = []
        self.attempts: dict[str, int] = {}

    def capabilities(self) -> Capabilities:
        return Capabilities(max_output_tokens=100_000)

    def complete(self, request: LLMRequest) -> LLMResponse:
        start = time.time()
        with self.lock:
            self.attempts[request.prompt] = self.attempts.get(request.prompt, 0) + 1
            first = self.attempts[request.prompt] == 1
        if self.started is not None:
            self.started.put(request.prompt)
        try:
            if self.block is not None:
                self.block.wait(120)
            if self.latency_s:
                time.sleep(self.latency_s)  # the "provider call" itself
            if first and request.prompt in self.fail_first:
                raise ProviderUnavailableError("emulated 503", provider=self.name, status=503)
            return LLMResponse(text="ok", provider=self.name, model=request.model, finish_reason="stop",
                               usage_tokens=self.usage(request))
        finally:
            end = time.time()
            with self.lock:
                self.spans.append((start, end))


def _config(url: str, namespace: str, **limits: Any) -> ExecutorConfig:
    return ExecutorConfig(providers={"fake": ProviderConfig(**limits)}, rate_backend=url, namespace=namespace,
                          queue_size=0)


def _request(prompt: str) -> LLMRequest:
    return LLMRequest(provider="fake", model="m", prompt=prompt)


def qps_worker(url: str, namespace: str, qps: float, max_parallel: int, requests: int, ready: Any, go: Any,
               start: Any, duration_s: float, out: Any) -> None:
    """Submit ``requests`` (more than the run can start) and stop at ``start + duration_s``.

    Puts ``(pid, start stamps)``.
    """
    provider = StampProvider()
    # The stamps are taken in the provider call, after the token: with 4 processes x 8 threads on a
    # loaded 2-core CI machine, one in a few runs started a call more than the default 20 ms after
    # its token (21 in a window). The margin is the library's knob for exactly that jitter.
    executor = Executor(_config(url, namespace, qps=qps, max_parallel=max_parallel, window_margin_ms=60),
                        providers={"fake": provider})
    ready.put(os.getpid())
    go.wait()
    futures = [executor.submit(_request(f"{os.getpid()}-{i}")) for i in range(requests)]
    time.sleep(max(0.0, start.value + duration_s - time.time()))
    executor.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    with provider.lock:
        out.put((os.getpid(), [s for s, _ in provider.spans]))


def slot_worker(url: str, namespace: str, cap: int, max_parallel: int, requests: int, latency_s: float,
                delay_s: float, ready: Any, go: Any, out: Any) -> None:
    """Run ``requests`` calls of ``latency_s`` each under a global cap, ``delay_s`` after ``go``.

    Puts ``(pid, spans, errors)``.
    """
    provider = StampProvider(latency_s=latency_s)
    cfg = _config(url, namespace, max_parallel=max_parallel, global_max_parallel=cap)
    with Executor(cfg, providers={"fake": provider}) as executor:
        ready.put(os.getpid())
        go.wait()
        time.sleep(delay_s)
        futures = [executor.submit(_request(f"{os.getpid()}-{i}")) for i in range(requests)]
        outcomes = [f.exception(timeout=60) for f in futures]
    errors = [repr(exc) for exc in outcomes if exc is not None]
    with provider.lock:
        out.put((os.getpid(), list(provider.spans), errors))


def slot_hog_configured(url: str, namespace: str, cap: int, lease_ttl_s: float, started: Any) -> None:
    """``slot_hog`` with the TTL set the way a user would: ``ExecutorConfig(lease_ttl_s=...)``."""
    provider = StampProvider(block=threading.Event(), started=started)
    cfg = ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=cap, global_max_parallel=cap)},
                         rate_backend=url, namespace=namespace, lease_ttl_s=lease_ttl_s)
    executor = Executor(cfg, providers={"fake": provider})
    for i in range(cap):
        executor.submit(_request(f"hog-{i}"))
    time.sleep(120)  # killed long before
