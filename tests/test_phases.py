"""Phase helpers: fan_out order, partial failure, interrupts; chunking; dedup only on finished work."""

from __future__ import annotations

import _thread
import json
import threading
from concurrent.futures import Future
from typing import Any

import pytest

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.errors import InvalidRequestError, ProviderUnavailableError
from llm_executor.phases import (
    Chunk,
    ExtractTask,
    FanOutInterrupted,
    FanOutResult,
    Match,
    MatchTask,
    Mention,
    TaskError,
    chunk_documents,
    chunk_text,
    dedup_merge,
    extract_entities,
    fan_out,
    match_entities,
    match_tasks,
    normalize_name,
)
from tests.fakes import FakeProvider, GateProvider, req


def cfg(queue_size: int = 100, **providers: ProviderConfig) -> ExecutorConfig:
    return ExecutorConfig(providers=providers or {"fake": ProviderConfig(max_parallel=4)}, queue_size=queue_size)


def failing_on(*bad: str) -> FakeProvider:
    def reply(request: LLMRequest) -> Any:
        if request.prompt in bad:
            return ProviderUnavailableError("boom", retryable=False)
        return f"echo:{request.prompt}"
    return FakeProvider(reply=reply)


# -- fan_out -----------------------------------------------------------------------------------------


def test_fan_out_keeps_input_order_and_parses_each_result(fake: FakeProvider) -> None:
    with Executor(cfg(), {"fake": fake}) as ex:
        out = fan_out(ex, range(50), lambda i: req(prompt=f"p{i}"), parse=lambda i, r: (i, r.text))
    assert out.ok and out.complete
    assert out.results == [(i, f"echo:p{i}") for i in range(50)]
    assert out.tasks == list(range(50)) and out.submitted == out.succeeded == 50


def test_partial_failure_keeps_every_completed_result_and_reports_failures_by_index() -> None:
    provider = failing_on("p3", "p7")
    with Executor(cfg(), {"fake": provider}) as ex:
        out = fan_out(ex, range(10), lambda i: req(prompt=f"p{i}"))
    assert out.complete and not out.ok
    assert [e.index for e in out.errors] == [3, 7]
    assert {e.error_type for e in out.errors} == {"ProviderUnavailableError"}
    assert all(e.task == e.index for e in out.errors)
    assert [r is None for r in out.results] == [i in (3, 7) for i in range(10)]
    assert out.results[0] is not None and out.results[0].text == "echo:p0"
    assert out.succeeded == 8 and out.failed == 2 and out.error_counts() == {"ProviderUnavailableError": 2}


def test_a_bad_task_fails_alone_whether_make_request_or_submit_rejects_it(fake: FakeProvider) -> None:
    def make(i: int) -> LLMRequest:
        if i == 1:
            raise KeyError("no such field")
        return req(prompt="" if i == 2 else f"p{i}")  # "" -> InvalidRequestError at submit
    with Executor(cfg(), {"fake": fake}) as ex:
        out = fan_out(ex, range(4), make)
    assert [(e.index, e.error_type) for e in out.errors] == [(1, "KeyError"), (2, "InvalidRequestError")]
    assert isinstance(out.errors[1].exception, InvalidRequestError)
    assert out.results[0] is not None and out.results[3] is not None


def test_many_more_tasks_than_a_fail_fast_queue_never_raise_queue_full(gate: GateProvider) -> None:
    # queue_size 5 with fail_fast: submitting 200 at once would raise QueueFullError.
    with Executor(cfg(queue_size=5, gate=ProviderConfig(max_parallel=2)), {"gate": gate}) as ex:
        gate.gate.set()
        out = fan_out(ex, range(200), lambda i: req("gate", f"p{i}"))
    assert out.ok and out.succeeded == 200
    assert ex.stats()["gate"].failed == 0


