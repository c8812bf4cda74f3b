"""SubmissionWindow on its own, through a fake ``submit``: the contract Executor.map and fan_out rely on."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from llm_executor.errors import InvalidRequestError, QueueFullError
from llm_executor.window import Settled, SubmissionWindow


class FakeSubmit:
    """A ``Submit`` whose Futures finish at once with ``"r:<request>"``, unless held or refused.

    Args:
        hold: requests whose Future stays pending until the test finishes it.
        capacity: refuse with QueueFullError while this many Futures are pending.
        refuse_first: refuse the first N calls with QueueFullError whatever the load.
        invalid: requests rejected with InvalidRequestError.
        hint_s: the retry_after_s of the QueueFullErrors.
    """

    def __init__(self, *, hold: tuple[str, ...] = (), capacity: int | None = None, refuse_first: int = 0,
                 invalid: tuple[str, ...] = (), hint_s: float | None = 0.0) -> None:
        self.hold, self.capacity, self.refuse_left, self.invalid, self.hint_s = (
            set(hold), capacity, refuse_first, set(invalid), hint_s)
        self.calls: list[tuple[str, bool, float | None]] = []
        self.accepted: list[str] = []
        self.futures: dict[str, Future[str]] = {}
        self.max_pending = 0
        self.all_submitted = threading.Event()
        self.expect: int | None = None

    def pending(self) -> int:
        return sum(1 for f in self.futures.values() if not f.done())

    def __call__(self, request: str, /, *, block: bool, block_timeout: float | None) -> Future[str]:
        self.calls.append((request, block, block_timeout))
        if request in self.invalid:
            raise InvalidRequestError(f"bad request {request}", field="prompt")
        if self.refuse_left > 0 or (self.capacity is not None and self.pending() >= self.capacity):
            self.refuse_left = max(0, self.refuse_left - 1)
            raise QueueFullError("queue is full", retry_after_s=self.hint_s)
        future: Future[str] = Future()
        self.futures[request] = future
        self.accepted.append(request)
        if request not in self.hold:
            future.set_running_or_notify_cancel()
            future.set_result(f"r:{request}")
        self.max_pending = max(self.max_pending, self.pending())
        if self.expect is not None and len(self.accepted) >= self.expect:
            self.all_submitted.set()
        return future

    def finish(self, request: str) -> None:
        future = self.futures[request]
        if future.set_running_or_notify_cancel():
            future.set_result(f"r:{request}")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def results(outcomes: list[Settled[str, str]]) -> list[tuple[int, str]]:
    return [(s.index, s.future.result(0)) for s in outcomes]


def test_in_order_yields_input_order_though_the_head_finishes_last() -> None:
    submit = FakeSubmit(hold=("p0",))
    submit.expect = 4
    releaser = threading.Thread(target=lambda: submit.all_submitted.wait(5) and submit.finish("p0"))
    releaser.start()
    out = list(SubmissionWindow([f"p{i}" for i in range(4)], submit, window=8).in_order())
    releaser.join(5)
    assert results(out) == [(0, "r:p0"), (1, "r:p1"), (2, "r:p2"), (3, "r:p3")]
    assert [s.item for s in out] == ["p0", "p1", "p2", "p3"]


def test_as_completed_yields_what_finished_first() -> None:
    submit = FakeSubmit(hold=("p0",))
    seen = []
    for settled in SubmissionWindow([f"p{i}" for i in range(4)], submit, window=8).as_completed():
        seen.append(settled.index)
        if settled.index == 3:  # everything else is out: now let the first one finish
            submit.finish("p0")
    assert seen == [1, 2, 3, 0]


def test_make_request_builds_each_request_once_in_input_order() -> None:
    built: list[int] = []

    def make(i: int) -> str:
        built.append(i)
        return f"req{i}"
    out = list(SubmissionWindow(range(5), FakeSubmit(), make, window=2).in_order())
    assert built == [0, 1, 2, 3, 4]
    assert [s.future.result(0) for s in out] == [f"r:req{i}" for i in range(5)]
    assert [s.item for s in out] == [0, 1, 2, 3, 4]


def test_the_input_is_read_lazily_and_never_more_than_window_is_outstanding() -> None:
    submit = FakeSubmit(hold=tuple(f"p{i}" for i in range(100)))
    window = SubmissionWindow((f"p{i}" for i in itertools.count()), submit, window=3)
    outcomes = window.as_completed()
    pump = threading.Thread(target=lambda: [submit.finish(f"p{i}") for i in range(3)])
    submit.expect = 3
    pump_started = threading.Thread(target=lambda: submit.all_submitted.wait(5) and pump.start())
    pump_started.start()
    first = next(outcomes)  # an endless input: only a lazy reader gets here
    assert first.index in (0, 1, 2)
    assert window.read <= 4 and submit.max_pending <= 3
    outcomes.close()
    pump_started.join(5)
    pump.join(5)
    assert submit.max_pending <= 3


def test_a_bad_item_fails_its_own_future_with_isolate_errors() -> None:
    def make(i: int) -> str:
        if i == 1:
            raise KeyError("no such field")
        return f"p{i}"
    submit = FakeSubmit(invalid=("p2",))
    out = list(SubmissionWindow(range(4), submit, make, window=2, isolate_errors=True).in_order())
    assert [s.index for s in out] == [0, 1, 2, 3]
    assert isinstance(out[1].future.exception(0), KeyError)
    assert isinstance(out[2].future.exception(0), InvalidRequestError)
    assert out[3].future.result(0) == "r:p3"


def test_without_isolate_errors_a_bad_item_stops_the_loop_and_close_cancels_the_rest() -> None:
    submit = FakeSubmit(hold=("p0",), invalid=("p2",))
    window = SubmissionWindow([f"p{i}" for i in range(5)], submit, window=5)
    with pytest.raises(InvalidRequestError, match="bad request p2"):
        list(window.in_order())
    left = window.close()
    assert [s.index for s in left] == [0, 1]
    assert left[0].future.cancelled() and left[1].future.result(0) == "r:p1"
    assert submit.accepted == ["p0", "p1"]  # nothing after the bad item was submitted


def test_a_full_queue_waits_for_our_own_requests_then_submits_the_same_request_again() -> None:
    # A fail-fast submit with room for 2: the window (4) must wait for its own requests to finish.
    submit = FakeSubmit(capacity=2, hold=("p0", "p1"), hint_s=30.0)
    submit.expect = 2
    finisher = threading.Thread(target=lambda: submit.all_submitted.wait(5) and [submit.finish(f"p{i}")
                                                                                 for i in range(2)])
    finisher.start()
    window = SubmissionWindow([f"p{i}" for i in range(6)], submit, window=4, block=False)
    seen = [settled.index for settled in window.as_completed()]
    finisher.join(5)
    assert sorted(seen) == list(range(6))
    assert submit.accepted == [f"p{i}" for i in range(6)]  # each once, in input order
    assert [c[0] for c in submit.calls].count("p2") >= 2  # refused while p0 and p1 ran, then again
    assert all(block is False for _, block, _ in submit.calls)
    assert submit.max_pending <= 2


def test_a_queue_filled_by_others_is_tried_again_without_sitting_out_a_long_hint() -> None:
    # Nothing of ours is outstanding, and the hint says 30 s: the window looks again within 0.5 s.
    submit = FakeSubmit(refuse_first=2, hint_s=30.0)
    box: list[list[Settled[str, str]]] = []
    worker = threading.Thread(target=lambda: box.append(list(SubmissionWindow(["a"], submit, window=1).in_order())))
    worker.start()
    worker.join(10)
    assert not worker.is_alive() and results(box[0]) == [(0, "r:a")]
    assert [c[0] for c in submit.calls] == ["a", "a", "a"]


def test_submit_gets_block_and_the_time_left_of_the_timeout() -> None:
    clock = Clock()
    submit = FakeSubmit()
    window = SubmissionWindow(["a", "b"], submit, window=2, timeout=10.0, clock=clock)
    clock.now += 4.0
    list(window.in_order())
    assert submit.calls == [("a", True, 6.0), ("b", True, 6.0)]
    submit2 = FakeSubmit()
    list(SubmissionWindow(["a"], submit2, window=1, block=False).in_order())
    assert submit2.calls == [("a", False, None)]


def test_timeout_raises_when_waiting_for_an_unfinished_result_but_yields_ready_ones() -> None:
    clock = Clock()
    submit = FakeSubmit(hold=("p1",))
    window = SubmissionWindow(["p0", "p1", "p2"], submit, window=3, timeout=5.0, label="map()", clock=clock)
    outcomes = window.in_order()
    clock.now += 6.0  # the deadline has passed before anything was read
    with pytest.raises(TimeoutError, match=r"^map\(\) timeout of 5.0s passed"):
        next(outcomes)
    assert submit.calls == []  # nothing is read or submitted after the deadline
    clock2 = Clock()
    submit2 = FakeSubmit(hold=("p1",))
    window2 = SubmissionWindow(["p0", "p1", "p2"], submit2, window=3, timeout=5.0, clock=clock2)
    outcomes2 = window2.in_order()
    first = next(outcomes2)
    clock2.now += 6.0
    assert first.future.result(0) == "r:p0"
    with pytest.raises(TimeoutError):
        next(outcomes2)  # p1 is not done: concurrent.futures.map semantics
    left = window2.close()
    assert [s.index for s in left] == [1, 2]
    assert left[0].future.cancelled() and left[1].future.result(0) == "r:p2"  # p2 had finished


def test_timeout_while_the_queue_is_full_fails_the_held_item_with_timeout_error() -> None:
    clock = Clock()

    class Refusing(FakeSubmit):
        def __call__(self, request: str, /, *, block: bool, block_timeout: float | None) -> Future[str]:
            clock.now += 3.0  # each blocked attempt uses up time
            return super().__call__(request, block=block, block_timeout=block_timeout)
    submit = Refusing(refuse_first=100, hint_s=0.0)
    window = SubmissionWindow(["a", "b"], submit, window=2, timeout=5.0, clock=clock)
    with pytest.raises(TimeoutError):
        list(window.as_completed())
    left = window.close()
    assert [s.index for s in left] == [0]
    assert isinstance(left[0].future.exception(0), TimeoutError)
    assert window.read == 1  # "b" was never read


def test_leaving_the_iteration_early_cancels_what_has_not_started() -> None:
    submit = FakeSubmit(hold=("p1", "p2"))
    window = SubmissionWindow([f"p{i}" for i in range(10)], submit, window=3)
    for settled in window.in_order():
        assert settled.index == 0
        break
    left = window.close()
    assert [s.index for s in left] == [1, 2]
    assert left[0].future.cancelled() and left[1].future.cancelled()
    assert submit.accepted == ["p0", "p1", "p2"]  # the window was full: p3 was never read
    assert window.read == 3
    assert window.close() is left  # idempotent


def test_an_interrupt_during_submit_hands_the_item_back_cancelled() -> None:
    class Interrupting(FakeSubmit):
        def __call__(self, request: str, /, *, block: bool, block_timeout: float | None) -> Future[str]:
            if request == "p2":
                raise KeyboardInterrupt
            return super().__call__(request, block=block, block_timeout=block_timeout)
    submit = Interrupting(hold=("p0",))
    window = SubmissionWindow([f"p{i}" for i in range(5)], submit, window=5, isolate_errors=True)
    with pytest.raises(KeyboardInterrupt):
        list(window.in_order())
    left = window.close()
    assert [s.index for s in left] == [0, 1, 2]
    assert left[0].future.cancelled() and left[1].future.result(0) == "r:p1" and left[2].future.cancelled()


def test_an_interrupt_in_make_request_hands_the_item_back_cancelled() -> None:
    def make(i: int) -> str:
        if i == 1:
            raise KeyboardInterrupt
        return f"p{i}"
    window = SubmissionWindow(range(3), FakeSubmit(hold=("p0",)), make, window=3, isolate_errors=True)
    with pytest.raises(KeyboardInterrupt):
        list(window.as_completed())
    assert [(s.index, s.future.cancelled()) for s in window.close()] == [(0, True), (1, True)]


def test_progress_bar_on_a_non_terminal_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    out = list(SubmissionWindow(["a", "b"], FakeSubmit(), window=2, progress="work").in_order())
    assert len(out) == 2 and capsys.readouterr().err == ""


def test_bad_arguments_and_a_second_iteration_are_refused() -> None:
    with pytest.raises(ValueError, match="window"):
        SubmissionWindow(["a"], FakeSubmit(), window=0)
    with pytest.raises(ValueError, match="timeout"):
        SubmissionWindow(["a"], FakeSubmit(), window=1, timeout=-1)
    window = SubmissionWindow(["a"], FakeSubmit(), window=1)
    list(window.in_order())
    with pytest.raises(RuntimeError, match="once"):
        list(window.as_completed())


def test_an_empty_input_yields_nothing() -> None:
    submit = FakeSubmit()
    it: Iterator[str] = iter(())
    assert list(SubmissionWindow(it, submit, window=1).as_completed()) == []
    assert submit.calls == []
