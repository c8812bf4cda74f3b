"""Batch runs: one result line per request, bad lines reported, resume after Ctrl-C or a crash."""

from __future__ import annotations

import _thread
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from llm_executor import Capabilities, Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.batch import BatchInterrupted, run_batch
from llm_executor.errors import RateLimitedError
from tests.fakes import FakeProvider

TESTS = Path(__file__).parent
ROOT = TESTS.parent
CAPS = Capabilities(supports_json_schema=True, max_output_tokens=1000)


def write_input(path: Path, records: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def read_output(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def executor(**providers: FakeProvider) -> Executor:
    config = ExecutorConfig(providers={name: ProviderConfig(max_parallel=2) for name in providers}, queue_size=4)
    return Executor(config, dict(providers))


def test_one_result_line_per_request_with_response_fields(tmp_path: Path) -> None:
    def reply(request: LLMRequest) -> Any:
        if request.prompt == "limit":
            return RateLimitedError("quota", retryable=False, status=429)
        return json.dumps({"n": len(request.prompt)}) if request.json_schema else f"echo:{request.prompt}"
    src = write_input(tmp_path / "in.jsonl", [
        {"id": i, "prompt": f"p{i}", "provider": "fake", "model": "m"} for i in range(20)
    ] + [
        {"id": "s", "prompt": "abc", "provider": "fake", "model": "m",
         "json_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}},
        {"id": "r", "prompt": "limit", "provider": "fake", "model": "m"},
    ])
    out = tmp_path / "out.jsonl"
    with executor(fake=FakeProvider(caps=CAPS, reply=reply)) as ex:
        summary = run_batch(ex, src, out, progress=False)
    lines = read_output(out)
    by_id = {line["id"]: line for line in lines}
    assert len(lines) == len(by_id) == 22
    assert by_id[3]["ok"] and by_id[3]["response"]["text"] == "echo:p3"
    assert set(by_id[3]["response"]) == {"text", "provider", "model", "finish_reason", "usage_tokens",
                                         "prompt_tokens", "completion_tokens", "attempts", "latency_ms", "data"}
    assert by_id["s"]["response"]["data"] == {"n": 3}
    assert by_id["r"] == {"id": "r", "ok": False, "error": {"type": "RateLimitedError", "message": "quota"}}
    assert (summary.total, summary.done, summary.succeeded, summary.failed) == (22, 22, 21, 1)
    assert summary.per_provider == {"fake": {"ok": 21, "failed": 1}}
    assert not summary.bad_lines and not summary.interrupted
    assert "requests   22" in summary.format_table()


def test_bad_lines_are_reported_with_line_numbers_and_the_rest_runs(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl", [
        {"id": "a", "prompt": "ok", "provider": "fake", "model": "m"},          # 1
        "{not json",                                                             # 2
        {"prompt": "no id", "provider": "fake"},                                  # 3
        {"id": "b", "provider": "fake"},                                          # 4 missing prompt
        {"id": "c", "prompt": "x", "provider": "fake", "temperature": 9},         # 5 invalid field (submit)
        {"id": "d", "prompt": "x", "provider": "fake", "max_tokens": 5},          # 6 unknown field
        {"id": "a", "prompt": "again", "provider": "fake", "model": "m"},         # 7 duplicate id
        {"id": "e", "prompt": "x", "provider": "nobody", "model": "m"},           # 8 unknown provider
        "",                                                                       # 9 blank: ignored
        {"id": "f", "prompt": "fine", "provider": "fake", "model": "m"},          # 10
        "[1, 2]",                                                                 # 11
    ])
    out = tmp_path / "out.jsonl"
    fake = FakeProvider(caps=CAPS)
    with executor(fake=fake) as ex:
        summary = run_batch(ex, src, out, progress=False)
    assert [n for n, _ in summary.bad_lines] == [2, 3, 4, 5, 6, 7, 8, 11]
    messages = dict(summary.bad_lines)
    assert "invalid JSON" in messages[2] and "'id'" in messages[3] and "'prompt'" in messages[4]
    assert "temperature" in messages[5] and "max_tokens" in messages[6]
    assert "duplicate id 'a'" in messages[7] and "line 1" in messages[7] and "nobody" in messages[8]
    by_id = {line["id"]: line for line in read_output(out)}
    assert sorted(by_id) == ["a", "b", "c", "d", "e", "f"]  # bad lines with an id get an error line
    assert by_id["a"]["response"]["text"] == "echo:ok" and by_id["f"]["ok"]
    assert by_id["c"]["error"]["type"] == "InvalidRequestError"
    assert by_id["e"]["error"]["type"] == "UnknownProviderError"
    assert sorted(fake.prompts) == ["fine", "ok"]
    assert "line 2: invalid JSON" in summary.format_table()


@pytest.mark.parametrize("after_write", [True, False], ids=["after-the-write", "before-the-write"])
def test_a_ctrl_c_next_to_a_write_leaves_the_summary_equal_to_the_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after_write: bool) -> None:
    """A Ctrl-C lands between two statements: right after a result line is written (the
    summary must count it) or right before (it must not). CI saw done=11 with 12 lines."""
    from llm_executor import batch

    src = write_input(tmp_path / "in.jsonl",
                      [{"id": f"r{i}", "prompt": f"p{i}", "provider": "fake", "model": "m"} for i in range(30)])
    out = tmp_path / "out.jsonl"
    original = batch._Writer.write
    calls = {"n": 0}

    def write(self: Any, obj: dict[str, Any]) -> None:
        calls["n"] += 1
        if calls["n"] == 5 and not after_write:
            raise KeyboardInterrupt
        original(self, obj)
        if calls["n"] == 5 and after_write:
            raise KeyboardInterrupt

    monkeypatch.setattr(batch._Writer, "write", write)
    with executor(fake=FakeProvider(caps=CAPS)) as ex:
        with pytest.raises(BatchInterrupted) as info:
            run_batch(ex, src, out, progress=False)
    summary = info.value.summary
    lines = read_output(out)
    assert len(lines) == (5 if after_write else 4)
    assert summary.done == summary.succeeded == len(lines)
    assert summary.per_provider == {"fake": {"ok": len(lines), "failed": 0}}
    assert summary.remaining == 30 - len(lines)


def test_ctrl_c_then_rerun_completes_with_every_id_exactly_once(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl",
                      [{"id": f"r{i}", "prompt": f"p{i}", "provider": "fake", "model": "m"} for i in range(60)])
    out = tmp_path / "out.jsonl"
    calls = {"n": 0}

    def interrupting(request: LLMRequest) -> Any:
        calls["n"] += 1
        if calls["n"] == 15:
            _thread.interrupt_main()  # Ctrl-C in the caller, mid-batch
        return f"echo:{request.prompt}"
    with executor(fake=FakeProvider(caps=CAPS, reply=interrupting)) as ex:
        with pytest.raises(BatchInterrupted) as info:
            run_batch(ex, src, out, progress=False)
    first = info.value.summary
    assert first.interrupted and 0 < first.done < 60 and first.remaining == 60 - first.done
    assert len(read_output(out)) == first.done

    fake = FakeProvider(caps=CAPS)
    with executor(fake=fake) as ex:
        second = run_batch(ex, src, out, progress=False)
    assert second.skipped_already_done == first.done and second.done == 60 - first.done
    ids = Counter(line["id"] for line in read_output(out))
    assert ids == Counter({f"r{i}": 1 for i in range(60)})
    assert all(line["ok"] for line in read_output(out))
    # The second run never re-sent a request whose line was already written.
    done_before = {f"p{int(i[1:])}" for i in ids} - set(fake.prompts)
    assert len(done_before) == first.done


def test_a_partial_last_line_from_a_crash_is_cut_and_that_request_rerun(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl",
                      [{"id": i, "prompt": f"p{i}", "provider": "fake", "model": "m"} for i in range(5)])
    out = tmp_path / "out.jsonl"
    good = json.dumps({"id": 0, "ok": True, "response": {"text": "echo:p0"}}) + "\n"
    out.write_text(good + '{"id": 1, "ok": true, "resp')
    fake = FakeProvider(caps=CAPS)
    with executor(fake=fake) as ex:
        summary = run_batch(ex, src, out, progress=False)
    assert summary.truncated_bytes == len('{"id": 1, "ok": true, "resp')
    assert summary.skipped_already_done == 1 and summary.done == 4
    assert sorted(fake.prompts) == ["p1", "p2", "p3", "p4"]
    lines = read_output(out)
    assert sorted(line["id"] for line in lines) == [0, 1, 2, 3, 4]
    assert "partial last line" in summary.format_table()


_CRASHING_RUN = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from tests.fakes import FakeProvider
from llm_executor import Capabilities, Executor, ExecutorConfig, ProviderConfig
from llm_executor.batch import run_batch
calls = [0]
def reply(request):
    calls[0] += 1
    if calls[0] > {crash_after}:
        os.kill(os.getpid(), signal.SIGKILL)  # a crash: no cleanup, no flush, no finally
    return "echo:" + request.prompt
fake = FakeProvider(caps=Capabilities(max_output_tokens=1000), reply=reply)
cfg = ExecutorConfig(providers={{"fake": ProviderConfig(max_parallel=3)}}, queue_size=5)
with Executor(cfg, {{"fake": fake}}) as ex:
    run_batch(ex, {src!r}, {out!r}, progress=False)
"""


def test_killed_run_resumes_without_losing_or_duplicating_a_line(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl",
                      [{"id": f"k{i}", "prompt": f"p{i}", "provider": "fake", "model": "m"} for i in range(40)])
    out = tmp_path / "out.jsonl"
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(_CRASHING_RUN.format(tests=str(TESTS), crash_after=12, src=str(src),
                                                           out=str(out))))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], env=env, timeout=60, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    crashed = out.read_text().splitlines()
    assert 0 < len(crashed) <= 12

    with executor(fake=FakeProvider(caps=CAPS)) as ex:
        summary = run_batch(ex, src, out, progress=False)
    ids = Counter(line["id"] for line in read_output(out))
    assert ids == Counter({f"k{i}": 1 for i in range(40)})
    assert summary.skipped_already_done + summary.done == 40


def test_journal_file_records_done_ids_and_is_read_on_resume(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl",
                      [{"id": i, "prompt": f"p{i}", "provider": "fake", "model": "m"} for i in range(3)])
    out, journal = tmp_path / "out.jsonl", tmp_path / "done.journal"
    journal.write_text(json.dumps({"id": 1}) + "\n")
    fake = FakeProvider(caps=CAPS)
    with executor(fake=fake) as ex:
        summary = run_batch(ex, src, out, journal_path=journal, progress=False)
    assert summary.skipped_already_done == 1 and sorted(fake.prompts) == ["p0", "p2"]
    assert sorted(json.loads(line)["id"] for line in journal.read_text().splitlines()) == [0, 1, 2]


def test_missing_input_and_output_equal_to_input_are_refused(tmp_path: Path) -> None:
    with executor(fake=FakeProvider(caps=CAPS)) as ex:
        with pytest.raises(FileNotFoundError, match="nope"):
            run_batch(ex, tmp_path / "nope.jsonl", tmp_path / "out.jsonl", progress=False)
        src = write_input(tmp_path / "in.jsonl", [{"id": 1, "prompt": "p", "provider": "fake"}])
        with pytest.raises(ValueError, match="input"):
            run_batch(ex, src, src, progress=False)


def test_retry_failed_reruns_error_lines_and_keeps_one_line_per_id(tmp_path: Path) -> None:
    src = write_input(tmp_path / "in.jsonl",
                      [{"id": i, "prompt": f"p{i}", "provider": "fake", "model": "m"} for i in range(6)])
    out = tmp_path / "out.jsonl"

    def flaky(request: LLMRequest) -> Any:
        return RateLimitedError("later", retryable=False) if request.prompt in ("p1", "p4") else "ok"
    with executor(fake=FakeProvider(caps=CAPS, reply=flaky)) as ex:
        assert run_batch(ex, src, out, progress=False).failed == 2
    fake = FakeProvider(caps=CAPS)
    with executor(fake=fake) as ex:
        plain = run_batch(ex, src, out, progress=False)
        assert plain.done == 0 and not fake.prompts  # without the flag, an error line counts as done
        again = run_batch(ex, src, out, progress=False, retry_failed=True)
    assert again.skipped_already_done == 4 and again.succeeded == 2 and sorted(fake.prompts) == ["p1", "p4"]
    lines = read_output(out)
    assert sorted(line["id"] for line in lines) == list(range(6)) and all(line["ok"] for line in lines)
