"""Executor behaviour: admission, lanes, limits, futures, deadlines, shutdown (DESIGN properties 1-5)."""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import CancelledError
from typing import Any

import pytest

from llm_executor import Capabilities, Executor, ExecutorConfig, LLMRequest, LLMResponse, ProviderConfig
from llm_executor.errors import (
    ConfigError,
    DeadlineExceededError,
    ExecutorShutdownError,
    InvalidRequestError,
    ProviderError,
    ProviderUnavailableError,
    QueueFullError,
    RateLimitedError,
    SchemaValidationError,
    UnknownProviderError,
)
from tests.fakes import FakeProvider, GateProvider, llm_threads, max_in_window, req


def cfg(**providers: ProviderConfig) -> Any:
    def build(**kw: Any) -> ExecutorConfig:
        return ExecutorConfig(providers=providers, **kw)
    return build


def one(name: str = "fake", queue_size: int = 100, **pkw: Any) -> ExecutorConfig:
    return ExecutorConfig(providers={name: ProviderConfig(**pkw)}, queue_size=queue_size)


# -- property 2: MAX_PARALLEL and QPS ---------------------------------------------------------


def test_thirty_requests_through_max_parallel_3_observe_exactly_3_in_flight(gate: GateProvider) -> None:
    with Executor(one("gate", max_parallel=3), {"gate": gate}) as ex:
        futures = [ex.submit(req("gate", f"p{i}")) for i in range(30)]
        gate.wait_started(3)
        assert ex.stats()["gate"].in_flight == 3
        assert ex.stats()["gate"].queued == 27
        gate.gate.set()
        assert all(f.result(5).text.startswith("echo:") for f in futures)
    assert gate.max_in_flight == 3
    assert ex.stats()["gate"].max_in_flight == 3


def test_forty_instant_requests_at_qps_10_never_exceed_10_starts_in_any_1s_window(fake: FakeProvider) -> None:
    with Executor(one(qps=10, max_parallel=8), {"fake": fake}) as ex:
        futures = [ex.submit(req(prompt=str(i))) for i in range(40)]
        for f in futures:
            f.result(10)
    assert len(fake.starts) == 40
    assert max_in_window(fake.starts) <= 10
    assert ex.stats()["fake"].max_starts_1s <= 10
    # And the limit is used, not just respected: 40 requests need a bit over 3 windows.
    assert fake.starts[-1] - fake.starts[0] < 4.5


def test_qps_limit_holds_with_fewer_workers_than_qps(fake: FakeProvider) -> None:
    with Executor(one(qps=4, max_parallel=2), {"fake": fake}) as ex:
        for f in [ex.submit(req(prompt=str(i))) for i in range(6)]:
            f.result(5)
    assert max_in_window(fake.starts) <= 4


# -- property 3: no head-of-line blocking -------------------------------------------------------


def test_request_to_free_lane_finishes_while_other_lane_is_blocked(gate: GateProvider, fake: FakeProvider) -> None:
    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1), "fake": ProviderConfig()},
                            queue_size=5)
    with Executor(config, {"gate": gate, "fake": fake}) as ex:
        blocked = [ex.submit(req("gate", str(i))) for i in range(6)]  # 1 running + 5 queued: gate lane full
        gate.wait_started()
        with pytest.raises(QueueFullError):
            ex.submit(req("gate"))
        assert ex.run(req("fake", "free"), timeout=5).text == "echo:free"
        assert not any(f.done() for f in blocked)
        gate.gate.set()
        for f in blocked:
            f.result(5)


# -- admission and backpressure ---------------------------------------------------------------


def test_fail_fast_accepts_exactly_the_bound_then_raises_queue_full(gate: GateProvider) -> None:
    with Executor(one("gate", queue_size=4, max_parallel=2), {"gate": gate}) as ex:
        running = [ex.submit(req("gate")) for _ in range(2)]
        gate.wait_started(2)
        queued = [ex.submit(req("gate")) for _ in range(4)]
        with pytest.raises(QueueFullError) as info:
            ex.submit(req("gate"))
        assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
        assert info.value.provider == "gate"
        assert ex.stats()["gate"].queued == 4
        gate.gate.set()
        for f in running + queued:
            f.result(5)


