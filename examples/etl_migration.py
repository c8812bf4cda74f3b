"""Migrating an ETL job from ``concurrent.futures.ThreadPoolExecutor`` to llm_executor.

Before, a thread pool around your own HTTP calls::

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(call_llm, row) for row in rows]
        results = [f.result() for f in futures]

The same shape against an Executor (``--mode submit``) fails at about row QUEUE_SIZE + MAX_PARALLEL
with ``QueueFullError``: the executor keeps at most ``LLM_EXECUTOR_QUEUE_SIZE`` requests waiting
and, by default, says so at once instead of holding your thread. Three ways out, all shown here:

    --mode map      ex.map(make_request, rows, return_exceptions=True) reads the rows lazily and
                    waits for room (input order kept; a failed row's exception comes back in its
                    place, so one bad row does not stop the batch), with a progress bar
    --mode fan_out  phases.fan_out(ex, rows, make_request): lazy too, and a failed row fails
                    alone (errors listed by row), with a progress bar
    --mode submit   the list comprehension kept as it is, with LLM_EXECUTOR_BACKPRESSURE=block
                    (submit waits for room) or a QUEUE_SIZE as large as the batch

Runs with no API key against the built-in emulator (``--use-env`` uses your LLM_EXECUTOR_*
configuration and real providers instead)::

    python examples/etl_migration.py --rows 500 --mode fan_out --fault-rate 0.05 --out enriched.jsonl

Prints one summary line: ``N rows: K enriched, F failed (mode ...)``; exit status 1 when a row failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from llm_executor import Executor, ExecutorConfig, LLMRequest, LLMResponse
from llm_executor.errors import QueueFullError
from llm_executor.phases import fan_out

SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["category", "summary"],
    "properties": {"category": {"type": "string", "enum": ["hardware", "software", "service"]},
                   "summary": {"type": "string"}},
}


def read_rows(n: int) -> Iterator[dict[str, Any]]:
    """The extract step: here generated rows; in a real job a CSV reader or a database cursor."""
    kinds = ("Laptop stand made of aluminium", "Accounting software for small teams",
             "Weekly cleaning service for offices")
    for i in range(n):
        yield {"id": i, "description": f"{kinds[i % 3]}, model {i}. Sold by Northwind Traders in Oslo."}


def make_request(row: dict[str, Any]) -> LLMRequest:
    """The transform step's LLM call for one row: a JSON answer checked against SCHEMA."""
    return LLMRequest(provider="openai", model="", max_output_tokens=300, json_schema=SCHEMA, timeout=120,
                      prompt=f"Give the product's category and a one-line summary.\n\nText:\n{row['description']}",
                      metadata={"row": row["id"]})


def enrich(row: dict[str, Any], response: LLMResponse) -> dict[str, Any]:
    """The load step's record: the row plus what the model said."""
    return {**row, **response.data}


def run(ex: Executor, rows: list[dict[str, Any]], mode: str) -> tuple[list[dict[str, Any]], dict[int, str]]:
    """Enrich ``rows`` through ``ex``; (enriched rows, error per failed row id)."""
    if mode == "map":
        # ThreadPoolExecutor.map's shape. Lazy: never more than QUEUE_SIZE + MAX_PARALLEL
        # outstanding, whatever the batch size. Without return_exceptions the first failed row
        # would raise when reached and cancel the rest, as ThreadPoolExecutor.map does.
        enriched, errors = [], {}
        outcomes = ex.map(make_request, rows, return_exceptions=True, progress="enrich")
        for row, outcome in zip(rows, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                errors[row["id"]] = f"{type(outcome).__name__}: {outcome}"
            else:
                enriched.append(enrich(row, outcome))
        return enriched, errors
    if mode == "fan_out":
        out = fan_out(ex, rows, make_request, parse=enrich, progress="enrich")
        return [r for _, r in out.successes()], {e.task["id"]: f"{e.error_type}: {e.message}" for e in out.errors}
    # mode == "submit": the ThreadPoolExecutor shape, [ex.submit(...) for row in rows], unrolled to
    # say at which row a full queue stopped it.
    futures = []
    try:
        for row in rows:
            futures.append(ex.submit(make_request(row)))
    except QueueFullError as exc:
        exc.add_note(f"at row {len(futures)} of {len(rows)}")
        raise
    enriched, errors = [], {}
    for row, future in zip(rows, futures, strict=True):
        try:
            enriched.append(enrich(row, future.result()))
        except Exception as exc:
            errors[row["id"]] = f"{type(exc).__name__}: {exc}"
    return enriched, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--mode", choices=("map", "fan_out", "submit"), default="map")
    parser.add_argument("--fault-rate", type=float, default=0.0, help="emulator faults (default 0)")
    parser.add_argument("--out", help="write the enriched rows as JSONL here")
    parser.add_argument("--use-env", action="store_true", help="real providers from LLM_EXECUTOR_* (no emulator)")
    args = parser.parse_args(argv)

    rows = list(read_rows(args.rows))
    with contextlib.ExitStack() as stack:
        if not args.use_env:
            from llm_executor.testing import Emulator, ProviderSim

            emu = stack.enter_context(Emulator(providers={"openai": ProviderSim(
                latency_s=0.01, max_concurrency=8, fault_rate=args.fault_rate,
                faults={"server_error": 1.0, "malformed": 1.0})}, seed=7))
            os.environ.setdefault("LLM_EXECUTOR_PROVIDERS", "openai")
            os.environ.setdefault("LLM_EXECUTOR_OPENAI_BASE_URL", emu.url("openai"))
            os.environ.setdefault("LLM_EXECUTOR_OPENAI_MODEL", "gpt-4o-mini")
            os.environ.setdefault("LLM_EXECUTOR_OPENAI_MAX_PARALLEL", "8")
        ex = stack.enter_context(Executor(ExecutorConfig.from_env()))
        try:
            enriched, errors = run(ex, rows, args.mode)
        except QueueFullError as exc:
            print(f"QueueFullError: {exc} ({'; '.join(getattr(exc, '__notes__', []))})", file=sys.stderr)
            print("the list comprehension over submit() outran the queue: use --mode map or fan_out, or "
                  "LLM_EXECUTOR_BACKPRESSURE=block", file=sys.stderr)
            return 1
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for record in enriched:
                f.write(json.dumps(record) + "\n")
    print(f"{len(rows)} rows: {len(enriched)} enriched, {len(errors)} failed (mode {args.mode})")
    for row_id, error in sorted(errors.items())[:5]:
        print(f"  row {row_id}: {error}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
