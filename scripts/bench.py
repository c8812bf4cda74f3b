#!/usr/bin/env python3
"""llm_executor benchmarks (issue 7, item 1): overhead, HTTP throughput, latency, rate, memory, import.

    PYTHONPATH=. python scripts/bench.py                  # full run for docs/benchmarks.md (~3 min)
    PYTHONPATH=. python scripts/bench.py --quick          # CI smoke run (< 60 s)
    PYTHONPATH=. python scripts/bench.py --only overhead,http --runs 5
    PYTHONPATH=. python scripts/bench.py --plot docs/benchmarks-rate.png
    PYTHONPATH=. python scripts/bench.py --profile overhead   # yappi: top self-time per request

Benchmarks (``--only`` names): overhead, http, latency, rate, memory, import.
Every figure is the median of ``--runs`` runs (default 3), except the rate-window figures, which
report the worst run (a limit must hold every time). The table shows the figure, the measured
value, the target, measured/target and OK/MISSED; ``--json`` writes everything, raw runs included.
Exit status: 0 all targets met, 1 a target missed, 2 usage error.

HTTP benchmarks talk to a fake OpenAI-compatible server on 127.0.0.1 started by this script in a
separate process (asyncio, HTTP/1.1 keep-alive, one fixed chat.completion body), so it does not
share the client's GIL. Its own ceiling is measured first with raw keep-alive sockets. The
LiteLLM comparison runs in /work/litellm-venv (or $BENCH_LITELLM_PYTHON) when LiteLLM imports there.
Every server and subprocess is stopped in a ``finally`` block, with timeouts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import requests

from llm_executor import Capabilities, Executor, ExecutorConfig, LLMRequest, LLMResponse, ProviderConfig
from llm_executor.testing import max_in_window as max_window

ROOT = Path(__file__).resolve().parent.parent
ALL = ("overhead", "http", "latency", "rate", "memory", "import")
LITELLM_PYTHON = os.environ.get("BENCH_LITELLM_PYTHON", "/work/litellm-venv/bin/python")

# --- fakes ------------------------------------------------------------------------------------------


class NoopProvider:
    """Answers at once (or after ``latency_s``) with one shared response; optionally records starts."""

    name = "noop"

    def __init__(self, latency_s: float = 0.0, record: bool = False) -> None:
        self.latency_s = latency_s
        self.record = record
        self.starts: list[float] = []
        self.ends: list[float] = []
        self._lock = threading.Lock()
        self._resp = LLMResponse("", "noop", "m", "stop", None)

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def complete(self, request: LLMRequest) -> LLMResponse:
        if self.record:
            with self._lock:
                self.starts.append(time.monotonic())
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.record:
            with self._lock:
                self.ends.append(time.monotonic())
        return self._resp


class GateProvider(NoopProvider):
    """Blocks every call until ``release`` is set (to hold requests in the queue)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()

    def complete(self, request: LLMRequest) -> LLMResponse:
        self.started.set()
        self.release.wait(60)
        return self._resp


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# --- result table -----------------------------------------------------------------------------------


class Results:
    """Figures (the table) plus raw per-run data (the JSON)."""

    def __init__(self) -> None:
        self.figures: list[dict[str, Any]] = []
        self.raw: dict[str, Any] = {}
        self.notes: list[str] = []

    def add(self, figure: str, measured: float, target: float | None, unit: str, *,
            higher_is_better: bool, note: str = "") -> None:
        if target is None:
            ok, ratio = None, None
        else:
            ok = measured >= target if higher_is_better else measured <= target
            ratio = measured / target if target else None
        self.figures.append({"figure": figure, "measured": measured, "target": target, "unit": unit,
                             "target_op": ">=" if higher_is_better else "<=", "ratio": ratio, "ok": ok,
                             "note": note})
        print(f"  {format_row(self.figures[-1])}", flush=True)

    def skip(self, figure: str, why: str) -> None:
        self.figures.append({"figure": figure, "measured": None, "target": None, "unit": "", "target_op": "",
                             "ratio": None, "ok": None, "note": why})
        print(f"  {figure}: {why}", flush=True)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) >= 10:
        return f"{int(value)}"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def format_row(f: dict[str, Any]) -> str:
    status = {True: "OK", False: "MISSED", None: "-"}[f["ok"]]
    target = f"{f['target_op']} {_fmt(f['target'])}" if f["target"] is not None else "-"
    ratio = f"{f['ratio']:.2f}" if f["ratio"] is not None else "-"
    return (f"{f['figure']:<56} {_fmt(f['measured']):>9} {f['unit']:<8} {target:>10} {ratio:>6}  {status}"
            + (f"  ({f['note']})" if f["note"] else ""))


