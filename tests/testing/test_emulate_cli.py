"""``llm-executor emulate``: every ProviderSim setting from the command line, per provider."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator

import pytest
import requests

from llm_executor.cli import _emulator_sims, build_parser, main
from llm_executor.testing import ProviderSim


def sims(*argv: str) -> dict[str, ProviderSim]:
    args = build_parser().parse_args(["emulate", *argv])
    names = (args.providers or "openai,gemini,ollama").split(",")
    return _emulator_sims(args, names)


def test_plain_values_apply_to_every_provider_and_provider_values_override() -> None:
    got = sims("--rps", "5", "--rps", "gemini=2", "--models", "ollama=llama3.2,qwen2.5", "--latency", "0.1",
               "--require-key", "sk-test", "--rpm", "openai=2220", "--tpm", "openai=40000", "--rpd", "gemini=100",
               "--capacity", "ollama=6", "--max-concurrency", "4", "--fault-rate", "0.1",
               "--rate-limit-headers", "gemini=on", "--thinking-tokens", "16", "--retry-after", "2")
    assert got["openai"].rps == 5 and got["ollama"].rps == 5 and got["gemini"].rps == 2
    assert got["ollama"].models == ("llama3.2", "qwen2.5") and got["openai"].models == ()
    assert got["openai"].rpm == 2220 and got["openai"].tpm == 40000 and got["gemini"].rpd == 100
    assert got["ollama"].capacity == 6 and got["gemini"].capacity is None
    assert {s.require_key for s in got.values()} == {"sk-test"}
    assert all(s.max_concurrency == 4 and s.latency_s == 0.1 and s.fault_rate == 0.1 for s in got.values())
    assert got["gemini"].rate_limit_headers is True and got["openai"].rate_limit_headers is None
    assert got["openai"].thinking_tokens == 16 and got["openai"].retry_after_s == 2


def test_order_does_not_matter_provider_value_wins() -> None:
    assert sims("--rps", "gemini=2", "--rps", "5")["gemini"].rps == 2


@pytest.mark.parametrize("argv", [
    ["--rps", "fast"],
    ["--rps", "openai=-1"],
    ["--rate-limit-headers", "maybe"],
    ["--providers", "openai", "--rps", "gemini=2"],
    ["--providers", "openai,anthropic"],
])
def test_bad_values_exit_2_with_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["emulate", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("llm-executor: error: ")


def test_help_lists_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["emulate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--require-key", "--models", "--rps", "--rpm", "--tpm", "--rpd", "--max-concurrency",
                 "--capacity", "--latency", "--fault-rate", "--seed", "--rate-limit-headers"):
        assert flag in out


@pytest.fixture
def served() -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llm_executor.cli", "emulate", "--port", "0", "--require-key", "sk-cli-1234",
         "--models", "openai=gpt-4o-mini", "--rpm", "openai=2"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line
        yield match.group(1)
    finally:
        proc.terminate()
        proc.wait(10)


def test_served_emulator_enforces_key_models_and_limits(served: str) -> None:
    url = served + "/v1/chat/completions"
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": "Bearer sk-cli-1234"}
    assert requests.post(url, json=body, timeout=5).status_code == 401
    unknown = requests.post(url, json={**body, "model": "no-such-model"}, headers=auth, timeout=5)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    codes = [requests.post(url, json=body, headers=auth, timeout=5).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
