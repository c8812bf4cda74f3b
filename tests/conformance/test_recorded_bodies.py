"""For the same intent, our adapters' request bodies carry the fields the official SDKs send.

Both bodies are recorded by the emulator: the SDK's and the adapter's. Every key path of the
SDK's body must be in ours with the same value (the adapter may send more, e.g. Ollama's
``stream: false``).
"""

from __future__ import annotations

from typing import Any

import pytest

from llm_executor.config import ProviderConfig
from llm_executor.providers.gemini import GeminiProvider
from llm_executor.providers.ollama import OllamaProvider
from llm_executor.providers.openai import OpenAIProvider
from llm_executor.testing import Emulator
from llm_executor.types import LLMRequest
from tests.conformance.conftest import KEY

SYSTEM, PROMPT = "Answer in JSON.", "Extract every person.\nText:\nAda Lovelace met Charles Babbage."
SCHEMA: dict[str, Any] = {"type": "object", "properties": {"names": {"type": "array", "items": {"type": "string"}}},
                          "required": ["names"], "additionalProperties": False}


def leaves(value: Any, path: str = "") -> dict[str, Any]:
    """Every leaf of a JSON value by its key path (list items by index)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(leaves(item, f"{path}.{key}"))
        return out
    if isinstance(value, list) and value:
        out = {}
        for index, item in enumerate(value):
            out.update(leaves(item, f"{path}[{index}]"))
        return out
    return {path: value}


def assert_covers(ours: Any, sdk: Any) -> None:
    # An empty list or a null (ollama-python sends "tools": []) asks for nothing.
    theirs = {p: v for p, v in leaves(sdk).items() if v not in ([], None)}
    mine = leaves(ours)
    missing = {p: v for p, v in theirs.items() if p not in mine}
    different = {p: (v, mine[p]) for p, v in theirs.items() if p in mine and mine[p] != v}
    assert not missing and not different, f"missing {missing}; different (sdk, ours) {different}"


def request(provider: str, model: str, **kw: Any) -> LLMRequest:
    return LLMRequest(provider=provider, model=model, prompt=PROMPT, system=SYSTEM, max_output_tokens=64,
                      json_schema=SCHEMA, **kw)


@pytest.mark.parametrize(("model", "tokens_field", "temperature"), [
    ("gpt-4o-mini", "max_tokens", 0.2),
    ("gpt-5-mini", "max_completion_tokens", None),   # a reasoning model: the SDK user sends no temperature
])
def test_openai_adapter_body_has_the_sdks_fields(emu: Emulator, model: str, tokens_field: str,
                                                 temperature: float | None) -> None:
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=emu.url("openai"), api_key=KEY, max_retries=0)
    extra: dict[str, Any] = {tokens_field: 64}
    if temperature is not None:
        extra["temperature"] = temperature
    sdk.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        response_format={"type": "json_schema", "json_schema": {"name": "result", "schema": SCHEMA, "strict": True}},
        **extra,
    )
    adapter = OpenAIProvider("openai", ProviderConfig(base_url=emu.url("openai"), api_key=KEY))
    adapter.complete(request("openai", model, temperature=0.2))
    sdk_body, our_body = (r.body for r in emu.requests("openai"))
    assert_covers(our_body, sdk_body)


def test_gemini_adapter_body_has_the_sdks_fields(emu: Emulator) -> None:
    genai = pytest.importorskip("google.genai")
    types = pytest.importorskip("google.genai.types")
    sdk = genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=emu.base_url, api_version="v1beta"))
    sdk.models.generate_content(
        model="gemini-2.5-flash",
        contents=PROMPT,
        config=types.GenerateContentConfig(system_instruction=SYSTEM, max_output_tokens=64, temperature=0.2,
                                           response_mime_type="application/json", response_json_schema=SCHEMA),
    )
    adapter = GeminiProvider("gemini", ProviderConfig(base_url=emu.base_url, api_key=KEY))
    adapter.complete(request("gemini", "gemini-2.5-flash", temperature=0.2))
    sdk_call, our_call = emu.requests("gemini")
    assert sdk_call.path == our_call.path
    assert_covers(our_call.body, sdk_call.body)


def test_ollama_adapter_body_has_the_sdks_fields(emu: Emulator) -> None:
    ollama = pytest.importorskip("ollama")
    ollama.Client(host=emu.base_url).chat(
        model="llama3.2",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": PROMPT}],
        format=SCHEMA,
        options={"num_predict": 64, "temperature": 0.2},
        stream=False,
    )
    adapter = OllamaProvider("ollama", ProviderConfig(base_url=emu.base_url))
    adapter.complete(request("ollama", "llama3.2", temperature=0.2))
    sdk_body, our_body = (r.body for r in emu.requests("ollama"))
    assert_covers(our_body, sdk_body)
