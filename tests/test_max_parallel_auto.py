"""MAX_PARALLEL=auto wired into a lane: config, the dynamic cap, stats, and the emulator's capacity.

The algorithm alone is tested in tests/test_concurrency_limit.py. Here the lane's learner is
replaced by a scripted one where the test needs to decide the next value, and the emulator
tests run the real one against an Ollama-like latency model (a few seconds each).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import pytest

from llm_executor import Executor, ExecutorConfig, LLMRequest, LLMResponse, ProviderConfig
from llm_executor.config import DEFAULT_PARALLEL_CEILING
from llm_executor.errors import ConfigError, ProviderError, ProviderUnavailableError
from llm_executor.lifecycle.runner import _is_overload
from llm_executor.limits.concurrency import INITIAL_LIMIT
from llm_executor.testing import Emulator, ProviderSim
from tests.fakes import FakeProvider, req, wait_for

# -- configuration ---------------------------------------------------------------------------------


def test_provider_config_takes_auto_and_a_ceiling() -> None:
    p = ProviderConfig(max_parallel="auto")
    assert p.max_parallel == "auto" and p.max_parallel_ceiling == DEFAULT_PARALLEL_CEILING == 32
    assert p.parallel_cap == 32
    assert ProviderConfig(max_parallel="auto", max_parallel_ceiling=6).parallel_cap == 6
    assert ProviderConfig(max_parallel=3, max_parallel_ceiling=6).parallel_cap == 3  # ceiling: auto only
    assert p.describe()["max_parallel"] == "auto" and p.describe()["max_parallel_ceiling"] == 32


@pytest.mark.parametrize("bad", ["Auto", "4", 0, 2.5, None, True])
def test_provider_config_refuses_other_values_naming_the_field(bad: Any) -> None:
    with pytest.raises(ConfigError, match=r"max_parallel=.*'auto'") as info:
        ProviderConfig(max_parallel=bad)
    assert info.value.field == "max_parallel"


def test_a_bad_ceiling_is_refused() -> None:
    with pytest.raises(ConfigError, match="max_parallel_ceiling") as info:
        ProviderConfig(max_parallel="auto", max_parallel_ceiling=0)
    assert info.value.field == "max_parallel_ceiling"


def test_the_environment_takes_auto_and_the_ceiling() -> None:
    cfg = ExecutorConfig.from_env({"LLM_EXECUTOR_PROVIDERS": "ollama", "LLM_EXECUTOR_OLLAMA_MAX_PARALLEL": " AUTO ",
                                   "LLM_EXECUTOR_OLLAMA_MAX_PARALLEL_CEILING": "12"})
    p = cfg.providers["ollama"]
    assert (p.max_parallel, p.max_parallel_ceiling, p.parallel_cap) == ("auto", 12, 12)


@pytest.mark.parametrize(("var", "value"), [("MAX_PARALLEL", "lots"), ("MAX_PARALLEL", "0"),
                                            ("MAX_PARALLEL_CEILING", "auto"), ("MAX_PARALLEL_CEILING", "0"),
                                            ("MAX_PARALLEL_CEILING", "20000")])
def test_the_environment_names_the_variable_of_a_bad_value(var: str, value: str) -> None:
    env = {"LLM_EXECUTOR_PROVIDERS": "ollama", "LLM_EXECUTOR_OLLAMA_MAX_PARALLEL": "auto",
           f"LLM_EXECUTOR_OLLAMA_{var}": value}
    with pytest.raises(ConfigError, match=f"LLM_EXECUTOR_OLLAMA_{var}"):
        ExecutorConfig.from_env(env)


def test_overload_signals_are_told_from_other_failures() -> None:
    assert _is_overload(ProviderUnavailableError("timeout"))
    assert _is_overload(ProviderError("busy", status=503))
    assert _is_overload(TimeoutError())
    assert not _is_overload(ProviderError("bad request", status=400))
    assert not _is_overload(ValueError("a bug in a custom provider"))


# -- the lane's dynamic cap ------------------------------------------------------------------------


class ScriptedLimit:
    """Stands in for GradientLimit: the next values are the test's; records each sample."""

    def __init__(self, values: list[int | None]) -> None:
        self.values = values
        self.samples: list[tuple[bool, int]] = []
        self.last_reason = "scripted"
        self.lock = threading.Lock()

    def on_sample(self, latency_s: float, ok: bool, in_flight: int) -> int | None:
        with self.lock:
            self.samples.append((ok, in_flight))
            return self.values.pop(0) if self.values else None