def test_on_result_runs_in_the_calling_thread_once_per_task(fake: FakeProvider) -> None:
    seen: list[tuple[int, bool, str]] = []
    provider = failing_on("p2")

    def on_result(i: int, task: int, value: Any, error: TaskError | None) -> None:
        seen.append((i, error is None, threading.current_thread().name))
    with Executor(cfg(), {"fake": provider}) as ex:
        fan_out(ex, range(5), lambda i: req(prompt=f"p{i}"), on_result=on_result)
    assert sorted(i for i, _, _ in seen) == list(range(5))
    assert [ok for i, ok, _ in sorted(seen)] == [True, True, False, True, True]
    assert {name for _, _, name in seen} == {threading.current_thread().name}


def test_fan_out_returns_only_after_the_slowest_task(gate: GateProvider) -> None:
    """dedup must see every task: fan_out cannot return while one task is still running."""
    with Executor(cfg(gate=ProviderConfig(max_parallel=4)), {"gate": gate}) as ex:
        box: list[FanOutResult[int, Any]] = []
        worker = threading.Thread(target=lambda: box.append(fan_out(ex, range(3), lambda i: req("gate", f"p{i}"))))
        worker.start()
        gate.wait_started(3)
        worker.join(0.2)
        assert worker.is_alive() and not box
        gate.gate.set()
        worker.join(5)
    assert box and box[0].ok and box[0].succeeded == 3


def test_timeout_fails_unfinished_tasks_and_keeps_finished_ones(gate: GateProvider) -> None:
    fast = FakeProvider()
    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1), "fake": ProviderConfig()})
    with Executor(config, {"gate": gate, "fake": fast}) as ex:
        out = fan_out(ex, range(4), lambda i: req("fake" if i % 2 == 0 else "gate", f"p{i}"), timeout=0.3)
        gate.gate.set()
    assert out.complete
    assert [e.index for e in out.errors] == [1, 3]
    assert {e.error_type for e in out.errors} == {"TimeoutError"}
    assert out.results[0] is not None and out.results[2] is not None
    # The queued gate request was cancelled: the provider saw only the one that had started.
    assert gate.prompts == ["p1"]


def test_timeout_also_fails_the_tasks_never_read(gate: GateProvider) -> None:
    with Executor(cfg(gate=ProviderConfig(max_parallel=1)), {"gate": gate}) as ex:
        out = fan_out(ex, iter(range(4)), lambda i: req("gate", f"p{i}"), window=1, timeout=0.2)
        gate.gate.set()
    assert out.complete and out.submitted == 4 and out.tasks == [0, 1, 2, 3]
    assert [(e.index, e.error_type) for e in out.errors] == [(i, "TimeoutError") for i in range(4)]
    assert "fan-out timeout of 0.2s passed" in out.errors[0].message
    assert gate.prompts == ["p0"]  # window=1: the others were never submitted


def test_on_result_raising_stops_the_fan_out_and_cancels_what_has_not_started(gate: GateProvider) -> None:
    class Stop(Exception):
        pass

    def on_result(i: int, task: int, value: Any, error: TaskError | None) -> None:
        raise Stop
    fast = FakeProvider()
    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1), "fake": ProviderConfig()})
    with Executor(config, {"gate": gate, "fake": fast}) as ex:
        with pytest.raises(Stop):
            fan_out(ex, range(6), lambda i: req("fake" if i == 0 else "gate", f"p{i}"), on_result=on_result)
        gate.gate.set()
    assert gate.prompts in ([], ["p1"])  # the queued gate requests were cancelled, not run