def test_queue_bound_holds_against_the_thread_pool_queue(gate: GateProvider) -> None:
    # The lane's ThreadPoolExecutor never holds requests: its work queue stays empty.
    with Executor(one("gate", queue_size=10, max_parallel=2), {"gate": gate}) as ex:
        futures = [ex.submit(req("gate")) for _ in range(12)]
        gate.wait_started(2)
        lane = ex._lanes["gate"]
        assert lane.pool._work_queue.qsize() == 0
        assert lane.pending == 10
        gate.gate.set()
        for f in futures:
            f.result(5)


def test_block_mode_waits_for_a_slot_then_proceeds(gate: GateProvider) -> None:
    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}, queue_size=1, backpressure="block")
    with Executor(config, {"gate": gate}) as ex:
        first = ex.submit(req("gate", "a"))
        gate.wait_started()
        second = ex.submit(req("gate", "b"))
        submitted = threading.Event()
        third: list[Any] = []

        def blocked_submit() -> None:
            third.append(ex.submit(req("gate", "c")))
            submitted.set()

        t = threading.Thread(target=blocked_submit)
        t.start()
        assert not submitted.wait(0.2)  # waiting for room
        gate.gate.set()
        assert submitted.wait(5)
        t.join()
        assert [f.result(5).text for f in (first, second, third[0])] == ["echo:a", "echo:b", "echo:c"]


def test_block_mode_with_timeout_raises_queue_full_after_it(gate: GateProvider) -> None:
    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}, queue_size=1,
                            backpressure="block", block_timeout=0.05)
    with Executor(config, {"gate": gate}) as ex:
        ex.submit(req("gate"))
        gate.wait_started()
        ex.submit(req("gate"))
        t0 = time.monotonic()
        with pytest.raises(QueueFullError, match=r"after 0\.05s"):
            ex.submit(req("gate"))
        assert time.monotonic() - t0 >= 0.04
        gate.gate.set()


def test_blocked_submit_is_released_by_shutdown(gate: GateProvider) -> None:
    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}, queue_size=1, backpressure="block")
    ex = Executor(config, {"gate": gate})
    ex.submit(req("gate"))
    gate.wait_started()
    ex.submit(req("gate"))
    errors: list[BaseException] = []

    def blocked_submit() -> None:
        try:
            ex.submit(req("gate"))
        except BaseException as exc:
            errors.append(exc)

    waiting = threading.Event()
    not_full = ex._lanes["gate"].not_full
    wait_for = not_full.wait_for

    def signalling_wait_for(*args: Any, **kwargs: Any) -> Any:
        waiting.set()
        return wait_for(*args, **kwargs)

    not_full.wait_for = signalling_wait_for  # type: ignore[method-assign]
    t = threading.Thread(target=blocked_submit)
    t.start()
    assert waiting.wait(5), "the third submit never blocked"
    gate.gate.set()
    ex.shutdown(wait=True, cancel_futures=True)
    t.join(5)
    assert not t.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ExecutorShutdownError)


# -- priority ----------------------------------------------------------------------------------


def test_higher_priority_starts_first_within_a_lane(gate: GateProvider) -> None:
    with Executor(one("gate", max_parallel=1), {"gate": gate}) as ex:
        ex.submit(req("gate", "hold"))
        gate.wait_started()
        futures = [ex.submit(req("gate", f"p{p}", priority=p)) for p in (0, 5, 1, 9)]
        gate.gate.set()
        for f in futures:
            f.result(5)
    assert gate.prompts == ["hold", "p9", "p5", "p1", "p0"]


def test_aging_lets_an_old_low_priority_request_beat_a_new_high_one(gate: GateProvider) -> None:
    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1)}, priority_aging_s=0.001)
    with Executor(config, {"gate": gate}) as ex:
        ex.submit(req("gate", "hold"))
        gate.wait_started()
        old = ex.submit(req("gate", "old-low", priority=0))
        time.sleep(0.05)  # 50 aging steps, far more than the 5 priority steps below
        new = ex.submit(req("gate", "new-high", priority=5))
        gate.gate.set()
        old.result(5), new.result(5)
    assert gate.prompts == ["hold", "old-low", "new-high"]


# -- deadlines and cancel (property 4) -------------------------------------------------------------


def test_queued_request_past_its_deadline_fails_without_reaching_provider(gate: GateProvider) -> None:
    with Executor(one("gate", max_parallel=1), {"gate": gate}) as ex:
        ex.submit(req("gate", "hold"))
        gate.wait_started()
        late = ex.submit(req("gate", "late", timeout=0.05))
        with pytest.raises(DeadlineExceededError, match="in the queue"):
            late.result(5)
        assert ex.stats()["gate"].queued == 0
        gate.gate.set()
    assert "late" not in gate.prompts
    assert ex.stats()["gate"].failed_by_error == {"DeadlineExceededError": 1}


