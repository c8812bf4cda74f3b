"""Run an example web app under its real server and load it with many concurrent clients.

Used by tests/test_web_servers.py. A server is a ``ServerSpec``: a name and the command line that
serves the app on a given port. Adding a server (e.g. FastAPI under uvicorn) is one more
``ServerSpec`` in that test's ``SERVERS``; every server then gets the same load and assertions.
Everything binds 127.0.0.1 on a free port, every wait is bounded, and the server is stopped
(SIGTERM, then SIGKILL) however the test ends.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@dataclass(frozen=True)
class ServerSpec:
    """How to serve one example app: ``command(port)`` is the argv of a process serving it.

    ``health_within_s``: when set, every ``/health`` probe made during the load must answer within
    it (an async server whose handlers never block the event loop).
    """

    name: str
    command: Callable[[int], Sequence[str]]
    startup_s: float = 60.0
    health_within_s: float | None = None


@dataclass(frozen=True)
class Reply:
    """One client's outcome: the HTTP status (0 = no answer), Retry-After, JSON body, seconds taken."""

    status: int
    retry_after: str | None
    body: Any
    elapsed_s: float
    error: str = ""


@dataclass
class LoadResult:
    """Every client's reply, and the /health probes made while the load ran (seconds; inf: failed)."""

    replies: list[Reply] = field(default_factory=list)
    health_s: list[float] = field(default_factory=list)

    def statuses(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for reply in self.replies:
            counts[reply.status] = counts.get(reply.status, 0) + 1
        return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def app_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment for a server: ours without any LLM_EXECUTOR_* of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_EXECUTOR_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update(extra)
    return env


@contextlib.contextmanager
def running(spec: ServerSpec, env: Mapping[str, str]) -> Iterator[str]:
    """Start ``spec`` on a free port; yield its base URL once ``GET /health`` answers 200."""
    port = free_port()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(list(spec.command(port)), env=dict(env), cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(proc, base, spec.startup_s, log)
            yield base
        finally:
            _stop(proc)


def _wait_healthy(proc: subprocess.Popen[bytes], base: str, startup_s: float, log: Any) -> None:
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise AssertionError(f"server exited with {proc.returncode} before answering:\n{log.read()[-3000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{base}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)  # a child process gives no event to wait on: poll its port, bounded
    log.seek(0)
    raise AssertionError(f"server did not answer /health within {startup_s}s:\n{log.read()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def load(base: str, path: str, payloads: Sequence[Mapping[str, Any]], *, timeout_s: float = 60.0,
         health_every_s: float | None = None, health_after: int = 0) -> LoadResult:
    """POST every payload to ``base + path`` at once, one client thread each; optionally probe /health.

    All clients start together (an Event), each request has ``timeout_s``, and the whole load is
    bounded by ``2 * timeout_s``. With ``health_every_s``, a separate process GETs ``/health`` that
    often from the moment ``health_after`` replies have arrived until the last one has (with
    ``health_after`` = the clients that are answered at once, the probes measure the server while
    the rest wait for the LLM, not while it parses the initial burst).
    """
    result = LoadResult()
    lock = threading.Lock()
    go = threading.Event()
    probing = threading.Event()
    if health_after <= 0:
        probing.set()

    def client(payload: Mapping[str, Any]) -> None:
        go.wait(timeout_s)
        t0 = time.monotonic()
        try:
            r = requests.post(base + path, json=payload, timeout=timeout_s)
            try:
                body = r.json()
            except ValueError:
                body = r.text[:200]
            reply = Reply(r.status_code, r.headers.get("Retry-After"), body, time.monotonic() - t0)
        except requests.RequestException as exc:
            reply = Reply(0, None, None, time.monotonic() - t0, f"{type(exc).__name__}: {exc}")
        with lock:
            result.replies.append(reply)
            if len(result.replies) >= health_after:
                probing.set()

    # The prober is a process of its own: in this one it would wait for the GIL behind the clients'
    # threads, and measure them instead of the server.
    prober = None if not health_every_s else subprocess.Popen(
        [sys.executable, "-c", _PROBER, f"{base}/health", str(health_every_s), str(timeout_s)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if prober is not None:
            assert prober.stdout is not None and prober.stdout.readline() == "ready\n", "the prober did not start"
        threads = [threading.Thread(target=client, args=(p,), daemon=True) for p in payloads]
        for t in threads:
            t.start()
        go.set()
        end = time.monotonic() + 2 * timeout_s
        if prober is not None and probing.wait(2 * timeout_s):
            assert prober.stdin is not None
            prober.stdin.write("go\n")
            prober.stdin.flush()
        for t in threads:
            t.join(max(0.0, end - time.monotonic()))
        if prober is not None:
            out, _ = prober.communicate("", timeout=timeout_s + 10)  # closing stdin stops it
            result.health_s = [math.inf if s is None else float(s) for s in json.loads(out)]
    finally:
        if prober is not None and prober.poll() is None:
            prober.kill()
            prober.wait(5)
    assert not any(t.is_alive() for t in threads), "clients still waiting after the bound"
    return result


# Say "ready", wait for "go" on stdin, then GET the URL every INTERVAL seconds until stdin closes;
# print the seconds each GET took (null: failed) as JSON.
_PROBER = """
import json, select, sys, time
import requests
url, every, timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
print("ready", flush=True)
out = []
if sys.stdin.readline() != "go\\n":
    print("[]")
    sys.exit()
while not select.select([sys.stdin], [], [], every)[0]:
    t0 = time.monotonic()
    try:
        ok = requests.get(url, timeout=timeout).status_code == 200
    except requests.RequestException:
        ok = False
    out.append(time.monotonic() - t0 if ok else None)
print(json.dumps(out))
"""
