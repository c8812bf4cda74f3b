"""Pipeline phase helpers: fan a phase's tasks out through an Executor, then merge.

``fan_out`` is the one way a phase talks to providers: it feeds the executor lazily through a
bounded window (so a 100k-task phase never trips fail-fast backpressure), keeps input order,
and returns every task's outcome: a result or a ``TaskError``. A failed task never costs the
completed ones. On it sit the example phases of the pipeline:

    Phase1 ``chunk_text`` / ``chunk_documents``   paragraphs and sentences, with overlap
    Phase2 ``extract_entities``                   one JSON-schema request per (chunk, entity type)
    Phase3 ``match_entities``                     one request per distinct entity: canonical name
    merge  ``dedup_merge``                        only on finished fan-outs: normalised keys,
                                                  merged attributes, provenance of every chunk

Imports: the public API of ``llm_executor`` (``__init__``'s names) and ``errors`` only;
never the executor's internals.
"""

from __future__ import annotations

import itertools
import logging
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, overload

from . import Executor, LLMRequest, LLMResponse
from .errors import QueueFullError

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

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_DEFAULT_WINDOW = 256  # outstanding requests when the executor's queue is unbounded (queue_size=0)


# -- fan_out ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskError:
    """Why one task of a fan-out has no result.

    Attributes:
        index: the task's position in the input.
        task: the task itself.
        error_type: the exception class name ("RateLimitedError", "CancelledError", "TimeoutError"...).
        message: the exception text.
        exception: the exception object, when there was one (not part of equality or repr).
    """

    index: int
    task: Any
    error_type: str
    message: str
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_exception(cls, index: int, task: Any, exc: BaseException) -> TaskError:
        """A TaskError naming ``exc``'s class and message."""
        return cls(index, task, type(exc).__name__, str(exc) or type(exc).__name__, exc)


@dataclass
class FanOutResult(Generic[T, R]):
    """Every task's outcome, in input order.

    Attributes:
        tasks: the tasks, in input order (empty when ``keep_results=False``).
        results: ``results[i]`` is task i's result, or None when it failed (see ``errors``).
        errors: one TaskError per task without a result, by index.
        complete: True when every task reached an outcome (a result or an error); False after
            a KeyboardInterrupt (tasks never submitted have no entry in ``errors`` then).
        elapsed_s: wall time of the fan-out.
        submitted: tasks read from the input.
        succeeded: tasks with a result.
    """

    tasks: list[T] = field(default_factory=list)
    results: list[R | None] = field(default_factory=list)
    errors: list[TaskError] = field(default_factory=list)
    complete: bool = True
    elapsed_s: float = 0.0
    submitted: int = 0
    succeeded: int = 0

    @property
    def failed(self) -> int:
        """Tasks without a result."""
        return len(self.errors)

    @property
    def ok(self) -> bool:
        """Every task ran and succeeded."""
        return self.complete and not self.errors

    def successes(self) -> Iterator[tuple[T, R]]:
        """(task, result) pairs of the tasks that succeeded, in input order."""
        for task, result in zip(self.tasks, self.results, strict=True):
            if result is not None:
                yield task, result

    def error_counts(self) -> dict[str, int]:
        """Failed tasks per error class."""
        return dict(Counter(e.error_type for e in self.errors))


class FanOutInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``fan_out``: queued requests were cancelled; ``result`` keeps the finished work.

    It is a KeyboardInterrupt, so code that does not look for it still stops as on Ctrl-C.
    """

    def __init__(self, result: FanOutResult[Any, Any]) -> None:
        super().__init__(f"interrupted after {result.succeeded} of {result.submitted} tasks succeeded")
        self.result = result


@overload
def fan_out(
    executor: Executor,
    tasks: Iterable[T],
    make_request: Callable[[T], LLMRequest],
    *,
    parse: None = None,
    progress: str | bool | None = None,
    on_result: Callable[[int, T, LLMResponse | None, TaskError | None], None] | None = None,
    timeout: float | None = None,
    window: int | None = None,
    total: int | None = None,
    keep_results: bool = True,
) -> FanOutResult[T, LLMResponse]: ...


@overload
def fan_out(
    executor: Executor,
    tasks: Iterable[T],
    make_request: Callable[[T], LLMRequest],
    *,
    parse: Callable[[T, LLMResponse], R],
    progress: str | bool | None = None,
    on_result: Callable[[int, T, R | None, TaskError | None], None] | None = None,
    timeout: float | None = None,
    window: int | None = None,
    total: int | None = None,
    keep_results: bool = True,
) -> FanOutResult[T, R]: ...


def fan_out(
    executor: Executor,
    tasks: Iterable[Any],
    make_request: Callable[[Any], LLMRequest],
    *,
    parse: Callable[[Any, LLMResponse], Any] | None = None,
    progress: str | bool | None = None,
    on_result: Callable[[int, Any, Any, TaskError | None], None] | None = None,
    timeout: float | None = None,
    window: int | None = None,
    total: int | None = None,
    keep_results: bool = True,
) -> FanOutResult[Any, Any]:
    """Run one request per task through ``executor`` and collect every outcome in input order.

    ``tasks`` is read lazily and at most ``window`` requests are outstanding at once, so a long
    task list never trips fail-fast backpressure; a ``QueueFullError`` caused by other users of
    the executor makes this call wait for its own requests to finish, then try again. The call
    returns only when every task has an outcome.

    Args:
        executor: the executor every request goes through.
        tasks: the phase's tasks (any iterable; a ``Sized`` one gives the progress bar a total).
        make_request: builds the request of one task; called once per task, in input order. An
            exception here (for example ``InvalidRequestError``) fails that task only.
        parse: turns (task, response) into the task's result; an exception fails that task only.
            Default: the result is the ``LLMResponse``.
        progress: a description to show a tqdm bar (True: "tasks"); None/False: no bar. The bar
            is hidden when stderr is not a terminal.
        on_result: called in the calling thread as each task ends, in completion order, with
            (index, task, result, None) or (index, task, None, TaskError). Not called for tasks
            cancelled by a KeyboardInterrupt. An exception here stops the fan-out (after
            cancelling what has not started) and propagates.
        timeout: seconds for the whole fan-out; tasks not finished by then fail with
            ``TimeoutError`` (queued requests are cancelled).
        window: the most outstanding requests; default the executor's ``queue_size``.
        total: the number of tasks, for the progress bar when ``tasks`` has no ``len``.
        keep_results: False keeps neither tasks nor results in the returned value (errors and
            counts only), for streams too long to hold in memory; use ``on_result``.

    Returns:
        A ``FanOutResult``: ``results[i]`` for task i (None when it failed) and ``errors``.

    Raises:
        FanOutInterrupted: on KeyboardInterrupt; requests not started are cancelled and
            ``.result`` holds every task that finished before.
    """
    if window is None:
        window = executor.config.queue_size or _DEFAULT_WINDOW
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window!r}")
    if total is None and isinstance(tasks, Sized):
        total = len(tasks)
    run = _FanOut(executor, make_request, parse, on_result, keep_results, window, timeout)
    bar = _progress_bar(progress, total)
    run.bar = bar
    try:
        run.feed(iter(tasks))
    except KeyboardInterrupt:
        run.abort(interrupted=True)
        raise FanOutInterrupted(run.result()) from None
    except BaseException:
        run.abort(interrupted=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return run.result()


class _FanOut:
    """State of one fan_out call; touched only by the calling thread."""

    def __init__(self, executor: Executor, make_request: Callable[[Any], LLMRequest],
                 parse: Callable[[Any, LLMResponse], Any] | None,
                 on_result: Callable[[int, Any, Any, TaskError | None], None] | None,
                 keep_results: bool, window: int, timeout: float | None) -> None:
        self.executor = executor
        self.make_request = make_request
        self.parse = parse
        self.on_result = on_result
        self.keep = keep_results
        self.window = window
        self.t0 = time.monotonic()
        self.deadline = None if timeout is None else self.t0 + timeout
        self.timeout = timeout
        self.tasks: list[Any] = []
        self.results: list[Any] = []
        self.errors: list[TaskError] = []
        self.pending: dict[Future[LLMResponse], tuple[int, Any]] = {}
        self.submitted = 0
        self.succeeded = 0
        self.complete = True
        self.bar: Any = None
        self.starting: tuple[int, Any] | None = None
        self._nap = threading.Event()  # never set: an interruptible wait when we own no future to wait on

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def feed(self, it: Iterator[Any]) -> None:
        exhausted = False
        while True:
            while not exhausted and len(self.pending) < self.window:
                try:
                    task = next(it)
                except StopIteration:
                    exhausted = True
                    break
                self.start(task)
                if self.timed_out():
                    break
            if self.timed_out():
                self.expire(it if not exhausted else iter(()))
                return
            if not self.pending:
                if exhausted:
                    return
                continue
            self.wait_some(self.remaining_s())

    def timed_out(self) -> bool:
        remaining = self.remaining_s()
        return remaining is not None and remaining <= 0

    def start(self, task: Any) -> None:
        index = self.submitted
        self.submitted += 1
        if self.keep:
            self.tasks.append(task)
            self.results.append(None)
        try:
            request = self.make_request(task)
        except Exception as exc:  # a bad task fails alone (InvalidRequestError, a KeyError in user code...)
            self.fail(index, task, exc)
            return
        # Until the future is in ``pending``, a Ctrl-C must still find this task (see abort).
        self.starting = (index, task)
        while True:
            try:
                future = self.executor.submit(request)
            except QueueFullError as exc:
                # Someone else fills the lane too: let our own requests drain, then try again.
                remaining = self.remaining_s()
                if remaining is not None and remaining <= 0:
                    self.starting = None
                    self.fail(index, task, TimeoutError(self.timeout_message()))
                    return
                hint = exc.retry_after_s or 0.05
                wait_s = hint if remaining is None else min(hint, remaining)
                if self.pending:
                    self.wait_some(wait_s)
                else:
                    self._nap.wait(wait_s)
                continue
            except Exception as exc:  # InvalidRequestError, UnknownProviderError, shutdown: this task only
                self.starting = None
                self.fail(index, task, exc)
                return
            self.pending[future] = (index, task)
            self.starting = None
            return

    def wait_some(self, timeout: float | None) -> None:
        done, _ = wait(self.pending, timeout=timeout, return_when=FIRST_COMPLETED)
        # Settle in input order among those done together: deterministic on_result order in tests.
        for future in sorted(done, key=lambda f: self.pending[f][0]):
            self.settle(future)

    def settle(self, future: Future[LLMResponse]) -> None:
        index, task = self.pending.pop(future)
        try:
            response = future.result(0)
        except CancelledError as exc:
            self.fail(index, task, exc)
            return
        except Exception as exc:
            self.fail(index, task, exc)
            return
        if self.parse is None:
            value: Any = response
        else:
            try:
                value = self.parse(task, response)
            except Exception as exc:  # a reply that parses but makes no sense fails this task only
                self.fail(index, task, exc)
                return
        self.succeeded += 1
        if self.keep:
            self.results[index] = value
        self.tick()
        if self.on_result is not None:
            self.on_result(index, task, value, None)

    def fail(self, index: int, task: Any, exc: BaseException, *, notify: bool = True) -> None:
        error = TaskError.from_exception(index, task, exc)
        if isinstance(exc, CancelledError):
            error = TaskError(index, task, "CancelledError", "cancelled before it started", exc)
        self.errors.append(error)
        self.tick()
        if notify and self.on_result is not None:
            self.on_result(index, task, None, error)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def timeout_message(self) -> str:
        return f"fan-out timeout of {self.timeout}s passed before the task finished"

    def expire(self, rest: Iterator[Any]) -> None:
        """The fan-out deadline passed: every unfinished task fails with TimeoutError."""
        for future in list(self.pending):
            if future.done():
                self.settle(future)
        for future, (index, task) in sorted(self.pending.items(), key=lambda kv: kv[1][0]):
            future.cancel()
            self.fail(index, task, TimeoutError(self.timeout_message()))
        self.pending.clear()
        for task in rest:
            index = self.submitted
            self.submitted += 1
            if self.keep:
                self.tasks.append(task)
                self.results.append(None)
            self.fail(index, task, TimeoutError(self.timeout_message()))

    def abort(self, *, interrupted: bool) -> None:
        """Stop: cancel what has not started, keep what finished, drop what still runs."""
        # Cancel first, so the provider never sees a queued request (DESIGN property 4), then
        # harvest the futures that finished meanwhile: their work is not lost.
        for future in self.pending:
            future.cancel()
        for future in sorted(self.pending, key=lambda f: self.pending[f][0]):
            if future.done() and not future.cancelled():
                index, task = self.pending[future]
                try:
                    response = future.result(0)
                    value = response if self.parse is None else self.parse(task, response)
                except Exception as exc:
                    self.errors.append(TaskError.from_exception(index, task, exc))
                    continue
                self.succeeded += 1
                if self.keep:
                    self.results[index] = value
            else:
                index, task = self.pending[future]
                self.errors.append(TaskError(index, task, "CancelledError", "interrupted before it finished",
                                             None))
        self.pending.clear()
        if self.starting is not None:
            index, task = self.starting
            self.errors.append(TaskError(index, task, "CancelledError", "interrupted while being submitted", None))
            self.starting = None
        self.complete = not interrupted

    def result(self) -> FanOutResult[Any, Any]:
        self.errors.sort(key=lambda e: e.index)
        return FanOutResult(self.tasks, self.results, self.errors, self.complete,
                            time.monotonic() - self.t0, self.submitted, self.succeeded)


def _progress_bar(progress: str | bool | None, total: int | None) -> Any:
    """A tqdm bar on stderr (rate and ETA), or None; tqdm hides itself when stderr is no TTY."""
    if progress is None or progress is False:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is a dependency, but a progress bar is never worth a crash
        return None
    desc = "tasks" if progress is True else str(progress)
    return tqdm(total=total, desc=desc, unit="task", file=sys.stderr, disable=None, dynamic_ncols=True,
                smoothing=0.1)


def _provider_for(provider: str | Sequence[str], index: int) -> str:
    """Round-robin over a list of providers; a plain name (or "auto") for every task."""
    if isinstance(provider, str):
        return provider
    if not provider:
        raise ValueError("provider list is empty")
    return provider[index % len(provider)]


# -- Phase1: chunking ------------------------------------------------------------------------------


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]*[A-Z0-9])")


def chunk_text(text: str, max_chars: int = 1200, overlap: int = 150) -> list[str]:
    """Split ``text`` into chunks of at most ``max_chars`` on paragraph and sentence boundaries.

    Paragraphs (blank-line separated) stay together when they fit; otherwise they are split
    between sentences; a single sentence longer than ``max_chars`` is split between words (or,
    for a word longer than that, hard). Consecutive chunks share up to ``overlap`` characters of
    whole sentences, so an entity on a boundary is seen whole by at least one chunk.

    Args:
        text: the document.
        max_chars: the largest chunk, in characters (> 0).
        overlap: characters of trailing sentences repeated at the start of the next chunk
            (0 <= overlap < max_chars).

    Returns:
        The chunks, in order; [] for a blank text. Whitespace inside a paragraph is collapsed.

    Raises:
        ValueError: ``max_chars`` or ``overlap`` out of range.
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be an integer >= 1, got {max_chars!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < max_chars:
        raise ValueError(f"overlap must be an integer in [0, max_chars), got {overlap!r}")
    units = list(_units(text, max_chars))
    chunks: list[str] = []
    current: list[tuple[str, bool]] = []
    for unit in units:
        if current and len(_join([*current, unit])) > max_chars:
            chunks.append(_join(current))
            tail: list[tuple[str, bool]] = []
            for prev in reversed(current):
                if len(_join([prev, *tail])) > overlap:
                    break
                tail.insert(0, prev)
            current = tail
            while current and len(_join([*current, unit])) > max_chars:
                current.pop(0)
        current.append(unit)
    if current:
        chunks.append(_join(current))
    return chunks


def _units(text: str, max_chars: int) -> Iterator[tuple[str, bool]]:
    """(sentence, starts a paragraph) pairs, every sentence at most ``max_chars`` long."""
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        flat = " ".join(paragraph.split())
        if not flat:
            continue
        first = True
        for sentence in _SENTENCE_END.split(flat):
            for piece in _split_long(sentence, max_chars):
                yield piece, first
                first = False


def _split_long(sentence: str, max_chars: int) -> Iterator[str]:
    if len(sentence) <= max_chars:
        yield sentence
        return
    current = ""
    for word in sentence.split(" "):
        while len(word) > max_chars:  # no boundary at all: cut hard rather than exceed the cap
            if current:
                yield current
                current = ""
            yield word[:max_chars]
            word = word[max_chars:]
        candidate = f"{current} {word}" if current else word
        if len(candidate) > max_chars:
            yield current
            current = word
        else:
            current = candidate
    if current:
        yield current


def _join(units: Sequence[tuple[str, bool]]) -> str:
    out = ""
    for i, (unit, starts_paragraph) in enumerate(units):
        out += unit if i == 0 else ("\n\n" if starts_paragraph else " ") + unit
    return out


@dataclass(frozen=True)
class Chunk:
    """One piece of a document.

    Attributes:
        doc_id: the document's name.
        index: position of the chunk in its document.
        text: the chunk's text.
    """

    doc_id: str
    index: int
    text: str

    @property
    def chunk_id(self) -> str:
        """``"<doc_id>#<index>"``, the provenance handle of entities found in it."""
        return f"{self.doc_id}#{self.index}"


def chunk_documents(documents: Mapping[str, str], max_chars: int = 1200, overlap: int = 150) -> list[Chunk]:
    """Phase1: ``chunk_text`` over every document, in the mapping's order.

    Raises:
        ValueError: ``max_chars`` or ``overlap`` out of range.
    """
    return [Chunk(doc_id, i, text)
            for doc_id, body in documents.items()
            for i, text in enumerate(chunk_text(body, max_chars, overlap))]


# -- Phase2: extraction ----------------------------------------------------------------------------


ENTITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "entities": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "type": {"type": "string"},
                    "attributes": {"type": "object"},
                },
                "required": ["name"],
            },
        },
    },
    "required": ["entities"],
}

