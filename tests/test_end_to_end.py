"""End to end: Executor + built-in adapters + the emulator, one contract suite per provider.

These run real HTTP on 127.0.0.1 through the adapters, so they check the wire formats of both
sides against each other, and that the limits the executor promises are what the server sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.cli import main
from llm_executor.errors import (
    ContentBlockedError,
    InvalidRequestError,
    ProviderError,
    RateLimitedError,
    SchemaValidationError,
)
from llm_executor.testing import Emulator, ProviderSim, extract_entities

PROVIDERS = ["openai", "gemini", "ollama"]
MODELS = {"openai": "gpt-4o-mini", "gemini": "gemini-2.5-flash", "ollama": "llama3.2"}
KEY = "sk-SENTINEL-e2e-0000"
SCHEMA = {
    "type": "object",
    "properties": {"entities": {"type": "array", "items": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}},
    "required": ["entities"],
}


def executor_for(emu: Emulator, name: str, **pkw: Any) -> Executor:
    pcfg = ProviderConfig(base_url=emu.url(name), api_key=KEY, model=MODELS[name], timeout=5.0, **pkw)
    return Executor(ExecutorConfig(providers={name: pcfg}, queue_size=0))


@pytest.fixture(params=PROVIDERS)
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_plain_text_round_trip(provider: str) -> None:
    with Emulator({provider: ProviderSim(require_key=KEY)}) as emu, executor_for(emu, provider) as ex:
        r = ex.run(LLMRequest(provider, "", "Say hello to Ada Lovelace", system="Be brief"), timeout=10)
    assert r.provider == provider and r.finish_reason == "stop" and r.text
    assert r.attempts == 1 and r.usage_tokens and r.usage_tokens > 0
    assert r.model.startswith(MODELS[provider].split("-")[0])


def test_structured_output_is_validated_and_parsed(provider: str) -> None:
    text = "Ada Lovelace met Charles Babbage in London."
    prompt = f"Entity type to extract: person\nAnswer with JSON.\n\nText:\n{text}"
    with Emulator({provider: ProviderSim()}) as emu, executor_for(emu, provider) as ex:
        r = ex.run(LLMRequest(provider, "", prompt, json_schema=SCHEMA), timeout=10)
    assert [e["name"] for e in r.data["entities"]] == extract_entities(text, "person")


def test_truncated_reply_reports_length(provider: str) -> None:
    sim = ProviderSim(fault_rate=1.0, faults={"truncated": 1.0})
    with Emulator({provider: sim}) as emu, executor_for(emu, provider) as ex:
        r = ex.run(LLMRequest(provider, "", "Tell a long story about Ada Lovelace and London"), timeout=10)
    assert r.finish_reason == "length"


def test_malformed_json_body_fails_that_request_only(provider: str) -> None:
    sim = ProviderSim(fault_rate=1.0, faults={"malformed": 1.0})
    with Emulator({provider: sim}) as emu, executor_for(emu, provider) as ex:
        with pytest.raises(ProviderError) as info:
            ex.run(LLMRequest(provider, "", "hi"), timeout=10)
        assert not info.value.retryable
        assert KEY not in str(info.value)
        with pytest.raises(ProviderError):  # the executor keeps serving: the next one is answered
            ex.run(LLMRequest(provider, "", "again"), timeout=10)
        assert ex.stats()[provider].failed == 2


def test_server_errors_are_retried_until_success(provider: str) -> None:
    # Seeded faults: some 500/503 answers, every one retried with backoff, all requests end well.
    sim = ProviderSim(fault_rate=0.4, faults={"server_error": 1.0, "unavailable": 1.0})
    with Emulator({provider: sim}, seed=3) as emu, \
            executor_for(emu, provider, max_retries=8, backoff_max_s=0.05) as ex:
        responses = list(ex.map(LLMRequest(provider, "", f"question {i}") for i in range(20)))
        s = ex.stats()[provider]
    assert len(responses) == 20
    faulted = sum(emu.stats(provider).faults.values())
    assert faulted > 0 and s.retries == faulted and s.attempts == 20 + faulted


def test_emulator_never_sees_more_than_the_executor_limits(provider: str) -> None:
    # The emulator enforces the same limits and refuses any excess: zero refusals = limits held.
    sim = ProviderSim(max_concurrency=3, rps=10, latency_s=0.05)
    with Emulator({provider: sim}) as emu, executor_for(emu, provider, max_parallel=3, qps=10) as ex:
        for f in [ex.submit(LLMRequest(provider, "", f"q{i}")) for i in range(25)]:
            f.result(20)
        s = ex.stats()[provider]
    e = emu.stats(provider)
    assert e.faults.get("rate_limited", 0) == 0 and e.faults.get("busy", 0) == 0
    assert e.max_concurrency <= 3 and e.max_requests_per_1s <= 10
    assert s.max_in_flight <= 3 and s.max_starts_1s <= 10 and s.completed == 25


def test_server_side_429_pauses_the_lane_and_honours_retry_after(provider: str) -> None:
    # The executor is allowed more than the server accepts: the server's 429 (or Ollama's 503)
    # answers are retried after the wait they ask for, and every request still succeeds.
    sim = ProviderSim(rps=4)
    with Emulator({provider: sim}) as emu, \
            executor_for(emu, provider, max_parallel=4, qps=20, max_retries=10) as ex:
        for f in [ex.submit(LLMRequest(provider, "", f"q{i}")) for i in range(8)]:
            f.result(30)
        s = ex.stats()[provider]
    refused = emu.stats(provider).faults.get("rate_limited", 0) + emu.stats(provider).faults.get("busy", 0)
    assert refused > 0 and s.retries >= refused and s.completed == 8


def test_wrong_key_is_a_clear_non_retryable_error_without_the_key(provider: str) -> None:
    with Emulator({provider: ProviderSim(require_key="the-right-key")}) as emu, executor_for(emu, provider) as ex:
        with pytest.raises(ProviderError) as info:
            ex.run(LLMRequest(provider, "", "hi"), timeout=10)
    assert not info.value.retryable and KEY not in str(info.value) and "the-right-key" not in str(info.value)
    assert ex.stats()[provider].attempts == 1


def test_blocked_prompt_on_gemini_raises_content_blocked() -> None:
    sim = ProviderSim(fault_rate=1.0, faults={"blocked": 1.0})
    with Emulator({"gemini": sim}) as emu, executor_for(emu, "gemini") as ex:
        with pytest.raises(ContentBlockedError):
            ex.run(LLMRequest("gemini", "", "hi"), timeout=10)


def test_quota_style_fail_fast_when_retry_after_is_above_the_cap() -> None:
    sim = ProviderSim(fault_rate=1.0, faults={"rate_limit": 1.0}, retry_after_s=120.0)
    with Emulator({"openai": sim}) as emu, executor_for(emu, "openai", max_retry_wait_s=10) as ex:
        with pytest.raises(RateLimitedError) as info:
            ex.run(LLMRequest("openai", "", "hi"), timeout=10)
    assert info.value.retry_after_s == pytest.approx(120.0, abs=1) and ex.stats()["openai"].attempts == 1


def test_auto_routes_to_a_capable_provider_and_falls_back() -> None:
    sims = {"openai": ProviderSim(fault_rate=1.0, faults={"unavailable": 1.0}), "ollama": ProviderSim()}
    with Emulator(sims) as emu:
        cfg = ExecutorConfig(providers={
            n: ProviderConfig(base_url=emu.url(n), api_key=KEY, model=MODELS[n], max_retries=1, backoff_max_s=0.01)
            for n in sims}, fallbacks=("openai", "ollama"))
        with Executor(cfg) as ex:
            ex._lanes["ollama"].paused_until = 0.0
            results = [ex.run(LLMRequest("auto", "", f"q{i}", json_schema=SCHEMA), timeout=20) for i in range(4)]
            stats = ex.stats()
    assert all(r.provider == "ollama" for r in results)
    assert stats["openai"].fallbacks >= 1 or stats["openai"].attempts == 0


def test_json_breaking_the_schema_after_a_repair_fails_with_the_path() -> None:
    # The emulator answers valid JSON for the schema it is sent; a malformed body instead is a
    # SchemaValidationError when it parses as text but not as the schema: use the truncation fault.
    sim = ProviderSim(fault_rate=1.0, faults={"truncated": 1.0})
    with Emulator({"ollama": sim}) as emu, executor_for(emu, "ollama", repair_attempts=1) as ex:
        with pytest.raises(SchemaValidationError) as info:
            ex.run(LLMRequest("ollama", "", "Text:\nAda Lovelace met Charles Babbage.", json_schema=SCHEMA,
                              max_output_tokens=3), timeout=10)
        assert ex.stats()["ollama"].attempts == 2  # the first answer and one repair
    assert info.value.path == "$" and info.value.text_head


# -- the command line ------------------------------------------------------------------------


def test_demo_short_mode_succeeds_and_reports_limits(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--max-docs", "1", "--json", "--fault-rate", "0.1", "--seed", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["limits_held"] and report["every_task_resolved"]
    assert {p["provider"] for p in report["providers"]} == {"openai", "gemini", "ollama"}
    assert report["pipeline"]["entities"]


def test_demo_human_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--max-docs", "1", "--providers", "ollama", "--fault-rate", "0"]) == 0
    out = capsys.readouterr().out
    assert "every limit held" in out and "deduplicated entities" in out and "ollama" in out


def test_demo_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--providers", "nope"]) == 2
    assert "unknown" in capsys.readouterr().err


def test_run_and_check_against_the_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    with Emulator({"ollama": ProviderSim()}) as emu:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("LLM_EXECUTOR_PROVIDERS", "ollama")
        monkeypatch.setenv("OLLAMA_HOST", emu.url("ollama"))
        monkeypatch.setenv("LLM_EXECUTOR_OLLAMA_MODEL", "llama3.2")
        assert main(["check"]) == 0
        assert "OK" in capsys.readouterr().out
        lines = [json.dumps({"id": f"r{i}", "prompt": f"question {i}", "provider": "ollama"}) for i in range(5)]
        (tmp_path / "in.jsonl").write_text("\n".join([*lines, "{broken"]) + "\n")
        assert main(["run", "in.jsonl", "-o", "out.jsonl", "-q"]) == 1  # one bad line
        out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
        assert sorted(o["id"] for o in out) == [f"r{i}" for i in range(5)] and all(o["ok"] for o in out)
        assert main(["run", "in.jsonl", "-o", "out.jsonl", "-q"]) == 1  # resumed: nothing new, bad line again
        assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5


def test_auto_skips_a_provider_without_its_api_key() -> None:
    with Emulator({"ollama": ProviderSim()}) as emu:
        cfg = ExecutorConfig(providers={
            "openai": ProviderConfig(model="gpt-4o-mini"),  # api.openai.com and no key: not usable
            "ollama": ProviderConfig(base_url=emu.url("ollama"), model="llama3.2"),
        })
        with Executor(cfg) as ex:
            ex._lanes["ollama"].paused_until = 0.0
            assert ex.run(LLMRequest("auto", "", "hi"), timeout=10).provider == "ollama"
    only_openai = ExecutorConfig(providers={"openai": ProviderConfig(model="gpt-4o-mini")})
    with Executor(only_openai) as ex, pytest.raises(InvalidRequestError, match="openai: not configured"):
        ex.submit(LLMRequest("auto", "", "hi"))
