"""The emulator's routes, streams and fields, over plain ``requests`` (the SDK view is tests/conformance)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from llm_executor.testing import Emulator, ProviderSim, extract_entities

TIMEOUT = (2, 5)
PROMPT = "Say hello to Ada Lovelace and Charles Babbage in London, please, and be brief about it."
GOOGLE = {"x-goog-api-key": "k"}


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as e:
        yield e


def post(emu: Emulator, path: str, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(emu.base_url + path, json=body, headers=headers, timeout=TIMEOUT)


def gemini_body(text: str = PROMPT, **config: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if config:
        body["generationConfig"] = config
    return body


def chat_body(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}


def sse_events(r: requests.Response) -> list[Any]:
    data = [line[len("data: "):] for line in r.text.split("\n") if line.startswith("data: ")]
    return [d if d == "[DONE]" else json.loads(d) for d in data]


# -- routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v1", "v1beta"])
def test_gemini_generate_is_served_under_v1_and_v1beta(emu: Emulator, version: str) -> None:
    r = post(emu, f"/{version}/models/gemini-2.5-flash:generateContent", gemini_body())
    assert r.status_code == 200 and r.json()["candidates"][0]["content"]["parts"][0]["text"]
    assert emu.requests("gemini")[-1].model == "gemini-2.5-flash"


def test_get_v1_models_is_gemini_with_google_headers_and_openai_without(emu: Emulator) -> None:
    google = requests.get(emu.base_url + "/v1/models", headers=GOOGLE, timeout=TIMEOUT).json()
    assert google["models"][0]["name"].startswith("models/")
    openai = requests.get(emu.base_url + "/v1/models", timeout=TIMEOUT).json()
    assert openai["object"] == "list" and openai["data"][0]["object"] == "model"
    one = requests.get(emu.base_url + "/v1/models/gemini-2.5-pro", headers=GOOGLE, timeout=TIMEOUT).json()
    assert one["name"] == "models/gemini-2.5-pro" and one["thinking"] is True


def test_unknown_routes_get_each_apis_404_naming_method_and_path(emu: Emulator) -> None:
    r = post(emu, "/v1/chat/complete", chat_body())
    assert r.status_code == 404 and r.json()["error"]["message"] == "Invalid URL (POST /v1/chat/complete)"
    assert r.json()["error"]["code"] is None  # not model_not_found
    r = requests.get(emu.base_url + "/v1/chat/completions", timeout=TIMEOUT)
    assert r.json()["error"]["message"] == "Invalid URL (GET /v1/chat/completions)"
    r = post(emu, "/v1beta/models/gemini-2.5-flash:generate", gemini_body())
    err = r.json()["error"]
    assert r.status_code == 404 and err["status"] == "NOT_FOUND"
    assert "POST /v1beta/models/gemini-2.5-flash:generate" in err["message"]
    assert "is not found for" not in err["message"]
    r = post(emu, "/api/chats", {"model": "llama3.2"})
    assert r.status_code == 404 and r.text == "404 page not found"
    assert requests.get(emu.base_url + "/nowhere", timeout=TIMEOUT).status_code == 404


def test_unknown_model_404s_name_the_model_and_api_version() -> None:
    sims = {p: ProviderSim(models=("known",)) for p in ("openai", "gemini", "ollama")}
    with Emulator(sims) as emu:
        err = post(emu, "/v1/models/other:generateContent", gemini_body()).json()["error"]
        assert err["status"] == "NOT_FOUND" and "models/other is not found for API version v1," in err["message"]
        r = requests.get(emu.base_url + "/v1/models/other", timeout=TIMEOUT)
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert requests.get(emu.base_url + "/v1/models/known", timeout=TIMEOUT).json()["id"] == "known"
        r = post(emu, "/api/show", {"model": "other"})
        assert r.status_code == 404 and r.json() == {"error": "model 'other' not found"}


# -- streaming -------------------------------------------------------------------------------------


def test_openai_stream_is_chunks_then_a_usage_chunk_then_done(emu: Emulator) -> None:
    plain = post(emu, "/v1/chat/completions", chat_body()).json()
    r = post(emu, "/v1/chat/completions", chat_body(stream=True, stream_options={"include_usage": True}))
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert r.headers.get("Transfer-Encoding") == "chunked"
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-2]["usage"] is None
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == plain["usage"]["total_tokens"]
    without = sse_events(post(emu, "/v1/chat/completions", chat_body(stream=True)))
    assert all("usage" not in c for c in without[:-1])


def test_gemini_stream_sse_and_json_array(emu: Emulator) -> None:
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    plain = post(emu, "/v1beta/models/gemini-2.5-flash:generateContent", gemini_body()).json()
    want = plain["candidates"][0]["content"]["parts"][0]["text"]
    events = sse_events(post(emu, path + "?alt=sse", gemini_body()))
    assert len(events) > 1 and len({e["responseId"] for e in events}) == 1
    assert "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in events) == want
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert "finishReason" not in events[0]["candidates"][0]
    assert events[-1]["usageMetadata"]["totalTokenCount"] == plain["usageMetadata"]["totalTokenCount"]
    array = post(emu, path, gemini_body()).json()
    assert isinstance(array, list) and "".join(e["candidates"][0]["content"]["parts"][0]["text"] for e in array) == want


def test_ollama_generate_streams_ndjson_pieces(emu: Emulator) -> None:
    r = post(emu, "/api/generate", {"model": "llama3.2", "prompt": PROMPT})
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert len(lines) > 2 and lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    full = post(emu, "/api/generate", {"model": "llama3.2", "prompt": PROMPT, "stream": False}).json()
    assert "".join(line["response"] for line in lines) == full["response"]
    assert lines[-1]["eval_count"] == full["eval_count"] and "context" in full


# -- fields -------------------------------------------------------------------------------------------


def test_openai_fields_the_sdk_reads(emu: Emulator) -> None:
    body = post(emu, "/v1/chat/completions", chat_body(service_tier="flex")).json()
    assert body["system_fingerprint"].startswith("fp_") and body["service_tier"] == "flex"
    usage = body["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0, "audio_tokens": 0}
    assert set(usage["completion_tokens_details"]) == {"reasoning_tokens", "audio_tokens",
                                                        "accepted_prediction_tokens", "rejected_prediction_tokens"}
    assert body["choices"][0]["message"]["annotations"] == []


def test_openai_reasoning_models_reject_max_tokens_and_temperature_and_report_reasoning_tokens() -> None:
    with Emulator({"openai": ProviderSim(thinking_tokens=7)}) as emu:
        r = post(emu, "/v1/chat/completions", chat_body("gpt-5-mini", max_tokens=50))
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
        r = post(emu, "/v1/chat/completions", chat_body("o3-mini", temperature=0.2))
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
        ok = post(emu, "/v1/chat/completions", chat_body("o4-mini", max_completion_tokens=200)).json()
        details = ok["usage"]["completion_tokens_details"]
        assert details["reasoning_tokens"] == 7 and ok["usage"]["completion_tokens"] > 7
        plain = post(emu, "/v1/chat/completions", chat_body("gpt-4o", max_tokens=50, temperature=0.2)).json()
        assert plain["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0


def test_openai_responses_api(emu: Emulator) -> None:
    schema = {"type": "object", "properties": {"names": {"type": "array", "items": {"type": "string"}}},
              "required": ["names"], "additionalProperties": False}
    body = {"model": "gpt-4o-mini", "input": PROMPT, "instructions": "Extract people.",
            "text": {"format": {"type": "json_schema", "name": "people", "schema": schema, "strict": True}}}
    out = post(emu, "/v1/responses", body).json()
    assert out["object"] == "response" and out["status"] == "completed" and out["instructions"] == "Extract people."
    text = out["output"][0]["content"][0]["text"]
    assert json.loads(text) == {"names": extract_entities(PROMPT, "person")}
    assert out["usage"]["input_tokens_details"] == {"cached_tokens": 0, "cache_write_tokens": 0}
    cut = post(emu, "/v1/responses", {"model": "gpt-4o-mini", "input": PROMPT, "max_output_tokens": 2}).json()
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}


def test_gemini_blocked_prompt_keeps_response_id_and_details() -> None:
    with Emulator({"gemini": ProviderSim(fault_rate=1.0, faults={"blocked": 1})}) as emu:
        body = post(emu, "/v1beta/models/gemini-2.5-flash:generateContent", gemini_body()).json()
    assert "candidates" not in body and body["promptFeedback"]["blockReason"]
    assert body["responseId"] and body["usageMetadata"]["promptTokensDetails"][0]["modality"] == "TEXT"


def test_gemini_thoughts_are_reported_and_count_against_the_output_cap() -> None:
    with Emulator({"gemini": ProviderSim(thinking_tokens=30)}) as emu:
        path = "/v1beta/models/gemini-2.5-flash:generateContent"
        usage = post(emu, path, gemini_body()).json()["usageMetadata"]
        assert usage["thoughtsTokenCount"] == 30
        assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"] + 30
        eaten = post(emu, path, gemini_body(maxOutputTokens=20)).json()["candidates"][0]
        assert eaten["finishReason"] == "MAX_TOKENS" and "parts" not in eaten["content"]
        off = post(emu, path, gemini_body(thinkingConfig={"thinkingBudget": 0})).json()["usageMetadata"]
        assert "thoughtsTokenCount" not in off
        old = post(emu, "/v1beta/models/gemini-2.0-flash:generateContent", gemini_body()).json()
        assert "thoughtsTokenCount" not in old["usageMetadata"]


def test_gemini_count_tokens_and_paged_listing(emu: Emulator) -> None:
    r = post(emu, "/v1beta/models/gemini-2.5-flash:countTokens", gemini_body("one two three"))
    assert r.json() == {"totalTokens": 3, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 3}]}
    assert emu.stats("gemini").requests == 0  # not a generation
    first = requests.get(emu.base_url + "/v1beta/models?pageSize=1", timeout=TIMEOUT).json()
    assert len(first["models"]) == 1 and first["nextPageToken"]
    rest = requests.get(emu.base_url + f"/v1beta/models?pageSize=1&pageToken={first['nextPageToken']}",
                        timeout=TIMEOUT).json()
    assert rest["models"][0]["name"] != first["models"][0]["name"] and "nextPageToken" not in rest


def test_ollama_show_ps_embed(emu: Emulator) -> None:
    assert requests.get(emu.base_url + "/api/ps", timeout=TIMEOUT).json() == {"models": []}
    post(emu, "/api/chat", {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "Hi"}]})
    loaded = requests.get(emu.base_url + "/api/ps", timeout=TIMEOUT).json()["models"]
    assert [m["name"] for m in loaded] == ["llama3.2:latest"] and loaded[0]["expires_at"].endswith("Z")
    show = post(emu, "/api/show", {"model": "llama3.2"}).json()
    assert show["model_info"]["llama.context_length"] > 0 and "completion" in show["capabilities"]
    emb = post(emu, "/api/embed", {"model": "llama3.2", "input": ["a b", "c"]}).json()
    assert len(emb["embeddings"]) == 2 and len(emb["embeddings"][0]) == 768
    again = post(emu, "/api/embed", {"model": "llama3.2", "input": "a b"}).json()
    assert again["embeddings"][0] == emb["embeddings"][0]  # a pure function of the text
    assert abs(sum(v * v for v in emb["embeddings"][0]) - 1) < 1e-3
    assert post(emu, "/api/show", {}).status_code == 400


def test_key_is_checked_on_info_routes_too() -> None:
    with Emulator({p: ProviderSim(require_key="sekrit") for p in ("openai", "gemini", "ollama")}) as emu:
        assert requests.get(emu.base_url + "/v1/models/gpt-4o", timeout=TIMEOUT).status_code == 401
        assert post(emu, "/v1/models/gemini-2.5-flash:countTokens", gemini_body(), GOOGLE).status_code == 400
        assert post(emu, "/api/show", {"model": "llama3.2"}).status_code == 401
        assert requests.get(emu.base_url + "/api/version", timeout=TIMEOUT).status_code == 200  # public