_EXTRACT_SYSTEM = (
    "You extract named entities from a text. Answer with JSON only, valid against the given JSON schema: "
    '{"entities": [{"name": ..., "type": ..., "attributes": {...}}]}. Use each name exactly as it is '
    "written in the text. Include only entities of the requested type; an empty list is a valid answer."
)


@dataclass(frozen=True)
class ExtractTask:
    """Phase2 task: find entities of ``entity_type`` in ``chunk``."""

    chunk: Chunk
    entity_type: str


@dataclass(frozen=True)
class Mention:
    """One entity as extracted from one chunk.

    Attributes:
        name: the surface form, as the model wrote it.
        type: the entity type that was asked for.
        attributes: what the model said about it (may be empty).
        chunk_id: where it was found.
    """

    name: str
    type: str
    attributes: Mapping[str, Any]
    chunk_id: str


def _extract_request(task: ExtractTask, provider: str, model: str) -> LLMRequest:
    # Instruction first, then the text after a "Text:" line: models follow it well, and the
    # emulator's responder reads the requested type from the instruction part only.
    prompt = (f"Entity type to extract: {task.entity_type}\n"
              f"Answer with JSON valid against the schema.\n\nText:\n{task.chunk.text}")
    return LLMRequest(provider=provider, model=model, prompt=prompt, system=_EXTRACT_SYSTEM,
                      json_schema=ENTITY_SCHEMA, temperature=0.0,
                      metadata={"phase": "extract", "chunk_id": task.chunk.chunk_id})