def print_table(results: Results) -> None:
    print()
    print(f"{'figure':<56} {'measured':>9} {'unit':<8} {'target':>10} {'ratio':>6}  status")
    print("-" * 104)
    for f in results.figures:
        print(format_row(f))


# --- (1) overhead -----------------------------------------------------------------------------------


def _voluntary_switches() -> int:
    """This process's voluntary context switches so far (0 where getrusage has no such count)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a Unix
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw)


def overhead_once(n: int, workers: int, switches: list[float] | None = None) -> tuple[float, float]:
    """(executor seconds, ThreadPoolExecutor seconds) for ``n`` no-op requests, submit to last result.

    ``switches`` gets the executor run's voluntary context switches per request appended: a lock
    shared by the workers convoys under the GIL and shows here first (docs/benchmarks.md).
    """
    provider = NoopProvider()
    request = LLMRequest("noop", "m", "p")
    with ThreadPoolExecutor(workers) as tpe:
        t0 = time.perf_counter()
        futures = [tpe.submit(provider.complete, request) for _ in range(n)]
        for f in futures:
            f.result()
        t_tpe = time.perf_counter() - t0
    cfg = ExecutorConfig(providers={"noop": ProviderConfig(max_parallel=workers)}, queue_size=0)
    with Executor(cfg, providers={"noop": provider}) as ex:
        before = _voluntary_switches()
        t0 = time.perf_counter()
        efutures = [ex.submit(request) for _ in range(n)]
        for ef in efutures:
            ef.result()
        t_exec = time.perf_counter() - t0
        if switches is not None:
            switches.append((_voluntary_switches() - before) / n)
    return t_exec, t_tpe


def bench_overhead(res: Results, quick: bool, runs: int) -> None:
    n, workers = (5000 if quick else 20000), 4
    overhead_once(2000, workers)  # warm-up: imports, code objects, allocator
    switches: list[float] = []
    pairs = [overhead_once(n, workers, switches) for _ in range(runs)]
    over = [(e - t) / n * 1e6 for e, t in pairs]
    res.raw["overhead"] = {"n": n, "workers": workers, "executor_s": [p[0] for p in pairs],
                           "threadpool_s": [p[1] for p in pairs], "overhead_us": over,
                           "executor_voluntary_switches_per_request": switches}
    # Issue 10 tightened issue 7's 15 µs to 10 µs.
    res.add(f"overhead vs ThreadPoolExecutor (N={n})", median(over), 10.0, "µs/req", higher_is_better=False,
            note=f"executor {median([p[0] for p in pairs]) / n * 1e6:.1f} µs/req, "
                 f"TPE {median([p[1] for p in pairs]) / n * 1e6:.1f} µs/req, "
                 f"{median(switches):.2f} voluntary context switches/req")


# --- (2) HTTP throughput ----------------------------------------------------------------------------

_COMPLETION = {
    "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000, "model": "fake-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "OK"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
}


def serve_fake(port: int) -> None:
    """The fake OpenAI-compatible server (runs in its own process; see ``FakeServer``).

    Answers every HTTP/1.1 request on a keep-alive connection with the same 200 chat.completion.
    Parses only the header end and Content-Length: the fake must be much faster than any client.
    Exits when its stdin closes, so it never outlives the benchmark process.
    """
    body = json.dumps(_COMPLETION).encode()
    reply = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    class Proto(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: asyncio.Transport = transport  # type: ignore[assignment]
            self.buf = b""

        def data_received(self, data: bytes) -> None:
            buf = self.buf + data if self.buf else data
            replies = 0
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = buf[:end].lower()
                i = head.find(b"content-length:")
                length = int(head[i + 15:].split(b"\r\n", 1)[0]) if i >= 0 else 0
                if len(buf) < end + 4 + length:
                    break
                buf = buf[end + 4 + length:]
                replies += 1
            self.buf = buf
            if replies:
                self.transport.write(reply * replies)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Proto, "127.0.0.1", port, backlog=512)
        print(server.sockets[0].getsockname()[1], flush=True)
        stdin_closed = loop.run_in_executor(None, sys.stdin.read)
        await stdin_closed
        server.close()

    asyncio.run(main())


class FakeServer:
    """Runs ``serve_fake`` in a subprocess; ``stop()`` closes its stdin, then terminates, then kills."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-fake"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip():
            self.stop()
            raise RuntimeError("fake server did not start")
        self.port = int(line)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(3)

    def __enter__(self) -> FakeServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _raw_request(port: int) -> bytes:
    body = json.dumps({"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer x\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def fake_ceiling_once(port: int, connections: int, duration_s: float) -> float:
    """Requests/s the fake serves to ``connections`` raw keep-alive sockets (asyncio, one request in flight each)."""
    request = _raw_request(port)
    reply_len = len(json.dumps(_COMPLETION).encode())

    async def client(stop_at: float) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        count = 0
        try:
            while time.perf_counter() < stop_at:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                await reader.readexactly(reply_len)
                count += 1
        finally:
            writer.close()
        return count

    async def main() -> float:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(client(t0 + duration_s) for _ in range(connections)))
        return sum(counts) / (time.perf_counter() - t0)

    return asyncio.run(main())


_CHAT_BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}]}


