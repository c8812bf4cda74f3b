"""examples/notebook.ipynb run in a real Jupyter kernel (nbclient + ipykernel), as a user runs it.

The test drives the notebook cell by cell, like a user clicking: it runs the cell that builds an
Executor twice (the first executor must be collected — queue cancelled, threads ended — or two
executors would break the emulator's concurrency limit), interrupts ``[f.result() for f in futures]``
(the waiting stops, the requests go on and are served), interrupts the kernel while ``ex.map``
runs (what had not started must be cancelled and never reach the provider), and checks that
``ex.stats()`` displays as an HTML table. Probe cells (test-only, printing JSON) read the kernel's
state; the emulator runs in this process so its counters are read directly.

The kernel is the running interpreter (a kernel spec written to a temporary JUPYTER_PATH), so it
works in the fresh venv ``.ci/run`` creates. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from llm_executor.testing import Emulator, ProviderSim

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "notebook.ipynb"
LIMIT = 4  # the emulator's concurrency cap and the executor's MAX_PARALLEL
KERNEL = "llm-executor-test"

PROBE_FIRST = """
import weakref
first_ref = weakref.ref(ex)
first_threads = ex._engine.threads()
first_futures = futures
"""

PROBE_AFTER_REBUILD = """
import json, time
end = time.monotonic() + 10
while any(t.is_alive() for t in first_threads) and time.monotonic() < end:
    time.sleep(0.05)
print("PROBE", json.dumps({
    "collected": first_ref() is None,
    "threads_before": len(first_threads),
    "threads_alive": sum(t.is_alive() for t in first_threads),
    "cancelled": sum(f.cancelled() for f in first_futures),
    "served": sum(f.done() and not f.cancelled() and f.exception() is None for f in first_futures),
    "pending": sum(not f.done() for f in first_futures),
}))
"""

PROBE_AFTER_RESULTS = """
interrupted_at = sum(f.done() for f in futures)
end = time.monotonic() + 10
while not all(f.done() for f in futures) and time.monotonic() < end:
    time.sleep(0.05)
print("PROBE", json.dumps({"done_at_interrupt": interrupted_at, "served": sum(
    f.done() and not f.cancelled() and f.exception() is None for f in futures)}))
"""

PROBE_DEFAULT = """
shared_id = id(ex)
"""

PROBE_DEFAULT_AGAIN = """
print("PROBE", json.dumps({"same": id(ex) == shared_id}))
"""

PROBE_AFTER_MAP = """
end = time.monotonic() + 10
while (ex.stats()["openai"].in_flight or ex.stats()["openai"].queued) and time.monotonic() < end:
    time.sleep(0.05)
s = ex.stats()["openai"]
print("PROBE", json.dumps({"defined": "summaries" in globals(), "submitted": s.submitted,
                           "cancelled": s.cancelled, "completed": s.completed, "failed": s.failed,
                           "queued": s.queued, "in_flight": s.in_flight}))
