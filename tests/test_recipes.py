"""The runnable recipes of docs/recipes.md run as documented (small sizes), as a user would run them.

Each example runs as a script in a subprocess with the repository on PYTHONPATH; the Flask and
FastAPI recipes run under real gunicorn and uvicorn in tests/test_web_servers.py, the notebook in a
real Jupyter kernel in tests/test_notebook.py.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str, timeout_s: float = 120,
                env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLM_EXECUTOR_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    base.update(env or {})
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=base, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


@pytest.mark.parametrize(("mode", "env"), [("map", {}), ("fan_out", {}),
                                           ("submit", {"LLM_EXECUTOR_BACKPRESSURE": "block"})])
def test_etl_migration_enriches_every_row(mode: str, env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "enriched.jsonl"
    done = run_example("etl_migration.py", "--rows", "250", "--mode", mode, "--out", str(out), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"250 rows: 250 enriched, 0 failed (mode {mode})" in done.stdout
    lines = out.read_text().splitlines()
    assert len(lines) == 250 and '"category": "software"' in lines[1]


def test_etl_migration_submit_loop_trips_the_default_fail_fast_queue() -> None:
    done = run_example("etl_migration.py", "--rows", "250", "--mode", "submit")
    assert done.returncode == 1
    match = re.search(r"QueueFullError: .* \(at row (\d+) of 250\)", done.stderr)
    assert match, done.stderr
    assert 100 <= int(match.group(1)) <= 120  # QUEUE_SIZE 100 waiting + up to MAX_PARALLEL 8 started
    assert "--mode map or fan_out, or LLM_EXECUTOR_BACKPRESSURE=block" in done.stderr


@pytest.mark.parametrize("mode", ["map", "fan_out"])
def test_etl_migration_keeps_going_past_failed_rows(mode: str) -> None:
    done = run_example("etl_migration.py", "--rows", "250", "--mode", mode, "--fault-rate", "0.1")
    assert done.returncode == 1, done.stdout + done.stderr
    match = re.search(rf"250 rows: (\d+) enriched, (\d+) failed \(mode {mode}\)", done.stdout)
    assert match and int(match.group(2)) > 0 and int(match.group(1)) + int(match.group(2)) == 250
    assert re.search(r"row \d+: ProviderError", done.stdout)


def _redis_or_skip() -> None:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return
    except OSError:
        pass
    if os.environ.get("LLM_EXECUTOR_REQUIRE_REDIS") == "1":
        pytest.fail("LLM_EXECUTOR_REQUIRE_REDIS=1 but no Redis answers at 127.0.0.1:6379")
    pytest.skip("the Celery recipe needs a Redis at 127.0.0.1:6379")


@pytest.mark.slow
def test_celery_recipe_runs_a_real_worker_and_retries_overload() -> None:
    pytest.importorskip("celery")
    _redis_or_skip()
    done = run_example("celery_app.py", "--tasks", "24", "--timeout", "90", timeout_s=150)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    match = re.search(r"24/24 tasks done by 1 worker process in [\d.]+s; (\d+) went back to the broker after "
                      r"QueueFullError; every summary present: True", done.stdout)
    assert match, done.stdout[-2000:]
    assert int(match.group(1)) > 0  # QUEUE_SIZE 2 under 8 worker threads: overload became Celery retries
