"""The emulator's hidden limits, rate-limit headers, run-time changes and latency model (issue 12's needs)."""

from __future__ import annotations

from typing import Any

import pytest
import requests

from llm_executor.testing import Emulator, ProviderSim
from llm_executor.testing.emulator.limits import ServiceModel
from llm_executor.testing.emulator.wire import go_duration

TIMEOUT = (2, 5)


def chat(emu: Emulator, **extra: Any) -> requests.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "one two three"}], **extra}
    return requests.post(emu.url("openai") + "/chat/completions", json=body, timeout=TIMEOUT)


def gemini(emu: Emulator) -> requests.Response:
    body = {"contents": [{"role": "user", "parts": [{"text": "one two three"}]}]}
    return requests.post(emu.base_url + "/v1beta/models/gemini-2.5-flash:generateContent", json=body,
                         timeout=TIMEOUT)


def test_rate_limit_headers_count_down_the_enforced_rpm_window() -> None:
    with Emulator({"openai": ProviderSim(rpm=3, tpm=1000)}) as emu:
        replies = [chat(emu) for _ in range(4)]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies] == ["2", "1", "0", "0"]
    assert {r.headers["x-ratelimit-limit-requests"] for r in replies} == {"3"}
    assert {r.headers["x-ratelimit-limit-tokens"] for r in replies} == {"1000"}
    used = [1000 - int(r.headers["x-ratelimit-remaining-tokens"]) for r in replies[:3]]
    assert used[0] > 0 and used == [used[0], 2 * used[0], 3 * used[0]]
    # The window is back to its initial state 60 s after the newest accepted request.
    reset = replies[2].headers["x-ratelimit-reset-requests"]
    assert reset.endswith("s") and reset.startswith(("59", "1m0s"))
    refused = replies[3]
    assert refused.json()["error"]["type"] == "requests"
    assert "Limit 3, Used 3, Requested 1" in refused.json()["error"]["message"]
    # retry-after says when the *oldest* request leaves the window: the first free slot.
    assert 55 <= int(refused.headers["retry-after"]) <= 60


def test_tpm_refusal_is_a_tokens_429_charged_max_tokens() -> None:
    with Emulator({"openai": ProviderSim(tpm=100)}) as emu:
        assert chat(emu, max_tokens=60).status_code == 200
        refused = chat(emu, max_tokens=60)
    err = refused.json()["error"]
    assert refused.status_code == 429 and err["type"] == "tokens"
    assert "tokens per min (TPM): Limit 100" in err["message"]


def test_headers_are_off_for_gemini_and_ollama_by_default_and_switchable() -> None:
    with Emulator({"gemini": ProviderSim(rpm=5), "openai": ProviderSim(rpm=5, rate_limit_headers=False)}) as emu:
        assert not any(k.startswith("x-ratelimit") for k in gemini(emu).headers)
        assert not any(k.startswith("x-ratelimit") for k in chat(emu).headers)
        emu.set_limits("gemini", rate_limit_headers=True)
        assert gemini(emu).headers["x-ratelimit-remaining-requests"] == "3"


def test_no_header_for_a_dimension_without_a_limit() -> None:
    with Emulator() as emu:
        assert not any(k.startswith("x-ratelimit") for k in chat(emu).headers)
    with Emulator({"openai": ProviderSim(rps=4)}) as emu:
        headers = chat(emu).headers
        assert headers["x-ratelimit-limit-requests"] == "4" and "x-ratelimit-limit-tokens" not in headers


def test_set_limits_lowers_a_hidden_limit_while_serving() -> None:
    with Emulator({"openai": ProviderSim(rpm=10)}) as emu:
        assert [chat(emu).status_code for _ in range(3)] == [200] * 3
        assert emu.set_limits("openai", rpm=4).rpm == 4 and emu.sim("openai").rpm == 4
        # The window keeps its 3 requests: one more fits under the halved limit, then 429.
        assert [chat(emu).status_code for _ in range(2)] == [200, 429]
        with pytest.raises(ValueError, match="not ProviderSim fields"):
            emu.set_limits("openai", qps=3)
        with pytest.raises(ValueError, match="rpm"):
            emu.set_limits("openai", rpm=0)


