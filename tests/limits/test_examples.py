"""The scaling examples run as documented (small sizes) and report a kept budget.

They run as scripts in a subprocess, as a user would run them, with the repository on
PYTHONPATH so an uninstalled checkout works too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REDIS_URL, delete_namespace, redis_client_or_skip

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("LLM_EXECUTOR_RATE_BACKEND", None)
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout_s, check=False)


@pytest.mark.slow
def test_multiprocessing_example_keeps_the_shared_qps_on_redis(namespace: str) -> None:
    client = redis_client_or_skip()
    try:
        done = _run("scaling_multiprocessing.py", "--processes", "2", "--requests", "20", "--qps", "10",
                    "--backend", REDIS_URL, "--namespace", namespace)
    finally:
        delete_namespace(client, namespace)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "20/20 answered by 2 processes" in done.stdout
    assert "OK: the processes kept one shared budget" in done.stdout, done.stdout


@pytest.mark.slow
def test_multiprocessing_example_keeps_the_shared_qps_on_sqlite(tmp_path: Path, namespace: str) -> None:
    done = _run("scaling_multiprocessing.py", "--processes", "2", "--requests", "20", "--qps", "10",
                "--backend", f"sqlite:///{tmp_path / 'limits.db'}", "--namespace", namespace)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: the processes kept one shared budget" in done.stdout, done.stdout


@pytest.mark.slow
def test_dask_example_keeps_the_shared_qps(namespace: str) -> None:
    pytest.importorskip("distributed", reason="the Dask example needs pip install 'dask[distributed]'")
    client = redis_client_or_skip()
    try:
        done = _run("scaling_dask.py", "--workers", "2", "--threads", "4", "--requests", "20", "--qps", "10",
                    "--backend", REDIS_URL, "--namespace", namespace, timeout_s=120)
    finally:
        delete_namespace(client, namespace)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "20/20 answered by 2 worker processes" in done.stdout
    assert "OK: the workers kept one shared budget" in done.stdout, done.stdout