def _parse_mentions(task: ExtractTask, response: LLMResponse, grounded: bool) -> list[Mention]:
    data = response.data if response.data is not None else {}
    items = data.get("entities", []) if isinstance(data, Mapping) else []
    haystack = task.chunk.text.casefold()
    mentions = []
    for item in items:
        if not isinstance(item, Mapping):
            continue
        name = " ".join(str(item.get("name", "")).split())
        if not name or not normalize_name(name):
            continue
        # A name that is not in the chunk was invented (by a model or an emulator): keeping it
        # would give it provenance it does not have.
        if grounded and name.casefold() not in haystack:
            continue
        attributes = item.get("attributes")
        mentions.append(Mention(name, task.entity_type, dict(attributes) if isinstance(attributes, Mapping) else {},
                                task.chunk.chunk_id))
    return mentions


def extract_entities(
    executor: Executor,
    chunks: Sequence[Chunk],
    entity_types: Sequence[str],
    *,
    provider: str | Sequence[str] = "auto",
    model: str = "",
    progress: str | bool | None = None,
    timeout: float | None = None,
    grounded: bool = True,
) -> FanOutResult[ExtractTask, list[Mention]]:
    """Phase2: one JSON-schema request per (chunk, entity type), through ``fan_out``.

    Args:
        executor: the executor.
        chunks: Phase1's chunks.
        entity_types: e.g. ("person", "organization", "place").
        provider: a provider name ("auto" lets the executor choose), or a list used round-robin
            by task index, to spread the phase over several providers.
        model: model name; "" for each provider's default.
        progress: tqdm description, or None for no bar.
        timeout: seconds for the whole phase.
        grounded: drop names that do not occur in the chunk (case-insensitive).

    Returns:
        ``results[i]`` is the list of ``Mention`` of task i (chunk-major order).
    """
    tasks = [ExtractTask(chunk, etype) for chunk in chunks for etype in entity_types]
    order = itertools.count()  # fan_out calls make_request once per task, in input order
    return fan_out(
        executor, tasks,
        lambda task: _extract_request(task, _provider_for(provider, next(order)), model),
        parse=lambda task, response: _parse_mentions(task, response, grounded),
        progress=progress, timeout=timeout,
    )