def test_keyboard_interrupt_cancels_queued_requests_and_keeps_completed_results() -> None:
    gate = GateProvider()
    calls = {"n": 0}

    def reply(request: LLMRequest) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            _thread.interrupt_main()  # Ctrl-C arrives while the caller waits in fan_out
        return f"echo:{request.prompt}"
    fast = FakeProvider(reply=reply)
    config = ExecutorConfig(providers={"gate": ProviderConfig(max_parallel=1), "fake": ProviderConfig(max_parallel=1)})
    try:
        with Executor(config, {"gate": gate, "fake": fast}) as ex:
            with pytest.raises(FanOutInterrupted) as info:
                fan_out(ex, range(12), lambda i: req("gate" if i >= 6 else "fake", f"p{i}"))
            gate.gate.set()
    finally:
        gate.gate.set()
    result = info.value.result
    assert isinstance(info.value, KeyboardInterrupt)
    assert not result.complete
    done = {i for i, r in enumerate(result.results) if r is not None}
    assert done >= {0, 1}  # finished before the interrupt: kept
    assert {e.error_type for e in result.errors} <= {"CancelledError"}
    # Every task read from the input has exactly one outcome: a result or an error.
    assert sorted([*done, *(e.index for e in result.errors)]) == list(range(result.submitted))
    # Queued gate requests never reached the provider (at most the one already running).
    assert len(gate.prompts) <= 1


# -- chunking ----------------------------------------------------------------------------------------


def test_chunks_respect_max_chars_and_break_between_sentences() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    chunks = chunk_text(text, max_chars=120, overlap=0)
    assert all(len(c) <= 120 for c in chunks)
    assert all(c.startswith("Sentence number") and c.endswith("is here.") for c in chunks)
    assert " ".join(chunks) == text


def test_paragraphs_stay_whole_when_they_fit() -> None:
    text = "Alpha one. Alpha two.\n\nBeta one. Beta two.\n\n\nGamma one."
    assert chunk_text(text, max_chars=1000, overlap=0) == ["Alpha one. Alpha two.\n\nBeta one. Beta two.\n\nGamma one."]
    assert chunk_text(text, max_chars=25, overlap=0) == ["Alpha one. Alpha two.", "Beta one. Beta two.", "Gamma one."]


def test_overlap_repeats_whole_trailing_sentences() -> None:
    text = "Ann met Bob. Bob met Cy. Cy met Dee. Dee met Eve."
    chunks = chunk_text(text, max_chars=26, overlap=12)
    assert chunks == ["Ann met Bob. Bob met Cy.", "Bob met Cy. Cy met Dee.", "Cy met Dee. Dee met Eve."]


def test_a_sentence_longer_than_max_chars_is_split_between_words_then_hard() -> None:
    words = "word " * 30
    chunks = chunk_text(words + "x" * 25, max_chars=20, overlap=0)
    assert all(len(c) <= 20 for c in chunks)
    assert "".join(chunks).replace(" ", "") == (words + "x" * 25).replace(" ", "")


def test_chunking_edge_cases_and_bad_arguments() -> None:
    assert chunk_text("   \n\n  ", 100, 0) == []
    with pytest.raises(ValueError, match="max_chars"):
        chunk_text("x", 0, 0)
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("x", 10, 10)
    docs = chunk_documents({"a": "One. Two.", "b": "Three."}, max_chars=6, overlap=0)
    assert [(c.chunk_id, c.text) for c in docs] == [("a#0", "One."), ("a#1", "Two."), ("b#0", "Three.")]


# -- dedup -------------------------------------------------------------------------------------------


def test_normalize_name_collapses_case_punctuation_space_articles_and_titles() -> None:
    assert normalize_name("The  Acme-Corp.") == normalize_name("acme corp") == "acme corp"
    assert normalize_name("Dr. Ada  Byron") == normalize_name("Ada Byron") == "ada byron"
    assert normalize_name("Mayor") == "mayor"  # a title alone is still a name
    assert normalize_name("The") == "" and normalize_name("In the") == ""


def _extraction(*mentions: tuple[str, str, str, dict[str, Any]]) -> FanOutResult[ExtractTask, list[Mention]]:
    chunk = Chunk("d", 0, "")
    tasks = [ExtractTask(chunk, "org")]
    return FanOutResult(tasks, [[Mention(n, t, a, c) for n, t, c, a in mentions]])


