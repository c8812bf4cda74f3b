"""The worked example pipeline, run by ``llm-executor demo`` and by users as a template.

    Phase1 chunk every document on paragraph/sentence boundaries
    Phase2 extract entities per (chunk, entity type) with a JSON schema   ─┐ fan_out through one
    Phase3 ask for each distinct entity's canonical name and category     ─┘ Executor, spread over providers
    merge  dedup_merge, only once both phases have finished

``load_corpus()`` reads the small bundled corpus (fictional companies, people and places
written for this project) or any directory of ``*.txt`` files.
Imports: ``phases`` and the public API of ``llm_executor`` only.
"""

from __future__ import annotations

import importlib.resources
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import Executor
from .phases import (
    Chunk,
    Entity,
    ExtractTask,
    FanOutResult,
    Match,
    MatchTask,
    Mention,
    chunk_documents,
    dedup_merge,
    extract_entities,
    match_entities,
    match_tasks,
)

__all__ = ["DEFAULT_ENTITY_TYPES", "PipelineResult", "load_corpus", "run_pipeline"]

log = logging.getLogger(__name__)

DEFAULT_ENTITY_TYPES: tuple[str, ...] = ("person", "organization", "place")


def load_corpus(path: str | Path | None = None) -> dict[str, str]:
    """Read every ``*.txt`` file of a directory, by file stem, in name order.

    Args:
        path: the directory; None for the corpus bundled with the package.

    Returns:
        {stem: text}.

    Raises:
        FileNotFoundError: the directory does not exist or holds no ``*.txt`` file.
    """
    if path is None:
        root = importlib.resources.files("llm_executor").joinpath("data", "corpus")
        files = sorted((f for f in root.iterdir() if f.name.endswith(".txt")), key=lambda f: f.name)
        return {f.name[: -len(".txt")]: f.read_text(encoding="utf-8") for f in files}
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"corpus directory {str(directory)!r} does not exist")
    docs = {f.stem: f.read_text(encoding="utf-8") for f in sorted(directory.glob("*.txt"))}
    if not docs:
        raise FileNotFoundError(f"no *.txt files in {str(directory)!r}")
    return docs


@dataclass
class PipelineResult:
    """What the example pipeline produced.

    Attributes:
        documents: documents read.
        chunks: Phase1's chunks.
        extraction: Phase2's fan-out (results: mentions per (chunk, type) task).
        matching: Phase3's fan-out (results: a Match per distinct entity).
        entities: the deduplicated entities, sorted by key.
        elapsed_s: wall time per phase ("chunk", "extract", "match", "dedup") and "total".
    """

    documents: int
    chunks: list[Chunk]
    extraction: FanOutResult[ExtractTask, list[Mention]]
    matching: FanOutResult[MatchTask, Match]
    entities: list[Entity]
    elapsed_s: dict[str, float] = field(default_factory=dict)

    @property
    def tasks(self) -> int:
        """Phase2 + Phase3 tasks."""
        return self.extraction.submitted + self.matching.submitted

    @property
    def failed(self) -> int:
        """Phase2 + Phase3 tasks that ended without a result."""
        return self.extraction.failed + self.matching.failed

    @property
    def complete(self) -> bool:
        """Every task of both phases reached an outcome (a result or an error)."""
        return self.extraction.complete and self.matching.complete

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for ``--json``)."""
        def phase(r: FanOutResult[Any, Any]) -> dict[str, Any]:
            return {"tasks": r.submitted, "succeeded": r.succeeded, "failed": r.failed, "complete": r.complete,
                    "errors": r.error_counts(), "elapsed_s": round(r.elapsed_s, 3)}
        return {
            "documents": self.documents,
            "chunks": len(self.chunks),
            "extract": phase(self.extraction),
            "match": phase(self.matching),
            "entities": [e.as_dict() for e in self.entities],
            "elapsed_s": {k: round(v, 3) for k, v in self.elapsed_s.items()},
        }

    def format_table(self, limit: int | None = 30) -> str:
        """The entities as a text table (most mentioned first), for a terminal."""
        rows = sorted(self.entities, key=lambda e: (-e.mentions, e.key))
        shown = rows if limit is None else rows[:limit]
        header = ("entity", "type", "mentions", "docs", "chunks")
        body = [(e.name, e.type, str(e.mentions), str(len(e.doc_ids)), str(len(e.chunk_ids))) for e in shown]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths,
                                                                                                      strict=True)))
                 for r in [header, *body]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if len(rows) > len(shown):
            lines.append(f"... and {len(rows) - len(shown)} more")
        return "\n".join(line.rstrip() for line in lines)


def run_pipeline(
    executor: Executor,
    documents: Mapping[str, str],
    *,
    providers: Sequence[str] | None = None,
    progress: bool = False,
    entity_types: Sequence[str] = DEFAULT_ENTITY_TYPES,
    model: str = "",
    max_chars: int = 600,
    overlap: int = 100,
    timeout: float | None = None,
) -> PipelineResult:
    """Run Phase1 → Phase2 → Phase3 → dedup over ``documents`` through ``executor``.

    Args:
        executor: every request goes through it.
        documents: {doc_id: text}, e.g. from ``load_corpus()``.
        providers: providers to spread Phase2/3 tasks over, round-robin; None: every provider of
            the executor; ``["auto"]``: let the executor pick per request.
        progress: a tqdm bar per phase (hidden when stderr is not a terminal).
        entity_types: Phase2 asks for each type separately.
        model: model name; "" for each provider's default.
        max_chars / overlap: Phase1 chunking.
        timeout: seconds for each of Phase2 and Phase3.

    Returns:
        A ``PipelineResult``; failed tasks are in ``extraction.errors`` / ``matching.errors`` and
        the entities come from every task that succeeded.

    Raises:
        FanOutInterrupted: on Ctrl-C (its ``.result`` holds the interrupted phase's finished work).
        ValueError: bad chunking arguments or an empty provider list.
    """
    names: Sequence[str] = list(providers) if providers is not None else list(executor.providers)
    if not names:
        raise ValueError("providers is empty: name at least one provider (or 'auto')")
    elapsed: dict[str, float] = {}
    t0 = t = time.monotonic()

    chunks = chunk_documents(documents, max_chars, overlap)
    elapsed["chunk"], t = time.monotonic() - t, time.monotonic()

    extraction = extract_entities(executor, chunks, entity_types, provider=names, model=model,
                                  progress="phase 2 extract" if progress else None, timeout=timeout)
    elapsed["extract"], t = time.monotonic() - t, time.monotonic()

    mentions = [m for _, found in extraction.successes() for m in found]
    matching = match_entities(executor, match_tasks(mentions, chunks), provider=names, model=model,
                              progress="phase 3 match" if progress else None, timeout=timeout)
    elapsed["match"], t = time.monotonic() - t, time.monotonic()

    # Both fan-outs have returned, so every task has its outcome: the merge sees all the work.
    entities = dedup_merge(extraction, matching)
    elapsed["dedup"] = time.monotonic() - t
    elapsed["total"] = time.monotonic() - t0
    if extraction.errors or matching.errors:
        log.warning("pipeline: %d of %d tasks failed (%s)", extraction.failed + matching.failed,
                    extraction.submitted + matching.submitted,
                    {**extraction.error_counts(), **matching.error_counts()})
    return PipelineResult(len(documents), chunks, extraction, matching, entities, elapsed)
