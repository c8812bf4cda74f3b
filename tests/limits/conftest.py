"""Fixtures of the limits suite: one contract over memory, SQLite (a real file), Redis and Redis Cluster.

Redis tests read ``LLM_EXECUTOR_TEST_REDIS_URL`` (default ``redis://127.0.0.1:6379/15``) and
``LLM_EXECUTOR_TEST_REDIS_CLUSTER_URL`` (default ``redis+cluster://127.0.0.1:7000``; `.ci/services`
starts both), use a namespace of their own and delete its keys afterwards; they skip, saying why,
only when no server answers, and fail instead when LLM_EXECUTOR_REQUIRE_REDIS=1 (CI).
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from llm_executor.config import ExecutorConfig, ProviderConfig
from llm_executor.limits import LaneLimiter, make_lane_limiter

REDIS_URL = os.environ.get("LLM_EXECUTOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
CLUSTER_URL = os.environ.get("LLM_EXECUTOR_TEST_REDIS_CLUSTER_URL", "redis+cluster://127.0.0.1:7000")


def _skip_or_fail(why: str) -> NoReturn:
    if os.environ.get("LLM_EXECUTOR_REQUIRE_REDIS") == "1":
        # CI starts a server: a Redis test that skipped there would hide the shared limits' tests.
        pytest.fail(f"LLM_EXECUTOR_REQUIRE_REDIS=1 but {why}")
    pytest.skip(why)


def skip_or_fail(why: str) -> NoReturn:
    """Skip a test that needs a service nobody started; fail instead in CI."""
    _skip_or_fail(why)


def redis_client_or_skip(url: str = REDIS_URL) -> object:
    """A redis-py client for ``url`` (a cluster client for ``redis+cluster://``), or skip/fail."""
    try:
        import redis
    except ImportError:  # pragma: no cover - the dev extra installs it
        _skip_or_fail("redis-py is not installed (pip install -e '.[dev]')")
    from llm_executor.errors import ConfigError
    from llm_executor.limits._redis import build_client

    try:
        client = build_client(url)
        client.ping()
    except (redis.exceptions.RedisError, OSError, ConfigError) as exc:
        _skip_or_fail(f"no Redis answers at {url} ({type(exc).__name__}); start one with `.ci/services` "
                      "or set LLM_EXECUTOR_TEST_REDIS_URL / LLM_EXECUTOR_TEST_REDIS_CLUSTER_URL")
    return client


def delete_namespace(client: object, namespace: str) -> None:
    """Delete every key of ``namespace`` (lane keys are ``{namespace:provider[:hash]}:...``)."""
    keys = list(client.scan_iter(match="{" + namespace + ":*"))  # type: ignore[attr-defined]
    for key in keys:  # one by one: on a cluster the keys of several lanes live in several slots
        client.delete(key)  # type: ignore[attr-defined]


@pytest.fixture
def namespace() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def _backend_url(kind: str, tmp_path: Path, namespace: str, request: pytest.FixtureRequest) -> str:
    if kind == "memory":
        return "memory"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'limits.db'}"
    url = CLUSTER_URL if kind == "cluster" else REDIS_URL
    client = redis_client_or_skip(url)
    request.addfinalizer(lambda: delete_namespace(client, namespace))
    return url


@pytest.fixture(params=["memory", "sqlite", "redis", "cluster"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> str:
    """Every backend: the contract holds for each."""
    return _backend_url(request.param, tmp_path, namespace, request)


@pytest.fixture(params=["sqlite", "redis", "cluster"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path, namespace: str) -> str:
    """Backends shared between processes."""
    return _backend_url(request.param, tmp_path, namespace, request)


MakeLimiter = Callable[..., LaneLimiter]


@contextlib.contextmanager
def limiter_factory(namespace: str) -> Iterator[MakeLimiter]:
    """A function building limiters for lane "openai" in ``namespace``; all are closed on exit."""
    made: list[LaneLimiter] = []

    def make(url: str, *, name: str = "openai", lease_ttl_s: float = 30.0,
             backend_failure: str = "fail_closed", **limits: object) -> LaneLimiter:
        pcfg = ProviderConfig(**limits)  # type: ignore[arg-type]
        ecfg = ExecutorConfig(providers={name: pcfg}, rate_backend=url, namespace=namespace,
                              backend_failure=backend_failure)  # type: ignore[arg-type]
        limiter = make_lane_limiter(name, pcfg, ecfg, lease_ttl_s=lease_ttl_s)
        made.append(limiter)
        return limiter

    try:
        yield make
    finally:
        for limiter in made:
            limiter.close()


@pytest.fixture
def make_limiter(namespace: str) -> Iterator[MakeLimiter]:
    """Build limiters for lane "openai"; all are closed after the test."""
    with limiter_factory(namespace) as make:
        yield make
