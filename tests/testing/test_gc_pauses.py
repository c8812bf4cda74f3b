"""``llm_executor.testing.GcPauses``: the collector's passes, timed while registered."""

from __future__ import annotations

import gc

from llm_executor.testing import GcPauses


def test_passes_are_counted_labelled_and_no_longer_seen_after_stop() -> None:
    with GcPauses(threshold_ms=0.0) as pauses:
        pauses.label = "step one"
        gc.collect()
        pauses.label = "step two"
        gc.collect(0)
    assert pauses.callback not in gc.callbacks
    assert pauses.count >= 2 and pauses.longest_s > 0.0
    labels = [(generation, label) for _, generation, label in pauses.long]
    assert (2, "step one") in labels and (0, "step two") in labels
    seen = pauses.count
    gc.collect()
    assert pauses.count == seen


def test_only_passes_over_the_threshold_are_listed_and_start_is_idempotent() -> None:
    pauses = GcPauses(threshold_ms=60_000.0)
    pauses.start()
    pauses.start()
    try:
        assert gc.callbacks.count(pauses.callback) == 1
        gc.collect()
    finally:
        pauses.stop()
    assert pauses.count >= 1 and pauses.long == []