class StepProvider(FakeProvider):
    """Each call waits for one permit; records the in-flight count each call saw at its start."""

    def __init__(self) -> None:
        super().__init__("step")
        self.permits = threading.Semaphore(0)
        self.seen_in_flight: list[int] = []

    def complete(self, request: LLMRequest) -> LLMResponse:
        self._enter(request)
        with self.lock:
            self.seen_in_flight.append(self.in_flight)
        try:
            assert self.permits.acquire(timeout=10), "the test never let the call finish"
            return self.respond(request)
        finally:
            self._exit()


def auto_executor(provider: FakeProvider, ceiling: int = 8) -> Executor:
    config = ExecutorConfig(providers={provider.name: ProviderConfig(max_parallel="auto",
                                                                     max_parallel_ceiling=ceiling)})
    return Executor(config, {provider.name: provider})


def test_the_lane_starts_small_raises_its_cap_for_waiting_requests_and_lowers_it_without_cancelling() -> None:
    provider = StepProvider()
    with auto_executor(provider) as ex:
        lane = ex._lanes["step"]
        assert lane.max_parallel == INITIAL_LIMIT == 1
        assert lane.pool._max_workers == 8  # sized to the ceiling
        scripted = ScriptedLimit([4, None, None, None, 2])
        lane.concurrency = scripted  # type: ignore[assignment]
        futures = [ex.submit(req("step", prompt=str(i))) for i in range(12)]
        assert wait_for(lambda: provider.in_flight == 1)
        time.sleep(0.05)
        assert provider.in_flight == 1  # the start value holds while requests wait
        provider.permits.release()  # one call ends: its sample raises the cap to 4
        assert wait_for(lambda: provider.in_flight == 4)
        assert ex.stats()["step"].max_parallel == 4
        provider.permits.release(3)  # three samples without a change: 4 stay in flight
        assert wait_for(lambda: len(scripted.samples) == 4 and provider.in_flight == 4), scripted.samples
        marker = len(provider.seen_in_flight)
        provider.permits.release()  # this sample lowers the cap to 2; three calls are still running
        assert wait_for(lambda: len(scripted.samples) == 5)
        time.sleep(0.05)
        assert provider.in_flight == 3  # nothing was cancelled, and nothing new started
        provider.permits.release(20)
        assert [f.result(5).text for f in futures] == [f"echo:{i}" for i in range(12)]
        # Every call that started after the cap fell found at most 2 in flight, itself included.
        assert max(provider.seen_in_flight[marker:]) <= 2
        assert all(ok for ok, _ in scripted.samples) and scripted.samples[0] == (True, 1)
        learned = ex.stats()["step"].learned["max_parallel"]
        assert (learned.value, learned.source, learned.changes) == (2, "gradient", 2)
        assert ex.stats()["step"].max_parallel == 2


def test_overload_failures_are_samples_and_other_failures_are_not() -> None:
    errors = iter([ProviderUnavailableError("read timeout"), ProviderError("bad request", status=400), None])

    def reply(request: LLMRequest) -> Any:
        return next(errors) or "ok"

    provider = FakeProvider("f", reply=reply)
    config = ExecutorConfig(providers={"f": ProviderConfig(max_parallel="auto", max_retries=0)})
    with Executor(config, {"f": provider}) as ex:
        scripted = ScriptedLimit([])
        ex._lanes["f"].concurrency = scripted  # type: ignore[assignment]
        outcomes = [ex.submit(req("f")).exception(5) for _ in range(3)]
        assert [type(e).__name__ for e in outcomes] == ["ProviderUnavailableError", "ProviderError", "NoneType"]
        assert [ok for ok, _ in scripted.samples] == [False, True]