def test_running_request_fails_at_its_deadline_and_late_result_is_dropped(gate: GateProvider) -> None:
    with Executor(one("gate"), {"gate": gate}) as ex:
        f = ex.submit(req("gate", timeout=0.1))
        gate.wait_started()
        with pytest.raises(DeadlineExceededError, match="while running"):
            f.result(5)
        gate.gate.set()
    s = ex.stats()["gate"]
    assert (s.completed, s.failed) == (0, 1)


def test_provider_sees_the_time_left_as_request_timeout(fake: FakeProvider) -> None:
    with Executor(one(), {"fake": fake}) as ex:
        ex.run(req(timeout=30))
    assert 0 < fake.seen[0].timeout <= 30


def test_cancel_before_start_returns_true_and_provider_never_sees_it(gate: GateProvider) -> None:
    with Executor(one("gate", max_parallel=1, queue_size=1), {"gate": gate}) as ex:
        ex.submit(req("gate", "hold"))
        gate.wait_started()
        victim = ex.submit(req("gate", "victim"))
        assert victim.cancel() is True
        assert victim.cancelled()
        with pytest.raises(CancelledError):
            victim.result(1)
        # The slot is free again at once.
        replacement = ex.submit(req("gate", "next"))
        gate.gate.set()
        replacement.result(5)
    assert "victim" not in gate.prompts
    assert ex.stats()["gate"].cancelled == 1


def test_cancel_of_a_running_request_returns_false(gate: GateProvider) -> None:
    with Executor(one("gate"), {"gate": gate}) as ex:
        f = ex.submit(req("gate"))
        gate.wait_started()
        assert f.cancel() is False
        gate.gate.set()
        assert f.result(5).text == "echo:hi"


# -- property 1: exactly once on every path ------------------------------------------------------


class Boom(BaseException):
    pass


def test_base_exception_in_provider_fails_that_future_and_executor_keeps_serving() -> None:
    calls = iter([Boom("crash"), "fine"])
    provider = FakeProvider(reply=lambda r: next(calls))
    with Executor(one(max_parallel=1), {"fake": provider}) as ex:
        bad = ex.submit(req())
        with pytest.raises(Boom):
            bad.result(5)
        assert ex.run(req(), timeout=5).text == "fine"


def test_plain_exception_in_provider_is_not_retried() -> None:
    provider = FakeProvider(reply=lambda r: KeyError("oops"))
    with Executor(one(), {"fake": provider}) as ex:
        with pytest.raises(KeyError):
            ex.run(req(), timeout=5)
    assert ex.stats()["fake"].attempts == 1


def test_provider_returning_wrong_type_fails_with_provider_error() -> None:
    provider = FakeProvider()
    provider.respond = lambda r: "not a response"  # type: ignore[assignment,return-value]
    with Executor(one(), {"fake": provider}) as ex, pytest.raises(ProviderError, match="expected LLMResponse"):
        ex.run(req(), timeout=5)


def test_shutdown_wait_finishes_queued_work(gate: GateProvider) -> None:
    ex = Executor(one("gate", max_parallel=2), {"gate": gate})
    futures = [ex.submit(req("gate", str(i))) for i in range(10)]
    gate.wait_started(2)
    gate.gate.set()
    ex.shutdown(wait=True)
    assert all(f.done() and not f.cancelled() for f in futures)
    assert not llm_threads()


def test_shutdown_cancel_futures_cancels_queued_and_no_thread_outlives_it(gate: GateProvider) -> None:
    ex = Executor(one("gate", max_parallel=2, qps=50), {"gate": gate})
    futures = [ex.submit(req("gate", str(i))) for i in range(10)]
    gate.wait_started(2)
    threading.Timer(0.05, gate.gate.set).start()
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    assert sum(f.cancelled() for f in futures) == 8
    assert not llm_threads()
    with pytest.raises(ExecutorShutdownError):
        ex.submit(req("gate"))
    s = ex.stats()["gate"]
    assert (s.completed, s.cancelled) == (2, 8)


