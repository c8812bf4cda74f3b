"""One shared Executor per process: ``default_executor()``.

Notebooks, web workers and task queues each want one Executor per process, built from the
environment on first use and reused afterwards: re-running a notebook cell must not build a
second one (two executors against one provider hold twice its limits), and a forked worker
(gunicorn, Celery prefork, multiprocessing) must get its own. Writing that getter by hand — a
lock, a global, a process-id check — is what every example did; this module is it, once.

Contract of ``default_executor()``:

* the first call builds ``Executor(ExecutorConfig.from_env())``; later calls return the same
  object, from any thread (one lock, so two threads never build two);
* after that executor's ``shutdown()`` the next call builds a new one;
* in a forked child (another process id) the next call builds a new one; the parent's copy is
  left alone (it may still be referenced there) and, once dropped, collected like any Executor;
* ``default_executor(config)`` replaces the current one: it builds ``Executor(config)``, makes
  it the default, then shuts the old one down with ``cancel_futures=True`` and ``wait=True`` —
  queued requests of the old one are cancelled, its running calls finish before the call
  returns, so the two never overlap against a provider's limits from the calling thread.

Imports: ``config`` and the ``executor`` facade.
"""

from __future__ import annotations

import logging
import os
import threading

from .config import ExecutorConfig
from .executor import Executor

__all__ = ["default_executor"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_current: Executor | None = None
_pid = 0


def default_executor(config: ExecutorConfig | None = None) -> Executor:
    """This process's shared Executor, built from the environment on first use.

    Args:
        config: when given, replace the shared executor with ``Executor(config)``; the old one
            is shut down with ``cancel_futures=True`` (its queued requests are cancelled) and
            waited for (its running calls finish first).

    Returns:
        The shared Executor: the same object on every call until it is shut down, replaced, or
        the process forks.

    Raises:
        ConfigError: the environment's (or ``config``'s) configuration is invalid; nothing is
            replaced then.
    """
    global _current, _pid
    pid = os.getpid()
    with _lock:
        old = _current if _pid == pid else None  # a parent's copy is not ours to shut down
        if config is None and old is not None and not old._engine.closed:
            return old
        _current = Executor(config if config is not None else ExecutorConfig.from_env())
        _pid = pid
        current = _current
    if config is not None and old is not None and not old._engine.closed:
        # Outside the lock: a done-callback of the old executor may itself ask for the default.
        log.info("default_executor(config): replacing the shared executor; its queued requests are cancelled")
        old.shutdown(wait=True, cancel_futures=True)
    return current


def _after_fork_in_child() -> None:
    # The parent may have held the lock while it forked; the child has no thread to release it.
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
