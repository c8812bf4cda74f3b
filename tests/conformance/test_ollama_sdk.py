"""ollama-python against the emulator: what the SDK parses, field by field."""

from __future__ import annotations

import pytest

from llm_executor.testing import Emulator, ProviderSim, extract_entities
from tests.conformance.conftest import KEY, assert_set

ollama = pytest.importorskip("ollama")
pydantic = pytest.importorskip("pydantic")

TEXT = "Ada Lovelace met Charles Babbage in London."
PROMPT = f"Extract every person.\nText:\n{TEXT}"
MODEL = "llama3.2"
TIMINGS = ["total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
           "eval_duration"]


def client(emu: Emulator, **kw: object) -> ollama.Client:
    return ollama.Client(host=emu.base_url, timeout=10, **kw)


def messages(system: str | None = None) -> list[dict[str, str]]:
    out = [{"role": "system", "content": system}] if system else []
    return [*out, {"role": "user", "content": PROMPT}]


def test_chat_with_system_prompt(emu: Emulator) -> None:
    r = client(emu).chat(model=MODEL, messages=messages("Be brief."))
    assert_set(r, ["model", "created_at", "done", "done_reason", "message", *TIMINGS])
    assert r.done and r.done_reason == "stop" and r.message.role == "assistant"
    assert r.message.content.startswith(f"Echo from {MODEL}: Ada Lovelace")
    assert emu.requests("ollama")[-1].body["messages"][0]["role"] == "system"


def test_generate(emu: Emulator) -> None:
    r = client(emu).generate(model=MODEL, prompt=PROMPT, system="Be brief.")
    assert_set(r, ["model", "created_at", "done", "done_reason", "response", "context", *TIMINGS])


def test_format_schema(emu: Emulator) -> None:
    class People(pydantic.BaseModel):
        names: list[str]

    r = client(emu).chat(model=MODEL, messages=messages(), format=People.model_json_schema())
    assert People.model_validate_json(r.message.content).names == extract_entities(TEXT, "person")


def test_stream(emu: Emulator) -> None:
    c = client(emu)
    whole = c.chat(model=MODEL, messages=messages()).message.content
    parts = list(c.chat(model=MODEL, messages=messages(), stream=True))
    assert len(parts) > 2 and "".join(p.message.content or "" for p in parts) == whole
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert_set(parts[-1], ["done_reason", *TIMINGS])


def test_list_show_ps_embed(emu: Emulator) -> None:
    c = client(emu)
    listed = c.list().models
    assert [m.model for m in listed] == ["llama3.2:latest", "qwen2.5:latest"]
    for m in listed:
        assert_set(m, ["model", "modified_at", "digest", "size", "details"])
    show = c.show(MODEL)
    assert_set(show, ["modified_at", "template", "modelfile", "license", "details", "modelinfo", "parameters",
                      "capabilities"])
    assert show.modelinfo["llama.context_length"] == 131072
    c.chat(model=MODEL, messages=messages())
    loaded = c.ps().models
    assert [m.model for m in loaded] == ["llama3.2:latest"]
    assert_set(loaded[0], ["model", "name", "digest", "expires_at", "size", "size_vram", "details",
                           "context_length"])
    emb = c.embed(model=MODEL, input=["a", "b"])
    assert_set(emb, ["model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"])
    assert len(emb.embeddings) == 2 and len(emb.embeddings[0]) == 768


# -- every error the emulator produces ------------------------------------------------------------


def test_401_without_the_key() -> None:
    with Emulator({"ollama": ProviderSim(require_key=KEY)}) as emu:
        with pytest.raises(ollama.ResponseError) as info:
            client(emu).chat(model=MODEL, messages=messages())
        assert info.value.status_code == 401 and info.value.error == "unauthorized"
        ok = client(emu, headers={"Authorization": f"Bearer {KEY}"}).chat(model=MODEL, messages=messages())
        assert ok.done


def test_404_model_and_404_route_differ() -> None:
    with Emulator({"ollama": ProviderSim(models=(MODEL,))}) as emu:
        with pytest.raises(ollama.ResponseError) as model:
            client(emu).chat(model="llama9", messages=messages())
        assert model.value.status_code == 404 and model.value.error == 'model "llama9" not found, try pulling it first'
        with pytest.raises(ollama.ResponseError) as route:
            ollama.Client(host=emu.base_url + "/nope", timeout=10).chat(model=MODEL, messages=messages())
    assert route.value.status_code == 404 and route.value.error == "404 page not found"


@pytest.mark.parametrize(("sim", "status"), [
    (ProviderSim(rpm=1), 503),                                                  # a full queue: "server busy"
    (ProviderSim(fault_rate=1.0, faults={"server_error": 1}), 500),
    (ProviderSim(fault_rate=1.0, faults={"unavailable": 1}), 503),
])
def test_busy_and_server_errors(sim: ProviderSim, status: int) -> None:
    # ollama-python never retries: the error reaches the caller at once.
    with Emulator({"ollama": sim}) as emu:
        with pytest.raises(ollama.ResponseError) as info:
            for _ in range(2):
                client(emu).chat(model=MODEL, messages=messages())
    assert info.value.status_code == status and isinstance(info.value.error, str)