def test_a_fixed_max_parallel_has_no_learner_and_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with Executor(ExecutorConfig(providers={"f": ProviderConfig(max_parallel=3)}), {"f": FakeProvider("f")}) as ex:
        assert ex._lanes["f"].concurrency is None and ex._lanes["f"].max_parallel == 3
        assert ex.run(req("f")).text == "echo:hi"
        assert ex.stats()["f"].learned == {}


def test_auto_logs_its_start_once(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO, logger="llm_executor"):
        with auto_executor(FakeProvider("f"), ceiling=5) as ex:
            assert ex.stats()["f"].learned["max_parallel"].source == "configured"
    lines = [r.getMessage() for r in caplog.records if "max_parallel" in r.getMessage()]
    assert lines == ["llm_executor: f max_parallel starts at 1 (configured: MAX_PARALLEL=auto, ceiling 5)"]


# -- against the emulator's Ollama-like latency model ------------------------------------------------

LATENCY_S = 0.15


def _saturate(ex: Executor, n: int) -> list[Any]:
    return [ex.submit(LLMRequest(provider="ollama", model="llama3.2", prompt=f"p{i}")) for i in range(n)]


def _ollama(emu: Emulator, max_parallel: int | str) -> Executor:
    return Executor(ExecutorConfig(providers={"ollama": ProviderConfig(
        base_url=emu.url("ollama"), model="llama3.2", max_parallel=max_parallel,  # type: ignore[arg-type]
        max_parallel_ceiling=32, max_retries=0)}, queue_size=0))


def _unloaded_p50_s(emu: Emulator) -> float:
    with _ollama(emu, 1) as ex:
        return statistics.median(f.result(10).latency_ms / 1000 for f in _saturate(ex, 5))


def test_capacity_6_is_learned_within_a_band_with_latency_near_unloaded() -> None:
    with Emulator({"ollama": ProviderSim(latency_s=LATENCY_S, capacity=6)}) as emu:
        unloaded_s = _unloaded_p50_s(emu)
        ex = _ollama(emu, "auto")
        try:
            futures = _saturate(ex, 600)
            # Slow start reaches 4 in ~1.5 s (5 sequential calls, then 2, then 4); margin for a loaded host.
            assert wait_for(lambda: ex.stats()["ollama"].max_parallel >= 4, 10.0)
            converged = sum(f.done() for f in futures)
            time.sleep(2.5)
            limit = ex.stats()["ollama"].max_parallel
            finished = [f for f in futures if f.done()]
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
    assert 4 <= limit <= 12, limit
    # Done-order is not completion order, but the late ones finished after convergence began.
    tail = [f.result().latency_ms / 1000 for f in finished[converged + 5:] if not f.exception()]
    assert len(tail) > 20
    assert statistics.median(tail) <= 1.5 * unloaded_s, (statistics.median(tail), unloaded_s)


def test_a_capacity_drop_mid_run_brings_the_limit_down() -> None:
    with Emulator({"ollama": ProviderSim(latency_s=LATENCY_S, capacity=6)}) as emu:
        ex = _ollama(emu, "auto")
        try:
            _saturate(ex, 600)
            assert wait_for(lambda: ex.stats()["ollama"].max_parallel >= 6, 5.0)
            time.sleep(0.5)
            emu.set_limits("ollama", capacity=2)
            # Halved at most per window of ~max(5, limit) calls: well within 5 s at 0.15-0.5 s a call.
            assert wait_for(lambda: ex.stats()["ollama"].max_parallel <= 3, 5.0), ex.stats()["ollama"].max_parallel
        finally:
            ex.shutdown(wait=True, cancel_futures=True)
