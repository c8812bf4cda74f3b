"""The emulator against plain ``requests`` calls: wire formats, limits, faults, recorder."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jsonschema
import pytest
import requests

from llm_executor.testing import Emulator, ProviderSim

TIMEOUT = (2, 5)
ENTITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "entities": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
                "required": ["name", "type"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["entities"],
    "additionalProperties": False,
}
PROMPT = "Extract every person.\nText:\nMarie Curie met Albert Einstein in Brussels."


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as e:
        yield e


def openai_call(emu: Emulator, body: dict[str, Any] | None = None, **kw: Any) -> requests.Response:
    payload = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": PROMPT}]}
    payload.update(body or {})
    return requests.post(f"{emu.url('openai')}/chat/completions", json=payload, timeout=TIMEOUT, **kw)


def gemini_call(emu: Emulator, config: dict[str, Any] | None = None, **kw: Any) -> requests.Response:
    payload: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    if config is not None:
        payload["generationConfig"] = config
    url = f"{emu.url('gemini')}/v1beta/models/gemini-2.5-flash:generateContent"
    return requests.post(url, json=payload, timeout=TIMEOUT, **kw)


def ollama_call(emu: Emulator, extra: dict[str, Any] | None = None, **kw: Any) -> requests.Response:
    payload = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": PROMPT}]}
    payload.update(extra or {})
    return requests.post(f"{emu.url('ollama')}/api/chat", json=payload, timeout=TIMEOUT, **kw)


# -- wire formats ---------------------------------------------------------------------------------


def test_openai_success_shape_usage_and_finish_reason(emu: Emulator) -> None:
    r = openai_call(
        emu, {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPT}]}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "gpt-4o-mini"
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].startswith("Echo from gpt-4o-mini: Marie Curie")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    assert r.headers["x-request-id"].startswith("req_")


def test_openai_json_schema_reply_is_valid_and_built_from_prompt(emu: Emulator) -> None:
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "entities", "schema": ENTITY_SCHEMA, "strict": True},
    }
    data = json.loads(openai_call(emu, {"response_format": fmt}).json()["choices"][0]["message"]["content"])
    jsonschema.validate(data, ENTITY_SCHEMA)
    assert [e["name"] for e in data["entities"]] == ["Marie Curie", "Albert Einstein"]


def test_openai_json_object_needs_the_word_json(emu: Emulator) -> None:
    r = openai_call(emu, {"response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    ok = openai_call(
        emu,
        {
            "response_format": {"type": "json_object"},
            "messages": [{"role": "user", "content": "JSON please"}],
        },
    )
    assert isinstance(json.loads(ok.json()["choices"][0]["message"]["content"]), dict)


def test_openai_max_completion_tokens_gives_length(emu: Emulator) -> None:
    body = openai_call(emu, {"max_completion_tokens": 3}).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3


def test_openai_bad_json_body_is_400_in_openai_shape(emu: Emulator) -> None:
    r = requests.post(f"{emu.url('openai')}/chat/completions", data=b"{nope", timeout=TIMEOUT)
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_gemini_success_shape_usage_and_finish_reason(emu: Emulator) -> None:
    body = gemini_call(emu).json()
    cand = body["candidates"][0]
    assert cand["finishReason"] == "STOP" and cand["content"]["role"] == "model"
    assert "Marie Curie" in cand["content"]["parts"][0]["text"]
    usage = body["usageMetadata"]
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert body["modelVersion"] == "gemini-2.5-flash"


@pytest.mark.parametrize("field", ["responseJsonSchema", "responseSchema"])
def test_gemini_schema_reply_is_valid(emu: Emulator, field: str) -> None:
    schema = ENTITY_SCHEMA
    if field == "responseSchema":  # the OpenAPI subset: upper-case types, no additionalProperties
        schema = {
            "type": "OBJECT",
            "properties": {
                "entities": {
                    "type": "ARRAY",
                    "items": {
                        "type": "OBJECT",
                        "properties": {"name": {"type": "STRING"}, "type": {"type": "STRING"}},
                        "required": ["name", "type"],
                    },
                }
            },
            "required": ["entities"],
        }
    body = gemini_call(emu, {"responseMimeType": "application/json", field: schema}).json()
    data = json.loads(body["candidates"][0]["content"]["parts"][0]["text"])
    jsonschema.validate(data, ENTITY_SCHEMA)
    assert data["entities"][0] == {"name": "Marie Curie", "type": "person"}


def test_gemini_max_output_tokens_gives_max_tokens(emu: Emulator) -> None:
    body = gemini_call(emu, {"maxOutputTokens": 2}).json()
    assert body["candidates"][0]["finishReason"] == "MAX_TOKENS"


def test_gemini_schema_without_json_mime_is_invalid_argument(emu: Emulator) -> None:
    r = gemini_call(emu, {"responseJsonSchema": {"type": "object"}})
    assert r.status_code == 400 and r.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_ollama_chat_success_shape_and_counts(emu: Emulator) -> None:
    body = ollama_call(emu).json()
    assert body["done"] is True and body["done_reason"] == "stop"
    assert body["message"]["role"] == "assistant" and "Marie Curie" in body["message"]["content"]
    assert body["prompt_eval_count"] > 0 and body["eval_count"] > 0 and body["total_duration"] > 0


def test_ollama_format_schema_and_num_predict(emu: Emulator) -> None:
    data = json.loads(ollama_call(emu, {"format": ENTITY_SCHEMA}).json()["message"]["content"])
    jsonschema.validate(data, ENTITY_SCHEMA)
    cut = ollama_call(emu, {"options": {"num_predict": 2}}).json()
    assert cut["done_reason"] == "length" and cut["eval_count"] == 2


def test_ollama_generate_endpoint(emu: Emulator) -> None:
    r = requests.post(
        f"{emu.url('ollama')}/api/generate",
        json={"model": "llama3.2", "prompt": "Hi Ada Lovelace", "stream": False},
        timeout=TIMEOUT,
    )
    assert "Ada Lovelace" in r.json()["response"]


def test_listing_endpoints(emu: Emulator) -> None:
    models = requests.get(f"{emu.url('openai')}/models", timeout=TIMEOUT).json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    gem = requests.get(f"{emu.url('gemini')}/v1beta/models", timeout=TIMEOUT).json()
    assert gem["models"][0]["name"].startswith("models/")
    one = requests.get(f"{emu.url('gemini')}/v1beta/models/gemini-2.5-flash", timeout=TIMEOUT).json()
    assert one["outputTokenLimit"] > 0
    assert "version" in requests.get(f"{emu.base_url}/api/version", timeout=TIMEOUT).json()
    assert requests.get(f"{emu.base_url}/api/tags", timeout=TIMEOUT).json()["models"]
    assert emu.stats("openai").requests == 0  # listings are recorded but not counted


def test_unknown_model_gets_each_services_404() -> None:
    sims = {p: ProviderSim(models=("known",)) for p in ("openai", "gemini", "ollama")}
    with Emulator(sims) as emu:
        assert openai_call(emu).json()["error"]["code"] == "model_not_found"
        assert gemini_call(emu).json()["error"]["status"] == "NOT_FOUND"
        assert "try pulling it first" in ollama_call(emu).json()["error"]


# -- keys -----------------------------------------------------------------------------------------


def test_wrong_or_missing_key_answers_like_the_real_services() -> None:
    sims = {p: ProviderSim(require_key="sekrit-1234") for p in ("openai", "gemini", "ollama")}
    with Emulator(sims) as emu:
        r = openai_call(emu, headers={"Authorization": "Bearer wrong-9999"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert openai_call(emu).status_code == 401
        r = gemini_call(emu, headers={"x-goog-api-key": "wrong"})
        assert r.status_code == 400
        assert r.json()["error"]["details"][0]["reason"] == "API_KEY_INVALID"
        assert gemini_call(emu).status_code == 403
        assert ollama_call(emu).status_code == 401
        assert gemini_call(emu, headers={"x-goog-api-key": "sekrit-1234"}).status_code == 200


def test_recorded_headers_and_query_hide_keys(emu: Emulator) -> None:
    openai_call(emu, headers={"Authorization": "Bearer sk-SENTINEL"})
    url = f"{emu.url('gemini')}/v1beta/models/gemini-2.5-flash:generateContent?key=SENTINEL2"
    requests.post(
        url,
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": "SENTINEL3"},
        timeout=TIMEOUT,
    )
    seen = repr(emu.requests())
    assert "SENTINEL" not in seen
    rec = emu.requests("openai")[0]
    assert rec.headers["Authorization"] == "Bearer ***" and rec.model == "gpt-4o-mini" and rec.status == 200
    assert emu.requests("gemini")[0].path.endswith("key=***")


# -- limits ---------------------------------------------------------------------------------------


def _concurrent(n: int, call: Any) -> list[requests.Response]:
    barrier = threading.Barrier(n)

    def one(_: int) -> requests.Response:
        barrier.wait(5)
        response: requests.Response = call()
        return response

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


@pytest.mark.parametrize(
    ("provider", "refused"),
    [("openai", 429), ("gemini", 429), ("ollama", 503)],
)
def test_concurrency_cap_refuses_one_more(provider: str, refused: int) -> None:
    sims = {provider: ProviderSim(max_concurrency=2, latency_s=0.3)}
    call = {"openai": openai_call, "gemini": gemini_call, "ollama": ollama_call}[provider]
    with Emulator(sims) as emu:
        statuses = sorted(r.status_code for r in _concurrent(3, lambda: call(emu)))
        assert statuses == [200, 200, refused]
        stats = emu.stats(provider)
        assert stats.max_concurrency == 3 and stats.statuses == {200: 2, refused: 1}
        assert stats.faults == {("busy"): 1}


def test_rps_limit_openai_429_with_retry_after_headers() -> None:
    with Emulator({"openai": ProviderSim(rps=3)}) as emu:
        responses = [openai_call(emu) for _ in range(5)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    refused = responses[3]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.json()["error"]["type"] == "requests"
    assert int(refused.headers["retry-after"]) >= 1
    assert 0 < int(refused.headers["retry-after-ms"]) <= 1000


def test_rps_limit_gemini_retry_info_and_ollama_busy() -> None:
    with Emulator({"gemini": ProviderSim(rps=1), "ollama": ProviderSim(rps=1)}, seed=3) as emu:
        assert gemini_call(emu).status_code == 200
        err = gemini_call(emu).json()["error"]
        assert err["status"] == "RESOURCE_EXHAUSTED" and err["code"] == 429
        delay = next(d["retryDelay"] for d in err["details"] if d["@type"].endswith("RetryInfo"))
        assert delay.endswith("s") and 0 < float(delay[:-1]) <= 1.0
        assert ollama_call(emu).status_code == 200
        busy = ollama_call(emu)
        assert busy.status_code == 503 and busy.json() == {
            "error": "server busy, please try again.  maximum pending requests exceeded"
        }


def test_recorder_counts_window_and_concurrency() -> None:
    with Emulator({"openai": ProviderSim(latency_s=0.2)}) as emu:
        _concurrent(3, lambda: openai_call(emu))
        openai_call(emu)
        stats = emu.stats("openai")
        assert stats.requests == 4 and stats.statuses == {200: 4} and stats.in_flight == 0
        assert stats.max_concurrency == 3
        assert stats.max_requests_per_1s == 4
        assert len(emu.requests("openai")) == 4 and emu.requests("gemini") == []
        emu.reset()
        assert emu.stats("openai").requests == 0 and emu.requests() == []


# -- faults ---------------------------------------------------------------------------------------


def _fault_statuses(seed: int) -> list[int]:
    sim = ProviderSim(fault_rate=0.5, faults={"rate_limit": 1, "server_error": 1, "unavailable": 1})
    with Emulator({"openai": sim}, seed=seed) as emu:
        return [openai_call(emu).status_code for _ in range(24)]


def test_faults_are_reproducible_with_a_seed() -> None:
    first = _fault_statuses(7)
    assert first == _fault_statuses(7)
    assert {200, 429} <= set(first) and set(first) <= {200, 429, 500, 503}
    assert first != _fault_statuses(8)


def test_malformed_fault_is_200_with_broken_json() -> None:
    with Emulator(
        {p: ProviderSim(fault_rate=1.0, faults={"malformed": 1}) for p in ("openai", "ollama")}
    ) as emu:
        for r in (openai_call(emu), ollama_call(emu)):
            assert r.status_code == 200
            with pytest.raises(ValueError):
                r.json()
        assert emu.stats("openai").faults == {"malformed": 1}


def test_truncated_fault_reports_length_in_each_format() -> None:
    sims = {p: ProviderSim(fault_rate=1.0, faults={"truncated": 1}) for p in ("openai", "gemini", "ollama")}
    with Emulator(sims) as emu:
        assert openai_call(emu).json()["choices"][0]["finish_reason"] == "length"
        assert gemini_call(emu).json()["candidates"][0]["finishReason"] == "MAX_TOKENS"
        assert ollama_call(emu).json()["done_reason"] == "length"


def test_blocked_fault_gemini_200_without_candidates_and_openai_refusal() -> None:
    sims = {p: ProviderSim(fault_rate=1.0, faults={"blocked": 1}) for p in ("openai", "gemini")}
    with Emulator(sims) as emu:
        assert "candidates" not in gemini_call(emu).json()
        message = openai_call(emu).json()["choices"][0]["message"]
        assert message["content"] is None and message["refusal"]


def test_slow_fault_adds_delay() -> None:
    with Emulator({"openai": ProviderSim(fault_rate=1.0, faults={"slow": 1}, slow_s=0.2)}) as emu:
        start = time.monotonic()
        assert openai_call(emu).status_code == 200
        assert time.monotonic() - start >= 0.2


def test_hang_is_bounded_by_hang_s() -> None:
    with Emulator({"openai": ProviderSim(fault_rate=1.0, faults={"hang": 1}, hang_s=0.3)}) as emu:
        start = time.monotonic()
        with pytest.raises(requests.ConnectionError):
            openai_call(emu)
        assert time.monotonic() - start < 3
        assert emu.wait_idle(2)
        assert emu.stats("openai").statuses == {0: 1}


def test_hang_ends_when_the_client_gives_up() -> None:
    with Emulator({"openai": ProviderSim(fault_rate=1.0, faults={"hang": 1}, hang_s=60)}) as emu:
        with pytest.raises(requests.ReadTimeout):
            requests.post(
                f"{emu.url('openai')}/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                timeout=(2, 0.2),
            )
        assert emu.wait_idle(3), "the server thread kept hanging after the client left"


def test_stop_is_prompt_during_a_hang_and_idle_keepalive() -> None:
    emu = Emulator({"openai": ProviderSim(fault_rate=1.0, faults={"hang": 1}, hang_s=60)}).start()
    session = requests.Session()
    session.get(f"{emu.url('openai')}/models", timeout=TIMEOUT)  # leaves an idle keep-alive socket
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            openai_call(emu)
        except requests.RequestException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 5
    while emu.stats("openai").in_flight == 0 and time.monotonic() < deadline:
        threading.Event().wait(0.01)  # the request is in its hang once it is counted in flight
    assert emu.stats("openai").in_flight == 1
    start = time.monotonic()
    emu.stop()
    assert time.monotonic() - start < 2
    caller.join(5)
    assert not caller.is_alive() and outcome, "the client saw the connection close"
    assert not [t for t in threading.enumerate() if t.name.startswith("llm-emulator")]
    session.close()


def test_provider_sim_validates() -> None:
    with pytest.raises(ValueError, match="faults"):
        ProviderSim(faults={"explode": 1})
    with pytest.raises(ValueError, match="max_concurrency"):
        ProviderSim(max_concurrency=0)
    with pytest.raises(ValueError, match="not emulated"):
        Emulator({"anthropic": ProviderSim()})
    assert "sekrit" not in repr(ProviderSim(require_key="sekrit"))


def test_serve_blocks_until_stopped_and_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    from llm_executor.testing import serve

    stop = threading.Event()
    urls: list[str] = []

    def ready(emu: Emulator) -> None:
        urls.append(emu.url("openai"))
        stop.set()

    emu = serve(port=0, on_ready=ready, stop_event=stop)
    assert urls and urls[0].endswith("/v1") and not emu.running
    assert capsys.readouterr() == ("", "")


def test_ollama_streams_ndjson_unless_stream_false(emu: Emulator) -> None:
    r = requests.post(
        f"{emu.url('ollama')}/api/chat",
        json={"model": "llama3.2", "messages": [{"role": "user", "content": "Hi Ada"}]},
        timeout=TIMEOUT,
    )
    assert r.headers["Content-Type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True] and len(lines) > 2
    assert "".join(line["message"]["content"] for line in lines) == "Echo from llama3.2: Hi Ada"


def test_recorder_keeps_only_the_newest_max_records() -> None:
    with Emulator(max_records=2) as emu:
        for _ in range(3):
            openai_call(emu)
        assert len(emu.requests()) == 2 and emu.stats("openai").requests == 3


# The Linux delayed ACK the stall waits for: 40 ms (tcp_delack_min). A reply on a kept-alive
# connection that is written as headers then body without TCP_NODELAY waits this long for it.
DELAYED_ACK_S = 0.040


@pytest.mark.parametrize("stream", [False, True], ids=["one-body", "streamed"])
def test_kept_alive_replies_do_not_wait_for_the_delayed_ack(stream: bool) -> None:
    # Headers and body went out in two writes with Nagle's algorithm on: from the second request
    # on a kept-alive connection, the body waited for the client's delayed ACK, ~40 ms a reply
    # with zero configured latency. Compared against the stall, not against a speed: the median
    # of 20 sequential replies must be well under it, which any working machine gives.
    payload = {"model": "llama3.2", "stream": stream, "messages": [{"role": "user", "content": "Hi"}]}
    with Emulator({"ollama": ProviderSim(latency_s=0.0)}) as emu, requests.Session() as session:
        url = f"{emu.url('ollama')}/api/chat"
        session.post(url, json=payload, timeout=TIMEOUT).raise_for_status()  # opens the connection
        took = []
        for _ in range(20):
            start = time.monotonic()
            r = session.post(url, json=payload, timeout=TIMEOUT)
            took.append(time.monotonic() - start)
            assert r.status_code == 200 and r.text
        took.sort()
        assert took[len(took) // 2] < DELAYED_ACK_S / 2, f"median {took[len(took) // 2] * 1000:.1f} ms"
        assert sum(took) < 20 * DELAYED_ACK_S / 2, f"20 replies took {sum(took) * 1000:.0f} ms"