map_threads = ex._engine.threads()
"""

PROBE_AFTER_SHUTDOWN = """
print("PROBE", json.dumps({"threads_alive": sum(t.is_alive() for t in map_threads)}))
"""


def _probe(cell: Any) -> dict[str, Any]:
    text = "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")
    lines = [line for line in text.splitlines() if line.startswith("PROBE ")]
    assert lines, f"no probe output: {cell.outputs}"
    return dict(json.loads(lines[-1][len("PROBE "):]))


def _kernel_spec(root: Path) -> None:
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "llm_executor test", "language": "python"}))


async def _drive(nb: Any, env: dict[str, str], emu: Emulator) -> dict[str, Any]:
    """Run the notebook's cells in the order a user would click them; return what the probes saw."""
    cells = {tag: cell for cell in nb.cells for tag in cell.metadata.get("tags", [])}

    def cell(tag: str) -> Any:
        copy = nbformat.from_dict(cells[tag])  # a copy: a cell run twice keeps both outputs
        copy.id = uuid.uuid4().hex[:8]
        return copy

    def probe(source: str) -> Any:
        return nbformat.v4.new_code_cell(source.strip())

    def interrupted(tag: str) -> Any:
        copy = cell(tag)
        copy.metadata["tags"] = [tag, "raises-exception"]  # the test interrupts it
        return copy

    session = [
        # Build, submit 40, then run the build cell again while the first executor is busy.
        ("build", cell("build")), ("submit", cell("submit")), ("probe", probe(PROBE_FIRST)),
        ("build", cell("build")), ("rebuild", probe(PROBE_AFTER_REBUILD)),
        # Interrupting `[f.result() for f in futures]` stops the waiting, not the requests.
        ("submit", cell("submit")), ("results_interrupted", interrupted("results")),
        ("after_results", probe(PROBE_AFTER_RESULTS)), ("results", cell("results")),
        # The shared executor: the same object when its cell runs again.
        ("default", cell("default")), ("probe", probe(PROBE_DEFAULT)), ("default", cell("default")),
        ("default_again", probe(PROBE_DEFAULT_AGAIN)),
        ("map_interrupted", interrupted("map")), ("after_map", probe(PROBE_AFTER_MAP)),
        ("stats", cell("stats")), ("cleanup", cell("cleanup")), ("after_shutdown", probe(PROBE_AFTER_SHUTDOWN)),
    ]
    run_nb = nbformat.v4.new_notebook(cells=[c for _, c in session], metadata=nb.metadata)
    client = nbclient.NotebookClient(run_nb, kernel_name=KERNEL, timeout=60, startup_timeout=60,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    out: dict[str, Any] = {}
    async with client.async_setup_kernel(env=env):
        for index, (name, c) in enumerate(session):
            if not name.endswith("_interrupted"):
                await client.async_execute_cell(c, index)
                continue
            # Interrupt the kernel while the cell runs (the stop button sends the same SIGINT).
            before = emu.stats("openai").requests
            task = asyncio.create_task(client.async_execute_cell(c, index))
            end = time.monotonic() + 20
            while emu.stats("openai").requests < before + 2 * LIMIT and time.monotonic() < end:
                await asyncio.sleep(0.02)
            assert not task.done(), f"{name}: the cell finished before the interrupt"
            await client.km.interrupt_kernel()
            await asyncio.wait_for(task, 30)
    for name, c in session:
        if name in ("rebuild", "after_results", "default_again", "after_map", "after_shutdown"):
            out[name] = _probe(c)
    by_name = dict(session)
    out["results"] = "".join(o.get("text", "") for o in by_name["results"].outputs if o.output_type == "stream")
    for name in ("results_interrupted", "map_interrupted"):
        out[name] = [o.get("ename") for o in by_name[name].outputs if o.output_type == "error"]
    data = [o["data"] for o in by_name["stats"].outputs if "data" in o]
    out["stats_html"] = [d.get("text/html", "") for d in data]
    out["stats_text"] = [d.get("text/plain", "") for d in data]
    return out


@pytest.mark.slow
def test_notebook_rerun_interrupt_and_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _kernel_spec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    with Emulator(providers={"openai": ProviderSim(latency_s=0.2, max_concurrency=LIMIT)}) as emu:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_EXECUTOR_")}
        env.update({  # what the notebook's emulator cell sets, pointing at this test's emulator
            "LLM_EXECUTOR_PROVIDERS": "openai", "LLM_EXECUTOR_OPENAI_BASE_URL": emu.url("openai"),
            "LLM_EXECUTOR_OPENAI_MODEL": "gpt-4o-mini", "LLM_EXECUTOR_OPENAI_MAX_PARALLEL": str(LIMIT),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH")])),
        })
        seen = asyncio.run(asyncio.wait_for(_drive(nb, env, emu), 120))
        assert emu.wait_idle(10)
        served = emu.stats("openai")

    rebuild = seen["rebuild"]
    # The first executor was collected when `ex` was rebound: its queue cancelled, the calls that
    # had started finished, and every one of its threads ended.
    assert rebuild["collected"] is True
    assert rebuild["threads_before"] >= LIMIT and rebuild["threads_alive"] == 0
    assert rebuild["pending"] == 0 and rebuild["cancelled"] >= 40 - 2 * LIMIT
    assert rebuild["cancelled"] + rebuild["served"] == 40
    # The interrupted results cell: KeyboardInterrupt, yet every request went on and was served.
    assert seen["results_interrupted"] == ["KeyboardInterrupt"]
    assert seen["after_results"]["done_at_interrupt"] < 40 and seen["after_results"]["served"] == 40
    assert "40 responses;" in seen["results"]
    assert seen["default_again"]["same"] is True  # default_executor() in a re-run cell: the same object

    # Interrupted map: KeyboardInterrupt in the cell; what had not started was cancelled.
    assert seen["map_interrupted"] == ["KeyboardInterrupt"]
    m = seen["after_map"]
    assert m["defined"] is False  # the list never completed
    assert m["cancelled"] > 0 and m["queued"] == 0 and m["in_flight"] == 0
    assert m["completed"] + m["failed"] + m["cancelled"] == m["submitted"]
    assert m["completed"] + m["failed"] < 200
    assert seen["after_shutdown"] == {"threads_alive": 0}

    # The provider saw exactly the requests that were not cancelled, never more than LIMIT at once
    # (two live executors would have made it 2 x LIMIT, and the emulator refuses past LIMIT).
    assert served.requests == rebuild["served"] + 40 + m["completed"] + m["failed"]
    assert served.max_concurrency <= LIMIT and set(served.statuses) == {200}, served

    html = seen["stats_html"]
    assert len(html) == 1 and html[0].startswith('<table class="llm-executor-stats">')
    assert "<td>openai</td>" in html[0] and f"<td>{m['cancelled']}</td>" in html[0]
    assert seen["stats_text"][0].startswith("provider")
