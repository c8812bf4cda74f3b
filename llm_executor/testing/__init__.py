"""Test helpers for code that uses llm_executor: a provider emulator and a scripted provider.

* ``Emulator`` / ``ProviderSim``: a local HTTP server speaking the openai, gemini and ollama wire
  formats, with its own limits, seeded faults, a deterministic responder and a recorder.
* ``ScriptedProvider``: a ``Provider`` that plays back a list of replies.
* ``max_in_window``: the most timestamps in any sliding window, to assert a rate limit held;
  ``GcPauses``: the collector's pauses, which can explain a window over its limit.
* ``serve``: run an emulator until Ctrl-C (the ``llm-executor emulate`` command).
* The pytest fixture ``llm_emulator`` (``llm_executor.testing.pytest_plugin``) is registered by
  the package's ``pytest11`` entry point.

Names are imported lazily so that loading the pytest plugin costs nothing until a test uses it.
Imports: the public API of ``llm_executor`` and ``llm_executor.errors`` only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .audit import GcPauses, max_in_window
    from .emulator import FAULT_KINDS, PROVIDERS, Emulator, EmulatorStats, ProviderSim, RecordedRequest, serve
    from .responder import extract_entities, names_match, reply_text, value_for_schema
    from .scripted import ScriptedProvider, ScriptExhaustedError

__all__ = [
    "FAULT_KINDS",
    "PROVIDERS",
    "Emulator",
    "EmulatorStats",
    "GcPauses",
    "ProviderSim",
    "RecordedRequest",
    "ScriptExhaustedError",
    "ScriptedProvider",
    "extract_entities",
    "max_in_window",
    "names_match",
    "reply_text",
    "serve",
    "value_for_schema",
]

_HOMES = {
    "FAULT_KINDS": "emulator",
    "PROVIDERS": "emulator",
    "Emulator": "emulator",
    "EmulatorStats": "emulator",
    "ProviderSim": "emulator",
    "RecordedRequest": "emulator",
    "serve": "emulator",
    "extract_entities": "responder",
    "GcPauses": "audit",
    "max_in_window": "audit",
    "names_match": "responder",
    "reply_text": "responder",
    "value_for_schema": "responder",
    "ScriptedProvider": "scripted",
    "ScriptExhaustedError": "scripted",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
