"""``default_executor()``: one shared Executor per process, and ``stats()`` as a table.

The shared executor is built from the environment (here an emulator's URL in ``os.environ``),
reused by every later call and every thread, rebuilt after ``shutdown()`` and in a forked child,
and replaced by ``default_executor(config)`` with the old one's queue cancelled.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import llm_executor
import llm_executor.default
from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig, default_executor
from llm_executor.metrics import ExecutorStats, ProviderStats
from llm_executor.testing import Emulator, ProviderSim
from tests.fakes import wait_for


@pytest.fixture
def emulator_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Emulator]:
    """An emulated openai in the environment, and no shared executor before or after the test."""
    monkeypatch.setattr(llm_executor.default, "_current", None)
    with Emulator(providers={"openai": ProviderSim(latency_s=0.05)}) as emu:
        for key in [k for k in os.environ if k.startswith("LLM_EXECUTOR_")]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("LLM_EXECUTOR_PROVIDERS", "openai")
        monkeypatch.setenv("LLM_EXECUTOR_OPENAI_BASE_URL", emu.url("openai"))
        monkeypatch.setenv("LLM_EXECUTOR_OPENAI_MODEL", "gpt-4o-mini")
        monkeypatch.setenv("LLM_EXECUTOR_OPENAI_MAX_PARALLEL", "1")
        try:
            yield emu
        finally:
            current = llm_executor.default._current
            if current is not None:
                current.shutdown(cancel_futures=True)




def hello(prompt: str = "Say hello") -> LLMRequest:
    return LLMRequest("openai", "", prompt, max_output_tokens=20)


def test_default_executor_is_built_from_the_environment_once_and_reused(emulator_env: Emulator) -> None:
    ex = default_executor()
    assert default_executor() is ex  # re-running the notebook cell
    assert ex.providers == ("openai",) and ex.config.provider("openai").max_parallel == 1
    assert ex.run(hello(), timeout=10).text
    assert emulator_env.stats("openai").requests == 1


def test_threads_asking_at_once_share_one_executor(emulator_env: Emulator) -> None:
    barrier = threading.Barrier(8)
    got: list[Executor] = []

    def ask() -> None:
        barrier.wait(5)
        got.append(default_executor())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(got) == 8 and len({id(ex) for ex in got}) == 1


def test_a_shut_down_default_is_rebuilt_on_the_next_call(emulator_env: Emulator) -> None:
    first = default_executor()
    first.shutdown()
    second = default_executor()
    assert second is not first
    assert second.run(hello(), timeout=10).text


def test_default_executor_with_a_config_replaces_it_and_cancels_the_old_queue(emulator_env: Emulator) -> None:
    old = default_executor()
    emulator_env.set_limits("openai", latency_s=0.5)
    running = old.submit(hello("running"))
    assert wait_for(lambda: emulator_env.stats("openai").in_flight == 1)  # the provider call started
    queued = [old.submit(hello(f"queued {i}")) for i in range(3)]
    config = ExecutorConfig(providers={"openai": ProviderConfig(
        base_url=emulator_env.url("openai"), model="gpt-4o-mini", max_parallel=2)})
    new = default_executor(config)
    assert new is not old and default_executor() is new and new.config is config
    # The old one was shut down with cancel_futures=True and waited for: its queue is cancelled,
    # the call that had started finished before default_executor(config) returned.
    assert all(f.cancelled() for f in queued)
    assert running.done() and running.result().text
    assert repr(old).startswith("<Executor shutdown")
    assert emulator_env.stats("openai").requests == 1


def test_a_bad_config_leaves_the_default_in_place(emulator_env: Emulator) -> None:
    ex = default_executor()
    with pytest.raises(llm_executor.errors.ConfigError, match="LLM_EXECUTOR_FALLBACKS"):
        default_executor(ExecutorConfig(providers={"openai": ProviderConfig()}, fallbacks=("nobody",)))
    assert default_executor() is ex and repr(ex).startswith("<Executor running")


def _child(conn: Any) -> None:
    try:
        inherited = llm_executor.default._current
        ex = default_executor()
        text = ex.run(hello("from the child"), timeout=10).text
        conn.send((ex is not inherited, inherited is not None, bool(text)))
    except BaseException as exc:  # reported to the parent, which fails the test
        conn.send(repr(exc))
    finally:
        conn.close()


@pytest.mark.skipif(sys.platform == "win32", reason="fork")
def test_a_forked_child_builds_its_own_default(emulator_env: Emulator) -> None:
    parent = default_executor()
    parent.run(hello("warm the parent"), timeout=10)  # threads and connections in use
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send,))
    child.start()
    send.close()
    try:
        assert receive.poll(30), "the child did not answer"
        assert receive.recv() == (True, True, True)
    finally:
        child.join(10)
        if child.is_alive():
            child.kill()
    assert default_executor() is parent  # the parent keeps its own
    assert parent.run(hello("parent again"), timeout=10).text


# -- stats() as a table ------------------------------------------------------------------------


def _stats() -> ExecutorStats:
    return ExecutorStats({
        "openai": ProviderStats("openai", queued=3, in_flight=2, submitted=20, completed=14, failed=1,
                                failed_by_error={"RateLimitedError": 1}, latency_ms_p50=812.4, max_parallel=4,
                                max_in_flight=4, qps=5.0, max_starts_1s=5),
        "<mine>": ProviderStats("<mine>"),
    })


def test_stats_render_as_an_html_table_in_jupyter() -> None:
    html = _stats()._repr_html_()
    assert html.startswith('<table class="llm-executor-stats">') and html.count("<tr>") == 3
    assert "<td>openai</td>" in html and "<td>4 / 4</td>" in html and "<td>812</td>" in html
    assert "<td>RateLimitedError 1</td>" in html
    assert "&lt;mine&gt;" in html and "<mine>" not in html  # names are escaped
    assert _stats()["openai"]._repr_html_().count("<tr>") == 2  # one provider: header + its row


def test_stats_print_as_a_text_table() -> None:
    lines = str(_stats()).splitlines()
    assert len(lines) == 3 and lines[0].split()[:3] == ["provider", "queued", "in"]
    assert lines[1].split()[:6] == ["openai", "3", "2", "20", "14", "1"]
    pretty = pytest.importorskip("IPython.lib.pretty")
    assert pretty.pretty(_stats()) == str(_stats())
    assert repr(_stats()).startswith("ExecutorStats({'openai': ProviderStats(")  # repr stays exact data
