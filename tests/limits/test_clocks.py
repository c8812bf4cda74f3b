"""Hosts whose clocks disagree, and one whose clock steps mid-run, still keep one QPS at the provider.

Four processes share QPS through the store, each running one Executor against the emulator
(which counts arrivals on its own clock). Their wall clocks read 0.5 s behind, right, 0.5 s
ahead, and the fourth steps 1 s ahead halfway through the run, as NTP does to a host that
drifted (each child patches ``time.time`` before importing the library; see ``_clock_child``
for why not libfaketime). The store computes every window on its own clock
(Redis ``TIME`` inside the scripts; SQLite on the host's monotonic clock), so the emulator never
sees more than QPS starts in a 1 s window. (The previous Redis backend stamped entries with each
process's wall clock: the step let the fourth process count a window of its own.)

Only the wall clock is skewed: NTP never steps the monotonic clock, and our Redis path never
compares monotonic clocks across processes.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llm_executor.testing import Emulator, ProviderSim

ROOT = Path(__file__).resolve().parents[2]
QPS, RUN_S = 10, 4.0


def _lines(child: subprocess.Popen[str]) -> queue.SimpleQueue[tuple[float, str]]:
    """The child's stdout lines with our wall time on arrival, read by a thread so every wait can time out."""
    lines: queue.SimpleQueue[tuple[float, str]] = queue.SimpleQueue()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            lines.put((time.time(), line))

    threading.Thread(target=read, daemon=True).start()
    return lines


@pytest.mark.slow
def test_skewed_and_stepping_clocks_keep_one_qps_at_the_provider(shared_url: str, namespace: str,
                                                                 tmp_path: Path) -> None:
    step_file = tmp_path / "step"
    step_file.write_text("0\n")
    clocks = [{"CLOCK_TEST_SKEW_S": "-0.5"}, {"CLOCK_TEST_SKEW_S": "0"}, {"CLOCK_TEST_SKEW_S": "0.5"},
              {"CLOCK_TEST_STEP_FILE": str(step_file)}]
    with Emulator(providers={"openai": ProviderSim(rps=QPS, latency_s=0.02)}) as emu:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_EXECUTOR_", "CLOCK_TEST_"))}
        base.update({
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "LLM_EXECUTOR_PROVIDERS": "openai", "OPENAI_API_KEY": "test-key",
            "LLM_EXECUTOR_RATE_BACKEND": shared_url, "LLM_EXECUTOR_NAMESPACE": namespace,
            "LLM_EXECUTOR_OPENAI_BASE_URL": emu.url("openai"), "LLM_EXECUTOR_OPENAI_QPS": str(QPS),
            # One connection per process, warmed before the run: a new connection (and the
            # server thread it spawns) reaches the emulator tens of ms after its token on a busy
            # machine, past the window margin; that is jitter, not the clocks under test.
            "LLM_EXECUTOR_OPENAI_MAX_PARALLEL": "1", "LLM_EXECUTOR_OPENAI_MAX_RETRIES": "0",
            "LLM_EXECUTOR_QUEUE_SIZE": "0",
            # Six busy processes on two cores: one request in ~400 reached the emulator more than
            # the default 20 ms margin later than the one a window before it (scheduling, not
            # clocks: it happened with every clock equal too). A wider margin keeps this test
            # about the clocks; the emulator's window stays exactly QPS in 1 s.
            "LLM_EXECUTOR_OPENAI_WINDOW_MARGIN_MS": "60",
        })
        children = [subprocess.Popen([sys.executable, "-m", "tests.limits._clock_child"], cwd=ROOT,
                                     env={**base, **clock}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True) for clock in clocks]
        outputs = [_lines(child) for child in children]
        try:
            skews = []
            for lines in outputs:
                received, line = lines.get(timeout=60)
                word, stamp = line.split()
                assert word == "ready"
                skews.append(float(stamp) - received)
            # The children's wall clocks disagree as configured.
            assert skews[0] < -0.3 and abs(skews[1]) < 0.2 and skews[2] > 0.3 and abs(skews[3]) < 0.2, skews
            time.sleep(1.1)  # the warm-up requests leave every window of the run
            for child in children:
                assert child.stdin is not None
                child.stdin.write(f"go {RUN_S}\n")
                child.stdin.flush()
            time.sleep(RUN_S / 2)
            step_file.write_text("1\n")  # the fourth host's clock steps one second ahead
            answered = 0
            for lines in outputs:
                received, line = lines.get(timeout=RUN_S + 60)
                word, ok, failed, stamp, errors = line.split()
                assert word == "done" and int(failed) == 0, f"{failed} requests failed in a child: {errors}"
                answered += int(ok)
            assert float(stamp) - received > 0.7, "the fourth clock did not step"
        finally:
            for child in children:
                child.kill()
                child.wait(10)
        stats = emu.stats("openai")
    assert stats.max_requests_per_1s <= QPS, f"{stats.max_requests_per_1s} arrivals in one 1 s window, QPS {QPS}"
    assert stats.statuses.get(429, 0) == 0
    assert answered >= 0.8 * QPS * RUN_S, f"only {answered} answered in {RUN_S}s at QPS {QPS}"
    # (on the previous Redis backend the stepped process counted windows of its own: 429s here)