def test_shutdown_interrupts_a_retry_backoff() -> None:
    called = threading.Event()

    def reply(request: LLMRequest) -> BaseException:
        called.set()
        return ProviderUnavailableError("503", status=503, retry_after_s=None)

    provider = FakeProvider(reply=reply)
    config = ExecutorConfig(providers={"fake": ProviderConfig(max_retries=5, backoff_max_s=60)})
    ex = Executor(config, {"fake": provider})
    lane = ex._lanes["fake"]
    lane.retry.wait.fallback = lambda state: 60.0  # a long backoff
    f = ex.submit(req())
    assert called.wait(5)
    t0 = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    assert time.monotonic() - t0 < 5
    with pytest.raises(ExecutorShutdownError):
        f.result(1)


def test_keyboard_interrupt_in_caller_resolves_every_future(gate: GateProvider) -> None:
    futures: list[Any] = []
    with pytest.raises(KeyboardInterrupt), Executor(one("gate", max_parallel=1), {"gate": gate}) as ex:
        futures.extend(ex.submit(req("gate", str(i))) for i in range(5))
        gate.wait_started()
        threading.Timer(0.05, gate.gate.set).start()
        raise KeyboardInterrupt
    assert all(f.done() for f in futures)
    assert sum(f.cancelled() for f in futures) == 4
    assert not llm_threads()


def test_submit_after_shutdown_raises(fake: FakeProvider) -> None:
    ex = Executor(one(), {"fake": fake})
    ex.shutdown()
    with pytest.raises(ExecutorShutdownError):
        ex.submit(req())
    ex.shutdown()  # idempotent


def test_random_mix_of_outcomes_resolves_every_future_exactly_once_and_stats_match() -> None:
    rng = random.Random(7)

    def reply(request: LLMRequest) -> Any:
        kind = request.metadata["kind"]
        if kind == "fail":
            return ProviderError("bad request", status=400)
        if kind == "slow":
            time.sleep(0.02)
        return "ok"

    provider = FakeProvider(reply=reply)
    config = ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=4)}, queue_size=0)
    resolutions: dict[int, int] = {}
    lock = threading.Lock()
    futures = []
    with Executor(config, {"fake": provider}) as ex:
        for i in range(500):
            kind = rng.choice(["ok", "fail", "cancel", "deadline", "slow"])
            timeout = 0.01 if kind == "deadline" else None
            f = ex.submit(req(prompt=str(i), timeout=timeout, metadata={"kind": "slow" if kind == "deadline"
                                                                        else kind}))

            def count(_f: Any, i: int = i) -> None:
                with lock:
                    resolutions[i] = resolutions.get(i, 0) + 1

            f.add_done_callback(count)
            if kind == "cancel":
                f.cancel()
            futures.append(f)
        for f in futures:
            try:
                f.result(10)
            except BaseException:
                pass
    assert len(resolutions) == 500 and set(resolutions.values()) == {1}
    seen_ok = sum(1 for f in futures if not f.cancelled() and f.exception() is None)
    seen_err = sum(1 for f in futures if not f.cancelled() and f.exception() is not None)
    seen_cancel = sum(1 for f in futures if f.cancelled())
    s = ex.stats()["fake"]
    assert (s.completed, s.failed, s.cancelled) == (seen_ok, seen_err, seen_cancel)
    assert s.queued == 0 and s.in_flight == 0


# -- run / map --------------------------------------------------------------------------------------


def test_map_keeps_input_order_and_feeds_lazily() -> None:
    consumed: list[int] = []

    def reply(request: LLMRequest) -> str:
        time.sleep(0.001 * (int(request.prompt) % 3))
        return request.prompt

    def requests() -> Any:
        for i in range(300):
            consumed.append(i)
            yield req(prompt=str(i))

    provider = FakeProvider(reply=reply)
    config = ExecutorConfig(providers={"fake": ProviderConfig(max_parallel=4)}, queue_size=5)
    with Executor(config, {"fake": provider}) as ex:
        results = ex.map(requests())
        first = next(results)
        assert first.text == "0"
        assert len(consumed) <= 5 + 4 + 1  # never more than the bound plus the workers ahead
        rest = [r.text for r in results]
    assert [first.text, *rest] == [str(i) for i in range(300)]


def test_map_timeout_raises_and_cancels_the_rest(gate: GateProvider) -> None:
    with Executor(one("gate", max_parallel=1), {"gate": gate}) as ex:
        results = ex.map([req("gate", str(i)) for i in range(5)], timeout=0.05)
        with pytest.raises(TimeoutError):
            next(results)
        results.close()
        gate.gate.set()
    assert ex.stats()["gate"].cancelled == 4


