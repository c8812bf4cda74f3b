"""The llm-executor command, tested in-process through main(argv)."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert err == ["llm-executor: error: LLM_EXECUTOR_QUEUE_SIZE='abc' (from environment): expected an integer >= 0"]


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"LLM_EXECUTOR_PROVIDERS": "openai,anthropic"}, "provider 'anthropic' is configured but has no adapter"),
     ({"LLM_EXECUTOR_PROVIDERS": "openai", "LLM_EXECUTOR_FALLBACKS": "claude"}, "unknown provider 'claude'")],
)
def test_config_check_and_run_reject_the_same_settings_with_the_same_line(
        env: dict[str, str], expected: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    batch = tmp_path / "in.jsonl"
    batch.write_text('{"id": "a", "prompt": "hi"}\n')
    lines = []
    for argv in (["config"], ["config", "--json"], ["check"], ["run", str(batch), "-o", str(tmp_path / "out.jsonl")]):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == ""
        lines.append(captured.err)
    assert len(set(lines)) == 1 and lines[0].count("\n") == 1
    assert lines[0].startswith("llm-executor: error: ") and expected in lines[0]
    assert not (tmp_path / "out.jsonl").exists()


def test_config_prints_one_warning_line_per_unknown_variable(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_EXECUTOR_OPENAI_MAX_PARALEL", "2")
    assert main(["config", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["providers"]["openai"]["max_parallel"] == 4  # the typo was not read
    assert captured.err.splitlines() == [
        "llm-executor: warning: LLM_EXECUTOR_OPENAI_MAX_PARALEL (from environment) is not a known variable and "
        "is ignored; did you mean LLM_EXECUTOR_OPENAI_MAX_PARALLEL?"]
    monkeypatch.setenv("LLM_EXECUTOR_STRICT", "1")
    assert main(["config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llm-executor: error: LLM_EXECUTOR_STRICT=1: LLM_EXECUTOR_OPENAI_MAX_PARALEL")