@pytest.mark.parametrize(("sim", "quota_id", "value"), [
    (ProviderSim(rpm=1), "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "1"),
    (ProviderSim(rps=1), "GenerateRequestsPerMinutePerProjectPerModel-FreeTier", "60"),
    (ProviderSim(rpd=1), "GenerateRequestsPerDayPerProjectPerModel-FreeTier", "1"),
    (ProviderSim(tpm=15), "GenerateContentInputTokensPerModelPerMinute-FreeTier", "15"),
])
def test_gemini_429_names_its_quota_and_retry_delay(sim: ProviderSim, quota_id: str, value: str) -> None:
    with Emulator({"gemini": sim}) as emu:
        assert gemini(emu).status_code == 200
        refused = gemini(emu)
    err = refused.json()["error"]
    assert refused.status_code == 429 and err["status"] == "RESOURCE_EXHAUSTED" and "retry-after" not in refused.headers
    by_type = {d["@type"].rsplit(".", 1)[1]: d for d in err["details"]}
    violation = by_type["QuotaFailure"]["violations"][0]
    assert violation["quotaId"] == quota_id and violation["quotaValue"] == value
    assert by_type["RetryInfo"]["retryDelay"].endswith("s") and "Please retry in" in err["message"]


def test_the_longest_wait_wins_when_two_limits_refuse() -> None:
    with Emulator({"openai": ProviderSim(rps=1, rpm=1)}) as emu:
        chat(emu)
        refused = chat(emu)
    assert int(refused.headers["retry-after"]) > 50  # the minute window, not the second one


def test_service_model_is_constant_up_to_capacity_then_shared() -> None:
    model = ServiceModel()
    model.virtual_stamp = 0.0
    finish_a = model.start(0.0, 1.0, capacity=2)
    finish_b = model.start(0.0, 1.0, capacity=2)
    assert model.left_s(0.5, finish_a, 2) == pytest.approx(0.5)  # two in service, capacity 2: full speed
    finish_c = model.start(0.5, 1.0, capacity=2)
    model.start(0.5, 1.0, capacity=2)
    # Four in service sharing capacity 2: each progresses at half speed, so 0.5 s of work takes 1 s.
    assert model.left_s(0.5, finish_a, 2) == pytest.approx(1.0)
    assert model.left_s(1.5, finish_b, 2) == pytest.approx(0.0)
    model.end(1.5, 2)
    model.end(1.5, 2)
    # Back to two: c has had 0.5 s of work at half speed and needs 0.5 s more at full speed.
    assert model.left_s(1.5, finish_c, 2) == pytest.approx(0.5)
    unlimited = ServiceModel()
    unlimited.virtual_stamp = 0.0
    ends = [unlimited.start(0.0, 1.0, None) for _ in range(10)]
    assert unlimited.left_s(0.25, ends[0], None) == pytest.approx(0.75)


def test_capacity_holds_requests_for_their_shared_service_time() -> None:
    from concurrent.futures import ThreadPoolExecutor

    with Emulator({"ollama": ProviderSim(latency_s=0.05, capacity=1)}) as emu:
        body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]}

        def call(_: int) -> float:
            r = requests.post(emu.base_url + "/api/chat", json=body, timeout=TIMEOUT)
            assert r.status_code == 200
            return r.elapsed.total_seconds()

        with ThreadPoolExecutor(4) as pool:
            assert len(list(pool.map(call, range(4)))) == 4
        # Every request was answered and every service slot given back.
        assert emu.wait_idle(2) and emu.stats("ollama").statuses == {200: 4}


def test_stop_interrupts_a_shared_service_wait() -> None:
    import threading
    import time

    emu = Emulator({"ollama": ProviderSim(latency_s=60, capacity=1)}).start()
    failed: list[BaseException] = []

    def call() -> None:
        body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "hi"}]}
        try:
            requests.post(emu.base_url + "/api/chat", json=body, timeout=(2, 30))
        except requests.RequestException as exc:
            failed.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 5
    while emu.stats("ollama").in_flight == 0 and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    start = time.monotonic()
    emu.stop()
    assert time.monotonic() - start < 3
    caller.join(5)
    assert not caller.is_alive() and failed


@pytest.mark.parametrize(("seconds", "text"), [(0.02, "20ms"), (1.5, "1.5s"), (60, "1m0s"), (3723.5, "1h2m3.5s")])
def test_go_durations_read_like_openais_reset_headers(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text
