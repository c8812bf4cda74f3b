"""Fixtures shared by every test module (the fakes themselves live in tests/fakes.py)."""

from __future__ import annotations

from tests.fakes import fake, gate

__all__ = ["fake", "gate"]
