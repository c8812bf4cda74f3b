"""The public surface and the import layering of STYLE.md practice 1."""

from __future__ import annotations

import ast
import dataclasses
import pickle
from pathlib import Path

import pytest

import llm_executor
from llm_executor import Capabilities, LLMRequest, LLMResponse
from llm_executor import errors as E

PKG = Path(llm_executor.__file__).parent


def test_all_is_sorted_and_exports_the_design_names() -> None:
    assert llm_executor.__all__ == sorted(llm_executor.__all__)
    for name in ("Executor", "ExecutorConfig", "ProviderConfig", "LLMRequest", "LLMResponse", "Capabilities",
                 "Provider"):
        assert name in llm_executor.__all__ and hasattr(llm_executor, name)


def test_error_tree_and_builtin_mixins() -> None:
    assert issubclass(E.ConfigError, (E.LLMExecutorError, ValueError))
    assert issubclass(E.UnknownProviderError, E.ConfigError)
    assert issubclass(E.InvalidRequestError, ValueError)
    assert issubclass(E.ExecutorShutdownError, RuntimeError)
    assert issubclass(E.DeadlineExceededError, TimeoutError)
    for cls in (E.RateLimitedError, E.ProviderUnavailableError, E.ContentBlockedError, E.SchemaValidationError):
        assert issubclass(cls, E.ProviderError)
    assert issubclass(E.QueueFullError, E.LLMExecutorError)


def test_errors_survive_pickling_with_their_fields() -> None:
    exc = E.RateLimitedError("slow down", provider="openai", status=429, retry_after_s=3.0)
    back = pickle.loads(pickle.dumps(exc))
    assert (back.provider, back.status, back.retry_after_s, str(back)) == ("openai", 429, 3.0, "slow down")
    q = pickle.loads(pickle.dumps(E.QueueFullError("full", retry_after_s=1.5)))
    assert q.retry_after_s == 1.5
    u = pickle.loads(pickle.dumps(E.UnknownProviderError("x", ["a"])))
    assert u.known == ("a",)


def test_value_types_are_frozen_with_the_design_defaults() -> None:
    r = LLMRequest("openai", "gpt-4o-mini", "Hi")
    assert (r.system, r.max_output_tokens, r.temperature, r.json_schema, r.request_id, r.priority, r.timeout,
            dict(r.metadata)) == (None, None, None, None, "", 0, None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.prompt = "x"  # type: ignore[misc]
    resp = LLMResponse("t", "p", "m", "stop", 3)
    assert (resp.request_id, resp.latency_ms, resp.queue_ms, resp.attempts, resp.data) == ("", 0.0, 0.0, 0, None)
    caps = Capabilities()
    assert (caps.max_output_tokens, caps.supports_json_mode, caps.supports_json_schema,
            caps.supports_system_prompt, caps.models) == (None, False, False, False, ())


LAYERS = {
    "types": {"errors"}, "errors": set(),
    "config": {"types", "errors"},
    "validation": {"types", "errors"},
    "retry": {"types", "errors", "config"},
    "limits": {"types", "errors", "config"},
    "metrics": {"types", "errors", "config"},
    "window": {"errors"},
    "web": {"errors"},
    "default": {"config", "executor"},
}


def _internal_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        if (node.level == 1 and path.parent == PKG) or node.level == 2:
            found.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(path.parent.name)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llm_executor."):
            found.add(node.module.split(".")[1])
    return found


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_lower_layers_import_only_layers_below(module: str) -> None:
    path = PKG / f"{module}.py"
    paths = [path] if path.exists() else sorted((PKG / module).glob("*.py"))
    assert paths, module
    for p in paths:
        extra = _internal_imports(p) - LAYERS[module] - {"", module}
        assert not extra, f"{p.name} imports {extra}"


def test_providers_never_import_the_executor() -> None:
    for path in (PKG / "providers").glob("*.py"):
        text = path.read_text()
        assert "executor import" not in text and "from ..executor" not in text, path.name


def test_phases_testing_and_cli_use_only_the_public_api() -> None:
    paths = [PKG / "cli.py", PKG / "web.py", *sorted((PKG / "phases").glob("*.py"))]
    assert len(paths) > 3
    for path in paths:
        if not path.exists():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("executor", "limits", "lifecycle"):
                pytest.fail(f"{path.name} imports internal module {node.module}")


def test_per_attempt_copies_carry_every_field() -> None:
    """``for_attempt``/``completed`` build the frozen types field by field: none may be forgotten."""
    import dataclasses

    from llm_executor import LLMRequest, LLMResponse

    request = LLMRequest("p", "m", "prompt", system="s", max_output_tokens=5, temperature=0.5,
                         json_schema={"type": "object"}, request_id="r", priority=2, timeout=3.0,
                         metadata={"k": "v"})
    changes = dict(provider="q", model="n", request_id="x", prompt="other", max_output_tokens=7,
                   json_schema={"type": "array"}, timeout=1.5)
    copy = request.for_attempt(**changes)
    assert copy == dataclasses.replace(request, **changes) and copy.metadata == request.metadata
    assert {f.name for f in dataclasses.fields(LLMRequest)} == set(LLMRequest.__slots__)
    response = LLMResponse("t", "p", "m", "length", 9, raw_finish_reason="MAX_TOKENS", prompt_tokens=4,
                           completion_tokens=5)
    filled = dict(provider="q", request_id="x", latency_ms=1.5, queue_ms=2.5, attempts=3, data={"a": 1})
    done = response.completed(**filled)
    assert done == dataclasses.replace(response, **filled) and done.data == {"a": 1}
    for obj, cls in ((copy, LLMRequest), (done, LLMResponse)):
        assert all(hasattr(obj, f.name) for f in dataclasses.fields(cls)), cls