def plain_requests_once(url: str, n: int, threads: int, trust_env: bool = True) -> float:
    """Seconds for ``n`` chat completions over ``threads`` threads, one requests.Session each.

    ``trust_env=False`` is the tuned baseline: no per-call environment scan, as our adapters do.
    """
    endpoint = url + "/chat/completions"
    counter = iter(range(n))
    lock = threading.Lock()
    barrier = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker() -> None:
        session = requests.Session()
        session.trust_env = trust_env
        headers = {"Authorization": "Bearer x"}
        try:
            session.post(endpoint, json=_CHAT_BODY, headers=headers, timeout=(10, 60)).json()  # warm connection
            barrier.wait()
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                r = session.post(endpoint, json=_CHAT_BODY, headers=headers, timeout=(10, 60),
                                 allow_redirects=False)
                r.raise_for_status()
                r.json()["choices"][0]["message"]["content"]
        except BaseException as exc:  # reported after the run
            errors.append(exc)
            barrier.abort()
        finally:
            session.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait(30)
    t0 = time.perf_counter()
    for t in pool:
        t.join(120)
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"plain requests run failed: {errors[0]!r}")
    return elapsed


def executor_http_once(url: str, n: int, parallel: int) -> float:
    """Seconds for ``n`` chat completions through the Executor's openai adapter."""
    cfg = ExecutorConfig(providers={"openai": ProviderConfig(base_url=url, api_key="x", max_parallel=parallel)},
                         queue_size=0)
    request = LLMRequest("openai", "fake-model", "hello")
    with Executor(cfg) as ex:
        wait([ex.submit(request) for _ in range(parallel * 2)])  # warm connections, like the baseline
        t0 = time.perf_counter()
        futures = [ex.submit(request) for _ in range(n)]
        for f in futures:
            f.result()
        return time.perf_counter() - t0