# -- Phase3: matching ------------------------------------------------------------------------------


MATCH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "canonical_name": {"type": "string"},
        "category": {"type": "string"},
    },
    "required": ["canonical_name"],
}

_MATCH_SYSTEM = (
    "You normalise entity names. Given a name as written in a text, its type and where it was seen, "
    'answer with JSON only: {"canonical_name": the full, usual name of the entity, "category": a '
    "one-word category}. Keep the name when it is already canonical."
)


@dataclass(frozen=True)
class MatchTask:
    """Phase3 task: one distinct entity (by normalised key) to name canonically.

    Attributes:
        key: ``normalize_name(name)``.
        name: the most frequent surface form.
        type: the most frequent type.
        context: a chunk text where it was seen (the first), cut to a few hundred characters.
    """

    key: str
    name: str
    type: str
    context: str


@dataclass(frozen=True)
class Match:
    """Phase3 answer for one entity."""

    key: str
    canonical_name: str
    category: str | None


def _match_request(task: MatchTask, provider: str, model: str) -> LLMRequest:
    # The name leads the prompt: it is what the answer is about.
    prompt = f"{task.name}\n\n---\nentity type: {task.type}\nseen in: {task.context}"
    return LLMRequest(provider=provider, model=model, prompt=prompt, system=_MATCH_SYSTEM,
                      json_schema=MATCH_SCHEMA, temperature=0.0, metadata={"phase": "match", "key": task.key})


