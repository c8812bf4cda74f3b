"""The ``llm-executor`` command: a thin shell over the public API.

Only this module prints. ``main(argv)`` returns the exit status: 0 ok, 1 a request or a check
failed, 2 usage or configuration error (one stderr line: ``llm-executor: error: ...``).
Imports: the public API of ``llm_executor`` only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from . import ExecutorConfig, __version__
from .errors import ConfigError, LLMExecutorError

__all__ = ["main"]


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


def _cmd_config(args: argparse.Namespace) -> int:
    _print_config(ExecutorConfig.from_env(), args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-executor",
        description="One entry point for every LLM call: queues, limits, retries, futures.",
    )
    parser.add_argument("--version", action="version", version=f"llm-executor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

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
        print(f"llm-executor: error: {exc}", file=sys.stderr)
        return 2
    except LLMExecutorError as exc:
        print(f"llm-executor: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llm-executor: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