_LITELLM_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import litellm
    from litellm import Router
    url, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    litellm.telemetry = False
    litellm.suppress_debug_info = True
    router = Router(model_list=[{"model_name": "fake", "litellm_params": {
        "model": "openai/fake-model", "api_base": url, "api_key": "x"}}], num_retries=0)
    messages = [{"role": "user", "content": "hello"}]
    for _ in range(threads):
        router.completion(model="fake", messages=messages)   # warm-up: clients, connections
    counter, lock, errors = iter(range(n)), threading.Lock(), []
    def worker():
        try:
            while True:
                with lock:
                    if next(counter, None) is None:
                        return
                r = router.completion(model="fake", messages=messages)
                r.choices[0].message.content
        except BaseException as exc:
            errors.append(repr(exc))
    pool = [threading.Thread(target=worker) for _ in range(threads)]
    t0 = time.perf_counter()
    for t in pool: t.start()
    for t in pool: t.join(600)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"elapsed_s": elapsed, "errors": errors[:3], "version": getattr(litellm, "version", None)
                      or __import__("importlib.metadata").metadata.version("litellm")}))
""")


def litellm_available() -> str | None:
    """None when LiteLLM imports in LITELLM_PYTHON, else why not."""
    if not Path(LITELLM_PYTHON).exists():
        return f"skipped: litellm not installed ({LITELLM_PYTHON} missing)"
    try:
        # find_spec, not an import: importing LiteLLM costs ~8 s here, and the run imports it anyway.
        proc = subprocess.run([LITELLM_PYTHON, "-c", "import importlib.util, sys; "
                               "sys.exit(importlib.util.find_spec('litellm') is None)"], capture_output=True,
                              timeout=60, env=_litellm_env())
    except subprocess.TimeoutExpired:
        return "skipped: litellm import timed out"
    return None if proc.returncode == 0 else "skipped: litellm not installed"


def _litellm_env() -> dict[str, str]:
    # No network beyond 127.0.0.1: use the bundled cost map, no telemetry.
    return {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_TELEMETRY": "False",
            "PYTHONPATH": "", "NO_PROXY": "*"}


def litellm_once(url: str, n: int, threads: int) -> tuple[float, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(_LITELLM_SCRIPT)
        script = fh.name
    try:
        proc = subprocess.run([LITELLM_PYTHON, script, url, str(n), str(threads)], capture_output=True,
                              text=True, timeout=600, env=_litellm_env())
    finally:
        os.unlink(script)
    if proc.returncode != 0:
        raise RuntimeError(f"litellm run failed: {proc.stderr[-800:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["errors"]:
        raise RuntimeError(f"litellm requests failed: {out['errors']}")
    return float(out["elapsed_s"]), str(out["version"])


@contextlib.contextmanager
def pinned(fake: FakeServer) -> Iterator[str]:
    """Give the fake the last CPU and the client (this thread and threads it starts) the others.

    On 2 cores the scheduler otherwise moves the client and the fake onto one core now and
    then, and throughput figures swing by ±20 % between runs. Yields what was done.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        yield "not pinned (one CPU)"
        return
    before = set(cpus)
    os.sched_setaffinity(fake.proc.pid, {cpus[-1]})
    os.sched_setaffinity(0, set(cpus[:-1]))
    try:
        yield f"fake on CPU {cpus[-1]}, client on CPU {','.join(map(str, cpus[:-1]))}"
    finally:
        os.sched_setaffinity(0, before)


