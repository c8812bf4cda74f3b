"""The fault-injection soak (scripts/soak.py) in a short run: 600 requests, 30 % faults, a mid-run shutdown.

The run happens once per module; each test reads one family of checks from its report, so a
failure names the property that broke. Two of them pinned executor bugs the soak found (see
tests/test_executor_cancel_findings.py), fixed since.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SOAK_PATH = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("llm_executor_soak", SOAK_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def report() -> Any:
    soak = load_soak()
    return soak.run_soak(requests=600, fault_rate=0.3, seed=7, trace_memory=True)


def explain(report: Any) -> str:
    return report.format()


@pytest.mark.parametrize("check", ["resolved_once", "submit_after_shutdown", "threads", "limits", "no_key_leak"])
def test_soak_short_run_holds(report: Any, check: str) -> None:
    assert report.checks.get(check) is True, explain(report)


def test_soak_short_run_exercises_every_path(report: Any) -> None:
    # Not a vacuous pass: faults, refusals, cancels and failures of every kind actually happened.
    assert report.submit["accepted"] > 300 and report.submit["refused_shutdown"] > 0
    assert report.submit["cancel_calls_true"] > 0
    assert report.submit["fallbacks"] > 0  # requests changed lanes mid-flight
    failures: dict[str, int] = {}
    for lane in report.outcomes.values():
        for name, n in lane["failed_by_error"].items():
            failures[name] = failures.get(name, 0) + n
    assert {"SoakCrash", "DeadlineExceededError", "ProviderError"} <= set(failures), failures
    faults = {kind for e in report.emulator.values() for kind in e["faults"]}
    assert {"rate_limit", "server_error", "unavailable", "hang", "malformed"} <= faults, faults
    assert report.logs["records"] > 100
    assert report.memory["peak_traced_mb"] > 0


def test_soak_stats_equal_what_callers_saw(report: Any) -> None:
    assert report.checks.get("stats_match") is True, explain(report)


def test_soak_concurrent_futures_wait_sees_every_future_done(report: Any) -> None:
    assert report.checks.get("cf_wait_sees_all") is True, explain(report)


@pytest.fixture(scope="module")
def redis_kill_report() -> Any:
    soak = load_soak()
    return soak.run_soak(requests=500, fault_rate=0.3, seed=9, trace_memory=False, redis_kill="local")


@pytest.mark.redis
def test_soak_across_a_redis_kill_and_restart_loses_nothing_and_counts_nothing_twice(redis_kill_report: Any) -> None:
    # Limits in a Redis of the soak's own, killed at 30 % of the submissions and restarted at 50 %
    # under LLM_EXECUTOR_BACKEND_FAILURE=local (issue 11): every Future resolves once, stats match.
    report = redis_kill_report
    assert report.submit["redis_restarts"] == 1, report.submit
    for check in ("resolved_once", "cf_wait_sees_all", "stats_match", "threads", "limits", "no_key_leak"):
        assert report.checks.get(check) is True, explain(report)
