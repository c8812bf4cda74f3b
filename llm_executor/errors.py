"""The one exception tree of llm_executor.

Callers catch at the level they care about; each class also subclasses the builtin a
caller written for ``concurrent.futures`` would already catch::

    LLMExecutorError
    ├── ConfigError(ValueError)             bad setting; names the variable/field and the value expected
    │   └── UnknownProviderError            a provider name nobody registered
    ├── InvalidRequestError(ValueError)     bad LLMRequest field
    ├── QueueFullError                      admission full; .retry_after_s = estimated wait
    ├── ExecutorShutdownError(RuntimeError)
    ├── DeadlineExceededError(TimeoutError) request.timeout passed (queue wait included)
    └── ProviderError                       .provider, .status, .request_id, .retryable, .retry_after_s
        ├── RateLimitedError                429 after retries, or quota exhausted
        ├── ProviderUnavailableError        connection errors, timeouts, 5xx after retries
        ├── ContentBlockedError             the provider refused the prompt or the output
        └── SchemaValidationError           output is not valid JSON or breaks the schema; .path, .truncated

One warning category sits beside the tree: ``ConfigWarning(UserWarning)``, an ``LLM_EXECUTOR_*``
variable that nothing reads (a misspelling), so it can be filtered or turned into an error.

Messages never contain an API key or a URL query string. This module imports the stdlib only.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ConfigError",
    "ConfigWarning",
    "ContentBlockedError",
    "DeadlineExceededError",
    "ExecutorShutdownError",
    "InvalidRequestError",
    "LLMExecutorError",
    "ProviderError",
    "ProviderUnavailableError",
    "QueueFullError",
    "RateLimitedError",
    "SchemaValidationError",
    "UnknownProviderError",
]


class LLMExecutorError(Exception):
    """Root of every exception raised by llm_executor."""


class ConfigError(LLMExecutorError, ValueError):
    """A setting is invalid; the message names the variable or field and what was expected.

    Attributes:
        field: the config field at fault (``"qps"``, ``"api_key"``...), when one is.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class ConfigWarning(UserWarning):
    """An ``LLM_EXECUTOR_*`` variable nothing reads (a misspelling, or a provider that is not enabled).

    ``LLM_EXECUTOR_STRICT=1`` makes it a ``ConfigError``; ``warnings.simplefilter("error", ConfigWarning)``
    does the same from code.
    """


class UnknownProviderError(ConfigError):
    """A provider name that no adapter or custom provider is registered under."""

    def __init__(self, name: str, known: tuple[str, ...] | list[str] = ()) -> None:
        self.name = name
        self.known = tuple(sorted(known))
        listing = ", ".join(self.known) if self.known else "none"
        super().__init__(f"unknown provider {name!r}; known providers: {listing}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.name, self.known))


class InvalidRequestError(LLMExecutorError, ValueError):
    """An LLMRequest field is invalid; the message names the field and the value expected."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class QueueFullError(LLMExecutorError):
    """Admission is full (the HTTP 429 of a library); retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, provider: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.provider = provider

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class ExecutorShutdownError(LLMExecutorError, RuntimeError):
    """The executor is shut down (or shutting down with cancel_futures=True)."""


class DeadlineExceededError(LLMExecutorError, TimeoutError):
    """``request.timeout`` passed; the time includes the wait in the queue."""

    def __init__(self, message: str, *, request_id: str | None = None, provider: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.provider = provider

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class ProviderError(LLMExecutorError):
    """A provider call failed.

    Attributes:
        provider: the provider (lane) name.
        status: the HTTP status, or None when no response came back.
        request_id: our request id.
        retryable: whether another attempt may succeed.
        retry_after_s: the wait the provider asked for, when it said one.
        rate_limit: the limits the reply reported (a ``types.RateLimitInfo``; OpenAI-style
            ``x-ratelimit-*`` headers, also on a 429), None when it reported none.
    """

    default_retryable = False
    rate_limit: Any = None  # set by the adapters on the instance; a class default keeps old pickles working

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
        retryable: bool | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.status = status
        self.request_id = request_id
        self.retryable = self.default_retryable if retryable is None else retryable
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.args, self.__dict__))


class RateLimitedError(ProviderError):
    """HTTP 429 after the retries, or a quota that will not refill soon (then not retryable)."""

    default_retryable = True


class ProviderUnavailableError(ProviderError):
    """Connection error, timeout or 5xx after the retries, or a shared limit backend that is lost."""

    default_retryable = True


class ContentBlockedError(ProviderError):
    """The provider refused the prompt or the output (safety filters); retrying gets the same answer."""


class SchemaValidationError(ProviderError):
    """The output is not valid JSON or breaks the request's JSON schema.

    Attributes:
        path: JSON path of the first error (``$`` for the root, ``$.items[0].name``...).
        text_head: the first characters of the output, for the log.
        truncated: the provider stopped at ``max_output_tokens`` (finish_reason "length"): asking
            again with the same limit gets the same cut, a higher limit may not.
    """

    def __init__(self, message: str, *, path: str = "$", text_head: str = "", truncated: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.path = path
        self.text_head = text_head
        self.truncated = truncated


def _rebuild(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> BaseException:
    """Unpickle an error whose __init__ takes keyword-only fields (for multiprocessing)."""
    exc = cls.__new__(cls)
    exc.args = args
    exc.__dict__.update(state)
    return exc