def test_run_returns_the_response_with_fields_filled_by_the_executor(fake: FakeProvider) -> None:
    with Executor(one(), {"fake": fake}) as ex:
        r = ex.run(req(request_id="abc"), timeout=5)
    assert isinstance(r, LLMResponse)
    assert (r.request_id, r.provider, r.attempts) == ("abc", "fake", 1)
    assert r.latency_ms >= 0 and r.queue_ms >= 0


def test_request_id_is_a_uuid4_when_empty(fake: FakeProvider) -> None:
    with Executor(one(), {"fake": fake}) as ex:
        r = ex.run(req())
    assert len(r.request_id) == 32 and fake.seen[0].request_id == r.request_id


def test_minimal_custom_provider_response_gets_defaults_filled() -> None:
    class Minimal:
        name = "mine"

        def capabilities(self) -> Capabilities:
            return Capabilities()

        def complete(self, request: LLMRequest) -> LLMResponse:
            return LLMResponse("t", "mine", "m", "stop", None)

    with Executor(ExecutorConfig(), providers={"mine": Minimal()}) as ex:
        r = ex.run(LLMRequest("mine", "", "hello"))
    assert (r.text, r.attempts, r.data) == ("t", 1, None)
    assert ex.stats()["mine"].max_parallel == 4  # defaults of the table


# -- validation at submit (property 5) -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": -5}, "max_output_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"json_schema": ["not", "a", "dict"]}, "json_schema"),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"json_schema": {"type": "nonsense"}}, "json_schema"),
        ({"json_schema": {"type": "object", "required": "name"}}, "json_schema"),
        ({"max_output_tokens": 5000}, "max_output_tokens"),
        ({"timeout": -1}, "timeout"),
        ({"priority": 1.5}, "priority"),
    ],
)
def test_bad_request_fields_fail_at_submit_naming_the_field(fake: FakeProvider, kw: dict[str, Any],
                                                              field: str) -> None:
    with Executor(one(), {"fake": fake}) as ex:
        with pytest.raises(InvalidRequestError) as info:
            ex.submit(req(**kw))
        assert field in str(info.value)
        assert info.value.field == field
        assert ex.run(req()).text == "echo:hi"  # the executor keeps serving


def test_unknown_provider_names_it_and_lists_the_known_ones(fake: FakeProvider) -> None:
    with Executor(one(), {"fake": fake}) as ex, pytest.raises(UnknownProviderError) as info:
        ex.submit(req("nope"))
    assert "'nope'" in str(info.value) and "fake" in str(info.value)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_json_schema_as_string_is_accepted_and_output_parsed() -> None:
    provider = FakeProvider(reply=lambda r: '{"answer": 4}')
    schema = '{"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}'
    with Executor(one(), {"fake": provider}) as ex:
        r = ex.run(req(json_schema=schema))
    assert r.data == {"answer": 4}
    assert isinstance(provider.seen[0].json_schema, dict)


def test_output_breaking_the_schema_fails_with_the_path_of_the_first_error() -> None:
    provider = FakeProvider(reply=lambda r: '{"items": [{"name": 3}]}')
    schema = {"type": "object", "properties": {"items": {"type": "array", "items": {
        "type": "object", "properties": {"name": {"type": "string"}}}}}}
    with Executor(one(), {"fake": provider}) as ex, pytest.raises(SchemaValidationError) as info:
        ex.run(req(json_schema=schema))
    assert info.value.path == "$.items[0].name"
    assert '{"items"' in info.value.text_head


def test_invalid_json_output_fails_and_repair_attempt_re_asks_with_the_error() -> None:
    answers = iter(["not json", '{"ok": true}'])
    provider = FakeProvider(reply=lambda r: next(answers))
    config = ExecutorConfig(providers={"fake": ProviderConfig(repair_attempts=1)})
    schema = {"type": "object", "required": ["ok"]}
    with Executor(config, {"fake": provider}) as ex:
        r = ex.run(req(json_schema=schema))
    assert r.data == {"ok": True} and r.attempts == 2
    assert "not valid" in provider.seen[1].prompt


# -- retries ------------------------------------------------------------------------------------------


def flaky(*errors: BaseException) -> FakeProvider:
    seq = iter(errors)
    return FakeProvider(reply=lambda r: next(seq, "ok"))