def bench_http(res: Results, quick: bool, runs: int) -> None:
    n, parallel = 2000, 16
    with FakeServer() as fake, pinned(fake) as placement:
        print(f"  {placement}", flush=True)
        ceiling = [fake_ceiling_once(fake.port, 64, 0.5 if quick else 2.0) for _ in range(runs)]
        raw: dict[str, Any] = {"n": n, "parallel": parallel, "fake_ceiling_rps": ceiling,
                               "ceiling_method": "asyncio raw keep-alive sockets, 64 connections",
                               "placement": placement}
        t_plain, t_exec, t_tuned = [], [], []
        for _ in range(runs):  # interleaved, so drift hits all alike
            t_plain.append(plain_requests_once(fake.url, n, parallel))
            t_exec.append(executor_http_once(fake.url, n, parallel))
            t_tuned.append(plain_requests_once(fake.url, n, parallel, trust_env=False))
        rps_plain = n / median(t_plain)
        rps_exec = n / median(t_exec)
        rps_tuned = n / median(t_tuned)
        raw.update(requests_s=t_plain, executor_s=t_exec, requests_no_env_s=t_tuned, requests_rps=rps_plain,
                   executor_rps=rps_exec, requests_no_env_rps=rps_tuned)
        res.raw["http"] = raw
        fastest = max(rps_plain, rps_exec, rps_tuned)
        res.add("fake server ceiling / fastest client", median(ceiling) / fastest, 2.0, "x", higher_is_better=True,
                note=f"fake {median(ceiling):.0f} req/s (raw sockets), clients ≤ {fastest:.0f} req/s")
        res.add(f"HTTP executor / requests.Session ({parallel}∥, N={n})", rps_exec / rps_plain, 0.95, "x",
                higher_is_better=True, note=f"executor {rps_exec:.0f} req/s, requests {rps_plain:.0f} req/s")
        res.add("HTTP executor / Session(trust_env=False)", rps_exec / rps_tuned, None, "x", higher_is_better=True,
                note=f"informational: the baseline tuned as our adapters are, {rps_tuned:.0f} req/s")
        why = litellm_available()
        if why is not None:
            res.skip("HTTP executor / LiteLLM Router", why)
            return
        n_lite = 500 if quick else n
        lite_runs = 1 if quick else runs
        t_lite, version = [], ""
        for _ in range(lite_runs):
            elapsed, version = litellm_once(fake.url, n_lite, parallel)
            t_lite.append(elapsed)
        rps_lite = n_lite / median(t_lite)
        raw.update(litellm_s=t_lite, litellm_n=n_lite, litellm_rps=rps_lite, litellm_version=version)
        res.add(f"HTTP executor / LiteLLM Router ({parallel}∥)", rps_exec / rps_lite, 2.0, "x",
                higher_is_better=True, note=f"litellm {version}: {rps_lite:.0f} req/s, N={n_lite}")


# --- (3) latency-bound ------------------------------------------------------------------------------


def threads_latency_once(n: int, parallel: int, latency_s: float) -> float:
    provider = NoopProvider(latency_s)
    request = LLMRequest("noop", "m", "p")
    work: queue.SimpleQueue[int] = queue.SimpleQueue()
    for i in range(n):
        work.put(i)

    def worker() -> None:
        while True:
            try:
                work.get_nowait()
            except queue.Empty:
                return
            provider.complete(request)

    t0 = time.perf_counter()
    pool = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.perf_counter() - t0


def executor_latency_once(n: int, parallel: int, latency_s: float) -> float:
    provider = NoopProvider(latency_s)
    cfg = ExecutorConfig(providers={"noop": ProviderConfig(max_parallel=parallel)}, queue_size=0)
    request = LLMRequest("noop", "m", "p")
    with Executor(cfg, providers={"noop": provider}) as ex:
        t0 = time.perf_counter()
        futures = [ex.submit(request) for _ in range(n)]
        for f in futures:
            f.result()
        return time.perf_counter() - t0


def bench_latency(res: Results, quick: bool, runs: int) -> None:
    n, parallel, latency_s = (300 if quick else 1000), 64, 0.1
    t_threads, t_exec = [], []
    for _ in range(runs):
        t_threads.append(threads_latency_once(n, parallel, latency_s))
        t_exec.append(executor_latency_once(n, parallel, latency_s))
    bound = math.ceil(n / parallel) * latency_s
    res.raw["latency"] = {"n": n, "parallel": parallel, "latency_s": latency_s, "threads_s": t_threads,
                          "executor_s": t_exec, "bound_s": bound}
    res.add(f"latency-bound executor / threads (N={n}, 64∥)", median(t_threads) / median(t_exec), 0.97, "x",
            higher_is_better=True, note=f"executor {median(t_exec):.3f}s, threads {median(t_threads):.3f}s, "
                                        f"bound {bound:.1f}s")


