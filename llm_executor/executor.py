"""Placeholder: the real executor lands with issue 3 (being written on main)."""

from __future__ import annotations


class Executor:  # pragma: no cover - placeholder
    pass


class ExecutorStats:  # pragma: no cover - placeholder
    pass


class ProviderStats:  # pragma: no cover - placeholder
    pass
