"""Fixtures shared by every test module (the fakes themselves live in tests/fakes.py), and the
collector's set-up for the suite.

Many tests compare the executor's pacing with what an in-process emulator saw, within a window
margin of 20 ms (the default). A gen-2 collection stops every thread; in this process it walks
every object the earlier tests left alive (max RSS reaches ~540 MB), and one such pause in CI took
352 ms and failed a limits check (docs/failure-modes.md). Before each test the heap is collected
and frozen (``gc.freeze``), so the test's own collections walk only its own objects. Collections
longer than ``LONG_PAUSE_MS`` are still listed at the end of the run, with the test they hit
(``llm_executor.testing.GcPauses``).
"""

from __future__ import annotations

import gc
from typing import Any

import pytest

from llm_executor.testing import GcPauses
from tests.fakes import fake, gate

__all__ = ["fake", "gate"]

LONG_PAUSE_MS = 50.0

_pauses = GcPauses(LONG_PAUSE_MS)  # label: the running test's id; None while collecting (not listed)


def pytest_configure(config: pytest.Config) -> None:
    _pauses.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    _pauses.stop()
    gc.unfreeze()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _pauses.label = None  # this hook's own collection between tests is not a pause in one
    gc.collect()
    gc.freeze()
    _pauses.label = item.nodeid


def pytest_terminal_summary(terminalreporter: Any) -> None:
    long = sorted((p for p in _pauses.long if p[2] is not None), reverse=True)
    if long:
        # A collection's time includes the finalizers it runs (__del__, weakref callbacks), which
        # may release the GIL, and a test's own gc.collect() is listed too (the soak's, after its
        # run, for its memory figure): a long one here is not always a pause inside a test's run.
        terminalreporter.write_line(f"garbage collections longer than {LONG_PAUSE_MS:.0f} ms "
                                    "(finalizers and explicit gc.collect() calls included):")
        for ms, generation, test in long[:10]:
            terminalreporter.write_line(f"  {ms:6.0f} ms  gen {generation}  {test}")