# --- (4) rate accuracy and makespan -----------------------------------------------------------------

# (name, N, QPS, MAX_PARALLEL, latency_s); each case's bound is max(N/QPS, ceil(N/P)·L).
RATE_SINGLE = {"quick": [("p1", 60, 20.0, 8, 0.05)], "full": [("p1", 200, 20.0, 8, 0.05)]}
RATE_TRIPLE = {
    "quick": [("a", 60, 20.0, 8, 0.05), ("b", 30, 10.0, 4, 0.1), ("c", 12, 50.0, 2, 0.5)],
    "full": [("a", 200, 20.0, 8, 0.05), ("b", 100, 10.0, 4, 0.1), ("c", 40, 50.0, 2, 0.5)],
}


def _stamp(into: list[float]) -> Callable[[Future[LLMResponse]], None]:
    return lambda _f: into.append(time.monotonic())


def rate_once(cases: list[tuple[str, int, float, int, float]]) -> dict[str, Any]:
    """Run every case at once (one lane each) and return per-lane starts, makespan and bound."""
    providers = {name: NoopProvider(latency_s, record=True) for name, _, _, _, latency_s in cases}
    for name, p in providers.items():
        p.name = name
    cfg = ExecutorConfig(providers={name: ProviderConfig(max_parallel=par, qps=qps)
                                    for name, _, qps, par, _ in cases}, queue_size=0)
    out: dict[str, Any] = {}
    with Executor(cfg, providers=providers) as ex:  # type: ignore[arg-type]
        t0 = time.monotonic()
        done_at: dict[str, list[float]] = {name: [] for name, *_ in cases}
        futures: list[Future[LLMResponse]] = []
        longest = max(n for _, n, *_ in cases)
        for i in range(longest):  # interleaved submission, as concurrent callers would
            for name, n, *_ in cases:
                if i < n:
                    f = ex.submit(LLMRequest(name, "m", "p"))
                    f.add_done_callback(_stamp(done_at[name]))
                    futures.append(f)
        wait(futures)
        for f in futures:
            f.result()
    for name, n, qps, par, latency_s in cases:
        starts = [s - t0 for s in providers[name].starts]
        makespan = max(done_at[name]) - t0
        bound = max(n / qps, math.ceil(n / par) * latency_s)
        out[name] = {"n": n, "qps": qps, "max_parallel": par, "latency_s": latency_s, "starts": sorted(starts),
                     "makespan_s": makespan, "bound_s": bound, "max_window": max_window(starts)}
    return out


def bench_rate(res: Results, quick: bool, runs: int) -> None:
    key = "quick" if quick else "full"
    res.raw["rate"] = {}
    for label, cases in (("1 provider", RATE_SINGLE[key]), ("3 providers", RATE_TRIPLE[key])):
        run_data = [rate_once(cases) for _ in range(runs)]
        res.raw["rate"][label] = run_data
        for name, n, qps, par, latency_s in cases:
            worst = max(r[name]["max_window"] for r in run_data)
            ratio = median([r[name]["makespan_s"] / r[name]["bound_s"] for r in run_data])
            bound = run_data[0][name]["bound_s"]
            tag = f"{label} {name}: N={n} Q={qps:g} P={par} L={latency_s:g}"
            res.add(f"rate {tag} max/1s", float(worst), qps, "starts", higher_is_better=False,
                    note="worst of runs")
            res.add(f"rate {tag} makespan/bound", ratio, 1.05, "x", higher_is_better=False,
                    note=f"bound {bound:.2f}s")


