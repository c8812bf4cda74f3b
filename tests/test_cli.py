"""The llm-executor command, tested in-process through main(argv)."""

from __future__ import annotations

import json

import pytest

from llm_executor import __version__
from llm_executor.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_config_prints_resolved_configuration_with_keys_masked(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-SENTINEL-cli")
    monkeypatch.setenv("LLM_EXECUTOR_OPENAI_QPS", "7")
    assert main(["config", "--json"]) == 0
    out = capsys.readouterr().out
    assert "sk-SENTINEL-cli" not in out
    data = json.loads(out)
    assert data["providers"]["openai"]["qps"] == 7.0
    assert data["providers"]["openai"]["api_key"] == "***"
    assert main(["config"]) == 0
    assert "sk-SENTINEL-cli" not in capsys.readouterr().out


def test_config_error_is_one_stderr_line_and_exit_2(capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_EXECUTOR_QUEUE_SIZE", "abc")
    assert main(["config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llm-executor: error: LLM_EXECUTOR_QUEUE_SIZE='abc': expected an integer >= 0"]


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out
