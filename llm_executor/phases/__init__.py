"""Pipeline phase helpers: fan a phase's tasks out through an Executor, then merge.

One module per idea, so a user adapting one phase reads one file:

    fanout      ``fan_out``: the one way a phase talks to providers (lazy, order-keeping,
                per-task errors, Ctrl-C keeps finished work), on ``llm_executor.window``
    chunking    Phase1 ``chunk_text`` / ``chunk_documents``: paragraphs and sentences, with overlap
    extraction  Phase2 ``extract_entities``: one JSON-schema request per (chunk, entity type)
    matching    Phase3 ``match_tasks`` / ``match_entities``: one request per distinct entity
    dedup       merge ``dedup_merge``: only on finished fan-outs; normalised keys, merged
                attributes, provenance of every chunk (``normalize_name`` is its key)

Every public name is importable from ``llm_executor.phases`` as before the split.
Imports: the public API of ``llm_executor``, ``errors`` and ``window``; never the executor's internals.
"""

from __future__ import annotations

from .chunking import Chunk, chunk_documents, chunk_text
from .dedup import Entity, dedup_merge, normalize_name
from .extraction import ENTITY_SCHEMA, ExtractTask, Mention, extract_entities
from .fanout import FanOutInterrupted, FanOutResult, TaskError, fan_out
from .matching import MATCH_SCHEMA, Match, MatchTask, match_entities, match_tasks

__all__ = [
    "ENTITY_SCHEMA",
    "MATCH_SCHEMA",
    "Chunk",
    "Entity",
    "ExtractTask",
    "FanOutInterrupted",
    "FanOutResult",
    "Match",
    "MatchTask",
    "Mention",
    "TaskError",
    "chunk_documents",
    "chunk_text",
    "dedup_merge",
    "extract_entities",
    "fan_out",
    "match_entities",
    "match_tasks",
    "normalize_name",
]