def _parse_match(task: MatchTask, response: LLMResponse) -> Match:
    data = response.data if isinstance(response.data, Mapping) else {}
    canonical = " ".join(str(data.get("canonical_name", "")).split())
    category = data.get("category")
    return Match(task.key, canonical or task.name, str(category) if category else None)


def match_tasks(mentions: Iterable[Mention], chunks: Sequence[Chunk] = (), context_chars: int = 300
                ) -> list[MatchTask]:
    """One MatchTask per distinct normalised name, in order of first appearance."""
    texts = {c.chunk_id: c.text for c in chunks}
    names: dict[str, Counter[str]] = {}
    types: dict[str, Counter[str]] = {}
    context: dict[str, str] = {}
    for m in mentions:
        key = normalize_name(m.name)
        if not key:
            continue
        names.setdefault(key, Counter())[m.name] += 1
        types.setdefault(key, Counter())[m.type] += 1
        context.setdefault(key, texts.get(m.chunk_id, "")[:context_chars])
    return [MatchTask(key, names[key].most_common(1)[0][0], types[key].most_common(1)[0][0], context[key])
            for key in names]


def match_entities(
    executor: Executor,
    tasks: Sequence[MatchTask],
    *,
    provider: str | Sequence[str] = "auto",
    model: str = "",
    progress: str | bool | None = None,
    timeout: float | None = None,
) -> FanOutResult[MatchTask, Match]:
    """Phase3: one request per distinct entity asking for its canonical name and category.

    Args:
        executor: the executor.
        tasks: from ``match_tasks(mentions, chunks)``.
        provider: a name, or a list used round-robin by task index.
        model: model name; "" for each provider's default.
        progress: tqdm description, or None for no bar.
        timeout: seconds for the whole phase.

    Returns:
        ``results[i]`` is the ``Match`` of task i.
    """
    order = itertools.count()  # fan_out calls make_request once per task, in input order
    return fan_out(
        executor, tasks,
        lambda task: _match_request(task, _provider_for(provider, next(order)), model),
        parse=_parse_match, progress=progress, timeout=timeout,
    )


