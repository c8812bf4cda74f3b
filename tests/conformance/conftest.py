"""The official SDKs (openai, google-genai, ollama) as clients of the emulator.

Each SDK talks only to the emulator on 127.0.0.1: base URLs are set explicitly and the SDKs'
environment variables are removed for every test, so nothing leaks to a real endpoint. The SDKs
are dev dependencies; the suite is skipped where one is not installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pytest

from llm_executor.testing import Emulator

KEY = "sk-conformance-0000"
SDK_ENV_PREFIXES = ("OPENAI_", "GOOGLE_", "GEMINI_", "OLLAMA_", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture(autouse=True)
def no_sdk_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No API key, base URL or proxy from the environment reaches an SDK."""
    import os

    for name in list(os.environ):
        if name.upper().startswith(SDK_ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator() as e:
        yield e


def assert_set(obj: Any, fields: Iterable[str], nullable: Iterable[str] = ()) -> None:
    """Every field in ``fields`` was in the JSON the SDK parsed and is not None; ``nullable`` ones
    were in the JSON (as null, like the real API sends them).

    The SDKs build their response objects without failing on a missing field (it just reads as
    None), so a field the emulator stops sending would go unnoticed without this.
    """
    present = obj.model_fields_set
    missing = [f for f in fields if f not in present or getattr(obj, f) is None]
    missing += [f for f in nullable if f not in present]
    assert not missing, f"{type(obj).__name__} lacks {missing}"
