"""The limiter contract, run over every backend (memory, SQLite file, Redis)."""

from __future__ import annotations

import threading
import time

import pytest

from llm_executor.errors import (
    DeadlineExceededError,
    ExecutorShutdownError,
    InvalidRequestError,
)
from llm_executor.limits import lane_key

from .conftest import MakeLimiter


class _SignallingEvent(threading.Event):
    """An Event that says when somebody starts waiting on it (no sleep needed to know)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        self.waiting.set()
        return super().wait(timeout)

def test_qps_tokens_are_free_up_to_the_limit_then_wait(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, qps=5, burst=5)
    assert limiter.is_limited
    assert [limiter.try_acquire() for _ in range(5)] == [0.0] * 5
    wait_s = limiter.try_acquire()
    assert 0.9 < wait_s <= 1.03
    assert 0.9 < limiter.expected_wait_s() <= 1.03


def test_qps_is_paced_by_default(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, qps=5)
    assert limiter.try_acquire() == 0.0
    assert 0.15 < limiter.try_acquire() <= 0.21  # one start per 1/QPS (+ margin), not 5 at once


def test_a_learned_fractional_qps_allows_its_ceiling_per_its_own_window(backend_url: str,
                                                                        make_limiter: MakeLimiter) -> None:
    """A learned QPS 2.5 is 3 starts per 1.2 s (+ 20 ms), not floor = 2 per 1 s: 2.46/s, not 1.96/s."""
    limiter = make_limiter(backend_url, qps=2.5, burst=3)
    limiter.reconfigure(limiter.cfg, learned_qps=True)
    assert [limiter.try_acquire() for _ in range(3)] == [0.0] * 3
    assert 1.1 < limiter.try_acquire() <= 1.23


def test_a_configured_fractional_qps_never_allows_more_than_itself_in_a_second(
        backend_url: str, make_limiter: MakeLimiter) -> None:
    """DESIGN: never more than its QPS in any 1 s window. A configured 2.5 is 2 per 1 s (+ 20 ms)."""
    limiter = make_limiter(backend_url, qps=2.5, burst=3)
    assert [limiter.try_acquire() for _ in range(2)] == [0.0] * 2
    assert 0.9 < limiter.try_acquire() <= 1.03


def test_expected_wait_takes_no_token(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, qps=2, burst=2)
    for _ in range(5):
        assert limiter.expected_wait_s() == 0.0
    assert [limiter.try_acquire() for _ in range(2)] == [0.0, 0.0]


def test_rpm_is_enforced_with_qps(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, qps=10, burst=10, rpm=3)
    assert [limiter.try_acquire() for _ in range(3)] == [0.0] * 3
    assert limiter.try_acquire() > 59


def test_unlimited_lane_never_waits(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url)
    stopping = threading.Event()
    assert not limiter.is_limited
    for _ in range(100):
        limiter.acquire(stopping)
    limiter.reserve_tokens(10**9, stopping)
    assert limiter.acquire_slot(stopping) is None
    assert limiter.expected_wait_s() == 0.0


def test_acquire_fails_fast_when_the_token_comes_after_the_deadline(backend_url: str,
                                                                    make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, qps=1)
    stopping = threading.Event()
    limiter.acquire(stopping)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="deadline"):
        limiter.acquire(stopping, deadline_monotonic=time.monotonic() + 0.2)
    assert time.monotonic() - started < 0.1


def test_acquire_wait_ends_when_stopping_is_set(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, qps=1)
    stopping = _SignallingEvent()
    limiter.acquire(stopping)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            limiter.acquire(stopping)
        except BaseException as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert stopping.waiting.wait(5), "the second acquire never started waiting"
    stopping.set()
    waiter.join(timeout=0.5)
    assert not waiter.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], ExecutorShutdownError)


def test_tpm_refund_reconciles_to_the_reported_usage(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, tpm=1000)
    stopping = threading.Event()
    limiter.reserve_tokens(600, stopping)
    assert limiter.tpm_used() == 600
    limiter.settle_tokens(600, 100)
    assert limiter.tpm_used() == 100
    # 900 fits only after the refund
    limiter.reserve_tokens(900, stopping, deadline_monotonic=time.monotonic() + 0.5)
    assert limiter.tpm_used() == 1000
    with pytest.raises(DeadlineExceededError, match="token budget"):
        limiter.reserve_tokens(1, stopping, deadline_monotonic=time.monotonic() + 5)


def test_tpm_debit_and_unknown_usage(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, tpm=1000)
    stopping = threading.Event()
    limiter.reserve_tokens(100, stopping)
    limiter.settle_tokens(100, 400)  # the provider used more than estimated: debit
    assert limiter.tpm_used() == 400
    limiter.reserve_tokens(50, stopping)
    limiter.settle_tokens(50, None)  # no usage reported: the estimate stands
    assert limiter.tpm_used() == 450


def test_tpm_refund_never_goes_below_zero(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, tpm=1000)
    limiter.reserve_tokens(10, threading.Event())
    limiter.settle_tokens(500, 0)
    assert limiter.tpm_used() == 0


def test_estimate_over_tpm_is_rejected_not_waited_for(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, tpm=1000)
    with pytest.raises(InvalidRequestError, match=r"~1001 tokens, more than LLM_EXECUTOR_OPENAI_TPM=1000"):
        limiter.check_estimate(1001)
    with pytest.raises(InvalidRequestError, match="could never run"):
        limiter.reserve_tokens(1001, threading.Event())
    limiter.check_estimate(1000)


def test_global_slots_cap_holders_and_release_is_idempotent(backend_url: str,
                                                            make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, global_max_parallel=2)
    stopping = threading.Event()
    first, second = limiter.acquire_slot(stopping), limiter.acquire_slot(stopping)
    assert first is not None and second is not None
    assert limiter.slots_held() == 2
    with pytest.raises(DeadlineExceededError, match="global in-flight slots"):
        limiter.acquire_slot(stopping, deadline_monotonic=time.monotonic() + 0.1)
    first()
    first()  # a second release must not free someone else's slot
    assert limiter.slots_held() == 1
    third = limiter.acquire_slot(stopping, deadline_monotonic=time.monotonic() + 1)
    assert third is not None
    with pytest.raises(DeadlineExceededError):
        limiter.acquire_slot(stopping, deadline_monotonic=time.monotonic() + 0.05)
    second()
    third()
    assert limiter.slots_held() == 0


def test_slot_wait_ends_when_stopping_is_set(backend_url: str, make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(backend_url, global_max_parallel=1)
    stopping = threading.Event()
    release = limiter.acquire_slot(stopping)
    assert release is not None
    threading.Timer(0.1, stopping.set).start()
    with pytest.raises(ExecutorShutdownError):
        limiter.acquire_slot(stopping, deadline_monotonic=time.monotonic() + 5)
    release()


def test_slots_return_on_close(backend_url: str, make_limiter: MakeLimiter) -> None:
    holder = make_limiter(backend_url, global_max_parallel=1)
    assert holder.acquire_slot(threading.Event()) is not None
    holder.close()
    if backend_url != "memory":  # a memory limiter is its own world; shared ones see the slot back
        other = make_limiter(backend_url, global_max_parallel=1)
        assert other.slots_held() == 0


def test_lanes_are_keyed_by_namespace_provider_and_key_hash(shared_url: str,
                                                            make_limiter: MakeLimiter) -> None:
    team_a = make_limiter(shared_url, qps=1, api_key="sk-team-a-SENTINEL")
    team_a_again = make_limiter(shared_url, qps=1, api_key="sk-team-a-SENTINEL")
    team_b = make_limiter(shared_url, qps=1, api_key="sk-team-b-SENTINEL")
    assert team_a.try_acquire() == 0.0
    assert team_a_again.try_acquire() > 0.5  # same key: one shared budget
    assert team_b.try_acquire() == 0.0  # another key: its own budget
    key = lane_key("ns", "openai", "sk-team-a-SENTINEL")
    assert key.startswith("ns:openai:") and "SENTINEL" not in key and len(key) == len("ns:openai:") + 12


def test_two_limiters_on_one_shared_backend_share_the_budget(shared_url: str,
                                                             make_limiter: MakeLimiter) -> None:
    one, two = (make_limiter(shared_url, qps=4, burst=4, tpm=100),
                make_limiter(shared_url, qps=4, burst=4, tpm=100))
    assert [one.try_acquire(), two.try_acquire(), one.try_acquire(), two.try_acquire()] == [0.0] * 4
    assert one.try_acquire() > 0.5 and two.try_acquire() > 0.5
    one.reserve_tokens(70, threading.Event())
    assert two.tpm_used() == 70