def test_retryable_errors_are_retried_with_backoff_through_the_injected_sleep() -> None:
    provider = flaky(ProviderUnavailableError("503", status=503), ProviderUnavailableError("502", status=502))
    slept: list[float] = []
    with Executor(one(max_retries=3), {"fake": provider}, sleep=slept.append) as ex:
        r = ex.run(req(), timeout=5)
    assert r.attempts == 3 and len(slept) == 2
    s = ex.stats()["fake"]
    assert (s.attempts, s.retries, s.completed) == (3, 2, 1)


def test_429_with_retry_after_waits_that_long_and_pauses_the_lane() -> None:
    provider = flaky(RateLimitedError("429", status=429, retry_after_s=20.0))
    slept: list[float] = []
    with Executor(one(max_retries=3), {"fake": provider}, sleep=slept.append) as ex:
        r = ex.run(req(), timeout=60)
        assert r.attempts == 2
        assert slept == [pytest.approx(20.0, abs=0.5)]
        assert ex.stats()["fake"].paused_until is not None


def test_retry_after_above_the_cap_fails_fast_with_rate_limited() -> None:
    provider = flaky(RateLimitedError("429", status=429, retry_after_s=600.0))
    with Executor(one(max_retry_wait_s=60), {"fake": provider}, sleep=lambda s: None) as ex:
        with pytest.raises(RateLimitedError) as info:
            ex.run(req())
    assert info.value.retry_after_s == 600.0 and not info.value.retryable
    assert ex.stats()["fake"].attempts == 1


def test_non_retryable_error_fails_at_once_and_retries_run_out() -> None:
    provider = flaky(ProviderError("400", status=400))
    with Executor(one(), {"fake": provider}) as ex, pytest.raises(ProviderError):
        ex.run(req())
    assert ex.stats()["fake"].attempts == 1
    always = FakeProvider(reply=lambda r: ProviderUnavailableError("down", status=503))
    with Executor(one(max_retries=2), {"fake": always}, sleep=lambda s: None) as ex:
        with pytest.raises(ProviderUnavailableError):
            ex.run(req())
    assert ex.stats()["fake"].attempts == 3


def test_each_retry_takes_a_new_rate_token() -> None:
    provider = flaky(ProviderUnavailableError("503", status=503), ProviderUnavailableError("503", status=503))
    with Executor(one(qps=2, max_retries=3), {"fake": provider}, sleep=lambda s: None) as ex:
        ex.run(req(), timeout=10)
    assert len(provider.starts) == 3
    assert max_in_window(provider.starts) <= 2


def test_deadline_bounds_the_retries() -> None:
    always = FakeProvider(reply=lambda r: ProviderUnavailableError("down", status=503, retry_after_s=5.0))
    with Executor(one(max_retries=5), {"fake": always}, sleep=lambda s: None) as ex:
        with pytest.raises(DeadlineExceededError):
            ex.run(req(timeout=1.0))


# -- auto routing and fallback --------------------------------------------------------------------------


def test_auto_picks_a_capable_provider_and_falls_back_after_retryable_failure() -> None:
    down = FakeProvider("down", reply=lambda r: ProviderUnavailableError("down", status=503))
    up = FakeProvider("up")
    config = ExecutorConfig(
        providers={"down": ProviderConfig(model="d-1", max_retries=1), "up": ProviderConfig(model="u-1")},
        fallbacks=("down", "up"),
    )
    with Executor(config, {"down": down, "up": up}, sleep=lambda s: None) as ex:
        ex._lanes["up"].paused_until = time.monotonic() + 30  # make "down" look earlier
        r = ex.run(LLMRequest("auto", "", "hello"), timeout=5)
        assert (r.provider, r.model) == ("up", "u-1")
        assert ex.stats()["down"].fallbacks == 1
        assert r.attempts == 3


def test_auto_without_a_capable_provider_says_why(fake: FakeProvider) -> None:
    with Executor(one(), {"fake": fake}) as ex, pytest.raises(InvalidRequestError, match="no default model"):
        ex.submit(LLMRequest("auto", "", "x"))


# -- observability -------------------------------------------------------------------------------------


