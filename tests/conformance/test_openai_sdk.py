"""openai-python against the emulator: what the SDK parses, field by field."""

from __future__ import annotations

import pytest

from llm_executor.testing import Emulator, ProviderSim, extract_entities
from tests.conformance.conftest import KEY, assert_set

openai = pytest.importorskip("openai")
pydantic = pytest.importorskip("pydantic")

TEXT = "Ada Lovelace met Charles Babbage in London."
PROMPT = f"Extract every person.\nText:\n{TEXT}"


def client(emu: Emulator, **kw: object) -> openai.OpenAI:
    options: dict[str, object] = {"base_url": emu.url("openai"), "api_key": KEY, "max_retries": 0, "timeout": 10}
    options.update(kw)
    return openai.OpenAI(**options)  # type: ignore[arg-type]


def messages(system: str | None = None) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system else []
    return [*out, {"role": "user", "content": PROMPT}]


def test_plain_completion_with_system_prompt(emu: Emulator) -> None:
    r = client(emu).chat.completions.create(model="gpt-4o-mini", messages=messages("Be brief."))  # type: ignore[arg-type]
    assert_set(r, ["id", "object", "created", "model", "choices", "usage", "system_fingerprint", "service_tier"])
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini" and r.service_tier == "default"
    choice = r.choices[0]
    assert_set(choice, ["index", "message", "finish_reason"], nullable=["logprobs"])
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert_set(choice.message, ["role", "content", "annotations"], nullable=["refusal"])
    assert choice.message.content.startswith("Echo from gpt-4o-mini: Ada Lovelace")
    usage = r.usage
    assert usage is not None
    assert_set(usage, ["prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details",
                       "completion_tokens_details"])
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0
    assert_set(usage.prompt_tokens_details, ["cached_tokens", "audio_tokens"])
    assert_set(usage.completion_tokens_details, ["reasoning_tokens", "audio_tokens", "accepted_prediction_tokens",
                                                 "rejected_prediction_tokens"])
    recorded = emu.requests("openai")[-1]
    assert recorded.body["messages"][0] == {"role": "system", "content": "Be brief."}


def test_parse_with_a_pydantic_schema(emu: Emulator) -> None:
    class People(pydantic.BaseModel):
        names: list[str]

    r = client(emu).chat.completions.parse(model="gpt-4o-mini", messages=messages(),  # type: ignore[arg-type]
                                           response_format=People)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, People) and parsed.names == extract_entities(TEXT, "person")
    sent = emu.requests("openai")[-1].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True


def test_stream_deltas_and_final_usage_chunk(emu: Emulator) -> None:
    c = client(emu)
    whole = c.chat.completions.create(model="gpt-4o-mini", messages=messages())  # type: ignore[arg-type]
    chunks = list(c.chat.completions.create(model="gpt-4o-mini", messages=messages(), stream=True,  # type: ignore[arg-type]
                                            stream_options={"include_usage": True}))
    for chunk in chunks:
        assert_set(chunk, ["id", "object", "created", "model", "system_fingerprint", "service_tier"])
        assert chunk.object == "chat.completion.chunk"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens  # type: ignore[union-attr]


def test_stream_helper_accumulates(emu: Emulator) -> None:
    with client(emu).chat.completions.stream(model="gpt-4o-mini", messages=messages()) as stream:  # type: ignore[arg-type]
        final = stream.get_final_completion()
    assert final.choices[0].message.content.startswith("Echo from gpt-4o-mini")  # type: ignore[union-attr]


def test_models_list_and_retrieve(emu: Emulator) -> None:
    c = client(emu)
    listed = list(c.models.list())
    assert [m.id for m in listed] == ["gpt-4o-mini", "gpt-4o"]
    model = c.models.retrieve("gpt-4o")
    assert_set(model, ["id", "object", "created", "owned_by"])
    assert model.id == "gpt-4o" and model.object == "model"


