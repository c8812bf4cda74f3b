"""The example pipeline end to end over the bundled corpus, with fakes that answer like the emulator."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from llm_executor import Capabilities, Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.errors import ProviderUnavailableError
from llm_executor.pipeline import load_corpus, run_pipeline
from tests.fakes import FakeProvider

_PHRASE = re.compile(r"\b[A-Z][a-z]+(?:\s+[A-Z][a-z]+)*")


def capitalised_json(request: LLMRequest) -> str:
    """Schema-valid JSON from the prompt's capitalised phrases, as the emulator's responder does."""
    phrases = _PHRASE.findall(request.prompt)
    props = dict((request.json_schema or {}).get("properties", {}))  # type: ignore[union-attr]
    if "canonical_name" in props:
        return json.dumps({"canonical_name": phrases[0] if phrases else "x", "category": "thing"})
    return json.dumps({"entities": [{"name": p, "type": "thing", "attributes": {"seen": True}} for p in phrases]})


def providers(*names: str, reply: Any = capitalised_json) -> dict[str, FakeProvider]:
    caps = Capabilities(supports_json_schema=True, models=("m",))
    return {n: FakeProvider(n, caps=caps, reply=reply) for n in names}


def test_bundled_corpus_has_a_few_short_texts() -> None:
    corpus = load_corpus()
    assert 4 <= len(corpus) <= 6
    assert all(100 <= len(text.split()) <= 300 for text in corpus.values())


def test_load_corpus_reads_a_directory_and_names_a_missing_one(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("Bee.")
    (tmp_path / "a.txt").write_text("Ay.")
    (tmp_path / "skip.md").write_text("no")
    assert load_corpus(tmp_path) == {"a": "Ay.", "b": "Bee."}
    with pytest.raises(FileNotFoundError, match="nope"):
        load_corpus(tmp_path / "nope")


def test_pipeline_over_the_corpus_finds_the_recurring_entities_with_provenance() -> None:
    fakes = providers("a", "b", "c")
    config = ExecutorConfig(providers={n: ProviderConfig(max_parallel=2) for n in fakes})
    with Executor(config, fakes) as ex:
        result = run_pipeline(ex, load_corpus(), providers=None, progress=False, model="m")
    assert result.complete and result.failed == 0
    assert result.documents == 5 and len(result.chunks) >= 5
    assert result.extraction.submitted == len(result.chunks) * 3
    # Spread over the three providers round-robin.
    counts = [len(f.seen) for f in fakes.values()]
    assert max(counts) - min(counts) <= 1 and sum(counts) == result.tasks
    by_key = {e.key: e for e in result.entities}
    halvorsen = by_key["halvorsen robotics"]
    assert halvorsen.doc_ids == tuple(sorted(load_corpus()))  # mentioned in all five texts
    assert halvorsen.attributes == {"seen": True}
    assert "anika sel" in by_key and "Professor Anika Sel" in by_key["anika sel"].aliases
    assert {"port aldine", "caldwell", "mira okafor", "ilse brandt", "verdant bay shipping"} <= set(by_key)
    # Sentence starts are not entities, and nothing outside the texts (e.g. "JSON") survives.
    assert not {"the", "she", "her", "json"} & set(by_key)
    table = result.format_table(limit=5)
    assert "Halvorsen Robotics" in table.splitlines()[2] and "more" in table.splitlines()[-1]
    json.dumps(result.as_dict())


def test_pipeline_keeps_going_when_some_tasks_fail() -> None:
    def flaky(request: LLMRequest) -> Any:
        if "Lantern" in request.prompt:
            return ProviderUnavailableError("down", retryable=False)
        return capitalised_json(request)
    fakes = providers("a", reply=flaky)
    with Executor(ExecutorConfig(providers={"a": ProviderConfig()}), fakes) as ex:
        result = run_pipeline(ex, load_corpus(), model="m")
    assert result.complete and result.failed > 0
    assert set(result.extraction.error_counts()) <= {"ProviderUnavailableError"}
    assert "halvorsen robotics" in {e.key for e in result.entities}
    assert result.as_dict()["extract"]["failed"] == result.extraction.failed


def test_phase_modules_import_only_the_public_api() -> None:
    """STYLE practice 1: phases, pipeline and batch sit on top of the public names, never executor internals."""
    import ast

    import llm_executor

    pkg = Path(llm_executor.__file__).parent
    files = [pkg / "pipeline.py", pkg / "batch.py", *sorted((pkg / "phases").glob("*.py"))]
    assert len(files) >= 8  # the phases package: __init__ and a module per idea
    for path in files:
        in_phases = path.parent.name == "phases"
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            if (node.module or "").startswith("llm_executor."):
                pytest.fail(f"{path.name} imports {node.module}")
            top = node.level == 2 if in_phases else node.level == 1
            if node.level == 0 or (in_phases and node.level == 1):
                continue  # the stdlib, third parties, sibling phase modules
            assert top, f"{path.name}: relative import of level {node.level}"
            if node.module is None:
                assert {a.name for a in node.names} <= set(llm_executor.__all__), path.name
            else:
                assert node.module in {"errors", "phases", "window"}, f"{path.name} imports .{node.module}"


def test_pipeline_with_progress_bars_on_a_non_terminal_runs_quietly(capsys: pytest.CaptureFixture[str]) -> None:
    fakes = providers("a")
    with Executor(ExecutorConfig(providers={"a": ProviderConfig()}), fakes) as ex:
        result = run_pipeline(ex, {"d": "Ada Lovelace met Charles Babbage in London."}, providers=["a"],
                              progress=True, model="m")
    assert {e.key for e in result.entities} == {"ada lovelace", "charles babbage", "london"}
    assert capsys.readouterr().err == ""  # tqdm hides itself when stderr is not a TTY