def plot_rate(raw: dict[str, Any], path: Path) -> None:
    """Starts per 100 ms and in the trailing 1 s window, against each lane's limit, over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(label, data[0]) for label, data in raw.items()]
    lanes = [(label, name, d) for label, run in panels for name, d in run.items()]
    fig, axes = plt.subplots(len(lanes), 1, figsize=(10, 2.4 * len(lanes)), sharex=True, squeeze=False)
    for ax, (label, name, d) in zip(axes[:, 0], lanes, strict=True):
        starts = d["starts"]
        end = max(starts) + 0.1
        bins = [i * 0.1 for i in range(int(end / 0.1) + 2)]
        ax.hist(starts, bins=bins, color="tab:blue", alpha=0.6, label="starts per 100 ms")
        grid = [i * 0.02 for i in range(int(end / 0.02) + 1)]
        trailing = [sum(1 for s in starts if t - 1.0 < s <= t) for t in grid]
        ax2 = ax.twinx()
        ax2.plot(grid, trailing, color="tab:orange", lw=1.2, label="starts in trailing 1 s")
        ax2.axhline(d["qps"], color="tab:red", ls="--", lw=1, label=f"limit {d['qps']:g}/s")
        ax2.set_ylim(0, d["qps"] * 1.3)
        ax.set_ylabel("per 100 ms")
        ax2.set_ylabel("per 1 s")
        ax.set_title(f"{label}, lane {name}: QPS {d['qps']:g}, P {d['max_parallel']}, L {d['latency_s']:g}s, "
                     f"N {d['n']} (worst 1 s window {d['max_window']})", fontsize=9)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
        ax.legend(handles, labels, loc="lower center", fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("seconds since first submit")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- (5) memory and import time ---------------------------------------------------------------------


def memory_once(n: int) -> float:
    """Bytes traced per request while ``n`` requests wait behind a blocked provider (caller's Futures kept)."""
    provider = GateProvider()
    cfg = ExecutorConfig(providers={"noop": ProviderConfig(max_parallel=1)}, queue_size=0)
    request = LLMRequest("noop", "m", "p")
    ex = Executor(cfg, providers={"noop": provider})
    try:
        first = ex.submit(request)
        assert provider.started.wait(10)
        futures: list[Future[LLMResponse]] = []
        futures.append(ex.submit(request))  # heap and list growth happen once, not per request
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        futures.extend(ex.submit(request) for _ in range(n))
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        return (after - before) / n
    finally:
        provider.release.set()
        ex.shutdown(wait=True, cancel_futures=True)
        del first


def import_once(module: str, block: str = "") -> float:
    """Seconds ``import module`` takes in a fresh interpreter; ``block`` names a module made unimportable."""
    prelude = f"import sys; sys.modules[{block!r}] = None; " if block else ""
    code = prelude + f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))
    if proc.returncode:
        raise RuntimeError(f"import {module} failed: {proc.stderr[-500:]}")
    return float(proc.stdout.strip())


def bench_memory(res: Results, quick: bool, runs: int) -> None:
    n = 10000
    per = [memory_once(n) for _ in range(runs)]
    res.raw["memory"] = {"n": n, "bytes_per_request": per}
    res.add(f"memory per queued request (N={n})", median(per), 2048.0, "bytes", higher_is_better=False,
            note="tracemalloc; the caller's Futures kept, one shared LLMRequest")


def bench_import(res: Results, quick: bool, runs: int) -> None:
    reps = 5 if quick else 9
    ours, theirs, no_tornado = [], [], []
    for _ in range(reps):  # interleaved so the page cache and CPU state hit both alike
        theirs.append(import_once("requests"))
        ours.append(import_once("llm_executor"))
        no_tornado.append(import_once("llm_executor", block="tornado"))
    res.raw["import"] = {"llm_executor_s": ours, "requests_s": theirs, "llm_executor_without_tornado_s": no_tornado}
    res.add("import llm_executor / import requests", median(ours) / median(theirs), 1.5, "x",
            higher_is_better=False, note=f"{median(ours) * 1e3:.1f} ms vs {median(theirs) * 1e3:.1f} ms, "
                                         f"median of {reps} fresh processes")
    # tenacity imports its tornado integration whenever tornado is installed (it is in our dev venv).
    res.add("  same, tornado not importable", median(no_tornado) / median(theirs), None, "x",
            higher_is_better=False, note=f"informational: {median(no_tornado) * 1e3:.1f} ms, "
                                         "as in an install without tornado")


