"""Fixtures shared by every test module (the fakes themselves live in tests/fakes.py), and the
collector's set-up for the suite.

Many tests compare the executor's pacing with what an in-process emulator saw, within a window
margin of 20 ms (the default). A gen-2 collection stops every thread; in this process it walks
every object the earlier tests left alive (max RSS reaches ~540 MB), and one such pause in CI took
352 ms and failed a limits check (docs/failure-modes.md). Before each test the heap is collected
and frozen (``gc.freeze``), so the test's own collections walk only its own objects. Pauses longer
than ``LONG_PAUSE_MS`` are still listed at the end of the run, with the test they hit.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import pytest

from tests.fakes import fake, gate

__all__ = ["fake", "gate"]

LONG_PAUSE_MS = 50.0


class _Pauses:
    def __init__(self) -> None:
        self.test: str | None = None  # None while pytest imports and collects
        self.explicit = False  # this file's own gc.collect() between tests: not a pause in one
        self.started = 0.0
        self.long: list[tuple[float, int, str]] = []

    def callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        ms = (time.perf_counter() - self.started) * 1000.0
        if ms > LONG_PAUSE_MS and self.test is not None and not self.explicit:
            self.long.append((ms, int(info.get("generation", -1)), self.test))


_pauses = _Pauses()


def pytest_configure(config: pytest.Config) -> None:
    gc.callbacks.append(_pauses.callback)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _pauses.callback in gc.callbacks:
        gc.callbacks.remove(_pauses.callback)
    gc.unfreeze()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _pauses.test = item.nodeid
    _pauses.explicit = True
    try:
        gc.collect()
    finally:
        _pauses.explicit = False
    gc.freeze()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _pauses.long:
        # A collection's time includes the finalizers it runs (__del__, weakref callbacks), which
        # may release the GIL, and a test's own gc.collect() is listed too (the soak's, after its
        # run, for its memory figure): a long one here is not always a pause inside a test's run.
        terminalreporter.write_line(f"garbage collections longer than {LONG_PAUSE_MS:.0f} ms "
                                    "(finalizers and explicit gc.collect() calls included):")
        for ms, generation, test in sorted(_pauses.long, reverse=True)[:10]:
            terminalreporter.write_line(f"  {ms:6.0f} ms  gen {generation}  {test}")
