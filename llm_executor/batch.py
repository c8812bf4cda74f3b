"""Resumable batch runs: ``llm-executor run INPUT.jsonl -o OUTPUT.jsonl``.

Input: one JSON object per line with ``id`` and ``prompt`` and optionally ``provider``
(default "auto"), ``model``, ``system``, ``json_schema``, ``max_output_tokens``, ``temperature``,
``timeout``, ``priority``, ``metadata``. Output: one line per request, written as each one ends::

    {"id": ..., "ok": true,  "response": {"text": ..., "provider": ..., "data": ..., ...}}
    {"id": ..., "ok": false, "error": {"type": "RateLimitedError", "message": ...}}

The output file is its own journal: a re-run reads the ids it already holds and skips them, so
a run stopped by Ctrl-C, a crash or a kill resumes without losing or duplicating a line. Each
line goes out in one ``write`` followed by a flush, so a crash can only leave a partial *last*
line; the next run cuts it off (and runs that request again). Lines are fsynced at most once
a second and at the end: a power cut may lose the last second, which the next run redoes.

Imports: ``phases`` and the public API of ``llm_executor`` (plus ``errors``) only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from . import Executor, LLMRequest, LLMResponse
from .errors import InvalidRequestError, ProviderError
from .phases import FanOutInterrupted, TaskError, fan_out

__all__ = ["BatchInterrupted", "BatchSummary", "run_batch"]

log = logging.getLogger(__name__)

FIELDS = ("id", "prompt", "provider", "model", "system", "json_schema", "max_output_tokens", "temperature",
          "timeout", "priority", "metadata")
_BAD_REQUEST_ERRORS = frozenset({"InvalidRequestError", "UnknownProviderError"})
_FSYNC_EVERY_S = 1.0


@dataclass
class BatchSummary:
    """What a batch run did.

    Attributes:
        input_path / output_path: the files.
        total: requests in the input (distinct ids on valid lines, done before or not).
        skipped_already_done: requests whose id the output (or journal) already held.
        done: result lines written by this run (``succeeded`` + ``failed``).
        succeeded: responses written.
        failed: error lines written (provider errors and bad requests that had an id).
        bad_lines: (line number, message) for every line that is not a valid request,
            duplicates included; lines with an id also got an error line in the output.
        per_provider: {provider: {"ok": n, "failed": n}} for this run.
        truncated_bytes: size of a partial last output line (from a crash) cut off at start.
        interrupted: the run stopped on Ctrl-C; re-run the same command to resume.
        elapsed_s: wall time.
    """

    input_path: str
    output_path: str
    total: int = 0
    skipped_already_done: int = 0
    done: int = 0
    succeeded: int = 0
    failed: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)
    per_provider: dict[str, dict[str, int]] = field(default_factory=dict)
    truncated_bytes: int = 0
    interrupted: bool = False
    elapsed_s: float = 0.0

    @property
    def remaining(self) -> int:
        """Requests still without a result line (non-zero after an interrupt)."""
        return max(0, self.total - self.skipped_already_done - self.done)

    def as_dict(self) -> dict[str, Any]:
        """Plain data (for ``--json``)."""
        return {"input": self.input_path, "output": self.output_path, "total": self.total,
                "skipped_already_done": self.skipped_already_done, "done": self.done,
                "succeeded": self.succeeded, "failed": self.failed, "remaining": self.remaining,
                "bad_lines": [{"line": n, "message": m} for n, m in self.bad_lines],
                "per_provider": self.per_provider, "truncated_bytes": self.truncated_bytes,
                "interrupted": self.interrupted, "elapsed_s": round(self.elapsed_s, 3)}

    def format_table(self, max_bad_lines: int = 20) -> str:
        """A plain-text summary for the terminal."""
        rate = self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"input      {self.input_path}",
            f"output     {self.output_path}",
            f"requests   {self.total} ({self.skipped_already_done} already done before this run)",
            f"written    {self.done} (ok {self.succeeded}, failed {self.failed})"
            + (f", {self.remaining} remaining: interrupted, re-run to resume" if self.interrupted else ""),
            f"bad lines  {len(self.bad_lines)}",
            f"elapsed    {self.elapsed_s:.1f} s ({rate:.1f} requests/s)",
        ]
        if self.truncated_bytes:
            lines.append(f"recovered  cut a partial last line of {self.truncated_bytes} bytes from the output")
        if self.per_provider:
            width = max(len("provider"), *(len(p) for p in self.per_provider))
            lines += ["", f"{'provider'.ljust(width)}  {'ok':>6}  {'failed':>6}"]
            lines += [f"{name.ljust(width)}  {c.get('ok', 0):>6}  {c.get('failed', 0):>6}"
                      for name, c in sorted(self.per_provider.items())]
        if self.bad_lines:
            lines += ["", "bad lines:"]
            lines += [f"  line {n}: {m}" for n, m in self.bad_lines[:max_bad_lines]]
            if len(self.bad_lines) > max_bad_lines:
                lines.append(f"  ... and {len(self.bad_lines) - max_bad_lines} more")
        return "\n".join(lines)


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``run_batch``: every finished request is on disk; ``summary`` says how far it got."""

    def __init__(self, summary: BatchSummary) -> None:
        super().__init__(f"batch interrupted: {summary.remaining} requests remaining; re-run to resume")
        self.summary = summary