# -- dedup -----------------------------------------------------------------------------------------


_STOPWORDS = frozenset({
    "a", "an", "and", "the", "of", "in", "on", "at", "to", "for", "by", "with", "from", "after", "before",
    "when", "while", "this", "that", "these", "those", "it", "its", "he", "she", "they", "we", "i", "but", "or",
    "if", "then", "there", "here", "as", "since", "during", "last", "next", "every", "each", "some", "many",
    "her", "his", "our", "their", "not", "no", "so", "yet",
})
# Titles say who someone is, not which entity: "Professor Anika Sel" and "Anika Sel" are one person.
_TITLES = frozenset({"mr", "mrs", "ms", "dr", "prof", "professor", "sir", "dame", "councillor", "mayor"})
_PUNCT = re.compile(r"[^\w\s]+")


def normalize_name(name: str) -> str:
    """The dedup key of a name: casefolded, punctuation and whitespace collapsed, a leading
    article and titles dropped ("The Acme Corp." → "acme corp", "Professor Anika Sel" → "anika sel").
    "" when nothing but function words is left (such a "name" is a sentence start, not an entity)."""
    words = _PUNCT.sub(" ", name.casefold().replace("'s ", " ").replace("’s ", " ")).split()
    while words and words[0] in ("the", "a", "an"):
        words.pop(0)
    while len(words) > 1 and words[0] in _TITLES:
        words.pop(0)
    if not words or all(w in _STOPWORDS for w in words):
        return ""
    return " ".join(words)


