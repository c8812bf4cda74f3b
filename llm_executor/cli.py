"""The ``llm-executor`` command: a thin shell over the public API.

Subcommands: ``demo`` (the example pipeline on the built-in emulator), ``run`` (a resumable
JSONL batch), ``check`` (does each configured provider answer?), ``emulate`` (serve the
emulator for other tools), ``config`` (the resolved configuration, keys masked). ``config``,
``check`` and ``run`` read and validate the configuration through one function (``_load_config``).

Only this module prints. ``main(argv)`` returns the exit status: 0 ok, 1 a request or a check
failed, 2 usage or configuration error (one stderr line: ``llm-executor: error: ...``),
130 interrupted.
Imports: the public API of ``llm_executor`` and the top-layer modules (demo, batch, testing).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from . import Executor, ExecutorConfig, __version__
from .errors import ConfigError, ConfigWarning, LLMExecutorError

__all__ = ["build_parser", "main"]


def _err(message: str) -> None:
    print(f"llm-executor: error: {message}", file=sys.stderr)


def _print_config(cfg: ExecutorConfig, as_json: bool) -> None:
    data = cfg.describe()
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
        return
    providers = data.pop("providers")
    for key, value in data.items():
        print(f"{key:<18} {value}")
    for name, pdata in providers.items():
        print(f"\n[{name}]")
        for key, value in pdata.items():
            if value not in (None, {}, []):
                print(f"  {key:<20} {value}")


def _load_config() -> ExecutorConfig:
    """The configuration of ``config``, ``check`` and ``run``, validated one way for all three.

    Built-in adapters only (the command has no custom providers), so a provider name without an
    adapter or a fallback that is not enabled fails here, in every command alike, before anything
    connects. An unknown LLM_EXECUTOR_* variable is one ``llm-executor: warning:`` line on stderr.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        cfg = ExecutorConfig.from_env(adapters=())
    for w in caught:
        if issubclass(w.category, ConfigWarning):
            print(f"llm-executor: warning: {w.message}", file=sys.stderr)
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return cfg


def _cmd_config(args: argparse.Namespace) -> int:
    _print_config(_load_config(), args.json)
    return 0


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [n.strip() for n in value.split(",") if n.strip()]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    try:
        report = run_demo(providers=_names(args.providers), docs=args.docs, fault_rate=args.fault_rate,
                          seed=args.seed, max_docs=args.max_docs, progress=not args.json)
    except (ValueError, FileNotFoundError) as exc:
        _err(str(exc))
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
        return 0 if report.ok else 1
    p = report.pipeline
    print(f"\nllm-executor demo: {p.documents} documents, {len(p.chunks)} chunks, {p.tasks} LLM tasks "
          f"through {len(report.rows)} providers on the built-in emulator in {report.elapsed_s:.1f}s\n")
    print(report.format_table())
    print("  in flight / 1s window: observed by the executor (and by the emulator) / configured limit")
    for note in report.notes:
        print(f"  {note}")
    print(f"\ndeduplicated entities ({len(p.entities)}):\n")
    print(p.format_table(limit=args.limit))
    failed = p.failed
    print(f"\ntasks: {p.tasks} resolved, {p.tasks - failed} ok, {failed} failed"
          + (f" ({p.extraction.error_counts() | p.matching.error_counts()})" if failed else ""))
    print(f"limits: {'every limit held' if report.limits_held else 'A LIMIT WAS EXCEEDED'}; "
          f"exit status {0 if report.ok else 1}")
    return 0 if report.ok else 1


def _cmd_run(args: argparse.Namespace) -> int:
    from .batch import BatchInterrupted, run_batch

    cfg = _load_config()
    with Executor(cfg) as ex:
        try:
            summary = run_batch(ex, args.input, args.output, progress=not args.quiet,
                                retry_failed=args.retry_failed)
        except BatchInterrupted as exc:
            print(exc.summary.format_table())
            print("interrupted: run the same command again to resume", file=sys.stderr)
            return 130
        except FileNotFoundError as exc:
            _err(str(exc))
            return 2
    print(summary.format_table())
    return 1 if summary.failed or summary.bad_lines else 0


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _load_config()
    _print_config(cfg, as_json=False)
    print()
    with Executor(cfg) as ex:
        results = ex.check_providers(timeout=args.timeout)
    width = max((len(n) for n in results), default=0)
    for name, (ok, detail) in results.items():
        print(f"{name:<{width}}  {'OK  ' if ok else 'FAIL'}  {detail}")
    return 0 if all(ok for ok, _ in results.values()) else 1


# (option, ProviderSim field, type) of `emulate`; each takes VALUE (every provider) or PROVIDER=VALUE.
_EMULATE_OPTIONS: tuple[tuple[str, str, Any], ...] = (
    ("require_key", "require_key", str),
    ("models", "models", lambda v: tuple(n.strip() for n in v.split(",") if n.strip())),
    ("rps", "rps", float),
    ("rpm", "rpm", int),
    ("tpm", "tpm", int),
    ("rpd", "rpd", int),
    ("max_concurrency", "max_concurrency", int),
    ("capacity", "capacity", int),
    ("latency", "latency_s", float),
    ("fault_rate", "fault_rate", float),
    ("retry_after", "retry_after_s", float),
    ("thinking_tokens", "thinking_tokens", int),
    ("rate_limit_headers", "rate_limit_headers", lambda v: {"on": True, "off": False}[v.strip().lower()]),
)