@dataclass(frozen=True)
class _Line:
    """One input line to run (or to answer with an error line, when ``problem`` is set)."""

    line_no: int
    id: Any
    record: dict[str, Any]
    problem: str | None = None


def run_batch(
    executor: Executor,
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str],
    *,
    journal_path: str | os.PathLike[str] | None = None,
    progress: bool = True,
    retry_failed: bool = False,
) -> BatchSummary:
    """Run every request of a JSONL file through ``executor``, appending one result line per request.

    Requests whose id is already in the output (or in ``journal_path``) are skipped, so running
    the same command again after a Ctrl-C or a crash finishes the batch with every id exactly
    once. Requests are fed lazily (a bounded number outstanding, whatever the input's size).

    Args:
        executor: every request goes through it.
        input_path: JSONL requests (see the module docstring for the fields).
        output_path: JSONL results; created if missing, appended to otherwise.
        journal_path: an extra file of done ids (one ``{"id": ...}`` line each), read at start
            and appended to after each output line; None: the output alone is the journal.
        progress: a tqdm bar with rate and ETA (hidden when stderr is not a terminal).
        retry_failed: run again the requests whose line in the output is an error; their error
            lines are removed first (the output is rewritten atomically), so every id still
            appears once. Not combinable with ``journal_path``.

    Returns:
        A ``BatchSummary``.

    Raises:
        BatchInterrupted: on Ctrl-C, after cancelling what had not started and syncing the output.
        FileNotFoundError: the input does not exist.
        ValueError: the output is the input.
    """
    t0 = time.monotonic()
    src, dst = Path(input_path), Path(output_path)
    if not src.is_file():
        raise FileNotFoundError(f"input file {str(src)!r} does not exist")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError("the output file must not be the input file")
    if retry_failed and journal_path is not None:
        raise ValueError("retry_failed cannot be combined with journal_path (the journal has no outcomes)")
    summary = BatchSummary(str(src), str(dst))
    done_ids, summary.truncated_bytes = _recover(dst)
    if retry_failed:
        done_ids = _drop_error_lines(dst)
    journal = Path(journal_path) if journal_path is not None else None
    if journal is not None:
        journal_ids, _ = _recover(journal)
        done_ids |= journal_ids
    to_run = _plan(src, done_ids, summary)

    # One record per result line, appended *before* its line is written: a Ctrl-C can land
    # between any two statements, so the summary is folded from these at the end, and after an
    # interrupt cut to the lines the output really holds (a record whose write never ran is
    # dropped). Counting after each write instead could miss the line written last.
    records: list[tuple[str, bool, tuple[int, str] | None]] = []
    start_size = dst.stat().st_size if dst.exists() else 0
    with _Writer(dst, journal) as writer:
        def on_result(index: int, task: _Line, response: LLMResponse | None, error: TaskError | None) -> None:
            if error is not None:
                bad = ((task.line_no, f"id {task.id!r}: {error.message}")
                       if error.error_type in _BAD_REQUEST_ERRORS else None)
                line = _error_line(task.id, error.error_type, error.message)
                records.append((_provider_of(error, task), False, bad))
            else:
                assert response is not None
                line = _ok_line(task.id, response)
                records.append((response.provider, True, None))
            writer.write(line)

        try:
            fan_out(executor, _tasks(src, to_run), _make_request, on_result=on_result,
                    progress="run" if progress else None, total=len(to_run), keep_results=False)
        except FanOutInterrupted:
            summary.interrupted = True
    if summary.interrupted:
        del records[_lines_after(dst, start_size):]
    _fold(records, summary)
    summary.bad_lines.sort()
    summary.elapsed_s = time.monotonic() - t0
    if summary.interrupted:
        raise BatchInterrupted(summary) from None
    return summary