def test_one_log_record_per_finished_request_with_structured_fields(caplog: pytest.LogCaptureFixture) -> None:
    provider = flaky(ProviderError("bad", status=400))
    caplog.set_level(logging.INFO, logger="llm_executor")
    with Executor(one(), {"fake": provider}) as ex:
        with pytest.raises(ProviderError):
            ex.run(req(request_id="r1"))
        ex.run(req(request_id="r2"))
    records = [r for r in caplog.records if getattr(r, "request_id", None) in ("r1", "r2")]
    assert [r.levelname for r in records] == ["WARNING", "INFO"]
    for r in records:
        for key in ("request_id", "provider", "model", "queue_len", "latency_ms", "queue_ms", "attempts",
                    "finish_reason"):
            assert hasattr(r, key), key
            assert key in r.getMessage()
    assert records[0].error == "ProviderError"


def test_stats_snapshot_has_every_field_and_as_dict(fake: FakeProvider) -> None:
    with Executor(one(), {"fake": fake}) as ex:
        for _ in range(3):
            ex.run(req())
        snap = ex.stats()
    d = snap.as_dict()["fake"]
    for key in ("queued", "in_flight", "completed", "failed", "failed_by_error", "retries", "latency_ms_mean",
                "latency_ms_p50", "latency_ms_p95", "queue_ms_mean", "tokens", "max_in_flight", "max_starts_1s",
                "paused_until"):
        assert key in d
    assert d["completed"] == 3 and d["tokens"] == 15


def test_prometheus_exporter_exposes_counters_and_gauges(fake: FakeProvider) -> None:
    prom = pytest.importorskip("prometheus_client")
    registry = prom.CollectorRegistry()
    with Executor(one(), {"fake": fake}) as ex:
        ex.enable_prometheus(registry=registry)
        ex.run(req())
        text = prom.generate_latest(registry).decode()
    assert 'llm_executor_requests_total{outcome="ok",provider="fake"} 1.0' in text
    assert "llm_executor_in_flight" in text and "llm_executor_latency_seconds_bucket" in text


def test_configured_builtin_without_adapter_or_with_bad_custom_object_is_a_config_error() -> None:
    with pytest.raises((ConfigError, InvalidRequestError)):
        Executor(ExecutorConfig(), providers={"x": object()})  # type: ignore[dict-item]


def test_unknown_fallback_name_is_a_config_error_naming_the_variable(fake: FakeProvider) -> None:
    config = ExecutorConfig(providers={"fake": ProviderConfig()}, fallbacks=("fake", "gemni"))
    with pytest.raises(ConfigError, match=r"LLM_EXECUTOR_FALLBACKS=.*'gemni'"):
        Executor(config, {"fake": fake})


def test_prometheus_export_can_be_enabled_again_after_shutdown(fake: FakeProvider) -> None:
    prom = pytest.importorskip("prometheus_client")
    registry = prom.CollectorRegistry()
    for _ in range(2):  # a notebook cell run twice
        with Executor(one(), {"fake": fake}) as ex:
            ex.enable_prometheus(registry=registry)
            ex.run(req())
            text = prom.generate_latest(registry).decode()
            assert 'llm_executor_requests_total{outcome="ok",provider="fake"} 1.0' in text
            assert "llm_executor_attempts_total" in text


def test_a_learned_limit_shows_in_stats_logs_once_per_change_and_exports(
        fake: FakeProvider, caplog: pytest.LogCaptureFixture) -> None:
    prom = pytest.importorskip("prometheus_client")
    registry = prom.CollectorRegistry()
    with Executor(one(), {"fake": fake}) as ex:
        ex.enable_prometheus(registry=registry)
        metrics = ex._lanes["fake"].metrics
        with caplog.at_level(logging.INFO, logger="llm_executor"):
            metrics.on_learned("qps", 2.0, "configured")
            metrics.on_learned("qps", 2.0, "configured")  # no change: no line
            metrics.on_learned("qps", 30.0, "headers", "x-ratelimit-limit-requests 2220")
        lines = [r.getMessage() for r in caplog.records if "qps" in r.getMessage()]
        assert lines == ["llm_executor: fake qps starts at 2 (configured)",
                         "llm_executor: fake qps -> 30 (headers: x-ratelimit-limit-requests 2220)"]
        learned = ex.stats()["fake"].learned["qps"]
        assert (learned.value, learned.source, learned.changes) == (30.0, "headers", 1)
        assert learned.changed_at is not None and ex.stats()["fake"].qps == 30.0
        text = prom.generate_latest(registry).decode()
    assert 'llm_executor_learned_limit{limit="qps",provider="fake",source="headers"} 30.0' in text