def _emulator_sims(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """One ProviderSim per provider from the `emulate` options (PROVIDER=VALUE beats VALUE)."""
    from .testing import ProviderSim

    fields: dict[str, dict[str, Any]] = {name: {} for name in names}
    for option, field, convert in _EMULATE_OPTIONS:
        flag = "--" + option.replace("_", "-")
        # Plain values first, so a later PROVIDER=VALUE overrides them for that provider.
        values = sorted(getattr(args, option) or [], key=lambda v: v.partition("=")[0] in _EMULATED)
        for raw in values:
            provider, sep, value = raw.partition("=")
            targets = [provider] if sep and provider in _EMULATED else list(names)
            if not sep or provider not in _EMULATED:
                value = raw
            try:
                converted = convert(value)
            except (ValueError, KeyError):
                raise ValueError(f"{flag} {raw!r}: expected [PROVIDER=]VALUE with a valid value") from None
            for target in targets:
                if target not in fields:
                    raise ValueError(f"{flag} {raw!r}: {target} is not among --providers {','.join(names)}")
                fields[target][field] = converted
    return {name: ProviderSim(**kw) for name, kw in fields.items()}


_EMULATED = ("openai", "gemini", "ollama")


def _cmd_emulate(args: argparse.Namespace) -> int:
    from .testing import serve

    names = _names(args.providers) or list(_EMULATED)
    unknown = sorted(set(names) - set(_EMULATED))
    if unknown:
        _err(f"--providers: {', '.join(unknown)} not emulated; use {','.join(_EMULATED)}")
        return 2
    try:
        providers = _emulator_sims(args, names)
    except ValueError as exc:
        _err(str(exc))
        return 2

    def ready(emu: Any) -> None:
        print(f"llm-executor emulate: listening on {emu.base_url} (Ctrl-C to stop)")
        for name in providers:
            print(f"  {name:<7} base URL {emu.url(name)}")
        print("  e.g. LLM_EXECUTOR_OPENAI_BASE_URL=" + emu.url("openai") if "openai" in providers else "")
        sys.stdout.flush()

    try:
        serve(host=args.host, port=args.port, providers=providers, seed=args.seed, on_ready=ready)
    except OSError as exc:
        _err(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}")
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-executor",
        description="One entry point for every LLM call: queues, limits, retries, futures.",
    )
    parser.add_argument("--version", action="version", version=f"llm-executor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run the example pipeline on the built-in emulator (no API key)")
    p.add_argument("--providers", help="comma list of openai,gemini,ollama (default: all three)")
    p.add_argument("--docs", metavar="DIR", help="a directory of *.txt documents (default: bundled corpus)")
    p.add_argument("--fault-rate", type=float, default=0.05, metavar="P",
                   help="share of requests the emulator answers with a fault (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="fault RNG seed (default 0)")
    p.add_argument("--max-docs", type=int, default=None, metavar="N", help="use only the first N documents")
    p.add_argument("--limit", type=int, default=30, help="entities shown (default 30)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary instead")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("run", help="run a JSONL batch of requests, resumable")
    p.add_argument("input", metavar="INPUT.jsonl")
    p.add_argument("-o", "--output", required=True, metavar="OUTPUT.jsonl")
    p.add_argument("--retry-failed", action="store_true", help="run again the requests that failed before")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check", help="print the configuration and whether each provider answers")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per provider (default 10)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser(
        "emulate",
        help="serve the provider emulator for other tools",
        description="Serve the OpenAI, Gemini and Ollama emulator. Each provider option takes VALUE "
                    "(every provider) or PROVIDER=VALUE, and may be repeated: --rps 5 --rps gemini=2.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--providers", help="comma list (default: openai,gemini,ollama)")
    p.add_argument("--seed", type=int, default=0, help="fault RNG seed (default 0)")
    emulated = p.add_argument_group("per provider ([PROVIDER=]VALUE, repeatable)")
    helps = {
        "require_key": ("KEY", "answer 401/400/403 unless requests carry this key"),
        "models": ("M1,M2", "known models; others get the provider's 404 (default: any model)"),
        "rps": ("N", "requests per sliding 1 s window"),
        "rpm": ("N", "requests per sliding 60 s window"),
        "tpm": ("N", "tokens per sliding 60 s window"),
        "rpd": ("N", "requests per sliding 24 h window (Gemini: a per-day quota)"),
        "max_concurrency": ("N", "requests in service at once; one more is refused"),
        "capacity": ("N", "requests served at full speed; past it latency grows linearly"),
        "latency": ("S", "seconds each reply takes"),
        "fault_rate": ("P", "share of requests answered with an injected fault"),
        "retry_after": ("S", "the wait an injected rate_limit fault asks for"),
        "thinking_tokens": ("N", "thinking tokens of thinking models (Gemini 2.5+, o-series, gpt-5)"),
        "rate_limit_headers": ("on|off", "x-ratelimit-* headers (default: on for openai only)"),
    }
    for option, _field, _convert in _EMULATE_OPTIONS:
        metavar, text = helps[option]
        emulated.add_argument("--" + option.replace("_", "-"), action="append", metavar=f"[P=]{metavar}",
                              help=text)
    p.set_defaults(func=_cmd_emulate)

    p = sub.add_parser("config", help="print the resolved configuration (keys masked)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Any = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args))
    except ConfigError as exc:
        _err(str(exc))
        return 2
    except LLMExecutorError as exc:
        _err(f"{type(exc).__name__}: {exc}")
        return 1
    except KeyboardInterrupt:
        print("llm-executor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