def _lines_after(path: Path, offset: int) -> int:
    """Complete lines in ``path`` past byte ``offset`` (what this run wrote)."""
    with open(path, "rb") as f:
        f.seek(offset)
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _fold(records: list[tuple[str, bool, tuple[int, str] | None]], summary: BatchSummary) -> None:
    """Count this run's result lines into ``summary``."""
    for provider, ok, bad in records:
        counts = summary.per_provider.setdefault(provider, {"ok": 0, "failed": 0})
        if ok:
            summary.succeeded += 1
            counts["ok"] += 1
        else:
            summary.failed += 1
            counts["failed"] += 1
            if bad is not None:
                summary.bad_lines.append(bad)
    summary.done = summary.succeeded + summary.failed


def _recover(path: Path) -> tuple[set[str], int]:
    """Ids already in a result/journal file, after cutting off a partial last line (a crash)."""
    if not path.exists():
        return set(), 0
    data = path.read_bytes()
    cut = 0
    end = data.rfind(b"\n") + 1
    if end < len(data):
        # Only the last line can be partial: every line is one write. Cut it off so appending
        # continues on a line boundary; its request runs again.
        cut = len(data) - end
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
        log.warning("%s: cut a partial last line of %d bytes (an interrupted write)", path, cut)
        data = data[:end]
    ids: set[str] = set()
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
            ids.add(_key(obj["id"]))
        except (ValueError, KeyError, TypeError):
            log.warning("%s line %d is not a result line; ignored", path, n)
    return ids, cut


def _drop_error_lines(path: Path) -> set[str]:
    """Rewrite ``path`` without its error lines (atomically); return the ids of the lines kept."""
    if not path.exists():
        return set()
    kept: list[str] = []
    ids: set[str] = set()
    for raw in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            obj = json.loads(raw)
        except ValueError:
            kept.append(raw)
            continue
        if isinstance(obj, dict) and obj.get("ok") is False:
            continue
        kept.append(raw)
        if isinstance(obj, dict) and "id" in obj:
            ids.add(_key(obj["id"]))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    # os.replace is atomic: a crash leaves either the old output or the new one, never a mix.
    os.replace(tmp, path)
    return ids


def _key(value: Any) -> str:
    """Ids compare as JSON values: 7 and "7" are different ids."""
    return json.dumps(value, sort_keys=True)


def _is_valid_id(value: Any) -> bool:
    return (isinstance(value, str) and value != "") or (isinstance(value, int) and not isinstance(value, bool))


def _plan(src: Path, done_ids: set[str], summary: BatchSummary) -> set[int]:
    """First pass: which line numbers to run; fills total, skipped and the bad lines without ids."""
    first_line: dict[str, int] = {}
    to_run: set[int] = set()
    for line_no, record, problem in _read(src):
        if record is None:
            summary.bad_lines.append((line_no, problem or "invalid line"))
            continue
        key = _key(record["id"])
        if key in first_line:
            summary.bad_lines.append((line_no, f"duplicate id {record['id']!r} (first on line {first_line[key]}); "
                                               "skipped"))
            continue
        first_line[key] = line_no
        summary.total += 1
        if key in done_ids:
            summary.skipped_already_done += 1
        else:
            to_run.add(line_no)
    return to_run