# --- profiling (issue 7, item 4) --------------------------------------------------------------------


def profile(target: str, quick: bool) -> None:
    """Print the top self (CPU) times per request under yappi, all threads included."""
    import yappi  # type: ignore[import-untyped]

    n = 5000 if quick else 20000
    yappi.set_clock_type("cpu")
    if target == "overhead":
        overhead_once(1000, 4)
        yappi.start()
        overhead_once(n, 4)
        yappi.stop()
    elif target == "http":
        n = 1000 if quick else 2000
        with FakeServer() as fake:
            executor_http_once(fake.url, 200, 16)
            yappi.start()
            executor_http_once(fake.url, n, 16)
            yappi.stop()
    else:
        raise SystemExit(f"bench.py: error: --profile takes overhead or http, got {target!r}")
    stats = yappi.get_func_stats()
    stats.sort("tsub", "desc")
    total = sum(s.tsub for s in stats)
    print(f"yappi CPU profile of {target}, N={n}: {total / n * 1e6:.1f} µs CPU per request in total")
    print(f"{'self µs/req':>11} {'cum µs/req':>10} {'calls/req':>9}  function")
    for s in list(stats)[:30]:
        where = f"{Path(s.module).name}:{s.lineno}"
        print(f"{s.tsub / n * 1e6:11.2f} {s.ttot / n * 1e6:10.2f} {s.ncall / n:9.2f}  {s.name} ({where})")
    yappi.clear_stats()


# --- main -------------------------------------------------------------------------------------------

BENCHES: dict[str, Callable[[Results, bool, int], None]] = {
    "overhead": bench_overhead, "http": bench_http, "latency": bench_latency, "rate": bench_rate,
    "memory": bench_memory, "import": bench_import,
}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"python": sys.version.split()[0], "implementation": platform.python_implementation(),
                            "platform": platform.platform(), "cpus": os.cpu_count()}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                info["cpu"] = line.split(":", 1)[1].strip()
    return info


def parse_only(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown benchmark {bad[0]!r}; expected some of {','.join(ALL)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller figures for a smoke run (< 60 s)")
    parser.add_argument("--only", type=parse_only, default=list(ALL), metavar="NAME,...",
                        help=f"run only these ({','.join(ALL)})")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--json", default="bench-results/bench.json", metavar="PATH", help="write results here")
    parser.add_argument("--plot", metavar="PATH", help="save the rate plot (needs matplotlib) here")
    parser.add_argument("--profile", metavar="TARGET", help="profile overhead or http with yappi instead")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake:
        serve_fake(0)
        return 0
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.profile:
        profile(args.profile, args.quick)
        return 0
    results = Results()
    t_start = time.perf_counter()
    for name in args.only:
        print(f"[{name}]", flush=True)
        t0 = time.perf_counter()
        BENCHES[name](results, args.quick, args.runs)
        print(f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
    print_table(results)
    elapsed = time.perf_counter() - t_start
    print(f"\n{'quick' if args.quick else 'full'} run, {args.runs} runs per figure, {elapsed:.0f}s")
    out = {"machine": machine(), "quick": args.quick, "runs": args.runs, "elapsed_s": elapsed,
           "argv": sys.argv[1:] if argv is None else list(argv), "figures": results.figures, "raw": results.raw}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"results written to {path}")
    if args.plot:
        if "rate" not in results.raw:
            print("no plot: the rate benchmark did not run", file=sys.stderr)
        else:
            plot_rate(results.raw["rate"], Path(args.plot))
            print(f"rate plot written to {args.plot}")
    return 1 if any(f["ok"] is False for f in results.figures) else 0


if __name__ == "__main__":
    sys.exit(main())
