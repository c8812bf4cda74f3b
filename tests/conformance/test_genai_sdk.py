"""google-genai against the emulator (API v1, the SDK's default, and v1beta): what the SDK parses."""

from __future__ import annotations

import pytest

from llm_executor.testing import Emulator, ProviderSim, extract_entities
from tests.conformance.conftest import KEY, assert_set

genai = pytest.importorskip("google.genai")
types = pytest.importorskip("google.genai.types")
errors = pytest.importorskip("google.genai.errors")
pydantic = pytest.importorskip("pydantic")

TEXT = "Ada Lovelace met Charles Babbage in London."
PROMPT = f"Extract every person.\nText:\n{TEXT}"
MODEL = "gemini-2.5-flash"


@pytest.fixture(autouse=True)
def _clients() -> object:
    # genai.Client closes its HTTP client when collected, which `client(emu).models.x()` would do
    # mid-call: the test keeps each client alive until it ends.
    _ALIVE.clear()
    yield
    _ALIVE.clear()


_ALIVE: list[object] = []


def client(emu: Emulator, api_version: str | None = None, **options: object) -> genai.Client:
    http = types.HttpOptions(base_url=emu.base_url, api_version=api_version, timeout=10_000, **options)
    made = genai.Client(api_key=KEY, http_options=http)
    _ALIVE.append(made)
    return made


@pytest.mark.parametrize("version", [None, "v1beta"])
def test_generate_with_system_instruction(emu: Emulator, version: str | None) -> None:
    config = types.GenerateContentConfig(system_instruction="Be brief.")
    r = client(emu, version).models.generate_content(model=MODEL, contents=PROMPT, config=config)
    assert_set(r, ["candidates", "usage_metadata", "model_version", "response_id"])
    assert r.text.startswith(f"Echo from {MODEL}: Ada Lovelace") and r.model_version == MODEL
    candidate = r.candidates[0]
    assert_set(candidate, ["content", "finish_reason", "index"])
    assert candidate.finish_reason == types.FinishReason.STOP and candidate.content.role == "model"
    usage = r.usage_metadata
    assert_set(usage, ["prompt_token_count", "candidates_token_count", "total_token_count",
                       "prompt_tokens_details"])
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count
    assert usage.prompt_tokens_details[0].modality == types.MediaModality.TEXT
    recorded = emu.requests("gemini")[-1]
    assert recorded.path == f"/{version or 'v1'}/models/{MODEL}:generateContent"
    assert recorded.body["systemInstruction"]["parts"][0]["text"] == "Be brief."


def test_response_schema_is_parsed(emu: Emulator) -> None:
    class People(pydantic.BaseModel):
        names: list[str]

    config = types.GenerateContentConfig(response_mime_type="application/json", response_schema=People)
    r = client(emu).models.generate_content(model=MODEL, contents=PROMPT, config=config)
    assert isinstance(r.parsed, People) and r.parsed.names == extract_entities(TEXT, "person")


def test_thoughts_are_counted() -> None:
    with Emulator({"gemini": ProviderSim(thinking_tokens=21)}) as emu:
        r = client(emu).models.generate_content(model=MODEL, contents=PROMPT)
    usage = r.usage_metadata
    assert usage.thoughts_token_count == 21
    assert usage.total_token_count == usage.prompt_token_count + usage.candidates_token_count + 21


def test_stream(emu: Emulator) -> None:
    c = client(emu)
    whole = c.models.generate_content(model=MODEL, contents=PROMPT)
    chunks = list(c.models.generate_content_stream(model=MODEL, contents=PROMPT))
    assert len(chunks) > 1 and "".join(ch.text or "" for ch in chunks) == whole.text
    for chunk in chunks:
        assert_set(chunk, ["candidates", "usage_metadata", "model_version", "response_id"])
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.STOP
    assert emu.requests("gemini")[-1].path.endswith(":streamGenerateContent?alt=sse")