def test_responses_api(emu: Emulator) -> None:
    r = client(emu).responses.create(model="gpt-4o-mini", input=PROMPT, instructions="Be brief.")
    assert_set(r, ["id", "object", "created_at", "model", "output", "parallel_tool_calls", "tool_choice", "tools",
                   "status", "usage", "service_tier", "text"], nullable=["error", "incomplete_details"])
    assert r.output_text.startswith("Echo from gpt-4o-mini: Ada Lovelace") and r.status == "completed"
    assert r.usage is not None
    assert_set(r.usage, ["input_tokens", "input_tokens_details", "output_tokens", "output_tokens_details",
                         "total_tokens"])
    with client(emu).responses.stream(model="gpt-4o-mini", input=PROMPT) as stream:
        assert stream.get_final_response().output_text == r.output_text


def test_reasoning_model_usage(emu: Emulator) -> None:
    emu.set_limits("openai", thinking_tokens=12)
    r = client(emu).chat.completions.create(model="o4-mini", messages=messages(),  # type: ignore[arg-type]
                                            max_completion_tokens=500)
    assert r.usage.completion_tokens_details.reasoning_tokens == 12  # type: ignore[union-attr]
    with pytest.raises(openai.BadRequestError) as info:
        client(emu).chat.completions.create(model="gpt-5", messages=messages(), max_tokens=50)  # type: ignore[arg-type]
    assert info.value.code == "unsupported_parameter" and info.value.param == "max_tokens"


# -- every error the emulator produces ------------------------------------------------------------


def test_401_wrong_key() -> None:
    with Emulator({"openai": ProviderSim(require_key=KEY)}) as emu:
        with pytest.raises(openai.AuthenticationError) as info:
            client(emu, api_key="sk-wrong-9999").models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert info.value.request_id and info.value.request_id.startswith("req_")


def test_404_model_and_404_route_differ() -> None:
    with Emulator({"openai": ProviderSim(models=("gpt-4o-mini",))}) as emu:
        c = client(emu)
        with pytest.raises(openai.NotFoundError) as model:
            c.chat.completions.create(model="gpt-9", messages=messages())  # type: ignore[arg-type]
        assert model.value.code == "model_not_found" and "gpt-9" in model.value.message
        with pytest.raises(openai.NotFoundError) as route:
            c.post("/chat/complete", cast_to=object, body={"model": "gpt-4o-mini"})
        assert route.value.code is None and "Invalid URL (POST /v1/chat/complete)" in route.value.message


def test_429_the_sdk_retries_after_the_wait_the_emulator_asked_for() -> None:
    with Emulator({"openai": ProviderSim(rps=1)}) as emu:
        c = client(emu, max_retries=1)
        c.models.list()
        c.chat.completions.create(model="gpt-4o-mini", messages=messages())  # type: ignore[arg-type]
        r = c.chat.completions.create(model="gpt-4o-mini", messages=messages())  # type: ignore[arg-type]
        assert r.choices[0].finish_reason == "stop"
        first, second = emu.requests("openai")[-2:]
    assert first.status == 429 and second.status == 200
    assert second.headers.get("x-stainless-retry-count") == "1"
    # retry-after-ms is the exact time until the 1 s window frees a slot; the SDK slept that long.
    assert second.monotonic - first.monotonic >= 0.5


def test_429_error_after_the_last_retry() -> None:
    with Emulator({"openai": ProviderSim(rpm=1)}) as emu:
        c = client(emu)
        c.chat.completions.create(model="gpt-4o-mini", messages=messages())  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as info:
            c.chat.completions.create(model="gpt-4o-mini", messages=messages())  # type: ignore[arg-type]
    err = info.value
    assert err.code == "rate_limit_exceeded" and err.type == "requests"
    assert int(err.response.headers["retry-after"]) > 50
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.parametrize(("fault", "status"), [("server_error", 500), ("unavailable", 503)])
def test_server_errors(fault: str, status: int) -> None:
    with Emulator({"openai": ProviderSim(fault_rate=1.0, faults={fault: 1})}) as emu:
        with pytest.raises(openai.InternalServerError) as info:
            client(emu).chat.completions.create(model="gpt-4o-mini", messages=messages())  # type: ignore[arg-type]
    assert info.value.status_code == status and info.value.type == "server_error"