def _read(src: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """(line number, record with a valid id or None, problem) per non-blank line."""
    with open(src, encoding="utf-8", errors="replace") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as exc:
                yield line_no, None, f"invalid JSON: {exc}"
                continue
            if not isinstance(record, dict):
                yield line_no, None, f"expected a JSON object, got {type(record).__name__}"
                continue
            if "id" not in record:
                yield line_no, None, "missing field 'id'"
                continue
            if not _is_valid_id(record["id"]):
                yield line_no, None, f"field 'id' must be a non-empty string or an integer, got {record['id']!r}"
                continue
            yield line_no, record, _problem(record)


def _problem(record: dict[str, Any]) -> str | None:
    """What makes a record with a valid id unusable before the executor even sees it."""
    unknown = sorted(set(record) - set(FIELDS))
    if unknown:
        return f"unknown field(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(FIELDS)}"
    if "prompt" not in record:
        return "missing field 'prompt'"
    for name in ("provider", "model"):
        if name in record and not isinstance(record[name], str):
            return f"field {name!r} must be a string, got {record[name]!r}"
    return None


def _tasks(src: Path, to_run: set[int]) -> Iterator[_Line]:
    """Second pass, lazily: the lines to run (the input is never held in memory)."""
    for line_no, record, problem in _read(src):
        if record is not None and line_no in to_run:
            yield _Line(line_no, record["id"], record, problem)


def _make_request(task: _Line) -> LLMRequest:
    if task.problem is not None:
        raise InvalidRequestError(f"line {task.line_no}: {task.problem}")
    r = task.record
    return LLMRequest(
        provider=r.get("provider", "auto"), model=r.get("model", ""), prompt=r["prompt"], system=r.get("system"),
        max_output_tokens=r.get("max_output_tokens"), temperature=r.get("temperature"),
        json_schema=r.get("json_schema"), priority=r.get("priority", 0), timeout=r.get("timeout"),
        metadata=r.get("metadata") or {},
    )


def _provider_of(error: TaskError, task: _Line) -> str:
    exc = error.exception
    if isinstance(exc, ProviderError) and exc.provider:
        return exc.provider
    provider = task.record.get("provider", "auto")
    return provider if isinstance(provider, str) else "?"


def _ok_line(id_: Any, r: LLMResponse) -> dict[str, Any]:
    return {"id": id_, "ok": True, "response": {
        "text": r.text, "provider": r.provider, "model": r.model, "finish_reason": r.finish_reason,
        "usage_tokens": r.usage_tokens, "prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
        "attempts": r.attempts, "latency_ms": round(r.latency_ms, 3), "data": r.data}}


def _error_line(id_: Any, error_type: str, message: str) -> dict[str, Any]:
    return {"id": id_, "ok": False, "error": {"type": error_type, "message": message}}


class _Writer:
    """Appends result lines: one write + flush per line, fsync at most once a second and on close."""

    def __init__(self, output: Path, journal: Path | None) -> None:
        self._out: IO[str] = open(output, "a", encoding="utf-8", newline="\n")  # noqa: SIM115 (closed in __exit__)
        self._journal: IO[str] | None = (open(journal, "a", encoding="utf-8", newline="\n")  # noqa: SIM115
                                         if journal is not None else None)
        self._synced_s = time.monotonic()

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, obj: dict[str, Any]) -> None:
        # One write per line: a crash can only truncate the last line, which _recover cuts off.
        # default=str: a provider's odd value in ``data`` must not lose the whole line.
        self._out.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
        self._out.flush()
        if self._journal is not None:
            # After the output line: a crash in between leaves the id in the output, which is read too.
            self._journal.write(json.dumps({"id": obj["id"]}) + "\n")
            self._journal.flush()
        now = time.monotonic()
        if now - self._synced_s >= _FSYNC_EVERY_S:
            self._sync()
            self._synced_s = now

    def _sync(self) -> None:
        for f in (self._out, self._journal):
            if f is not None:
                os.fsync(f.fileno())

    def close(self) -> None:
        try:
            self._out.flush()
            if self._journal is not None:
                self._journal.flush()
            self._sync()
        finally:
            self._out.close()
            if self._journal is not None:
                self._journal.close()