def test_count_tokens_list_and_get(emu: Emulator) -> None:
    c = client(emu)
    assert c.models.count_tokens(model=MODEL, contents="one two three").total_tokens == 3
    names = [m.name for m in c.models.list()]
    assert names == ["models/gemini-2.5-flash", "models/gemini-2.5-pro"]
    model = c.models.get(model=MODEL)
    assert_set(model, ["name", "display_name", "input_token_limit", "output_token_limit", "supported_actions",
                       "temperature", "max_temperature", "top_p", "top_k", "thinking"])
    assert "generateContent" in model.supported_actions


def test_blocked_prompt(emu: Emulator) -> None:
    emu.set_limits("gemini", fault_rate=1.0, faults={"blocked": 1})
    r = client(emu).models.generate_content(model=MODEL, contents=PROMPT)
    assert r.candidates is None and r.text is None
    assert r.prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT
    assert_set(r, ["prompt_feedback", "usage_metadata", "model_version", "response_id"])


# -- every error the emulator produces ------------------------------------------------------------


def test_invalid_key_is_400_api_key_invalid() -> None:
    with Emulator({"gemini": ProviderSim(require_key="other")}) as emu:
        with pytest.raises(errors.ClientError) as info:
            client(emu).models.generate_content(model=MODEL, contents=PROMPT)
    assert info.value.code == 400 and info.value.status == "INVALID_ARGUMENT"
    assert info.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"


def test_404_model_and_404_route_differ() -> None:
    with Emulator({"gemini": ProviderSim(models=(MODEL,))}) as emu:
        with pytest.raises(errors.ClientError) as model:
            client(emu).models.generate_content(model="gemini-9", contents=PROMPT)
        assert model.value.code == 404 and "models/gemini-9 is not found for API version v1" in model.value.message
        with pytest.raises(errors.ClientError) as route:
            client(emu, "v2").models.generate_content(model=MODEL, contents=PROMPT)
    assert route.value.code == 404 and "models/" not in (route.value.message or "")


def test_429_quota_failure_and_the_sdks_own_retry() -> None:
    with Emulator({"gemini": ProviderSim(rpm=1)}) as emu:
        client(emu).models.generate_content(model=MODEL, contents=PROMPT)
        with pytest.raises(errors.ClientError) as info:
            client(emu).models.generate_content(model=MODEL, contents=PROMPT)
        err = info.value
        assert err.code == 429 and err.status == "RESOURCE_EXHAUSTED"
        by_type = {d["@type"].rsplit(".", 1)[1]: d for d in err.details["error"]["details"]}
        assert by_type["QuotaFailure"]["violations"][0]["quotaId"].startswith("GenerateRequestsPerMinute")
        assert float(by_type["RetryInfo"]["retryDelay"].rstrip("s")) > 50
        # python-genai does not read RetryInfo: with retry options it waits its own exponential
        # backoff (set tiny here) and gives up after `attempts`.
        retrying = types.HttpRetryOptions(attempts=3, initial_delay=0.01, max_delay=0.02, jitter=0)
        with pytest.raises(errors.ClientError):
            client(emu, retry_options=retrying).models.generate_content(model=MODEL, contents=PROMPT)
        assert [r.status for r in emu.requests("gemini")[-3:]] == [429, 429, 429]
        emu.set_limits("gemini", rpm=None)
        ok = client(emu, retry_options=retrying).models.generate_content(model=MODEL, contents=PROMPT)
        assert ok.text


@pytest.mark.parametrize(("fault", "status", "rpc"), [("server_error", 500, "INTERNAL"),
                                                        ("unavailable", 503, "UNAVAILABLE")])
def test_server_errors(fault: str, status: int, rpc: str) -> None:
    with Emulator({"gemini": ProviderSim(fault_rate=1.0, faults={fault: 1})}) as emu:
        with pytest.raises(errors.ServerError) as info:
            client(emu).models.generate_content(model=MODEL, contents=PROMPT)
    assert info.value.code == status and info.value.status == rpc