@dataclass(frozen=True)
class Entity:
    """One deduplicated entity.

    Attributes:
        key: the normalised key it was merged under.
        name: the canonical name (Phase3), else the most frequent surface form.
        type: the most frequent type among its mentions.
        category: Phase3's category, when matched.
        aliases: every distinct surface form seen, sorted.
        attributes: merged attributes; a key with conflicting values keeps the list of the
            distinct values in first-seen order.
        chunk_ids: every chunk it was found in, in first-seen order (provenance).
        doc_ids: every document it was found in, in first-seen order.
        mentions: how many extractions merged into it.
    """

    key: str
    name: str
    type: str
    category: str | None
    aliases: tuple[str, ...]
    attributes: Mapping[str, Any]
    chunk_ids: tuple[str, ...]
    doc_ids: tuple[str, ...]
    mentions: int

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for JSON)."""
        return {"key": self.key, "name": self.name, "type": self.type, "category": self.category,
                "aliases": list(self.aliases), "attributes": dict(self.attributes),
                "chunk_ids": list(self.chunk_ids), "doc_ids": list(self.doc_ids), "mentions": self.mentions}


def _shares_a_word(a: str, b: str) -> bool:
    return bool(set(a.split()) & set(b.split()))


def dedup_merge(
    extraction: FanOutResult[ExtractTask, list[Mention]] | Sequence[FanOutResult[ExtractTask, list[Mention]]],
    matching: FanOutResult[MatchTask, Match] | None = None,
    *,
    allow_partial: bool = False,
) -> list[Entity]:
    """Merge every mention of the finished extraction fan-out(s) into deduplicated entities.

    Runs only on finished work: it takes ``FanOutResult`` values (which ``fan_out`` returns
    after every task has an outcome), never futures, and refuses an interrupted fan-out unless
    ``allow_partial``. Mentions merge when their ``normalize_name`` keys are equal, or when
    Phase3 gave them canonical names with equal keys. A canonical name that shares no word with
    the name it replaces is ignored, so a confused model cannot merge unrelated entities.

    Args:
        extraction: Phase2's result (or several, e.g. one per batch of documents).
        matching: Phase3's result, optional.
        allow_partial: accept an interrupted fan-out (its finished tasks only).

    Returns:
        Entities sorted by key.

    Raises:
        TypeError: a value is not a FanOutResult (a Future, a list of futures...).
        ValueError: a fan-out did not finish (interrupted) and ``allow_partial`` is False.
    """
    results = [extraction] if isinstance(extraction, FanOutResult) else list(extraction)
    for r in [*results, *([matching] if matching is not None else [])]:
        if not isinstance(r, FanOutResult):
            raise TypeError(f"dedup_merge takes finished FanOutResult values, got {type(r).__name__}; "
                            "run the phase with fan_out (or extract_entities) first")
        if not r.complete and not allow_partial:
            raise ValueError(f"dedup_merge needs finished fan-outs; this one was interrupted after "
                             f"{r.succeeded} of {r.submitted} tasks (pass allow_partial=True to merge them)")
    canonical: dict[str, Match] = {}
    if matching is not None:
        for _, answer in matching.successes():
            target = normalize_name(answer.canonical_name)
            if target and _shares_a_word(target, answer.key):
                canonical[answer.key] = answer

    merged: dict[str, _Merging] = {}
    for result in results:
        for _, mentions in result.successes():
            for m in mentions:
                key = normalize_name(m.name)
                if not key:
                    continue
                match = canonical.get(key)
                final_key = normalize_name(match.canonical_name) if match else key
                merged.setdefault(final_key, _Merging()).add(m, match)
    return [merged[key].entity(key) for key in sorted(merged)]


class _Merging:
    """Accumulates the mentions of one entity."""

    def __init__(self) -> None:
        self.names: Counter[str] = Counter()
        self.types: Counter[str] = Counter()
        self.canonical: Counter[str] = Counter()
        self.categories: Counter[str] = Counter()
        self.attributes: dict[str, list[Any]] = {}
        self.chunk_ids: dict[str, None] = {}  # an ordered set
        self.count = 0

    def add(self, mention: Mention, match: Match | None) -> None:
        self.count += 1
        self.names[mention.name] += 1
        self.types[mention.type] += 1
        self.chunk_ids[mention.chunk_id] = None
        if match is not None:
            self.canonical[match.canonical_name] += 1
            if match.category:
                self.categories[match.category] += 1
        for k, v in mention.attributes.items():
            values = self.attributes.setdefault(str(k), [])
            if v not in values:
                values.append(v)

    def entity(self, key: str) -> Entity:
        name = (self.canonical or self.names).most_common(1)[0][0]
        category = self.categories.most_common(1)[0][0] if self.categories else None
        attributes = {k: vs[0] if len(vs) == 1 else vs for k, vs in self.attributes.items()}
        doc_ids = dict.fromkeys(cid.rsplit("#", 1)[0] for cid in self.chunk_ids)
        return Entity(key, name, self.types.most_common(1)[0][0], category, tuple(sorted(self.names)),
                      attributes, tuple(self.chunk_ids), tuple(doc_ids), self.count)