def test_dedup_merges_normalised_names_attributes_and_keeps_every_chunk() -> None:
    ext = _extraction(("Acme Corp.", "org", "d1#0", {"city": "Oslo"}),
                      ("the acme corp", "org", "d2#3", {"founded": 1999}),
                      ("ACME CORP", "place", "d1#0", {"city": "Bergen"}),
                      ("Bob", "person", "d1#1", {}))
    entities = dedup_merge(ext)
    assert [e.key for e in entities] == ["acme corp", "bob"]
    acme = entities[0]
    assert acme.mentions == 3 and acme.type == "org"
    assert acme.chunk_ids == ("d1#0", "d2#3") and acme.doc_ids == ("d1", "d2")
    assert acme.aliases == ("ACME CORP", "Acme Corp.", "the acme corp")
    assert acme.attributes == {"city": ["Oslo", "Bergen"], "founded": 1999}


def test_dedup_uses_canonical_names_from_matching_but_not_unrelated_ones() -> None:
    ext = _extraction(("Acme", "org", "a#0", {}), ("Acme Corporation", "org", "b#0", {}), ("Zed", "org", "c#0", {}))
    tasks = [MatchTask("acme", "Acme", "org", ""), MatchTask("zed", "Zed", "org", "")]
    matching = FanOutResult(tasks, [Match("acme", "Acme Corporation", "company"),
                                    Match("zed", "Totally Different", None)])
    entities = {e.key: e for e in dedup_merge(ext, matching)}
    assert set(entities) == {"acme corporation", "zed"}
    assert entities["acme corporation"].name == "Acme Corporation"
    assert entities["acme corporation"].chunk_ids == ("a#0", "b#0")
    assert entities["acme corporation"].category == "company"


def test_dedup_refuses_futures_and_interrupted_fan_outs() -> None:
    with pytest.raises(TypeError, match="FanOutResult"):
        dedup_merge([Future()])  # type: ignore[list-item]
    partial = FanOutResult[ExtractTask, list[Mention]](complete=False, submitted=4, succeeded=1)
    with pytest.raises(ValueError, match="interrupted"):
        dedup_merge(partial)
    assert dedup_merge(partial, allow_partial=True) == []


def test_extract_match_dedup_round_robin_over_providers() -> None:
    def entities_of(request: LLMRequest) -> str:
        if request.json_schema and "canonical_name" in json.dumps(request.json_schema):
            name = request.prompt.split("\n", 1)[0]
            return json.dumps({"canonical_name": name, "category": "thing"})
        text = request.prompt.split("\n\n---", 1)[0]
        return json.dumps({"entities": [{"name": w.strip(".,")} for w in text.split() if w[:1].isupper()]
                           + [{"name": "Invented Name"}]})
    a, b = FakeProvider("a", reply=entities_of), FakeProvider("b", reply=entities_of)
    config = ExecutorConfig(providers={"a": ProviderConfig(), "b": ProviderConfig()})
    chunks = chunk_documents({"d1": "Ada met Bob in Oslo.", "d2": "Bob went to Oslo."}, 100, 0)
    with Executor(config, {"a": a, "b": b}) as ex:
        ext = extract_entities(ex, chunks, ["person", "place"], provider=["a", "b"], model="m")
        assert ext.ok and len(ext.results) == 4
        tasks = match_tasks((m for _, ms in ext.successes() for m in ms), chunks)
        matched = match_entities(ex, tasks, provider=["a", "b"], model="m")
    assert len(tasks) == 3  # ada, bob, oslo
    assert (len(a.seen), len(b.seen)) == (2 + 2, 2 + 1)  # 4 extractions then 3 matches, alternated
    entities = dedup_merge(ext, matched)
    assert {e.key for e in entities} == {"ada", "bob", "oslo"}  # "Invented Name" is not in any chunk
    bob = next(e for e in entities if e.key == "bob")
    assert bob.doc_ids == ("d1", "d2") and bob.category == "thing"
