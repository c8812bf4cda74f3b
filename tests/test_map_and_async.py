"""What a caller relies on from ``Executor.map`` and ``asubmit``/``arun`` (issue 14).

``map(fn, rows)`` as in ``concurrent.futures``: a bad row fails alone or is raised when reached,
``timeout`` counts from the call, stopping (also Ctrl-C) cancels what has not started, and the
progress bar never breaks a run whose stderr is a pipe. The async entry points never block the
event loop and cancel what their caller gave up on. Waits are Events with timeouts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from llm_executor import Executor, ExecutorConfig, LLMRequest, ProviderConfig
from llm_executor.errors import ContentBlockedError, InvalidRequestError, QueueFullError
from tests.fakes import FakeProvider, GateProvider, req, wait_for


def one(name: str = "fake", **kw: Any) -> ExecutorConfig:
    pcfg = {k: kw.pop(k) for k in ("max_parallel", "qps") if k in kw}
    return ExecutorConfig(providers={name: ProviderConfig(**pcfg)}, **kw)




class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- map(fn, rows): a bad row ---------------------------------------------------------------------


def _row_request(row: int) -> LLMRequest:
    if row == 1:
        raise KeyError("row 1 has no 'description'")
    return req(prompt="" if row == 2 else f"row {row}")


def _blocked_on_row_3(request: LLMRequest) -> Any:
    if request.prompt == "row 3":
        return ContentBlockedError("refused", provider="fake")
    return f"echo:{request.prompt}"


def test_map_return_exceptions_yields_each_bad_row_in_place_and_serves_the_rest() -> None:
    provider = FakeProvider(reply=_blocked_on_row_3)
    with Executor(one(), {"fake": provider}) as ex:
        out = list(ex.map(_row_request, range(6), return_exceptions=True))
        stats = ex.stats()["fake"]
    assert [type(x).__name__ for x in out] == ["LLMResponse", "KeyError", "InvalidRequestError",
                                               "ContentBlockedError", "LLMResponse", "LLMResponse"]
    assert isinstance(out[2], InvalidRequestError) and out[2].field == "prompt"
    assert [r.text for r in (out[0], out[4], out[5])] == ["echo:row 0", "echo:row 4", "echo:row 5"]
    # The rows fn or submit refused never reached the provider; the blocked one did, once.
    assert sorted(provider.prompts) == ["row 0", "row 3", "row 4", "row 5"]
    assert (stats.submitted, stats.completed, stats.failed) == (4, 3, 1)


def test_map_raises_a_bad_row_when_reached_after_the_rows_before_it(fake: FakeProvider) -> None:
    seen = []
    with Executor(one(), {"fake": fake}) as ex:
        with pytest.raises(KeyError, match="row 1"):
            for response in ex.map(_row_request, range(6)):
                seen.append(response.text)
    assert seen == ["echo:row 0"]  # like ThreadPoolExecutor.map: row 0 first, then row 1's error


def test_map_raises_an_invalid_row_as_invalid_request_error_when_reached(fake: FakeProvider) -> None:
    rows = ["a", "", "c"]
    with Executor(one(), {"fake": fake}) as ex:
        it = ex.map(lambda text: req(prompt=text), rows)
        assert next(it).text == "echo:a"
        with pytest.raises(InvalidRequestError, match="prompt"):
            next(it)


# -- timeout, as in concurrent.futures ------------------------------------------------------------


def test_map_timeout_raises_timeout_error_and_cancels_what_has_not_started(gate: GateProvider) -> None:
    with Executor(one("gate", max_parallel=1), {"gate": gate}) as ex:
        it = ex.map([req("gate", str(i)) for i in range(4)], timeout=0.2)
        with pytest.raises(concurrent.futures.TimeoutError, match=r"map\(\) timeout of 0.2s"):
            next(it)
        stats = ex.stats()["gate"]
        assert stats.cancelled == 3 and gate.prompts == ["0"]  # the queued three never reach it
        gate.gate.set()
    assert ex.stats()["gate"].completed == 1  # the running call finished


def test_map_timeout_counts_from_the_call_and_still_yields_responses_that_were_ready() -> None:
    release = threading.Event()

    def reply(request: LLMRequest) -> str:
        if request.prompt == "slow":
            assert release.wait(10)
        return f"echo:{request.prompt}"

    clock = FakeClock()
    with Executor(one(max_parallel=3), {"fake": FakeProvider(reply=reply)}, clock=clock) as ex:
        it = ex.map([req(prompt="fast0"), req(prompt="fast1"), req(prompt="slow")], timeout=60)
        assert next(it).text == "echo:fast0"
        assert wait_for(lambda: ex.stats()["fake"].completed == 2)
        clock.now += 61  # the timeout passed (on the executor's clock) while the caller was elsewhere
        assert next(it).text == "echo:fast1"  # ready: yielded even after the timeout
        # Not ready: raises at once. (Were the timeout not on the executor's clock, the slow reply,
        # released by this timer, would arrive first.)
        safety = threading.Timer(5, release.set)
        safety.start()
        try:
            with pytest.raises(TimeoutError):
                next(it)
        finally:
            safety.cancel()
            release.set()


# -- progress ----------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_map_progress_works_with_stderr_a_pipe_and_draws_on_a_terminal(monkeypatch: pytest.MonkeyPatch,
                                                                         fake: FakeProvider) -> None:
    with Executor(one(), {"fake": fake}) as ex:
        pipe = io.StringIO()
        monkeypatch.setattr("sys.stderr", pipe)
        texts = [r.text for r in ex.map(lambda i: req(prompt=str(i)), range(3), progress=True)]
        assert texts == ["echo:0", "echo:1", "echo:2"]
        assert pipe.getvalue() == ""  # tqdm hides itself: no bar in a log file or CI output

        terminal = _Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        out = list(ex.map(lambda i: req(prompt=str(i)), range(3), progress="summaries"))
        assert len(out) == 3
        assert "summaries" in terminal.getvalue() and "3/3" in terminal.getvalue()


# -- interruption ------------------------------------------------------------------------------


@pytest.fixture
def sigint_raises() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="needs pthread_kill")
@pytest.mark.usefixtures("sigint_raises")
def test_ctrl_c_while_map_waits_cancels_what_has_not_started(gate: GateProvider) -> None:
    assert threading.current_thread() is threading.main_thread()
    main = threading.main_thread().ident
    assert main is not None

    with Executor(one("gate", max_parallel=1), {"gate": gate}) as ex:

        def press_ctrl_c() -> None:
            # Every row submitted and the first held by the gate: the map waits for a response.
            gate.wait_started()
            assert wait_for(lambda: ex.stats()["gate"].submitted == 6)
            signal.pthread_kill(main, signal.SIGINT)

        presser = threading.Thread(target=press_ctrl_c)
        presser.start()
        with pytest.raises(KeyboardInterrupt):
            list(ex.map(lambda i: req("gate", f"row {i}"), range(6)))
        presser.join(5)
        stats = ex.stats()["gate"]
        assert (stats.submitted, stats.cancelled, stats.queued) == (6, 5, 0)
        gate.gate.set()
    assert gate.prompts == ["row 0"]  # the provider never saw the cancelled rows
    assert ex.stats()["gate"].completed == 1  # the running call finished


def test_keyboard_interrupt_while_map_builds_a_row_cancels_what_has_not_started(gate: GateProvider) -> None:
    def make(i: int) -> LLMRequest:
        if i == 4:
            gate.wait_started()
            raise KeyboardInterrupt  # Ctrl-C landing while the window reads the next row
        return req("gate", f"row {i}")

    with Executor(one("gate", max_parallel=1), {"gate": gate}) as ex:
        with pytest.raises(KeyboardInterrupt):
            list(ex.map(make, range(6)))
        assert ex.stats()["gate"].cancelled == 3
        gate.gate.set()
    assert gate.prompts == ["row 0"]


# -- async ------------------------------------------------------------------------------------


def test_asubmit_under_block_raises_queue_full_when_block_timeout_passes(gate: GateProvider) -> None:
    config = one("gate", max_parallel=1, queue_size=1, backpressure="block", block_timeout=0.2)

    async def main(ex: Executor) -> int:
        await ex.asubmit(req("gate", "1"))
        await asyncio.to_thread(gate.wait_started)
        await ex.asubmit(req("gate", "2"))  # the one queue slot
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        with pytest.raises(QueueFullError, match=r"still full after 0.2s \(LLM_EXECUTOR_BLOCK_TIMEOUT\)") as info:
            await ex.asubmit(req("gate", "3"))
        tick_task.cancel()
        assert info.value.provider == "gate" and info.value.retry_after_s is not None
        return ticks

    with Executor(config, {"gate": gate}) as ex:
        ticks = asyncio.run(main(ex))
        assert ticks >= 5  # the loop ran while asubmit waited for room
        assert ex.stats()["gate"].submitted == 2
        gate.gate.set()
    assert gate.prompts == ["1", "2"]


def test_cancelling_the_task_awaiting_arun_cancels_a_request_not_started(gate: GateProvider) -> None:
    async def main(ex: Executor) -> str:
        first = asyncio.create_task(ex.arun(req("gate", "running")))
        await asyncio.to_thread(gate.wait_started)
        second = asyncio.create_task(ex.arun(req("gate", "queued")))
        while ex.stats()["gate"].queued == 0:  # admitted (asubmit runs at the task's first step)
            await asyncio.sleep(0)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert ex.stats()["gate"].cancelled == 1
        gate.gate.set()
        return (await first).text

    with Executor(one("gate", max_parallel=1), {"gate": gate}) as ex:
        assert asyncio.run(main(ex)) == "echo:running"
    assert gate.prompts == ["running"]


def test_arun_timeout_raises_and_cancels_the_request_if_not_started(gate: GateProvider) -> None:
    async def main(ex: Executor) -> None:
        running = await ex.asubmit(req("gate", "running"))
        with pytest.raises(TimeoutError):
            await ex.arun(req("gate", "queued"), timeout=0.05)
        assert ex.stats()["gate"].cancelled == 1
        gate.gate.set()
        assert (await asyncio.wrap_future(running)).text == "echo:running"

    with Executor(one("gate", max_parallel=1), {"gate": gate}) as ex:
        asyncio.run(main(ex))
    assert gate.prompts == ["running"]


def test_a_cancelled_async_waiter_does_not_swallow_the_next_free_slot(gate: GateProvider) -> None:
    config = one("gate", max_parallel=1, queue_size=1, backpressure="block", block_timeout=1)

    async def main(ex: Executor) -> None:
        await ex.asubmit(req("gate", "running"))
        await asyncio.to_thread(gate.wait_started)
        queued = await ex.asubmit(req("gate", "queued"))  # the one queue slot
        gave_up = asyncio.create_task(ex.asubmit(req("gate", "gave up")))
        while not ex._lanes["gate"]._room_watchers:  # waiting for room
            await asyncio.sleep(0)
        gave_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gave_up
        waiting = asyncio.create_task(ex.asubmit(req("gate", "waiting")))
        while len(ex._lanes["gate"]._room_watchers) < 2:
            await asyncio.sleep(0)
        assert queued.cancel()  # frees the slot: the live waiter must get it, well before block_timeout
        await asyncio.wait_for(waiting, 0.5)

    with Executor(config, {"gate": gate}) as ex:
        try:
            asyncio.run(main(ex))
        finally:
            gate.gate.set()
