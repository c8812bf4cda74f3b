"""The ``llm_emulator`` fixture, run in a pytester session as a user's test would."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest_plugins = ["pytester"]

USER_TEST = """
import pytest, requests
from llm_executor.testing import ProviderSim

def test_default(llm_emulator):
    body = {"model": "llama3.2", "stream": False, "messages": [{"role": "user", "content": "Hi"}]}
    r = requests.post(llm_emulator.url("ollama") + "/api/chat", json=body, timeout=5)
    assert r.status_code == 200
    assert llm_emulator.stats("ollama").requests == 1

@pytest.mark.llm_emulator(providers={"openai": ProviderSim(rps=1)}, seed=5)
def test_marker(llm_emulator):
    url = llm_emulator.url("openai") + "/chat/completions"
    body = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}
    codes = [requests.post(url, json=body, timeout=5).status_code for _ in range(2)]
    assert codes == [200, 429]
"""


def test_fixture_starts_and_stops_an_emulator_per_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=USER_TEST)
    # Block the entry-point copy (present once the package is installed) and load the module directly.
    result = pytester.runpytest(
        "-p", "no:llm_executor", "-p", "llm_executor.testing.pytest_plugin", "--strict-markers"
    )
    result.assert_outcomes(passed=2)


def test_plugin_import_is_cheap() -> None:
    code = (
        "import sys, llm_executor.testing.pytest_plugin as p; "
        "mods = ('llm_executor.testing.emulator', 'http.server', 'jsonschema'); "
        "heavy = [m for m in mods if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.strip() == "[]"
