"""A local HTTP emulator of the openai, gemini and ollama APIs, with limits, faults and a recorder.

``Emulator`` is a real HTTP server on 127.0.0.1 (``ThreadingHTTPServer``, one daemon thread per
connection) that speaks the wire formats of PROVIDERS.md: request bodies, success bodies with
usage and finish reasons, and the services' exact error bodies. Per provider (``ProviderSim``) it
enforces its own concurrency and requests-per-second limits and answers like the real service
when they are exceeded (OpenAI 429 ``rate_limit_exceeded`` with ``retry-after`` and
``retry-after-ms``; Gemini 429 ``RESOURCE_EXHAUSTED`` with a ``RetryInfo.retryDelay``; Ollama 503
"server busy"), injects faults drawn from a seeded RNG, and records what it saw so a test can
assert that a client kept its limits end to end.

Layout: one module per wire format over one shared core, so a change to one provider's shape
touches one file.

* ``server``: the HTTP server, ``Emulator`` (the request pipeline) and ``serve``;
* ``limits``: one provider's live state (limit windows, concurrency, fault RNG, counters);
* ``recorder``: ``RecordedRequest``, ``EmulatorStats`` and the redaction of secrets;
* ``sim``: ``ProviderSim``, the settings of one provider;
* ``wire``: the values shared with the formats (``Route``, ``Parsed``, ``Completion``, ``Reply``)
  and the ``WireFormat`` base class;
* ``openai``, ``gemini``, ``ollama``: routes, bodies, errors and streaming of each API.

Routes (``emu.url(provider)`` is the ``ProviderConfig.base_url`` to use)::

    openai  base http://127.0.0.1:PORT/v1   POST /v1/chat/completions, GET /v1/models
    gemini  base http://127.0.0.1:PORT      POST /v1beta/models/{model}:generateContent,
                                            GET /v1beta/models, GET /v1beta/models/{model}
    ollama  base http://127.0.0.1:PORT      POST /api/chat, POST /api/generate,
                                            GET /api/tags, GET /api/version

Order of checks on a generation request: key (``require_key``) → body → model (``models``) →
body fields → requests-per-second → concurrency → injected fault → latency → reply. Other
endpoints are recorded but not limited, faulted nor counted in ``stats``.

Faults (``ProviderSim.faults`` maps a kind to a weight; ``fault_rate`` is the chance that a
request gets one): ``rate_limit`` (429 like the limits), ``server_error`` (500),
``unavailable`` (503), ``slow`` (``slow_s`` extra delay, then a normal reply), ``hang`` (no
reply; the connection is closed after ``hang_s`` or as soon as the client gives up, so a server
thread never hangs forever), ``malformed`` (HTTP 200 whose body is cut-off JSON), ``truncated``
(a reply cut to half its tokens with finish reason length: "length", "MAX_TOKENS",
done_reason "length") and ``blocked`` (Gemini: 200 with ``promptFeedback.blockReason``; OpenAI: a
``refusal``; Ollama: empty content). Each provider has its own ``random.Random`` seeded from
``(seed, provider)`` and draws once per accepted generation request in arrival order, so the same
sequence of requests meets the same faults.

Replies come from ``llm_executor.testing.responder`` (deterministic; see its rules).
Imports: the stdlib and ``responder`` only, so the server runs anywhere Python does.
"""

from __future__ import annotations

from .recorder import EmulatorStats, RecordedRequest
from .server import Emulator, serve
from .sim import FAULT_KINDS, PROVIDERS, ProviderSim

__all__ = [
    "FAULT_KINDS",
    "PROVIDERS",
    "Emulator",
    "EmulatorStats",
    "ProviderSim",
    "RecordedRequest",
    "serve",
]
